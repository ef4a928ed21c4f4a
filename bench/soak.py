"""`python -m bench.soak`: the served stack under steady load for `--minutes`, watching for leaks.

The whole stack (HAProxy or Serve's proxy -> router -> semantic cache -> LLM server -> engine
process) on the embedded default model, cache on with a small capacity (`--cache-capacity-mib`), so
that it is full and evicting before minute 1 and its growth after that is not new entries. First a short closed-loop ramp finds saturation
(the lowest concurrency reaching 90% of the best output tokens/s, `bench.report.knee`), unless
`--concurrency` is given; then closed-loop clients at 80% of it send fresh prompts (cache misses)
and, a `--repeat-fraction` of the time, a recent prompt again (a hit), for `--minutes`.

Every `--sample-s` it records the resident memory (RSS) of every process of the stack. At the end
it prints, per process, its median RSS over minute 2 (the first minute after start-up) and over the
last minute, and the growth between them (medians: one sample can land inside a batch's transient
peak), with the growth between the two single samples beside it; and per minute the requests,
errors and output tokens/s. It exits 1 if any request failed (a non-200 or an error event), any
process grew by `--growth-limit` % or more (medians), or a process of the stack went away or
appeared (a replica replaced) after minute 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from typing import Iterator, Optional, Sequence

from bench import cpu, rawhttp, report, workload
from bench.client import RequestResult, wait_ready
from bench.harness import (INGRESS_HELP, INGRESSES, deploy, floats, llm_stats, resolve_model, serve_env,
                           serving_cluster, token_counter)

# Labels (bench.cpu) of the stack's processes: Serve's controller and proxy, HAProxy, the replicas
# (router, cache partitions, LLM servers), engine processes, further ranks and draft workers.
STACK = ("ServeController", "ProxyActor", "haproxy", "ServeReplica:", "EngineProcess", "TPWorker", "DraftWorker")
BASELINE_S = 60.0  # growth is measured from the first sample at or after minute 1: start-up is over
WINDOW_S = 60.0  # ... as medians over that minute and over the last one
REPEAT_WINDOW = 100  # repeats come from the last fresh prompts, which a full cache still holds
SATURATED_GAIN = 1.10  # the ramp stops after two points in a row that add less than 10% to the best tokens/s
Samples = list[tuple[float, dict[int, tuple[str, int]]]]  # (seconds into the soak, pid -> (label, RSS bytes))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="length of the soak (the ramp comes before)")
    p.add_argument("--concurrency", type=int, help="closed-loop clients; default: 80%% of the ramp's saturation")
    p.add_argument("--ramp", default="1,2,4,8,16,32,64,128", help="concurrencies of the ramp, comma-separated")
    p.add_argument("--ramp-s", type=float, default=15.0, help="seconds per ramp point")
    p.add_argument("--prompt-tokens", type=int, default=48, help="tokens per fresh prompt")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request")
    p.add_argument("--repeat-fraction", type=float, default=0.2, help="share of requests repeating a prompt")
    p.add_argument("--sample-s", type=float, default=10.0, help="seconds between RSS samples")
    p.add_argument("--growth-limit", type=float, default=5.0, help="RSS growth (%%) from minute 1 that fails")
    p.add_argument("--cache-capacity-mib", type=float, default=8.0,
                   help="the cache's capacity: small, so it is full and evicting before minute 1")
    p.add_argument("--model", help="HF model folder (default: the app's default, the embedded target)")
    p.add_argument("--ours-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="flat AppConfig argument (repeatable); cache=true and the capacity are set first")
    p.add_argument("--ingress", choices=INGRESSES, default="haproxy", help=INGRESS_HELP)
    p.add_argument("--num-cpus", type=int, default=max(2, os.cpu_count() or 2), help="CPUs of the Ray cluster")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="show Ray worker logs")
    args = p.parse_args(argv)
    if args.minutes * 60 <= BASELINE_S + args.sample_s:
        p.error(f"--minutes must leave samples after minute 1 (more than {(BASELINE_S + args.sample_s) / 60:.2f})")
    if not 0 <= args.repeat_fraction < 1:
        p.error("--repeat-fraction must be in [0, 1)")
    return args


def prompts(seed: int, prompt_tokens: int, max_tokens: int, repeat_fraction: float,
            count=None) -> Iterator[workload.BenchRequest]:
    """Endless requests: a fresh prompt, or with probability `repeat_fraction` one of the last
    REPEAT_WINDOW fresh ones."""
    rng = random.Random(seed)
    sent: list[str] = []
    while True:
        if sent and rng.random() < repeat_fraction:
            prompt = rng.choice(sent[-REPEAT_WINDOW:])
        else:
            prompt = workload.make_prompt(rng, prompt_tokens, count)
            sent.append(prompt)
        yield workload.BenchRequest(prompt, max_tokens)


def stack_processes() -> dict[int, tuple[str, int]]:
    """The stack's processes of the cluster this process started (not another one on the machine)."""
    return {pid: v for pid, v in cpu.resident(os.getpid()).items() if v[0].startswith(STACK)}


