"""Sampling parameters and the sampler (pure tensor functions).

Per-request reproducibility: a request with a `seed` gets its own random stream (`random.Random`),
one draw per token of its own, so its output does not depend on what else is in the batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional

import torch

from serving.structured import JsonSpec


# Below this, a temperature samples as greedy (as vLLM does): logits / t would overflow float32 near 0,
# and the distribution is already all but one-hot.
MIN_TEMPERATURE = 1e-5
# A top_k past any vocabulary keeps every token, as -1 does; as -1 it also fits the int64 tensors of a step.
MAX_TOP_K = 2**31 - 1


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = disabled
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one (0 = off)
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    # Token ids that end the sequence: the model's EOS ids (unless ignore_eos) and the request's
    # stop_token_ids. Their text is not emitted unless include_stop_str_in_output.
    stop_token_ids: tuple[int, ...] = field(default=())
    min_tokens: int = 0  # stop_token_ids and stop strings are held back until this many tokens
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Logits processing (serving/logits_processors.py)
    repetition_penalty: float = 1.0  # > 1 discourages any token of the prompt or the output (CTRL, as HF)
    presence_penalty: float = 0.0  # OpenAI: minus this once a token was generated
    frequency_penalty: float = 0.0  # OpenAI: minus this per time a token was generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    logprobs: Optional[int] = None  # the sampled token's log-probability and this many top ones; None = off
    prompt_logprobs: Optional[int] = None  # the same for every prompt token (the first has none)
    json_spec: Optional[JsonSpec] = None  # the output is this JSON (serving/structured); None = free text

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def request_sampling_params(request, max_tokens: int, eos_token_ids: tuple[int, ...]) -> SamplingParams:
    """The engine's parameters for one OpenAI request (`serving.protocol`): a chat or completion
    request, one choice of it (the router sends each of n choices as its own request)."""
    stop_ids = tuple(request.stop_token_ids or ()) + (() if request.ignore_eos else tuple(eos_token_ids))
    return SamplingParams(
        max_tokens=max_tokens, temperature=request.temperature if request.temperature >= MIN_TEMPERATURE else 0.0,
        top_p=request.top_p, top_k=request.top_k if request.top_k <= MAX_TOP_K else -1, min_p=request.min_p,
        seed=request.seed, stop=tuple(request.stop_list), stop_token_ids=tuple(dict.fromkeys(stop_ids)),
        min_tokens=request.min_tokens,
        include_stop_str_in_output=request.include_stop_str_in_output,
        skip_special_tokens=request.skip_special_tokens, repetition_penalty=request.repetition_penalty,
        presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
        logit_bias=request.logit_bias_pairs, logprobs=request.num_logprobs,
        prompt_logprobs=request.num_prompt_logprobs, json_spec=request.json_spec)


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


def min_p_filter(logits: torch.Tensor, min_ps: torch.Tensor) -> torch.Tensor:
    """logits: [N, V] (after temperature); min_ps: [N] (0 = off). Sets at -inf every token whose
    probability is below min_p times the row's highest.

    p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p): no softmax needed (log 0 = -inf keeps all).
    """
    floor = logits.max(dim=-1, keepdim=True).values + min_ps.log()[:, None]  # [N, 1]
    return logits.masked_fill(logits < floor, float("-inf"))


def inverse_cdf_sample(cdf: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """cdf: [N, K] each row's cumulative probabilities; uniforms: [N] in [0, 1) -> [N] candidate indices.

    x = u * cdf[K-1] is uniform on [0, cdf[K-1]) and lands in candidate i's interval [cdf[i-1], cdf[i])
    with probability p_i / sum(p): one uniform per row, so a seeded row consumes one number of its
    own stream per token (torch.multinomial draws an exponential per candidate: ~60 us a 4096-token row).
    """
    total = cdf[:, -1:]  # [N, 1]
    # NOTE: x < total, so a zero-probability candidate (a flat step of the cdf) is never picked, even as u -> 1
    x = torch.minimum(uniforms[:, None] * total, total.nextafter(torch.zeros_like(total)))
    # NOTE: a row whose cdf is NaN (an infinite logit, e.g. from a repetition penalty near 0) would pick
    # past its end; clamped, it gets a meaningless but valid token and the step goes on for every row
    return torch.searchsorted(cdf, x, right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1)


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

    def uniforms(self, seq_id: int, seed: Optional[int], n: int) -> list[float]:
        """n draws from the sequence's own stream (seeded) or the shared one: speculative acceptance."""
        stream = self._stream(seq_id, seed)
        return [stream.random() for _ in range(n)]

    def sample(self, logits: torch.Tensor, seq_ids: list[int], temperatures: list[float], top_ps: list[float],
               top_ks: list[int], seeds: list[Optional[int]], min_ps: Optional[list[float]] = None) -> list[int]:
        """logits: [S, V] float32 -> S token ids. `min_ps` (None or empty: all 0) applies to sampled rows only:
        the most likely token always survives it, so it never changes a greedy row."""
        tokens = logits.argmax(dim=-1)  # [S]
        sampled = [i for i, t in enumerate(temperatures) if t > 0.0]
        if not sampled:  # NOTE: a greedy batch draws, sorts and normalises nothing
            return tokens.tolist()
        vocab, dev = logits.shape[-1], logits.device
        rows = torch.tensor(sampled, device=dev)
        temps = torch.tensor([temperatures[i] for i in sampled], device=dev)[:, None]
        scaled = (logits if len(sampled) == len(temperatures) else logits[rows]) / temps  # [N, V]
        if min_ps and any(min_ps[i] > 0.0 for i in sampled):
            scaled = min_p_filter(scaled, torch.tensor([min_ps[i] for i in sampled], device=dev))
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
