"""The sampler: greedy, top-k / top-p masks, per-request seeds, temperature."""

import math

import pytest
import torch

from serving.sampling import Sampler, SamplingParams, inverse_cdf_sample, top_k_top_p

VOCAB = 50


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def sample(sampler, logits, temperature=1.0, top_p=1.0, top_k=-1, seeds=None, seq_ids=None):
    rows = logits.shape[0]
    return sampler.sample(logits, seq_ids if seq_ids is not None else list(range(rows)), [temperature] * rows,
                          [top_p] * rows, [top_k] * rows, seeds if seeds is not None else [None] * rows)


def masked(logits: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """top_k_top_p's candidates put back in vocabulary order, -inf for every other token."""
    values, ids = top_k_top_p(logits, top_ks, top_ps)
    return torch.full_like(logits, -math.inf).scatter_(-1, ids, values)


def kept(logits: list[float], top_k: int, top_p: float) -> set[int]:
    out = masked(torch.tensor([logits]), torch.tensor([top_k]), torch.tensor([top_p]))[0]
    return {i for i, x in enumerate(out.tolist()) if x != -math.inf}


def test_greedy_is_argmax():
    logits = random_logits(16)
    assert sample(Sampler(), logits, temperature=0.0) == logits.argmax(-1).tolist()
    assert SamplingParams(temperature=0.0).is_greedy and not SamplingParams().is_greedy


@pytest.mark.parametrize("kw", [{"top_k": 1}, {"top_p": 1e-6}, {"top_k": 1, "top_p": 0.5}])
def test_a_one_token_support_is_greedy(kw):
    logits = random_logits(16, seed=1)
    for temperature in (0.5, 1.0, 2.0):
        assert sample(Sampler(), logits, temperature=temperature, **kw) == logits.argmax(-1).tolist()


# probabilities 0.1, 0.4, 0.2, 0.3: sorted 0.4 (id 1), 0.3 (id 3), 0.2 (id 2), 0.1 (id 0)
HAND = [math.log(p) for p in (0.1, 0.4, 0.2, 0.3)]


@pytest.mark.parametrize("top_k, top_p, expected", [
    (-1, 1.0, {0, 1, 2, 3}),
    (0, 1.0, {0, 1, 2, 3}),  # <= 0 is off
    (99, 1.0, {0, 1, 2, 3}),  # >= vocab is off
    (1, 1.0, {1}),
    (2, 1.0, {1, 3}),
    (3, 1.0, {1, 2, 3}),
    (-1, 0.35, {1}),  # 0.4 already reaches p
    (-1, 0.5, {1, 3}),  # 0.4 < p, 0.4 + 0.3 >= p
    (-1, 0.69, {1, 3}),
    (-1, 0.75, {1, 2, 3}),  # 0.7 < p
    (-1, 0.95, {0, 1, 2, 3}),
    # top-p applies to the top-k renormalised: top-3 is 0.44, 0.33, 0.22
    (3, 0.5, {1, 3}),
    (3, 0.8, {1, 2, 3}),
    (2, 0.55, {1}),  # top-2 is 0.57, 0.43
    (2, 0.6, {1, 3}),
])
def test_top_k_top_p_mask_exactly_the_expected_tokens(top_k, top_p, expected):
    assert kept(HAND, top_k, top_p) == expected


def test_masks_apply_per_row_and_keep_the_kept_logits():
    logits = torch.tensor([HAND, HAND, HAND[::-1]])
    out = masked(logits, torch.tensor([1, -1, 2]), torch.tensor([1.0, 0.5, 1.0]))
    finite = [{i for i, x in enumerate(row) if x != -math.inf} for row in out.tolist()]
    assert finite == [{1}, {1, 3}, {0, 2}]  # row 3 is reversed: 0.3 at id 0, 0.4 at id 2
    keep = out != -math.inf
    assert torch.equal(out[keep], logits[keep])


def test_sampled_tokens_stay_in_the_support():
    sampler = Sampler()
    flat = torch.zeros(1, VOCAB)
    flat[0, [4, 9, 17]] = 5.0  # three equal favourites, then a long tail
    seen = set()
    for _ in range(200):
        token, = sample(sampler, flat, top_k=3)  # unseeded: the sampler's shared generator
        seen.add(token)
    assert seen == {4, 9, 17}
    logits = torch.tensor([HAND])
    for _ in range(200):
        token, = sample(sampler, logits, top_p=0.5)
        assert token in {1, 3}


def seeded_run(logits: torch.Tensor, companions: int, position: int, steps: int = 20) -> list[int]:
    """The tokens of seq 1000 (seed 1234) when sampled among `companions` other rows, at `position`."""
    sampler = Sampler()
    out = []
    others = random_logits(companions, seed=9)
    for step in range(steps):
        rows = [others[i] for i in range(companions)]
        rows.insert(position, logits[step])
        seq_ids = list(range(companions))
        seq_ids.insert(position, 1000)
        seeds = [7 * i if i % 2 else None for i in range(companions)]  # seeded and unseeded companions
        seeds.insert(position, 1234)
        temps = [0.0 if i % 3 == 0 else 1.3 for i in range(companions)]
        temps.insert(position, 1.0)
        tokens = sampler.sample(torch.stack(rows), seq_ids, temps, [1.0] * len(rows), [-1] * len(rows), seeds)
        out.append(tokens[position])
    return out


def test_a_seeded_sequence_does_not_depend_on_its_batch():
    logits = random_logits(20, seed=3) / 3  # flat enough that draws differ
    alone = seeded_run(logits, companions=0, position=0)
    assert len(set(alone)) > 5, "the test needs a distribution with real randomness"
    for companions, position in [(1, 0), (1, 1), (5, 2), (5, 5), (8, 0)]:
        assert seeded_run(logits, companions, position) == alone


def test_different_seeds_differ_and_release_restarts_the_stream():
    logits = random_logits(1, seed=4) / 3
    sampler = Sampler()
    a = [sample(sampler, logits, seeds=[1], seq_ids=[0])[0] for _ in range(20)]
    b = [sample(sampler, logits, seeds=[2], seq_ids=[1])[0] for _ in range(20)]
    assert a != b
    sampler.release([0])
    assert [sample(sampler, logits, seeds=[1], seq_ids=[0])[0] for _ in range(20)] == a


def top_share(temperature: float, n: int = 2000) -> float:
    """Share of draws that pick the top token of logits [2, 1, 0], each row with its own seed."""
    logits = torch.tensor([[2.0, 1.0, 0.0]]).expand(n, 3).contiguous()
    tokens = sample(Sampler(), logits, temperature=temperature, seeds=list(range(n)))
    return tokens.count(0) / n


def expected_top_share(temperature: float) -> float:
    weights = [math.exp(x / temperature) for x in (2.0, 1.0, 0.0)]
    return weights[0] / sum(weights)


def test_temperature_sharpens_and_flattens_the_distribution():
    shares = {t: top_share(t) for t in (0.5, 1.0, 2.0)}
    for t, share in shares.items():
        # N=2000: one standard deviation is at most 0.011
        assert abs(share - expected_top_share(t)) < 0.05, (t, share)
    assert shares[0.5] > shares[1.0] + 0.1 > shares[2.0] + 0.2


def test_only_the_largest_top_k_is_sorted():
    logits = random_logits(3, seed=5)
    values, ids = top_k_top_p(logits, torch.tensor([2, 5, -1]), torch.tensor([1.0, 1.0, 1.0]))
    assert values.shape == ids.shape == (3, VOCAB)  # a row without top-k needs the whole vocabulary
    values, ids = top_k_top_p(logits, torch.tensor([2, 5, 3]), torch.tensor([1.0, 0.9, 1.0]))
    assert values.shape == (3, 5)
    assert torch.equal(ids, logits.topk(5, dim=-1).indices)
    assert torch.isinf(values[0, 2:]).all() and torch.isfinite(values[0, :2]).all()


def test_inverse_cdf_picks_by_cumulative_mass():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3]] * 5)
    u = torch.tensor([0.0, 0.0999, 0.1001, 0.69, 0.71])
    assert inverse_cdf_sample(probs.cumsum(-1), u).tolist() == [0, 0, 1, 2, 3]  # cumulative 0.1, 0.5, 0.7, 1.0
    # zero-probability candidates (masked, or underflowed) are never picked, not even at u -> 0 or 1
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0, 0.0]] * 3)
    u = torch.tensor([0.0, 0.5, 1 - 2**-24])
    assert inverse_cdf_sample(probs.cumsum(-1), u).tolist() == [1, 3, 3]