async def sample_memory(samples: Samples, period_s: float, t0: float) -> None:
    while True:
        samples.append((time.perf_counter() - t0, stack_processes()))
        await asyncio.sleep(period_s)


def cache_stats(target: str) -> list[dict]:
    """`SemanticCache.stats()` of each cache partition of the target."""
    from ray import serve

    names = [d for d in serve.status().applications[target].deployments if d.startswith("SemanticCache")]
    return [serve.get_deployment_handle(n, app_name=target).stats.remote().result(timeout_s=30) for n in names]


def growth(samples: Samples, from_s: float = BASELINE_S, window_s: float = WINDOW_S) -> list[dict]:
    """Per process: its median RSS over the minute from `from_s` (start) and over the last
    `window_s` of the run (end), and the growth between them in %; also the growth between the two
    single samples (the first at or after `from_s`, the last), `point_growth_pct`. A median, because
    one sample may land inside a batch's transient peak (the cache's embedding forward: +/-50 MiB).
    A process counts from the first sample at or after `from_s` and to the last; None where it was
    not there (went away, or appeared)."""
    first = next((i for i, (t, _) in enumerate(samples) if t >= from_s), len(samples) - 1)
    base, last = samples[first][1], samples[-1][1]
    start_window = [procs for t, procs in samples[first:] if t < samples[first][0] + window_s]
    end_window = [procs for t, procs in samples if t > samples[-1][0] - window_s]

    def median(window: list, pid: int) -> int:
        return int(statistics.median(procs[pid][1] for procs in window if pid in procs))

    rows = []
    for pid in sorted(base.keys() | last.keys(), key=lambda p: ((base.get(p) or last.get(p))[0], p)):
        start = median(start_window, pid) if pid in base else None
        end = median(end_window, pid) if pid in last else None
        both = start and end is not None
        rows.append({"label": (base.get(pid) or last[pid])[0], "pid": pid, "start_bytes": start,
                     "end_bytes": end, "growth_pct": 100.0 * (end - start) / start if both else None,
                     "point_growth_pct": 100.0 * (last[pid][1] - base[pid][1]) / base[pid][1] if both else None})
    return rows


