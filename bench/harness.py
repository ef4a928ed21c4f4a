"""What every benchmark shares: the model to use, the workload, a Ray cluster with Serve and the
chosen ingress, deploying a target, driving it with the httpx client.

`python -m bench` (bench/__main__.py), `bench.capacity`, `bench.latency`, `bench.engine` and
`bench.overhead` import from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Callable, Optional

from tqdm.auto import tqdm

from bench import client, report, workload

RESULTS_DIR = Path(__file__).resolve().parent / "results"
INGRESSES = ("haproxy", "proxy-grpc", "proxy-ray")
INGRESS_HELP = ("how HTTP reaches the router: haproxy (RAY_SERVE_ENABLE_HA_PROXY=1: HAProxy forwards to the "
                "router replicas' own HTTP servers, no Python proxy), proxy-grpc (Serve's Python proxy over "
                "gRPC, RAY_SERVE_PROXY_USE_GRPC=1) or proxy-ray (the proxy over Ray actor calls)")
def floats(text: str, n: Optional[int] = None, name: str = "") -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{name}: expected comma-separated numbers, got {text!r}") from None
    if not values or (n is not None and len(values) != n) or any(v <= 0 for v in values):
        raise SystemExit(f"{name}: expected {n or 'some'} positive numbers, got {text!r}")
    return values


def resolve_model(path: Optional[str]) -> str:
    """--model, else the app's own default (the embedded target if shipped, else the tiny random model)."""
    if path:
        return str(Path(path).resolve())
    try:
        from serving.models import default_model_path
    except ImportError:
        raise SystemExit("no --model given and serving.models.default_model_path is not available") from None
    return str(default_model_path())


def token_counter(model_path: Optional[str]) -> tuple[Optional[Callable[[str], int]], Optional[int]]:
    """(count tokens with the model's tokenizer, its context length), or (None, None) without a folder."""
    if not model_path or not Path(model_path, "config.json").exists():
        return None, None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    cfg = json.loads(Path(model_path, "config.json").read_text())
    return (lambda s: len(tok(s, add_special_tokens=False)["input_ids"])), cfg.get("max_position_embeddings")


def build_workload(args, count, max_len) -> tuple[list[workload.BenchRequest], dict]:
    if args.trace:
        reqs = workload.load_trace(args.trace)
        return reqs, {"trace": args.trace, **workload.describe(reqs), "trace_rate": workload.mean_rate(reqs)}
    med, lo, hi = (int(x) for x in floats(args.prompt_len, 3, "--prompt-len"))
    omin, omax = (int(x) for x in floats(args.output_len, 2, "--output-len"))
    lognormal = {}
    if args.output_lognormal:
        median, sigma = floats(args.output_lognormal, 2, "--output-lognormal")
        lognormal = {"output_median": int(median), "output_sigma": sigma}
    try:
        dist = workload.LengthDist(med, args.prompt_sigma, lo, hi, omin, omax, **lognormal)
    except ValueError as e:
        raise SystemExit(f"workload: {e}") from None
    if max_len:
        dist = dist.fit_context(max_len - 8)  # NOTE: a little room for BOS and template tokens
    reqs = workload.synthetic_workload(args.num_requests, args.seed, dist, count)
    return reqs, {"synthetic": vars(dist), "tokenizer_calibrated": count is not None, **workload.describe(reqs)}


def drive(name: str, url: str, points, args, extra_body) -> list[client.RunResult]:
    """Warm up, then run every load point against one server."""
    models = asyncio.run(client.wait_ready(url, timeout_s=600))
    model = models[0] if models else "default"
    if args.warmup:
        short = [workload.BenchRequest(r.prompt, min(r.max_tokens, 8)) for r in points[0][1][: args.warmup]]
        warm = asyncio.run(client.warmup(url, model, short, not args.no_stream, extra_body))
        bad = [w.error for w in warm if not w.ok]
        if bad:
            tqdm.write(f"{name}: warmup failed: {bad[0]}")
    runs = []
    for load, reqs in points:
        run_fn = client.run_closed_loop if args.mode == "closed" else client.run_open_loop
        load_arg = int(load) if args.mode == "closed" else load
        run = asyncio.run(run_fn(name, url, model, reqs, load_arg, stream=not args.no_stream,
                                 timeout_s=args.timeout, extra_body=extra_body))
        row = report.summarize(run, args.price_per_hour)
        tqdm.write(f"{name} load={load:g}: {row['num_ok']} ok, {row['num_errors']} failed, "
                   f"{row['output_tokens_per_s']:.1f} out tok/s, p95 TTFT {report.fmt_value(row['ttft_p95_s'])} s"
                   + (f" (first error: {row['first_error']})" if row["first_error"] else ""))
        runs.append(run)
    return runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(target: str, args, model_path: str, port: int, meta: dict) -> str:
    """Deploy one target on the running Serve instance; return its base URL."""
    from ray import serve

    variants = getattr(args, "variants", {})
    if target == "ours" or target in variants:
        from deployments.builder import build_app
        from serving.config import AppConfig

        flat = {"model": model_path, "cache": False}
        flat.update(kv.split("=", 1) for kv in [*args.ours_arg, *variants.get(target, [])])
        meta.setdefault("ours_args", {})[target] = flat
        serve.run(build_app(AppConfig.from_flat_args(flat)), name=target, route_prefix="/")
        return f"http://127.0.0.1:{port}"
    from bench.baseline import build_baseline_app

    meta["baseline"] = {"max_batch_size": args.baseline_batch_size, "batch_wait_timeout_s": args.baseline_wait_s,
                        "threads": args.baseline_threads or "default"}
    serve.run(build_baseline_app(model_path, max_batch_size=args.baseline_batch_size,
                                 batch_wait_timeout_s=args.baseline_wait_s, num_threads=args.baseline_threads),
              name="baseline", route_prefix="/baseline")
    return f"http://127.0.0.1:{port}/baseline"


def llm_stats(target: str) -> dict:
    """`LLMServer.stats()` of the target's (first) LLM replica."""
    from ray import serve

    status = serve.status().applications[target].deployments
    name = next(d for d in status if d.startswith("LLMServer"))
    return serve.get_deployment_handle(name, app_name=target).stats.remote().result(timeout_s=30)


@contextlib.contextmanager
def serving_cluster(num_cpus: int, ingress: str = "haproxy", verbose: bool = False):
    """A Ray cluster of `num_cpus` with Serve on a free port of 127.0.0.1; yields the port.

    `ingress` (INGRESSES) is set through the environment, which every Ray process inherits from
    ray.init: the proxy or HAProxy reads it when it starts."""
    import ray
    from ray import serve

    port = free_port()
    root = str(Path(__file__).resolve().parent.parent)
    if ingress not in INGRESSES:
        raise ValueError(f"ingress must be one of {INGRESSES}")
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if ingress == "haproxy" else "0"
    os.environ["RAY_SERVE_PROXY_USE_GRPC"] = "1" if ingress == "proxy-grpc" else "0"
    # one event loop per replica, as docs/configuration.md recommends ("Serving fast")
    os.environ.setdefault("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "0")
    os.environ.setdefault("RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP", "0")
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=verbose,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def serve_env() -> dict[str, str]:
    """The RAY_SERVE_* settings of this process (and so of the cluster it starts)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_SERVE_")}
