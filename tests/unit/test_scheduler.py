"""Scheduler: token and sequence budgets, chunked prefill, FCFS, preemption, and a randomized run
checking the block invariants every step. Tokens are "sampled" by appending a constant, as the
engine does after a step."""

import random

import pytest

from serving.block_manager import BlockManager
from serving.config import SchedulerConfig
from serving.sampling import SamplingParams
from serving.scheduler import Scheduler
from serving.sequence import Sequence, SequenceStatus


def make(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=16,
         prefix_caching=False) -> Scheduler:
    """NOTE: prefix caching off unless asked: most prompts here are the same tokens."""
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                             block_size=block_size, num_kv_blocks=num_blocks)
    return Scheduler(config, BlockManager(num_blocks, block_size, prefix_caching))


def seq(name: str, prompt_len: int, max_tokens: int = 100) -> Sequence:
    return Sequence(name, [3] * prompt_len, SamplingParams(max_tokens=max_tokens))


def complete(sched: Scheduler, batch) -> None:
    """What the engine does after a forward: count the computed tokens, sample where a sequence is complete."""
    for s, n in batch.entries:
        s.num_computed_tokens += n
        sched.blocks.register_computed(s)
    for s, n in batch.entries:
        if s.num_computed_tokens == len(s):
            s.token_ids.append(7)
            if s.num_output_tokens >= s.params.max_tokens:
                sched.finish(s, "length")


def step(sched: Scheduler):
    """One engine step without a model."""
    batch = sched.schedule()
    complete(sched, batch)
    return batch


def plan(batch) -> list[tuple[str, int]]:
    return [(s.request_id, n) for s, n in batch.entries]


def test_token_budget_and_max_num_seqs_are_respected():
    sched = make(num_blocks=200, max_num_seqs=3, max_num_batched_tokens=16)
    for i, n in enumerate([5, 9, 1, 30, 2, 14, 3]):
        sched.add(seq(f"s{i}", n, max_tokens=4))
    sizes = []
    while sched.num_unfinished:
        batch = step(sched)
        sizes.append((batch.num_tokens, len(batch.entries)))
        assert 0 < batch.num_tokens <= 16
        assert len(batch.entries) <= 3 and len(sched.running) <= 3
        assert len(sizes) < 100
    assert (16, 3) in sizes  # both limits were reached, not just never approached
    assert sched.blocks.num_free_blocks == 200


def test_first_step_fills_the_token_budget_in_arrival_order():
    sched = make(num_blocks=200, max_num_seqs=8, max_num_batched_tokens=16)
    for i, n in enumerate([5, 9, 4]):
        sched.add(seq(f"s{i}", n))
    assert plan(sched.schedule()) == [("s0", 5), ("s1", 9), ("s2", 2)]  # s2's prompt is chunked


def test_chunked_prefill_keeps_running_sequences_decoding():
    sched = make(num_blocks=200, max_num_batched_tokens=16)
    a = seq("a", 3)
    sched.add(a)
    assert plan(step(sched)) == [("a", 3)]
    b = seq("b", 40)
    sched.add(b)
    chunks = []
    while b.num_output_tokens == 0:
        assert b.is_prefill
        before = a.num_output_tokens
        batch = step(sched)
        assert batch.entries[0] == (a, 1), "the running sequence decodes first, every step"
        assert a.num_output_tokens == before + 1
        assert batch.num_tokens == 16 or b.num_output_tokens == 1
        chunks.append(dict(plan(batch))["b"])
    assert chunks == [15, 15, 10]
    assert plan(step(sched)) == [("a", 1), ("b", 1)]  # both decode now


def test_prefill_and_decode_counts_of_a_mixed_batch():
    sched = make(num_blocks=200, max_num_batched_tokens=16)
    sched.add(seq("a", 2))
    step(sched)
    sched.add(seq("b", 30))
    batch = sched.schedule()
    assert (batch.num_decode_tokens, batch.num_prefill_tokens) == (1, 15)


def test_admission_is_first_come_first_served():
    sched = make(num_blocks=200, max_num_seqs=2)
    for i in range(4):
        sched.add(seq(f"s{i}", 2, max_tokens=3))
    assert plan(step(sched)) == [("s0", 2), ("s1", 2)]
    assert plan(step(sched)) == [("s0", 1), ("s1", 1)]  # s2 waits: no sequence slot
    step(sched)  # s0 and s1 finish
    assert plan(step(sched)) == [("s2", 2), ("s3", 2)]


