"""Benchmark the semantic cache's lookup path, its index libraries and its eviction policies.

    python -m bench.cache_bench [--entries 100000] [--dim 384] [--skip-libraries] [--json out.json]

1. Index libraries on the same clustered unit vectors: build time, single-query p50/p99 search
   latency, recall@1 against exact search, removal support (eviction and TTL need it).
2. The cache's own lookup at `--entries` entries, embedding excluded (it runs before, in a thread):
   an exact repeat, and candidate search plus the verifier (`SemanticCacheCore.decide`), with
   all entries under one key (one HNSW partition) and spread over 1,000 keys (flat partitions).
3. LRU vs LFU: hit ratio of exact repeats on a Zipf request stream whose popular set drifts,
   with the cache holding a tenth of the distinct prompts.
"""

from __future__ import annotations

import os

# NOTE: one BLAS/OpenMP thread, as in a cache replica (embedding_threads=1). Idle BLAS threads spin
# after each matrix product and, on a 2-core machine, doubled the measured search latency.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from serving.cache.embedder import BatchingEmbedder  # noqa: E402
from serving.cache.key import CacheKey  # noqa: E402
from serving.cache.semantic import SemanticCacheCore  # noqa: E402
from serving.cache.store import CacheStore  # noqa: E402
from serving.cache.types import CachedAnswer  # noqa: E402

ANSWER = CachedAnswer(text="a cached answer of a typical length " * 8, finish_reason="stop",
                      num_prompt_tokens=20, num_output_tokens=60)


def key(i: int = 0) -> CacheKey:
    return CacheKey(model="bench", kind="chat", tenant=f"t{i}", temperature=0.0, top_p=1.0, top_k=-1,
                    seed=None, max_tokens=None, stop=(), context="")


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around n/50 topic centres, like embeddings of many prompts on fewer topics."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 50), dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def near(vectors: np.ndarray, ids: np.ndarray, seed: int = 1) -> np.ndarray:
    """Queries close to stored vectors (a paraphrase's neighbourhood: cosine ~0.95)."""
    rng = np.random.default_rng(seed)
    q = vectors[ids] + 0.012 * rng.standard_normal((len(ids), vectors.shape[1])).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def timed(fn, queries) -> tuple[float, float, list]:
    out, lat = [], []
    for q in queries:
        t = time.perf_counter()
        out.append(fn(q))
        lat.append(time.perf_counter() - t)
    lat = np.array(lat) * 1e3
    return float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), out


