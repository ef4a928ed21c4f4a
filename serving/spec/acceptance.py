"""Speculative decoding's acceptance rules: pure tensor functions, the maths in comments.

A speculating sequence brings k proposals d_1..d_k after its last token. The target's one verifying
forward gives its distribution at k + 1 positions: p_0 (for the token after the last one, where d_1
stands), ..., p_k (after d_k: the bonus position). The rules below emit between 1 and k + 1 tokens
so that the output is distributed exactly as if the target had sampled one token at a time.

- Greedy: d_i is accepted while it equals argmax p_{i-1}; the first mismatch is replaced by the
  target's argmax there, and if all k are accepted the bonus argmax p_k follows. Output: exactly
  the target's greedy tokens.
- Sampled (Leviathan et al. 2023; Chen et al. 2023): d_i was drawn from the proposer's q_{i-1}.
  Accept it with probability min(1, p(d_i) / q(d_i)); on the first rejection emit one token drawn
  from the residual r = max(0, p - q) / sum(max(0, p - q)) and stop; if all are accepted, emit a
  bonus token drawn from p_k. Why this is p: for any token x,
      P(emit x) = q(x) min(1, p(x)/q(x)) + (1 - sum_y min(q(y), p(y))) r(x)
                = min(q(x), p(x)) + max(0, p(x) - q(x)) = p(x).
  A deterministic proposer (n-gram lookup) is the same rule with q one-hot at d_i: accept with
  probability p(d_i), else draw from p with d_i removed (max(0, p - onehot) renormalised).
"""

from __future__ import annotations

from typing import Optional

import torch

from serving.sampling import inverse_cdf_sample, min_p_filter, top_k_top_p


def target_probs(logits: torch.Tensor, temperatures: list[float], top_ks: list[int], top_ps: list[float],
                 min_ps: Optional[list[float]] = None) -> torch.Tensor:
    """The distribution a row samples from, over the whole vocabulary: logits [N, V] -> probs [N, V].

    The same processing as `serving.sampling.Sampler` (temperature, then min-p, then top-k and
    top-p), so that the target's p and a proposer's q are what each would really sample from.
    Every temperature here is > 0 (greedy rows never need a distribution)."""
    dev = logits.device
    scaled = logits / torch.tensor(temperatures, device=dev)[:, None]
    if min_ps and any(m > 0.0 for m in min_ps):
        scaled = min_p_filter(scaled, torch.tensor(min_ps, device=dev))
    vocab = logits.shape[-1]
    if any(0 < k < vocab for k in top_ks) or any(p < 1.0 for p in top_ps):
        kept, ids = top_k_top_p(scaled, torch.tensor(top_ks, device=dev), torch.tensor(top_ps, device=dev))
        scaled = torch.full_like(scaled, float("-inf")).scatter_(1, ids, kept)
    return scaled.softmax(dim=-1)


def sample_from(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """probs: [N, V] (rows need not sum to 1); uniforms: [N] in [0, 1) -> [N] token ids, by the inverse cdf."""
    return inverse_cdf_sample(probs.cumsum(dim=-1), uniforms)


def accept_greedy(target_argmax: list[int], proposals: list[int]) -> list[int]:
    """target_argmax: [k + 1] argmax p_0..p_k; proposals: [k] d_1..d_k -> the 1..k + 1 tokens to emit."""
    out = []
    for d, t in zip(proposals, target_argmax):
        if d != t:
            break
        out.append(d)
    out.append(target_argmax[len(out)])  # the correction at the first mismatch, or the bonus token
    return out


def accept_sampled(p: torch.Tensor, q: Optional[torch.Tensor], proposals: list[int], accept_u: list[float],
                   resample_u: float) -> list[int]:
    """One row's rejection sampling.

    p: [k + 1, V] the target's distributions p_0..p_k; q: [k, V] the proposer's q_0..q_{k-1}, or None
    for a deterministic proposer (q one-hot at each proposal); proposals: [k]; accept_u: [k] and
    resample_u: uniforms in [0, 1). Returns the 1..k + 1 tokens to emit.
    """
    k = len(proposals)
    for i, d in enumerate(proposals):
        p_d = float(p[i, d])
        q_d = 1.0 if q is None else float(q[i, d])
        # accept with probability min(1, p(d) / q(d)); q(d) > 0 since d was drawn from q
        if accept_u[i] * q_d < p_d:
            continue
        # rejected: draw from max(0, p - q), renormalised (sample_from does not need it normalised)
        if q is None:
            residual = p[i].clone()
            residual[d] = 0.0
        else:
            residual = (p[i] - q[i]).clamp_(min=0.0)
        if float(residual.sum()) <= 0.0:  # NOTE: only when p == q up to rounding: then p itself is the residual's limit
            residual = p[i]
        token = int(sample_from(residual[None], torch.tensor([resample_u], device=p.device))[0])
        return [*proposals[:i], token]
    bonus = int(sample_from(p[k][None], torch.tensor([resample_u], device=p.device))[0])
    return [*proposals, bonus]
