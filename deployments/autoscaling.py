"""The LLM-aware autoscaling policy: Serve's custom policy API over the signals LLM replicas report.

Serve's default policy scales on ongoing requests per replica, which misleads for LLM traffic (one
request may be 10 tokens or 4,000). Each `LLMServer` replica reports, from
`record_autoscaling_stats()`, its waiting and running sequences, the prompt tokens still queued
for prefill, its KV-cache use and a recent TTFT (names below). Every control-loop tick (~0.1 s)
the controller calls `LLMAutoscalingPolicy(ctx)`:

1. demand: for each signal, the replicas needed to keep it at its per-replica target; the largest wins.
2. panic: the waiting queue grew over the last `panic_window_s`, the TTFT is over target, or the
   demand is twice the running replicas: scale up at once (at least one more than are running), and scale down nothing until the panic ends.
3. otherwise scale up after `upscale_delay_s` of steady demand, and down one replica at a time,
   only when the load would fit the smaller count at `downscale_threshold` of each target
   (hysteresis) for `downscale_delay_s`; to zero only after `scale_to_zero_delay_s` without work.

`decide` is the pure core: (signals, state, params, now) -> (replicas, new state); the class only
reads the context. This module imports only the standard library, so Serve can pickle the policy
by value into its controller.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass, fields
from typing import Any, Optional

# The replica's record_autoscaling_stats() keys (deployments/llm_server.py).
NUM_WAITING = "llm_num_waiting"  # sequences not yet admitted, plus requests not yet handed to the engine
NUM_RUNNING = "llm_num_running"  # sequences holding KV blocks
NUM_PREFILL_TOKENS = "llm_num_prefill_tokens_queued"  # prompt tokens of requests without a first token
KV_USAGE = "llm_kv_cache_usage"  # used / total KV blocks, 0..1
TTFT_S = "llm_ttft_s"  # recent p90 TTFT, or the oldest request's wait for its first token if longer
METRICS = (NUM_WAITING, NUM_RUNNING, NUM_PREFILL_TOKENS, KV_USAGE, TTFT_S)
TTFT_WINDOW_S = 10.0  # first tokens older than this no longer count towards the reported TTFT


@dataclass(frozen=True)
class PolicyParams:
    """Targets per replica and delays; the defaults and their meaning are in
    serving.config.AutoscalingConfig, which `LLMServer.deployment_options` passes as policy_kwargs."""

    target_num_seqs: float
    target_num_waiting: float
    target_prefill_tokens: float
    target_kv_usage: float
    target_ttft_s: float
    panic_window_s: float
    upscale_delay_s: float
    downscale_delay_s: float
    scale_to_zero_delay_s: float
    downscale_threshold: float

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PolicyParams":
        """Every field from `values` (extra keys ignored: the config has more)."""
        return cls(**{f.name: float(values[f.name]) for f in fields(cls)})

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass(frozen=True)
class Signals:
    """The deployment's load now: sums over running replicas (KV use and TTFT: mean and max)."""

    num_replicas: int  # running replicas
    num_waiting: float = 0.0
    num_running: float = 0.0
    num_prefill_tokens: float = 0.0
    kv_usage: float = 0.0  # mean over replicas
    ttft_s: float = 0.0  # max over replicas
    num_queued_at_handles: float = 0.0  # requests Serve could not hand to any replica yet

    @property
    def num_seqs(self) -> float:
        return self.num_running + self.num_waiting + self.num_queued_at_handles

    @property
    def is_idle(self) -> bool:
        return self.num_seqs == 0 and self.num_prefill_tokens == 0


def demand(s: Signals, p: PolicyParams, share: float = 1.0) -> int:
    """Replicas that keep every signal at `share` of its per-replica target."""
    waiting = s.num_waiting + s.num_queued_at_handles
    need = max(s.num_seqs / (p.target_num_seqs * share),
               waiting / (p.target_num_waiting * share) if waiting else 0.0,
               s.num_prefill_tokens / (p.target_prefill_tokens * share),
               s.kv_usage * s.num_replicas / (p.target_kv_usage * share))
    return math.ceil(need - 1e-9)


def decide(s: Signals, state: dict[str, Any], p: PolicyParams, now: float, target: int,
           lo: int, hi: int) -> tuple[int, dict[str, Any]]:
    """One tick. `target` is the replica count Serve is working towards (running or starting);
    `lo`/`hi` the bounds. Returns the new target and the new state (the input is not changed).

    State: `waiting` [(time, waiting sequences)] over the panic window, `panic_until`, and the
    times a wish to go up (`up_since`) or down (`down_since`) began."""
    history = [(t, w) for t, w in state.get("waiting", []) if now - t <= p.panic_window_s]
    waiting = s.num_waiting + s.num_queued_at_handles
    history.append((now, waiting))
    new = {"waiting": history, "panic_until": state.get("panic_until", 0.0),
           "up_since": state.get("up_since"), "down_since": state.get("down_since")}

    need = demand(s, p)
    queue_grew = waiting > p.target_num_waiting * max(1, s.num_replicas) and waiting > history[0][1]
    slow = s.ttft_s > p.target_ttft_s and s.num_seqs > 0
    doubled = s.num_replicas > 0 and need >= 2 * s.num_replicas  # Knative's panic threshold: 200%
    if queue_grew or slow or doubled:
        new["panic_until"] = now + p.panic_window_s
        # NOTE: +1 over the *running* replicas: while a new one starts, a slow TTFT alone does not
        # add more; a growing queue does, through `need`.
        need = max(need, s.num_replicas + 1)
        new["up_since"] = new["down_since"] = None
        return _bound(max(target, need), lo, hi), new

    if need > target:
        new["down_since"] = None
        new["up_since"] = new["up_since"] if new["up_since"] is not None else now
        if now - new["up_since"] >= p.upscale_delay_s:
            new["up_since"] = None
            return _bound(need, lo, hi), new
        return _bound(target, lo, hi), new
    new["up_since"] = None

    in_panic = now < new["panic_until"]
    fits_fewer = demand(s, p, p.downscale_threshold) < target
    to_zero = target == 1 and s.is_idle
    if in_panic or target <= lo or not (fits_fewer and (target > 1 or to_zero)):
        new["down_since"] = None
        return _bound(target, lo, hi), new
    new["down_since"] = new["down_since"] if new["down_since"] is not None else now
    delay = p.scale_to_zero_delay_s if target == 1 else p.downscale_delay_s
    if now - new["down_since"] >= delay:
        new["down_since"] = None
        return _bound(target - 1, lo, hi), new  # one at a time: slow down, fast up
    return _bound(target, lo, hi), new


