"""The draft proposer (serving/spec/draft.py) on the embedded draft model, float32: greedy proposals
equal Hugging Face `generate` continuing the same tokens, for a fresh prompt, for a later round after
partial acceptance (the draft's stale KV overwritten), and for a mixed batch; sampled proposals are
reproducible under a seed and come with their q rows in the documented order."""

import random

import pytest
import torch

from serving.models import default_draft_path
from serving.spec.draft import DraftRequest, DraftRunner

BLOCK_SIZE = 16
NUM_BLOCKS = 64

pytestmark = pytest.mark.skipif(default_draft_path() is None, reason="the embedded draft is not shipped")


@pytest.fixture(scope="module")
def runner():
    return DraftRunner(default_draft_path(), "float32", NUM_BLOCKS, BLOCK_SIZE, seed=0)


@pytest.fixture(scope="module")
def hf():
    from serving.model_loader import load_model

    return load_model(default_draft_path())


def greedy(hf, ids: list[int], k: int) -> list[int]:
    """HF's own greedy continuation: k tokens after `ids` (past an end-of-sequence token too, as the
    draft proposes them: the engine stops the sequence, not the draft)."""
    x = torch.tensor([ids])
    out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=k, do_sample=False, eos_token_id=None)
    assert out.shape[1] == len(ids) + k
    return out[0, len(ids):].tolist()


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 4096) for _ in range(n)]


def blocks(first: int, n: int = 8) -> list[int]:
    """A sequence's own blocks (8 x 16 = 128 positions), never block 0."""
    return list(range(first, first + n))


def test_fresh_prompt_matches_generate(runner, hf):
    ids = prompt(1, 20)
    res = runner.propose([DraftRequest(seq_id=1, token_ids=ids, start=0, block_table=blocks(1), k=4)])
    assert res.tokens == [greedy(hf, ids, 4)]
    assert res.probs is None and res.draft_time_s > 0


@pytest.mark.parametrize("num_accepted", [0, 2, 4])
def test_second_round_after_partial_acceptance(runner, hf, num_accepted):
    """Round 1 writes the prompt and d_1..d_3 into the draft's KV (d_4 is never fed). The target
    accepts `num_accepted` proposals and emits one token of its own: with some rejected, the draft's
    KV is valid up to the last accepted one and the new token overwrites a stale position; with all
    accepted, d_4 and the bonus token come as a chunk of two."""
    ids, table, k = prompt(2, 19), blocks(9), 4
    first = runner.propose([DraftRequest(2, ids, 0, table, k)]).tokens[0]
    chosen = 7 if first[min(num_accepted, k - 1)] != 7 else 8  # differs from the rejected proposal
    if num_accepted < k:
        start, new = len(ids) + num_accepted, [chosen]
    else:
        start, new = len(ids) + k - 1, [first[-1], chosen]
    res = runner.propose([DraftRequest(2, new, start, table, k)])
    assert res.tokens == [greedy(hf, ids + first[:num_accepted] + [chosen], k)]


def test_batch_matches_each_solo_result(runner, hf):
    """Prefill chunks of three lengths (one spans three blocks), with a continuation in the same batch,
    and k from 1 to 5: requests drop out of later forwards as they finish."""
    a, b, c = prompt(3, 5), prompt(4, 23), prompt(5, 40)
    reqs = [DraftRequest(3, a, 0, blocks(17), 5), DraftRequest(4, b, 0, blocks(25), 1),
            DraftRequest(5, c, 0, blocks(33), 3)]
    res = runner.propose(reqs)
    assert res.tokens == [greedy(hf, a, 5), greedy(hf, b, 1), greedy(hf, c, 3)]
    # next round: a accepted 1 and got token 9; c accepted all 3 and got token 11; a new prompt d joins
    d = prompt(6, 12)
    ta, tc = res.tokens[0], res.tokens[2]
    reqs = [DraftRequest(3, [9], len(a) + 1, blocks(17), 2), DraftRequest(5, [tc[-1], 11], len(c) + 2, blocks(33), 4),
            DraftRequest(6, d, 0, blocks(41), 3)]
    res = runner.propose(reqs)
    assert res.tokens == [greedy(hf, a + ta[:1] + [9], 2), greedy(hf, c + tc + [11], 4), greedy(hf, d, 3)]


def sampled(seed_prompt: int, table: list[int], k: int, **params) -> DraftRequest:
    return DraftRequest(seed_prompt, prompt(seed_prompt, 10), 0, table, k, **params)


def test_sampled_proposals_are_reproducible_under_a_seed(runner):
    reqs = [sampled(7, blocks(1), 4, temperature=1.0), sampled(8, blocks(9), 2, temperature=0.8, top_p=0.9)]
    other = DraftRunner(default_draft_path(), "float32", NUM_BLOCKS, BLOCK_SIZE, seed=123)
    again = DraftRunner(default_draft_path(), "float32", NUM_BLOCKS, BLOCK_SIZE, seed=123)
    first, second = other.propose(reqs), again.propose(reqs)
    assert first.tokens == second.tokens
    assert torch.equal(first.probs, second.probs)
    assert first.probs.shape == (6, 4096) and first.probs.dtype == torch.float32
    torch.testing.assert_close(first.probs.sum(dim=-1), torch.ones(6))
    rows = [t for ts in first.tokens for t in ts]
    assert (first.probs[range(6), rows] > 0).all()  # each proposal was drawn from its own q row


def test_top_k_one_is_greedy_and_q_rows_follow_the_requests(runner):
    """A mixed batch: q rows only for the sampled requests, request after request; with top_k = 1 each
    row is one-hot at the greedy proposal."""
    tables = [blocks(1), blocks(9), blocks(17)]
    greedy_reqs = [sampled(9, tables[0], 2), sampled(10, tables[1], 3), sampled(11, tables[2], 3)]
    expected = runner.propose(greedy_reqs).tokens
    mixed = [sampled(9, tables[0], 2, temperature=1.0, top_k=1), sampled(10, tables[1], 3),
             sampled(11, tables[2], 3, temperature=0.7, top_k=1)]
    res = runner.propose(mixed)
    assert res.tokens == expected
    assert res.probs.shape == (5, 4096)
    assert res.probs.argmax(dim=-1).tolist() == expected[0] + expected[2]
    assert res.probs.max(dim=-1).values.tolist() == [1.0] * 5
