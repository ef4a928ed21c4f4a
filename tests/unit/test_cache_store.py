"""CacheStore and indexes: partitions, capacity in bytes, eviction, TTL, flush."""

import numpy as np
import pytest

from serving.cache.index import FlatIndex, HNSWIndex
from serving.cache.key import CacheKey
from serving.cache.store import CacheStore
from serving.cache.testing import hashing_encoder
from serving.cache.types import CachedAnswer

DIM = 32
_encoded = hashing_encoder(DIM)


def encode(texts):
    return _encoded(texts).vectors


def key(model="m", tenant="", temperature=0.0, context=""):
    return CacheKey(model=model, kind="chat", tenant=tenant, temperature=temperature, top_p=1.0, top_k=-1,
                    seed=None, max_tokens=None, stop=(), context=context)


def answer(text="an answer"):
    return CachedAnswer(text=text, finish_reason="stop", num_prompt_tokens=3, num_output_tokens=2)


def put(store, k, text, **kw):
    return store.insert(k, text, text.lower(), encode([text])[0], answer(f"answer to {text}"), **kw)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_search_is_partitioned_by_key():
    store = CacheStore(DIM, 1 << 20)
    put(store, key(tenant="a"), "what is the capital of france")
    vec = encode(["what is the capital of france"])[0]
    assert len(store.search(key(tenant="a"), vec, 5, 0.9)) == 1
    for other in (key(tenant="b"), key(model="m2"), key(temperature=0.5), key(context="x")):
        assert store.search(other, vec, 5, 0.0) == []
        assert store.get_exact(other, "what is the capital of france") is None
    assert store.get_exact(key(tenant="a"), "what is the capital of france") is not None


def test_exact_repeat_replaces():
    store = CacheStore(DIM, 1 << 20)
    put(store, key(), "Hello there")
    put(store, key(), "Hello there")
    assert len(store) == 1


@pytest.mark.parametrize("eviction", ["lru", "lfu"])
def test_memory_stays_under_capacity_while_inserting_ten_times_it(eviction):
    capacity = 64 * 1024
    store = CacheStore(DIM, capacity, eviction=eviction)
    inserted = 0
    i = 0
    while inserted < 10 * capacity:
        text = f"question number {i} about topic {i % 17} " + "x" * (i % 50)
        entry = put(store, key(tenant=f"t{i % 5}"), text)
        inserted += entry.num_bytes + 4 * DIM
        assert store.num_bytes <= capacity
        if i % 3 == 0:  # some hits so LFU has frequencies to work with
            store.touch(entry)
        i += 1
    assert store.num_evictions > 0 and len(store) > 10
    # The accounting matches a recount from scratch.
    assert store.num_bytes == store._recount()


def test_accounted_bytes_cover_real_python_memory():
    import tracemalloc

    store = CacheStore(DIM, 1 << 30)
    vectors = encode([f"question {i}" for i in range(2000)])
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(2000):
        store.insert(key(tenant=f"t{i % 50}"), f"question {i}", f"question {i}", vectors[i], answer(f"answer {i}"))
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert used <= store.num_bytes, (used, store.num_bytes)


def test_word_vectors_are_counted_in_the_bytes():
    import tracemalloc

    store = CacheStore(DIM, 1 << 30)
    vectors = encode([f"question {i}" for i in range(500)])
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(500):
        words = {f"word{i}x{j}": np.ones(384, np.float16) for j in range(6)}  # as the embedder makes them
        store.insert(key(), f"question {i}", f"question {i}", vectors[i], answer(f"answer {i}"), words=words)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert used <= store.num_bytes <= 1.5 * used, (used, store.num_bytes)


