"""Executors that run steps in this process, without Ray or DeepSpeed.

`LocalExecutor` is tensor-parallel size 1: the model runs in the caller's thread (the engine's
step thread), so a step costs no transport at all. `InstantExecutor` is a benchmark stand-in.
Both are built by `parallel.build.build_executor`, like the worker group for size > 1.
"""

from __future__ import annotations

from serving.step import StepInput, StepOutput


class LocalExecutor:
    def __init__(self, path: str, dtype: str, num_kv_blocks: int, block_size: int, device: str = "cpu"):
        from serving.model_loader import load_model
        from serving.model_runner import StepRunner

        self.step_runner = StepRunner(load_model(path, dtype, device), num_kv_blocks, block_size, device)

    def execute(self, inp: StepInput) -> StepOutput:
        return self.step_runner.execute(inp)

    def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


class InstantExecutor:
    """A benchmark stand-in, never a default: every step returns one made-up token per sampled
    sequence at once, with no model. Tokens are ordinary vocabulary ids past the special ones,
    so detokenizing them costs what real text costs."""

    def __init__(self, vocab_size: int):
        self.first_id = min(256, vocab_size // 4)  # NOTE: past the special ids of common vocabularies
        self.span = vocab_size - self.first_id

    def execute(self, inp: StepInput) -> StepOutput:
        return StepOutput([self.first_id + (31 * seq_id + 7 * inp.context_lens[row]) % self.span
                           for seq_id, row in zip(inp.seq_ids, inp.sample_rows)])

    def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        pass