def test_a_long_head_of_queue_is_not_overtaken():
    sched = make(num_blocks=200, max_num_batched_tokens=16)
    sched.add(seq("long", 40))
    sched.add(seq("short", 1))
    assert plan(sched.schedule()) == [("long", 16)]
    sched = make(num_blocks=3, block_size=4, max_num_batched_tokens=16)
    sched.add(seq("long", 8))
    sched.add(seq("short", 1))
    assert plan(sched.schedule()) == [("long", 8), ("short", 1)]
    # when blocks are short the head gets the chunk they hold, and the short one still waits
    sched = make(num_blocks=3, block_size=4, max_num_batched_tokens=16)
    sched.add(seq("long", 13))
    sched.add(seq("short", 1))
    assert plan(sched.schedule()) == [("long", 12)]


def test_preemption_frees_the_newest_and_pauses_admission():
    sched = make(num_blocks=4, block_size=4, max_num_batched_tokens=16)
    a, b = seq("a", 4), seq("b", 12)
    sched.add(a)
    sched.add(b)
    assert plan(step(sched)) == [("a", 4), ("b", 12)]
    assert sched.blocks.num_free_blocks == 0
    d = seq("d", 1)
    sched.add(d)
    # a needs a fifth slot, so a second block: b (newest) is preempted
    batch = step(sched)
    assert plan(batch) == [("a", 1)]
    assert batch.num_preempted == 1
    assert b.status == SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and b.num_output_tokens == 1  # its output is kept, to recompute
    assert list(sched.waiting) == [b, d]
    assert sched.running == [a]
    assert sched.blocks.num_free_blocks == 2  # d would fit, but admission pauses this step
    assert d.status == SequenceStatus.WAITING
    # next step b comes back first, recomputing prompt + output, chunked to the free blocks
    batch = step(sched)
    assert plan(batch) == [("a", 1), ("b", 8)]
    assert batch.num_preempted == 0


def test_preemption_takes_newer_sequences_before_older_ones():
    sched = make(num_blocks=3, block_size=2, max_num_batched_tokens=16)
    seqs = [seq(f"s{i}", 2) for i in range(3)]
    for s in seqs:
        sched.add(s)
    step(sched)  # each holds one full block, and has sampled a third token
    batch = step(sched)
    assert batch.num_preempted == 2
    assert plan(batch) == [("s0", 1)]
    assert list(sched.waiting) == [seqs[1], seqs[2]]  # the one preempted last is in front


def test_finish_and_abort_free_blocks():
    sched = make(num_blocks=20, block_size=4)
    a, b, c = seq("a", 9), seq("b", 5), seq("c", 100)
    for s in (a, b, c):
        sched.add(s)
    sched.schedule()  # a and b admitted; c gets the last 2 tokens of the budget
    used = sched.blocks.num_used_blocks
    assert used == len(a.block_table) + len(b.block_table) + len(c.block_table)
    sched.finish(a, "stop")
    assert a.status == SequenceStatus.FINISHED and a.finish_reason == "stop" and a.block_table == []
    assert sched.blocks.num_used_blocks == used - 3 and a not in sched.running
    sched.finish(c, "abort")
    assert c.finish_reason == "abort" and c not in sched.running
    w = seq("w", 4)
    sched.add(w)
    sched.finish(w, "abort")  # a waiting sequence
    assert w not in sched.waiting and w.status == SequenceStatus.FINISHED
    sched.finish(b, "length")
    assert sched.num_unfinished == 0 and sched.blocks.num_free_blocks == 20


def check_invariants(sched: Scheduler) -> None:
    bm = sched.blocks
    owned = [blk for s in sched.running for blk in s.block_table]
    assert len(owned) == len(set(owned)), "a block is owned twice"
    assert sum(len(s.block_table) for s in sched.running) == bm.num_used_blocks
    assert sorted(owned + list(bm._free)) == list(range(bm.num_blocks))
    for s in sched.running:
        assert s.status == SequenceStatus.RUNNING
        assert len(s.block_table) * bm.block_size >= s.num_computed_tokens
    for s in sched.waiting:
        assert s.status == SequenceStatus.WAITING
        assert s.block_table == [] and s.num_computed_tokens == 0
    assert len(sched.running) <= sched.config.max_num_seqs


