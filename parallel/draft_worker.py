"""The draft model in a Ray actor of its own: the `DraftWorker`, and the engine's `DraftClient`.

The engine calls `DraftClient.propose` once per speculative round, for the whole batch; the worker's
`DraftRunner` (serving/spec/draft.py) runs the round's forwards and answers. One round trip over an
authenticated Unix socket, like the engine's own process (serving/engine_core.py), not a Ray call:
a Ray call per step cost 3.4 ms of a 13 ms step here (docs: DESIGN.md). The socket lives on the
node's filesystem, so the worker must be on the engine's node (its placement group's bundle).

Messages are pickled, one per `Connection.send_bytes`. Both ends are this project's own processes on
one node (the connection is authenticated; nothing from HTTP is unpickled).
    client -> worker: list[DraftRequest]
    worker -> client: ("result", DraftResult) | ("error", repr of the exception propose raised)
"""

from __future__ import annotations

import os
import pickle
from multiprocessing.connection import Client, Listener
from typing import Optional

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from parallel.engine_process import where
from serving.engine_core import hang_up, listen_unix
from serving.spec.draft import DraftRequest, DraftResult

START_TIMEOUT_S = 300.0  # the draft's load
DEFAULT_TIMEOUT_S = 60.0  # one round; past it the worker counts as dead


def _dumps(message) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


@ray.remote
class DraftWorker:
    """Owns a `DraftRunner`; `listen` serves it on a socket from a thread of its own, so that `ping`
    and `pid` answer while a round runs."""

    def __init__(self, path: str, dtype: str, num_kv_blocks: int, block_size: int, device: str,
                 num_threads: Optional[int] = None):
        import torch

        from serving.spec.draft import DraftRunner

        if num_threads:
            torch.set_num_threads(num_threads)
        self.runner = DraftRunner(path, dtype, num_kv_blocks, block_size, device)

    def listen(self) -> tuple[str, bytes]:
        """A socket the engine connects to (one connection at a time); returns (address, authkey)."""
        return listen_unix("draft", self._serve, "draft-server")

    def _serve(self, listener: Listener) -> None:
        with listener:
            while True:
                try:
                    conn = listener.accept()
                except (OSError, EOFError):  # NOTE: also a client that fails authentication
                    continue
                try:
                    self._answer(conn)
                finally:
                    hang_up(conn)

    def _answer(self, conn) -> None:
        """Answers every round the client sends until it hangs up."""
        while True:
            try:
                reqs: list[DraftRequest] = pickle.loads(conn.recv_bytes())
            except (OSError, EOFError):
                return
            try:
                res = self.runner.propose(reqs)
                if res.probs is not None:
                    res.probs = res.probs.cpu()  # NOTE: the engine's process may not see this device
                message = ("result", res)
            except Exception as e:  # a bad round: the client raises it, the worker stays up
                message = ("error", repr(e))
            try:
                conn.send_bytes(_dumps(message))
            except (OSError, EOFError):
                return

    def ping(self) -> None:
        pass

    def pid(self) -> int:
        return os.getpid()

    def where(self) -> dict:
        """This process: pid, node and placement group (`parallel.engine_process.where`)."""
        return where()


class DraftClient:
    """The engine's end: one round trip per `propose`. Any failure (the worker gone, an answer later
    than `timeout_s`, an error in the round) raises RuntimeError("draft worker ..."); after a lost or
    late answer the client is closed, and every later call raises too."""

    def __init__(self, address: str, authkey: bytes, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.timeout_s = timeout_s
        self.conn = Client(address, family="AF_UNIX", authkey=authkey)
        self._broken: Optional[str] = None  # why the connection can no longer be used

    def propose(self, reqs: list[DraftRequest]) -> DraftResult:
        if self._broken is not None:
            raise RuntimeError(f"draft worker unusable: {self._broken}")
        try:
            self.conn.send_bytes(_dumps(reqs))
            answered = self.conn.poll(self.timeout_s)
            message = pickle.loads(self.conn.recv_bytes()) if answered else None
        except (OSError, EOFError) as e:
            raise self._give_up(f"gone ({e!r})") from e
        if message is None:
            raise self._give_up(f"did not answer within {self.timeout_s:g} s")
        kind, payload = message
        if kind == "error":
            raise RuntimeError(f"draft worker failed the round: {payload}")
        return payload

    def _give_up(self, why: str) -> RuntimeError:
        """NOTE: a late answer would be read as the next round's, so the connection is closed for good."""
        self._broken = why
        hang_up(self.conn)
        return RuntimeError(f"draft worker {why}")

    def close(self) -> None:
        hang_up(self.conn)


def start_draft_worker(path: str, dtype: str, num_kv_blocks: int, block_size: int, device: str, num_cpus: float,
                       num_threads: Optional[int], placement_group=None, bundle_index: Optional[int] = None,
                       num_gpus: float = 0.0) -> tuple:
    """Starts a `DraftWorker` (in `placement_group`'s bundle `bundle_index` when given, else on this
    node), waits for its model to load and connects to it; returns (actor, DraftClient).
    On CUDA give it `num_gpus` (a share of the bundle's GPU): an actor without one sees no GPU."""
    if placement_group is not None:
        index = -1 if bundle_index is None else bundle_index  # -1: any bundle
        strategy = PlacementGroupSchedulingStrategy(placement_group=placement_group,
                                                    placement_group_bundle_index=index)
    else:  # the socket is a file on this node
        strategy = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = DraftWorker.options(num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy=strategy).remote(
        path, dtype, num_kv_blocks, block_size, device, num_threads)
    try:
        address, authkey = ray.get(actor.listen.remote(), timeout=START_TIMEOUT_S)
        return actor, DraftClient(address, authkey)
    except BaseException:
        ray.kill(actor)
        raise


class DraftWorkerHandle:
    """One engine's draft worker as its `serving.spec.proposers.DraftProposer` sees it: propose,
    health and shutdown. The actor is owned by the process that starts it (the engine's), so it
    dies with it."""

    def __init__(self, actor, client: DraftClient):
        self.actor = actor
        self.client = client

    @classmethod
    def start(cls, config, num_kv_blocks: int) -> "DraftWorkerHandle":
        """In the last bundle of this process's placement group when it has one beyond the ranks'
        (deployments/llm_server.py adds it), else on this node."""
        from ray.util.placement_group import get_current_placement_group

        from serving.models import default_draft_path

        spec = config.speculative
        path = spec.draft_model or default_draft_path()
        if path is None:
            raise ValueError("speculative.draft_model is not set and the embedded draft is not installed")
        pg = get_current_placement_group()
        if pg is not None and pg.bundle_count <= config.parallel.tensor_parallel_size:
            pg = None
        # NOTE: the draft bundle holds no GPU: on CUDA the draft runs on the CPU (docs/speculative.md)
        actor, client = start_draft_worker(path, config.model.dtype, num_kv_blocks, config.scheduler.block_size,
                                           "cpu", spec.num_cpus_draft, config.parallel.num_threads_per_worker or 1,
                                           pg, None if pg is None else pg.bundle_count - 1)
        return cls(actor, client)

    def propose(self, reqs: list[DraftRequest]) -> DraftResult:
        return self.client.propose(reqs)

    def check_health(self, timeout_s: float = 10.0) -> None:
        ray.get(self.actor.ping.remote(), timeout=timeout_s)

    def shutdown(self) -> None:
        self.client.close()
        ray.kill(self.actor)
