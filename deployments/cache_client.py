"""The router's side of the semantic cache: which requests may use it, and calls to its partitions
that never hold a request up.

Each key lives in partition `partition_of(key, n)` (deployments/cache.py). Every lookup has a
deadline that follows the partition's measured lookup latency (`CacheConfig.timeout_s` while it is
fast, at most `max_timeout_s`), every insert `insert_timeout_s`; a late or failed call is a miss
(the model answers) and a failure of its partition's circuit breaker (serving/breaker.py), which
after `breaker_failures` in a row skips that partition for `breaker_open_s`. So a dead or stalled
cache replica never stalls a request while Serve replaces it.

A late call is abandoned, not cancelled: cancelling a call over Serve's gRPC transport leaks
native memory on both ends (grpc/grpc#43360, ~340 bytes a call here: a soak's router grew 7% in
6 minutes). A lookup carries its deadline to the cache, which drops it rather than embed a query
nobody waits for, so an abandoned lookup ends soon after.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

from serving.breaker import AdaptiveTimeout, CircuitBreaker
from serving.cache.key import CacheKey, build_cache_key, cache_policy, cache_query_text, partition_of
from serving.cache.types import CacheHit, CachedAnswer
from serving.config import CacheConfig
from serving.protocol import AnyRequest, GenerationOutput

logger = logging.getLogger("ray.serve")


class CacheClient:
    def __init__(self, handles: list, config: CacheConfig, telemetry):
        self.handles = handles  # one DeploymentHandle per partition
        self.config = config
        self.telemetry = telemetry  # deployments.telemetry.RouterTelemetry
        self._breakers = [CircuitBreaker(config.breaker_failures, config.breaker_open_s) for _ in handles]
        self._deadlines = [AdaptiveTimeout(config.timeout_s, config.max_timeout_s) for _ in handles]
        self._background: set[asyncio.Task] = set()  # inserts, and calls abandoned at their deadline

    def lookup_args(self, request: AnyRequest, tenant: Optional[str]):
        """(key, query text, policy) when the cache may be read or written for `request`, else None.
        `tenant` partitions the cache (serving/auth.py `cache_tenant`; None: the request's `user`)."""
        if not self.handles or not self.config.enabled or request.uses_extensions:
            return None
        query = cache_query_text(request)
        if query is None:
            return None
        policy = cache_policy(request)
        if not (policy.read or policy.write):
            return None
        return build_cache_key(request, request.model, tenant), query, policy

    async def lookup(self, key: CacheKey, query: str) -> Optional[CacheHit]:
        return await self._call("lookup", key, query)

    def insert_later(self, lookup, text: str, last: GenerationOutput) -> None:
        """Stores a finished answer off the response path (`lookup`: from `lookup_args`)."""
        key, query = lookup[0], lookup[1]
        answer = CachedAnswer(text=text, finish_reason=last.finish_reason, num_prompt_tokens=last.num_prompt_tokens,
                              num_output_tokens=last.num_output_tokens)
        task = asyncio.get_running_loop().create_task(self._call("insert", key, query, answer))
        self._background.add(task)
        task.add_done_callback(_forget(self._background))

    async def flush(self, model: Optional[str], tenant: Optional[str]) -> int:
        counts = await asyncio.gather(*(h.flush.remote(model, tenant) for h in self.handles))
        return sum(counts)

    async def _call(self, call: str, key: CacheKey, *args):
        """`call` on the key's partition within the deadline and its breaker; None when it was
        skipped, failed or ran late."""
        partition = partition_of(key, len(self.handles))
        breaker = self._breakers[partition]
        if not breaker.allow():
            self.telemetry.record_cache_skip(call, "open")
            return None
        if len(self._background) >= MAX_BACKGROUND:
            self.telemetry.record_cache_skip(call, "backlog")
            return None
        deadline = self._deadlines[partition]
        timeout = deadline.seconds if call == "lookup" else self.config.insert_timeout_s
        if call == "lookup":
            args = (*args, timeout)  # the cache's budget: past it, the router has stopped waiting
        start = time.monotonic()
        try:
            result = await self._within(asyncio.ensure_future(getattr(self.handles[partition], call).remote(key, *args)),
                                        timeout)
        except Exception as e:  # noqa: BLE001 - any failure of the cache is a miss, never the request's error
            reason = "timeout" if isinstance(e, TimeoutError) else "error"
            opened = breaker.num_opened
            breaker.record_failure()
            self.telemetry.record_cache_skip(call, reason)
            if breaker.num_opened > opened:
                logger.warning("cache partition %d: %s %s (%s); serving without it for %.0f s", partition, call,
                               reason, type(e).__name__, breaker.open_s)
            return None
        breaker.record_success()
        if call == "lookup":
            deadline.observe(time.monotonic() - start)
        return result

    async def _within(self, call: asyncio.Future, timeout: float):
        """`call`'s result; TimeoutError after `timeout` s, leaving the call to end in the background
        (see the module's docstring: never cancelled), also when the awaiting request is cancelled."""
        try:
            done, _ = await asyncio.wait((call,), timeout=timeout)
        finally:
            if not call.done():
                self._background.add(call)
                call.add_done_callback(_forget(self._background))
        if not done:
            raise TimeoutError
        return call.result()


# NOTE: calls in flight in the background (inserts, abandoned calls) past which new ones are skipped:
# a hung partition that its breaker has not caught yet cannot pile up calls without bound
MAX_BACKGROUND = 4096


def _forget(tasks: set):
    def done(task: asyncio.Future) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # NOTE: retrieved, so asyncio does not log an abandoned call's failure
    return done
