"""BlockManager: block arithmetic, growth, free, slots, that capacity is never exceeded, and prefix caching."""

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
    # NOTE: freed blocks are reused last, the sequence's last block first
    assert list(bm._free)[-len(taken):] == taken[::-1]
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


# ---- prefix caching ---------------------------------------------------------------------------

def tokens_seq(tokens, **params) -> Sequence:
    return Sequence("r", list(tokens), SamplingParams(**params))


def compute(bm: BlockManager, s: Sequence, n: int) -> None:
    """What a step does: slots for n more tokens, then they are computed and registered."""
    bm.grow(s, s.num_computed_tokens + n)
    s.num_computed_tokens += n
    bm.register_computed(s)


def test_a_later_prompt_takes_the_full_blocks_of_its_computed_prefix():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = tokens_seq(range(10))
    compute(bm, a, 10)  # blocks 0-3, 4-7 full; 8-9 partial
    b = tokens_seq(list(range(8)) + [50, 51, 52])  # same first 8 tokens
    assert bm.take_cached_prefix(b) == 8
    assert b.block_table == a.block_table[:2] and b.num_computed_tokens == 8
    assert bm.num_used_blocks == 3  # shared: no new block yet
    compute(bm, b, 3)
    assert b.block_table[2] != a.block_table[2]  # the partial block is never shared
    c = tokens_seq(list(range(4)) + [9, 9, 9, 9, 9])  # diverges in the second block
    assert bm.take_cached_prefix(c) == 4 and c.block_table == a.block_table[:1]


def test_at_least_the_last_token_is_left_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = tokens_seq(range(8))
    compute(bm, a, 8)
    b = tokens_seq(range(8))  # the same prompt: its last token's logits are needed
    assert bm.take_cached_prefix(b) == 4 and b.num_uncomputed_tokens == 4


def test_shared_blocks_are_freed_by_their_last_holder_and_stay_cached_until_reused():
    bm = BlockManager(num_blocks=6, block_size=2)
    a = tokens_seq(range(5))
    compute(bm, a, 5)
    b = tokens_seq(range(5))
    assert bm.take_cached_prefix(b) == 4
    bm.free(a)
    assert bm.num_free_blocks == 6 - 2 - 0  # b still holds the two shared blocks; a's tail block is free
    bm.free(b)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 2
    c = tokens_seq(range(5))
    assert bm.take_cached_prefix(c) == 4 and bm.num_free_blocks == 4  # taken back from the free queue
    bm.free(c)
    # Handing out every block reuses the cached ones last (oldest freed first) and forgets them
    d = tokens_seq([7] * 12)
    bm.grow(d, 12)
    assert bm.num_cached_blocks == 0 and bm.take_cached_prefix(tokens_seq(range(5))) == 0


def test_a_child_block_is_never_matched_after_its_parent_was_reused():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = tokens_seq([1, 2, 3, 4, 5])
    compute(bm, a, 5)  # [1 2] in `parent`, [3 4] in its child
    parent, child = a.block_table[:2]
    bm.free(a)
    assert list(bm._free).index(child) < list(bm._free).index(parent)  # the free order evicts the child first
    # Force the parent out first: its new content [8 8] must not inherit the child registered under it.
    bm._free.move_to_end(parent, last=False)
    b = tokens_seq([8, 8, 3, 4, 5])
    compute(bm, b, 2)
    assert b.block_table == [parent] and child in bm._key_of  # the child is still registered ...
    probe = tokens_seq([8, 8, 3, 4, 5])
    assert bm.take_cached_prefix(probe) == 2 and probe.block_table == [parent]  # ... but not matched
    assert bm.take_cached_prefix(tokens_seq([1, 2, 3, 4, 5])) == 0


def test_prompt_logprobs_and_disabled_caching_never_share():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = tokens_seq(range(5))
    compute(bm, a, 5)
    assert bm.take_cached_prefix(tokens_seq(range(5), prompt_logprobs=0)) == 0
    off = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = tokens_seq(range(5))
    compute(off, a, 5)
    assert off.num_cached_blocks == 0 and off.take_cached_prefix(tokens_seq(range(5))) == 0


def test_random_sharing_keeps_every_reference_accounted_for():
    rng = random.Random(1)
    bm = BlockManager(num_blocks=24, block_size=2)
    prefixes = [[rng.randrange(5) for _ in range(6)] for _ in range(3)]
    live: list[Sequence] = []
    for _ in range(600):
        if live and rng.random() < 0.35:
            bm.free(live.pop(rng.randrange(len(live))))
        else:
            s = tokens_seq(rng.choice(prefixes)[:rng.randint(1, 6)] + [rng.randrange(5) for _ in range(rng.randint(1, 4))])
            cached = bm.take_cached_prefix(s)
            assert cached % 2 == 0 and cached < len(s)
            n = s.num_uncomputed_tokens
            if bm.can_grow(s, len(s)):
                compute(bm, s, n)
                live.append(s)
            else:
                bm.free(s)
        refs = {}
        for s in live:
            for b in s.block_table:
                refs[b] = refs.get(b, 0) + 1
        assert all(bm._refs[b] == n for b, n in refs.items())
        assert set(bm._free) == set(range(bm.num_blocks)) - set(refs)
        for s in live:  # a shared block holds the same tokens in every holder
            for j in range(s.num_computed_tokens // 2):
                key = bm._key_of.get(s.block_table[j])
                if key is not None:
                    assert list(key[2]) == s.token_ids[2 * j:2 * j + 2]
    for s in live:
        bm.free(s)
    assert bm.num_free_blocks == bm.num_blocks
