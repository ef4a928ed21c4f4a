"""The LLM autoscaling policy (deployments/autoscaling.py): the pure core on hand-made signals, then
both policies through Serve's own wrapper and context on one synthetic load-step trace.

No Ray cluster: `AutoscalingContext` and `_apply_autoscaling_config` (what Serve's controller wraps
every policy in: scaling factors, its delays, the cold-start path) are plain Python.
"""

from __future__ import annotations

import math
import types

import pytest

from deployments.autoscaling import (KV_USAGE, NUM_PREFILL_TOKENS, NUM_RUNNING, NUM_WAITING, TTFT_S,
                                     LLMAutoscalingPolicy, PolicyParams, ReplicaLoad, Signals,
                                     autoscaling_options, decide, demand)
from serving.config import AutoscalingConfig

CONFIG = AutoscalingConfig(min_replicas=1, max_replicas=8)
P = PolicyParams.from_dict(CONFIG.model_dump())


def run(ticks, target=1, lo=1, hi=8, state=None, params=P):
    """Feeds (time, Signals) pairs to decide(); returns the targets after each tick."""
    state, out = state or {}, []
    for now, s in ticks:
        target, state = decide(s, state, params, now, target, lo, hi)
        out.append(target)
    return out


def steady(n, **kw):
    return Signals(num_replicas=n, **kw)


# ---- the pure core ----------------------------------------------------------------------------------


def test_demand_takes_the_largest_signal():
    assert demand(steady(1, num_running=10), P) == 1
    assert demand(steady(1, num_running=32, num_waiting=12), P) == 3  # 12 waiting / 4 per replica
    assert demand(steady(2, num_prefill_tokens=3 * 4096 + 1), P) == 4
    assert demand(steady(4, kv_usage=0.9), P) == 5  # 4 x 0.9 / 0.8
    assert demand(steady(1), P) == 0


def test_a_growing_queue_scales_up_at_once_without_waiting_for_the_delay():
    ticks = [(0.0, steady(4, num_running=128, num_waiting=10)), (0.1, steady(4, num_running=128, num_waiting=20))]
    assert run(ticks, target=4) == [4, 5]  # 20 waiting / 4 per replica, no upscale_delay_s


def test_slow_ttft_adds_one_over_the_running_replicas_and_no_more_while_it_starts():
    slow = steady(2, num_running=20, ttft_s=5.0)
    targets = run([(t * 0.1, slow) for t in range(50)], target=2)
    assert set(targets) == {3}  # a starting replica is not counted twice


def test_steady_demand_waits_for_the_upscale_delay():
    # 70 sequences on 2 replicas, none waiting: over 2 x target_num_seqs (32), no panic signal.
    busy = steady(2, num_running=70)
    targets = run([(t, busy) for t in (0.0, 2.0, 4.9, 5.0)], target=2)
    assert targets == [2, 2, 2, 3]


def test_twice_the_demand_is_a_panic():
    assert run([(0.0, steady(2, num_running=130))], target=2) == [5]


def test_scale_down_is_slow_one_at_a_time_and_held_off_by_a_panic():
    # A panic at t=0, then light load (8 sequences, fits one replica): nothing goes down inside
    # the panic window, then one replica per downscale_delay_s.
    ticks = [(0.0, steady(4, num_running=128, num_waiting=30))]
    ticks += [(float(t), steady(4, num_running=8)) for t in range(1, 500)]
    targets = run(ticks, target=4)
    assert targets[0] == 8 and max(targets) == 8  # 30 waiting / 4 per replica
    changes = [(t, b) for (t, _), a, b in zip(ticks[1:], targets, targets[1:]) if a != b]
    assert [b for _, b in changes] == [7, 6, 5, 4, 3, 2, 1]
    first_down = changes[0][0]
    assert first_down >= P.panic_window_s + P.downscale_delay_s - 1
    assert all(b - a >= P.downscale_delay_s for (a, _), (b, _) in zip(changes, changes[1:]))


def test_hysteresis_keeps_a_replica_the_load_would_only_just_fit_without():
    # 2 replicas, 30 sequences: one replica carries 32 at target, but not at 70% of it.
    near = steady(2, num_running=30)
    assert run([(float(t), near) for t in range(0, 600, 10)], target=2)[-1] == 2
    light = steady(2, num_running=20)  # 20 <= 0.7 x 32
    assert run([(float(t), light) for t in range(0, 600, 10)], target=2)[-1] == 1


