"""Workload generation and trace files (bench/workload.py); pure Python, no Ray."""

import random

import pytest

from bench import workload as wl


def byte_count(text: str) -> int:  # a byte-level tokenizer: one token per byte
    return len(text.encode())


def test_synthetic_is_deterministic_per_seed():
    a = wl.synthetic_workload(20, seed=3)
    b = wl.synthetic_workload(20, seed=3)
    c = wl.synthetic_workload(20, seed=4)
    assert a == b
    assert a != c


def test_synthetic_lengths_stay_in_range():
    dist = wl.LengthDist(prompt_median=40, prompt_sigma=1.5, prompt_min=10, prompt_max=80, output_min=5, output_max=9)
    reqs = wl.synthetic_workload(200, seed=1, dist=dist)
    assert all(10 <= r.prompt_len <= 80 for r in reqs)
    assert all(5 <= r.max_tokens <= 9 for r in reqs)
    assert {r.max_tokens for r in reqs} == set(range(5, 10))  # uniform covers the range
    assert all(r.arrival_s == 0.0 for r in reqs)
    # lognormal with a large sigma hits both clips
    assert min(r.prompt_len for r in reqs) == 10 and max(r.prompt_len for r in reqs) == 80


def test_lognormal_output_lengths_have_a_heavy_tail():
    dist = wl.LengthDist(prompt_median=20, prompt_min=10, prompt_max=40, output_min=8, output_max=256,
                         output_median=48, output_sigma=1.0)
    outs = sorted(r.max_tokens for r in wl.synthetic_workload(2000, seed=0, dist=dist))
    assert outs[0] == 8 and outs[-1] == 256  # both clips reached
    assert 40 <= outs[len(outs) // 2] <= 56  # median near 48
    assert sum(outs) / len(outs) > 1.3 * outs[len(outs) // 2]  # the tail pulls the mean above the median
    with pytest.raises(ValueError):
        wl.LengthDist(output_min=8, output_max=64, output_median=100, output_sigma=1.0)


@pytest.mark.parametrize("target", [1, 7, 50, 333])
def test_make_prompt_hits_length_with_a_tokenizer(target):
    text = wl.make_prompt(random.Random(0), target, byte_count)
    n = byte_count(text)
    longest_word = max(len(w) for w in wl.WORDS) + 1
    assert n <= target or len(text.split()) == 1
    assert n > target - longest_word
    assert all(w in wl.WORDS for w in text.split())


def test_make_prompt_without_tokenizer_uses_estimate():
    text = wl.make_prompt(random.Random(0), 130)
    assert abs(wl.estimate_tokens(text) - 130) <= 2


def test_fit_context_shrinks_only_when_needed():
    d = wl.LengthDist(128, 0.6, 16, 512, 16, 128)
    assert d.fit_context(2048) is d
    small = d.fit_context(256)
    assert small.prompt_max + small.output_max <= 256
    assert small.prompt_min <= small.prompt_median <= small.prompt_max


def test_length_dist_validates():
    with pytest.raises(ValueError):
        wl.LengthDist(prompt_median=5, prompt_min=10)
    with pytest.raises(ValueError):
        wl.LengthDist(output_min=0)


def test_poisson_arrivals_rate_and_seed():
    xs = wl.poisson_arrivals(4000, rate=4.0, seed=0)
    assert xs[0] == 0.0 and xs == sorted(xs)
    assert xs == wl.poisson_arrivals(4000, rate=4.0, seed=0)
    assert xs != wl.poisson_arrivals(4000, rate=4.0, seed=1)
    assert 3.8 < (len(xs) - 1) / xs[-1] < 4.2
    with pytest.raises(ValueError):
        wl.poisson_arrivals(3, rate=0)


def test_scale_arrivals_keeps_shape():
    offsets = [10.0, 10.5, 13.0, 14.0]  # 3 gaps over 4 s = 0.75 req/s
    scaled = wl.scale_arrivals(offsets, rate=1.5)
    assert scaled[0] == 0.0
    assert scaled[-1] == pytest.approx(2.0)
    assert scaled[1] / scaled[2] == pytest.approx(0.5 / 3.0)
    assert wl.scale_arrivals([0.0, 0.0, 0.0], rate=2.0) == [0.0, 0.5, 1.0]  # a burst becomes even spacing


def test_with_arrivals_and_mean_rate():
    reqs = wl.synthetic_workload(5, seed=0)
    timed = wl.with_arrivals(reqs, [0, 1, 2, 3, 4])
    assert [r.prompt for r in timed] == [r.prompt for r in reqs]
    assert wl.mean_rate(timed) == pytest.approx(1.0)
    assert wl.mean_rate(reqs) is None
    with pytest.raises(ValueError):
        wl.with_arrivals(reqs, [0, 1])
