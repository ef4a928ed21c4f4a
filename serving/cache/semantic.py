"""The semantic cache's logic, without Ray: exact repeats, candidate search, the verifier, metrics.

`deployments/cache.py` wraps one `SemanticCacheCore` per partition in a Serve replica. Everything
here runs on one event loop; only the embedding model runs in a worker thread (`BatchingEmbedder`),
so the store needs no lock.

A lookup:
1. An exact repeat (same key, same text after `normalize`: case, whitespace, punctuation) is a hit
   at once: no embedding, no verifier.
2. A key with no entries is a miss at once (no embedding either).
3. Otherwise the query is embedded and the key's index returns up to `max_candidates` entries with
   similarity >= the threshold; the first that the verifier (`verifier.verify`) accepts is the hit.
   Each refused candidate is counted under its rejection label and logged at debug level.
A lookup given a time budget that its embedding would exceed (it waited behind other batches) is a
miss, counted as late: its caller has stopped waiting for it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Optional

import numpy as np

from serving.cache.embedder import BatchingEmbedder, Expired, WordVectors
from serving.cache.key import CacheKey
from serving.cache.store import CacheStore
from serving.cache.text import normalize
from serving.cache.types import CacheHit, CachedAnswer
from serving.cache.verifier import REJECTION_LABELS, analysis_bytes, analysis_of, verify

logger = logging.getLogger(__name__)

# The metric names stats() returns; docs/cache.md lists them with their meaning.
METRIC_NAMES = (
    "cache_lookups_total", "cache_hits_total", "cache_exact_hits_total", "cache_misses_total",
    "cache_rejected_candidates_total", "cache_inserts_total", "cache_evictions_total",
    "cache_expirations_total", "cache_flushed_total", "cache_entries", "cache_bytes",
    "cache_capacity_bytes", "cache_partitions", "cache_lookup_latency_seconds_sum",
    "cache_lookup_latency_seconds_count", "cache_lookup_latency_p50_ms", "cache_lookup_latency_p99_ms",
    "cache_embed_batches_total", "cache_embed_texts_total", "cache_late_lookups_total",
) + tuple(f"cache_rejected_{label}_total" for label in REJECTION_LABELS)

# The reason of a miss whose key had entries but none similar enough to read.
BELOW_THRESHOLD = "below_threshold"


@dataclass(frozen=True)
class Decision:
    """The outcome of reading the candidates: a hit, or the first candidate's rejection label
    (`BELOW_THRESHOLD` when none was similar enough)."""

    hit: Optional[CacheHit]
    reason: Optional[str] = None


class SemanticCacheCore:
    """Lookup and insert over one `CacheStore`, with an async embedder."""

    def __init__(self, store: CacheStore, embedder: BatchingEmbedder, similarity_threshold: float = 0.6,
                 max_candidates: int = 5):
        self.store = store
        self.embedder = embedder
        self.similarity_threshold = similarity_threshold
        self.max_candidates = max_candidates
        self._rejections: Counter[str] = Counter()  # label -> candidates refused for it
        self._latencies: deque[float] = deque(maxlen=2048)  # seconds, the most recent lookups
        self._counts = dict.fromkeys(("lookups", "hits", "exact_hits", "misses", "rejected", "inserts",
                                      "flushed", "late", "latency_sum"), 0)

    async def lookup(self, key: CacheKey, query: str, budget_s: Optional[float] = None) -> Optional[CacheHit]:
        """The cached answer for `query` under `key`, or None; None also when the query's embedding
        cannot start within `budget_s` seconds."""
        start = time.perf_counter()
        try:
            return await self._lookup(key, query, None if budget_s is None else time.monotonic() + budget_s)
        finally:
            elapsed = time.perf_counter() - start
            self._latencies.append(elapsed)
            self._counts["latency_sum"] += elapsed

    async def _lookup(self, key: CacheKey, query: str, deadline: Optional[float]) -> Optional[CacheHit]:
        self._counts["lookups"] += 1
        entry = self.store.get_exact(key, normalize(query))
        if entry is not None:
            self.store.touch(entry)
            self._counts["hits"] += 1
            self._counts["exact_hits"] += 1
            return CacheHit(answer=entry.answer, similarity=1.0, exact=True)
        if not self.store.has_key(key):
            self._counts["misses"] += 1
            return None
        try:
            embedding = await self.embedder.embed(query, deadline)
        except Expired:
            self._counts["misses"] += 1
            self._counts["late"] += 1
            return None
        hit = self.decide(key, query, embedding.vector, embedding.words).hit
        self._counts["hits" if hit else "misses"] += 1
        return hit

    def decide(self, key: CacheKey, query: str, vector: np.ndarray,
               words: Optional[WordVectors] = None) -> Decision:
        """Candidate search plus the verifier (synchronous; also used by the evaluation)."""
        first_reason = BELOW_THRESHOLD
        for i, (entry, similarity) in enumerate(
                self.store.search(key, vector, self.max_candidates, self.similarity_threshold)):
            rejection = verify(query, entry.query, words, entry.words, entry.analysis)
            if rejection is None:
                self.store.touch(entry)
                return Decision(CacheHit(answer=entry.answer, similarity=similarity, exact=False))
            self._counts["rejected"] += 1
            self._rejections[rejection.label] += 1
            logger.debug("cache candidate refused (%s): %r vs %r (similarity %.3f): %s", rejection.label,
                         query, entry.query, similarity, rejection.detail)
            if i == 0:
                first_reason = rejection.label
        return Decision(None, first_reason)

    async def insert(self, key: CacheKey, query: str, answer: CachedAnswer) -> None:
        """Store `answer` for `query` under `key` (replacing an exact repeat)."""
        embedding = await self.embedder.embed(query)
        analysis = analysis_of(query)  # kept with the entry: its candidates' analyses are ready
        if self.store.insert(key, query, normalize(query), embedding.vector, answer, words=embedding.words,
                             analysis=analysis, analysis_bytes=analysis_bytes(analysis)) is not None:
            self._counts["inserts"] += 1

    def flush(self, model: Optional[str] = None, tenant: Optional[str] = None) -> int:
        """Remove all entries, or those of one model and/or tenant; returns how many."""
        removed = self.store.flush(model=model, tenant=tenant)
        self._counts["flushed"] += removed
        return removed

    def stats(self) -> dict:
        """Counters and gauges as plain numbers, named as in METRIC_NAMES."""
        self.store.expire()
        lat = np.array(self._latencies) if self._latencies else np.zeros(1)
        c = self._counts
        return {
            "cache_lookups_total": c["lookups"], "cache_hits_total": c["hits"],
            "cache_exact_hits_total": c["exact_hits"], "cache_misses_total": c["misses"],
            "cache_rejected_candidates_total": c["rejected"], "cache_inserts_total": c["inserts"],
            "cache_evictions_total": self.store.num_evictions,
            "cache_expirations_total": self.store.num_expirations, "cache_flushed_total": c["flushed"],
            "cache_entries": len(self.store), "cache_bytes": self.store.num_bytes,
            "cache_capacity_bytes": self.store.capacity_bytes, "cache_partitions": self.store.num_partitions,
            "cache_lookup_latency_seconds_sum": c["latency_sum"],
            "cache_lookup_latency_seconds_count": c["lookups"],
            "cache_lookup_latency_p50_ms": float(np.percentile(lat, 50) * 1e3),
            "cache_lookup_latency_p99_ms": float(np.percentile(lat, 99) * 1e3),
            "cache_embed_batches_total": self.embedder.num_batches,
            "cache_embed_texts_total": self.embedder.num_texts, "cache_late_lookups_total": c["late"],
            **{f"cache_rejected_{label}_total": self._rejections[label] for label in REJECTION_LABELS},
        }
