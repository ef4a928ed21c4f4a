"""Speculative decoding served: the draft worker is a Ray actor in the LLM replica's placement group;
greedy output over HTTP equals speculation off; the server reports acceptance per proposer; a draft
worker that dies is handled like a dead rank (the stream ends cleanly, the replica rebuilds in place)."""

import asyncio
import time

import httpx
import pytest
from ray import serve

from tests.integration.test_engine_process import stream_then_kill

APP, ROUTE, MODEL = "spec", "/spec", "spec-draft"


@pytest.fixture(scope="module")
def spec_app(serve_port):
    from deployments import build_app
    from serving.config import (AppConfig, CacheConfig, LLMConfig, ModelConfig, SchedulerConfig, ServeOptions,
                                SpeculativeConfig)
    from serving.models import EMBEDDED_TARGET

    config = AppConfig(models=(LLMConfig(
        model=ModelConfig(path=str(EMBEDDED_TARGET), name=MODEL, dtype="float32"),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=128),
        speculative=SpeculativeConfig(method="draft", adaptive=False),
        serve=ServeOptions(num_replicas=1, health_check_period_s=1.0)),), cache=CacheConfig(enabled=False))
    serve.run(build_app(config), name=APP, route_prefix=ROUTE)
    yield f"http://127.0.0.1:{serve_port}{ROUTE}"
    serve.delete(APP)


def llm_call(method: str):
    handle = serve.get_deployment_handle(f"LLMServer:{MODEL}", app_name=APP)
    return getattr(handle, method).remote().result(timeout_s=30)


PROMPTS = [[1, 4, 2031, 359, 291, 83, 2, 5], [1, 1023, 88, 301, 17], [1, 4, 77, 98, 2, 5]]


def test_the_draft_worker_is_an_actor_in_the_replicas_placement_group(spec_app):
    where = llm_call("placement")
    replica, draft = where["replica"], where["engine_process"]["draft"]
    assert draft is not None and replica["placement_group_id"] is not None
    assert draft["placement_group_id"] == replica["placement_group_id"]
    assert draft["node_id"] == replica["node_id"]
    assert draft["pid"] not in (replica["pid"], where["engine_process"]["pid"])


def test_served_greedy_output_equals_speculation_off_and_acceptance_is_reported(spec_app):
    from tests.unit.test_spec_engine import make_engine, run
    from serving.sampling import SamplingParams

    engine = make_engine("none", num_kv_blocks=256)
    want, _, _ = run(engine, [(str(i), p, SamplingParams(max_tokens=40, temperature=0.0), 0)
                              for i, p in enumerate(PROMPTS)])

    async def ask_all():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(spec_app + "/v1/completions", json={
                "model": MODEL, "prompt": p, "max_tokens": 40, "temperature": 0, "ignore_eos": True})
                for p in PROMPTS))

    before = llm_call("stats").get("spec_draft", {"proposed": 0, "accepted": 0})
    for i, r in enumerate(asyncio.run(ask_all())):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] == 40
        assert body["choices"][0]["text"] == engine.tokenizer.decode(want[str(i)], skip_special_tokens=True)
    after = llm_call("stats")["spec_draft"]
    assert after["proposed"] > before["proposed"] and after["accepted"] > before["accepted"]


def test_a_killed_draft_worker_is_handled_like_a_dead_rank(spec_app):
    before = llm_call("placement")["engine_process"]
    killing = stream_then_kill(spec_app, before["draft"]["pid"], MODEL, "Tell me a verse", ignore_eos=True)
    events, codes, _ = asyncio.run(asyncio.wait_for(killing, 150))
    assert events[-1] == "[DONE]" or any('"error"' in e for e in events[2:]), events[-3:]  # ended, never hung
    assert codes == [200] * 4  # held while the engine (and a new draft worker) were rebuilt, then served
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        after = llm_call("placement")["engine_process"]
        if after["draft"]["pid"] != before["draft"]["pid"]:
            break
        time.sleep(1)
    assert after["draft"]["pid"] != before["draft"]["pid"]
    assert after["draft"]["placement_group_id"] == before["draft"]["placement_group_id"]
