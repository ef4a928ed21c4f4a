"""`python -m bench.capacity`: what the serving path itself can carry.

The whole served stack (HTTP proxy -> router -> LLM server -> engine), with the model replaced by
the benchmark stand-in executor (`executor=instant`: every step returns a made-up token per
sequence at once; serving/executor.py). Whatever an accelerator makes the model cost, a served
token or request cannot cost less than this: the ceiling the serving path puts on any hardware.

Two closed-loop workloads at `--concurrency` streams, short prompts, streamed, cache off:

- **tokens**: `--max-tokens` output tokens per request: output tokens/s the path carries;
- **requests**: 2 output tokens per request: requests/s the path carries.

The stand-in's tokens are not text a model would write, and EOS never comes, so every request
runs to its max_tokens. The load client runs on the same machine and takes CPU from the server:
compare ratios from one machine, not absolute numbers across machines.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from typing import Optional

from bench import report, workload
from bench.harness import (INGRESS_HELP, INGRESSES, deploy, drive, resolve_model, serve_env, serving_cluster,
                           token_counter)

ITL_BAR_S = 0.100  # the bar holds at ITL p50 <= 100 ms


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model folder for the tokenizer and config (default: the app's default)")
    p.add_argument("--concurrency", type=int, default=64, help="concurrent streams")
    p.add_argument("--max-tokens", type=int, default=256, help="output tokens per request, tokens workload")
    p.add_argument("--num-token-requests", type=int, default=512, help="requests of the tokens workload")
    p.add_argument("--num-tiny-requests", type=int, default=1024, help="requests of the requests workload")
    p.add_argument("--prompt-tokens", type=int, default=24, help="prompt tokens per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ours-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="flat AppConfig argument (repeatable); executor=instant and cache=false are always set")
    p.add_argument("--ingress", choices=INGRESSES, default="haproxy", help=INGRESS_HELP)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the Ray cluster")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--client", choices=("raw", "httpx"), default="raw",
                   help="load client: bench.rawhttp (~0.2 ms CPU per request) or httpx (bench.client, ~1.5 ms)")
    p.add_argument("--verbose", action="store_true", help="show Ray worker logs")
    return p.parse_args(argv)


def workloads(args, count) -> list[tuple[str, list[workload.BenchRequest]]]:
    rng = random.Random(args.seed)

    def reqs(n: int, max_tokens: int) -> list[workload.BenchRequest]:
        return [workload.BenchRequest(workload.make_prompt(rng, args.prompt_tokens, count), max_tokens)
                for _ in range(n)]

    return [("tokens", reqs(args.num_token_requests, args.max_tokens)), ("requests", reqs(args.num_tiny_requests, 2))]


def main(argv: Optional[list[str]] = None) -> int:
    import asyncio

    from bench import cpu, rawhttp
    from bench.client import wait_ready

    args = parse_args(argv)
    model_path = resolve_model(args.model)
    count, _ = token_counter(model_path)
    named = workloads(args, count)
    drive_args = argparse.Namespace(
        ours_arg=[*args.ours_arg, "executor=instant", "cache=false"], mode="closed", warmup=4, no_stream=False,
        timeout=args.timeout, price_per_hour=0.0)
    meta: dict = {"notes": []}
    results = []
    with serving_cluster(args.num_cpus, args.ingress, args.verbose) as port:
        url = deploy("ours", drive_args, model_path, port, meta)
        model = asyncio.run(wait_ready(url, timeout_s=600))[0]
        for name, reqs in named:
            if args.client == "raw":
                asyncio.run(rawhttp.run_closed_loop("ours", url, model, reqs[:16], 4, args.timeout))  # warmup
                before = cpu.snapshot()
                run = asyncio.run(rawhttp.run_closed_loop("ours", url, model, reqs, args.concurrency, args.timeout))
            else:
                before = cpu.snapshot()
                run = drive("ours", url, [(args.concurrency, reqs)], drive_args, None)[0]
            results.append((name, run, cpu.delta(before, cpu.snapshot())))
    command = "python -m bench.capacity " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"\n# Serving capacity (stand-in executor)\n\n- command: {command}\n- date: {time.strftime('%Y-%m-%d %H:%M')}\n"
          f"- ours: {meta.get('ours_args')}\n- Serve settings: {serve_env()}\n"
          f"- {args.concurrency} streams, {args.prompt_tokens}-token prompts, client: {args.client}\n")
    print("| workload | ok/err | req/s | out tok/s | TTFT p50 (ms) | TTFT p95 (ms) | ITL p50 (ms) | ITL p95 (ms) "
          "| E2E p50 (ms) | E2E p95 (ms) | chunks/req |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, run, _ in results:
        row = report.summarize(run, 0.0)
        ok = [r for r in run.results if r.ok]
        chunks = sum(r.num_chunks for r in ok) / max(1, len(ok))
        ms = lambda k: report.fmt_value(row[k], 1e3, 1)  # noqa: E731
        print(f"| {name} | {row['num_ok']}/{row['num_errors']} | {row['request_throughput']:.1f} | "
              f"{row['output_tokens_per_s']:.0f} | {ms('ttft_p50_s')} | {ms('ttft_p95_s')} | {ms('itl_p50_s')} | "
              f"{ms('itl_p95_s')} | {ms('e2e_p50_s')} | {ms('e2e_p95_s')} | {chunks:.1f} |")
    for name, run, spent in results:
        ok = [r for r in run.results if r.ok]
        tokens = sum(r.output_tokens for r in ok)
        print(f"\nCPU during '{name}' ({run.duration_s:.1f} s, {len(ok)} requests, {tokens} tokens): "
              "ms of CPU per request by process")
        print("| process | CPU s | cores | ms/request |\n|---|---|---|---|")
        for label, secs in spent.items():
            print(f"| {label} | {secs:.2f} | {secs / run.duration_s:.2f} | {1e3 * secs / max(1, len(ok)):.2f} |")
    itl = report.summarize(results[0][1], 0.0)["itl_p50_s"] if results else None
    if itl is not None and itl > ITL_BAR_S:
        print(f"\nnote: ITL p50 {1e3 * itl:.0f} ms (tokens workload) is above {1e3 * ITL_BAR_S:.0f} ms: "
              "streams are chunkier than the bar allows")
    return 0 if results and all(any(r.ok for r in run.results) for _, run, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
