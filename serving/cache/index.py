"""Vector indexes over unit-norm embeddings, one per cache partition (cache key).

Inner product equals cosine similarity because every vector is normalised before it gets here.
Two implementations, chosen per partition by size (`create_index`):

- `FlatIndex`: exact search with numpy over a contiguous matrix. Most partitions are small (a chat
  context holds a handful of entries), and for a few thousand rows a matrix product beats any graph.
- `HNSWIndex`: usearch's HNSW graph for a large partition; it supports removal, which eviction and
  TTL need. A `FlatIndex` is promoted to it when it grows past `hnsw_min_size`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class VectorIndex(Protocol):
    """Ids are the store's entry ids (non-negative ints)."""

    def add(self, entry_id: int, vector: np.ndarray) -> None: ...
    def add_many(self, ids: list[int], vectors: np.ndarray) -> None: ...
    def remove(self, entry_id: int) -> None: ...
    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]: ...
    def get(self, entry_id: int) -> np.ndarray: ...
    def __len__(self) -> int: ...
    @property
    def num_bytes(self) -> int: ...


class FlatIndex:
    """Exact inner-product search; rows grow by doubling and removal swaps in the last row."""

    def __init__(self, dim: int):
        self.dim = dim
        self._vectors = np.empty((0, dim), dtype=np.float32)  # [capacity, dim]
        self._ids: list[int] = []
        self._row: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def num_bytes(self) -> int:
        # NOTE: the allocated capacity counts, not only the used rows; plus ids and the row map.
        return self._vectors.nbytes + 96 * len(self._ids)

    def add(self, entry_id: int, vector: np.ndarray) -> None:
        assert entry_id not in self._row, entry_id
        n = len(self._ids)
        if n == self._vectors.shape[0]:
            grown = np.empty((max(1, 2 * n), self.dim), dtype=np.float32)
            grown[:n] = self._vectors[:n]
            self._vectors = grown
        self._vectors[n] = vector
        self._ids.append(entry_id)
        self._row[entry_id] = n

    def add_many(self, ids: list[int], vectors: np.ndarray) -> None:
        for entry_id, vector in zip(ids, vectors):
            self.add(entry_id, vector)

    def remove(self, entry_id: int) -> None:
        row = self._row.pop(entry_id)
        last = len(self._ids) - 1
        if row != last:
            moved = self._ids[last]
            self._vectors[row] = self._vectors[last]
            self._ids[row] = moved
            self._row[moved] = row
        self._ids.pop()
        if 4 * len(self._ids) < self._vectors.shape[0] and self._vectors.shape[0] > 8:
            self._vectors = self._vectors[: 2 * len(self._ids)].copy()

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        n = len(self._ids)
        if n == 0:
            return []
        sims = self._vectors[:n] @ vector  # [n]
        if n > k:
            top = np.argpartition(-sims, k - 1)[:k]
            top = top[np.argsort(-sims[top])]
        else:
            top = np.argsort(-sims)
        return [(self._ids[i], float(sims[i])) for i in top]

    def get(self, entry_id: int) -> np.ndarray:
        return self._vectors[self._row[entry_id]].copy()

    def items(self):
        """(id, vector) pairs, for moving to another index."""
        for i, entry_id in enumerate(self._ids):
            yield entry_id, self._vectors[i]


class HNSWIndex:
    """usearch HNSW over float32 vectors with the inner-product metric."""

    # NOTE: bench/cache_bench.py measures these settings (recall@1 and p50 at 100k entries).
    def __init__(self, dim: int, connectivity: int = 16, expansion_add: int = 64, expansion_search: int = 64):
        from usearch.index import Index

        self.dim = dim
        self._connectivity = connectivity
        self._index = Index(ndim=dim, metric="ip", dtype="f32", connectivity=connectivity,
                            expansion_add=expansion_add, expansion_search=expansion_search)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def num_bytes(self) -> int:
        # NOTE: fitted to usearch's own `memory_usage` (dim 384, M=16: 16.8 MB at 3k nodes, 151.5 MB at
        # 50k): about 8 MiB of arenas plus the vector and ~1.3 KB of links and bookkeeping per node.
        # usearch reuses a removed node's slot for the next add, so live nodes are what counts.
        per_node = 4 * self.dim + 84 * self._connectivity
        return 8 * 2**20 + per_node * self._count

    def add(self, entry_id: int, vector: np.ndarray) -> None:
        self._index.add(entry_id, vector, threads=1)
        self._count += 1

    def add_many(self, ids: list[int], vectors: np.ndarray) -> None:
        """One call for many vectors: usearch builds the graph with all cores."""
        if len(ids) == 1:
            self.add(ids[0], vectors[0])
        else:
            self._index.add(np.asarray(ids, dtype=np.uint64), vectors)
            self._count += len(ids)

    def remove(self, entry_id: int) -> None:
        self._count -= self._index.remove(entry_id)

    def get(self, entry_id: int) -> np.ndarray:
        return np.asarray(self._index.get(entry_id), dtype=np.float32)

    def items(self):
        """(id, vector) pairs, for moving back to a flat index."""
        for entry_id in self._index.keys:
            yield int(entry_id), self.get(int(entry_id))

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        if self._count == 0:
            return []
        matches = self._index.search(vector, min(k, self._count), threads=1)
        # usearch "ip" distance is 1 - inner product.
        return [(int(key), 1.0 - float(dist)) for key, dist in zip(matches.keys, matches.distances)]


def create_index(dim: int, kind: str = "flat") -> VectorIndex:
    """A new index: "flat" (exact numpy) or "hnsw" (usearch)."""
    if kind == "flat":
        return FlatIndex(dim)
    if kind == "hnsw":
        return HNSWIndex(dim)
    raise ValueError(f"unknown index kind {kind!r}")
