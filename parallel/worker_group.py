"""A group of `TPWorker` actors, one per tensor-parallel rank, driven as one.

`execute(step_input)` sends the same step to every rank and returns rank 0's tokens: nano-vllm's
single `call` channel, over Ray: a compiled graph (shared-memory channels) on CUDA, plain actor
calls on CPU (`ParallelConfig.use_compiled_graph`). The ranks sit in one placement group packed on one node: the
enclosing Serve replica's (bundles 1..N, see deployments/llm_server.py) or, outside Serve, one made here.
"""

from __future__ import annotations

import logging

import ray
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from parallel.worker import TPWorker
from serving.config import LLMConfig
from serving.step import StepInput, StepOutput

logger = logging.getLogger(__name__)


def worker_bundles(config: LLMConfig, device: str) -> list[dict]:
    """One bundle per rank."""
    if device == "cuda":
        return [{"CPU": 1, "GPU": 1} for _ in range(config.parallel.tensor_parallel_size)]
    return [{"CPU": config.parallel.num_cpus_per_worker} for _ in range(config.parallel.tensor_parallel_size)]


class WorkerGroup:
    def __init__(self, config: LLMConfig, model_path: str, num_kv_blocks: int, device: str,
                 first_bundle: int = 1, load_timeout_s: float = 900.0):
        par = config.parallel
        self.step_timeout_s = par.step_timeout_s
        self._own_pg = None
        pg = get_current_placement_group()
        if pg is None:  # outside a Serve replica with bundles: make our own
            self._own_pg = pg = placement_group(worker_bundles(config, device), strategy="STRICT_PACK")
            ray.get(pg.ready(), timeout=load_timeout_s)
            first_bundle = 0
        bundles = worker_bundles(config, device)
        self.workers = [
            TPWorker.options(
                num_cpus=bundles[r].get("CPU", 0), num_gpus=bundles[r].get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=first_bundle + r),
            ).remote(r, par.tensor_parallel_size, device, par.num_threads_per_worker)
            for r in range(par.tensor_parallel_size)
        ]
        addr, port = ray.get(self.workers[0].address.remote(), timeout=load_timeout_s)
        ray.get([w.load.remote(addr, port, model_path, config.model.dtype, num_kv_blocks,
                               config.scheduler.block_size, par.replace_with_kernel_inject)
                 for w in self.workers], timeout=load_timeout_s)
        compiled = par.use_compiled_graph if par.use_compiled_graph is not None else device == "cuda"
        self._dag = self._compile() if compiled else None

    def _compile(self):
        from ray.dag import InputNode, MultiOutputNode

        with InputNode() as step_input:
            dag = MultiOutputNode([w.execute.bind(step_input) for w in self.workers])
        return dag.experimental_compile()

    def execute(self, step_input: StepInput) -> StepOutput:
        if self._dag is not None:
            results = ray.get(self._dag.execute(step_input), timeout=self.step_timeout_s)
        else:
            results = ray.get([w.execute.remote(step_input) for w in self.workers], timeout=self.step_timeout_s)
        return results[0]

    def check_health(self, timeout_s: float = 10.0) -> None:
        """Raises if any rank is dead or does not answer (on its own concurrency group)."""
        ray.get([w.ping.remote() for w in self.workers], timeout=timeout_s)

    def shutdown(self) -> None:
        if self._dag is not None:
            self._dag.teardown()
            self._dag = None
        for w in self.workers:
            ray.kill(w)
        self.workers = []
        if self._own_pg is not None:
            remove_placement_group(self._own_pg)
            self._own_pg = None

