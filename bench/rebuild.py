"""`python -m bench.rebuild`: a rank (or the engine's process) killed mid-stream, and how long until
the model answers again.

The app (cache off, the embedded model by default, tensor_parallel_size 2) serves one long
stream; after its second event the chosen process gets SIGKILL, and `--num-requests` requests
are sent at once. The replica rebuilds its engine process and ranks in place (deployments/
llm_server.py, serving/async_engine.py) and holds those requests meanwhile. Printed: how the
stream ended, the held requests' status codes, and the seconds from the kill to the last answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from typing import Optional


async def _kill_and_wait(url: str, model: str, pid: int, num_requests: int) -> tuple[str, list[int], float]:
    import httpx

    body = {"model": model, "prompt": "The sea", "max_tokens": 400, "temperature": 0, "stream": True}
    small = {"model": model, "prompt": "The sea", "max_tokens": 4, "temperature": 0}
    events: list[str] = []
    async with httpx.AsyncClient(timeout=120) as client:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 2:
                        os.kill(pid, signal.SIGKILL)
                        killed = time.monotonic()
                        held = asyncio.gather(*(client.post(url + "/v1/completions", json=small)
                                                for _ in range(num_requests)))
        codes = [r.status_code for r in await held]
    errors = [json.loads(e)["error"] for e in events if e != "[DONE]" and '"error"' in e]
    ended = (f"an error event ({errors[0].get('code') or errors[0].get('type')}) after {len(events) - 2} more"
             if errors else f"[DONE] after {len(events)} events")
    return ended, codes, time.monotonic() - killed


def main(argv: Optional[list[str]] = None) -> int:
    from ray import serve

    from bench.harness import resolve_model, serving_cluster
    from deployments.builder import build_app
    from serving.config import AppConfig

    p = argparse.ArgumentParser(prog="python -m bench.rebuild", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model folder (default: the app's default model)")
    p.add_argument("--tensor-parallel-size", type=int, default=2)
    p.add_argument("--kill", choices=["rank", "engine"], default="rank", help="rank 1, or the engine's process (rank 0)")
    p.add_argument("--num-requests", type=int, default=8, help="requests sent right after the kill")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    model = resolve_model(args.model)
    with serving_cluster(num_cpus=8) as port:
        config = AppConfig.from_flat_args({"model": model, "model_name": "m", "cache": False, "num_replicas": 1,
                                           "tensor_parallel_size": args.tensor_parallel_size})
        serve.run(build_app(config), name="rebuild", route_prefix="/")
        handle = serve.get_deployment_handle("LLMServer:m", app_name="rebuild")
        url = f"http://127.0.0.1:{port}"
        print(f"# Rebuild in place: kill {args.kill}, {args.num_requests} requests sent right after\n\n"
              f"- model: {model}, tensor_parallel_size {args.tensor_parallel_size}\n\n"
              "| round | stream ended with | held requests | answered within (s) |\n|---|---|---|---|")
        for i in range(args.rounds):
            where = handle.placement.remote().result(timeout_s=60)["engine_process"]
            pid = where["rank_pids"][0] if args.kill == "rank" else where["pid"]
            ended, codes, secs = asyncio.run(_kill_and_wait(url, "m", pid, args.num_requests))
            ok = sum(c == 200 for c in codes)
            print(f"| {i + 1} | {ended} | {ok}/{len(codes)} answered 200 | {secs:.1f} |", flush=True)
        serve.delete("rebuild")
    return 0


if __name__ == "__main__":
    sys.exit(main())
