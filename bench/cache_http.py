"""End-to-end latency of semantic-cache hits over HTTP, against misses, on the whole app.

    python -m bench.cache_http [--repeats 200] [--model DIR] [--url URL]
    python -m bench.cache_http --throughput [--concurrency 64] [--requests 128] [--max-tokens 32] [--rounds 2]

Deploys the app (router -> cache -> LLM server) in its own Ray cluster (or drives `--url`), answers
each seed prompt once (a miss, which stores the answer), then times, one request at a time:
exact repeats (same text, other case and spacing), paraphrase hits (the same paraphrase again, and
one the cache has never seen, which pays its embedding), and misses (`cache.skip`), reporting
p50/p95 per kind and how many were served from the cache.

`--throughput` deploys the app twice in one cluster, cache off and cache on, and drives each in
turn (alternating, `--rounds` times) with `--concurrency` closed-loop streams of prompts that are
all new (every lookup embeds, searches and misses; every answer is inserted): the output tokens/s
with the cache on over those with it off.
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx

SEEDS = [
    ("What is the capital of France?", "Tell me the capital of France."),
    ("How do I reverse a list in Python?", "How can I reverse a Python list?"),
    ("Who wrote the book of Genesis?", "Who is the author of the book of Genesis?"),
    ("What does the word mercy mean?", "What is the meaning of the word mercy?"),
]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def ask(client: httpx.Client, url: str, model: str, text: str, **extra) -> tuple[float, bool]:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 32,
            "temperature": 0, **extra}
    t0 = time.perf_counter()
    r = client.post(url + "/v1/chat/completions", json=body)
    dt = time.perf_counter() - t0
    r.raise_for_status()
    return dt, r.json()["cached"]


def run(url: str, model: str, repeats: int) -> dict:
    with httpx.Client(timeout=120) as client:
        for seed, _ in SEEDS:
            ask(client, url, model, seed)
        deadline = time.monotonic() + 30  # inserts happen off the response path
        while not all(ask(client, url, model, s)[1] for s, _ in SEEDS) and time.monotonic() < deadline:
            time.sleep(0.2)
        kinds = {"exact repeat": [], "paraphrase": [], "paraphrase, first sight": [], "miss (cache.skip)": []}
        hits = {k: 0 for k in kinds}
        for i in range(repeats):
            seed, para = SEEDS[i % len(SEEDS)]
            # NOTE: a text the cache has not seen (trailing spaces make it new to the embedder's memo
            # and the verifier's cache) pays a whole embedding; a repeated paraphrase finds it memoised.
            for kind, text, extra in (("exact repeat", "  " + seed.upper() + " ", {}),
                                      ("paraphrase", para, {}),
                                      ("paraphrase, first sight", para + " " * (i + 1), {}),
                                      ("miss (cache.skip)", seed, {"cache": {"skip": True, "no_store": True}})):
                if kind.startswith("miss") and i % 10:
                    continue  # misses run the model: sample them less often
                dt, cached = ask(client, url, model, text, **extra)
                kinds[kind].append(dt)
                hits[kind] += cached
    return {k: {"n": len(v), "cached": hits[k], "p50_ms": 1e3 * statistics.median(v),
                "p95_ms": 1e3 * percentile(v, 95)} for k, v in kinds.items()}


def throughput(port: int, model_path, args) -> dict:
    """Output tokens/s with the cache on and off (fresh prompts), and their ratio."""
    import asyncio
    import random

    from ray import serve

    from bench import rawhttp, workload
    from bench.client import wait_ready
    from deployments import build_app
    from serving.config import AppConfig, CacheConfig, LLMConfig, ModelConfig

    base = f"http://127.0.0.1:{port}"
    for name, enabled in (("off", False), ("on", True)):
        config = AppConfig(name=f"cache-{name}", cache=CacheConfig(enabled=enabled),
                           models=(LLMConfig(model=ModelConfig(path=model_path, name="embedded")),))
        serve.run(build_app(config), name=f"cache-{name}", route_prefix=f"/{name}")
        asyncio.run(wait_ready(f"{base}/{name}", timeout_s=600))
    rng = random.Random(0)
    rates: dict[str, list[float]] = {"off": [], "on": []}
    for r in range(args.rounds + 1):  # round 0 warms both apps up and is not counted
        for name in (("off", "on") if r % 2 else ("on", "off")):
            reqs = [workload.BenchRequest(workload.make_prompt(rng, 24), args.max_tokens)
                    for _ in range(args.requests if r else 16)]
            run = asyncio.run(rawhttp.run_closed_loop(name, f"{base}/{name}", "embedded", reqs,
                                                      args.concurrency, 300.0))
            ok = [x for x in run.results if x.ok]
            if r:
                rates[name].append(sum(x.output_tokens for x in ok) / run.duration_s)
            print(f"round {r} cache {name}: {len(ok)}/{len(reqs)} ok, "
                  f"{sum(x.output_tokens for x in ok) / run.duration_s:.1f} output tokens/s")
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    return {"on_tokens_per_s": on, "off_tokens_per_s": off, "ratio": on / off}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.cache_http", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--model", help="HF model folder (default: the embedded model)")
    ap.add_argument("--url", help="drive a running app instead of deploying one")
    ap.add_argument("--throughput", action="store_true", help="cache on vs off at --concurrency, fresh prompts")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--requests", type=int, default=128, help="requests per throughput run")
    ap.add_argument("--max-tokens", type=int, default=32, help="output tokens per throughput request")
    ap.add_argument("--rounds", type=int, default=2, help="measured throughput runs per side")
    args = ap.parse_args()
    model_name = "embedded"
    if args.url:
        result = run(args.url.rstrip("/"), model_name, args.repeats)
    else:
        import socket

        import ray
        from ray import serve

        from deployments import build_app
        from serving.config import AppConfig, LLMConfig, ModelConfig

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            if args.throughput:
                t = throughput(port, args.model, args)
                print(f"| cache | output tokens/s |\n|---|---|\n| off | {t['off_tokens_per_s']:.1f} |\n"
                      f"| on | {t['on_tokens_per_s']:.1f} |\n\ncache on / off: {t['ratio']:.3f}x")
                return
            config = AppConfig(models=(LLMConfig(model=ModelConfig(path=args.model, name=model_name)),))
            serve.run(build_app(config), name="llm", route_prefix="/")
            result = run(f"http://127.0.0.1:{port}", model_name, args.repeats)
        finally:
            serve.shutdown()
            ray.shutdown()
    print("| kind | requests | served from cache | p50 (ms) | p95 (ms) |\n|---|---|---|---|---|")
    for kind, r in result.items():
        print(f"| {kind} | {r['n']} | {r['cached']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} |")


if __name__ == "__main__":
    main()
