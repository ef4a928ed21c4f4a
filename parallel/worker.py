"""One tensor-parallel rank: its shard of the model, its share of the KV cache, its end of the step
channel; and `TPWorker`, the Ray actor that is each of ranks 1..N-1.

Rank 0 is the engine's own process (parallel/worker_group.py) and runs the same `load_rank`. Each
step, rank 0 broadcasts the `StepInput` on the `StepChannel` and every rank runs it in lockstep
(the all-reduces inside the sharded layers keep them together); only rank 0 samples.
"""

from __future__ import annotations

import glob
import logging
import os
import pickle
import random
import socket
import time
from datetime import timedelta
from typing import Optional

import ray

from serving.step import StepInput

logger = logging.getLogger("ray.serve")

# The rendezvous port is picked from below Linux's ephemeral range (32768-60999 by default): the
# kernel hands out ephemeral ports to every connect() and every bind to port 0 (Serve's gRPC
# servers, Ray's workers) between our check that a port is free and rank 0's listen on it. A
# port from the ephemeral range was taken in that window once in CI (EADDRINUSE).
RENDEZVOUS_PORTS = range(20000, 32000)

# NOTE: ranks 1..N-1 wait inside a broadcast on the step channel while the server is idle, and a
# gloo op fails once it has waited longer than its group's timeout (seen with 2 s: the waiting
# rank raised after 2.0 s). Ten years is far from where the deadline (int64 nanoseconds of
# steady_clock) overflows, about 292 years.
CHANNEL_TIMEOUT = timedelta(days=3650)

MIN_MESSAGE_BYTES = 1 << 14  # the step channel's first buffer (it grows to fit the biggest step)

_joined = False  # this process has been a rank of some group (see _shard)


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


class StepChannel:
    """Rank 0 -> ranks 1..N-1: each step's `StepInput`, or None to stop, pickled and broadcast.

    A message is one broadcast of a uint8 buffer [capacity]: the payload's length (8 bytes), then
    the payload. A payload too big for it goes as its length alone; then both sides grow the buffer
    to fit (powers of two, never shrinking) and the message follows in it. So a step costs one
    broadcast (measured: one 0.1 ms, two 0.25-1.3 ms; tests/integration/test_step_channel.py).
    The channel has a gloo group of its own: on CUDA the model's group is NCCL while the payload
    is on the CPU, and the idle wait needs its long timeout (CHANNEL_TIMEOUT).
    NOTE: one message at a time, from one thread of rank 0 (WorkerGroup's lock).
    """

    def __init__(self):
        import torch.distributed as dist

        self.group = dist.new_group(backend="gloo", timeout=CHANNEL_TIMEOUT)
        self._resize(MIN_MESSAGE_BYTES)

    def _resize(self, num_bytes: int) -> None:
        import torch

        self._buf = torch.zeros(num_bytes, dtype=torch.uint8)
        self._view = memoryview(self._buf.numpy())

    def _broadcast(self) -> int:
        """Broadcasts the buffer from rank 0; returns the payload length it carries."""
        import torch.distributed as dist

        dist.broadcast(self._buf, 0, group=self.group)
        return int.from_bytes(self._view[:8], "little")

    def _fits(self, n: int) -> bool:
        return 8 + n <= len(self._view)

    def _grow(self, n: int) -> None:
        self._resize(1 << (8 + n - 1).bit_length())  # the next power of two that holds 8 + n bytes

    def send(self, inp: Optional[StepInput]) -> None:
        payload = pickle.dumps(inp, protocol=pickle.HIGHEST_PROTOCOL)
        n = len(payload)
        self._view[:8] = n.to_bytes(8, "little")
        if not self._fits(n):
            self._broadcast()  # the length alone, so that every rank grows its buffer
            self._grow(n)
            self._view[:8] = n.to_bytes(8, "little")
        self._view[8:8 + n] = payload
        self._broadcast()

    def recv(self) -> Optional[StepInput]:
        n = self._broadcast()
        if not self._fits(n):
            self._grow(n)
            self._broadcast()
        return pickle.loads(self._view[8:8 + n])


