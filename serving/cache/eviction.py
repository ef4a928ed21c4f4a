"""Which entry leaves first when the cache is full: LRU or LFU (with recency as the tie-break).

Both are O(1) or amortised O(log n) per operation and hold only entry ids.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from typing import Protocol


class EvictionPolicy(Protocol):
    def add(self, entry_id: int) -> None: ...
    def touch(self, entry_id: int) -> None: ...
    def remove(self, entry_id: int) -> None: ...
    def victim(self, exclude: int = -1) -> int: ...


class LRUPolicy:
    """Least recently used (inserted or hit) first."""

    def __init__(self):
        self._order: OrderedDict[int, None] = OrderedDict()

    def add(self, entry_id: int) -> None:
        self._order[entry_id] = None

    def touch(self, entry_id: int) -> None:
        self._order.move_to_end(entry_id)

    def remove(self, entry_id: int) -> None:
        self._order.pop(entry_id, None)

    def victim(self, exclude: int = -1) -> int:
        """The entry to evict next, never `exclude` (the one being inserted)."""
        it = iter(self._order)
        first = next(it)
        return next(it) if first == exclude else first


class LFUPolicy:
    """Least frequently used first; among equals the least recently used. A lazy heap: stale
    (count, tick) pairs are skipped when they surface."""

    def __init__(self):
        self._counts: dict[int, tuple[int, int]] = {}
        self._heap: list[tuple[int, int, int]] = []  # (count, tick, id)
        self._tick = itertools.count()

    def _push(self, entry_id: int, count: int) -> None:
        tick = next(self._tick)
        self._counts[entry_id] = (count, tick)
        heapq.heappush(self._heap, (count, tick, entry_id))
        if len(self._heap) > 4 * len(self._counts) + 64:
            self._heap = [(c, t, i) for i, (c, t) in self._counts.items()]
            heapq.heapify(self._heap)

    def add(self, entry_id: int) -> None:
        self._push(entry_id, 1)

    def touch(self, entry_id: int) -> None:
        self._push(entry_id, self._counts[entry_id][0] + 1)

    def remove(self, entry_id: int) -> None:
        self._counts.pop(entry_id, None)

    def victim(self, exclude: int = -1) -> int:
        """The entry to evict next, never `exclude` (the one being inserted: a new entry must get
        the chance to be hit before it can lose to old frequent ones)."""
        held = None
        try:
            while True:
                count, tick, entry_id = self._heap[0]
                if self._counts.get(entry_id) != (count, tick):
                    heapq.heappop(self._heap)
                elif entry_id == exclude:
                    held = heapq.heappop(self._heap)
                else:
                    return entry_id
        finally:
            if held is not None:
                heapq.heappush(self._heap, held)


def create_policy(name: str) -> EvictionPolicy:
    """"lru" or "lfu"."""
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    raise ValueError(f"unknown eviction policy {name!r}")
