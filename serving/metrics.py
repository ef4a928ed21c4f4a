"""Every metric the framework records, defined once, as data.

No Ray here: `deployments/telemetry.py` turns these specs into `ray.serve.metrics` objects inside
replicas, and `dashboards/definitions.py` builds PromQL from them. A test ties both to this list.

Names follow Prometheus conventions (base units, `_seconds`), without Ray's additions: Ray exports a
metric `NAME` as `ray_NAME`, a counter as `ray_NAME_total`, and a histogram as
`ray_NAME_bucket/_sum/_count`; Serve adds the `application`, `deployment` and `replica` labels
(reserved: a spec may not use them). `MetricSpec.exported` gives the names Prometheus stores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Optional

EXPORT_PREFIX = "ray_"  # Ray's Prometheus namespace for custom metrics
SERVE_LABELS = ("application", "deployment", "replica")  # added by Ray Serve to every replica metric

# Seconds from 0.5 ms to 10 min: GPU latencies (milliseconds) fall in the low buckets, CPU
# latencies (seconds) in the high ones, so one set serves both.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                     1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_TOKEN_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class MetricKind(str, Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class MetricSpec:
    """One metric: what a replica records and what a dashboard queries.

    `internal` marks a metric that no dashboard needs to show (the dashboards test allows it).
    """

    name: str
    kind: MetricKind
    description: str
    labels: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()
    internal: bool = False

    def __post_init__(self):
        assert re.fullmatch(r"[a-z][a-z0-9_]*", self.name), self.name
        # NOTE: Ray appends _total to counters and _bucket/_sum/_count to histograms itself.
        assert not self.name.endswith(("_total", "_bucket", "_sum", "_count")), self.name
        assert not set(self.labels) & set(SERVE_LABELS), f"{self.name}: Serve's labels are reserved"
        assert (self.kind is MetricKind.HISTOGRAM) == bool(self.boundaries), self.name
        assert list(self.boundaries) == sorted(set(self.boundaries)), self.name

    @property
    def exported(self) -> str:
        """The name Prometheus stores (for a histogram, the stem of its three series)."""
        suffix = "_total" if self.kind is MetricKind.COUNTER else ""
        return f"{EXPORT_PREFIX}{self.name}{suffix}"

    @property
    def series_names(self) -> tuple[str, ...]:
        """Every series name Prometheus stores for this metric."""
        if self.kind is MetricKind.HISTOGRAM:
            return tuple(self.series(part) for part in ("bucket", "sum", "count"))
        return (self.exported,)

    def series(self, part: str) -> str:
        """One series of a histogram: `part` is "bucket", "sum" or "count"."""
        assert self.kind is MetricKind.HISTOGRAM and part in ("bucket", "sum", "count"), (self.name, part)
        return f"{self.exported}_{part}"


C, G, H = MetricKind.COUNTER, MetricKind.GAUGE, MetricKind.HISTOGRAM
_MODEL = ("model",)

# Requests through the engine (recorded by the LLM server from serving.stats.RequestStats).
TTFT = MetricSpec("llm_time_to_first_token_seconds", H, "Time from arrival to the first output token.",
                  _MODEL, LATENCY_BUCKETS_S)
ITL = MetricSpec("llm_inter_token_latency_seconds", H, "Time between consecutive output tokens of a request.",
                 _MODEL, LATENCY_BUCKETS_S)
E2E = MetricSpec("llm_e2e_request_latency_seconds", H, "Time from arrival to the last token of a request.",
                 _MODEL, LATENCY_BUCKETS_S)
QUEUE_TIME = MetricSpec("llm_queue_time_seconds", H, "Time from arrival to first scheduling.",
                        _MODEL, LATENCY_BUCKETS_S)
PROMPT_TOKENS = MetricSpec("llm_prompt_tokens", C, "Prompt tokens of finished requests.", _MODEL)
GENERATION_TOKENS = MetricSpec("llm_generation_tokens", C, "Output tokens of finished requests.", _MODEL)
REQUESTS_FINISHED = MetricSpec("llm_requests_finished", C, "Finished requests by finish reason.",
                               ("model", "finish_reason"))

# Engine steps (recorded by the LLM server from serving.stats.StepStats).
NUM_RUNNING = MetricSpec("llm_num_running_seqs", G, "Sequences holding KV blocks.", _MODEL)
NUM_WAITING = MetricSpec("llm_num_waiting_seqs", G, "Sequences waiting for admission, preempted ones included.",
                         _MODEL)
KV_BLOCKS_USED = MetricSpec("llm_kv_blocks_used", G, "KV cache blocks in use.", _MODEL)
KV_BLOCKS_FREE = MetricSpec("llm_kv_blocks_free", G, "KV cache blocks free.", _MODEL)
PREEMPTIONS = MetricSpec("llm_preemptions", C, "Sequences preempted to free KV blocks.", _MODEL)
PREFIX_QUERIED = MetricSpec("llm_prefix_cache_queried_tokens", C,
                            "Tokens of admitted sequences that looked in the prefix cache.", _MODEL)
PREFIX_HITS = MetricSpec("llm_prefix_cache_hit_tokens", C,
                         "Of them, tokens found computed (their KV blocks shared, not computed again).", _MODEL)
BATCH_SIZE = MetricSpec("llm_batch_size", H, "Sequences in one engine step's batch.", _MODEL, BATCH_SIZE_BUCKETS)
BATCH_TOKENS = MetricSpec("llm_batch_num_tokens", H, "Tokens (prefill plus decode) computed in one engine step.",
                          _MODEL, BATCH_TOKEN_BUCKETS)
STEP_TIME = MetricSpec("llm_step_time_seconds", H, "Wall time of one engine step.", _MODEL, LATENCY_BUCKETS_S)
FORWARD_TIME = MetricSpec("llm_forward_time_seconds", H,
                          "Wall time of one step inside the worker group (forward, sampling, transport).",
                          _MODEL, LATENCY_BUCKETS_S)
MODEL_TIME = MetricSpec("llm_model_time_seconds", H,
                        "Rank 0's model forward and sampling in one step (no transport).", _MODEL, LATENCY_BUCKETS_S)
_PROPOSER = ("model", "proposer")  # ngram, draft or early_exit
SPEC_PROPOSED = MetricSpec("llm_spec_proposed_tokens", C, "Speculative tokens proposed.", _PROPOSER)
SPEC_ACCEPTED = MetricSpec("llm_spec_accepted_tokens", C, "Speculative tokens accepted by the target model.",
                           _PROPOSER)
# One sequence's proposals verified in one step: (accepted + verified) / verified is the mean number
# of tokens a verifying step emits per sequence.
SPEC_VERIFIED = MetricSpec("llm_spec_verified_rows", C, "Sequences whose proposals a step verified.", _PROPOSER)
WORKER_GROUP_RESTARTS = MetricSpec("llm_worker_group_restarts", C, "Worker groups restarted after a failure.",
                                   _MODEL)

# Cost: the configured hourly price of one replica's hardware, and the cost per million tokens
# it implies at the replica's recent throughput (`tokens` is "generation" or "all").
PRICE_PER_HOUR = MetricSpec("llm_price_per_hour", G, "Configured hourly price of one LLM replica's hardware.",
                            _MODEL)
COST_PER_MILLION_TOKENS = MetricSpec("llm_cost_per_million_tokens", G,
                                     "Estimated cost per million tokens at the replica's recent throughput.",
                                     ("model", "tokens"))

# Semantic cache (recorded by the cache deployment from its stats()).
CACHE_LOOKUPS = MetricSpec("llm_cache_lookups", C, "Semantic cache lookups.")
CACHE_HITS = MetricSpec("llm_cache_hits", C, "Semantic cache lookups that returned an answer.")
CACHE_MISSES = MetricSpec("llm_cache_misses", C, "Semantic cache lookups that found nothing usable.")
CACHE_INSERTS = MetricSpec("llm_cache_inserts", C, "Answers inserted into the semantic cache.")
CACHE_EVICTIONS = MetricSpec("llm_cache_evictions", C, "Entries removed from the semantic cache, by reason.",
                             ("reason",))  # "capacity" or "ttl"
CACHE_REJECTIONS = MetricSpec("llm_cache_rejections", C, "Cache candidates the verifier refused, by reason.",
                              ("reason",))  # serving/cache/verifier.py REJECTION_LABELS
CACHE_ENTRIES = MetricSpec("llm_cache_entries", G, "Entries held by the semantic cache replica.")
CACHE_BYTES = MetricSpec("llm_cache_bytes", G, "Bytes held by the semantic cache replica.")
CACHE_SKIPS = MetricSpec("llm_cache_skips", C, "Cache calls the router gave up (timeout, error) or skipped "
                         "(breaker open), and lookups the cache dropped past their deadline (late), by call and "
                         "reason.", ("call", "reason"))
CACHE_LOOKUP_LATENCY = MetricSpec("llm_cache_lookup_latency_seconds", H,
                                  "Time of one semantic cache lookup (embedding, search and check).",
                                  (), LATENCY_BUCKETS_S)

# HTTP edge (recorded by the router).
HTTP_REQUESTS = MetricSpec("llm_http_requests", C, "HTTP requests by route template and status code.",
                           ("endpoint", "status_code"))
ERRORS = MetricSpec("llm_errors", C, "Errors by type (OpenAI error type, or the exception class).", ("error_type",))

ALL: tuple[MetricSpec, ...] = tuple(v for v in dict(globals()).values() if isinstance(v, MetricSpec))
BY_NAME: dict[str, MetricSpec] = {m.name: m for m in ALL}
assert len(BY_NAME) == len(ALL), "metric names must be unique"
EXPORTED: dict[str, MetricSpec] = {series: m for m in ALL for series in m.series_names}


def spec_for_exported(series_name: str) -> Optional[MetricSpec]:
    """The spec behind a series name as Prometheus stores it (`ray_llm_x_total`, `..._bucket`), or None."""
    return EXPORTED.get(series_name)
