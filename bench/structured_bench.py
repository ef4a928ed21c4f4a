"""`python -m bench.structured_bench`: what the structured-output mask costs per decode step.

Decodes a batch of `--batch` rows of the embedded model (Hugging Face forward with its KV cache,
float32, greedy), every row under a JSON grammar (the schemas below and json_object, cycled), and
times in the same step: the forward (the baseline: a step's model cost without any grammar), the
mask (`StructuredOutputs.mask`: llguidance's masks for every row in one call, then `apply_bitmask`
on the [B, V] logits) and `accept`. A row whose document ends starts again on a fresh matcher, so
every step masks `--batch` rows in real grammar states. Also timed per step: `apply_bitmask` alone,
the same masks computed one row at a time (no llguidance thread pool), and `mask` with no row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Optional

_WORD = {"type": "string", "maxLength": 12}
SCHEMAS = [
    {"type": "object", "properties": {"name": _WORD, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
     "required": ["color", "ok"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50}, "maxItems": 4},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"id": {"type": "integer"}, "label": _WORD}, "required": ["id", "label"]}}},
     "required": ["items"]},
    None,  # json_object
]
PROMPT = 'Answer in JSON, like {"name":"Nile","length":6650} or {"ok":true}.'


def _formats() -> list[dict]:
    return [{"type": "json_object"} if s is None else
            {"type": "json_schema", "json_schema": {"name": "bench", "schema": s, "strict": True}} for s in SCHEMAS]


def measure(model_path: str, batch: int, steps: int, max_tokens: int, parallel: Optional[bool]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from serving.structured import parse_response_format
    from serving.structured.grammar import GrammarCompiler
    from serving.structured.mask import allocate_bitmask, apply_bitmask
    from serving.structured.outputs import StructuredOutputs

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    structured = StructuredOutputs(GrammarCompiler(tokenizer, vocab, [model.config.eos_token_id]), parallel)
    specs = [parse_response_format(f) for f in _formats()]
    row_seq, next_seq, generated = list(range(batch)), batch, [0] * batch
    for row in range(batch):
        structured.add(row, specs[row % len(specs)])
    scratch = allocate_bitmask(batch, vocab)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt")["input_ids"]
    inputs, cache = prompt.repeat(batch, 1), DynamicCache()
    times: dict[str, list[float]] = {name: [] for name in
                                     ("forward", "mask_none", "fill_row_by_row", "mask", "apply", "accept")}
    rows = list(range(batch))
    with torch.inference_mode():
        for _ in range(steps):
            t0 = time.perf_counter()
            logits = model(input_ids=inputs, cache=cache, use_cache=True).logits[:, -1].float()  # [B, V]
            t1 = time.perf_counter()
            structured.mask(logits, [], [], [])
            t2 = time.perf_counter()
            for row in rows:  # the same masks, one llguidance call per row, into a scratch tensor
                structured.matcher(row_seq[row]).fill_mask(scratch, row)
            t3 = time.perf_counter()
            structured.mask(logits, rows, row_seq, [max_tokens - g for g in generated])
            t4 = time.perf_counter()
            apply_bitmask(logits, rows, scratch)  # again, alone (a no-op on masked logits)
            t5 = time.perf_counter()
            tokens = logits.argmax(dim=-1).tolist()
            t6 = time.perf_counter()
            done = structured.accept(row_seq, tokens)
            t7 = time.perf_counter()
            for name, dt in (("forward", t1 - t0), ("mask_none", t2 - t1), ("fill_row_by_row", t3 - t2),
                             ("mask", t4 - t3), ("apply", t5 - t4), ("accept", t7 - t6)):
                times[name].append(dt)
            for row in rows:
                generated[row] += 1
                if done[row] or tokens[row] == model.config.eos_token_id:  # a new document starts
                    structured.release([row_seq[row]])
                    structured.add(next_seq, specs[row % len(specs)])
                    row_seq[row], next_seq, generated[row] = next_seq, next_seq + 1, 0
            inputs = torch.tensor(tokens)[:, None]
    ms = {name: 1e3 * statistics.median(t[2:]) for name, t in times.items()}  # the first steps warm up
    return {"model": model_path, "batch": batch, "vocab": vocab, "parallel": structured.parallel, "steps": steps,
            "documents": next_seq - batch, "step_ms_p50": ms,
            "mask_over_forward": (ms["mask"] + ms["accept"]) / ms["forward"]}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.structured_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model folder (default: the embedded target, else the tiny model)")
    p.add_argument("--batch", default="1,32", help="comma-separated batch sizes (every row constrained)")
    p.add_argument("--steps", type=int, default=80, help="decode steps per batch size (with the prompt, within the model's context)")
    p.add_argument("--max-tokens", type=int, default=48, help="each document's budget (closing starts near it)")
    p.add_argument("--parallel", choices=("auto", "on", "off"), default="auto",
                   help="masks on llguidance's thread pool (auto: with 4 CPUs or more)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--out", help="JSON file for the result (default bench/results/structured-<time>.json)")
    args = p.parse_args(argv)
    from bench.harness import RESULTS_DIR, resolve_model

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = resolve_model(args.model)
    parallel = {"auto": None, "on": True, "off": False}[args.parallel]
    results = [measure(model, int(b), args.steps, args.max_tokens, parallel) for b in args.batch.split(",")]
    out = Path(args.out) if args.out else RESULTS_DIR / f"structured-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    for r in results:
        ms = r["step_ms_p50"]
        pool = "on" if r["parallel"] else "off"
        print(f"batch {r['batch']:3d} (V={r['vocab']}, pool {pool}): forward {ms['forward']:.2f} ms, "
              f"mask {ms['mask']:.3f} ms (apply {ms['apply']:.3f}) + accept {ms['accept']:.3f} ms = {100 * r['mask_over_forward']:.1f}% "
              f"of the forward; fill row by row {ms['fill_row_by_row']:.3f} ms; no rows {1e3 * ms['mask_none']:.1f} us")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
