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
    return LLMEngine(config, info, load_tokenizer(info.path), executor, num_blocks)
