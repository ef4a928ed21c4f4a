"""A client that goes away frees its sequence; overload is refused with 429 and Retry-After."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from ray import serve

from tests.conftest import TINY_NAME


def llm_stats(app_name: str, model: str) -> dict:
    handle = serve.get_deployment_handle(f"LLMServer:{model}", app_name=app_name)
    return handle.stats.remote().result(timeout_s=30)


def wait_all_blocks_free(app_name: str, model: str, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        st = llm_stats(app_name, model)
        if st["num_kv_blocks_free"] == st["num_kv_blocks"] or time.monotonic() > deadline:
            return st
        time.sleep(0.2)


def test_disconnect_mid_stream_frees_blocks(llm_app):
    body = {"model": TINY_NAME, "prompt": "The quick brown fox", "max_tokens": 900, "temperature": 0,
            "stream": True, "cache": {"skip": True, "no_store": True}}
    with httpx.stream("POST", llm_app + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        st = llm_stats("llm", TINY_NAME)
        assert st["num_kv_blocks_free"] < st["num_kv_blocks"]  # the sequence holds blocks now
    # the connection is closed: the sequence is aborted and its blocks freed (bounded wait)
    st = wait_all_blocks_free("llm", TINY_NAME)
    assert st["num_kv_blocks_free"] == st["num_kv_blocks"]


def test_cancelled_handle_call_frees_blocks(llm_app):
    from serving.protocol import CompletionRequest

    handle = serve.get_app_handle("llm")
    req = CompletionRequest(model=TINY_NAME, prompt="Hello", max_tokens=900, temperature=0, stream=True,
                            cache={"skip": True, "no_store": True})
    gen = handle.options(stream=True).generate.remote(req)
    next(iter(gen))
    gen.cancel()
    st = wait_all_blocks_free("llm", TINY_NAME)
    assert st["num_kv_blocks_free"] == st["num_kv_blocks"]


@pytest.fixture(scope="module")
def small_app(serve_port, tiny_model):
    """A second app: three models (one admits only 2 waiting requests, one takes 2 requests at a time
    and queues 2 more), the cache switched off, and
    the router's handles on Ray actor calls instead of the default gRPC (errors such as the 429
    below cross either transport)."""
    from deployments import build_app
    from serving.config import (AppConfig, CacheConfig, LLMConfig, ModelConfig, RouterConfig, SchedulerConfig,
                                ServeOptions)

    config = AppConfig(models=(LLMConfig(
        model=ModelConfig(path=tiny_model, name="small"),
        scheduler=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, max_waiting_requests=2),
        serve=ServeOptions(num_replicas=1),
    ), LLMConfig(model=ModelConfig(path=tiny_model, name="other"), serve=ServeOptions(num_replicas=1)),
        LLMConfig(model=ModelConfig(path=tiny_model, name="narrow"),
                  serve=ServeOptions(num_replicas=1, max_ongoing_requests=2, max_queued_requests=2))),
        cache=CacheConfig(enabled=False), router=RouterConfig(handle_transport="ray"))
    serve.run(build_app(config), name="small", route_prefix="/small")
    yield f"http://127.0.0.1:{serve_port}/small"
    serve.delete("small")


def test_overload_gets_429_with_retry_after_and_nothing_is_lost(small_app):
    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"model": "small", "prompt": "Hello", "max_tokens": 40, "temperature": 0}
            return await asyncio.gather(*(client.post(small_app + "/v1/completions", json=body)
                                          for _ in range(16)))

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    assert 429 in codes and 200 in codes
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"
        else:
            assert r.json()["usage"]["completion_tokens"] == 40  # accepted work completed in full
    ok = httpx.post(small_app + "/v1/completions", timeout=60,
                    json={"model": "small", "prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200


def test_two_models_each_its_own_deployment_and_cache_off(small_app):
    models = httpx.get(small_app + "/v1/models", timeout=30).json()
    assert sorted(m["id"] for m in models["data"]) == ["narrow", "other", "small"]
    for model in ("small", "other"):
        body = {"model": model, "prompt": "Hello", "max_tokens": 3, "temperature": 0}
        first = httpx.post(small_app + "/v1/completions", json=body, timeout=60).json()
        again = httpx.post(small_app + "/v1/completions", json=body, timeout=60).json()
        assert first["model"] == model and first["usage"]["completion_tokens"] == 3
        assert again["cached"] is False  # the cache is off in this app's config
    assert llm_stats("small", "other")["num_requests"] == 2


def test_a_full_replica_queue_gets_503_with_retry_after_at_once(small_app):
    """Past a model's max_ongoing_requests plus max_queued_requests, Serve refuses the call at the
    router's handle; the router answers 503 with Retry-After and an OpenAI error body at once."""
    async def burst():
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"model": "narrow", "prompt": "Hello", "max_tokens": 60, "temperature": 0}

            async def one():
                start = time.monotonic()
                r = await client.post(small_app + "/v1/completions", json=body)
                return r, time.monotonic() - start

            return await asyncio.gather(*(one() for _ in range(16)))

    results = asyncio.run(burst())
    codes = [r.status_code for r, _ in results]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 4 and 503 in codes  # 2 running + 2 queued at least got through
    slowest_ok = max(took for r, took in results if r.status_code == 200)
    for r, took in results:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "overloaded"
            assert took < slowest_ok  # refused at once, not after waiting in a queue
        else:
            assert r.json()["usage"]["completion_tokens"] == 60
    ok = httpx.post(small_app + "/v1/completions", timeout=60,
                    json={"model": "narrow", "prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200
