"""Measure the target's early exits as a speculative proposer.

    python -m serving.models.early_exit                      # the shipped target
    python -m serving.models.early_exit --model /tmp/ee/target --draft /tmp/ee/draft

An exit at E runs the embedding, the first E decoder layers, then the model's own final norm and
LM head. It is run the way the serving code will run it: `config.num_hidden_layers = E` for one
forward (`LlamaModel.forward` loops over `layers[: config.num_hidden_layers]`). Prints JSON: the
argmax agreement of each exit with the full model on held-out windows, the tokens per verifying
step that agreement predicts, the tokens per verifying step of simulated greedy speculation on chat
prompts, and the cost of one cached decode step per exit; with `--draft`, the same simulation and
decode-step cost with that draft model as the proposer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from serving.models import EMBEDDED_TARGET
from serving.spec.acceptance import accept_greedy

CHAT_PROMPTS = [
    "What does \"light\" mean?", "Tell me a verse about mercy.", "What is a river?",
    "What is a mountain?", "What is a king?", "What does \"bread\" mean?",
    "Tell me a verse about water.", "Tell me a verse about love.",
]


@contextmanager
def exit_at(model, num_layers: int):
    """Within the block, `model` runs its first `num_layers` layers, then its norm and LM head."""
    full = model.config.num_hidden_layers
    assert 1 <= num_layers <= full
    model.config.num_hidden_layers = num_layers
    try:
        yield model
    finally:
        model.config.num_hidden_layers = full


@torch.no_grad()
def exit_agreement(model, windows: torch.Tensor, exits: list[int], batch_size: int = 8
                   ) -> dict[int, float]:
    """Per exit E: the fraction of positions of `windows` [N, T] where its argmax is the full
    model's."""
    agree, count = dict.fromkeys(exits, 0), 0
    for batch in windows.split(batch_size):
        full = model(input_ids=batch).logits.argmax(-1)  # [B, T]
        for e in exits:
            with exit_at(model, e):
                agree[e] += (model(input_ids=batch).logits.argmax(-1) == full).sum().item()
        count += full.numel()
    return {e: n / count for e, n in agree.items()}


def expected_tokens(agreement: float, k: int) -> float:
    """Tokens per verifying step with k greedy proposals if each is accepted independently with
    probability a: 1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a)."""
    return float(k + 1) if agreement == 1.0 else (1 - agreement ** (k + 1)) / (1 - agreement)


def _argmax_last(model, ids: list[int], n: int) -> list[int]:
    return model(input_ids=torch.tensor([ids])).logits[0, -n:].argmax(-1).tolist()


def greedy_proposer(model, num_layers: int | None = None):
    """`propose(ids, k)`: k greedy tokens after `ids` from `model`'s first `num_layers` layers (all
    of them by default), one uncached forward each."""
    def propose(ids: list[int], k: int) -> list[int]:
        proposals: list[int] = []
        with exit_at(model, num_layers or model.config.num_hidden_layers):
            for _ in range(k):
                proposals += _argmax_last(model, ids + proposals, 1)
        return proposals
    return propose


@torch.no_grad()
def simulate_speculation(model, propose, prompts: list[list[int]], k: int, max_new_tokens: int,
                         eos_id: int) -> tuple[float, list[list[int]]]:
    """Greedy speculation with uncached forwards (a measurement, not an engine).

    Each verifying step takes k proposals from `propose` (an early exit of `model` or a draft, see
    `greedy_proposer`), then runs one full forward of `model` over the prompt, the tokens so far
    and the proposals, and keeps what `accept_greedy` keeps (cut at eos and at `max_new_tokens`).
    Returns the mean tokens emitted per verifying step over all prompts, and each prompt's emitted
    tokens (the full model's greedy output, by construction).
    """
    num_tokens, num_steps, outputs = 0, 0, []
    for prompt in prompts:
        out: list[int] = []
        while len(out) < max_new_tokens and eos_id not in out:
            proposals = propose(prompt + out, k)
            emitted = accept_greedy(_argmax_last(model, prompt + out + proposals, k + 1), proposals)
            if eos_id in emitted:
                emitted = emitted[: emitted.index(eos_id) + 1]
            emitted = emitted[: max_new_tokens - len(out)]
            out += emitted
            num_tokens += len(emitted)
            num_steps += 1
        outputs.append(out)
    return num_tokens / num_steps, outputs


@torch.no_grad()
def decode_step_ms(model, prompt: list[int], exits: list[int], num_steps: int = 64
                   ) -> dict[int, float]:
    """Median milliseconds of one cached decode step (batch 1, one token) per number of layers.

    Each exit gets its own prefill and cache, so only the first E layers ever run."""
    ms = {}
    for e in exits:
        with exit_at(model, e):
            out = model(input_ids=torch.tensor([prompt]), use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)  # token: [1, 1]
            times = []
            for _ in range(num_steps):
                t0 = time.perf_counter()
                # NOTE: transformers 5.24 names `past_key_values` `cache` (the old name warns).
                out = model(input_ids=token, cache=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
                times.append(time.perf_counter() - t0)
            ms[e] = 1000 * statistics.median(times)
    return ms


def heldout_windows(tokenizer, seed: int, seq_len: int, num_windows: int) -> torch.Tensor:
    """The first `num_windows` of train.py's held-out evaluation windows: [N, seq_len]."""
    from serving.models.corpus import build_corpus
    from serving.models.train import encode

    heldout = encode(tokenizer, build_corpus(seed).heldout)
    return heldout[: len(heldout) // seq_len * seq_len].view(-1, seq_len)[:num_windows]


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=EMBEDDED_TARGET)
    parser.add_argument("--draft", type=Path, help="also simulate this draft as the proposer")
    parser.add_argument("--windows", type=int, default=64, help="held-out 512-token windows")
    parser.add_argument("--k", type=int, default=4, help="proposals per verifying step")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    exits = list(range(1, model.config.num_hidden_layers))

    t0 = time.time()
    windows = heldout_windows(tokenizer, args.seed, model.config.max_position_embeddings,
                              args.windows)
    agreement = exit_agreement(model, windows, exits)
    report = {"model": str(args.model), "windows": len(windows),
              "positions": windows.numel(), "agreement": agreement,
              "expected_tokens_per_step": {e: expected_tokens(a, args.k)
                                           for e, a in agreement.items()}}
    report["agreement_s"] = time.time() - t0

    t0 = time.time()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                             add_generation_prompt=True, return_dict=False)
               for p in CHAT_PROMPTS]
    report["simulated_tokens_per_step"] = {}
    for e in exits:
        mean, outputs = simulate_speculation(model, greedy_proposer(model, e), prompts, args.k,
                                             args.max_new_tokens, tokenizer.eos_token_id)
        report["simulated_tokens_per_step"][e] = mean
    report["samples"] = {p: tokenizer.decode(o, skip_special_tokens=True)
                         for p, o in zip(CHAT_PROMPTS, outputs)}
    report["simulation_s"] = time.time() - t0
    report["decode_step_ms"] = decode_step_ms(model, prompts[0], exits + [len(model.model.layers)])
    if args.draft is not None:
        draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=torch.float32).eval()
        report["draft"] = str(args.draft)
        report["draft_simulated_tokens_per_step"], _ = simulate_speculation(
            model, greedy_proposer(draft), prompts, args.k, args.max_new_tokens,
            tokenizer.eos_token_id)
        report["draft_decode_step_ms"] = decode_step_ms(draft, prompts[0],
                                                        [draft.config.num_hidden_layers])
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
