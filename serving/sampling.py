"""Sampling parameters and the sampler (pure tensor functions).

Per-request reproducibility: a request with a `seed` gets its own random stream (`random.Random`),
one draw per token of its own, so its output does not depend on what else is in the batch.
"""

from __future__ import annotations

import random
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


def top_k_top_p(logits: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's best candidates, best first, with those outside its top-k and nucleus (top-p) set at -inf.

    logits: [B, V]; top_ks: [B] int (<= 0 or >= V = off); top_ps: [B] float (1.0 = off).
    Returns (logits [B, K], their vocabulary ids [B, K]), K the largest top-k in use (V when a row has
    none): nothing past a row's top-k survives, so only the K best are sorted.
    NOTE: sorting a whole 4096-token row costs ~0.2 ms here, more than its top 50 by ~20x.
    """
    vocab = logits.shape[-1]
    k = torch.where((top_ks <= 0) | (top_ks >= vocab), vocab, top_ks)[:, None]  # [B, 1]
    top = int(k.max())
    # [B, K] best first (topk of the whole row is slower than a sort)
    sorted_logits, order = logits.topk(top, dim=-1) if top < vocab else logits.sort(dim=-1, descending=True)
    rank = torch.arange(sorted_logits.shape[-1], device=logits.device)[None, :]  # [1, K]
    drop = rank >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # keep the smallest prefix whose mass reaches p: drop a token when the mass before it already does
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_ps[:, None]
    drop[:, 0] = False  # the top token always survives
    return sorted_logits.masked_fill(drop, float("-inf")), order


def inverse_cdf_sample(cdf: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """cdf: [N, K] each row's cumulative probabilities; uniforms: [N] in [0, 1) -> [N] candidate indices.

    x = u * cdf[K-1] is uniform on [0, cdf[K-1]) and lands in candidate i's interval [cdf[i-1], cdf[i])
    with probability p_i / sum(p): one uniform per row, so a seeded row consumes one number of its
    own stream per token (torch.multinomial draws an exponential per candidate: ~60 us a 4096-token row).
    """
    total = cdf[:, -1:]  # [N, 1]
    # NOTE: x < total, so a zero-probability candidate (a flat step of the cdf) is never picked, even as u -> 1
    x = torch.minimum(uniforms[:, None] * total, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True)[:, 0]


class Sampler:
    """Turns a step's logits into one token per sequence; owns the per-request random streams."""

    def __init__(self):
        self._streams: dict[int, random.Random] = {}
        self._shared = random.Random()  # unseeded requests; seeded from the OS

    def release(self, seq_ids) -> None:
        for sid in seq_ids:
            self._streams.pop(sid, None)

    def _stream(self, seq_id: int, seed: Optional[int]) -> random.Random:
        if seed is None:
            return self._shared
        stream = self._streams.get(seq_id)
        if stream is None:
            stream = self._streams[seq_id] = random.Random(seed)
        return stream

    def sample(self, logits: torch.Tensor, seq_ids: list[int], temperatures: list[float], top_ps: list[float],
               top_ks: list[int], seeds: list[Optional[int]]) -> list[int]:
        """logits: [S, V] float32 -> S token ids."""
        tokens = logits.argmax(dim=-1)  # [S]
        sampled = [i for i, t in enumerate(temperatures) if t > 0.0]
        if not sampled:  # NOTE: a greedy batch draws, sorts and normalises nothing
            return tokens.tolist()
        vocab, dev = logits.shape[-1], logits.device
        rows = torch.tensor(sampled, device=dev)
        temps = torch.tensor([temperatures[i] for i in sampled], device=dev)[:, None]
        scaled = (logits if len(sampled) == len(temperatures) else logits[rows]) / temps  # [N, V]
        ks, ps = [top_ks[i] for i in sampled], [top_ps[i] for i in sampled]
        ids = None  # [N, K] vocabulary ids of the candidates, None: the whole vocabulary in order
        if any(0 < k < vocab for k in ks) or any(p < 1.0 for p in ps):
            scaled, ids = top_k_top_p(scaled, torch.tensor(ks, device=dev), torch.tensor(ps, device=dev))
        uniforms = torch.tensor([self._stream(seq_ids[i], seeds[i]).random() for i in sampled], device=dev)
        # NOTE: float32 sums misplace at most ~1e-7 of probability per candidate; a float64 copy of a
        # batch's probabilities cost more than the rest of sampling (fresh pages for every MB)
        pick = inverse_cdf_sample(scaled.softmax(dim=-1).cumsum_(dim=-1), uniforms)  # [N]
        tokens[rows] = pick if ids is None else ids.gather(1, pick[:, None])[:, 0]
        return tokens.tolist()
