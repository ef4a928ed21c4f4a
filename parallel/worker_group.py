"""Tensor-parallel ranks 0..N-1 driven as one executor, from the engine's own process.

The process that builds a `WorkerGroup` (the Serve replica, or a test or benchmark driver) is rank
0: it holds its own shard and runs each step in the caller's thread (the engine's step thread).
Ranks 1..N-1 are `TPWorker` actors, each inside one long `run` call that takes every step from
rank 0's broadcast on the step channel, so a step costs no Ray call. The actors sit in the Serve
replica's placement group (bundle 0 = the replica, bundle r = rank r; deployments/llm_server.py)
or, outside Serve, in one made here for ranks 1..N-1.

NOTE: one worker group per process, ever (DeepSpeed's state per process; parallel/worker.py).
"""

from __future__ import annotations

import dataclasses
import logging
import threading

import ray
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from parallel.worker import TPWorker, _free_port, load_rank
from serving.config import LLMConfig
from serving.step import StepInput, StepOutput

logger = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 900.0  # placement, model load and rendezvous of every rank
STOP_TIMEOUT_S = 10.0


def worker_bundles(config: LLMConfig, device: str) -> list[dict]:
    """One bundle per rank; bundle 0 is rank 0, the engine's own process."""
    if device == "cuda":
        return [{"CPU": 1, "GPU": 1} for _ in range(config.parallel.tensor_parallel_size)]
    return [{"CPU": config.parallel.num_cpus_per_worker} for _ in range(config.parallel.tensor_parallel_size)]


class WorkerGroup:
    """The `serving.step.Executor` for tensor_parallel_size > 1, with this process as rank 0."""

    def __init__(self, config: LLMConfig, model_path: str, num_kv_blocks: int, device: str):
        par = config.parallel
        world_size = par.tensor_parallel_size
        assert world_size > 1, "tensor_parallel_size 1 runs in process (serving.executor.LocalExecutor)"
        addr, port = ray.util.get_node_ip_address(), _free_port()
        bundles = worker_bundles(config, device)
        self.workers: list = []
        self._own_pg = None
        pg = get_current_placement_group()
        if pg is None:
            # NOTE: on this node, like rank 0: the ranks' shared-memory all-reduce needs them all local.
            self._own_pg = pg = placement_group([{**b, f"node:{addr}": 0.001} for b in bundles[1:]],
                                                strategy="STRICT_PACK")
        else:
            # NOTE: one bundle per rank, then the draft worker's with speculative decoding by a draft
            assert pg.bundle_count >= world_size, "the replica's placement group has one bundle per rank"
        first_bundle = 0 if self._own_pg is not None else 1  # rank 1's bundle
        args = (model_path, config.model.dtype, num_kv_blocks, config.scheduler.block_size)
        try:
            ray.get(pg.ready(), timeout=LOAD_TIMEOUT_S)
            self.workers = [
                TPWorker.options(
                    num_cpus=bundles[r]["CPU"], num_gpus=bundles[r].get("GPU", 0),
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=pg, placement_group_bundle_index=first_bundle + r - 1),
                ).remote(r, world_size, device, par.num_threads_per_worker)
                for r in range(1, world_size)
            ]
            loads = [w.load.remote(addr, port, *args, par.replace_with_kernel_inject, LOAD_TIMEOUT_S)
                     for w in self.workers]
            # NOTE: rank 0's load rendezvouses with the actors' loads, so it runs while they run.
            self.step_runner, self.channel = load_rank(0, world_size, addr, port, *args, device,
                                                       par.replace_with_kernel_inject, LOAD_TIMEOUT_S)
            ray.get(loads, timeout=LOAD_TIMEOUT_S)
        except BaseException:
            self._release()
            raise
        self._loops = [w.run.remote() for w in self.workers]
        self._lock = threading.Lock()  # held while the channel carries a message and its step runs

    def execute(self, inp: StepInput) -> StepOutput:
        """Sends the step to ranks 1..N-1, then runs rank 0's part of it in the caller's thread."""
        with self._lock:
            # NOTE: the proposer's distributions are for rank 0's acceptance only
            self.channel.send(dataclasses.replace(inp, draft_probs=[]) if inp.draft_probs else inp)
            return self.step_runner.execute(inp)

    def check_health(self, timeout_s: float = 10.0) -> None:
        """Raises if any actor rank is dead, does not answer a ping within `timeout_s`, or left its
        step loop. Answers while a step is stuck (say, rank 0 spinning in an all-reduce whose
        peer died): it only talks to the actors, on their "health" thread."""
        if not self.workers:
            raise RuntimeError("the worker group is shut down")
        ended, _ = ray.wait(self._loops, num_returns=len(self._loops), timeout=0)
        if ended:
            ray.get(ended)  # raises the loop's error, ActorDiedError for a dead actor
            raise RuntimeError(f"{len(ended)} rank(s) left the step loop")
        ray.get([w.ping.remote() for w in self.workers], timeout=timeout_s)

    def shutdown(self) -> None:
        """Stops the step loops (when no step is in flight), kills the actors, removes our placement
        group and destroys this process's process group."""
        if not self.workers:
            return
        import torch.distributed as dist

        idle = self._lock.acquire(blocking=False)
        try:
            if idle and not ray.wait(self._loops, num_returns=len(self._loops), timeout=0)[0]:
                try:
                    self.channel.send(None)
                    ray.get(self._loops, timeout=STOP_TIMEOUT_S)
                except Exception as e:
                    logger.warning("tensor-parallel ranks did not stop cleanly: %s", e)
            self._release()
            if idle:
                dist.destroy_process_group()
            else:  # NOTE: the step thread is inside a collective of the group: leave it to the process's exit
                logger.warning("a step is still running; the process group is left as it is")
        finally:
            if idle:
                self._lock.release()

    def _release(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
        if self._own_pg is not None:
            remove_placement_group(self._own_pg)
            self._own_pg = None
