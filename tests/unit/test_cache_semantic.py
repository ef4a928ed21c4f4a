"""SemanticCacheCore end to end with a model-free encoder: exact and semantic hits, the second
check, partition isolation, micro-batching, flush, stats and snapshots."""

import asyncio
import logging
import threading

import numpy as np

from serving.cache import snapshot
from serving.cache.embedder import BatchingEmbedder
from serving.cache.key import build_cache_key
from serving.cache.semantic import METRIC_NAMES, SemanticCacheCore
from serving.cache.store import CacheStore
from serving.cache.testing import hashing_encoder
from serving.cache.types import CachedAnswer
from serving.protocol import ChatCompletionRequest

DIM = 64


def make_core(encode=None, **store_kw):
    encode = encode or hashing_encoder(DIM)
    store = CacheStore(DIM, store_kw.pop("capacity_bytes", 1 << 22), **store_kw)
    return SemanticCacheCore(store, BatchingEmbedder(encode), similarity_threshold=0.6)


def key(text="q", **kw):
    kw.setdefault("temperature", 0.0)
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": text}], **kw)
    return build_cache_key(req, kw.pop("model_id", "m"))


def answer(text):
    return CachedAnswer(text=text, finish_reason="stop", num_prompt_tokens=4, num_output_tokens=2)


def run(coro):
    return asyncio.run(coro)


def test_exact_semantic_and_rejected():
    async def go():
        core = make_core()
        await core.insert(key(), "convert a string to an integer in Python", answer("int(s)"))
        (entry,) = core.store.entries()
        assert entry.analysis is not None  # the verifier's reading of it is kept with the entry
        exact = await core.lookup(key(), "Convert a  string to an integer in python")
        assert exact and exact.exact and exact.answer.text == "int(s)"
        para = await core.lookup(key(), "convert a string into an integer in Python")
        assert para and not para.exact and para.similarity >= 0.6
        # Same bag of words (similarity 1.0 for this encoder): the verifier refuses it.
        assert await core.lookup(key(), "convert an integer to a string in Python") is None
        stats = core.stats()
        assert set(stats) == set(METRIC_NAMES)
        assert stats["cache_hits_total"] == 2 and stats["cache_exact_hits_total"] == 1
        assert stats["cache_misses_total"] == 1 and stats["cache_rejected_candidates_total"] >= 1
        assert stats["cache_lookups_total"] == 3 and stats["cache_entries"] == 1
    run(go())


def test_every_refusal_is_counted_by_label_and_logged(caplog):
    async def go():
        core = make_core()
        await core.insert(key(), "How do I convert a string to an integer in Python?", answer("int(s)"))
        entry = next(core.store.entries())
        assert entry.words and entry.num_bytes > 2000  # the word vectors are stored and counted
        with caplog.at_level(logging.DEBUG, logger="serving.cache.semantic"):
            assert await core.lookup(key(), "How do I convert an integer to a string in Python?") is None
            assert await core.lookup(key(), "How do I convert a string to an integer in Java?") is None
        decision = core.decide(key(), "How do I convert a string to an integer in Java?",
                               core.store.vector(entry))
        assert decision.hit is None and decision.reason == "entity"
        stats = core.stats()
        assert stats["cache_rejected_order_total"] == 1 and stats["cache_rejected_entity_total"] == 2
        assert stats["cache_rejected_negation_total"] == 0
        assert "refused (order)" in caplog.text and "refused (entity)" in caplog.text
    run(go())


def test_never_a_hit_across_tenants_models_or_parameters():
    async def go():
        core = make_core()
        text = "what is the capital of France"
        await core.insert(key(user="alice"), text, answer("Paris"))
        assert await core.lookup(key(user="alice"), text)
        others = [key(user="bob"), key(), key(user="alice", max_tokens=5), key(user="alice", seed=1),
                  key(user="alice", temperature=0.3), key(user="alice", top_p=0.5),
                  key(user="alice", stop=["."])]
        others.append(build_cache_key(ChatCompletionRequest(
            model="m", messages=[{"role": "user", "content": text}], temperature=0.0, user="alice"), "other-model"))
        for other in others:
            assert await core.lookup(other, text) is None, other
    run(go())


def test_concurrent_lookups_are_micro_batched_off_the_loop():
    calls, threads = [], set()
    base = hashing_encoder(DIM)

    def encode(texts):
        calls.append(len(texts))
        threads.add(threading.get_ident())
        return base(texts)

    async def go():
        core = make_core(encode)
        await core.insert(key(), "seed question", answer("a"))
        hits = await asyncio.gather(*[core.lookup(key(), f"question number {i}") for i in range(40)])
        assert all(h is None for h in hits)
        assert sum(calls) == 41 and len(calls) <= 4  # batched, not one call per lookup
        assert threading.get_ident() not in threads  # the model ran in a worker thread
        assert core.stats()["cache_embed_batches_total"] == len(calls)
    run(go())