def per_minute(results: Sequence[RequestResult], duration_s: float) -> list[dict]:
    """Requests, errors and output tokens/s per whole minute of a run (a request counts where it
    ended; the requests that end after the last whole minute count in it, and so does that time)."""
    minutes = max(1, int(duration_s // 60))
    rows = [{"minute": m + 1, "requests": 0, "errors": 0, "tokens": 0} for m in range(minutes)]
    for r in results:
        end = r.sent_s + (r.e2e_s or 0.0)
        row = rows[min(int(end // 60), minutes - 1)]
        row["requests"] += 1
        row["errors"] += not r.ok
        row["tokens"] += r.output_tokens if r.ok else 0
    for row in rows:
        length = 60.0 if row["minute"] < minutes else duration_s - 60.0 * (minutes - 1)
        row["tokens_per_s"] = row.pop("tokens") / max(length, 1e-9)
    return rows


def verdict(memory: Sequence[dict], num_errors: int, limit_pct: float) -> list[str]:
    """Why the soak failed; empty when it passed."""
    reasons = [f"{num_errors} requests failed"] if num_errors else []
    for row in memory:
        name = f"{row['label']} (pid {row['pid']})"
        if row["growth_pct"] is None:
            reasons.append(f"{name} {'went away' if row['end_bytes'] is None else 'appeared'} after minute 1")
        elif row["growth_pct"] >= limit_pct:
            reasons.append(f"{name} grew {row['growth_pct']:.1f}% (limit {limit_pct:g}%)")
    return reasons


def ramp(url: str, model: str, requests, args) -> tuple[int, list[dict]]:
    """Closed-loop points of `--ramp` until tokens/s stops rising; (the saturation concurrency, rows).
    Two flat points, not one: on a shared machine one point can lose to noise."""
    rows: list[dict] = []
    num_flat = 0
    for c in (int(x) for x in floats(args.ramp, None, "--ramp")):
        run = asyncio.run(rawhttp.run_closed_loop("ours", url, model, requests, c, args.timeout,
                                                  duration_s=args.ramp_s))
        rows.append(report.summarize(run, 0.0))
        print(f"ramp: concurrency {c}: {rows[-1]['output_tokens_per_s']:.1f} out tok/s, "
              f"{rows[-1]['num_errors']} errors", flush=True)
        best = max((r["output_tokens_per_s"] for r in rows[:-1]), default=0.0)
        num_flat = num_flat + 1 if rows[-1]["output_tokens_per_s"] < SATURATED_GAIN * best else 0
        if num_flat == 2:
            break
    return int(report.knee(rows)["load"]), rows


async def soak(url: str, model: str, requests, concurrency: int, args) -> tuple:
    samples: Samples = []
    t0 = time.perf_counter()
    sampler = asyncio.create_task(sample_memory(samples, args.sample_s, t0))
    try:
        run = await rawhttp.run_closed_loop("ours", url, model, requests, concurrency, args.timeout,
                                            duration_s=60.0 * args.minutes)
    finally:
        sampler.cancel()
    samples.append((time.perf_counter() - t0, stack_processes()))
    return run, samples


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    model_path = resolve_model(args.model)
    count, _ = token_counter(model_path)
    requests = prompts(args.seed, args.prompt_tokens, args.max_tokens, args.repeat_fraction, count)
    capacity = f"cache_capacity_bytes={int(args.cache_capacity_mib * 2**20)}"
    deploy_args = argparse.Namespace(ours_arg=["cache=true", capacity, *args.ours_arg])
    meta: dict = {}
    started = time.strftime("%Y-%m-%d %H:%M")
    with serving_cluster(args.num_cpus, args.ingress, args.verbose) as port:
        url = deploy("ours", deploy_args, model_path, port, meta)
        model = asyncio.run(wait_ready(url, timeout_s=600))[0]
        asyncio.run(rawhttp.run_closed_loop("ours", url, model, [next(requests) for _ in range(4)], 1, args.timeout))
        ramp_rows = []
        concurrency = args.concurrency
        if concurrency is None:
            saturation, ramp_rows = ramp(url, model, requests, args)
            concurrency = max(1, round(0.8 * saturation))
        print(f"soak: {concurrency} clients for {args.minutes:g} min ...", flush=True)
        before = llm_stats("ours")["num_requests"]
        run, samples = asyncio.run(soak(url, model, requests, concurrency, args))
        num_hits = len(run.results) - (llm_stats("ours")["num_requests"] - before)  # NOTE: never reached the model
        caches = cache_stats("ours")
    memory = growth(samples)
    minutes = per_minute(run.results, run.duration_s)
    num_errors = sum(not r.ok for r in run.results)
    command = "python -m bench.soak " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"\n# Soak\n\n- command: {command}\n- date: {started}\n- model: {model_path}\n- ours: {meta['ours_args']}\n"
          f"- ingress: {args.ingress}, Serve settings: {serve_env()}\n"
          f"- {concurrency} closed-loop clients, {args.prompt_tokens}-token prompts, max_tokens {args.max_tokens}, "
          f"{100 * args.repeat_fraction:.0f}% repeats; RSS every {args.sample_s:g} s ({len(samples)} samples)")
    if ramp_rows:
        print("- ramp (out tok/s): " + ", ".join(f"{r['load']:g}: {r['output_tokens_per_s']:.1f}" for r in ramp_rows))
    print(f"- requests sent {len(run.results)}, cache hits {num_hits}, errors {num_errors}"
          + (f" (first: {next(r.error for r in run.results if not r.ok)})" if num_errors else ""))
    for c in caches:
        print(f"- cache partition {c['cache_partition']} at the end: {c['cache_entries']} entries, "
              f"{c['cache_bytes'] / 2**20:.1f} of {c['cache_capacity_bytes'] / 2**20:.1f} MiB, "
              f"{c['cache_evictions_total']} evictions")
    print("\n| process | pid | RSS minute 2, median (MiB) | RSS last minute, median (MiB) | growth (medians) "
          "| growth (two samples) |\n|---|---|---|---|---|---|")
    mib = lambda b: "—" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    for row in memory:
        pct, point = ("—" if row[k] is None else f"{row[k]:+.2f}%" for k in ("growth_pct", "point_growth_pct"))
        print(f"| {row['label']} | {row['pid']} | {mib(row['start_bytes'])} | {mib(row['end_bytes'])} | {pct} "
              f"| {point} |")
    print("\n| minute | requests | errors | out tok/s |\n|---|---|---|---|")
    for row in minutes:
        print(f"| {row['minute']} | {row['requests']} | {row['errors']} | {row['tokens_per_s']:.1f} |")
    reasons = verdict(memory, num_errors, args.growth_limit)
    print("\nresult: " + ("FAIL: " + "; ".join(reasons) if reasons else "pass"))
    return 1 if reasons else 0


if __name__ == "__main__":
    sys.exit(main())
