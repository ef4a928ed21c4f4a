"""KV-cache block bookkeeping: which fixed-size blocks each sequence holds, and which full blocks
hold a known token prefix (prefix caching). Pure Python.

The tensors live in the workers (serving/model_runner.py); a token at position p of a sequence
sits in slot `block_table[p // block_size] * block_size + p % block_size` of every layer's pool.

Prefix caching: a block whose `block_size` positions are all computed is registered under its
content, the key (parent block, the parent's generation, its tokens). A block's K/V depend only on
the tokens up to its end, so a new sequence whose prompt starts with the same tokens takes the
registered blocks into its table (a reference each) instead of computing them again: n choices of
one prompt, a shared system prompt, the next turn of a conversation, a preempted sequence coming
back. The key names the parent by its block number and generation (how often that block was handed
out), so it is exact (no hash can collide) and a child never outlives the content of its parent: a
block handed out anew gets a new generation, and keys naming the old one can no longer be built.
A registered block whose last reference is dropped stays free *and* registered: it is handed out
again last (free blocks leave oldest first, a sequence's blocks go back last block first, so a
prefix outlives its tail), and until then a sequence with that prefix can take it back.
Only full blocks are shared, so no sequence ever writes into a block another one reads.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from serving.sequence import Sequence

BlockKey = tuple  # (parent block or -1, the parent's generation, the block's tokens)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first
        self._refs = [0] * num_blocks
        self._generation = [0] * num_blocks
        self._key_of: dict[int, BlockKey] = {}  # registered block -> its key
        self._by_key: dict[BlockKey, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Registered blocks, in use or free."""
        return len(self._key_of)

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
            block, _ = self._free.popitem(last=False)
            key = self._key_of.pop(block, None)
            if key is not None:  # its old content is about to be overwritten
                del self._by_key[key]
            self._generation[block] += 1
            self._refs[block] = 1
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        # NOTE: a block goes back to the end of the free queue, so a just-freed block is handed out
        # last; the sequence's last block first, so its prefix stays registered longest.
        for block in reversed(seq.block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    # ---- prefix caching -----------------------------------------------------------------------

    def _key(self, seq: Sequence, j: int) -> BlockKey:
        """The key of block j of `seq` (its blocks before j are in its table)."""
        bs = self.block_size
        parent = seq.block_table[j - 1] if j else -1
        return parent, self._generation[parent] if j else 0, tuple(seq.token_ids[j * bs:(j + 1) * bs])

    def first_block_key(self, seq: Sequence) -> Optional[BlockKey]:
        """The key of a sequence's first block if its prompt could share it, else None."""
        if not self.may_share(seq) or len(seq) <= self.block_size:
            return None
        return self._key(seq, 0)

    def may_share(self, seq: Sequence) -> bool:
        """Whether `seq` may take cached blocks."""
        # NOTE: prompt log-probabilities need every prompt position's logits: nothing is skipped
        return self.enable_prefix_caching and seq.params.prompt_logprobs is None

    def take_cached_prefix(self, seq: Sequence) -> int:
        """For a sequence that holds no blocks: takes the registered blocks of its longest computed
        prefix into its table and marks their tokens computed. At least its last token is left to
        compute (its logits are needed). Returns the number of tokens taken."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.may_share(seq):
            return 0
        for j in range((len(seq) - 1) // self.block_size):
            block = self._by_key.get(self._key(seq, j))
            if block is None:
                break
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
            seq.block_table.append(block)
        seq.num_registered_blocks = len(seq.block_table)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        return seq.num_computed_tokens

    def register_computed(self, seq: Sequence) -> None:
        """Registers the blocks of `seq` that are now full of computed tokens (after a step). A block
        whose content another block already holds (both computed in the same step) stays private."""
        if not self.enable_prefix_caching:
            return
        for j in range(seq.num_registered_blocks, seq.num_computed_tokens // self.block_size):
            block = seq.block_table[j]
            key = self._key(seq, j)
            if key not in self._by_key and block not in self._key_of:
                self._by_key[key] = block
                self._key_of[block] = key
        seq.num_registered_blocks = max(seq.num_registered_blocks, seq.num_computed_tokens // self.block_size)

    def reset_prefix_cache(self) -> None:
        """Forget every registered block (the blocks and their holders stay as they are)."""
        self._key_of.clear()
        self._by_key.clear()
