"""End-to-end latency of semantic-cache hits over HTTP, against misses, on the whole app.

    python -m bench.cache_http [--repeats 200] [--model DIR] [--url URL]

Deploys the app (router -> cache -> LLM server) in its own Ray cluster (or drives `--url`), answers
each seed prompt once (a miss, which stores the answer), then times, one request at a time:
exact repeats (same text, other case and spacing), paraphrase hits, and misses (unrelated prompts,
`cache.skip`), reporting p50/p95 per kind and how many were served from the cache.
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
        kinds = {"exact repeat": [], "paraphrase": [], "miss (cache.skip)": []}
        hits = {k: 0 for k in kinds}
        for i in range(repeats):
            seed, para = SEEDS[i % len(SEEDS)]
            for kind, text, extra in (("exact repeat", "  " + seed.upper() + " ", {}),
                                      ("paraphrase", para, {}),
                                      ("miss (cache.skip)", seed, {"cache": {"skip": True, "no_store": True}})):
                if kind.startswith("miss") and i % 10:
                    continue  # misses run the model: sample them less often
                dt, cached = ask(client, url, model, text, **extra)
                kinds[kind].append(dt)
                hits[kind] += cached
    return {k: {"n": len(v), "cached": hits[k], "p50_ms": 1e3 * statistics.median(v),
                "p95_ms": 1e3 * percentile(v, 95)} for k, v in kinds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.cache_http", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--model", help="HF model folder (default: the embedded model)")
    ap.add_argument("--url", help="drive a running app instead of deploying one")
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
