"""`python -m bench.overhead`: the engine's time per step outside the model forward.

Issue 4's bar: at decode batch 32 on the embedded target, the part of a step spent outside the
worker group (scheduling, packing the step's tensors, detokenising, building outputs) is under 10%
of the step. The engine reports it in `serving.stats.StepStats`: `step_time_s` (the whole step) and
`forward_time_s` (inside the executor: model forward + sampling + transport).

It builds `serving.engine.LLMEngine` in this process with the local executor
(`parallel.build.build_engine`: one rank, no Ray, no transport), adds `--batch` requests of
`--context` prompt tokens that never stop early (no EOS stop ids), steps through their prefill, and
then records `--steps` pure decode steps (no prefill token in the step, all `--batch` sequences
decoding). As references it also times a bare Hugging Face decode forward at the same batch and
context (DynamicCache, `--no-bare` to skip), the "bare forward pass" DESIGN.md compares against, and
Hugging Face's own `generate` on the same prompts (greedy, per decode step; `--no-generate` to
skip): the bar at small batches is an engine step no slower than a step of `generate`. The steps are
split over `--rounds` rounds of fresh requests, each followed by a round of `generate`: on a machine
shared with other work the load drifts, and alternating keeps both under the same load.
`--threads` (default 1) sets torch's intra-op threads for all of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

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


def prompt_ids(batch: int, context: int, vocab: int) -> list[list[int]]:
    """The benchmark's prompts: `batch` different sequences of `context` in-vocabulary ids."""
    return [[(17 * i + 31 * j) % (vocab - 1) + 1 for j in range(context)] for i in range(batch)]


def _tp_engine(config, tp: int):
    """The engine with this process as rank 0 of `tp` ranks (the replica's path: ranks 1..tp-1 are
    Ray actors fed over the step channel), built by the one factory."""
    import ray

    from parallel.build import build_engine
    from serving.config import ParallelConfig

    ray.init(num_cpus=max(2, tp), include_dashboard=False, log_to_driver=False)
    return build_engine(config.model_copy(update={"parallel": ParallelConfig(tensor_parallel_size=tp)}), device="cpu")


