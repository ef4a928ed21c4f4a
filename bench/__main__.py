"""`python -m bench`: run one workload against our server and the static-batching baseline.

Without `--url` it starts its own Ray cluster, deploys each target in turn (ours through
`deployments.builder.build_app`, the baseline from `bench.baseline`) on a free HTTP port, drives the
identical workload at every load point, and writes results.md, results.json and a PNG under
bench/results/. See docs/benchmark.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from tqdm.auto import tqdm

from bench import client, report, workload

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BASELINE_NOTE = ("baseline: static batching (HF generate under @serve.batch); it streams its whole answer as one "
                 "chunk after its batch finished, so its TTFT equals its E2E latency and its ITL is n/a")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model folder (default: serving.models.EMBEDDED_TARGET, else a tiny model)")
    p.add_argument("--mode", choices=("open", "closed"), default="open", help="open loop (rates) or closed loop (concurrency)")
    p.add_argument("--rates", help="open loop: request rates per second, comma-separated (default 0.5,1,2,4)")
    p.add_argument("--concurrency", default="1,4,16", help="closed loop: concurrencies, comma-separated")
    p.add_argument("--num-requests", type=int, default=100, help="requests per load point")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace", help="JSONL trace (arrival_s, prompt, max_tokens) instead of the synthetic workload")
    p.add_argument("--prompt-len", default="128,16,512", help="synthetic prompt tokens: median,min,max (lognormal)")
    p.add_argument("--prompt-sigma", type=float, default=0.6, help="lognormal sigma of the prompt length")
    p.add_argument("--output-len", default="16,128", help="synthetic max_tokens: min,max (uniform)")
    p.add_argument("--output-lognormal", metavar="MEDIAN,SIGMA",
                   help="synthetic max_tokens lognormal (clipped to --output-len) instead of uniform: "
                        "a heavy tail like chat answers, e.g. 48,1.0")
    p.add_argument("--targets", default="ours,baseline", help="what to deploy and drive: ours, baseline")
    p.add_argument("--url", help="drive running servers instead: URL or name=URL, comma-separated")
    p.add_argument("--price-per-hour", type=float, default=1.0, help="machine price (USD/h) for $/M output tokens")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests per target before its runs")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--no-stream", action="store_true", help="non-streaming requests (TTFT = E2E)")
    p.add_argument("--extra-body", help="JSON object merged into every request body")
    p.add_argument("--ours-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="flat AppConfig argument for ours (repeatable); the semantic cache is off unless cache=true")
    p.add_argument("--baseline-batch-size", type=int, default=32, help="baseline @serve.batch max_batch_size")
    p.add_argument("--baseline-threads", type=int, default=0,
                   help="baseline torch threads (0: what Ray gives its 1-CPU replica, i.e. 1)")
    p.add_argument("--baseline-wait-s", type=float, default=0.05, help="baseline @serve.batch batch_wait_timeout_s")
    p.add_argument("--proxy-transport", choices=("grpc", "ray"), default="grpc",
                   help="how Serve's HTTP proxy reaches the ingress replicas of both targets: gRPC "
                        "(RAY_SERVE_PROXY_USE_GRPC=1, the default here) or Ray actor calls")
    p.add_argument("--num-cpus", type=int, default=max(2, os.cpu_count() or 2), help="CPUs of the Ray cluster")
    p.add_argument("--out", help="results folder (default bench/results/<time>-<mode>)")
    p.add_argument("--verbose", action="store_true", help="show Ray worker logs")
    args = p.parse_args(argv)
    if args.mode == "closed" and args.rates:
        p.error("--rates is for --mode open; use --concurrency")
    return args


def _floats(text: str, n: Optional[int] = None, name: str = "") -> list[float]:
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
    med, lo, hi = (int(x) for x in _floats(args.prompt_len, 3, "--prompt-len"))
    omin, omax = (int(x) for x in _floats(args.output_len, 2, "--output-len"))
    lognormal = {}
    if args.output_lognormal:
        median, sigma = _floats(args.output_lognormal, 2, "--output-lognormal")
        lognormal = {"output_median": int(median), "output_sigma": sigma}
    try:
        dist = workload.LengthDist(med, args.prompt_sigma, lo, hi, omin, omax, **lognormal)
    except ValueError as e:
        raise SystemExit(f"workload: {e}") from None
    if max_len:
        dist = dist.fit_context(max_len - 8)  # NOTE: a little room for BOS and template tokens
    reqs = workload.synthetic_workload(args.num_requests, args.seed, dist, count)
    return reqs, {"synthetic": vars(dist), "tokenizer_calibrated": count is not None, **workload.describe(reqs)}


def load_points(args, reqs) -> list[tuple[float, list[workload.BenchRequest]]]:
    """(load, requests with arrival offsets) per point of the sweep."""
    if args.mode == "closed":
        return [(c, reqs) for c in (int(x) for x in _floats(args.concurrency, None, "--concurrency"))]
    if args.trace and not args.rates:
        return [(round(workload.mean_rate(reqs) or 0.0, 3), reqs)]  # replay the recorded offsets
    points = []
    for rate in _floats(args.rates or "0.5,1,2,4", None, "--rates"):
        offsets = (workload.scale_arrivals([r.arrival_s for r in reqs], rate) if args.trace
                   else workload.poisson_arrivals(len(reqs), rate, args.seed))
        points.append((rate, workload.with_arrivals(reqs, offsets)))
    return points


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deploy(target: str, args, model_path: str, port: int, meta: dict) -> str:
    """Deploy one target on the running Serve instance; return its base URL."""
    from ray import serve

    if target == "ours":
        from deployments.builder import build_app
        from serving.config import AppConfig

        flat = {"model": model_path, "cache": False}
        flat.update(kv.split("=", 1) for kv in args.ours_arg)
        meta["ours_args"] = flat
        serve.run(build_app(AppConfig.from_flat_args(flat)), name="ours", route_prefix="/")
        return f"http://127.0.0.1:{port}"
    from bench.baseline import build_baseline_app

    meta["baseline"] = {"max_batch_size": args.baseline_batch_size, "batch_wait_timeout_s": args.baseline_wait_s,
                        "threads": args.baseline_threads or "default"}
    serve.run(build_baseline_app(model_path, max_batch_size=args.baseline_batch_size,
                                 batch_wait_timeout_s=args.baseline_wait_s, num_threads=args.baseline_threads),
              name="baseline", route_prefix="/baseline")
    return f"http://127.0.0.1:{port}/baseline"


@contextlib.contextmanager
def serving_cluster(num_cpus: int, proxy_transport: str = "grpc", verbose: bool = False):
    """A Ray cluster of `num_cpus` with Serve on a free port of 127.0.0.1; yields the port.

    The process environment goes to every Ray process (RAY_SERVE_* settings such as
    RAY_SERVE_ENABLE_HA_PROXY=1 take effect this way)."""
    import ray
    from ray import serve

    port = _free_port()
    root = str(Path(__file__).resolve().parent.parent)
    # NOTE: read by the proxy process when it starts, which inherits this environment via ray.init
    os.environ["RAY_SERVE_PROXY_USE_GRPC"] = "1" if proxy_transport == "grpc" else "0"
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=verbose,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def deploy_and_drive(args, model_path: str, points, extra_body, meta: dict) -> list[client.RunResult]:
    """Start a Ray cluster and Serve on a free port; deploy, drive and delete each target in turn."""
    from ray import serve

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(targets) - {"ours", "baseline"}
    if unknown:
        raise SystemExit(f"--targets: unknown {sorted(unknown)} (known: ours, baseline)")
    meta["proxy_transport"] = args.proxy_transport
    meta["serve_env"] = serve_env()
    runs: list[client.RunResult] = []
    with serving_cluster(args.num_cpus, args.proxy_transport, args.verbose) as port:
        for target in targets:
            tqdm.write(f"deploying {target} (model {model_path}) ...")
            t = time.perf_counter()
            try:
                url = _deploy(target, args, model_path, port, meta)
            except Exception as e:  # NOTE: one target failing to deploy must not lose the other's rows
                tqdm.write(f"{target}: deployment failed: {type(e).__name__}: {e}")
                meta["notes"].append(f"{target} was not measured: deployment failed ({type(e).__name__}: {e})")
                with contextlib.suppress(Exception):
                    serve.delete(target)
                continue
            tqdm.write(f"{target} deployed in {time.perf_counter() - t:.0f}s at {url}")
            runs += drive(target, url, points, args, extra_body)
            serve.delete(target)  # NOTE: one target at a time, so the two never share the CPUs
    return runs


def serve_env() -> dict[str, str]:
    """The RAY_SERVE_* settings of this process (and so of the cluster it starts)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_SERVE_")}


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    extra_body = json.loads(args.extra_body) if args.extra_body else None
    model_path = args.model if args.url else resolve_model(args.model)
    count, max_len = token_counter(model_path)
    reqs, shape = build_workload(args, count, max_len)
    points = load_points(args, reqs)
    command = "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command,
            "model": model_path, "mode": args.mode, "loads": [p[0] for p in points], "seed": args.seed,
            "workload": shape, "price_per_hour": args.price_per_hour, "stream": not args.no_stream,
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs", "notes": []}
    if args.mode == "closed" and len(reqs) < 4 * max(p[0] for p in points):
        meta["notes"].append(f"closed loop with {len(reqs)} requests: at concurrency {max(p[0] for p in points):g} "
                             "a run is mostly one burst; use --num-requests >= 4x the concurrency for steady state")
    if args.url:
        servers = [(s.split("=", 1) if "=" in s.split("//")[0] else (f"server{i or ''}", s))
                   for i, s in enumerate(x.strip() for x in args.url.split(",") if x.strip())]
        meta["urls"] = dict(servers)
        runs = [run for name, url in servers for run in drive(name, url, points, args, extra_body)]
    else:
        runs = deploy_and_drive(args, model_path, points, extra_body, meta)
    if any(r.target == "baseline" for r in runs):
        meta["notes"].append(BASELINE_NOTE)
    meta["notes"].append("ITL is pooled over all gaps between non-empty chunks; output tokens come from usage "
                         "(the server may stop at EOS before max_tokens)")
    rows = [report.summarize(run, args.price_per_hour) for run in runs]
    out = Path(args.out) if args.out else RESULTS_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.mode}"
    paths = report.save_results(out, rows, meta, runs)
    print()
    print(report.render_markdown(rows, {k: meta[k] for k in ("model", "mode", "price_per_hour", "notes")}))
    print("saved: " + ", ".join(str(p) for p in paths.values()))
    return 0 if rows and all(r["num_ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
