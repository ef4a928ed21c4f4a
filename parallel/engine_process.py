"""The engine in a process of its own, next to its Serve replica: the `EngineProcess` actor.

The replica (deployments/llm_server.py) starts one, in bundle 0 of its placement group (so on its
node; on CUDA it holds that bundle's GPU), and talks to it over one Unix socket
(`serving.engine_core`: the replica's `EngineCoreClient`, the actor's `CoreServer`). The actor is
rank 0: it builds the engine with `build_engine`, so for tensor_parallel_size > 1 it starts the
other ranks and broadcasts each step to them. Why a process of its own: serving/engine_core.py.
The actor is owned by the replica and dies with it.
"""

from __future__ import annotations

import os
from multiprocessing.connection import Client, Listener
from typing import Optional

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from serving.config import LLMConfig
from serving.engine_core import CoreServer, EngineCoreClient, listen_unix

START_TIMEOUT_S = 900.0  # model load (and, for TP > 1, the other ranks' placement and load)


@ray.remote(num_cpus=0, max_concurrency=4)  # NOTE: health checks run while `serve` blocks in its thread
class EngineProcess:
    def __init__(self, config: LLMConfig, device: str, torch_threads: int):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import torch

        from parallel.build import build_engine

        torch.set_num_threads(torch_threads)  # what the replica itself would have used
        self.config = config
        self.engine = build_engine(config, device)
        self.server: Optional[CoreServer] = None

    def num_kv_blocks(self) -> int:
        return self.engine.blocks.num_blocks

    def listen(self) -> tuple[str, bytes]:
        """A socket for one client; the engine steps for it until it hangs up."""
        return listen_unix("engine", self._serve, "engine-core-server")

    def _serve(self, listener: Listener) -> None:
        with listener:
            conn = listener.accept()
        sched = self.config.scheduler
        self.server = CoreServer(self.engine, conn, 0.25 * sched.stream_interval_s, self.config.parallel.step_timeout_s)
        self.server.serve()

    def where(self) -> dict:
        """This process (see `where`), the pids of the other ranks' actors and where the draft worker
        runs (None without one)."""
        workers = getattr(self.engine.executor, "workers", [])
        spec = self.engine.speculator
        draft = spec.proposers.get("draft") if spec is not None else None
        return {**where(), "rank_pids": ray.get([w.pid.remote() for w in workers], timeout=30),
                "draft": ray.get(draft.client.actor.where.remote(), timeout=30) if draft is not None else None}

    def check_health(self) -> None:
        if self.server is not None and self.server.loop.error is not None:
            raise RuntimeError(f"engine failed: {self.server.loop.error}")
        self.engine.check_health()


def start_engine_process(config: LLMConfig, device: str, gpus: float) -> tuple[EngineCoreClient, int]:
    """Starts the engine's process in bundle 0 of this replica's placement group (on this node
    without one) and connects to it; returns the client and the engine's KV block count."""
    import torch

    pg = get_current_placement_group()
    strategy = (PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=0)
                if pg is not None else
                NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False))
    core = EngineProcess.options(num_gpus=gpus, scheduling_strategy=strategy).remote(
        config, device, torch.get_num_threads())
    try:
        num_blocks = ray.get(core.num_kv_blocks.remote(), timeout=START_TIMEOUT_S)
        address, authkey = ray.get(core.listen.remote(), timeout=60)
        return EngineCoreClient(Client(address, family="AF_UNIX", authkey=authkey), core), num_blocks
    except BaseException:
        ray.kill(core)
        raise


def where() -> dict:
    """This process: pid, node and placement group (for tests and debugging)."""
    ctx = ray.get_runtime_context()
    return {"pid": os.getpid(), "node_id": ctx.get_node_id(), "placement_group_id": ctx.get_placement_group_id()}
