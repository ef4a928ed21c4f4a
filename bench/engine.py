"""`python -m bench.engine`: continuous batching against static batching with no serving stack.

The same synthetic workload as `python -m bench` (same flags, same seed) runs twice in this
process, on one torch thread each, with every request queued at once:

- **engine**: `serving.engine.LLMEngine` with the local executor (no Ray, no Serve, no HTTP),
  `--max-num-seqs` sequences per step;
- **static**: `bench.baseline.static_generate` (the baseline deployment's own batch function: HF
  `generate` on left-padded batches of `--batch-size` requests, in arrival order).

Both greedy; both count only useful output tokens (up to max_tokens or EOS). The ratio is what
continuous batching itself buys on this machine; `python -m bench` adds everything a served
request costs on top (proxy, router, streaming), which the baseline mostly does not pay.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model folder (default: the app's default model)")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-len", default="128,16,512", help="as in python -m bench")
    p.add_argument("--prompt-sigma", type=float, default=0.6)
    p.add_argument("--output-len", default="16,128", help="as in python -m bench")
    p.add_argument("--output-lognormal", metavar="MEDIAN,SIGMA", help="as in python -m bench")
    p.add_argument("--max-num-seqs", type=int, default=128, help="engine: sequences per step")
    p.add_argument("--batch-size", type=int, default=32, help="static: requests per generate call")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both")
    return p.parse_args(argv)


def run_engine(model_path: str, prompts: list[list[int]], max_tokens: list[int], max_num_seqs: int) -> tuple[int, float]:
    """(useful output tokens, seconds) for all requests through the engine."""
    from serving.config import LLMConfig, ModelConfig, SchedulerConfig
    from parallel.build import build_engine
    from serving.sampling import SamplingParams

    config = LLMConfig(model=ModelConfig(path=model_path),
                       scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max(512, max_num_seqs)))
    engine = build_engine(config)
    engine.add_request("warmup", prompts[0], SamplingParams(max_tokens=4, temperature=0.0))
    while engine.has_unfinished():
        engine.step()
    start = time.perf_counter()
    for i, (ids, n) in enumerate(zip(prompts, max_tokens)):
        engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=n, temperature=0.0))
    tokens = 0
    while engine.has_unfinished():
        for out in engine.step()[0]:
            if out.finished:
                tokens += out.num_output_tokens
    return tokens, time.perf_counter() - start


def run_static(model_path: str, prompts: list[list[int]], max_tokens: list[int], batch_size: int) -> tuple[int, float]:
    """(useful output tokens, seconds) for all requests in static batches of `batch_size`."""
    from bench.baseline import _Item, load_static_model, static_generate

    model, tok = load_static_model(model_path)
    items = [_Item(ids, n, 0.0, 1.0) for ids, n in zip(prompts, max_tokens)]
    static_generate(model, tok, [_Item(prompts[0], 4, 0.0, 1.0)])  # warmup
    start = time.perf_counter()
    tokens = 0
    for b in range(0, len(items), batch_size):
        tokens += sum(a.num_output_tokens for a in static_generate(model, tok, items[b:b + batch_size]))
    return tokens, time.perf_counter() - start


def main(argv: Optional[list[str]] = None) -> int:
    import torch

    from bench.harness import build_workload, resolve_model, token_counter
    from serving.model_loader import load_tokenizer

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model_path = resolve_model(args.model)
    count, max_len = token_counter(model_path)
    reqs, shape = build_workload(argparse.Namespace(trace=None, **vars(args)), count, max_len)
    tok = load_tokenizer(model_path)
    prompts = [tok(r.prompt)["input_ids"] for r in reqs]
    max_tokens = [r.max_tokens for r in reqs]
    rows = [("engine (continuous batching, max_num_seqs=%d)" % args.max_num_seqs,
             *run_engine(model_path, prompts, max_tokens, args.max_num_seqs)),
            ("static (HF generate, batches of %d)" % args.batch_size,
             *run_static(model_path, prompts, max_tokens, args.batch_size))]
    command = "python -m bench.engine " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# Continuous vs static batching in one process\n\n- command: {command}\n- model: {model_path}\n"
          f"- workload: {shape}\n- torch threads: {args.threads}\n")
    print("| target | output tokens | seconds | output tokens/s |\n|---|---|---|---|")
    for name, tokens, secs in rows:
        print(f"| {name} | {tokens} | {secs:.1f} | {tokens / secs:.1f} |")
    (_, t_eng, s_eng), (_, t_st, s_st) = rows
    print(f"\nengine / static, output tokens/s: **{(t_eng / s_eng) / (t_st / s_st):.2f}x**")
    return 0


if __name__ == "__main__":
    sys.exit(main())