def bench_libraries(x: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> list[dict]:
    n, dim = x.shape
    ids = np.arange(n, dtype=np.int64)
    rows = []

    def record(name, build_s, search, removal):
        p50, p99, top = timed(search, queries)
        recall = float(np.mean([t == r for t, r in zip(top, truth)]))
        rows.append({"index": name, "build_s": round(build_s, 2), "p50_ms": round(p50, 4), "p99_ms": round(p99, 4),
                     "recall_at_1": recall, "removal": removal})
        print(f"  {name:<28} build {build_s:6.1f} s  p50 {p50:7.4f} ms  p99 {p99:7.4f} ms  "
              f"recall@1 {recall:.3f}  removal: {removal}")

    t = time.perf_counter()
    record("numpy exact (flat)", time.perf_counter() - t, lambda q: int(np.argmax(x @ q)), "yes")
    from usearch.index import Index

    t = time.perf_counter()
    u = Index(ndim=dim, metric="ip", dtype="f32", connectivity=16, expansion_add=64, expansion_search=64)
    u.add(ids, x)
    record("usearch HNSW (M=16, ef=64)", time.perf_counter() - t, lambda q: int(u.search(q, 1, threads=1).keys[0]),
           "yes (remove)")
    try:
        import faiss

        faiss.omp_set_num_threads(1)  # one query at a time, as a lookup does; threads only add overhead
        t = time.perf_counter()
        f = faiss.IndexHNSWFlat(dim, 16, faiss.METRIC_INNER_PRODUCT)
        f.hnsw.efConstruction, f.hnsw.efSearch = 64, 64
        f.add(x)
        record("faiss HNSWFlat (M=16, ef=64)", time.perf_counter() - t,
               lambda q: int(f.search(q[None], 1)[1][0, 0]), "no (HNSW has no remove_ids)")
        t = time.perf_counter()
        flat = faiss.IndexFlatIP(dim)
        flat.add(x)
        record("faiss FlatIP (exact)", time.perf_counter() - t, lambda q: int(flat.search(q[None], 1)[1][0, 0]),
               "yes (O(n) remove_ids)")
    except ImportError:
        print("  faiss-cpu not installed: skipped")
    try:
        import hnswlib

        t = time.perf_counter()
        h = hnswlib.Index(space="ip", dim=dim)
        h.init_index(max_elements=n, M=16, ef_construction=64)
        h.add_items(x, ids)
        h.set_ef(64)
        h.set_num_threads(1)
        record("hnswlib (M=16, ef=64)", time.perf_counter() - t, lambda q: int(h.knn_query(q, 1)[0][0, 0]),
               "mark_deleted (space not reused unless allow_replace_deleted)")
    except ImportError:
        print("  hnswlib not installed: skipped")
    return rows


def bench_cache(x: np.ndarray, queries: np.ndarray, num_keys: int) -> dict:
    n, dim = x.shape
    store = CacheStore(dim, 1 << 40, ttl_s=None)
    texts = [f"how do i do task number {i} in project {i % 97}" for i in range(n)]  # already normalised
    t = time.perf_counter()
    store.insert_many((key(i % num_keys), texts[i], texts[i], x[i], ANSWER, None) for i in range(n - 1000))
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(n - 1000, n):  # the last 1000 one at a time, as the router inserts
        store.insert(key(i % num_keys), texts[i], texts[i], x[i], ANSWER)
    insert_ms = time.perf_counter() - t  # seconds for 1000 inserts = ms per insert
    core = SemanticCacheCore(store, BatchingEmbedder(lambda t: None), similarity_threshold=0.9, max_candidates=5)
    targets = np.arange(len(queries)) * (n // len(queries))
    q_near = near(x, targets)
    it = iter(range(len(queries)))

    def decide(q):
        i = targets[next(it)]
        return core.decide(key(i % num_keys), texts[i], q)

    p50, p99, hits = timed(decide, q_near)
    hit_rate = float(np.mean([d.hit is not None for d in hits]))
    it2 = iter(targets)
    e50, e99, _ = timed(lambda _: store.get_exact(key((i := next(it2)) % num_keys), texts[i]), q_near)

    async def lookups():
        lat = []
        for i in targets:
            t = time.perf_counter()
            await core.lookup(key(i % num_keys), texts[i])
            lat.append(time.perf_counter() - t)
        return np.percentile(np.array(lat) * 1e3, 50)

    a50 = float(asyncio.run(lookups()))
    row = {"entries": n, "keys": num_keys, "bulk_load_s": round(build_s, 1), "insert_mean_ms": round(insert_ms, 3),
           "decide_p50_ms": round(p50, 4),
           "decide_p99_ms": round(p99, 4), "decide_hit_rate": hit_rate, "exact_p50_ms": round(e50, 4),
           "exact_p99_ms": round(e99, 4), "async_exact_lookup_p50_ms": round(a50, 4),
           "bytes_per_entry": store.num_bytes // n}
    print(f"  {n} entries over {num_keys} keys: bulk load {build_s:.1f} s, single insert {insert_ms:.2f} ms; "
          f"search + verifier p50 {p50:.3f} ms "
          f"p99 {p99:.3f} ms (hit rate {hit_rate:.2f}); exact p50 {e50:.4f} ms; async lookup (exact) p50 "
          f"{a50:.4f} ms; {row['bytes_per_entry']} bytes/entry")
    return row


def bench_eviction(num_prompts: int = 20000, num_requests: int = 200000, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    ranks = rng.zipf(1.1, num_requests) % num_prompts
    # The popular set drifts: every 20k requests, popularity shifts to a different slice of prompts.
    shift = (np.arange(num_requests) // 20000) * (num_prompts // 7)
    stream = (ranks + shift) % num_prompts
    vec = np.ones(8, dtype=np.float32) / np.sqrt(8)
    rows = []
    for policy in ("lru", "lfu"):
        probe = CacheStore(8, 1 << 40)
        probe.insert(key(), "prompt 0", "prompt 0", vec, ANSWER)
        per_entry = probe.num_bytes
        store = CacheStore(8, per_entry * num_prompts // 10, eviction=policy)
        hits = 0
        t = time.perf_counter()
        for p in stream:
            text = f"prompt {p}"
            entry = store.get_exact(key(), text)
            if entry is not None:
                store.touch(entry)
                hits += 1
            else:
                store.insert(key(), text, text, vec, ANSWER)
        elapsed = time.perf_counter() - t
        rows.append({"policy": policy, "hit_ratio": hits / num_requests,
                     "us_per_request": elapsed / num_requests * 1e6})
        print(f"  {policy}: hit ratio {hits / num_requests:.3f}  ({elapsed / num_requests * 1e6:.1f} us/request)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--skip-libraries", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    x = clustered(args.entries, args.dim)
    out = {}
    if not args.skip_libraries:
        queries = near(x, np.random.default_rng(2).integers(0, args.entries, args.queries))
        truth = [int(np.argmax(x @ q)) for q in queries]
        print(f"Index libraries, {args.entries} x {args.dim} float32, inner product, one query at a time:")
        out["libraries"] = bench_libraries(x, queries, truth)
    print("Cache lookup (embedding excluded):")
    out["cache"] = [bench_cache(x, x[: args.queries], 1), bench_cache(x, x[: args.queries], 1000)]
    print("Eviction, Zipf(1.1) stream with drifting popularity, capacity = 10% of distinct prompts:")
    out["eviction"] = bench_eviction()
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
