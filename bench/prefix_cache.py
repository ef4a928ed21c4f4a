"""`python -m bench.prefix_cache`: what sharing computed KV blocks saves (scheduler.enable_prefix_caching).

Two engines in this process (`parallel.build.build_engine`, local executor, one thread), prefix
caching off (the baseline) and on, run the same workloads in alternating rounds:
- `choices`: `--n` requests of one `--context`-token prompt at once (what n > 1 sends);
- `system`: `--batch` requests at once of one `--context`-token system prompt plus `--suffix` tokens
  of their own (a shared system prompt).
Every request is greedy with `--max-tokens`. Per workload and engine: prompt tokens computed, time to
first token (p50, p95 over the rounds' requests), the whole run's wall time, and ours / baseline.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from typing import Optional


def _requests(workload: str, args, vocab: int, round_: int) -> list[list[int]]:
    rng = random.Random(round_)  # NOTE: fresh prompts per round, the same for both engines
    prompt = [rng.randrange(7, vocab) for _ in range(args.context)]
    if workload == "choices":
        return [prompt] * args.n
    return [prompt + [rng.randrange(7, vocab) for _ in range(args.suffix)] for _ in range(args.batch)]


def _run(engine, prompts: list[list[int]], max_tokens: int, tag: str) -> tuple[float, list[float], int]:
    """(wall s, TTFT s per request, prompt tokens computed) of all `prompts` queued at once."""
    from serving.sampling import SamplingParams

    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    first: dict[str, float] = {}
    computed = 0
    while engine.has_unfinished():
        outputs, stats = engine.step()
        computed += stats.num_prefill_tokens + stats.num_decode_tokens
        now = time.perf_counter()
        for out in outputs:
            first.setdefault(out.request_id, now - t0)
    decode = len(prompts) * (max_tokens - 1)
    engine.blocks.reset_prefix_cache()  # NOTE: the next round's prompts are fresh anyway
    return time.perf_counter() - t0, list(first.values()), computed - decode


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.prefix_cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model folder (default: the embedded target, else the tiny model)")
    p.add_argument("--context", type=int, default=256, help="tokens of the shared prompt")
    p.add_argument("--n", type=int, default=4, help="choices of one prompt (the choices workload)")
    p.add_argument("--batch", type=int, default=8, help="requests sharing the system prompt")
    p.add_argument("--suffix", type=int, default=16, help="tokens of each request's own after the system prompt")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args(argv)
    import torch

    from bench.harness import resolve_model
    from parallel.build import build_engine
    from serving.config import LLMConfig, ModelConfig, SchedulerConfig

    torch.set_num_threads(1)
    model = resolve_model(args.model)
    engines = {on: build_engine(LLMConfig(model=ModelConfig(path=model, dtype="float32"), scheduler=SchedulerConfig(
        max_num_batched_tokens=2048, enable_prefix_caching=on))) for on in (False, True)}
    vocab = engines[True].info.vocab_size
    print(f"# Prefix caching\n\n- command: python -m bench.prefix_cache {' '.join(sys.argv[1:] if argv is None else argv)}\n- model: {model}\n"
          f"- {args.rounds} rounds, {args.context}-token shared prompt, max_tokens {args.max_tokens}\n")
    print("| workload | caching | prompt tokens computed | TTFT p50 (ms) | TTFT p95 (ms) | wall (ms) |\n"
          "|---|---|---|---|---|---|")
    for workload in ("choices", "system"):
        res = {on: ([], [], 0) for on in engines}
        for r in range(args.rounds):
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                wall, ttft, computed = _run(engines[on], _requests(workload, args, vocab, r), args.max_tokens,
                                            f"{workload}-{r}-{on}")
                res[on][0].append(wall)
                res[on][1].extend(ttft)
                res[on] = (res[on][0], res[on][1], res[on][2] + computed)
        rows = {}
        for on, (walls, ttfts, computed) in res.items():
            q = statistics.quantiles(ttfts, n=20)
            rows[on] = (computed / args.rounds, 1e3 * statistics.median(ttfts), 1e3 * q[18], 1e3 * sum(walls) / len(walls))
            print(f"| {workload} | {'on' if on else 'off (baseline)'} | {rows[on][0]:.0f} | {rows[on][1]:.1f} | "
                  f"{rows[on][2]:.1f} | {rows[on][3]:.1f} |")
        ratio = [rows[True][i] / rows[False][i] for i in range(4)]
        print(f"| {workload} | on / off | {ratio[0]:.2f}x | {ratio[1]:.2f}x | {ratio[2]:.2f}x | {ratio[3]:.2f}x |")
    for engine in engines.values():
        engine.executor.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
