"""A simulated multi-node cluster on one machine: Ray's fake multi-node provider, the app on the tiny
model, a load that rises and stops.

The head (1 logical CPU) holds the Serve controller, the proxy and the router; every LLM replica
needs a 1-CPU node, which the Ray autoscaler launches through the fake provider (each fake node is
a raylet of its own on this machine), as GPU nodes on the real cluster (cluster.yaml). The LLM policy (deployments/autoscaling.py) adds replicas when
sequences queue; when the load stops it removes them, and the autoscaler removes the idle nodes.

Run by tests/integration/test_fake_cluster.py and bench/load_step.py in a process of its own (one
Ray driver per process), or by hand: `python -m bench.fake_cluster [--policy ongoing_requests]
[--load-s 60]`. Without --load-s the load runs until three replicas serve. It prints the replica
and node counts over time, and a last line `RESULT {json}`. It stops every process it started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import yaml

DEPLOYMENT = "LLMServer:tiny"
MAX_REPLICAS = 3
NODE_CPUS = 1.0  # a fake worker node: room for one replica (parallel.num_cpus_per_worker below)
HEAD_CPUS = 1  # the router (0.25) fits, a replica (1.0) beside it does not: every replica needs a node


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _autoscaling_config(gcs_address: str) -> dict:
    # The launcher's full schema, most of it empty: the fake provider starts nodes in-process.
    return {
        "cluster_name": "fake", "max_workers": MAX_REPLICAS, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,  # 6 s without replicas, then the node goes
        # No node updaters: they would try SSH to the fake node and mark its launch failed. All
        # nodes share this machine's IP: the autoscaler tells them apart by node id.
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "launch_multiple": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "use_node_id_as_ip": True},
        "auth": {"ssh_user": "ray"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": HEAD_CPUS}, "node_config": {}, "max_workers": 0},
            "llm_node": {"resources": {"CPU": NODE_CPUS}, "node_config": {}, "min_workers": 0,
                         "max_workers": MAX_REPLICAS},
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


class FakeCluster:
    """`RAY_FAKE_CLUSTER=1 ray start --head --block` in its own session and temp dir, on free ports;
    stop() ends that session and any process left that names the temp dir (the fake nodes)."""

    def __init__(self, temp_dir: str):
        import ray._private.services

        self.temp_dir = temp_dir
        ip = ray._private.services.get_node_ip_address()
        self.port = _free_port()
        self.address = f"{ip}:{self.port}"
        config_path = Path(self.temp_dir) / "fake.yaml"
        config_path.write_text(yaml.safe_dump(_autoscaling_config(self.address)))
        # Token auth off on this loopback-only cluster: the driver, the head and the fake nodes
        # (started by the autoscaler with the head's environment) must agree (NOTES.md).
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "RAY_worker_niceness": "0", "RAY_AUTH_MODE": "disabled"}
        self.log = open(Path(self.temp_dir) / "head.log", "w")
        self.proc = subprocess.Popen(
            ["ray", "start", "--head", "--block", f"--port={self.port}", f"--temp-dir={self.temp_dir}",
             f"--autoscaling-config={config_path}", "--include-dashboard=false", "--num-gpus=0",
             f"--num-cpus={HEAD_CPUS}",
             f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
             "--disable-usage-stats"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait_s)
                break
            except subprocess.TimeoutExpired:
                pass
        stop_leftovers(self.temp_dir)


def new_temp_dir() -> str:
    return tempfile.mkdtemp(prefix="rfc", dir="/tmp")  # short: Ray's socket paths have a length limit


def stop_leftovers(temp_dir: str) -> None:
    """Kills every process whose command line names `temp_dir` (all of this cluster's)."""
    for pid in _pids_naming(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _pids_naming(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _app_config(model: str, policy: str):
    from serving.config import (AppConfig, AutoscalingConfig, CacheConfig, LLMConfig, ModelConfig,
                                ParallelConfig, RouterConfig, SchedulerConfig, ServeOptions)

    # Small numbers so that 12 streams make a queue on one replica: 4 sequences run, 8 wait. Serve's
    # default policy gets the same delays and a target of the 4 sequences a replica runs at once.
    autoscaling = AutoscalingConfig(min_replicas=1, max_replicas=MAX_REPLICAS, policy=policy,
                                    target_num_seqs=4, target_num_waiting=2, panic_window_s=4,
                                    target_ongoing_requests=4, upscale_delay_s=2, downscale_delay_s=6,
                                    metrics_interval_s=0.5)
    llm = LLMConfig(model=ModelConfig(path=model, name="tiny"),
                    parallel=ParallelConfig(num_cpus_per_worker=NODE_CPUS, num_threads_per_worker=1),
                    scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, block_size=8,
                                              num_kv_blocks=256),
                    serve=ServeOptions(autoscaling=autoscaling, health_check_period_s=5))
    return AppConfig(models=(llm,), cache=CacheConfig(enabled=False), router=RouterConfig(num_cpus=0.25))


def _counts() -> tuple[int, int, int]:
    """(LLM replicas in any state, of them running, alive nodes)."""
    import ray
    from ray import serve

    app = serve.status().applications.get("llm")
    dep = app.deployments.get(DEPLOYMENT) if app else None
    states = {getattr(k, "value", k): v for k, v in dep.replica_states.items()} if dep else {}
    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    return sum(states.values()), states.get("RUNNING", 0), nodes


async def _scenario(base_url: str, timeline: list, deadline: float, load_s: Optional[float]) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=60)
    ok, failed, ttfts, stop = 0, [], [], asyncio.Event()
    t0 = time.monotonic()

    async def user(i: int):
        nonlocal ok
        while not stop.is_set():
            try:
                start = time.monotonic()
                stream = await client.completions.create(model="tiny", prompt=f"user {i}: the quick brown fox",
                                                         max_tokens=48, temperature=0, stream=True)
                first = None
                async for _ in stream:
                    first = first or time.monotonic()
                ttfts.append((first or time.monotonic()) - start)
                ok += 1
            except Exception as e:  # every failure is reported: the test requires none
                failed.append(repr(e)[:200])

    def sample(phase: str):
        replicas, running, nodes = _counts()
        row = {"t_s": round(time.monotonic() - t0, 1), "phase": phase, "replicas": replicas,
               "running": running, "nodes": nodes, "ok": ok, "failed": len(failed)}
        timeline.append(row)
        print(json.dumps(row), flush=True)
        return row

    users = [asyncio.create_task(user(i)) for i in range(12)]
    peak = {"running": 0, "nodes": 0}
    # Load on for load_s, or until a third replica serves on its own node, then a few seconds more.
    load_until = t0 + load_s if load_s else deadline - 60
    while time.monotonic() < min(load_until, deadline - 60):
        row = await asyncio.to_thread(sample, "load")
        peak = {k: max(peak[k], row[k]) for k in peak}
        if not load_s and row["running"] >= MAX_REPLICAS and row["nodes"] >= 1 + MAX_REPLICAS:
            await asyncio.sleep(6)
            break
        await asyncio.sleep(2)
    stop.set()
    await asyncio.gather(*users)
    # Idle: replicas go (downscale_delay_s each), then their nodes (idle_timeout_minutes).
    while time.monotonic() < deadline:
        row = await asyncio.to_thread(sample, "idle")
        if row["running"] == 1 and row["replicas"] == 1 and row["nodes"] == 2:
            break
        await asyncio.sleep(2)
    final = timeline[-1]
    ttfts.sort()
    return {"first_scale_up_s": next((r["t_s"] for r in timeline if r["replicas"] >= 2), None),
            "second_replica_serving_s": next((r["t_s"] for r in timeline if r["running"] >= 2), None),
            "ttft_p50_s": ttfts[len(ttfts) // 2] if ttfts else None,
            "ttft_p99_s": ttfts[int(0.99 * (len(ttfts) - 1))] if ttfts else None, "ok": ok, "failed": failed[:5], "num_failed": len(failed), "peak_running": peak["running"],
            "peak_nodes": peak["nodes"], "final_running": final["running"], "final_nodes": final["nodes"],
            "final_replicas": final["replicas"]}


def main(model: str, temp_dir: str, budget_s: float = 240.0, policy: str = "llm",
         load_s: Optional[float] = None) -> dict:
    os.environ["RAY_AUTH_MODE"] = "disabled"  # before Ray reads it; see FakeCluster
    import httpx
    import ray
    from ray import serve

    from deployments import build_app

    deadline = time.monotonic() + budget_s
    cluster = FakeCluster(temp_dir)
    try:
        for attempt in range(30):
            try:
                ray.init(address=cluster.address, log_to_driver=False)
                break
            except Exception:
                if attempt == 29:
                    raise
                time.sleep(1)
        port = _free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(_app_config(model, policy)), name="llm", route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{port}"
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        timeline: list = []
        result = asyncio.run(_scenario(base, timeline, deadline, load_s))
        result["timeline"] = timeline
        return result
    finally:
        try:
            serve.shutdown()
            ray.shutdown()
        finally:
            cluster.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m bench.fake_cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="tiny-model folder (default: made under the temp folder)")
    p.add_argument("--temp-dir", help="Ray's temp folder, short (default: a new /tmp/rfc*)")
    p.add_argument("--policy", choices=("llm", "ongoing_requests"), default="llm")
    p.add_argument("--load-s", type=float, help="seconds of load (default: until three replicas serve)")
    p.add_argument("--budget-s", type=float, default=240.0, help="the whole run, cluster start included")
    args = p.parse_args()
    model_dir = args.model
    if model_dir is None:
        from serving.models.tiny import make_tiny_model

        model_dir = make_tiny_model(Path(tempfile.gettempdir()) / "tiny-fake-cluster")
    out = main(model_dir, args.temp_dir or new_temp_dir(), args.budget_s, args.policy, args.load_s)
    print("RESULT " + json.dumps({k: v for k, v in out.items() if k != "timeline"}), flush=True)
