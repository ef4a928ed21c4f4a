"""The cache's memory: entries grouped by cache key, with capacity in bytes, eviction and TTL.

Pure Python plus numpy; no embedding model, no verifier, no asyncio (see `semantic.py`). All
methods are synchronous and must be called from one thread at a time.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from serving.cache.eviction import create_policy
from serving.cache.index import FlatIndex, HNSWIndex, VectorIndex, create_index
from serving.cache.key import CacheKey
from serving.cache.types import CachedAnswer

# NOTE: Python object overhead of one entry (Entry, CachedAnswer, dict slots, str headers), measured
# with tracemalloc in tests/unit/test_cache_store.py; the text bytes are added on top.
ENTRY_OVERHEAD_BYTES = 1024
PARTITION_OVERHEAD_BYTES = 1024
# NOTE: a word vector's dict slot, string header and ndarray header on top of its data and its text
# (about 300 bytes with tracemalloc in tests/unit/test_cache_store.py).
WORD_OVERHEAD_BYTES = 320


@dataclass(slots=True)
class Entry:
    entry_id: int
    key: CacheKey
    query: str
    norm: str  # normalised query: the exact-repeat key
    answer: CachedAnswer
    created_at: float  # wall-clock seconds (survives a snapshot)
    num_hits: int = 0
    num_bytes: int = 0
    # The query's word vectors for the verifier (`embedder.WordVectors`); None after a snapshot
    # reload, when the verifier decides by its rules alone.
    words: Optional[dict] = None
    # The query's `verifier.analysis_of`, kept with the entry (its bytes are in num_bytes); None
    # after a snapshot reload (the verifier analyses it then).
    analysis: Optional[object] = None


class Partition:
    """All entries under one cache key: a vector index plus an exact-text map."""

    def __init__(self, key: CacheKey, index: VectorIndex):
        self.key = key
        self.index = index
        self.exact: dict[str, int] = {}  # norm -> entry id


class CacheStore:
    """Entries by cache key. Capacity is a byte budget over the entries' estimated memory (texts,
    vectors in their index, Python overhead); inserting past it evicts by `eviction`. Entries older
    than `ttl_s` are dropped lazily (on lookup) and from the oldest end (on insert and `expire`)."""

    def __init__(self, dim: int, capacity_bytes: int, ttl_s: Optional[float] = None, eviction: str = "lru",
                 hnsw_min_size: int = 4096, clock: Callable[[], float] = time.time):
        self.dim = dim
        self.capacity_bytes = capacity_bytes
        self.ttl_s = ttl_s
        self.eviction = eviction
        self.hnsw_min_size = hnsw_min_size
        self.clock = clock
        self._policy = create_policy(eviction)
        self._entries: dict[int, Entry] = {}
        self._by_age: OrderedDict[int, None] = OrderedDict()  # insertion order = age order
        self._partitions: dict[str, Partition] = {}  # key digest -> partition
        self._ids = itertools.count()
        self._index_bytes = 0
        self._entry_bytes = 0
        self.num_evictions = 0
        self.num_expirations = 0

    # ---- reading -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_bytes(self) -> int:
        return self._entry_bytes + self._index_bytes + PARTITION_OVERHEAD_BYTES * len(self._partitions)

    def _recount(self) -> int:
        """num_bytes recomputed from scratch (checks the incremental accounting in tests)."""
        return (sum(e.num_bytes for e in self._entries.values())
                + sum(p.index.num_bytes for p in self._partitions.values())
                + PARTITION_OVERHEAD_BYTES * len(self._partitions))

    @property
    def num_partitions(self) -> int:
        return len(self._partitions)

    def entries(self) -> Iterator[Entry]:
        """Entries from oldest to newest (the order a snapshot keeps)."""
        return (self._entries[i] for i in self._by_age)

    def has_key(self, key: CacheKey) -> bool:
        """Whether any entry (live or not yet expired lazily) has this key."""
        return key.digest in self._partitions

    def get_exact(self, key: CacheKey, norm: str) -> Optional[Entry]:
        """The live entry with this key and normalised text, if any."""
        part = self._partitions.get(key.digest)
        entry_id = part.exact.get(norm) if part else None
        return self._live(entry_id) if entry_id is not None else None

    def search(self, key: CacheKey, vector: np.ndarray, k: int, min_similarity: float) -> list[tuple[Entry, float]]:
        """Up to k live entries with this key and similarity >= min_similarity, best first."""
        part = self._partitions.get(key.digest)
        if part is None:
            return []
        out = []
        for entry_id, sim in part.index.search(vector, k):
            if sim < min_similarity:
                break
            entry = self._live(entry_id)
            if entry is not None:
                out.append((entry, sim))
        return out

    def vector(self, entry: Entry) -> np.ndarray:
        """The entry's unit-norm embedding, [dim] float32 (read back from its index)."""
        return self._partitions[entry.key.digest].index.get(entry.entry_id)

    def touch(self, entry: Entry) -> None:
        """Record a hit (for eviction)."""
        entry.num_hits += 1
        self._policy.touch(entry.entry_id)

    def _live(self, entry_id: int) -> Optional[Entry]:
        entry = self._entries.get(entry_id)
        if entry is not None and self._expired(entry, self.clock()):
            self._remove(entry_id)
            self.num_expirations += 1
            return None
        return entry

    def _expired(self, entry: Entry, now: float) -> bool:
        return self.ttl_s is not None and now - entry.created_at > self.ttl_s

    # ---- writing -------------------------------------------------------------------------------
    def insert(self, key: CacheKey, query: str, norm: str, vector: np.ndarray, answer: CachedAnswer,
               created_at: Optional[float] = None, words: Optional[dict] = None, analysis: Optional[object] = None,
               analysis_bytes: int = 0) -> Optional[Entry]:
        """Store an answer (replacing one with the same key and normalised text), with the query's
        word vectors and verifier analysis (of `analysis_bytes`) if given. Returns the entry, or
        None if it alone is larger than the capacity."""
        self.expire()
        entry = self._register(key, query, norm, answer, created_at, words, analysis, analysis_bytes)
        if entry is not None:
            self._index_add(self._partitions[key.digest], [entry.entry_id], np.asarray(vector, np.float32)[None])
            self._evict(keep=entry.entry_id)
        return entry

    def insert_many(self, rows: Iterable[tuple]) -> int:
        """Bulk `insert` of (key, query, norm, vector, answer, created_at) rows, oldest first (a
        snapshot reload): each partition's vectors go into its index in one call. Returns how many
        rows were stored (before eviction)."""
        self.expire()
        rows = list({(r[0].digest, r[2]): r for r in rows}.values())  # the last of exact repeats wins
        pending: dict[str, list[tuple[int, np.ndarray]]] = {}
        for key, query, norm, vector, answer, created_at in rows:
            entry = self._register(key, query, norm, answer, created_at)
            if entry is not None:
                pending.setdefault(key.digest, []).append((entry.entry_id, vector))
        for digest, items in pending.items():
            ids = [i for i, _ in items]
            self._index_add(self._partitions[digest], ids, np.stack([v for _, v in items]).astype(np.float32))
        self._evict(keep=-1)
        return sum(len(v) for v in pending.values())

    def _register(self, key: CacheKey, query: str, norm: str, answer: CachedAnswer,
                  created_at: Optional[float], words: Optional[dict] = None, analysis: Optional[object] = None,
                  analysis_bytes: int = 0) -> Optional[Entry]:
        """Create the entry and its partition (everything but the index)."""
        part = self._partitions.get(key.digest)
        # NOTE: entries share their partition's key object (one copy per partition, not per entry).
        entry = Entry(next(self._ids), part.key if part else key, query, norm, answer,
                      self.clock() if created_at is None else created_at, words=words, analysis=analysis)
        entry.num_bytes = (ENTRY_OVERHEAD_BYTES + analysis_bytes + len(query.encode()) + len(norm.encode())
                           + len(answer.text.encode()) + len(answer.finish_reason)
                           + sum(WORD_OVERHEAD_BYTES + len(w) + v.nbytes for w, v in (words or {}).items()))
        if entry.num_bytes + 4 * self.dim + PARTITION_OVERHEAD_BYTES > self.capacity_bytes:
            return None
        if part is not None and norm in part.exact:
            self._remove(part.exact[norm])
            part = self._partitions.get(key.digest)
        if part is None:
            part = self._partitions[key.digest] = Partition(key, create_index(self.dim, "flat"))
        self._entries[entry.entry_id] = entry
        self._by_age[entry.entry_id] = None
        self._policy.add(entry.entry_id)
        part.exact[norm] = entry.entry_id
        self._entry_bytes += entry.num_bytes
        return entry

    def _index_add(self, part: Partition, ids: list[int], vectors: np.ndarray) -> None:
        before = part.index.num_bytes
        if isinstance(part.index, FlatIndex) and len(part.index) + len(ids) >= self.hnsw_min_size:
            promoted = create_index(self.dim, "hnsw")
            old = list(part.index.items())
            if old:
                promoted.add_many([i for i, _ in old], np.stack([v for _, v in old]))
            part.index = promoted
        part.index.add_many(ids, vectors)
        self._index_bytes += part.index.num_bytes - before

    def _evict(self, keep: int) -> None:
        while self.num_bytes > self.capacity_bytes and len(self._entries) > 1:
            self._remove(self._policy.victim(exclude=keep))
            self.num_evictions += 1

    def _remove(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        self._by_age.pop(entry_id, None)
        self._policy.remove(entry_id)
        self._entry_bytes -= entry.num_bytes
        part = self._partitions[entry.key.digest]
        if part.exact.get(entry.norm) == entry_id:
            del part.exact[entry.norm]
        before = part.index.num_bytes
        part.index.remove(entry_id)
        if isinstance(part.index, HNSWIndex) and len(part.index) < self.hnsw_min_size // 4:
            # A graph that shrank a lot goes back to exact search, which frees its arenas.
            flat = create_index(self.dim, "flat")
            for old_id, old_vector in part.index.items():
                flat.add(old_id, old_vector)
            part.index = flat
        self._index_bytes += part.index.num_bytes - before
        if len(part.index) == 0 and not part.exact:
            self._index_bytes -= part.index.num_bytes
            del self._partitions[entry.key.digest]

    def expire(self) -> int:
        """Drop every entry older than the TTL; returns how many."""
        if self.ttl_s is None:
            return 0
        now, removed = self.clock(), 0
        while self._by_age:
            oldest = next(iter(self._by_age))
            if not self._expired(self._entries[oldest], now):
                break
            self._remove(oldest)
            removed += 1
        self.num_expirations += removed
        return removed

    def flush(self, model: Optional[str] = None, tenant: Optional[str] = None) -> int:
        """Remove every entry (no filter), or those of one model and/or one tenant. Returns how many."""
        doomed = [e.entry_id for e in self._entries.values()
                  if (model is None or e.key.model == model) and (tenant is None or e.key.tenant == tenant)]
        for entry_id in doomed:
            self._remove(entry_id)
        return len(doomed)
