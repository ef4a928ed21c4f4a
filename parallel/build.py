"""The one way to build an engine: for the Serve replica, the benchmarks and the tests.

`build_engine(config)` resolves the device once, loads the model's metadata and tokenizer, sizes
the KV cache and picks the executor: the model in this process for tensor_parallel_size 1, this
process as rank 0 of a worker group for more, or the benchmark stand-in (`executor="instant"`).
"""

from __future__ import annotations

from typing import Optional

from serving.config import LLMConfig
from serving.engine import LLMEngine, num_kv_blocks_for
from serving.model_loader import ModelInfo
from serving.step import Executor


def resolve_device(config: LLMConfig) -> str:
    """"cpu" or "cuda": the configured device, or for "auto" CUDA when the cluster (or this
    machine, without Ray) has a GPU."""
    if config.parallel.device != "auto":
        return config.parallel.device
    try:
        import ray

        if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0:
            return "cuda"
    except Exception:
        pass
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_executor(config: LLMConfig, info: ModelInfo, num_kv_blocks: int, device: str) -> Executor:
    par = config.parallel
    if par.executor == "instant":
        from serving.executor import InstantExecutor

        return InstantExecutor(info.vocab_size)
    if par.tensor_parallel_size == 1:
        from serving.executor import LocalExecutor

        return LocalExecutor(info.path, config.model.dtype, num_kv_blocks, config.scheduler.block_size, device)
    from parallel.worker_group import WorkerGroup

    return WorkerGroup(config, info.path, num_kv_blocks, device)


def build_engine(config: LLMConfig, device: Optional[str] = None) -> LLMEngine:
    """The engine for `config`, its executor built and its model loaded (on every rank)."""
    from serving.model_loader import load_model_info, load_tokenizer

    if config.parallel.num_threads_per_worker:
        import torch

        torch.set_num_threads(config.parallel.num_threads_per_worker)
    device = device or resolve_device(config)
    info = load_model_info(config.model)
    num_blocks = num_kv_blocks_for(config, info)
    executor = build_executor(config, info, num_blocks, device)
    try:
        speculator = build_speculator(config, info, executor, num_blocks)
    except BaseException:
        executor.shutdown()
        raise
    return LLMEngine(config, info, load_tokenizer(info.path), executor, num_blocks, speculator)


def build_speculator(config: LLMConfig, info: ModelInfo, executor: Executor, num_blocks: int):
    """The speculative decoder of `config.speculative` (None for method "none"): its proposers (the
    draft worker started here, in the last bundle of this process's placement group if it has one)
    and the step cost model measured on `executor`."""
    spec = config.speculative
    if not spec.enabled:
        return None
    from serving.spec.proposers import DraftProposer, EarlyExitProposer, NgramProposer
    from serving.spec.speculator import Speculator, measure_step_cost

    block_size = config.scheduler.block_size
    proposers = []
    if spec.method in ("ngram", "auto"):
        proposers.append(NgramProposer(spec.ngram_max, spec.ngram_min))
    if spec.method == "early_exit":
        proposers.append(EarlyExitProposer(executor, block_size, early_exit_layers(config, info)))
    if spec.uses_draft:
        from parallel.draft_worker import DraftWorkerHandle

        proposers.append(DraftProposer(DraftWorkerHandle.start(config, num_blocks)))
    speculator = Speculator(spec, proposers, measure_step_cost(executor, block_size, num_blocks), info.max_model_len)
    speculator.measure_proposers(block_size, num_blocks)
    return speculator


def early_exit_layers(config: LLMConfig, info: ModelInfo) -> int:
    """The configured exit, else the one the model was trained with (`early_exit_layers` in its
    config.json), else 2 (of the shipped target's 6)."""
    layers = config.speculative.early_exit_layers or info.early_exit_layers or 2
    if not 0 < layers < info.num_layers:
        raise ValueError(f"speculative.early_exit_layers must be between 1 and {info.num_layers - 1} "
                         f"for this model ({info.num_layers} layers); got {layers}")
    return layers
