"""Speculative decoding's pure parts: the acceptance rules (with a chi-square test that the output is
the target's distribution, and that a wrong rule is caught), the n-gram proposer and the policy."""

import math
import random

import pytest
import torch

from serving.sampling import SamplingParams
from serving.sequence import Sequence
from serving.spec.acceptance import accept_greedy, accept_sampled, sample_from, target_probs
from serving.spec.policy import LinearCost, SpecPolicy, expected_tokens
from serving.spec.proposers import NgramProposer


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """The chi-square value that a true hypothesis exceeds with probability ~0.001 (z = 3.09), by the
    Wilson-Hilferty approximation: (X / df)^(1/3) is close to normal with mean 1 - 2/(9 df)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: list[int], probs: list[float]) -> tuple[float, int]:
    """Pearson's statistic of counts against probabilities, cells with expected count < 5 pooled."""
    total = sum(counts)
    cells, pooled_obs, pooled_exp = [], 0, 0.0
    for c, p in zip(counts, probs):
        if total * p >= 5:
            cells.append((c, total * p))
        else:
            pooled_obs, pooled_exp = pooled_obs + c, pooled_exp + total * p
    if pooled_exp > 0:
        cells.append((pooled_obs, pooled_exp))
    return sum((o - e) ** 2 / e for o, e in cells), len(cells) - 1


def test_greedy_emits_the_target_tokens():
    assert accept_greedy([4, 5, 6], [4, 5]) == [4, 5, 6]  # all accepted, then the bonus
    assert accept_greedy([4, 9, 6], [4, 5]) == [4, 9]  # the first mismatch is corrected
    assert accept_greedy([7, 5, 6], [4, 5]) == [7]


def wrong_rule(p, q, proposals, accept_u, resample_u):
    """A plausible mistake: on rejection, draw from p instead of the residual max(0, p - q)."""
    for i, d in enumerate(proposals):
        if accept_u[i] * float(q[i, d]) < float(p[i, d]):
            continue
        return [*proposals[:i], int(sample_from(p[i][None], torch.tensor([resample_u]))[0])]
    return [*proposals, int(sample_from(p[-1][None], torch.tensor([resample_u]))[0])]


@pytest.mark.parametrize("rule,deterministic,fits", [(accept_sampled, False, True), (accept_sampled, True, True),
                                                     (wrong_rule, False, False)])