def test_scale_to_zero_only_when_idle_and_allowed():
    idle = steady(1)
    assert run([(float(t), idle) for t in range(0, 1000, 10)], lo=1)[-1] == 1
    targets = run([(float(t), idle) for t in range(0, 1000, 10)], lo=0)
    assert targets[-1] == 0 and targets.index(0) * 10 >= P.scale_to_zero_delay_s
    one_request = steady(1, num_running=1)
    assert run([(float(t), one_request) for t in range(0, 1000, 10)], lo=0)[-1] == 1


def test_bounds_hold():
    flood = steady(2, num_running=500, num_waiting=500, ttft_s=30.0)
    assert run([(0.0, flood)], target=2, hi=4) == [4]


def test_decide_does_not_change_its_input_state():
    state = {"waiting": [(0.0, 1.0)], "panic_until": 0.0, "up_since": None, "down_since": None}
    frozen = repr(state)
    decide(steady(1, num_waiting=50), state, P, 1.0, 1, 1, 8)
    assert repr(state) == frozen


def test_replica_load_reports_queued_prefill_and_the_oldest_wait(monkeypatch):
    clock = types.SimpleNamespace(t=100.0)
    monkeypatch.setattr("deployments.autoscaling.time.monotonic", lambda: clock.t)
    load = ReplicaLoad()
    load.arrived("a", 300)
    load.arrived("b", 200)
    clock.t = 101.0
    load.first_token("a")  # TTFT 1.0 s
    clock.t = 104.0
    r = load.report(num_waiting=1, num_running=2, num_kv_blocks_used=30, num_kv_blocks=120)
    assert r[NUM_PREFILL_TOKENS] == 200 and r[KV_USAGE] == 0.25
    assert r[TTFT_S] == 4.0  # b has waited 4 s: more than a's finished TTFT
    load.ended("b")
    assert load.report(0, 1, 0, 120)[TTFT_S] == 1.0
    clock.t = 120.0  # a's first token has left the window
    assert load.report(0, 0, 0, 120)[TTFT_S] == 0.0


# ---- through Serve's wrapper and context, on a load-step trace -------------------------------------------


class Sim:
    """A deployment under a load step: requests arrive at `rate(t)`, each takes `service_s` once one
    of a replica's `slots` frees, with `prompt_tokens`; a replica serves `cold_start_s` after
    Serve asked for it. One tick = one control-loop call."""

    def __init__(self, rate, slots=32, service_s=4.0, prompt_tokens=500, cold_start_s=20.0):
        self.rate, self.slots, self.service_s = rate, slots, service_s
        self.prompt_tokens, self.cold_start_s = prompt_tokens, cold_start_s
        self.waiting: list[float] = []  # arrival times
        self.running: list[float] = []  # end times
        self.first_tokens: list[tuple[float, float]] = []  # (time, ttft)
        self.ready_at: list[float] = [0.0]  # one replica, serving from the start
        self.carry = 0.0

    def num_serving(self, now):
        return sum(1 for t in self.ready_at if t <= now)

    def step(self, now, dt, target):
        while len(self.ready_at) < target:
            self.ready_at.append(now + self.cold_start_s)
        del self.ready_at[max(target, 1 if target else 0):]
        self.carry += self.rate(now) * dt
        self.waiting += [now] * int(self.carry)
        self.carry -= int(self.carry)
        self.running = [end for end in self.running if end > now]
        free = self.slots * self.num_serving(now) - len(self.running)
        for arrival in self.waiting[:max(0, free)]:
            self.first_tokens.append((now, now - arrival))
            self.running.append(now + self.service_s)
        self.waiting = self.waiting[max(0, free):]

    def context(self, now, target, policy_state, config):
        from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue
        from ray.serve.config import AutoscalingContext

        dep = DeploymentID(name="LLMServer:m", app_name="llm")
        n = self.num_serving(now)
        replicas = [ReplicaID(unique_id=str(i), deployment_id=dep) for i in range(n)]
        recent = sorted(t for at, t in self.first_tokens if now - at <= 10.0)
        ttft = max(recent[int(0.9 * (len(recent) - 1))] if recent else 0.0,
                   now - self.waiting[0] if self.waiting else 0.0)
        per = {NUM_WAITING: len(self.waiting) / max(n, 1), NUM_RUNNING: len(self.running) / max(n, 1),
               NUM_PREFILL_TOKENS: len(self.waiting) * self.prompt_tokens / max(n, 1),
               KV_USAGE: len(self.running) / max(n, 1) / self.slots, TTFT_S: ttft}
        raw = {k: {r: [TimeStampedValue(now, v)] for r in replicas} for k, v in per.items()}
        return AutoscalingContext(
            deployment_id=dep, deployment_name=dep.name, app_name="llm", current_num_replicas=n,
            target_num_replicas=target, running_replicas=replicas,
            total_num_requests=float(len(self.waiting) + len(self.running)), total_queued_requests=0.0,
            aggregated_metrics=None, raw_metrics=raw, capacity_adjusted_min_replicas=config.min_replicas,
            capacity_adjusted_max_replicas=config.max_replicas, policy_state=policy_state,
            last_scale_up_time=None, last_scale_down_time=None, current_time=now, config=config)


