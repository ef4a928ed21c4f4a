"""Recording the framework's metrics (specs in `serving/metrics.py`) through Ray Serve's metrics API.

Three small recorders, one per kind of replica; create one in the replica's constructor and call it
from the code paths below. Each call is cheap (a few Ray metric records) and never raises for lack
of Ray: outside a Ray worker (unit tests of the engine) every call does nothing.

    engine = EngineTelemetry(model_id, price_per_hour=cfg.serve.price_per_hour)   # LLMServer.__init__
    engine.record_step(step_stats)        # after every engine step (serving.stats.StepStats)
    engine.record_request(request_stats)  # once per finished or aborted request (RequestStats)
    engine.record_restart()               # after the worker group was rebuilt

    router = RouterTelemetry()                        # Router.__init__
    router.record_http("/v1/chat/completions", 200)   # every response: route template, status code
    router.record_error(exc)                          # every error: a ServingError, any exception, or a str

    cache = CacheTelemetry()               # SemanticCache deployment __init__
    cache.observe_lookup(seconds)          # once per lookup
    cache.record_stats(self.core.stats)    # after lookups and inserts: at most once a second, it
                                           # turns cumulative counts into counter increments

Instruments are `ray.serve.metrics` objects, created lazily on first use in each process, so that
inside a replica Serve adds the `application`, `deployment` and `replica` labels (plain
`ray.util.metrics` objects do not get them; checked against a real export, Ray 2.60). Ray exports
them to Prometheus as `ray_<name>` (counters `ray_<name>_total`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Any, Callable, Mapping, Optional, Union

from serving import metrics as m
from serving.cache.verifier import REJECTION_LABELS
from serving.stats import RequestStats, StepStats

_instruments: dict[str, Any] = {}
MAX_ITL_SAMPLES = 8  # inter-token gaps observed per request
_lock = threading.Lock()


def _instrument(spec: m.MetricSpec):
    """The process's Ray metric object for `spec`, or None outside a Ray worker."""
    inst = _instruments.get(spec.name)
    if inst is not None:
        return inst
    import ray

    if not ray.is_initialized():
        return None
    from ray.serve import metrics as serve_metrics

    with _lock:
        inst = _instruments.get(spec.name)
        if inst is None:
            kwargs = dict(description=spec.description, tag_keys=spec.labels)
            if spec.kind is m.MetricKind.COUNTER:
                inst = serve_metrics.Counter(spec.name, **kwargs)
            elif spec.kind is m.MetricKind.GAUGE:
                inst = serve_metrics.Gauge(spec.name, **kwargs)
            else:
                inst = serve_metrics.Histogram(spec.name, boundaries=list(spec.boundaries), **kwargs)
            _instruments[spec.name] = inst
    return inst


def _inc(spec: m.MetricSpec, value: float, tags: Optional[dict[str, str]] = None) -> None:
    # NOTE: Ray's Counter.inc refuses values <= 0.
    if value > 0 and (inst := _instrument(spec)) is not None:
        inst.inc(value, tags=tags)


def _set(spec: m.MetricSpec, value: float, tags: Optional[dict[str, str]] = None) -> None:
    if (inst := _instrument(spec)) is not None:
        inst.set(value, tags=tags)


def _observe(spec: m.MetricSpec, value: Optional[float], tags: Optional[dict[str, str]] = None) -> None:
    if value is not None and value >= 0 and (inst := _instrument(spec)) is not None:
        inst.observe(value, tags=tags)


class _BatchedCounts:
    """Counter increments summed per (metric, labels) and recorded at most once per `period_s`,
    from the running event loop (at once outside one): exact totals, at most `period_s` late.

    NOTE: a Ray metric record costs ~20 us; one per request was 4% of the router's CPU."""

    def __init__(self, period_s: float = 1.0):
        self.period_s = period_s
        self._pending: dict[tuple, list] = {}  # (name, labels) -> [spec, tags, sum]
        self._scheduled = False

    def add(self, spec: m.MetricSpec, tags: dict[str, str], value: float = 1) -> None:
        key = (spec.name, *tags.values())
        entry = self._pending.get(key)
        if entry is None:
            self._pending[key] = [spec, tags, value]
        else:
            entry[2] += value
        if not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._scheduled = True
            loop.call_later(self.period_s, self.flush)

    def flush(self) -> None:
        pending, self._pending, self._scheduled = self._pending, {}, False
        for spec, tags, count in pending.values():
            _inc(spec, count, tags)


