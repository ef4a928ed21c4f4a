"""The engine's own process next to each LLM replica (parallel/engine_process.py): an actor in the
replica's placement group, on its node; greedy output as in the replica's own process; killed
mid-stream, the stream ends with an error event and Serve brings the model back."""

import json
import os
import signal
import time

import httpx
import pytest
from ray import serve

from tests.conftest import TINY_NAME

APP, ROUTE, MODEL = "ep", "/ep", "ep-tiny"


@pytest.fixture(scope="module")
def ep_app(serve_port, tiny_model):
    from deployments import build_app
    from serving.config import AppConfig, CacheConfig, LLMConfig, ModelConfig, SchedulerConfig, ServeOptions

    config = AppConfig(models=(LLMConfig(
        model=ModelConfig(path=tiny_model, name=MODEL),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=128),
        serve=ServeOptions(num_replicas=1, health_check_period_s=1.0),
    ),), cache=CacheConfig(enabled=False))
    serve.run(build_app(config), name=APP, route_prefix=ROUTE)
    yield f"http://127.0.0.1:{serve_port}{ROUTE}"
    serve.delete(APP)


def placement() -> dict:
    handle = serve.get_deployment_handle(f"LLMServer:{MODEL}", app_name=APP)
    return handle.placement.remote().result(timeout_s=30)


def test_the_engine_process_is_an_actor_in_the_replicas_placement_group(ep_app):
    where = placement()
    replica, core = where["replica"], where["engine_process"]
    assert replica["placement_group_id"] is not None
    assert core["placement_group_id"] == replica["placement_group_id"]
    assert core["node_id"] == replica["node_id"] and core["pid"] != replica["pid"]


def test_greedy_output_is_the_same_with_the_engine_in_the_replica(ep_app, llm_app):
    """llm_app (conftest) runs the same tiny model with tensor_parallel_size 2 through its engine
    process; here tensor_parallel_size 1. Both must give the model's greedy tokens."""
    body = {"prompt": "The sea and the", "max_tokens": 12, "temperature": 0}
    a = httpx.post(ep_app + "/v1/completions", json={**body, "model": MODEL}, timeout=60).json()
    b = httpx.post(llm_app + "/v1/completions", json={**body, "model": TINY_NAME}, timeout=60).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["usage"]["completion_tokens"] == 12


def test_a_killed_engine_process_ends_the_stream_cleanly_and_the_model_comes_back(ep_app):
    core_pid = placement()["engine_process"]["pid"]
    body = {"model": MODEL, "prompt": "The sea", "max_tokens": 400, "temperature": 0, "stream": True}
    events = []
    with httpx.stream("POST", ep_app + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 2:
                    os.kill(core_pid, signal.SIGKILL)  # a crash, not a polite exit
    killed = time.monotonic()
    last = events[-1]
    # the stream ended: finished, or an error event naming what happened (never a hang)
    if last != "[DONE]":
        assert "error" in json.loads(last)
    deadline = killed + 120
    while True:
        try:
            r = httpx.post(ep_app + "/v1/completions", timeout=30,
                           json={"model": MODEL, "prompt": "The sea", "max_tokens": 4, "temperature": 0})
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the model did not come back"
        time.sleep(1.0)
    print(f"answered again {time.monotonic() - killed:.1f} s after the kill")