def test_rejection_sampling_keeps_the_target_distribution(rule, deterministic, fits):
    """k = 2 proposals over 6 tokens, 40,000 rounds: the first emitted token is distributed as p_0 and
    the second (when the first was accepted) as p_1, for a sampled q and for a one-hot q (n-gram)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, 6, generator=gen) * 1.5, -1)  # target p_0, p_1, p_2
    q = torch.softmax(torch.randn(2, 6, generator=gen) * 1.5, -1)  # proposer q_0, q_1
    rng = random.Random(1)
    first, second = [0] * 6, [0] * 6
    for _ in range(40_000):
        if deterministic:
            proposals, q_used = [2, 4], None  # a lookup always proposes the same tokens
        else:
            proposals = [int(sample_from(q[i][None], torch.tensor([rng.random()]))[0]) for i in range(2)]
            q_used = q
        if rule is wrong_rule and q_used is None:
            q_used = torch.nn.functional.one_hot(torch.tensor(proposals), 6).float()
        out = rule(p, q_used, proposals, [rng.random(), rng.random()], rng.random())
        assert 1 <= len(out) <= 3 and out[:len(out) - 1] == proposals[:len(out) - 1]
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
    results = [chi_square(first, p[0].tolist()), chi_square(second, p[1].tolist())]
    passed = all(stat < chi_square_critical(df) for stat, df in results)
    assert passed == fits, results


def test_target_probs_follow_the_sampler_processing():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 0.0, 0.0, 3.0]])
    p = target_probs(logits, [1.0, 0.5], [2, -1], [1.0, 1.0])
    assert torch.allclose(p.sum(-1), torch.ones(2))
    assert p[0, 2] == 0 and p[0, 3] == 0 and p[0, 0] > p[0, 1] > 0  # top-2
    assert torch.allclose(p[1], torch.softmax(logits[1] / 0.5, -1))


def seq_of(tokens: list[int]) -> Sequence:
    seq = Sequence("r", tokens[:1], SamplingParams())
    seq.token_ids = list(tokens)
    return seq


def test_ngram_proposes_what_followed_the_latest_earlier_occurrence():
    prop = NgramProposer(ngram_max=3, ngram_min=1)
    seq = seq_of([1, 2, 3, 4, 9, 2, 3])
    assert prop.propose([seq], [2]).tokens == [[4, 9]]  # "2 3" was followed by "4 9"
    seq.token_ids += [4]  # incremental: only the new token is indexed
    assert prop.propose([seq], [3]).tokens == [[9, 2, 3]]  # "2 3 4" -> "9 2 3"
    assert prop.propose([seq_of([5, 6, 7])], [4]).tokens == [[]]  # no earlier occurrence: nothing
    prop.release(seq)


def test_ngram_incremental_index_matches_a_brute_force_search():
    rng = random.Random(0)
    prop = NgramProposer(ngram_max=3, ngram_min=1)
    seq = seq_of([rng.randrange(5) for _ in range(3)])
    for _ in range(200):
        seq.token_ids.append(rng.randrange(5))
        got = prop.propose([seq], [3]).tokens[0]
        ids, want = seq.token_ids, []
        for n in (3, 2, 1):
            ends = [e for e in range(n, len(ids)) if ids[e - n:e] == ids[-n:]]
            if ends:
                want = ids[ends[-1]:ends[-1] + 3]
                break
        assert got == want


def test_policy_speculates_when_verifying_is_cheap_and_stops_when_the_batch_is_compute_bound():
    # a step that costs 3 ms plus 0.02 ms per token: batch 1 is all fixed cost
    cheap = SpecPolicy(max_k=4, adaptive=True, step_cost=LinearCost(3e-3, 2e-5, 1e-5))
    cheap.observe_round("ngram", 1, 1, 1e-6)
    assert cheap.plan([0.7], [100], ["ngram"]) == [4]
    # a sequence whose proposals are rarely accepted proposes fewer
    assert cheap.plan([0.05], [100], ["ngram"])[0] < 4
    # limits: never more proposals than tokens left
    assert cheap.plan([0.7], [2], ["ngram"]) == [2]
    # 0.5 ms per token: at 128 sequences every extra position costs what a token is worth
    loaded = SpecPolicy(max_k=4, adaptive=True, step_cost=LinearCost(3e-3, 5e-4, 0.0))
    assert loaded.plan([0.7] * 128, [100] * 128, ["ngram"] * 128) == [0] * 128
    # ... but one probe sequence still proposes, so its acceptance keeps being measured
    assert sum(k > 0 for k in loaded.plan([0.7] * 128, [100] * 128, ["ngram"] * 128, probe=5)) == 1
    # not adaptive: always the most
    fixed = SpecPolicy(max_k=3, adaptive=False, step_cost=LinearCost(3e-3, 5e-4, 0.0))
    assert fixed.plan([0.1] * 4, [100] * 4, ["draft"] * 4) == [3] * 4


def test_linear_cost_fits_observations():
    fit = LinearCost(0.0, 0.0, 0.0, prior_weight=1e-6)
    for x, k in ((1, 0), (5, 4), (20, 0), (80, 16), (1, 0), (40, 8), (10, 2)):
        fit.observe((x, k), 0.002 + 0.0001 * x + 0.0003 * k)
    a, b, c = fit.coefficients
    assert a == pytest.approx(0.002, rel=1e-3) and b == pytest.approx(0.0001, rel=1e-3)
    assert c == pytest.approx(0.0003, rel=1e-3) and fit(10, 2) == pytest.approx(0.0036, rel=1e-3)
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_the_clock_holds_off_a_proposer_that_is_slower_than_off_at_a_batch_size():
    from serving.spec.policy import RealizedCost

    clock = RealizedCost()
    for _ in range(5):
        clock.observe(1, "off", 0.0025, 1)  # 2.5 ms per token without speculation at batch 1
        clock.observe(1, "draft", 0.0060, 2)  # 3 ms per token with the draft
        clock.observe(1, "ngram", 0.0035, 3)  # 1.2 ms per token with n-gram lookup
        clock.observe(64, "off", 0.050, 64)
    assert clock.slower(1, "draft") and not clock.slower(1, "ngram")
    assert not clock.slower(64, "draft")  # never measured there: no verdict
    assert not clock.slower(100, "off")
    fresh = RealizedCost()
    fresh.observe(1, "off", 0.0025, 1)
    fresh.observe(1, "draft", 0.0060, 2)
    assert not fresh.slower(1, "draft")  # too few observations for a verdict


def test_while_the_clock_holds_speculation_off_only_probe_steps_plan():
    """Under load the clock finds speculation slower than off: steps then skip the planning
    altogether (no k), except the probes, which back off."""
    from serving.config import SpeculativeConfig
    from serving.sampling import SamplingParams
    from serving.sequence import Sequence
    from serving.spec.policy import LinearCost
    from serving.spec.proposers import NgramProposer
    from serving.spec.speculator import Speculator

    spec = Speculator(SpeculativeConfig(method="ngram"), [NgramProposer(3)], LinearCost(1e-3, 1e-5, 1e-5), 1024)
    seqs = []
    for i in range(8):
        seq = Sequence(f"s{i}", [1, 2, 3, 1, 2, 3, 1, 2], SamplingParams(max_tokens=64, temperature=0.0))
        seq.num_computed_tokens = len(seq) - 1  # decoding: one uncomputed token
        seqs.append(seq)
    for _ in range(4):  # the clock: speculating steps cost twice as much per token as off ones
        spec.realized.observe(8, "off", 0.010, 8)
        spec.realized.observe(8, "ngram", 0.020, 8)
    planned = []
    real_plan = spec.policy.plan
    spec.policy.plan = lambda *a: planned.append(spec._steps) or real_plan(*a)
    with_k = []
    for _ in range(200):
        spec.plan(seqs)
        num_with_k = sum(spec.lookahead(s) > 0 for s in seqs)
        assert num_with_k <= 1  # a probe is one sequence
        if num_with_k:
            with_k.append(spec._steps)
    assert planned and len(planned) <= 5, planned  # probes only, backing off: 16, 48, 112, ...
    assert with_k and set(with_k) <= set(planned)
