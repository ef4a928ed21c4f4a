"""Rank 0's grammar state for a batch: one matcher per constrained sequence and each step's masks."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import llguidance
import torch

from serving.structured.grammar import GrammarCompiler, GrammarMatcher
from serving.structured.mask import allocate_bitmask, apply_bitmask
from serving.structured.spec import JsonSpec


class StructuredOutputs:
    """Matchers by sequence id, next to the sampler (like its random streams); see the package docstring."""

    def __init__(self, compiler: GrammarCompiler, parallel: Optional[bool] = None):
        """parallel: compute a step's masks on llguidance's thread pool (default: with 4 CPUs or more;
        on 2 cores one call per row was faster, 0.37 vs 0.43 ms for 32 rows)."""
        self.compiler = compiler
        self._matchers: dict[int, GrammarMatcher] = {}
        self._closed_early: set[int] = set()  # sequences whose document was closed for max_tokens
        self._bitmask = allocate_bitmask(1, compiler.vocab_size)  # grown on demand, reused
        if parallel is None:
            parallel = len(os.sched_getaffinity(0)) >= 4
        self._executor = llguidance.LLExecutor() if parallel else None

    @property
    def parallel(self) -> bool:
        return self._executor is not None

    def add(self, seq_id: int, spec: JsonSpec) -> None:
        """Starts `seq_id` at the beginning of `spec`'s grammar; ValueError if it does not compile."""
        self._matchers[seq_id] = self.compiler.matcher(spec)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._matchers

    def matcher(self, seq_id: int) -> GrammarMatcher:
        """`seq_id`'s matcher (speculative decoding rolls it back)."""
        return self._matchers[seq_id]

    def release(self, seq_ids: Sequence[int]) -> None:
        """Forgets finished or aborted sequences (not preempted ones: their accepted tokens still count)."""
        for seq_id in seq_ids:
            self._matchers.pop(seq_id, None)
            self._closed_early.discard(seq_id)

    def mask(self, logits: torch.Tensor, rows: Sequence[int], seq_ids: Sequence[int],
             tokens_left: Sequence[int]) -> None:
        """Masks logits[rows[i]] to the tokens that seq_ids[i]'s grammar allows next, in place.

        logits: [S, V]; rows: the constrained rows (indices into logits); seq_ids: their sequences, each
        added before; tokens_left: how many tokens each may still generate, this one included
        (max_tokens and the context limit): near the end, a row may take only its document's
        shortest closing (`GrammarMatcher.forced_token`). Other rows are untouched; with no rows
        nothing runs.
        """
        if not rows:
            return
        assert len(rows) == len(seq_ids) == len(tokens_left)
        if self._bitmask.shape[0] < len(rows):
            self._bitmask = allocate_bitmask(max(len(rows), 2 * self._bitmask.shape[0]), self.compiler.vocab_size)
        free = []  # (matcher, bitmask row) for the rows the grammar's mask decides
        for i, seq_id in enumerate(seq_ids):
            matcher = self._matchers[seq_id]
            forced = matcher.forced_token(tokens_left[i])
            if forced is None:
                free.append((matcher, i))
            else:
                self._closed_early.add(seq_id)
                self._bitmask[i].zero_()
                self._bitmask[i, forced // 32] = _int32_bit(forced % 32)
        if self._executor is not None and len(free) > 1:
            # NOTE: one call for the batch; llguidance computes the masks on its own threads, without the GIL
            self._executor.unsafe_compute_mask_ptr([(m.llg_matcher, i) for m, i in free], self._bitmask.data_ptr(),
                                                   self._bitmask.shape[1] * 4, self._bitmask.shape[0])
        else:
            for matcher, i in free:
                matcher.fill_mask(self._bitmask, i)
        apply_bitmask(logits, rows, self._bitmask)

    def accept(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> list[bool]:
        """Advances each sequence past its sampled token; True where its document is now complete.

        The engine ends a complete sequence at once (finish reason "stop", or "length" where
        `closed_early`), so EOS is never sampled for it. A token the grammar forbids (never sampled
        under the mask) leaves its matcher broken, and that sequence is reported complete too rather
        than decoding past the error.
        """
        done = []
        for seq_id, token in zip(seq_ids, token_ids):
            matcher = self._matchers[seq_id]
            matcher.accept(token)
            done.append(matcher.is_finished())
        return done

    def closed_early(self, seq_id: int) -> bool:
        """The document was closed short because max_tokens was near (finish reason "length")."""
        return seq_id in self._closed_early


def _int32_bit(bit: int) -> int:
    """1 << bit as an int32 word (bit 31 is the sign bit)."""
    return (1 << bit) - (1 << 32 if bit == 31 else 0)
