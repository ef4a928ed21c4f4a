"""One tensor-parallel rank: a Ray actor holding its shard of the model and its share of the KV cache.

Every rank runs the same `execute(step_input)` in lockstep (the all-reduces inside the sharded
layers keep them together); only rank 0 samples and returns tokens.
"""

from __future__ import annotations

import glob
import os
import random
import socket
from typing import Optional

import ray

from serving.step import StepInput, StepOutput

# The rendezvous port is picked from below Linux's ephemeral range (32768-60999 by default): the
# kernel hands out ephemeral ports to every connect() and every bind to port 0 (Serve's gRPC
# servers, Ray's workers) between our check that a port is free and rank 0's listen on it. A
# port from the ephemeral range was taken in that window once in CI (EADDRINUSE).
RENDEZVOUS_PORTS = range(20000, 32000)


def _free_port() -> int:
    """A port that nobody listens on now, preferably outside the ephemeral range."""
    for port in random.Random().sample(RENDEZVOUS_PORTS, 64):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@ray.remote(concurrency_groups={"health": 1})
class TPWorker:
    def __init__(self, rank: int, world_size: int, device: str, num_threads: int = 0):
        self.rank = rank
        self.world_size = world_size
        self.device = device
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device == "cuda" else "cpu")
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        self.step_runner = None

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), _free_port()

    def load(self, master_addr: str, master_port: int, model_path: str, dtype: str, num_kv_blocks: int,
             block_size: int, replace_with_kernel_inject: bool = False) -> int:
        """Loads this rank's shard; all ranks must call it at the same time (they rendezvous)."""
        from serving.model_loader import load_model
        from serving.model_runner import StepRunner

        device = "cuda" if self.device == "cuda" else "cpu"
        model = load_model(model_path, dtype, device)
        if self.world_size > 1:
            model = _shard(model, self.rank, self.world_size, master_addr, master_port, dtype,
                           device, replace_with_kernel_inject)
        self.step_runner = StepRunner(model, num_kv_blocks, block_size, device, samples=self.rank == 0)
        return sum(p.numel() for p in model.parameters())

    def execute(self, step_input: StepInput) -> Optional[StepOutput]:
        """Rank 0: the sampled tokens; other ranks: None."""
        return self.step_runner.execute(step_input)

    @ray.method(concurrency_group="health")
    def ping(self) -> int:
        return self.rank


def _shard(model, rank: int, world_size: int, master_addr: str, master_port: int, dtype: str, device: str,
           replace_with_kernel_inject: bool):
    """Joins the process group and splits `model` with DeepSpeed-Inference AutoTP."""
    import deepspeed
    import torch
    import torch.distributed as dist

    os.environ.update({
        "RANK": str(rank), "WORLD_SIZE": str(world_size), "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        # NOTE: each CUDA actor sees only its own GPU; on CPU, LOCAL_SIZE must be the world size
        # or DeepSpeed's shared-memory all-reduce crashes (NOTES.md).
        "LOCAL_RANK": "0" if device == "cuda" else str(rank),
        "LOCAL_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
    })
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", auto_mpi_discovery=False)
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": world_size},
                                      dtype=getattr(torch, dtype),
                                      replace_with_kernel_inject=replace_with_kernel_inject)
    dist.barrier()
    # DeepSpeed's shared-memory all-reduce leaves its buffers in /dev/shm; once every rank has
    # mapped them they can be unlinked (NOTES.md), so nothing is left behind when we exit.
    if rank == 0:
        for path in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
            try:
                if os.stat(path).st_uid == os.getuid():
                    os.unlink(path)
            except OSError:
                pass
    dist.barrier()
    return engine.module
