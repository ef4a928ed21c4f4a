"""Greedy output of the engine with DeepSpeed AutoTP over 1, 2 and 4 ranks (gloo) equals plain
Hugging Face `generate` per request, token for token in float32, with a mixed concurrent batch,
chunked prefill and forced preemption; and a killed rank actor fails `check_health`.

Each engine lives in a fresh `EngineHost` actor that plays the Serve replica, rank 0: a process
can be a rank of one tensor-parallel group only (parallel/worker.py).
"""

from __future__ import annotations

import itertools
import time

import pytest
import ray
import torch

from serving.config import LLMConfig, ModelConfig, ParallelConfig, SchedulerConfig
from serving.sampling import SamplingParams

PROMPT_LENS = (3, 9, 17, 30, 41, 64)
MAX_NEW = 16


@ray.remote(num_cpus=0.5, concurrency_groups={"health": 1})
class EngineHost:
    def __init__(self, model_path: str, tp: int, num_kv_blocks: int):
        from parallel.build import build_engine

        config = LLMConfig(model=ModelConfig(path=model_path), parallel=ParallelConfig(tensor_parallel_size=tp),
                           scheduler=SchedulerConfig(block_size=4, max_num_seqs=8, max_num_batched_tokens=32,
                                                     num_kv_blocks=num_kv_blocks))
        self.engine = build_engine(config, device="cpu")

    def rank_actors(self) -> list:
        return self.engine.executor.workers

    def generate(self) -> tuple[dict, int]:
        """Requests arriving at different steps; returns {request id: (prompt, tokens)} and the
        number of preemptions."""
        engine, info = self.engine, self.engine.info
        outs, preempted, step = {}, 0, 0
        pending = [(f"r{i}", [(7 * i + 3 * j) % (info.vocab_size - 10) + 5 for j in range(n)])
                   for i, n in enumerate(PROMPT_LENS)]
        prompts = dict(pending)
        while pending or engine.has_unfinished():
            if pending and step % 2 == 0:
                rid, ids = pending.pop(0)
                engine.add_request(rid, ids, SamplingParams(max_tokens=MAX_NEW, temperature=0.0,
                                                            stop_token_ids=info.eos_token_ids))
                outs[rid] = []
            outputs, stats = engine.step()
            preempted += stats.num_preempted
            for o in outputs:
                outs[o.request_id] += o.token_ids
            step += 1
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
        return {rid: (prompts[rid], toks) for rid, toks in outs.items()}, preempted

    def step_forever(self) -> None:
        """Steps until a step fails: one request at a time, no stop tokens, the next when one ends."""
        for i in itertools.count():
            if not self.engine.has_unfinished():
                self.engine.add_request(f"loop{i}", [5, 6, 7], SamplingParams(max_tokens=500, temperature=0.0))
            self.engine.step()

    @ray.method(concurrency_group="health")
    def check_health(self) -> None:
        self.engine.executor.check_health()

    def shutdown(self) -> None:
        self.engine.executor.shutdown()


def run_engine(model_path: str, tp: int, num_kv_blocks: int) -> tuple[dict, int]:
    host = EngineHost.remote(model_path, tp, num_kv_blocks)
    try:
        out = ray.get(host.generate.remote())
        ray.get(host.check_health.remote())
        ray.get(host.shutdown.remote())
    finally:
        ray.kill(host)
    return out


def assert_equals_hf_generate(model_path, results: dict) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    for rid, (prompt, tokens) in results.items():
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=MAX_NEW, do_sample=False)[0, len(prompt):].tolist()
        assert tokens == ref, rid


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_greedy_equals_hf_generate_under_preemption(ray_cluster, tiny_model, tp):
    results, preempted = run_engine(tiny_model, tp, num_kv_blocks=30)
    assert preempted > 0, "the small block budget should have forced preemption"
    assert_equals_hf_generate(tiny_model, results)


def test_embedded_target_tp2_equals_single_process(ray_cluster):
    """Issue 3: the shipped target, split over two ranks, gives the single-process greedy tokens."""
    from serving.models import EMBEDDED_TARGET

    results, _ = run_engine(str(EMBEDDED_TARGET), 2, num_kv_blocks=64)
    assert_equals_hf_generate(EMBEDDED_TARGET, results)


def test_killed_rank_fails_check_health_mid_generation(ray_cluster, tiny_model):
    """A rank actor killed while steps run: rank 0's step thread may spin forever in the all-reduce,
    but `check_health` (another thread of rank 0, pinging the actors) raises within seconds."""
    host = EngineHost.remote(tiny_model, 2, 200)
    try:
        (rank1,) = ray.get(host.rank_actors.remote())
        ray.get(host.check_health.remote())
        steps = host.step_forever.remote()
        time.sleep(1.0)  # steps are running
        if ray.wait([steps], timeout=0)[0]:
            ray.get(steps)  # NOTE: it never returns; this raises why the steps stopped
        ray.kill(rank1)
        killed = time.monotonic()
        with pytest.raises(ray.exceptions.RayTaskError):  # raised in the host, not a timeout here
            while time.monotonic() - killed < 10:  # Ray may need a moment to see the actor gone
                ray.get(host.check_health.remote(), timeout=10)
                time.sleep(0.2)
        elapsed = time.monotonic() - killed
        stuck = not ray.wait([steps], timeout=0)[0]
        print(f"check_health raised {elapsed:.2f} s after the kill; rank 0's step {'still blocked' if stuck else 'failed'}")
        assert elapsed < 5
    finally:
        ray.kill(host)
