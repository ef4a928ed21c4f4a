"""The step channel alone (no model, no DeepSpeed), rank 0 and rank 1 in two actors: steps arrive
intact and in order (also one too big for a single broadcast), stop ends the loop, an idle receiver
uses no CPU, and the transport per step is printed (run with -s to see it; not asserted)."""

from __future__ import annotations

import os
import statistics
import time

import ray

from serving.step import StepInput


def decode_step(batch: int, context_len: int, block_size: int = 16) -> StepInput:
    """A decode step of `batch` sequences of `context_len` tokens each."""
    blocks = -(-context_len // block_size)
    return StepInput(token_ids=list(range(batch)), query_lens=[1] * batch, context_lens=[context_len] * batch,
                     block_tables=[list(range(i * blocks, (i + 1) * blocks)) for i in range(batch)],
                     block_size=block_size, sample_rows=list(range(batch)), seq_ids=list(range(batch)),
                     temperatures=[0.0] * batch, top_ps=[1.0] * batch, top_ks=[0] * batch, seeds=[None] * batch)


@ray.remote(num_cpus=0.5)
class Rank:
    def __init__(self, rank: int, addr: str, port: int):
        import torch.distributed as dist

        from parallel.worker import StepChannel

        dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=2)
        self.channel = StepChannel()

    def pid(self) -> int:
        return os.getpid()

    def send(self, steps: list, interval_s: float) -> list[float]:
        """Rank 0: each step's send start (perf_counter) and send time."""
        starts, times = [], []
        for inp in steps:
            t0 = time.perf_counter()
            self.channel.send(inp)
            starts.append(t0)
            times.append(time.perf_counter() - t0)
            time.sleep(interval_s)  # a step's forward
        return starts, times

    def receive(self) -> tuple[list, list[float]]:
        """Rank 1: the steps until stop, and when each was decoded."""
        steps, arrivals = [], []
        while (inp := self.channel.recv()) is not None:
            arrivals.append(time.perf_counter())  # NOTE: CLOCK_MONOTONIC, one clock for all processes
            steps.append(inp)
        return steps, arrivals


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_steps_arrive_in_order_and_an_idle_receiver_uses_no_cpu(ray_cluster):
    from parallel.worker import _free_port

    addr, port = ray.util.get_node_ip_address(), _free_port()
    sender, receiver = Rank.remote(0, addr, port), Rank.remote(1, addr, port)
    try:
        pid = ray.get(receiver.pid.remote())
        received = receiver.receive.remote()
        time.sleep(1.0)  # the receiver is now waiting for its first message
        cpu0 = _cpu_s(pid)
        time.sleep(3.0)
        idle_cpu_s = _cpu_s(pid) - cpu0
        ray.get(sender.send.remote([None], 0.0))
        assert ray.get(received) == ([], [])
        print(f"\nidle receiver: {idle_cpu_s:.3f} s CPU over 3 s")
        assert idle_cpu_s < 0.3

        for name, step in (("batch 1, 64-token context", decode_step(1, 64)),
                           ("batch 32, 512-token contexts", decode_step(32, 512)),
                           ("batch 128, 1024-token contexts (past the first buffer)", decode_step(128, 1024))):
            steps = [step] * 200
            received = receiver.receive.remote()
            starts, times = ray.get(sender.send.remote(steps + [None], 0.002))
            got, arrivals = ray.get(received)
            assert got == steps
            latencies = [a - s for a, s in zip(arrivals[50:], starts[50:])]  # past a warm-up
            print(f"{name}: rank 0's send p50 {1e3 * statistics.median(times[50:-1]):.3f} ms, "
                  f"send to decoded on rank 1 p50 {1e3 * statistics.median(latencies):.3f} ms")
    finally:
        ray.kill(sender)
        ray.kill(receiver)
