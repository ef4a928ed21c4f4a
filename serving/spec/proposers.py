"""Proposers: each guesses up to k next tokens for a batch of decoding sequences, in one call.

- `NgramProposer`: prompt and output lookup. The sequence's last n tokens (n from ngram_max down
  to ngram_min) are looked up among its earlier tokens; the tokens that followed the latest earlier
  occurrence are the proposals. No model; its proposals are deterministic (q one-hot).
- `EarlyExitProposer`: the target's own first layers and LM head, one `exit_layers` step of the
  executor per proposal (every rank in lockstep). Their K/V land in the target's pools, exactly as
  the full pass that verifies them writes them.
- `DraftProposer`: a draft model in its own process (the draft worker, parallel/draft_worker.py),
  one round trip per round. The draft keeps its own KV pools under the target's block ids; this
  side remembers how far each sequence's draft K/V are valid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import torch

from serving.sequence import Sequence
from serving.spec.draft import DraftRequest
from serving.step import Executor, StepInput


@dataclass
class Proposals:
    tokens: list[list[int]]  # per sequence asked: up to its k proposals (maybe none)
    probs: list[Any] = field(default_factory=list)  # per sequence: q [len(tokens), V], or None (greedy, n-gram)
    time_s: float = 0.0


class Proposer(Protocol):
    name: str

    def propose(self, seqs: list[Sequence], ks: list[int]) -> Proposals:
        """Up to ks[i] proposals after each sequence's last token. Each sequence's block table has KV
        slots for len(seq) + ks[i] positions."""
        ...

    def verified(self, seq: Sequence, num_before: int, num_proposed: int, num_accepted: int) -> None:
        """The target kept num_accepted of the num_proposed tokens proposed when seq had num_before tokens."""
        ...

    def release(self, seq: Sequence) -> None:
        """seq ended: forget it."""
        ...


def _sampling(seq: Sequence) -> dict:
    p = seq.params
    return dict(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p)


class NgramProposer:
    name = "ngram"

    def __init__(self, ngram_max: int, ngram_min: int = 1):
        self.ns = range(ngram_max, ngram_min - 1, -1)
        # seq id -> (n-gram -> end of its latest occurrence, tokens indexed so far, the suffix's earlier ends)
        self._index: dict[int, tuple[dict[tuple, int], list[int], dict[int, Optional[int]]]] = {}

    def _earlier_ends(self, seq: Sequence) -> dict[int, Optional[int]]:
        """For each n: where the latest occurrence of the sequence's last n tokens before this one ends.
        NOTE: incremental, each token indexed once: O(new tokens * n) per step, not O(len)."""
        seen, done, prev = self._index.setdefault(seq.seq_id, ({}, [0], {}))
        ids = seq.token_ids
        for end in range(max(done[0], 1), len(ids) + 1):
            for n in self.ns:
                if end >= n:
                    gram = tuple(ids[end - n:end])
                    if end == len(ids):
                        prev[n] = seen.get(gram)
                    seen[gram] = end
        done[0] = len(ids) + 1
        return prev

    def propose(self, seqs: list[Sequence], ks: list[int]) -> Proposals:
        t0 = time.perf_counter()
        out = []
        for seq, k in zip(seqs, ks):
            prev = self._earlier_ends(seq)
            found: list[int] = []
            for n in self.ns:
                end = prev.get(n)
                if end is not None:
                    found = seq.token_ids[end:end + k]
                    break
            out.append(found)
        return Proposals(out, [None] * len(out), time.perf_counter() - t0)

    def verified(self, seq, num_before, num_proposed, num_accepted) -> None:
        pass

    def release(self, seq: Sequence) -> None:
        self._index.pop(seq.seq_id, None)


class EarlyExitProposer:
    name = "early_exit"

    def __init__(self, executor: Executor, block_size: int, exit_layers: int):
        self.executor = executor
        self.block_size = block_size
        self.exit_layers = exit_layers

    def propose(self, seqs: list[Sequence], ks: list[int]) -> Proposals:
        """max(ks) exit passes: pass j feeds each sequence its token at position len + j - 2 (its last
        token, then its proposals) and samples the next."""
        t0 = time.perf_counter()
        tokens: list[list[int]] = [[] for _ in seqs]
        qs: list[list] = [[] for _ in seqs]
        for j in range(max(ks)):
            rows = [i for i, k in enumerate(ks) if k > j]
            feed = [tokens[i][-1] if j else seqs[i].token_ids[-1] for i in rows]
            params = [seqs[i].params for i in rows]
            inp = StepInput(
                token_ids=feed, query_lens=[1] * len(rows),
                context_lens=[len(seqs[i]) + j for i in rows],
                block_tables=[seqs[i].block_table for i in rows], block_size=self.block_size,
                sample_rows=list(range(len(rows))), seq_ids=[seqs[i].seq_id for i in rows],
                temperatures=[p.temperature for p in params], top_ps=[p.top_p for p in params],
                top_ks=[p.top_k for p in params], seeds=[p.seed for p in params],
                min_ps=[p.min_p for p in params], exit_layers=self.exit_layers)
            out = self.executor.execute(inp)
            q_rows = iter(() if out.probs is None else out.probs)  # one per row with temperature > 0
            for r, (i, t) in enumerate(zip(rows, out.token_ids)):
                tokens[i].append(t)
                if params[r].temperature > 0.0:
                    qs[i].append(next(q_rows))
        probs = [torch.stack(q) if q else None for q in qs]
        return Proposals(tokens, probs, time.perf_counter() - t0)

    def verified(self, seq, num_before, num_proposed, num_accepted) -> None:
        pass

    def release(self, seq: Sequence) -> None:
        pass


class DraftProposer:
    name = "draft"

    def __init__(self, client):
        # parallel.draft_worker.DraftWorkerHandle (or, in tests, a serving.spec.draft.DraftRunner)
        self.client = client
        # seq id -> (the draft's K/V are valid for this many of its first tokens, its preemptions then)
        self._valid: dict[int, tuple[int, int]] = {}

    def propose(self, seqs: list[Sequence], ks: list[int]) -> Proposals:
        t0 = time.perf_counter()
        reqs = []
        for seq, k in zip(seqs, ks):
            valid, preempted = self._valid.get(seq.seq_id, (0, seq.num_preemptions))
            if preempted != seq.num_preemptions:  # NOTE: new blocks: what the draft wrote is gone
                valid = 0
            reqs.append(DraftRequest(seq.seq_id, seq.token_ids[valid:], valid, seq.block_table, k, **_sampling(seq)))
        result = self.client.propose(reqs)
        probs, row = [], 0
        for seq, proposed in zip(seqs, result.tokens):
            if seq.params.temperature > 0.0:
                probs.append(result.probs[row:row + len(proposed)])
                row += len(proposed)
            else:
                probs.append(None)
        return Proposals(result.tokens, probs, time.perf_counter() - t0)

    def verified(self, seq: Sequence, num_before: int, num_proposed: int, num_accepted: int) -> None:
        # The draft wrote K/V for the old tokens and its proposals but the last: the accepted ones are valid.
        self._valid[seq.seq_id] = (num_before + min(num_accepted, num_proposed - 1), seq.num_preemptions)

    def release(self, seq: Sequence) -> None:
        self._valid.pop(seq.seq_id, None)

    def check_health(self) -> None:
        if hasattr(self.client, "check_health"):
            self.client.check_health()

    def shutdown(self) -> None:
        if hasattr(self.client, "shutdown"):
            self.client.shutdown()