class EngineTelemetry:
    """Engine metrics of one LLM replica, labelled with the served model's name.

    With `price_per_hour` > 0 (the hourly price of the replica's hardware, all ranks together) it also
    exports that price and the cost per million tokens at the throughput of the last
    `cost_window_s` seconds, updated at every finished request (it keeps its last value when idle).
    """

    def __init__(self, model_id: str, price_per_hour: float = 0.0, cost_window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, sample_period_s: float = 0.05):
        assert price_per_hour >= 0 and cost_window_s > 0
        self.model_id = model_id
        self.price_per_hour = price_per_hour
        self.cost_window_s = cost_window_s
        self._tags = {"model": model_id}
        self._clock = clock
        self.sample_period_s = sample_period_s
        self._last_sampled = float("-inf")
        self._counts = _BatchedCounts()
        self._started = clock()
        self._recent: deque[tuple[float, int, int]] = deque()  # (finished time, prompt tokens, output tokens)
        if price_per_hour > 0:
            _set(m.PRICE_PER_HOUR, price_per_hour, self._tags)

    def record_step(self, stats: StepStats) -> None:
        """One engine step: queue and KV gauges, batch histograms, preemption and speculation counts.

        NOTE: each Ray metric record costs ~20 us of CPU, ten per step would be a large share of a
        fast step (an accelerator's, or the benchmark stand-in's). Gauges are set at most every
        `sample_period_s` and the step histograms observe at most one step per period; counters
        count every step (they cost nothing when zero)."""
        t = self._tags
        _inc(m.PREEMPTIONS, stats.num_preempted, t)
        if stats.num_prefix_queried_tokens:
            self._counts.add(m.PREFIX_QUERIED, t, stats.num_prefix_queried_tokens)
            self._counts.add(m.PREFIX_HITS, t, stats.num_prefix_hit_tokens)
        for proposer, (proposed, accepted, rows) in stats.spec_by_proposer.items():
            tags = {**t, "proposer": proposer}
            self._counts.add(m.SPEC_PROPOSED, tags, proposed)
            self._counts.add(m.SPEC_ACCEPTED, tags, accepted)
            self._counts.add(m.SPEC_VERIFIED, tags, rows)
        now = self._clock()
        going_idle = stats.num_running == 0 and stats.num_waiting == 0  # NOTE: never leave stale gauges
        if now - self._last_sampled < self.sample_period_s and not going_idle:
            return
        self._last_sampled = now
        _set(m.NUM_RUNNING, stats.num_running, t)
        _set(m.NUM_WAITING, stats.num_waiting, t)
        _set(m.KV_BLOCKS_USED, stats.num_kv_blocks_used, t)
        _set(m.KV_BLOCKS_FREE, stats.num_kv_blocks_free, t)
        if stats.num_seqs > 0:  # an idle step says nothing about batching
            _observe(m.BATCH_SIZE, stats.num_seqs, t)
            _observe(m.BATCH_TOKENS, stats.num_prefill_tokens + stats.num_decode_tokens, t)
            _observe(m.STEP_TIME, stats.step_time_s, t)
            _observe(m.FORWARD_TIME, stats.forward_time_s, t)
            _observe(m.MODEL_TIME, stats.model_time_s, t)

    def record_request(self, stats: RequestStats) -> None:
        """One finished (or aborted) request: latencies, token counts, finish reason, cost."""
        t = self._tags
        _observe(m.QUEUE_TIME, stats.queue_time_s, t)
        _observe(m.TTFT, stats.ttft_s, t)
        _observe(m.E2E, stats.e2e_s, t)
        itls = stats.inter_token_latencies_s
        # NOTE: one Ray histogram observation costs ~20 us of CPU; every gap of a long answer
        # would make the metrics cost as much as the serving path per token. At most
        # MAX_ITL_SAMPLES evenly spaced gaps per request are observed: the distribution within
        # each request is kept, the count is not (the generation-token counter has it).
        step = max(1, -(-len(itls) // MAX_ITL_SAMPLES))
        for itl in itls[::step]:
            _observe(m.ITL, itl, t)
        self._counts.add(m.PROMPT_TOKENS, t, stats.num_prompt_tokens)
        self._counts.add(m.GENERATION_TOKENS, t, stats.num_output_tokens)
        self._counts.add(m.REQUESTS_FINISHED, {**t, "finish_reason": stats.finish_reason or "unknown"})
        if self.price_per_hour > 0:
            self._update_cost(stats.num_prompt_tokens, stats.num_output_tokens)

    def record_restart(self) -> None:
        """The replica rebuilt its worker group after a failure."""
        _inc(m.WORKER_GROUP_RESTARTS, 1, self._tags)

    def cost_per_million_tokens(self) -> tuple[Optional[float], Optional[float]]:
        """(cost per million output tokens, per million prompt plus output tokens) over the window."""
        now = self._clock()
        while self._recent and self._recent[0][0] < now - self.cost_window_s:
            self._recent.popleft()
        elapsed = min(self.cost_window_s, now - self._started)
        output = sum(o for _, _, o in self._recent)
        total = output + sum(p for _, p, _ in self._recent)
        spent = self.price_per_hour * elapsed / 3600.0  # price of the hardware over the window
        return (spent / output * 1e6 if output else None), (spent / total * 1e6 if total else None)

    def _update_cost(self, num_prompt_tokens: int, num_output_tokens: int) -> None:
        self._recent.append((self._clock(), num_prompt_tokens, num_output_tokens))
        per_output, per_token = self.cost_per_million_tokens()
        for kind, value in (("generation", per_output), ("all", per_token)):
            if value is not None:
                _set(m.COST_PER_MILLION_TOKENS, value, {**self._tags, "tokens": kind})
        _set(m.PRICE_PER_HOUR, self.price_per_hour, self._tags)


class RouterTelemetry:
    """HTTP edge metrics of one router replica."""

    def __init__(self):
        self._counts = _BatchedCounts()

    def record_http(self, endpoint: str, status_code: int) -> None:
        """One response. `endpoint` is the route template (`/v1/completions`), never the raw URL,
        so that the label's values stay few."""
        self._counts.add(m.HTTP_REQUESTS, {"endpoint": endpoint, "status_code": str(int(status_code))})

    def record_error(self, error: Union[str, BaseException]) -> None:
        """One error: its OpenAI error type (`ServingError.error_type`), else the exception's class name."""
        if isinstance(error, BaseException):
            error = getattr(error, "error_type", None) or type(error).__name__
        self._counts.add(m.ERRORS, {"error_type": str(error)})

    def record_cache_skip(self, call: str, reason: str) -> None:
        """A cache `call` (lookup, insert) given up ("timeout", "error") or skipped ("open": its
        breaker; "backlog": too many calls still in flight)."""
        self._counts.add(m.CACHE_SKIPS, {"call": call, "reason": reason})


# Keys of the cache's stats() after normalising (lower case, without `cache_`/`num_` and `_total`):
# cumulative counts -> (counter, labels); current values -> gauge.
_CACHE_COUNTERS = {"lookups": (m.CACHE_LOOKUPS, None), "hits": (m.CACHE_HITS, None),
                   "misses": (m.CACHE_MISSES, None), "inserts": (m.CACHE_INSERTS, None),
                   "evictions": (m.CACHE_EVICTIONS, {"reason": "capacity"}),
                   "expirations": (m.CACHE_EVICTIONS, {"reason": "ttl"}),
                   # a lookup the replica dropped because the router's deadline had passed
                   "late_lookups": (m.CACHE_SKIPS, {"call": "lookup", "reason": "late"}),
                   **{f"rejected_{label}": (m.CACHE_REJECTIONS, {"reason": label}) for label in REJECTION_LABELS}}
_CACHE_GAUGES = {"entries": m.CACHE_ENTRIES, "bytes": m.CACHE_BYTES}


def _cache_key(key: str) -> str:
    key = key.lower()
    for prefix in ("cache_", "num_"):
        key = key.removeprefix(prefix)
    return key.removesuffix("_total")


class CacheTelemetry:
    """Semantic cache metrics of one cache replica.

    `record_stats` runs at most once per `min_interval_s` (later calls return at once), so it can
    sit on the lookup path with the stats function passed uncalled: `record_stats(core.stats)`.
    """

    def __init__(self, min_interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._last_time: Optional[float] = None
        self._last: dict[str, float] = {}

    def record_stats(self, stats: Union[Mapping[str, Any], Callable[[], Mapping[str, Any]]]) -> None:
        """Export a stats() snapshot (or call `stats` for one): cumulative `lookups`, `hits`,
        `misses`, `inserts`, `evictions` and `expirations` become counter increments since the
        previous snapshot (a count that went down is taken as a restart from zero); current
        `entries` and `bytes` set gauges. Keys may carry a `cache_` or `num_` prefix and a `_total`
        suffix (`cache_hits_total`); other keys are ignored."""
        now = self._clock()
        if self._last_time is not None and now - self._last_time < self.min_interval_s:
            return
        self._last_time = now
        if callable(stats):
            stats = stats()
        for raw_key, value in stats.items():
            key = _cache_key(raw_key)
            if key in _CACHE_COUNTERS:
                spec, labels = _CACHE_COUNTERS[key]
                value = float(value)
                last = self._last.get(key, 0.0)
                _inc(spec, value - last if value >= last else value, labels)
                self._last[key] = value
            elif key in _CACHE_GAUGES:
                _set(_CACHE_GAUGES[key], float(value))

    def observe_lookup(self, latency_s: float) -> None:
        """The duration of one lookup, embedding and verifier included."""
        _observe(m.CACHE_LOOKUP_LATENCY, latency_s)
