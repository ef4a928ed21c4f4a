"""The SemanticCache deployment on a small local Ray cluster: two partitions, handles, snapshot."""

import os

import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from deployments.cache import cache_partitions  # noqa: E402
from serving.cache.key import build_cache_key, partition_of  # noqa: E402
from serving.cache.types import CachedAnswer  # noqa: E402
from serving.config import CacheConfig  # noqa: E402
from serving.protocol import ChatCompletionRequest  # noqa: E402


def request(text, user="alice"):
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": text}], temperature=0.0, user=user)


def test_partitions_lookup_insert_flush_snapshot(serve_port, tmp_path):
    config = CacheConfig(num_replicas=2, snapshot_path=str(tmp_path / "cache"))
    handles = [serve.run(app, name=f"cache{p}", route_prefix=None) for p, app in enumerate(cache_partitions(config))]
    try:
        check_partitions(handles, tmp_path)
    finally:
        for p in range(len(handles)):
            serve.delete(f"cache{p}")


def check_partitions(handles, tmp_path):

    def handle_for(key):
        return handles[partition_of(key, len(handles))]

    answer = CachedAnswer(text="Paris", finish_reason="stop", num_prompt_tokens=7, num_output_tokens=1)
    keys = {}
    for user in ("alice", "bob", "carol", "dave"):
        key = build_cache_key(request("What is the capital of France?", user), "m")
        keys[user] = key
        handle_for(key).insert.remote(key, "What is the capital of France?", answer).result()
    assert {partition_of(k, 2) for k in keys.values()} == {0, 1}  # these four keys use both

    key = keys["alice"]
    hit = handle_for(key).lookup.remote(key, "what's the capital of France?").result()
    assert hit is not None and hit.answer.text == "Paris" and not hit.exact
    assert handle_for(key).lookup.remote(key, "What is the capital of Germany?").result() is None
    other = build_cache_key(request("What is the capital of France?", "eve"), "m")
    assert handle_for(other).lookup.remote(other, "What is the capital of France?").result() is None

    stats = [h.stats.remote().result() for h in handles]
    assert sum(s["cache_entries"] for s in stats) == 4
    assert sum(s["cache_hits_total"] for s in stats) == 1
    assert sum(h.snapshot.remote().result() for h in handles) == 4
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".npz")]) == 2
    assert sum(h.flush.remote(tenant="bob").result() for h in handles) == 1
    assert sum(h.flush.remote().result() for h in handles) == 3
    handles[0].check_health.remote().result()
