"""Speculative decoding with tensor_parallel_size 2 (every rank verifies, and runs the early-exit
passes, in lockstep): greedy output equals speculation off for each proposer, in the mixed concurrent
batch of tests/unit/test_spec_engine.py with preemption forced; the draft runs in its Ray actor."""

from __future__ import annotations

import pytest
import ray


@ray.remote(num_cpus=0.5)
class SpecHost:
    """Plays the engine's process (rank 0), as EngineHost in test_tensor_parallel.py."""

    def __init__(self, method: str, num_kv_blocks: int):
        from parallel.build import build_engine
        from serving.config import LLMConfig, ModelConfig, ParallelConfig, SchedulerConfig, SpeculativeConfig
        from serving.models import EMBEDDED_TARGET

        config = LLMConfig(model=ModelConfig(path=str(EMBEDDED_TARGET), dtype="float32"),
                           parallel=ParallelConfig(tensor_parallel_size=2),
                           scheduler=SchedulerConfig(block_size=4, num_kv_blocks=num_kv_blocks, max_num_seqs=8,
                                                     max_num_batched_tokens=64),
                           speculative=SpeculativeConfig(method=method, adaptive=False))
        self.engine = build_engine(config, device="cpu")

    def run(self):
        from tests.unit.test_spec_engine import mixed_requests, run

        tokens, reasons, stats = run(self.engine, mixed_requests(self.engine))
        return tokens, reasons, sum(s.num_preempted for s in stats), sum(s.num_spec_accepted for s in stats)

    def shutdown(self) -> None:
        self.engine.shutdown()


@pytest.fixture(scope="module")
def reference():
    from tests.unit.test_spec_engine import greedy_reference

    return greedy_reference()


@pytest.mark.parametrize("method", ["ngram", "early_exit", "draft", "auto"])
def test_tp2_speculation_greedy_equals_speculation_off_under_preemption(ray_cluster, reference, method):
    host = SpecHost.remote(method, 48)
    try:
        tokens, reasons, preempted, accepted = ray.get(host.run.remote(), timeout=300)
        ray.get(host.shutdown.remote(), timeout=60)
    finally:
        ray.kill(host)
    assert preempted > 0 and accepted > 0
    for rid, want in reference[0].items():
        if rid != "sampled":
            assert tokens[rid] == want, rid
            assert reasons[rid] == reference[1][rid], rid