@pytest.mark.parametrize("top_k, top_p, expected", [
    (-1, 1.0, {0: 0.1, 1: 0.4, 2: 0.2, 3: 0.3}),  # temperature only: no candidate set at all
    (-1, 0.75, {1: 0.4 / 0.9, 2: 0.2 / 0.9, 3: 0.3 / 0.9}),
    (2, 1.0, {1: 0.4 / 0.7, 3: 0.3 / 0.7}),
])
def test_sampled_frequencies_match_the_masked_distribution(top_k, top_p, expected):
    n = 4000  # one standard deviation of a share is at most 0.008
    logits = torch.tensor([HAND]).expand(n, 4).contiguous()
    tokens = sample(Sampler(), logits, top_k=top_k, top_p=top_p)  # unseeded rows: the shared stream
    assert set(tokens) == set(expected)
    for token, p in expected.items():
        assert abs(tokens.count(token) / n - p) < 0.04, (token, tokens.count(token) / n, p)


def test_greedy_and_temperature_only_rows_sort_nothing(monkeypatch):
    import serving.sampling

    def no_sort(*args):
        raise AssertionError("top_k_top_p called")

    monkeypatch.setattr(serving.sampling, "top_k_top_p", no_sort)
    logits = random_logits(8, seed=6)
    sampler = Sampler()
    # greedy rows ignore their top-k / top-p and draw nothing from any stream
    assert sample(sampler, logits, temperature=0.0, top_k=3, top_p=0.5, seeds=[1] * 8) == logits.argmax(-1).tolist()
    assert sampler._streams == {}
    tokens = sample(sampler, logits, temperature=1.0)
    assert len(tokens) == 8 and all(0 <= t < VOCAB for t in tokens)