def _bound(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, n))


def signals_from_context(ctx) -> Signals:
    """The newest value each running replica reported (raw series: the aggregated ones are means
    over Serve's look-back window and lag a load step)."""
    raw = ctx.raw_metrics or {}

    def latest(name: str) -> list[float]:
        series = raw.get(name, {})
        return [s[-1].value for rid, s in series.items() if s and rid in set(ctx.running_replicas)]

    kv, ttft = latest(KV_USAGE), latest(TTFT_S)
    return Signals(num_replicas=ctx.current_num_replicas,
                   num_waiting=sum(latest(NUM_WAITING)), num_running=sum(latest(NUM_RUNNING)),
                   num_prefill_tokens=sum(latest(NUM_PREFILL_TOKENS)),
                   kv_usage=sum(kv) / len(kv) if kv else 0.0, ttft_s=max(ttft, default=0.0),
                   num_queued_at_handles=float(ctx.total_queued_requests or 0.0))


def autoscaling_options(config) -> dict[str, Any]:
    """Serve's `autoscaling_config` for a serving.config.AutoscalingConfig. With the LLM policy,
    Serve's own delays are 0: the policy keeps its own (panic, hysteresis), and Serve's wrapper
    would otherwise delay every decision again."""
    opts: dict[str, Any] = {"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                            "initial_replicas": max(1, config.min_replicas),
                            "target_ongoing_requests": config.target_ongoing_requests,
                            "metrics_interval_s": config.metrics_interval_s,
                            "look_back_period_s": 5 * config.metrics_interval_s}
    if config.policy == "llm":
        opts.update(upscale_delay_s=0.0, downscale_delay_s=0.0, downscale_to_zero_delay_s=0.0,
                    policy={"policy_function": f"{__name__}:LLMAutoscalingPolicy",
                            "policy_kwargs": {n: getattr(config, n) for n in PolicyParams.names()}})
    else:
        opts.update(upscale_delay_s=config.upscale_delay_s, downscale_delay_s=config.downscale_delay_s,
                    downscale_to_zero_delay_s=config.scale_to_zero_delay_s)
    return opts


class LLMAutoscalingPolicy:
    """Serve's class-callable policy: instantiated once with `policy_kwargs` (PolicyParams fields),
    then called with an `AutoscalingContext` every tick."""

    def __init__(self, **params: Any):
        self.params = PolicyParams.from_dict(params)

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        now: Optional[float] = ctx.current_time
        s = signals_from_context(ctx)
        return decide(s, ctx.policy_state or {}, self.params, now, ctx.target_num_replicas,
                      ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas)


class ReplicaLoad:
    """The replica's side: tracks requests until their first token and reports the signals above.

    Event-loop only (the replica's generate() and record_autoscaling_stats() share it)."""

    def __init__(self):
        self._awaiting: dict[str, tuple[float, int]] = {}  # request id -> (arrival, prompt tokens)
        self._first_tokens: collections.deque = collections.deque(maxlen=1024)  # (time, ttft_s)

    def arrived(self, request_id: str, num_prompt_tokens: int) -> None:
        self._awaiting[request_id] = (time.monotonic(), num_prompt_tokens)

    def first_token(self, request_id: str) -> None:
        arrival, _ = self._awaiting.pop(request_id, (None, 0))
        if arrival is not None:
            now = time.monotonic()
            self._first_tokens.append((now, now - arrival))

    def ended(self, request_id: str) -> None:
        self._awaiting.pop(request_id, None)  # failed or aborted before its first token

    def report(self, num_waiting: int, num_running: int, num_kv_blocks_used: int,
               num_kv_blocks: int) -> dict[str, float]:
        now = time.monotonic()
        recent = sorted(t for at, t in self._first_tokens if now - at <= TTFT_WINDOW_S)
        p90 = recent[min(len(recent) - 1, int(0.9 * len(recent)))] if recent else 0.0
        oldest = max((now - arrival for arrival, _ in self._awaiting.values()), default=0.0)
        return {NUM_WAITING: float(num_waiting), NUM_RUNNING: float(num_running),
                NUM_PREFILL_TOKENS: float(sum(n for _, n in self._awaiting.values())),
                KV_USAGE: num_kv_blocks_used / num_kv_blocks if num_kv_blocks else 0.0,
                TTFT_S: max(p90, oldest)}
