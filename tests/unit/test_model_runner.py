"""The model runner's paged attention against Hugging Face's own forward, on the tiny model (float32).

Each step is checked position for position against HF run over every sequence's whole text (no
cache), with every pool slot that no sequence owns set to a huge value first: a padded or stale key
that the attention failed to mask would move the logits far off."""

import random

import pytest
import torch

import serving.model_runner as mr
from serving.model_loader import load_model
from serving.step import StepInput

BLOCK_SIZE = 4
NUM_BLOCKS = 64
POISON = 1e30  # finite: SDPA's masked positions weigh 0, and 0 * 1e30 stays 0 (a NaN would not)


@pytest.fixture(scope="module")
def models(tiny_model):
    """(the runner's model, an untouched copy for reference forwards)"""
    return load_model(tiny_model), load_model(tiny_model)


def reference_logits(hf, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Each sequence's last-position logits [V] from HF's own attention over the whole sequence."""
    with torch.inference_mode():
        return [hf(input_ids=torch.tensor([s])).logits[0, -1] for s in seqs]


def poison_unused(runner: mr.ModelRunner, tables: list[list[int]], lens: list[int]) -> None:
    """Sets every pool slot outside the first `lens[i]` positions of sequence i to POISON."""
    live = torch.zeros(NUM_BLOCKS * BLOCK_SIZE, dtype=torch.bool)
    for table, n in zip(tables, lens):
        for p in range(n):
            live[table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE] = True
    with torch.inference_mode():  # the pools are inference tensors
        for kv in runner.pools.layers.values():
            for slots in (kv.k_slots, kv.v_slots):  # [1, KVH, num_slots, D]
                slots[:, :, ~live] = POISON


def step(runner, seqs, tables, done: list[int], chunk: list[int]) -> torch.Tensor:
    """Runs sequence i's tokens done[i] .. done[i] + chunk[i] - 1; returns the sampled rows' logits."""
    ids = [t for s, d, n in zip(seqs, done, chunk) for t in s[d:d + n]]
    ctx = [d + n for d, n in zip(done, chunk)]
    rows = [i for i, s in enumerate(seqs) if ctx[i] == len(s)]
    inp = StepInput(token_ids=ids, query_lens=chunk, context_lens=ctx, block_tables=tables,
                    block_size=BLOCK_SIZE, sample_rows=rows)
    return runner.forward(inp)


def random_batch(rng: random.Random, lengths: list[int], vocab: int):
    """Sequences of the given lengths and scattered block tables that never use block 0 (padding)."""
    free = list(range(1, NUM_BLOCKS))
    rng.shuffle(free)
    seqs = [[rng.randrange(vocab) for _ in range(n)] for n in lengths]
    tables = [[free.pop() for _ in range(-(-n // BLOCK_SIZE))] for n in lengths]
    return seqs, tables


@pytest.mark.parametrize("lengths", [[9], [13, 13, 13], [2, 17, 5, 30, 8, 11]])
@pytest.mark.parametrize("group_size", [32, 2])
def test_decode_step_equals_hf_forward(models, monkeypatch, lengths, group_size):
    """All query lengths 1: one decode group (packed order: slices, no index) or several length-sorted ones."""
    monkeypatch.setattr(mr, "DECODE_GROUP_SIZE", group_size)
    model, hf = models
    runner = mr.ModelRunner(model, NUM_BLOCKS, BLOCK_SIZE)
    seqs, tables = random_batch(random.Random(len(lengths) + group_size), lengths, hf.config.vocab_size)
    step(runner, seqs, tables, [0] * len(seqs), [n - 1 for n in lengths])  # prefill all but the last token
    poison_unused(runner, tables, [n - 1 for n in lengths])
    t = mr.StepTensors(StepInput(token_ids=[0] * len(seqs), query_lens=[1] * len(seqs), context_lens=lengths,
                                 block_tables=tables, block_size=BLOCK_SIZE, sample_rows=list(range(len(seqs)))),
                       runner.device)
    assert t.logits_to_keep == 0 and not t.prefill
    assert len(t.decode_groups) == -(-len(lengths) // group_size)
    assert isinstance(t.decode_groups[0].tokens, slice) == (len(lengths) <= group_size or len(set(lengths)) == 1)
    logits = step(runner, seqs, tables, [n - 1 for n in lengths], [1] * len(seqs))
    for got, want in zip(logits, reference_logits(hf, seqs)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_mixed_step_equals_hf_forward(models):
    """Prefill chunks (with and without cached context), one-token chunks that are not sampled and
    decode rows in one packed step; decode rows between prefill rows are gathered by index."""
    model, hf = models
    runner = mr.ModelRunner(model, NUM_BLOCKS, BLOCK_SIZE)
    lengths = [12, 7, 20, 5, 9]
    seqs, tables = random_batch(random.Random(1), lengths, hf.config.vocab_size)
    done = [11, 0, 6, 4, 3]
    step(runner, seqs, tables, [0] * 5, done)
    poison_unused(runner, tables, done)
    chunk = [1, 7, 14, 1, 1]  # decode, whole prompt, cached + chunk, decode, one token of a prefill
    logits = step(runner, seqs, tables, done, chunk)
    sampled = [i for i in range(5) if done[i] + chunk[i] == lengths[i]]
    assert sampled == [0, 1, 2, 3]
    for got, want in zip(logits, reference_logits(hf, [seqs[i] for i in sampled])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_decode_groups_use_views_only_for_consecutive_rows():
    tables = [[1, 2], [3], [4, 5], [6]]
    t = mr.StepTensors(StepInput(token_ids=[5, 6, 7, 8], query_lens=[1] * 4, context_lens=[6, 3, 8, 2],
                                 block_tables=tables, block_size=4, sample_rows=[0, 1, 2, 3]), torch.device("cpu"))
    g, = t.decode_groups
    assert g.tokens == slice(0, 4) and g.width == 8 and g.mask is not None
    assert g.blocks.tolist() == [1, 2, 3, 0, 4, 5, 6, 0]  # table rows padded with block 0, masked
    t = mr.StepTensors(StepInput(token_ids=[5, 6, 7, 8, 9], query_lens=[1, 1, 2, 1], context_lens=[6, 3, 8, 2],
                                 block_tables=tables, block_size=4, sample_rows=[0, 1, 2, 3]), torch.device("cpu"))
    g, two = t.decode_groups  # a 2-token row is a group of its own query length
    assert not t.prefill and two.q_len == 2 and two.tokens == slice(2, 4)
    assert two.mask[0, 0].tolist() == [[True] * 7 + [False], [True] * 8]  # causal inside the row
    assert g.tokens.tolist() == [0, 1, 4] and t.logits_to_keep.tolist() == [0, 1, 3, 4]
    long = mr.MAX_GROUPED_QUERY_LEN + 1
    t = mr.StepTensors(StepInput(token_ids=[5] * (long + 1), query_lens=[1, long], context_lens=[6, long + 2],
                                 block_tables=[[1, 2], [3, 4, 5, 6, 7, 8]], block_size=4, sample_rows=[0, 1]),
                       torch.device("cpu"))
    assert [p.start for p in t.prefill] == [1] and len(t.decode_groups) == 1  # a long row attends alone