def load_step(t):  # 4 req/s (half a replica), 24 req/s for two minutes (three replicas), then none
    return 4.0 if t < 60 else 24.0 if t < 180 else 0.0


def simulate(policy_name, monkeypatch, duration_s=900.0, dt=0.5):
    import ray.serve.autoscaling_policy as serve_policy
    from ray.serve.autoscaling_policy import _apply_autoscaling_config, replica_queue_length_autoscaling_policy
    from ray.serve.config import AutoscalingConfig as ServeAutoscalingConfig

    ours = AutoscalingConfig(min_replicas=1, max_replicas=6, policy=policy_name, target_ongoing_requests=32)
    opts = autoscaling_options(ours)
    config = ServeAutoscalingConfig(**opts)
    clock = types.SimpleNamespace(now=0.0)
    # Serve's wrapper times its delays with time.time(): run them on the simulated clock.
    monkeypatch.setattr(serve_policy, "time", types.SimpleNamespace(time=lambda: clock.now))
    raw = (LLMAutoscalingPolicy(**opts["policy"]["policy_kwargs"]) if policy_name == "llm"
           else replica_queue_length_autoscaling_policy)
    policy = _apply_autoscaling_config(raw)
    sim, target, state, history = Sim(load_step), 1, {}, []
    for i in range(int(duration_s / dt)):
        clock.now = now = i * dt
        sim.step(now, dt, target)
        decision, state = policy(sim.context(now, target, state, config))
        target = max(config.min_replicas, min(config.max_replicas, math.ceil(decision)))
        history.append((now, target, sim.num_serving(now)))
    ttfts = sorted(t for _, t in sim.first_tokens)
    return history, ttfts, sim


def _summary(history, ttfts):
    targets = [t for _, t, _ in history]
    turns = sum(1 for a, b, c in zip(targets, targets[1:], targets[2:]) if (b - a) * (c - b) < 0)
    flat = [b - a for a, b in zip(targets, targets[1:]) if b != a]
    reversals = sum(1 for a, b in zip(flat, flat[1:]) if a * b < 0)
    first_up = next(now for now, t, _ in history if t > 1)
    enough = next((now for now, _, serving in history if serving >= 3), None)
    return {"first_up_s": first_up - 60.0, "three_serving_s": enough and enough - 60.0,
            "max": max(targets), "final": targets[-1], "reversals": reversals + turns,
            "ttft_p99_s": ttfts[int(0.99 * (len(ttfts) - 1))]}


def test_load_step_llm_policy_vs_serve_default_on_the_same_trace(monkeypatch, capsys):
    ours = _summary(*simulate("llm", monkeypatch)[:2])
    default = _summary(*simulate("ongoing_requests", monkeypatch)[:2])
    with capsys.disabled():
        print(f"\nload step 4 -> 24 req/s at t=60 s, off at 180 s: llm {ours}\n  serve default {default}")
    # Ours reacts within a few seconds of the step (the queue grows: panic, no upscale delay) and
    # has replicas serving one cold start later.
    assert ours["first_up_s"] <= 3.0
    assert ours["three_serving_s"] <= 20.0 + 5.0
    assert 3 <= ours["max"] <= 6
    assert ours["reversals"] <= 1  # up, then down: no flapping
    assert ours["final"] == 1  # all the way back after the load stops
    assert ours["first_up_s"] < default["first_up_s"]
    assert ours["ttft_p99_s"] < default["ttft_p99_s"]


def test_serve_config_gets_the_policy_and_zero_serve_delays():
    from ray.serve.config import AutoscalingConfig as ServeAutoscalingConfig

    config = ServeAutoscalingConfig(**autoscaling_options(CONFIG))
    assert config.policy.policy_function == "deployments.autoscaling:LLMAutoscalingPolicy"
    assert config.upscale_delay_s == config.downscale_delay_s == 0.0
    policy = config.policy.get_policy()(**config.policy.policy_kwargs)  # what the controller does
    assert policy.params == P
    default = ServeAutoscalingConfig(**autoscaling_options(AutoscalingConfig(policy="ongoing_requests")))
    assert default.policy.is_default_policy_function() and default.upscale_delay_s == CONFIG.upscale_delay_s


def test_config_rejects_min_over_max():
    with pytest.raises(ValueError, match="min_replicas"):
        AutoscalingConfig(min_replicas=3, max_replicas=2)
