"""Calls to a dependency that may die or stall: a circuit breaker, and a deadline that adapts.

A circuit breaker stops calling a dependency that keeps failing, and tries it again later. The
router guards each semantic-cache partition with one. Every call has a deadline (`AdaptiveTimeout`);
a call that fails or runs past it counts as a failure. After `max_failures` in a row the breaker opens: the
router skips that partition (a miss, the model answers) for `open_s` seconds. Then one call is let
through (half-open); its success closes the breaker, its failure opens it again.

    closed --max_failures in a row--> open --open_s later--> half-open --success--> closed
                                        ^------------------------failure---------------'
"""

from __future__ import annotations

import time
from typing import Callable


class CircuitBreaker:
    def __init__(self, max_failures: int = 3, open_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        if max_failures < 1 or open_s <= 0:
            raise ValueError("max_failures must be >= 1 and open_s > 0")
        self.max_failures = max_failures
        self.open_s = open_s
        self._clock = clock
        self._num_failures = 0  # consecutive
        self._opened_at: float | None = None  # None: closed
        # half-open: when the one trial call went out (a trial that never reports back, e.g. its
        # caller was cancelled, lets another through after open_s)
        self._trial_at: float | None = None
        self.num_opened = 0

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "half_open" if self._clock() - self._opened_at >= self.open_s else "open"

    def allow(self) -> bool:
        """Whether to make the call now (in half-open state, only the first caller gets through)."""
        state = self.state
        if state == "closed":
            return True
        now = self._clock()
        if state == "half_open" and (self._trial_at is None or now - self._trial_at >= self.open_s):
            self._trial_at = now
            return True
        return False

    def record_success(self) -> None:
        self._num_failures = 0
        self._opened_at = None
        self._trial_at = None

    def record_failure(self) -> None:
        self._num_failures += 1
        if self._opened_at is not None or self._num_failures >= self.max_failures:
            if self._opened_at is None:
                self.num_opened += 1
            self._opened_at = self._clock()  # a failed trial opens it for another open_s
            self._trial_at = None


class AdaptiveTimeout:
    """A call's deadline that follows its measured latency: `floor` while calls are fast, longer
    under load (the smoothed latency plus four times its mean deviation, as TCP's retransmission
    timer: RFC 6298), never past `cap`. Only calls that succeed are measured, so a dead callee
    cannot stretch it."""

    def __init__(self, floor: float, cap: float):
        if not 0 < floor <= cap:
            raise ValueError("need 0 < floor <= cap")
        self.floor, self.cap = floor, cap
        self._mean: float | None = None
        self._dev = 0.0

    @property
    def seconds(self) -> float:
        if self._mean is None:
            return self.floor
        return min(self.cap, max(self.floor, self._mean + 4.0 * self._dev))

    def observe(self, seconds: float) -> None:
        if self._mean is None:
            self._mean, self._dev = seconds, seconds / 2
            return
        self._dev = 0.75 * self._dev + 0.25 * abs(self._mean - seconds)
        self._mean = 0.875 * self._mean + 0.125 * seconds
