"""Sampling parameters and the sampler (pure tensor functions).

Per-request reproducibility: a request with a `seed` gets its own `torch.Generator`, advanced only
by its own tokens, so its output does not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = disabled
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = field(default=())  # EOS ids; never emitted as text

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def apply_top_k_top_p(logits: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """Masks logits outside each row's top-k and nucleus (top-p) set with -inf.

    logits: [B, V]; top_ks: [B] int (<= 0 or >= V = off); top_ps: [B] float (1.0 = off).
    """
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None, :]  # [1, V]
    k = torch.where(top_ks <= 0, vocab, top_ks.clamp(max=vocab))[:, None]
    drop = rank >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # keep the smallest prefix whose mass reaches p: drop a token when the mass before it already does
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_ps[:, None]
    drop[:, 0] = False  # the top token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class Sampler:
    """Turns a step's logits into one token per sequence; owns the per-request generators."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self._generators: dict[int, torch.Generator] = {}
        self._shared = torch.Generator(device=self.device)
        self._shared.seed()

    def release(self, seq_ids) -> None:
        for sid in seq_ids:
            self._generators.pop(sid, None)

    def _generator(self, seq_id: int, seed: Optional[int]) -> torch.Generator:
        if seed is None:
            return self._shared
        gen = self._generators.get(seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
            self._generators[seq_id] = gen
        return gen

    def sample(self, logits: torch.Tensor, seq_ids: list[int], temperatures: list[float], top_ps: list[float],
               top_ks: list[int], seeds: list[Optional[int]]) -> list[int]:
        """logits: [S, V] float32 -> S token ids."""
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, t in enumerate(temperatures) if t > 0.0]
        if sampled:
            rows = torch.tensor(sampled, device=logits.device)
            temps = torch.tensor([temperatures[i] for i in sampled], device=logits.device)
            ks = torch.tensor([top_ks[i] for i in sampled], device=logits.device)
            ps = torch.tensor([top_ps[i] for i in sampled], device=logits.device)
            scaled = apply_top_k_top_p(logits[rows] / temps[:, None], ks, ps)
            probs = scaled.softmax(dim=-1)
            for j, i in enumerate(sampled):
                gen = self._generator(seq_ids[i], seeds[i])
                tokens[i] = torch.multinomial(probs[j], 1, generator=gen)[0]
        return tokens.tolist()
