"""KV-cache block bookkeeping: which fixed-size blocks each sequence holds. Pure Python.

The tensors live in the workers (serving/model_runner.py); a token at position p of a sequence
sits in slot `block_table[p // block_size] * block_size + p % block_size` of every layer's pool.
"""

from __future__ import annotations

from collections import deque

from serving.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` must add so that its first `num_tokens` tokens have slots."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_tokens) <= len(self._free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Gives `seq` slots for its first `num_tokens` tokens. The caller checked `can_grow`."""
        need = self.num_new_blocks(seq, num_tokens)
        assert need <= len(self._free), "grow() without can_grow()"
        for _ in range(need):
            seq.block_table.append(self._free.popleft())

    def free(self, seq: Sequence) -> None:
        # NOTE: freed blocks go to the back so a just-freed block is reused last.
        self._free.extend(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
