"""`python -m bench.overhead`: the engine's time per step outside the model forward.

Issue 4's bar: at decode batch 32 on the embedded target, the part of a step spent outside the
worker group (scheduling, packing the step's tensors, detokenising, building outputs) is under 10%
of the step. The engine reports it in `serving.stats.StepStats`: `step_time_s` (the whole step) and
`forward_time_s` (inside the executor: model forward + sampling + transport).

It builds `serving.engine.LLMEngine` in this process with the local executor
(`serving.executor.build_local_engine`: one rank, no Ray, no transport), adds `--batch` requests of
`--context` prompt tokens that never stop early (no EOS stop ids), steps through their prefill, and
then records `--steps` pure decode steps (no prefill token in the step, all `--batch` sequences
decoding). As a reference it also times a bare Hugging Face decode forward at the same batch and
context (DynamicCache, `--no-bare` to skip), the "bare forward pass" DESIGN.md compares against.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

from bench.report import percentile

OVERHEAD_BAR = 0.10  # outside-forward share of a decode step


def overhead_summary(step_times: list[float], forward_times: list[float]) -> dict:
    """Per-step times -> overhead statistics (fractions of the step spent outside the forward)."""
    if not step_times or len(step_times) != len(forward_times):
        raise ValueError("need one forward time per step time, and at least one step")
    outside = [s - f for s, f in zip(step_times, forward_times)]
    fractions = [o / s for o, s in zip(outside, step_times) if s > 0]
    total = sum(outside) / sum(step_times)
    return {
        "num_steps": len(step_times),
        "step_ms_p50": 1e3 * statistics.median(step_times),
        "forward_ms_p50": 1e3 * statistics.median(forward_times),
        "outside_ms_p50": 1e3 * statistics.median(outside),
        "outside_ms_p95": 1e3 * percentile(outside, 95),
        "overhead_fraction_total": total,  # sum(outside) / sum(step)
        "overhead_fraction_p50": statistics.median(fractions),
        "overhead_fraction_p95": percentile(fractions, 95),
        "bar": OVERHEAD_BAR,
        "pass": total < OVERHEAD_BAR,
    }


def _ray_engine(config, tp: int):
    """The engine over a Ray worker group of `tp` ranks (the deployment's path), and its group."""
    import ray

    from parallel.worker_group import WorkerGroup
    from serving.config import ParallelConfig
    from serving.engine import LLMEngine, num_kv_blocks_for
    from serving.model_loader import load_model_info, load_tokenizer

    config = config.model_copy(update={"parallel": ParallelConfig(tensor_parallel_size=tp)})
    ray.init(num_cpus=max(2, tp), include_dashboard=False, log_to_driver=False)
    info = load_model_info(config.model)
    blocks = num_kv_blocks_for(config, info)
    group = WorkerGroup(config, info.path, blocks, "cpu")
    return LLMEngine(config, info, load_tokenizer(info.path), group, blocks), group


def measure_engine(model: str, batch: int, context: int, steps: int, warmup: int, dtype: str, tp: int = 0) -> dict:
    """Run the engine to a steady decode batch of `batch` and summarise `steps` decode steps.

    tp=0: the local executor in this process; tp>=1: a Ray worker group of tp ranks (transport included)."""
    from serving.config import LLMConfig, ModelConfig, SchedulerConfig
    from serving.executor import build_local_engine
    from serving.sampling import SamplingParams

    sched = SchedulerConfig(max_num_seqs=max(batch, SchedulerConfig().max_num_seqs),
                            max_num_batched_tokens=max(batch * context + batch, SchedulerConfig().max_num_batched_tokens))
    config = LLMConfig(model=ModelConfig(path=model, dtype=dtype), scheduler=sched)
    group = None
    if tp:
        engine, group = _ray_engine(config, tp)
    else:
        engine = build_local_engine(config)
    vocab = engine.info.vocab_size
    # NOTE: no stop_token_ids, so no sequence finishes before max_tokens and the batch stays full.
    params = SamplingParams(max_tokens=warmup + steps + context + 8, temperature=0.0)
    for i in range(batch):
        ids = [(17 * i + 31 * j) % (vocab - 1) + 1 for j in range(context)]  # any in-vocabulary ids
        engine.add_request(f"overhead-{i}", ids, params)
    step_times, forward_times, model_times, outside_wall = [], [], [], []
    num_prefill_steps = num_decode_seen = 0
    while len(step_times) < steps:
        t0 = time.perf_counter()
        _, stats = engine.step()
        wall = time.perf_counter() - t0
        if stats.num_prefill_tokens or stats.num_decode_tokens != batch:
            num_prefill_steps += 1
            if num_prefill_steps > 10 * batch:
                raise RuntimeError(f"never reached a pure decode batch of {batch} (last step: {stats})")
            continue
        num_decode_seen += 1
        if num_decode_seen <= warmup:
            continue
        step_times.append(stats.step_time_s)
        forward_times.append(stats.forward_time_s)
        model_times.append(stats.model_time_s)
        outside_wall.append(wall - stats.step_time_s)
    for i in range(batch):
        engine.abort(f"overhead-{i}")
    if group is not None:
        import ray

        group.shutdown()
        ray.shutdown()
    out = overhead_summary(step_times, forward_times)
    # outside rank 0's own forward + sampling: the engine plus the transport to the ranks
    out["model_ms_p50"] = 1e3 * statistics.median(model_times)
    out["outside_model_fraction_total"] = 1 - sum(model_times) / sum(step_times)
    out["tp"] = tp
    out["unaccounted_ms_p50"] = 1e3 * statistics.median(outside_wall)  # around step() but outside step_time_s
    out["num_warmup_steps"] = num_prefill_steps + warmup
    return out


def measure_bare_forward(model: str, batch: int, context: int, steps: int, dtype: str) -> dict:
    """Median time of one HF decode forward at `batch` x `context` cached tokens (DynamicCache)."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    vocab = hf.config.vocab_size
    ids = torch.arange(batch * context).view(batch, context) % (vocab - 1) + 1  # [B, context]
    times = []
    with torch.inference_mode():
        cache = DynamicCache()
        out = hf(input_ids=ids, cache=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        for i in range(steps + 3):
            t0 = time.perf_counter()
            out = hf(input_ids=nxt, cache=cache, use_cache=True,
                     position_ids=torch.full((batch, 1), context))
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            dt = time.perf_counter() - t0
            cache.crop(-1)  # NOTE: keep the context at `context` tokens for every timed step
            if i >= 3:
                times.append(dt)
    return {"bare_forward_ms_p50": 1e3 * statistics.median(times), "num_steps": len(times)}


def render(result: dict) -> str:
    """Markdown lines of a result."""
    e = result.get("engine")
    lines = [f"# Engine overhead at decode batch {result['batch']}, context {result['context']}",
             f"- model: {result['model']}"]
    if e:
        lines += [
            f"- engine step p50 {e['step_ms_p50']:.2f} ms, forward p50 {e['forward_ms_p50']:.2f} ms, "
            f"outside the forward p50 {e['outside_ms_p50']:.2f} ms (p95 {e['outside_ms_p95']:.2f} ms)",
            f"- overhead: {100 * e['overhead_fraction_total']:.1f}% of step time over {e['num_steps']} steps "
            f"(per-step p50 {100 * e['overhead_fraction_p50']:.1f}%, p95 {100 * e['overhead_fraction_p95']:.1f}%); "
            f"bar < {100 * e['bar']:.0f}%: **{'PASS' if e['pass'] else 'FAIL'}**",
            f"- executor: {'Ray worker group, tp=' + str(e['tp']) if e.get('tp') else 'local (no transport)'}; "
            f"rank 0 forward+sampling p50 {e['model_ms_p50']:.2f} ms; outside it (engine + transport): "
            f"{100 * e['outside_model_fraction_total']:.1f}% of step time",
        ]
    if result.get("bare"):
        b = result["bare"]["bare_forward_ms_p50"]
        lines.append(f"- bare HF decode forward (DynamicCache) p50 {b:.2f} ms"
                     + (f"; engine step / bare forward = {e['step_ms_p50'] / b:.2f}x" if e else ""))
    if result.get("error"):
        lines.append(f"- engine not measured: {result['error']}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model folder (default: the embedded target, else the tiny model)")
    p.add_argument("--batch", type=int, default=32, help="decode batch size")
    p.add_argument("--context", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--steps", type=int, default=50, help="decode steps measured")
    p.add_argument("--warmup", type=int, default=5, help="decode steps skipped first")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--tp", type=int, default=0, help="0: local executor; N: Ray worker group of N ranks")
    p.add_argument("--no-bare", action="store_true", help="skip the bare HF forward reference")
    p.add_argument("--out", help="JSON file for the result (default bench/results/overhead-<time>.json)")
    p.add_argument("--check", action="store_true", help="exit 1 when the bar is missed")
    args = p.parse_args(argv)
    from bench.__main__ import RESULTS_DIR, resolve_model

    model = resolve_model(args.model)
    result: dict = {"model": model, "batch": args.batch, "context": args.context, "dtype": args.dtype}
    try:
        result["engine"] = measure_engine(model, args.batch, args.context, args.steps, args.warmup, args.dtype,
                                          args.tp)
    except ImportError as e:  # NOTE: the engine modules are optional for the rest of the benchmark
        result["error"] = f"serving.engine / serving.executor not importable: {e}"
    if not args.no_bare:
        result["bare"] = measure_bare_forward(model, args.batch, args.context, args.steps, args.dtype)
    print(render(result))
    out = Path(args.out) if args.out else RESULTS_DIR / f"overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"saved: {out}")
    ok = bool(result.get("engine", {}).get("pass"))
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
