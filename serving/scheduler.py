"""The continuous-batching scheduler: every step, which sequences run and how many tokens each.

Pure Python over two queues. Per step, within `max_num_batched_tokens` and `max_num_seqs`:
1. running sequences first, oldest first: one decode token each, or the next chunk of a prompt
   still being prefilled (chunked prefill, so a long prompt never stalls decoding);
2. then waiting sequences, oldest first, as long as tokens, sequence slots and KV blocks allow;
   each first takes the computed blocks of its longest cached prefix (serving/block_manager.py),
   and a prompt whose first block another prompt computes in this step waits for the next one.
When a running sequence needs a block and none is free, the newest running sequence is preempted:
its blocks are freed and it goes back to the front of the waiting queue, to be recomputed from its
tokens (prompt plus what it has generated) when there is room.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from serving.block_manager import BlockManager
from serving.config import SchedulerConfig
from serving.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    # (sequence, number of its tokens computed this step), in the order they are packed
    entries: list[tuple[Sequence, int]] = field(default_factory=list)
    # Per entry, the speculative positions reserved after its last token (tokens and KV slots);
    # 0 for prefill chunks and for sequences that do not speculate this step.
    lookahead: list[int] = field(default_factory=list)
    num_preempted: int = 0
    # Admitted this step: tokens of the sequences that looked in the prefix cache, and of them found
    num_prefix_queried_tokens: int = 0
    num_prefix_hit_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.entries) + sum(self.lookahead)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(n for s, n in self.entries if s.is_prefill)

    @property
    def num_decode_tokens(self) -> int:
        """Decode positions: each decoding sequence's last token and its speculative ones."""
        return self.num_tokens - self.num_prefill_tokens

    def __bool__(self) -> bool:
        return bool(self.entries)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self, lookahead: Optional[Callable[[Sequence], int]] = None) -> ScheduledBatch:
        """lookahead(seq): speculative positions wanted after a decoding sequence's last token. They
        are budgeted like tokens and given KV slots when free, never by preempting anyone."""
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0 and len(batch.entries) < self.config.max_num_seqs:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            if n > 1:  # a prefill chunk shrinks to the free slots before anyone is preempted
                n = max(1, min(n, self._fit(seq)))
            k = 0
            if lookahead is not None and seq.num_uncomputed_tokens == 1:
                k = min(lookahead(seq), budget - 1)
                if k > 0 and not self.blocks.can_grow(seq, seq.num_computed_tokens + 1 + k):
                    k = 0
            while not self.blocks.can_grow(seq, seq.num_computed_tokens + n) and self.running[-1] is not seq:
                self._preempt(self.running[-1])
                batch.num_preempted += 1
            if not self.blocks.can_grow(seq, seq.num_computed_tokens + n):
                self._preempt(seq)  # the newest sequence left cannot grow: it waits
                batch.num_preempted += 1
                break
            self.blocks.grow(seq, seq.num_computed_tokens + n + k)
            batch.entries.append((seq, n))
            batch.lookahead.append(k)
            budget -= n + k
            i += 1
        if batch.num_preempted:
            return batch  # NOTE: admit nothing new while memory is short
        # First-block keys of prompts being prefilled: a waiting prompt that starts the same way and
        # finds nothing cached waits for their blocks (n choices of one prompt arrive together)
        prefilling = {self.blocks.first_block_key(s) for s in self.running if s.is_prefill} - {None}
        i = 0
        while i < len(self.waiting) and budget > 0 and len(batch.entries) < self.config.max_num_seqs:
            seq = self.waiting[i]
            cached = self.blocks.take_cached_prefix(seq)
            first = self.blocks.first_block_key(seq)
            if not cached and first in prefilling:
                i += 1
                continue
            n = min(seq.num_uncomputed_tokens, budget, self._fit(seq))
            if n <= 0:
                self.blocks.free(seq)  # the blocks it took back stay registered
                break
            del self.waiting[i]
            if self.blocks.may_share(seq):
                batch.num_prefix_queried_tokens += len(seq)
                batch.num_prefix_hit_tokens += cached
            if not seq.num_preemptions:
                seq.num_cached_prompt_tokens = cached
            if first is not None and not cached:
                prefilling.add(first)  # its first block is computed in this step
            self.blocks.grow(seq, seq.num_computed_tokens + n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.entries.append((seq, n))
            batch.lookahead.append(0)
            budget -= n
        return batch

    def _fit(self, seq: Sequence) -> int:
        """How many more tokens `seq` can compute with its blocks plus all free blocks."""
        return (len(seq.block_table) + self.blocks.num_free_blocks) * self.blocks.block_size - seq.num_computed_tokens

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)  # recompute later from seq.token_ids
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends `seq` (done, or aborted) and returns its blocks."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
