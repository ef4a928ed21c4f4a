"""`python -m bench`: run one workload against our server and the static-batching baseline.

Without `--url` it starts its own Ray cluster, deploys each target in turn (ours through
`deployments.builder.build_app`, the baseline from `bench.baseline`) on a free HTTP port, drives the
identical workload at every load point, and writes results.md, results.json and a PNG under
bench/results/. See docs/benchmark.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from bench import client, report, workload
from bench.harness import (INGRESS_HELP, INGRESSES, RESULTS_DIR, build_workload, deploy, drive, floats,
                           llm_stats, resolve_model, serve_env, serving_cluster, token_counter)

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
    p.add_argument("--targets", default="ours,baseline",
                   help="what to deploy and drive: ours, baseline, or names given with --variant")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="another configuration of ours, deployed as target NAME: ours plus these flat arguments, "
                        "e.g. ngram:speculative_method=ngram (repeatable)")
    p.add_argument("--reference", help="the target the ratios divide by (default: baseline if driven, else the first)")
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
    p.add_argument("--ingress", choices=INGRESSES, default="haproxy", help=INGRESS_HELP)
    p.add_argument("--num-cpus", type=int, default=max(2, os.cpu_count() or 2), help="CPUs of the Ray cluster")
    p.add_argument("--out", help="results folder (default bench/results/<time>-<mode>)")
    p.add_argument("--verbose", action="store_true", help="show Ray worker logs")
    args = p.parse_args(argv)
    if args.mode == "closed" and args.rates:
        p.error("--rates is for --mode open; use --concurrency")
    args.variants = {}
    for v in args.variant:
        name, _, flat = v.partition(":")
        if not name or name in ("ours", "baseline") or "=" not in flat:
            p.error(f"--variant {v!r}: expected NAME:KEY=VALUE[,KEY=VALUE], NAME not ours or baseline")
        args.variants[name] = [kv.strip() for kv in flat.split(",") if kv.strip()]
    return args


def speculation_stats(target: str) -> dict:
    """Per proposer of the target's (first) LLM replica: proposed, accepted, verified rows and the mean
    tokens per verifying step; {} without speculation."""
    out = {}
    for key, c in llm_stats(target).items():
        if key.startswith("spec_") and c["verified_rows"]:
            out[key[5:]] = {**c, "acceptance": c["accepted"] / max(c["proposed"], 1),
                            "tokens_per_verifying_step": (c["accepted"] + c["verified_rows"]) / c["verified_rows"]}
    return out


def load_points(args, reqs) -> list[tuple[float, list[workload.BenchRequest]]]:
    """(load, requests with arrival offsets) per point of the sweep."""
    if args.mode == "closed":
        return [(c, reqs) for c in (int(x) for x in floats(args.concurrency, None, "--concurrency"))]
    if args.trace and not args.rates:
        return [(round(workload.mean_rate(reqs) or 0.0, 3), reqs)]  # replay the recorded offsets
    points = []
    for rate in floats(args.rates or "0.5,1,2,4", None, "--rates"):
        offsets = (workload.scale_arrivals([r.arrival_s for r in reqs], rate) if args.trace
                   else workload.poisson_arrivals(len(reqs), rate, args.seed))
        points.append((rate, workload.with_arrivals(reqs, offsets)))
    return points


def deploy_and_drive(args, model_path: str, points, extra_body, meta: dict) -> list[client.RunResult]:
    """Start a Ray cluster and Serve on a free port; deploy, drive and delete each target in turn."""
    from ray import serve

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(targets) - {"ours", "baseline", *args.variants}
    if unknown:
        raise SystemExit(f"--targets: unknown {sorted(unknown)} (known: ours, baseline, {', '.join(args.variants)})")
    meta["ingress"] = args.ingress
    meta["serve_env"] = serve_env()
    runs: list[client.RunResult] = []
    with serving_cluster(args.num_cpus, args.ingress, args.verbose) as port:
        for target in targets:
            tqdm.write(f"deploying {target} (model {model_path}) ...")
            t = time.perf_counter()
            try:
                url = deploy(target, args, model_path, port, meta)
            except Exception as e:  # NOTE: one target failing to deploy must not lose the other's rows
                tqdm.write(f"{target}: deployment failed: {type(e).__name__}: {e}")
                meta["notes"].append(f"{target} was not measured: deployment failed ({type(e).__name__}: {e})")
                with contextlib.suppress(Exception):
                    serve.delete(target)
                continue
            tqdm.write(f"{target} deployed in {time.perf_counter() - t:.0f}s at {url}")
            runs += drive(target, url, points, args, extra_body)
            if target != "baseline":
                meta.setdefault("speculation", {})[target] = speculation_stats(target)
            serve.delete(target)  # NOTE: one target at a time, so the two never share the CPUs
    return runs


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
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    reference = args.reference or ("baseline" if "baseline" in targets else targets[0])
    out = Path(args.out) if args.out else RESULTS_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.mode}"
    paths = report.save_results(out, rows, meta, runs)
    print()
    print(report.render_markdown(rows, {k: meta[k] for k in ("model", "mode", "price_per_hour", "notes")}, reference))
    for target, per_proposer in meta.get("speculation", {}).items():
        for name, c in per_proposer.items():
            print(f"speculation {target}/{name}: acceptance {c['acceptance']:.2f}, "
                  f"{c['tokens_per_verifying_step']:.2f} tokens per verifying step "
                  f"({c['accepted']}/{c['proposed']} proposals, {c['verified_rows']} rows)")
    print("saved: " + ", ".join(str(p) for p in paths.values()))
    return 0 if rows and all(r["num_ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
