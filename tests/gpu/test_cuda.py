"""CUDA checks (skipped without a GPU): the engine-owned block KV cache on the device gives the same
greedy tokens as Hugging Face `generate` on the same device, float32."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_local_engine_on_cuda_equals_hf_generate():
    from transformers import AutoModelForCausalLM

    from serving.config import LLMConfig, ModelConfig, SchedulerConfig
    from serving.engine import LLMEngine, num_kv_blocks_for
    from serving.executor import LocalExecutor
    from serving.model_loader import load_model_info, load_tokenizer
    from serving.models import default_model_path
    from serving.sampling import SamplingParams

    config = LLMConfig(model=ModelConfig(path=default_model_path()),
                       scheduler=SchedulerConfig(block_size=16, max_num_batched_tokens=64, num_kv_blocks=64))
    info = load_model_info(config.model)
    blocks = num_kv_blocks_for(config, info)
    engine = LLMEngine(config, info, load_tokenizer(info.path),
                       LocalExecutor(info.path, "float32", blocks, 16, device="cuda"), blocks)
    prompts = [[(5 * i + j) % 500 + 10 for j in range(n)] for i, n in enumerate((4, 19, 40, 77))]
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=24, temperature=0.0,
                                                      stop_token_ids=info.eos_token_ids))
    outs = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for o in engine.step()[0]:
            outs[o.request_id] += o.token_ids
    hf = AutoModelForCausalLM.from_pretrained(info.path, dtype=torch.float32).cuda().eval()
    for i, p in enumerate(prompts):
        ids = torch.tensor([p], device="cuda")
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        assert outs[f"r{i}"] == ref[0, len(p):].tolist()