@pytest.mark.parametrize("seed, block_size, num_blocks, max_num_seqs, budget", [
    (0, 4, 24, 8, 16),
    (1, 1, 40, 4, 16),
    (2, 16, 6, 16, 64),
    (3, 2, 50, 32, 32),
    (4, 8, 12, 6, 24),
])
def test_random_workload_keeps_invariants_and_finishes(seed, block_size, num_blocks, max_num_seqs, budget):
    rng = random.Random(seed)
    sched = make(num_blocks, block_size, max_num_seqs, budget)
    capacity = num_blocks * block_size
    all_seqs: list[Sequence] = []
    num_preempted = 0
    for t in range(20_000):
        if t < 200:
            for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
                max_tokens = rng.randint(1, 20)
                # what the engine's check_request allows: a sequence fits the cache on its own
                s = seq(f"r{len(all_seqs)}", rng.randint(1, min(60, capacity - max_tokens)), max_tokens)
                all_seqs.append(s)
                sched.add(s)
        if rng.random() < 0.02:
            live = list(sched.running) + list(sched.waiting)
            if live:
                sched.finish(rng.choice(live), "abort")
        was_running = set(map(id, sched.running))
        preemptions_before = sum(s.num_preemptions for s in all_seqs)
        uncomputed = {id(s): s.num_uncomputed_tokens for s in sched.running + list(sched.waiting)}
        batch = sched.schedule()
        ids = [id(s) for s, _ in batch.entries]
        assert len(ids) == len(set(ids))
        assert batch.num_tokens <= budget and len(batch.entries) <= max_num_seqs
        assert sum(s.num_preemptions for s in all_seqs) - preemptions_before == batch.num_preempted
        if batch.num_preempted:
            assert set(ids) <= was_running, "admitted a new sequence while preempting"
        for s, n in batch.entries:
            assert s.status == SequenceStatus.RUNNING
            assert 1 <= n <= uncomputed[id(s)]
            assert len(s.block_table) * block_size >= s.num_computed_tokens + n
        check_invariants(sched)
        num_preempted += batch.num_preempted
        complete(sched, batch)
        check_invariants(sched)
        if t >= 200 and not sched.num_unfinished:
            break
    else:
        pytest.fail(f"not finished after 20000 steps: {sched.running} {list(sched.waiting)}")
    assert all(s.is_finished and s.block_table == [] for s in all_seqs)
    for s in all_seqs:
        if s.finish_reason == "length":
            assert s.num_output_tokens == s.params.max_tokens
    assert sched.blocks.num_free_blocks == num_blocks
    assert num_preempted > 0, "the workload should be tight enough to preempt"


def test_a_prompt_whose_first_block_is_being_computed_waits_a_step_then_shares_it():
    sched = make(block_size=4, max_num_batched_tokens=64, prefix_caching=True)
    a, b = seq("a", 10), seq("b", 10)  # the same ten tokens: n = 2
    other = Sequence("o", [5] * 6, SamplingParams(max_tokens=100))
    for s in (a, b, other):
        sched.add(s)
    first = sched.schedule()
    assert plan(first) == [("a", 10), ("o", 6)]  # b waits, the one after it does not
    complete(sched, first)
    second = sched.schedule()
    assert plan(second) == [("a", 1), ("o", 1), ("b", 2)]  # b takes a's two full blocks
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert (second.num_prefix_queried_tokens, second.num_prefix_hit_tokens) == (10, 8)
    assert (first.num_prefix_queried_tokens, first.num_prefix_hit_tokens) == (16, 0)


def test_a_preempted_sequence_takes_its_own_blocks_back():
    sched = make(num_blocks=6, block_size=4, max_num_batched_tokens=32, prefix_caching=True)
    a, b = seq("a", 12), Sequence("b", [5] * 8, SamplingParams(max_tokens=100))
    sched.add(a)
    complete(sched, sched.schedule())
    sched.add(b)
    for _ in range(20):  # both decode until the blocks run out and the newest (b) is preempted
        complete(sched, sched.schedule())
        if b.num_preemptions:
            break
    assert b.num_preemptions == 1 and b.status == SequenceStatus.WAITING
    sched.finish(a, "length")
    back = sched.schedule()
    assert plan(back) == [("b", len(b) - 8)] and back.num_prefix_hit_tokens == 8  # its two full blocks
