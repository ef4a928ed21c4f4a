"""Greedy output of the engine over a Ray worker group with DeepSpeed AutoTP (1, 2 and 4 ranks,
gloo) equals plain Hugging Face `generate` per request, token for token in float32, with a mixed
concurrent batch, chunked prefill and forced preemption."""

from __future__ import annotations

import pytest
import torch

from serving.config import LLMConfig, ModelConfig, ParallelConfig, SchedulerConfig
from serving.sampling import SamplingParams

PROMPT_LENS = (3, 9, 17, 30, 41, 64)
MAX_NEW = 16


def run_engine(model_path: str, tp: int, num_kv_blocks: int, compiled: "bool | None" = None) -> tuple[dict, int]:
    from parallel.worker_group import WorkerGroup
    from serving.engine import LLMEngine
    from serving.model_loader import load_model_info, load_tokenizer

    config = LLMConfig(model=ModelConfig(path=model_path), parallel=ParallelConfig(tensor_parallel_size=tp, use_compiled_graph=compiled),
                       scheduler=SchedulerConfig(block_size=4, max_num_seqs=8, max_num_batched_tokens=32,
                                                 num_kv_blocks=num_kv_blocks))
    info = load_model_info(config.model)
    group = WorkerGroup(config, info.path, num_kv_blocks, "cpu")
    try:
        engine = LLMEngine(config, info, load_tokenizer(info.path), group, num_kv_blocks)
        vocab = info.vocab_size
        outs, preempted, step = {}, 0, 0
        pending = [(f"r{i}", [(7 * i + 3 * j) % (vocab - 10) + 5 for j in range(n)])
                   for i, n in enumerate(PROMPT_LENS)]
        prompts = dict(pending)
        while pending or engine.has_unfinished():
            if pending and step % 2 == 0:  # requests arrive at different steps
                rid, ids = pending.pop(0)
                engine.add_request(rid, ids, SamplingParams(max_tokens=MAX_NEW, temperature=0.0,
                                                            stop_token_ids=info.eos_token_ids))
                outs[rid] = []
            outputs, stats = engine.step()
            preempted += stats.num_preempted
            for o in outputs:
                outs[o.request_id] += o.token_ids
            step += 1
        assert engine.blocks.num_free_blocks == num_kv_blocks
        group.check_health()
    finally:
        group.shutdown()
    return {rid: (prompts[rid], toks) for rid, toks in outs.items()}, preempted


@pytest.mark.parametrize("tp,compiled", [(1, False), (2, False), (4, False), (2, True)])
def test_tp_greedy_equals_hf_generate_under_preemption(ray_cluster, tiny_model, tp, compiled):
    """compiled: ranks driven by a Ray compiled graph (the default on CUDA) or by plain actor calls
    (the default on CPU)."""
    from transformers import AutoModelForCausalLM

    results, preempted = run_engine(tiny_model, tp, num_kv_blocks=30, compiled=compiled)
    assert preempted > 0, "the small block budget should have forced preemption"
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    for rid, (prompt, tokens) in results.items():
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=MAX_NEW, do_sample=False)[0, len(prompt):].tolist()
        assert tokens == ref, rid


def test_embedded_target_tp2_equals_single_process(ray_cluster):
    """Issue 3: the shipped target, split over two ranks, gives the single-process greedy tokens."""
    from transformers import AutoModelForCausalLM

    from serving.models import EMBEDDED_TARGET

    results, _ = run_engine(str(EMBEDDED_TARGET), 2, num_kv_blocks=64)
    hf = AutoModelForCausalLM.from_pretrained(EMBEDDED_TARGET, dtype=torch.float32).eval()
    for rid, (prompt, tokens) in results.items():
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=MAX_NEW, do_sample=False)[0, len(prompt):].tolist()
        assert tokens == ref, rid