def test_flush_and_capacity_through_the_core():
    async def go():
        core = make_core(capacity_bytes=32 * 1024)
        for i in range(200):
            await core.insert(key(user=f"t{i % 2}"), f"question {i}", answer("x" * 100))
            assert core.store.num_bytes <= 32 * 1024
        stats = core.stats()
        assert stats["cache_evictions_total"] > 0 and stats["cache_bytes"] <= 32 * 1024
        removed = core.flush(tenant="t0")
        assert removed > 0 and all(e.key.tenant == "t1" for e in core.store.entries())
        assert core.flush() == stats["cache_entries"] - removed
    run(go())


def test_snapshot_roundtrip_and_repartition(tmp_path):
    async def go():
        core = make_core()
        for i in range(30):
            await core.insert(key(user=f"t{i % 3}"), f"question {i}", answer(f"answer {i}"))
        return core

    core = run(go())
    path = str(tmp_path / "cache")
    entries, vectors = snapshot.collect(core.store)
    assert snapshot.save(entries, vectors, snapshot.snapshot_file(path, 0, 1), "fake:64", DIM) == 30

    same = CacheStore(DIM, 1 << 22)
    assert snapshot.load(same, path, 0, 1, "fake:64") == 30
    e = same.get_exact(key(user="t1"), "question 1")
    assert e and e.answer.text == "answer 1"
    assert np.allclose(same.vector(e), core.store.vector(core.store.get_exact(key(user="t1"), "question 1")))

    # A different model's snapshot is ignored; a different partition count is re-split.
    assert snapshot.load(CacheStore(DIM, 1 << 22), path, 0, 1, "other:64") == 0
    parts = [CacheStore(DIM, 1 << 22) for _ in range(2)]
    counts = [snapshot.load(parts[p], path, p, 2, "fake:64") for p in range(2)]
    assert sum(counts) == 30 and all(c > 0 for c in counts)


def test_snapshot_skips_expired(tmp_path):
    now = [1000.0]
    store = CacheStore(DIM, 1 << 22, ttl_s=10.0, clock=lambda: now[0])
    vec = hashing_encoder(DIM)(["old"]).vectors[0]
    store.insert(key(), "old", "old", vec, answer("a"))
    now[0] += 8
    store.insert(key(), "new", "new", vec, answer("b"))
    path = str(tmp_path / "c")
    snapshot.save(*snapshot.collect(store), snapshot.snapshot_file(path, 0, 1), "fake", DIM)
    now[0] += 5
    later = CacheStore(DIM, 1 << 22, ttl_s=10.0, clock=lambda: now[0])
    assert snapshot.load(later, path, 0, 1, "fake") == 1
    assert later.get_exact(key(), "new") is not None


def test_encoder_failure_reaches_every_waiter_and_the_worker_survives():
    state = {"fail": True}
    base = hashing_encoder(DIM)

    def encode(texts):
        if state["fail"]:
            raise ValueError("model broke")
        return base(texts)

    async def go():
        embedder = BatchingEmbedder(encode)
        results = await asyncio.gather(*[embedder.embed(f"t{i}") for i in range(5)], return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results)
        state["fail"] = False
        assert (await embedder.embed("fine")).vector.shape == (DIM,)
        embedder.close()
    run(go())



def test_embedder_drops_texts_whose_deadline_passed_while_they_waited():
    """A text queued behind a slow batch past its deadline is never embedded: its caller gets Expired."""
    import time

    from serving.cache.embedder import Expired

    base = hashing_encoder(DIM)
    seen: list[str] = []

    def slow(texts):
        seen.extend(texts)
        time.sleep(0.2)
        return base(texts)

    async def go():
        embedder = BatchingEmbedder(slow)
        first = asyncio.ensure_future(embedder.embed("first"))
        await asyncio.sleep(0.02)  # the first batch is running
        late = embedder.embed("late", deadline=time.monotonic() + 0.05)
        patient = embedder.embed("patient", deadline=time.monotonic() + 5.0)
        results = await asyncio.gather(first, late, patient, return_exceptions=True)
        assert isinstance(results[1], Expired) and results[0].vector.shape == (DIM,) == results[2].vector.shape
        assert seen == ["first", "patient"] and embedder.num_expired == 1
        embedder.close()
    run(go())


def test_lookup_past_its_budget_is_a_late_miss():
    import time

    base = hashing_encoder(DIM)

    def slow(texts):
        time.sleep(0.2)
        return base(texts)

    async def go():
        core = make_core(slow)
        await core.insert(key(), "how do I sort a list in python", answer("sorted(xs)"))
        busy = asyncio.ensure_future(core.embedder.embed("something else"))
        await asyncio.sleep(0.02)
        assert await core.lookup(key(), "how can I sort a python list", budget_s=0.05) is None
        assert core.stats()["cache_late_lookups_total"] == 1
        await busy
        assert await core.lookup(key(), "how can I sort a python list", budget_s=5.0) is not None
        core.embedder.close()
    run(go())
