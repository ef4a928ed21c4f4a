"""The draft-model proposer: a small model that shares the target's tokenizer proposes k tokens per
sequence, for the whole batch in one `propose` call per round.

The draft keeps its own block KV pools, as many blocks as the target's and of the same size, and
reads and writes them through the target's block tables: a sequence's blocks are its blocks in both
models, so the draft needs no block manager. It keeps no per-sequence state either: each request says
how much of the draft's KV is valid (`start`), and the keys and values that rejected proposals wrote
are overwritten by a later round. In a Ray actor of its own: parallel/draft_worker.py.

One round (the first forward may be a prefill chunk; the others are single-token decodes):
    forward 1:  token_ids at positions start .. start + n - 1    -> d_1 from the logits at the last one
    forward j:  d_{j-1} at position start + n + j - 2            -> d_j        (j = 2..k)
A request drops out of the batch once it has its k proposals.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

from serving.model_runner import ModelRunner
from serving.spec.acceptance import sample_from, target_probs
from serving.step import StepInput


@dataclass
class DraftRequest:
    """One sequence's part of a round."""

    seq_id: int
    # tokens the draft's KV does not hold yet, at positions start .. start + len - 1; the last one is the
    # sequence's last token
    token_ids: list[int]
    start: int  # the draft's KV holds valid keys/values for positions 0 .. start - 1 of this sequence
    # the TARGET's block ids for this sequence (the same ids index the draft's pools); they cover at least
    # start + len(token_ids) + k - 1 positions
    block_table: list[int]
    k: int  # proposals wanted (>= 1)
    temperature: float = 0.0  # 0 = greedy (argmax, no distribution returned)
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0


@dataclass
class DraftResult:
    tokens: list[list[int]]  # per request, its k proposals d_1..d_k
    # [sum of k over the sampled requests (temperature > 0), V] float32: q for each proposal of the sampled
    # requests, request after request, proposal after proposal; None when every request is greedy.
    # On the runner's device; from a DraftClient, on the CPU.
    probs: Optional[torch.Tensor]
    draft_time_s: float = 0.0  # the runner's time for the round (no transport)


class DraftRunner:
    """The draft model and its own block KV pools (as many blocks as the target's, same block size)."""

    def __init__(self, path: str, dtype: str, num_kv_blocks: int, block_size: int, device: str = "cpu",
                 seed: Optional[int] = None):
        from serving.model_loader import load_model

        self.block_size = block_size
        self.runner = ModelRunner(load_model(path, dtype, device), num_kv_blocks, block_size, device)
        self.device = self.runner.device
        self.generator = torch.Generator(device=self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    @torch.inference_mode()
    def propose(self, reqs: list[DraftRequest]) -> DraftResult:
        """max(k) forwards of the draft over the batch; see the module docstring."""
        t0 = time.perf_counter()
        bs = self.block_size
        for r in reqs:
            assert r.k >= 1 and r.token_ids, r
            assert len(r.block_table) * bs >= r.start + len(r.token_ids) + r.k - 1, f"short block table: {r}"
        tokens: list[list[int]] = [[] for _ in reqs]
        # q's rows: a sampled request's proposals start at its offset (request after request)
        offsets, num_q = {}, 0
        for i, r in enumerate(reqs):
            if r.temperature > 0.0:
                offsets[i], num_q = num_q, num_q + r.k
        probs: Optional[torch.Tensor] = None
        for j in range(max(r.k for r in reqs)):
            live = [i for i, r in enumerate(reqs) if r.k > j]  # [B_j] requests still proposing
            if j == 0:
                ids = [t for r in reqs for t in r.token_ids]
                query_lens = [len(r.token_ids) for r in reqs]
            else:
                ids = [tokens[i][-1] for i in live]
                query_lens = [1] * len(live)
            inp = StepInput(token_ids=ids, query_lens=query_lens,
                            context_lens=[reqs[i].start + len(reqs[i].token_ids) + j for i in live],
                            block_tables=[reqs[i].block_table for i in live], block_size=bs,
                            sample_rows=list(range(len(live))))
            logits = self.runner.forward(inp)  # [B_j, V] float32
            picked = logits.argmax(dim=-1)  # [B_j] greedy rows keep these
            sampled = [row for row, i in enumerate(live) if i in offsets]
            if sampled:
                if probs is None:
                    probs = torch.empty(num_q, logits.shape[-1], dtype=torch.float32, device=self.device)
                rs = [reqs[live[row]] for row in sampled]
                q = target_probs(logits[sampled], [r.temperature for r in rs], [r.top_k for r in rs],
                                 [r.top_p for r in rs], [r.min_p for r in rs])  # [S_j, V]
                uniforms = torch.rand(len(sampled), generator=self.generator, device=self.device)
                picked[sampled] = sample_from(q, uniforms)
                probs[[offsets[live[row]] + j for row in sampled]] = q
            for i, token in zip(live, picked.tolist()):
                tokens[i].append(token)
        return DraftResult(tokens, probs, time.perf_counter() - t0)