def load_rank(rank: int, world_size: int, master_addr: str, master_port: int, model_path: str, dtype: str,
              num_kv_blocks: int, block_size: int, device: str, replace_with_kernel_inject: bool,
              timeout_s: float):
    """This process's shard as (StepRunner, StepChannel). Every rank must call it at the same time:
    they rendezvous at `master_addr:master_port` (waiting up to `timeout_s`)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device == "cuda" else "cpu")
    from serving.model_runner import StepRunner

    model, times = load_shard(rank, world_size, master_addr, master_port, model_path, dtype, device,
                              replace_with_kernel_inject, timeout_s)
    logger.info("rank %d loaded: %.1f s to shard (process group, AutoTP), %.1f s for %.0f MiB of weights",
                rank, times["shard_s"], times["weights_s"], times["weights_bytes"] / 2**20)
    return StepRunner(model, num_kv_blocks, block_size, device, samples=rank == 0), StepChannel()


def load_shard(rank: int, world_size: int, master_addr: str, master_port: int, model_path: str, dtype: str,
               device: str, replace_with_kernel_inject: bool, timeout_s: float):
    """(this rank's shard of the model, {shard_s, weights_s, weights_bytes}).

    NOTE: AutoTP splits the model while its parameters are still on the meta device, so each rank
    allocates only its shards; then it reads only its slices from the safetensors files. Host
    memory per rank falls with the tensor-parallel degree (docs/deploy.md, "Fast replica start")."""
    import torch

    from serving.model_loader import empty_model, load_weights

    t0 = time.monotonic()
    model = empty_model(model_path, dtype)
    # NOTE: DeepSpeed re-allocates a model with meta parameters empty, buffers too (seen: RoPE's
    # inv_freq became garbage), so the computed buffers are put back after it.
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model = _shard(model, rank, world_size, master_addr, master_port, dtype, device,
                   replace_with_kernel_inject, timeout_s)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    t1 = time.monotonic()
    offsets = _shard_offsets(model, model_path, rank, world_size)
    num_bytes = load_weights(model, model_path, offsets, log=lambda m: logger.info("rank %d %s", rank, m))
    return model, {"shard_s": t1 - t0, "weights_s": time.monotonic() - t1, "weights_bytes": num_bytes}


def _shard_offsets(model, model_path: str, rank: int, world_size: int) -> dict[str, tuple[int, int]]:
    """Where this rank's shard of each split parameter starts in the checkpoint's tensor:
    {name: (dim, start)}. The split dimension is the one whose length differs from the checkpoint's;
    the start is the sum of the lower ranks' lengths (gathered, so DeepSpeed's uneven splits of
    heads or vocabularies come out right)."""
    import torch
    import torch.distributed as dist

    from serving.model_loader import checkpoint_shapes

    full = checkpoint_shapes(model_path)
    split: dict[str, tuple[int, int, int]] = {}  # name -> (dim, this rank's length, the full length)
    for name, param in model.named_parameters(remove_duplicate=False):
        # a tied LM head is stored as the input embedding (serving.model_loader.load_weights)
        shape = full.get(name) or full["model.embed_tokens.weight" if name == "lm_head.weight" else name]
        dims = [d for d, (a, b) in enumerate(zip(shape, param.shape)) if a != b]
        assert len(dims) <= 1, f"{name}: {shape} -> {tuple(param.shape)} splits more than one dimension"
        if dims:
            split[name] = (dims[0], param.shape[dims[0]], shape[dims[0]])
    names = sorted(split)
    lengths = torch.tensor([split[n][1] for n in names], dtype=torch.int64)
    every = [torch.zeros_like(lengths) for _ in range(world_size)]
    # gloo: on CUDA the model's group is NCCL, which takes no CPU tensors
    dist.all_gather(every, lengths, group=dist.new_group(backend="gloo"))
    offsets = {}
    for i, name in enumerate(names):
        dim, _, total = split[name]
        assert sum(int(e[i]) for e in every) == total, f"{name}: the shards do not tile dimension {dim}"
        offsets[name] = (dim, sum(int(every[r][i]) for r in range(rank)))
    return offsets


def _shard(model, rank: int, world_size: int, master_addr: str, master_port: int, dtype: str, device: str,
           replace_with_kernel_inject: bool, timeout_s: float):
    """Joins the process group and splits `model` with DeepSpeed-Inference AutoTP."""
    import deepspeed
    import torch
    import torch.distributed as dist

    global _joined
    # NOTE: DeepSpeed keeps its communication state per process: `deepspeed.comm`'s backend stays
    # "initialized" after torch's group is destroyed, and the shared-memory all-reduce (C++
    # statics) stays bound to the first group's size and peers. A second group would hang.
    if _joined:
        raise RuntimeError("this process was already a tensor-parallel rank; a new worker group needs a fresh process")
    _joined = True
    os.environ.update({
        "RANK": str(rank), "WORLD_SIZE": str(world_size), "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        # NOTE: each CUDA rank sees only its own GPU; on CPU, LOCAL_SIZE must be the world size
        # or DeepSpeed's shared-memory all-reduce crashes (NOTES.md).
        "LOCAL_RANK": "0" if device == "cuda" else str(rank),
        "LOCAL_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
    })
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", auto_mpi_discovery=False,
                               timeout=timedelta(seconds=timeout_s))
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


@ray.remote(concurrency_groups={"health": 1})
class TPWorker:
    """Rank 1..N-1: `load` (with rank 0), then one `run` call for the group's life; `ping` answers
    on its own thread, also while `run` is inside a step."""

    def __init__(self, rank: int, world_size: int, device: str, num_threads: int = 0):
        assert rank > 0, "rank 0 is the engine's own process"
        self.rank = rank
        self.world_size = world_size
        self.device = device
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)

    def load(self, master_addr: str, master_port: int, model_path: str, dtype: str, num_kv_blocks: int,
             block_size: int, replace_with_kernel_inject: bool, timeout_s: float) -> None:
        self.step_runner, self.channel = load_rank(self.rank, self.world_size, master_addr, master_port,
                                                   model_path, dtype, num_kv_blocks, block_size, self.device,
                                                   replace_with_kernel_inject, timeout_s)

    def run(self) -> None:
        """Runs every step rank 0 broadcasts, until it sends stop. NOTE: idle, it blocks in gloo's
        receive (no CPU used)."""
        while (inp := self.channel.recv()) is not None:
            self.step_runner.execute(inp)

    @ray.method(concurrency_group="health")
    def ping(self) -> None:
        pass

    @ray.method(concurrency_group="health")
    def pid(self) -> int:
        return os.getpid()