def test_verifier_analyses_are_counted_in_the_bytes():
    import random
    import tracemalloc

    from bench import workload
    from serving.cache.text import analyze
    from serving.cache.verifier import analysis_bytes

    rng = random.Random(0)
    prompts = [workload.make_prompt(rng, n) for n in (16, 48, 128) for _ in range(100)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    analyses = [analyze(p) for p in prompts]
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    estimated = sum(analysis_bytes(a) for a in analyses)
    assert used <= estimated <= 1.3 * used, (used, estimated)
    store = CacheStore(DIM, 1 << 30)
    entry = store.insert(key(), "q", "q", encode(["q"])[0], answer("a"), analysis=analyses[0],
                         analysis_bytes=analysis_bytes(analyses[0]))
    plain = store.insert(key(), "r", "r", encode(["r"])[0], answer("a"))
    assert entry.analysis is analyses[0] and entry.num_bytes - plain.num_bytes == analysis_bytes(analyses[0])


def test_lru_evicts_least_recent_and_lfu_least_frequent():
    for eviction, survivor in (("lru", "q0"), ("lfu", "q0")):
        store = CacheStore(DIM, 1 << 20, eviction=eviction)
        entries = [put(store, key(), f"q{i}") for i in range(3)]
        for _ in range(3):
            store.touch(entries[0])
        store.capacity_bytes = store.num_bytes  # full: the next insert evicts exactly one
        put(store, key(), "q3")
        texts = {e.query for e in store.entries()}
        assert survivor in texts and "q3" in texts and len(texts) == 3


def test_ttl_expires_lazily_and_on_insert():
    clock = Clock()
    store = CacheStore(DIM, 1 << 20, ttl_s=10.0, clock=clock)
    put(store, key(), "old question")
    clock.now += 5
    put(store, key(), "newer question")
    clock.now += 6
    assert store.get_exact(key(), "old question") is None
    assert store.get_exact(key(), "newer question") is not None
    clock.now += 5
    assert store.expire() == 1 and len(store) == 0 and store.num_partitions == 0
    assert store.num_expirations == 2


def test_flush_all_model_tenant():
    store = CacheStore(DIM, 1 << 20)
    for model in ("m1", "m2"):
        for tenant in ("a", "b"):
            put(store, key(model=model, tenant=tenant), f"{model} {tenant} question")
    assert store.flush(model="m1") == 2
    assert store.flush(tenant="a") == 1
    assert {(e.key.model, e.key.tenant) for e in store.entries()} == {("m2", "b")}
    assert store.flush() == 1 and len(store) == 0 and store.num_bytes == 0


def test_flat_partition_is_promoted_to_hnsw():
    store = CacheStore(DIM, 1 << 26, hnsw_min_size=64)
    for i in range(100):
        put(store, key(), f"question {i} {i * 7}")
    part = store._partitions[key().digest]
    assert isinstance(part.index, HNSWIndex)
    vec = encode(["question 42 294"])[0]
    (entry, sim), *_ = store.search(key(), vec, 3, 0.5)
    assert entry.query == "question 42 294" and sim > 0.99
    assert store.num_bytes == store._recount()
    # Shrinking below a quarter of the promotion size goes back to exact search.
    for e in [e for e in store.entries() if e.query != "question 42 294"][:90]:
        store._remove(e.entry_id)
    assert isinstance(store._partitions[key().digest].index, FlatIndex) and len(store) == 10
    assert store.search(key(), vec, 1, 0.5)[0][0].query == "question 42 294"
    assert store.num_bytes == store._recount()


@pytest.mark.parametrize("cls", [FlatIndex, HNSWIndex])
def test_index_add_remove_search(cls):
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((200, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index = cls(DIM)
    for i, v in enumerate(vecs):
        index.add(i, v)
    for i in range(0, 200, 2):
        index.remove(i)
    assert len(index) == 100
    for i in (1, 51, 199):
        top_id, sim = index.search(vecs[i], 1)[0]
        assert top_id == i and sim == pytest.approx(1.0, abs=1e-4)
    assert all(j % 2 == 1 for j, _ in index.search(vecs[0], 10))


def test_insert_many_matches_insert():
    rows = [(key(tenant=f"t{i % 3}"), f"question {i}", f"question {i}", encode([f"question {i}"])[0], answer(), None)
            for i in range(300)]
    rows.append(rows[0])  # an exact repeat inside the batch: the last one wins
    bulk = CacheStore(DIM, 1 << 26, hnsw_min_size=64)
    assert bulk.insert_many(rows) == 300
    one = CacheStore(DIM, 1 << 26, hnsw_min_size=64)
    for r in rows:
        one.insert(*r)
    assert len(bulk) == len(one) == 300 and bulk.num_partitions == 3
    assert bulk.num_bytes == bulk._recount()
    vec = encode(["question 42"])[0]
    assert bulk.search(key(tenant="t0"), vec, 1, 0.9)[0][0].query == "question 42"
    small = CacheStore(DIM, 16 * 1024)
    small.insert_many(rows)
    assert small.num_bytes <= 16 * 1024 and small.num_evictions > 0
