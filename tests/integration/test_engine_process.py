"""The engine's own process next to each LLM replica (parallel/engine_process.py): an actor in the
replica's placement group, on its node; greedy output as with the engine in the replica's own
process; and when it or a rank dies mid-stream, the replica rebuilds it in place: the stream that
had tokens ends with an error event, requests that arrive meanwhile are held and answered."""

import asyncio
import json
import os
import signal
import time

import httpx
import pytest
from ray import serve

APP, ROUTE = "ep", "/ep"
TP2, IN_REPLICA = "ep-tp2", "ep-in-replica"


@pytest.fixture(scope="module")
def ep_app(serve_port, tiny_model):
    from deployments import build_app
    from serving.config import (AppConfig, CacheConfig, LLMConfig, ModelConfig, ParallelConfig, SchedulerConfig,
                                ServeOptions)

    sched = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=128)
    config = AppConfig(models=(
        LLMConfig(model=ModelConfig(path=tiny_model, name=TP2), scheduler=sched,
                  parallel=ParallelConfig(tensor_parallel_size=2),
                  serve=ServeOptions(num_replicas=1, health_check_period_s=1.0)),
        LLMConfig(model=ModelConfig(path=tiny_model, name=IN_REPLICA), scheduler=sched,
                  parallel=ParallelConfig(engine_process=False), serve=ServeOptions(num_replicas=1)),
    ), cache=CacheConfig(enabled=False))
    serve.run(build_app(config), name=APP, route_prefix=ROUTE)
    yield f"http://127.0.0.1:{serve_port}{ROUTE}"
    serve.delete(APP)


def placement(model: str) -> dict:
    handle = serve.get_deployment_handle(f"LLMServer:{model}", app_name=APP)
    return handle.placement.remote().result(timeout_s=30)


def test_the_engine_process_is_an_actor_in_the_replicas_placement_group(ep_app):
    where = placement(TP2)
    replica, core = where["replica"], where["engine_process"]
    assert replica["placement_group_id"] is not None
    assert core["placement_group_id"] == replica["placement_group_id"]
    assert core["node_id"] == replica["node_id"] and core["pid"] != replica["pid"]
    assert len(core["rank_pids"]) == 1  # rank 1; the engine's process is rank 0
    assert placement(IN_REPLICA)["engine_process"] is None


def test_greedy_output_is_the_same_with_the_engine_in_the_replica(ep_app):
    body = {"prompt": "The sea and the", "max_tokens": 12, "temperature": 0}
    a = httpx.post(ep_app + "/v1/completions", json={**body, "model": TP2}, timeout=60).json()
    b = httpx.post(ep_app + "/v1/completions", json={**body, "model": IN_REPLICA}, timeout=60).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["usage"]["completion_tokens"] == 12


async def stream_then_kill(url: str, pid: int, model: str = TP2, prompt: str = "The sea",
                           **body_extra) -> tuple[list[str], list[int], float]:
    """Streams one long request (`body_extra` added to its body) and kills `pid` after its second
    event; meanwhile sends 4 more requests. Returns the stream's events, the others' status codes,
    and seconds from the kill to the last of them answering."""
    body = {"model": model, "prompt": prompt, "max_tokens": 400, "temperature": 0, "stream": True, **body_extra}
    small = {"model": model, "prompt": "The sea", "max_tokens": 4, "temperature": 0}
    events: list[str] = []
    async with httpx.AsyncClient(timeout=90) as client:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 2:
                        os.kill(pid, signal.SIGKILL)  # a crash, not a polite exit
                        killed = time.monotonic()
                        others = asyncio.gather(*(client.post(url + "/v1/completions", json=small)
                                                  for _ in range(4)))
        codes = [r.status_code for r in await others]
    return events, codes, time.monotonic() - killed


@pytest.mark.parametrize("who", ["engine process", "rank 1"])
def test_a_killed_engine_process_or_rank_is_rebuilt_in_place(ep_app, who):
    where = placement(TP2)["engine_process"]
    pid = where["pid"] if who == "engine process" else where["rank_pids"][0]
    events, codes, answered_s = asyncio.run(asyncio.wait_for(stream_then_kill(ep_app, pid), 120))
    print(f"{who} killed: the 4 requests sent meanwhile answered {codes} within {answered_s:.1f} s")
    # the stream that had tokens ends with them and an error event (never a hang)
    assert any('"error"' in e for e in events[2:]), events[-3:]
    assert codes == [200] * 4  # held while the new engine process loaded, then served
    after = placement(TP2)["engine_process"]
    assert after["pid"] != where["pid"] and after["placement_group_id"] == where["placement_group_id"]
