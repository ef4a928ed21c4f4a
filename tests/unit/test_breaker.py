"""The circuit breaker the router puts in front of each cache partition."""

from __future__ import annotations

import pytest

from serving.breaker import CircuitBreaker


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_failures_in_a_row_then_one_trial_closes_it():
    clock = Clock()
    b = CircuitBreaker(max_failures=3, open_s=5.0, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    b.record_success()  # a success resets the count: failures must be consecutive
    for _ in range(2):
        b.record_failure()
    assert b.state == "closed" and b.allow()
    b.record_failure()
    assert b.state == "open" and not b.allow() and b.num_opened == 1
    clock.now = 4.9
    assert not b.allow()
    clock.now = 5.0
    assert b.state == "half_open"
    assert b.allow()  # the one trial
    assert not b.allow()  # everyone else still skips while it is out
    b.record_success()
    assert b.state == "closed" and b.allow()


def test_a_failed_trial_opens_it_again_for_a_full_period():
    clock = Clock()
    b = CircuitBreaker(max_failures=1, open_s=2.0, clock=clock)
    b.record_failure()
    clock.now = 2.0
    assert b.allow()
    clock.now = 2.5
    b.record_failure()
    assert b.state == "open" and b.num_opened == 1  # still the same outage
    clock.now = 4.4
    assert not b.allow()
    clock.now = 4.5
    assert b.allow()


def test_a_trial_that_never_reports_back_lets_another_through_later():
    clock = Clock()
    b = CircuitBreaker(max_failures=1, open_s=1.0, clock=clock)
    b.record_failure()
    clock.now = 1.0
    assert b.allow()  # its caller is cancelled and records nothing
    clock.now = 1.5
    assert not b.allow()
    clock.now = 2.0
    assert b.allow()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        CircuitBreaker(max_failures=0)
    with pytest.raises(ValueError):
        CircuitBreaker(open_s=0)


def test_the_deadline_follows_the_measured_latency_between_floor_and_cap():
    from serving.breaker import AdaptiveTimeout

    t = AdaptiveTimeout(floor=0.05, cap=0.5)
    assert t.seconds == 0.05  # nothing measured yet
    for _ in range(20):
        t.observe(0.01)  # fast calls: the floor
    assert t.seconds == 0.05
    for _ in range(50):
        t.observe(0.15)  # under load: stretched past the latency, not to the cap
    assert 0.15 < t.seconds < 0.5
    for _ in range(50):
        t.observe(2.0)  # a very slow callee: never past the cap
    assert t.seconds == 0.5
    with pytest.raises(ValueError):
        AdaptiveTimeout(floor=0.5, cap=0.1)