def measure_engine(model: str, batch: int, context: int, steps: int, warmup: int, dtype: str, tp: int = 0,
                   rounds: int = 1, between: Optional[Callable[[], None]] = None) -> dict:
    """Run the engine to a steady decode batch of `batch` and summarise `steps` decode steps.

    tp<=1: the model in this process (LocalExecutor); tp>=2: this process as rank 0 of a worker group
    of tp ranks (the step channel's transport included).
    The steps are split over `rounds` rounds of fresh requests (prefill, `warmup` decode steps, then
    the measured ones), with `between()` called after each round (the HF generate reference)."""
    from serving.config import LLMConfig, ModelConfig, SchedulerConfig
    from parallel.build import build_engine

    sched = SchedulerConfig(max_num_seqs=max(batch, SchedulerConfig().max_num_seqs),
                            max_num_batched_tokens=max(batch * context + batch, SchedulerConfig().max_num_batched_tokens))
    config = LLMConfig(model=ModelConfig(path=model, dtype=dtype), scheduler=sched)
    engine = _tp_engine(config, tp) if tp > 1 else build_engine(config)
    times: dict[str, list[float]] = {"step": [], "forward": [], "model": [], "outside_wall": []}
    num_warmup_steps = 0
    for r in range(rounds):
        num_warmup_steps += _engine_round(engine, batch, context, -(-steps // rounds), warmup, f"overhead-{r}", times)
        if between is not None:
            between()
    engine.executor.shutdown()
    if tp > 1:
        import ray

        ray.shutdown()
    out = overhead_summary(times["step"], times["forward"])
    # outside rank 0's own forward + sampling: the engine plus the transport to the ranks
    out["model_ms_p50"] = 1e3 * statistics.median(times["model"])
    out["outside_model_fraction_total"] = 1 - sum(times["model"]) / sum(times["step"])
    out["tp"] = tp
    out["unaccounted_ms_p50"] = 1e3 * statistics.median(times["outside_wall"])  # around step() but outside step_time_s
    out["num_warmup_steps"] = num_warmup_steps
    out["num_rounds"] = rounds
    return out


def _engine_round(engine, batch: int, context: int, steps: int, warmup: int, prefix: str,
                  times: dict[str, list[float]]) -> int:
    """One round: adds the prompts, records `steps` pure decode steps into `times`, aborts the requests.
    Returns the steps not recorded (prefill and warmup)."""
    from serving.sampling import SamplingParams

    # NOTE: no stop_token_ids, so no sequence finishes before max_tokens and the batch stays full.
    params = SamplingParams(max_tokens=warmup + steps + context + 8, temperature=0.0)
    for i, ids in enumerate(prompt_ids(batch, context, engine.info.vocab_size)):
        engine.add_request(f"{prefix}-{i}", ids, params)
    num_recorded = num_prefill_steps = num_decode_seen = 0
    while num_recorded < steps:
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
        num_recorded += 1
        times["step"].append(stats.step_time_s)
        times["forward"].append(stats.forward_time_s)
        times["model"].append(stats.model_time_s)
        times["outside_wall"].append(wall - stats.step_time_s)
    for i in range(batch):
        engine.abort(f"{prefix}-{i}")
    return num_prefill_steps + warmup


def load_hf(model: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()


def measure_bare_forward(hf, batch: int, context: int, steps: int) -> dict:
    """Median time of one HF decode forward at `batch` x `context` cached tokens (DynamicCache)."""
    import torch
    from transformers import DynamicCache

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


def hf_generate_steps(hf, batch: int, context: int, steps: int, warmup: int) -> list[float]:
    """Times of `steps` decode steps of HF `generate` (greedy) on the engine's prompts, after `warmup`.

    A stopping criterion stamps the time after each new token; the gaps between stamps are decode
    steps (the first stamp ends the prefill)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Stamps(StoppingCriteria):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    ids = torch.tensor(prompt_ids(batch, context, hf.config.vocab_size))  # [B, context]
    stamps = Stamps()
    with torch.inference_mode():
        hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=1 + warmup + steps,
                    min_new_tokens=1 + warmup + steps, eos_token_id=None, pad_token_id=0,
                    stopping_criteria=StoppingCriteriaList([stamps]))
    return [b - a for a, b in zip(stamps.times, stamps.times[1:])][warmup:]


def render(result: dict) -> str:
    """Markdown lines of a result."""
    e = result.get("engine")
    lines = [f"# Engine overhead at decode batch {result['batch']}, context {result['context']}",
             f"- model: {result['model']}, {result['dtype']}, {result.get('threads', '?')} torch thread(s)"]
    if e:
        lines += [
            f"- engine step p50 {e['step_ms_p50']:.2f} ms, forward p50 {e['forward_ms_p50']:.2f} ms, "
            f"outside the forward p50 {e['outside_ms_p50']:.2f} ms (p95 {e['outside_ms_p95']:.2f} ms)",
            f"- overhead: {100 * e['overhead_fraction_total']:.1f}% of step time over {e['num_steps']} steps "
            f"(per-step p50 {100 * e['overhead_fraction_p50']:.1f}%, p95 {100 * e['overhead_fraction_p95']:.1f}%); "
            f"bar < {100 * e['bar']:.0f}%: **{'PASS' if e['pass'] else 'FAIL'}**",
            f"- executor: {'worker group, tp=' + str(e['tp']) if e.get('tp', 0) > 1 else 'local (no transport)'}; "
            f"rank 0 forward+sampling p50 {e['model_ms_p50']:.2f} ms; outside it (engine + transport): "
            f"{100 * e['outside_model_fraction_total']:.1f}% of step time",
        ]
    if result.get("bare"):
        b = result["bare"]["bare_forward_ms_p50"]
        lines.append(f"- bare HF decode forward (DynamicCache) p50 {b:.2f} ms"
                     + (f"; engine step / bare forward = {e['step_ms_p50'] / b:.2f}x" if e else ""))
    if result.get("generate"):
        g = result["generate"]["generate_step_ms_p50"]
        lines.append(f"- HF generate (greedy, same prompts) p50 {g:.2f} ms per decode step"
                     + (f"; engine step / generate step = {e['step_ms_p50'] / g:.3f}x" if e else ""))
    if result.get("error"):
        lines.append(f"- engine not measured: {result['error']}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model folder (default: the embedded target, else the tiny model)")
    p.add_argument("--batch", type=int, default=32, help="decode batch size")
    p.add_argument("--context", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--steps", type=int, default=50, help="decode steps measured (in all rounds together)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of fresh requests, each followed by a round of HF generate: both see the same load")
    p.add_argument("--warmup", type=int, default=5, help="decode steps skipped first")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (this process is rank 0)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--no-bare", action="store_true", help="skip the bare HF forward reference")
    p.add_argument("--no-generate", action="store_true", help="skip the HF generate reference")
    p.add_argument("--out", help="JSON file for the result (default bench/results/overhead-<time>.json)")
    p.add_argument("--check", action="store_true", help="exit 1 when the bar is missed")
    args = p.parse_args(argv)
    from bench.harness import RESULTS_DIR, resolve_model

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = resolve_model(args.model)
    result: dict = {"model": model, "batch": args.batch, "context": args.context, "dtype": args.dtype,
                    "threads": args.threads or "default"}
    hf = None if args.no_bare and args.no_generate else load_hf(model, args.dtype)
    gaps: list[float] = []  # HF generate's decode steps, one round after each engine round

    def generate_round() -> None:
        gaps.extend(hf_generate_steps(hf, args.batch, args.context, -(-args.steps // args.rounds), args.warmup))

    try:
        result["engine"] = measure_engine(model, args.batch, args.context, args.steps, args.warmup, args.dtype,
                                          args.tp, args.rounds, None if args.no_generate else generate_round)
    except ImportError as e:  # NOTE: the engine modules are optional for the rest of the benchmark
        result["error"] = f"serving.engine / serving.executor not importable: {e}"
        if not args.no_generate:
            generate_round()
    if gaps:
        result["generate"] = {"generate_step_ms_p50": 1e3 * statistics.median(gaps), "num_steps": len(gaps)}
        if "engine" in result:
            result["generate"]["engine_over_generate"] = result["engine"]["step_ms_p50"] / result["generate"][
                "generate_step_ms_p50"]
    if not args.no_bare:
        result["bare"] = measure_bare_forward(hf, args.batch, args.context, args.steps)
    print(render(result))
    out = Path(args.out) if args.out else RESULTS_DIR / f"overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"saved: {out}")
    ok = bool(result.get("engine", {}).get("pass"))
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
