"""The semantic cache as Ray Serve deployments: one deployment per partition of the key space.

The router sends each request's key to partition `partition_of(key, config.num_replicas)`; each
partition is one single-replica deployment holding its share of the cache in memory. So there is
one cache for the whole app: every router replica sees the same entries, and they outlive router
restarts. Build the partitions with `cache_partitions(config)` and pass the handles to the router.

Heavy imports (torch, sentence-transformers, usearch) happen in the constructor, so importing this
module is cheap.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Optional

from ray import serve

from serving.cache.key import CacheKey
from serving.cache.types import CacheHit, CachedAnswer
from serving.config import CacheConfig
from serving.heap import replica_env_vars, start_heap_trimmer

logger = logging.getLogger("ray.serve")


@serve.deployment(num_replicas=1, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0.25},
                  health_check_period_s=10.0)
class SemanticCache:
    """One partition of the app's semantic cache. Must run as exactly one replica: its entries
    live in this process (and in its snapshot file)."""

    def __init__(self, config: CacheConfig, partition: int = 0):
        from deployments.telemetry import CacheTelemetry
        from serving.cache.embedder import BatchingEmbedder, default_model_path, load_encoder
        from serving.cache.semantic import SemanticCacheCore
        from serving.cache.store import CacheStore
        from serving.cache.wordnet import wordnet

        if not 0 <= partition < config.num_replicas:
            raise ValueError(f"partition {partition} not in [0, {config.num_replicas})")
        self.config = config
        self.partition = partition
        start_heap_trimmer()  # serving/heap.py: the soak's memory bar
        model_path = config.embedding_model or default_model_path()
        encode, dim = load_encoder(model_path, num_threads=config.embedding_threads,
                                   max_batch_size=config.embedding_batch_size)
        self._model_id = f"{os.path.basename(os.path.normpath(model_path))}:{dim}"
        store = CacheStore(dim, config.capacity_bytes, config.ttl_s, config.eviction)
        embedder = BatchingEmbedder(encode, max_batch_size=config.embedding_batch_size)
        wordnet()  # the verifier's synonyms (about 0.3 s), loaded now rather than on the first lookup
        self.core = SemanticCacheCore(store, embedder, config.similarity_threshold, config.max_candidates)
        self.telemetry = CacheTelemetry()
        self._num_health_checks = 0
        self._snapshot_task: Optional[asyncio.Task] = None
        if config.snapshot_path:
            from serving.cache import snapshot

            num = snapshot.load(store, config.snapshot_path, partition, config.num_replicas, self._model_id)
            logger.info("cache partition %d: %d entries loaded from %s", partition, num, config.snapshot_path)

    async def lookup(self, key: CacheKey, query: str, budget_s: Optional[float] = None) -> Optional[CacheHit]:
        """The cached answer for `query` under `key`, or None (a miss; also when the lookup would
        take more than `budget_s`: the router has stopped waiting by then)."""
        self._ensure_snapshot_task()
        start = time.perf_counter()
        hit = await self.core.lookup(key, query, budget_s)
        self.telemetry.observe_lookup(time.perf_counter() - start)
        self.telemetry.record_stats(self.core.stats)  # at most once a second
        return hit

    async def insert(self, key: CacheKey, query: str, answer: CachedAnswer) -> None:
        """Store a finished answer (call off the response path)."""
        self._ensure_snapshot_task()
        await self.core.insert(key, query, answer)
        self.telemetry.record_stats(self.core.stats)

    async def flush(self, model: Optional[str] = None, tenant: Optional[str] = None) -> int:
        """Remove all entries, or one model's and/or one tenant's; returns how many were removed."""
        return self.core.flush(model=model, tenant=tenant)

    async def stats(self) -> dict:
        """Metrics as plain numbers (names in docs/cache.md), plus this replica's partition index."""
        return {**self.core.stats(), "cache_partition": self.partition}

    async def snapshot(self) -> int:
        """Write this partition's snapshot now (no-op without `snapshot_path`); returns entries written."""
        if not self.config.snapshot_path:
            return 0
        from serving.cache import snapshot

        file = snapshot.snapshot_file(self.config.snapshot_path, self.partition, self.config.num_replicas)
        entries, vectors = snapshot.collect(self.core.store)  # on the loop: the store is not thread-safe
        return await asyncio.to_thread(snapshot.save, entries, vectors, file, self._model_id, self.core.store.dim)

    async def check_health(self) -> None:
        """Serve's health probe: the embedding thread must still answer (a fresh text each time, so
        the embedder's memo cannot answer for it)."""
        self._num_health_checks += 1
        await asyncio.wait_for(self.core.embedder.embed(f"health check {self._num_health_checks}"), timeout=30.0)

    def _ensure_snapshot_task(self) -> None:
        if self.config.snapshot_path and (self._snapshot_task is None or self._snapshot_task.done()):
            self._snapshot_task = asyncio.get_running_loop().create_task(self._snapshot_loop())

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.snapshot_interval_s)
            try:
                await self.snapshot()
            except OSError as exc:
                logger.warning("cache partition %d: snapshot failed: %s", self.partition, exc)

    def __del__(self):
        # Serve calls __del__ on graceful shutdown: leave a fresh snapshot behind.
        if getattr(self, "config", None) is not None and self.config.snapshot_path:
            from serving.cache import snapshot

            file = snapshot.snapshot_file(self.config.snapshot_path, self.partition, self.config.num_replicas)
            try:
                snapshot.save(*snapshot.collect(self.core.store), file, self._model_id, self.core.store.dim)
            except Exception as exc:  # noqa: BLE001 - shutdown must go on
                logger.warning("cache partition %d: final snapshot failed: %s", self.partition, exc)


def cache_partitions(config: CacheConfig, logging_config: Optional[dict] = None) -> list:
    """One bound `SemanticCache` application per partition, named SemanticCache0..N-1; pass them
    to the router, which calls `partition_of(key, len(handles))` for each request."""
    options = {**SemanticCache.ray_actor_options, "runtime_env": {"env_vars": replica_env_vars()}}  # serving/heap.py
    return [SemanticCache.options(name=f"SemanticCache{p}", logging_config=logging_config,
                                  ray_actor_options=options).bind(config, p)
            for p in range(config.num_replicas)]
