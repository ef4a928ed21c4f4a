"""BlockManager: block arithmetic, growth, free, slots, and that capacity is never exceeded."""

import random

import pytest

from serving.block_manager import BlockManager
from serving.sampling import SamplingParams
from serving.sequence import Sequence


def seq(num_tokens: int = 1) -> Sequence:
    return Sequence("r", list(range(num_tokens)), SamplingParams())


def check_ownership(bm: BlockManager, seqs: list[Sequence]) -> None:
    owned = [b for s in seqs for b in s.block_table]
    free = list(bm._free)
    assert len(owned) == len(set(owned)), "a block is owned twice"
    assert not set(owned) & set(free), "a block is both owned and free"
    assert sorted(owned + free) == list(range(bm.num_blocks))
    assert bm.num_used_blocks == len(owned)


@pytest.mark.parametrize("block_size, num_tokens, blocks", [
    (4, 0, 0), (4, 1, 1), (4, 4, 1), (4, 5, 2), (4, 8, 2), (4, 9, 3), (1, 7, 7), (16, 16, 1), (16, 17, 2),
])
def test_blocks_for(block_size, num_tokens, blocks):
    assert BlockManager(8, block_size).blocks_for(num_tokens) == blocks


def test_grow_adds_only_missing_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq()
    bm.grow(s, 5)
    assert len(s.block_table) == 2 and bm.num_free_blocks == 6
    bm.grow(s, 8)  # still inside the second block
    assert len(s.block_table) == 2
    assert bm.num_new_blocks(s, 9) == 1
    bm.grow(s, 9)
    assert len(s.block_table) == 3 and bm.num_used_blocks == 3
    bm.grow(s, 3)  # never shrinks
    assert len(s.block_table) == 3


def test_capacity_is_never_exceeded():
    bm = BlockManager(num_blocks=3, block_size=4)
    a, b = seq(), seq()
    bm.grow(a, 8)
    assert bm.can_grow(b, 4) and not bm.can_grow(b, 5)
    assert bm.can_grow(a, 12) and not bm.can_grow(a, 13)
    with pytest.raises(AssertionError):
        bm.grow(b, 5)
    assert b.block_table == [] and bm.num_free_blocks == 1  # a refused grow takes nothing


def test_free_returns_every_block_and_resets_progress():
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = seq(), seq()
    bm.grow(a, 5)
    bm.grow(b, 4)
    a.num_computed_tokens = 5
    taken = list(a.block_table)
    bm.free(a)
    assert a.block_table == [] and a.num_computed_tokens == 0
    assert bm.num_free_blocks == 4
    # NOTE: freed blocks are reused last
    assert list(bm._free)[-len(taken):] == taken
    bm.free(b)
    assert bm.num_free_blocks == 6 and bm.num_used_blocks == 0
    check_ownership(bm, [a, b])


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_slots_follow_the_block_table_and_never_collide(block_size):
    bm = BlockManager(num_blocks=40, block_size=block_size)
    seqs = [seq() for _ in range(3)]
    lens = [1, 2 * block_size + 1, 5 * block_size]
    for s, n in zip(seqs, lens):
        bm.grow(s, n)
    slots = []
    for s, n in zip(seqs, lens):
        for p in range(n):
            slot = bm.slot(s, p)
            assert slot == s.block_table[p // block_size] * block_size + p % block_size
            assert slot // block_size == s.block_table[p // block_size]
            assert 0 <= slot < bm.num_blocks * block_size
            slots.append(slot)
    assert len(slots) == len(set(slots))
    # consecutive positions inside one block are consecutive slots
    s = seqs[1]
    assert [bm.slot(s, p) for p in range(block_size)] == list(range(s.block_table[0] * block_size,
                                                                    (s.block_table[0] + 1) * block_size))


def test_random_grow_and_free_keeps_every_block_accounted_for():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=20, block_size=4)
    live: list[tuple[Sequence, int]] = []
    for _ in range(500):
        if live and rng.random() < 0.3:
            s, _ = live.pop(rng.randrange(len(live)))
            bm.free(s)
        elif live and rng.random() < 0.5:
            i = rng.randrange(len(live))
            s, n = live[i]
            n2 = n + rng.randint(1, 9)
            if bm.can_grow(s, n2):
                bm.grow(s, n2)
                live[i] = (s, n2)
            else:
                assert bm.num_new_blocks(s, n2) > bm.num_free_blocks
        else:
            s, n = seq(), rng.randint(1, 30)
            if bm.can_grow(s, n):
                bm.grow(s, n)
                live.append((s, n))
        for s, n in live:
            assert len(s.block_table) == bm.blocks_for(n)
        check_ownership(bm, [s for s, _ in live])
    for s, _ in live:
        bm.free(s)
    assert bm.num_free_blocks == bm.num_blocks
