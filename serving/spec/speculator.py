"""The engine's speculative decoding: which sequences speculate, their proposals, what was accepted.

Per step (serving/engine.py): `plan` gives k per decoding sequence (serving/spec/policy.py), the
scheduler reserves k positions after each one's last token (`lookahead`), `propose` asks the
proposers for the batch (one call per proposer), the target verifies every row in one forward
(serving/spec/verify.py on rank 0) and `verified` learns from what it accepted.
"""

from __future__ import annotations

from serving.config import SpeculativeConfig
from serving.scheduler import ScheduledBatch
from serving.sequence import Sequence
from serving.spec.policy import MAX_PROBE_EVERY, PROBE_EVERY, LinearCost, RealizedCost, SpecPolicy
from serving.spec.proposers import Proposer
from serving.stats import StepStats


def can_speculate(seq: Sequence) -> bool:
    """Rows whose sampling reads state the proposals would change (penalties, biases, grammars) or that
    report per-token log-probabilities sample one token at a time."""
    p = seq.params
    return not (p.logprobs is not None or p.json_spec is not None or p.logit_bias or p.has_penalties
                or seq.num_output_tokens < p.min_tokens)


class Speculator:
    def __init__(self, config: SpeculativeConfig, proposers: list[Proposer], step_cost: LinearCost,
                 max_model_len: int):
        self.proposers = {p.name: p for p in proposers}
        self.auto = config.method == "auto"
        # what the clock judges for the veto: the one proposer, or auto's n-gram lookup (the draft
        # fallback is judged on its own, in `propose`)
        self.primary = "ngram" if self.auto else config.method
        self.policy = SpecPolicy(config.num_speculative_tokens, config.adaptive, step_cost)
        self.max_model_len = max_model_len
        self._steps = 0
        self._num_decoding = 0
        self._probe_every = PROBE_EVERY  # steps between probes (plan's `probe`)
        self._next_probe = PROBE_EVERY
        self.realized = RealizedCost()
        self._ks: dict[int, int] = {}  # seq id -> k planned for the coming step
        self._who: dict[int, str] = {}  # seq id -> its proposer this step
        self._proposed: dict[int, tuple[int, list[int], object]] = {}  # seq id -> (len before, proposals, q)

    def plan(self, running: list[Sequence]) -> None:
        decoding = [s for s in running if s.num_uncomputed_tokens == 1]
        num_decoding = self._num_decoding = len(decoding)  # the batch size the clock's check compares at
        self._steps += 1
        self._ks, self._who = {}, {}
        probing = num_decoding > 0 and self._steps >= self._next_probe
        if probing:
            # NOTE: back off while the clock keeps finding the probed proposer slower: a probe costs a
            # whole round (and the draft's catching up) at batch 1
            slower = self.realized.slower(num_decoding, self.primary)
            self._probe_every = min(2 * self._probe_every, MAX_PROBE_EVERY) if slower else PROBE_EVERY
            self._next_probe = self._steps + self._probe_every
        off_step = self._steps % PROBE_EVERY == PROBE_EVERY // 2  # the clock's reference ("off") now and then
        if self.policy.adaptive and (off_step or (not probing and self.realized.slower(num_decoding, self.primary))):
            return  # NOTE: no k this step: skip the planning (most steps under load, where the clock holds off)
        decoding = [s for s in decoding if can_speculate(s)]
        if not decoding:
            return
        who = [self._pick(s) for s in decoding]
        alphas = [self.policy.acceptance.alpha(s.seq_id, name) for s, name in zip(decoding, who)]
        # NOTE: k + 1 tokens may be emitted: stay one short of max_tokens and of the context
        limits = [min(s.params.max_tokens - s.num_output_tokens, self.max_model_len - len(s)) - 1 for s in decoding]
        probe = self._steps % len(decoding) if probing else -1
        ks = self.policy.plan(alphas, limits, who, probe)
        if self.policy.adaptive and self.realized.slower(num_decoding, self.primary):
            ks = [k if i == probe else 0 for i, k in enumerate(ks)]
        self._ks = {s.seq_id: k for s, k in zip(decoding, ks) if k > 0}
        self._who = {s.seq_id: name for s, name in zip(decoding, who)}

    def _pick(self, seq: Sequence) -> str:
        """auto: n-gram lookup (free) unless the draft has been accepting clearly more for this sequence;
        a sequence the lookup finds nothing for asks the draft in the same step (`propose`)."""
        if not self.auto:
            return next(iter(self.proposers))
        acc = self.policy.acceptance
        return "draft" if acc.alpha(seq.seq_id, "draft") > acc.alpha(seq.seq_id, "ngram") + 0.2 else "ngram"

    def lookahead(self, seq: Sequence) -> int:
        return self._ks.get(seq.seq_id, 0)

    def propose(self, batch: ScheduledBatch) -> dict[int, tuple[list[int], object]]:
        """seq id -> (its proposals, q or None) for the batch's sequences that reserved positions."""
        groups: dict[str, list[tuple[Sequence, int]]] = {}
        for (seq, _), k in zip(batch.entries, batch.lookahead):
            if k:
                groups.setdefault(self._who[seq.seq_id], []).append((seq, k))
        out: dict[int, tuple[list[int], object]] = {}
        empty = self._ask("ngram", groups.pop("ngram", []), out)
        probing = self._steps % self._probe_every == 0
        if self.auto and empty and (probing or not self.realized.slower(self._num_decoding, "draft")):
            groups.setdefault("draft", []).extend(empty)  # auto: what the lookup found nothing for
        for name, rows in groups.items():
            self._ask(name, rows, out)
        return out

    def _ask(self, name: str, rows: list[tuple[Sequence, int]], out: dict) -> list[tuple[Sequence, int]]:
        """One proposer's round for its rows, into `out`; returns the rows it proposed nothing for."""
        if not rows:
            return []
        seqs, ks = [s for s, _ in rows], [k for _, k in rows]
        result = self.proposers[name].propose(seqs, ks)
        self.policy.observe_round(name, len(seqs), max(ks), result.time_s)
        empty = []
        for (seq, k), tokens, q in zip(rows, result.tokens, result.probs):
            if tokens:
                out[seq.seq_id] = (tokens, q)
                self._proposed[seq.seq_id] = (len(seq), tokens, name)
            else:
                empty.append((seq, k))
        return empty

    def verified(self, seq: Sequence, emitted: list[int], stats: StepStats) -> None:
        """The target emitted `emitted` after `seq`'s proposals: all accepted ones, then its own token."""
        num_before, tokens, name = self._proposed.pop(seq.seq_id)
        accepted = len(emitted) - 1
        self.proposers[name].verified(seq, num_before, len(tokens), accepted)
        self.policy.acceptance.observe(seq.seq_id, name, len(tokens), accepted)
        stats.num_spec_proposed += len(tokens)
        stats.num_spec_accepted += accepted
        counts = stats.spec_by_proposer.setdefault(name, [0, 0, 0])  # proposed, accepted, verified rows
        counts[0] += len(tokens)
        counts[1] += accepted
        counts[2] += 1

    def measure_proposers(self, block_size: int, num_blocks: int) -> None:
        """Each proposer's round cost at 1 and 8 sequences, from throwaway rounds on dummy sequences:
        the prior of its online fit. NOTE: before any request (they write into free blocks)."""
        from serving.sampling import SamplingParams

        ctx = min(32, num_blocks * block_size - self.policy.max_k)
        table = list(range(-(-(ctx + self.policy.max_k) // block_size)))
        k = self.policy.max_k
        for name, proposer in self.proposers.items():
            for num_seqs in (1, 8):
                seqs = [Sequence(f"calibration-{i}", [3] * ctx, SamplingParams(max_tokens=k + 1, temperature=0.0))
                        for i in range(num_seqs)]
                for seq in seqs:
                    seq.block_table = table
                proposer.propose(seqs, [k] * num_seqs)  # warm-up
                result = proposer.propose(seqs, [k] * num_seqs)
                self.policy.observe_round(name, num_seqs, k, result.time_s)
                for seq in seqs:
                    proposer.release(seq)

    def observe_step(self, num_tokens: int, stats: StepStats) -> None:
        """After a step: its cost without the proposers' rounds for the model, and for the clock's
        check the whole step's seconds per emitted token when it only decoded."""
        self.policy.step_cost.observe((num_tokens, stats.num_spec_proposed), stats.step_time_s - stats.propose_time_s)
        if stats.num_prefill_tokens == 0 and stats.num_seqs:
            by = stats.spec_by_proposer
            mode = "off" if not by else "draft" if "draft" in by else next(iter(by))  # NOTE: a draft round dominates
            self.realized.observe(stats.num_seqs, mode, stats.step_time_s, stats.num_seqs + stats.num_spec_accepted)

    def release(self, seq: Sequence) -> None:
        for p in self.proposers.values():
            p.release(seq)
        self.policy.acceptance.release(seq.seq_id)
        self._proposed.pop(seq.seq_id, None)

    def check_health(self) -> None:
        for p in self.proposers.values():
            check = getattr(p, "check_health", None)
            if check is not None:
                check()

    def shutdown(self) -> None:
        for p in self.proposers.values():
            close = getattr(p, "shutdown", None)
            if close is not None:
                close()


def measure_step_cost(executor, block_size: int, num_blocks: int) -> LinearCost:
    """The target's forward time against its tokens and proposals, from a few throwaway steps of decoding-like
    rows (1 and 5 tokens each) at 1, 8 and 32 sequences; the prior of the online fit.

    NOTE: run before any request: the rows write into free blocks, which nobody reads."""
    import time

    from serving.step import StepInput

    ctx = min(64, num_blocks * block_size)
    table = list(range(-(-ctx // block_size)))
    fit = LinearCost(0.0, 0.0, 0.0, prior_weight=1e-6)
    for num_seqs in (1, 8, 32):
        for q in (1, 5):
            inp = StepInput(token_ids=[3] * (num_seqs * q), query_lens=[q] * num_seqs, context_lens=[ctx] * num_seqs,
                            block_tables=[table] * num_seqs, block_size=block_size,
                            sample_rows=list(range(num_seqs)), seq_ids=[-1] * num_seqs,
                            temperatures=[0.0] * num_seqs, top_ps=[1.0] * num_seqs, top_ks=[-1] * num_seqs,
                            seeds=[None] * num_seqs, num_proposals=[q - 1] * num_seqs)
            executor.execute(inp)  # warm-up
            t0 = time.perf_counter()
            executor.execute(inp)
            fit.observe((num_seqs * q, num_seqs * (q - 1)), time.perf_counter() - t0)
    return fit
