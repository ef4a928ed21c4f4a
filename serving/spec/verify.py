"""Rank 0's side of speculation: proposing by early exit and verifying proposals, over one step's
logits. Called by `serving.model_runner.StepRunner`; the rules themselves are in acceptance.py."""

from __future__ import annotations

import itertools
from typing import Optional

import torch

from serving.sampling import Sampler
from serving.spec.acceptance import accept_greedy, accept_sampled, sample_from, target_probs
from serving.step import StepInput


def _rows_params(inp: StepInput, rows: list[int]):
    return ([inp.temperatures[j] for j in rows], [inp.top_ks[j] for j in rows], [inp.top_ps[j] for j in rows],
            [inp.min_ps[j] for j in rows] if inp.min_ps else None)


def propose(logits: torch.Tensor, inp: StepInput, sampler: Sampler) -> tuple[list[int], Optional[torch.Tensor]]:
    """An early-exit pass: logits [S, V] of the sampled rows -> (one proposal per row, q [sampled rows, V]
    of the rows with temperature > 0, in row order; None when every row is greedy)."""
    tokens = logits.argmax(dim=-1).tolist()  # [S]
    sampled = [j for j, t in enumerate(inp.temperatures) if t > 0.0]
    if not sampled:
        return tokens, None
    q = target_probs(logits[sampled], *_rows_params(inp, sampled))  # [N, V]
    u = torch.tensor([sampler.uniforms(inp.seq_ids[j], inp.seeds[j], 1)[0] for j in sampled])
    for j, t in zip(sampled, sample_from(q, u).tolist()):
        tokens[j] = t
    return tokens, q


def verify(logits: torch.Tensor, inp: StepInput, sampler: Sampler) -> list[list[int]]:
    """logits: [S + proposals, V], each sampled row's m + 1 kept positions in order. Returns, per row
    with proposals (num_proposals > 0), the 1..m + 1 tokens it emits."""
    props = inp.num_proposals
    offsets = [0, *itertools.accumulate(m + 1 for m in props)]  # each row's first kept position
    starts = [0, *itertools.accumulate(inp.query_lens)]  # each sequence's first packed token
    spec = [j for j, m in enumerate(props) if m > 0]
    greedy = [j for j in spec if inp.temperatures[j] == 0.0]
    argmax = {}
    if greedy:
        picked = torch.cat([torch.arange(offsets[j], offsets[j + 1]) for j in greedy])
        flat = logits[picked].argmax(dim=-1).tolist()
        pos = 0
        for j in greedy:
            argmax[j] = flat[pos:pos + props[j] + 1]
            pos += props[j] + 1
    out = []
    for j in spec:
        m, end = props[j], starts[inp.sample_rows[j] + 1]
        proposals = inp.token_ids[end - m:end]  # the row's last m packed tokens follow its last real one
        if j in argmax:
            out.append(accept_greedy(argmax[j], proposals))
            continue
        rows = logits[offsets[j]:offsets[j + 1]]  # [m + 1, V]
        (temp,), (top_k,), (top_p,), min_p = _rows_params(inp, [j])
        p = target_probs(rows, [temp] * (m + 1), [top_k] * (m + 1), [top_p] * (m + 1),
                         None if min_p is None else min_p * (m + 1))
        q = inp.draft_probs[j] if inp.draft_probs else None
        if q is not None and q.device != p.device:
            q = q.to(p.device)
        u = sampler.uniforms(inp.seq_ids[j], inp.seeds[j], m + 1)
        out.append(accept_sampled(p, q, proposals, u[:m], u[m]))
    return out
