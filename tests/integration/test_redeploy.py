"""A redeploy under load: the replaced LLM server lets its streams finish (or ends them with a clean
503 after its drain timeout), new requests reach the new replica, and nothing hangs."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from ray import serve

APP, MODEL = "redeploy", "rd"
DEPLOYMENT = f"LLMServer:{MODEL}"


def app_config(tiny_model: str, max_num_seqs: int, graceful_shutdown_timeout_s: float):
    from serving.config import AppConfig, CacheConfig, LLMConfig, ModelConfig, SchedulerConfig, ServeOptions

    return AppConfig(models=(LLMConfig(
        model=ModelConfig(path=tiny_model, name=MODEL),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64, block_size=8),
        serve=ServeOptions(num_replicas=1, graceful_shutdown_timeout_s=graceful_shutdown_timeout_s,
                           graceful_shutdown_wait_loop_s=0.25),
    ),), cache=CacheConfig(enabled=False))


SHORT = (4, 4.5)  # max_num_seqs, graceful_shutdown_timeout_s: a drain timeout of 1 s
_live: dict = {}  # what this module deployed last


def deploy(tiny_model: str, max_num_seqs: int, graceful_shutdown_timeout_s: float) -> None:
    from deployments import build_app

    serve.run(build_app(app_config(tiny_model, max_num_seqs, graceful_shutdown_timeout_s)), name=APP,
              route_prefix=f"/{APP}")
    _live["config"] = (max_num_seqs, graceful_shutdown_timeout_s)


def llm_stats() -> dict:
    return serve.get_deployment_handle(DEPLOYMENT, app_name=APP).stats.remote().result(timeout_s=30)


@pytest.fixture(scope="module")
def base(serve_port, tiny_model):
    deploy(tiny_model, max_num_seqs=2, graceful_shutdown_timeout_s=30.0)  # drain timeout 26.5 s
    yield f"http://127.0.0.1:{serve_port}/{APP}"
    serve.delete(APP)


async def stream(client: httpx.AsyncClient, url: str, max_tokens: int, started: asyncio.Event = None) -> dict:
    """One streamed completion: its status and its SSE events (decoded, "[DONE]" as is)."""
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": max_tokens, "min_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "body": json.loads(await r.aread())}
        if started is not None:
            started.set()
        events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
    return {"status": 200, "events": [e if e == "[DONE]" else json.loads(e) for e in events]}


def outcome(result: dict, max_tokens: int) -> str:
    """'complete' (every token, a finish_reason, [DONE]) or 'ended' (a 503 before the stream, or an
    error event then [DONE], naming the shutdown); anything else fails the test."""
    if result["status"] != 200:
        assert result["status"] == 503 and result["body"]["error"]["code"] == "shutting_down", result
        return "ended"
    events = result["events"]
    assert events and events[-1] == "[DONE]", events[-3:]
    chunks = events[:-1]
    if "error" in chunks[-1]:
        error = chunks[-1]["error"]
        assert error["type"] == "service_unavailable" and error["code"] == "shutting_down", error
        assert "shutting down" in error["message"]
        return "ended"
    assert chunks[-1]["usage"]["completion_tokens"] == max_tokens  # the usage chunk, after the last choice's
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    return "complete"


async def watch_stopping(seen: list, open_streams) -> None:
    """Appends the number of open streams each time Serve lists an old LLM replica as STOPPING."""
    while True:
        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(APP)
        states = app.deployments[DEPLOYMENT].replica_states if app and DEPLOYMENT in app.deployments else {}
        if states.get("STOPPING"):
            seen.append(open_streams())
        await asyncio.sleep(0.2)


def test_streams_in_flight_finish_across_a_redeploy_and_new_ones_reach_the_new_replica(base, tiny_model):
    max_tokens = 600  # 8 streams, 2 at a time: still running when the old replica starts to stop

    async def main():
        async with httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as client:
            first = asyncio.Event()
            long = [asyncio.create_task(stream(client, base, max_tokens, first)) for _ in range(8)]
            await asyncio.wait_for(first.wait(), 30)
            seen: list[int] = []
            watcher = asyncio.create_task(watch_stopping(seen, lambda: sum(not t.done() for t in long)))
            redeploy = asyncio.create_task(asyncio.to_thread(deploy, tiny_model, *SHORT))
            later = []  # new requests keep arriving while the old replica drains and the new one starts
            deadline = time.monotonic() + 120
            while not redeploy.done():
                assert time.monotonic() < deadline, "the redeploy did not finish"
                later.append(asyncio.create_task(stream(client, base, 20)))
                await asyncio.sleep(0.5)
            await redeploy
            later.append(asyncio.create_task(stream(client, base, 20)))
            try:
                return (await asyncio.wait_for(asyncio.gather(*long), 60),
                        await asyncio.wait_for(asyncio.gather(*later), 60), seen)
            finally:
                watcher.cancel()

    start = time.monotonic()
    long, later, seen = asyncio.run(main())
    assert any(seen), "the old replica never stopped while streams were open"
    assert [outcome(r, max_tokens) for r in long] == ["complete"] * 8  # well inside the 26.5 s drain timeout
    assert [outcome(r, 20) for r in later] == ["complete"] * len(later) and len(later) >= 3
    assert llm_stats()["max_num_seqs"] == SHORT[0]  # the new config serves
    assert time.monotonic() - start < 90


def test_streams_past_the_drain_timeout_end_with_a_clean_503(base, tiny_model):
    max_tokens = 900  # 8 streams, 4 at a time: longer than the 1 s drain timeout
    if _live.get("config") != SHORT:  # the last test leaves it deployed
        deploy(tiny_model, *SHORT)

    async def main():
        async with httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as client:
            first = asyncio.Event()
            tasks = [asyncio.create_task(stream(client, base, max_tokens, first)) for _ in range(8)]
            await asyncio.wait_for(first.wait(), 30)
            await asyncio.wait_for(asyncio.to_thread(deploy, tiny_model, 2, 30.0), 120)
            return await asyncio.wait_for(asyncio.gather(*tasks), 60)

    start = time.monotonic()
    outcomes = [outcome(r, max_tokens) for r in asyncio.run(main())]
    assert "ended" in outcomes, outcomes
    ok = httpx.post(base + "/v1/completions", timeout=60,
                    json={"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200 and llm_stats()["max_num_seqs"] == 2
    assert time.monotonic() - start < 60
