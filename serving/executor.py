"""The executor that runs steps in this process: one rank, no Ray, no DeepSpeed.

Used by unit tests and by benchmarks that measure the engine without transport. The Serve
deployment uses `parallel.worker_group.WorkerGroup`, which has the same `execute`.
"""

from __future__ import annotations

from serving.config import LLMConfig
from serving.engine import LLMEngine, num_kv_blocks_for
from serving.model_loader import load_model, load_model_info, load_tokenizer
from serving.model_runner import StepInput, StepRunner


class LocalExecutor:
    def __init__(self, path: str, dtype: str, num_kv_blocks: int, block_size: int, device: str = "cpu"):
        self.step_runner = StepRunner(load_model(path, dtype, device), num_kv_blocks, block_size, device)

    def execute(self, inp: StepInput) -> list[int]:
        return self.step_runner.execute(inp)

    @property
    def last_model_time_s(self) -> float:
        return self.step_runner.last_time_s

    def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


class InstantExecutor:
    """A benchmark stand-in, never a default: every step returns one made-up token per sampled
    sequence at once, with no model. Tokens are ordinary vocabulary ids past the special ones,
    so detokenizing them costs what real text costs."""

    last_model_time_s = 0.0

    def __init__(self, vocab_size: int):
        self.first_id = min(256, vocab_size // 4)  # NOTE: past the special ids of common vocabularies
        self.span = vocab_size - self.first_id

    def execute(self, inp: StepInput) -> list[int]:
        return [self.first_id + (31 * seq_id + 7 * inp.context_lens[row]) % self.span
                for seq_id, row in zip(inp.seq_ids, inp.sample_rows)]

    def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def build_local_engine(config: LLMConfig) -> LLMEngine:
    if config.parallel.num_threads_per_worker:
        import torch

        torch.set_num_threads(config.parallel.num_threads_per_worker)
    info = load_model_info(config.model)
    blocks = num_kv_blocks_for(config, info)
    executor = LocalExecutor(info.path, config.model.dtype, blocks, config.scheduler.block_size)
    return LLMEngine(config, info, load_tokenizer(info.path), executor, blocks)
