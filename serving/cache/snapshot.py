"""Snapshot a cache partition to disk and reload it, so a restart does not start cold.

One file per partition: `{snapshot_path}.{partition}-of-{num_partitions}.npz`, holding the unit-norm
vectors ([n, dim] float32, so reloading needs no embedding) and the entries as UTF-8 JSON. Written to
a temporary file and renamed, so a crash mid-write leaves the previous snapshot. A snapshot made with
a different embedding model is ignored; one made with a different number of partitions is re-split
by `partition_of`.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from typing import Iterator

import numpy as np

from serving.cache.key import CacheKey, partition_of
from serving.cache.store import CacheStore, Entry
from serving.cache.types import CachedAnswer

FORMAT_VERSION = 1


def snapshot_file(path: str, partition: int, num_partitions: int) -> str:
    return f"{path}.{partition}-of-{num_partitions}.npz"


def collect(store: CacheStore) -> tuple[list[Entry], np.ndarray]:
    """The store's entries (oldest first) and their vectors [n, dim]; call on the store's thread."""
    entries = list(store.entries())
    vectors = np.stack([store.vector(e) for e in entries]) if entries else np.zeros((0, store.dim), np.float32)
    return entries, vectors


def save(entries: list[Entry], vectors: np.ndarray, file: str, model_id: str, dim: int) -> int:
    """Write `entries` (oldest first) with their `vectors` to `file` atomically; returns how many."""
    meta = {"version": FORMAT_VERSION, "model_id": model_id, "dim": dim, "entries": [
        {"key": e.key.fields(), "query": e.query, "norm": e.norm, "answer": e.answer.model_dump(),
         "created_at": e.created_at} for e in entries]}
    blob = np.frombuffer(json.dumps(meta, ensure_ascii=False).encode("utf-8"), dtype=np.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    tmp = f"{file}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, vectors=vectors.astype(np.float32), meta=blob)
    os.replace(tmp, file)
    return len(entries)


def _read(file: str, model_id: str, dim: int) -> Iterator[tuple[dict, np.ndarray]]:
    with np.load(file, allow_pickle=False) as data:
        meta = json.loads(data["meta"].tobytes().decode("utf-8"))
        vectors = data["vectors"]
    if meta.get("version") != FORMAT_VERSION or meta.get("model_id") != model_id or meta.get("dim") != dim:
        return
    yield from zip(meta["entries"], vectors)


def load(store: CacheStore, path: str, partition: int, num_partitions: int, model_id: str) -> int:
    """Fill `store` from the snapshot files of `path` that hold entries of this partition; expired
    entries are skipped. Returns how many entries were loaded."""
    own = snapshot_file(path, partition, num_partitions)
    pattern = re.compile(re.escape(path) + r"\.(\d+)-of-(\d+)\.npz$")
    files = [f for f in glob.glob(glob.escape(path) + ".*-of-*.npz") if pattern.search(f)]
    same_layout = all(int(pattern.search(f).group(2)) == num_partitions for f in files)
    if same_layout:
        files = [own] if own in files else []
    rows: list[tuple[dict, np.ndarray]] = []
    for file in files:
        try:
            rows.extend(_read(file, model_id, store.dim))
        except (OSError, ValueError, KeyError) as exc:  # a corrupt file must not stop the replica
            logging.getLogger(__name__).warning("cache snapshot %s ignored: %s", file, exc)
    rows.sort(key=lambda r: r[0]["created_at"])
    keep = []
    for row, vector in rows:
        key = CacheKey.from_fields(row["key"])
        if not same_layout and partition_of(key, num_partitions) != partition:
            continue
        if store.ttl_s is not None and store.clock() - row["created_at"] > store.ttl_s:
            continue
        keep.append((key, row["query"], row["norm"], vector, CachedAnswer(**row["answer"]), row["created_at"]))
    return store.insert_many(keep)