def test_rows_of_one_batch_keep_their_own_settings():
    """Greedy, top-k, top-p and temperature-only rows in one batch (K is the largest top-k: the
    whole vocabulary here, for the top-p row)."""
    sampler = Sampler()
    logits = torch.tensor([HAND] * 4)
    seen = [set() for _ in range(4)]
    for _ in range(300):
        tokens = sampler.sample(logits, [0, 1, 2, 3], [0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.5, 1.0], [-1, 2, -1, -1],
                                [None, None, 5, None])
        for row, token in zip(seen, tokens):
            row.add(token)
    assert seen == [{1}, {1, 3}, {1, 3}, {0, 1, 2, 3}]


def test_a_non_finite_row_gets_a_valid_token_and_its_batch_goes_on():
    """Found by the schemathesis run: a repetition penalty near 0 makes a logit infinite, its row's
    cdf NaN, and the pick one past the row's end (an IndexError that failed the whole step)."""
    logits = random_logits(3, seed=7)
    logits[1, 4] = math.inf
    for top_k in (-1, 5):
        tokens = sample(Sampler(), logits.clone(), top_k=top_k)
        assert all(0 <= t < VOCAB for t in tokens), tokens
    assert inverse_cdf_sample(torch.full((2, 4), math.nan), torch.tensor([0.1, 0.9])).tolist() == [3, 3]


@pytest.mark.parametrize("temperature", [5e-324, 1e-40, 1e-6])
def test_a_temperature_near_zero_is_greedy(temperature):
    """Found by the schemathesis run: logits / 5e-324 overflow float32, so its rows picked a token
    outside the vocabulary; below MIN_TEMPERATURE a request samples as greedy."""
    from serving.protocol import CompletionRequest
    from serving.sampling import MIN_TEMPERATURE, request_sampling_params

    params = request_sampling_params(CompletionRequest(model="m", prompt="x", temperature=temperature), 4, ())
    assert params.is_greedy and temperature < MIN_TEMPERATURE
    kept_up = request_sampling_params(CompletionRequest(model="m", prompt="x", temperature=MIN_TEMPERATURE), 4, ())
    assert kept_up.temperature == MIN_TEMPERATURE


def test_a_top_k_past_any_vocabulary_is_off():
    """Found probing: top_k 2**64 overflowed the step's int64 tensor, which failed the whole step."""
    from serving.protocol import CompletionRequest
    from serving.sampling import MAX_TOP_K, request_sampling_params

    for top_k, expected in ((2**64, -1), (MAX_TOP_K + 1, -1), (MAX_TOP_K, MAX_TOP_K), (5, 5)):
        assert request_sampling_params(CompletionRequest(model="m", prompt="x", top_k=top_k), 4, ()).top_k == expected
    tokens = sample(Sampler(), random_logits(2), top_k=MAX_TOP_K, top_p=0.5)
    assert all(0 <= t < VOCAB for t in tokens)
