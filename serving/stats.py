"""What the engine reports about itself: per step and per finished request.

Plain data, no Ray: `deployments/telemetry.py` turns these into Ray metrics (names in
`serving/metrics.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class StepStats:
    """One engine step."""

    num_running: int = 0  # sequences holding KV blocks after the step
    num_waiting: int = 0  # sequences waiting for admission (including preempted)
    num_prefill_tokens: int = 0  # prompt tokens computed this step
    num_decode_tokens: int = 0  # decode positions computed this step
    num_seqs: int = 0  # sequences in this step's batch
    num_preempted: int = 0  # sequences preempted during this step's scheduling
    num_prefix_queried_tokens: int = 0  # tokens of the sequences admitted this step that may share blocks
    num_prefix_hit_tokens: int = 0  # of them, found computed in the prefix cache
    num_kv_blocks_used: int = 0
    num_kv_blocks_free: int = 0
    num_spec_proposed: int = 0  # speculative tokens proposed this step
    num_spec_accepted: int = 0  # of them, accepted
    # per proposer: [proposed, accepted, verified rows] (a row: one sequence's proposals in one step)
    spec_by_proposer: dict[str, list[int]] = field(default_factory=dict)
    step_time_s: float = 0.0  # wall time of the whole step
    forward_time_s: float = 0.0  # wall time inside the executor (model forward + sampling + transport)
    model_time_s: float = 0.0  # of it, rank 0's model forward + sampling (no transport)
    propose_time_s: float = 0.0  # wall time of the speculative proposers' rounds (in step_time_s)


@dataclass
class RequestStats:
    """One finished (or aborted) request; times are `time.monotonic()` seconds."""

    request_id: str
    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    finish_reason: Optional[str] = None
    token_times: list[float] = field(default_factory=list)  # time of every output token

    @property
    def queue_time_s(self) -> Optional[float]:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def ttft_s(self) -> Optional[float]:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def e2e_s(self) -> Optional[float]:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time

    @property
    def inter_token_latencies_s(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]
