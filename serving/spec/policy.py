"""How much to speculate: k per sequence from its acceptance, and per step from a measured cost model.

The model of a step (fitted online, `LinearCost`): it costs a + b * T + c * K for T tokens of
which K are proposals (c: what a verified position costs beyond an ordinary token; on a CPU a row
of several tokens leaves the matrix-vector kernels), and a proposer's round costs k * (d0 + d * B)
for B sequences proposing k tokens each (n-gram lookup: about nothing). A sequence whose proposals
are each accepted with probability alpha (the chance that the next one is accepted given that the
ones before were) emits on average E(k) = 1 + alpha + ... + alpha^k = (1 - alpha^(k+1)) / (1 - alpha)
tokens per step when it proposes k.

- Per sequence: its j-th proposal is worth proposing while the tokens it is expected to bring,
  alpha^j, times the time a token costs without speculation, a/B + b, exceed the position's cost,
  b + c (verifying) + d (proposing): k_i = the largest such j.
- Per step: the cap K over all sequences maximises tokens per second,
  sum_i E_i(min(K, k_i)) / (step cost with those proposals + cost of the rounds), against K = 0.
  On a loaded step b * B dominates and K falls to 0: speculation turns itself off.
"""

from __future__ import annotations

import math
from typing import Optional

PRIOR_ALPHA = 0.6  # a proposer's acceptance before it has been seen; then its running mean
DECAY = 0.9  # per observation, for acceptance and the cost fit
PROBE_EVERY = 16  # steps: while speculation is off, one sequence in this many steps proposes anyway
MAX_PROBE_EVERY = 512  # ... backing off to this while the clock keeps finding it slower


class LinearCost:
    """y = c_0 + c_1 x_1 + ... + c_n x_n, least squares over exponentially decayed observations (weight
    DECAY per observation back), with a prior of pseudo-observations; coefficients kept >= 0.

    NOTE: plain Python floats: with two features an observation and a solve cost a few microseconds,
    numpy's calls ten times that, on every step."""

    def __init__(self, *prior: float, prior_weight: float = 2.0):
        n = len(prior)  # the intercept, then one coefficient per feature
        self._xtx = [[0.0] * n for _ in range(n)]
        self._xty = [0.0] * n
        self._coefs: Optional[tuple[float, ...]] = None
        # the prior: at x = 1 and at x = 64 in each feature alone
        for j in range(1, n):
            for x in (1.0, 64.0):
                point = [x if i == j else 0.0 for i in range(1, n)]
                self.observe(point, prior[0] + prior[j] * x, prior_weight / (2 * (n - 1)))

    def observe(self, features, y: float, weight: float = 1.0) -> None:
        x = (1.0, *features)
        for r, row in enumerate(self._xtx):
            for c in range(len(x)):
                row[c] = row[c] * DECAY + weight * x[r] * x[c]
            self._xty[r] = self._xty[r] * DECAY + weight * y * x[r]
        self._coefs = None

    @property
    def coefficients(self) -> tuple[float, ...]:
        if self._coefs is None:
            self._coefs = tuple(max(c, 0.0) for c in _solve(self._xtx, self._xty))
        return self._coefs

    def __call__(self, *features: float) -> float:
        c = self.coefficients
        return c[0] + sum(ci * x for ci, x in zip(c[1:], features))


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """a x = b by Gaussian elimination with partial pivoting; a feature that never varied (a zero
    pivot) gets coefficient 0."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    scale = max(abs(m[i][i]) for i in range(n)) or 1.0
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        if abs(m[col][col]) <= 1e-12 * scale:
            for r in range(n):
                m[r][col] = 0.0
            m[col][col], m[col][n] = 1.0, 0.0
            continue
        for r in range(n):
            if r != col and m[r][col]:
                f = m[r][col] / m[col][col]
                m[r] = [v - f * p for v, p in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] for i in range(n)]


class Acceptance:
    """The chance that a proposal is accepted given that those before it were: accepted / (accepted +
    rejections), decayed, per sequence, starting from the proposer's running mean."""

    def __init__(self):
        self._seq: dict[int, dict[str, list[float]]] = {}  # seq id -> proposer -> [accepted, trials]
        self._proposer: dict[str, list[float]] = {}

    def observe(self, seq_id: int, proposer: str, num_proposed: int, num_accepted: int) -> None:
        rejected = 1.0 if num_accepted < num_proposed else 0.0
        for stats in (self._seq.setdefault(seq_id, {}).setdefault(proposer, [0.0, 0.0]),
                      self._proposer.setdefault(proposer, [0.0, 0.0])):
            stats[0] = stats[0] * DECAY + num_accepted
            stats[1] = stats[1] * DECAY + num_accepted + rejected

    def alpha(self, seq_id: int, proposer: str) -> float:
        acc, trials = self._proposer.get(proposer, (0.0, 0.0))
        base = (acc + 2 * PRIOR_ALPHA) / (trials + 2)  # NOTE: never 0 or 1: a bad start does not end it for good
        acc, trials = self._seq.get(seq_id, {}).get(proposer, (0.0, 0.0))
        return (acc + 2 * base) / (trials + 2)  # two pseudo-trials at the proposer's mean

    def release(self, seq_id: int) -> None:
        self._seq.pop(seq_id, None)


class RealizedCost:
    """Measured seconds per emitted token of decode-only steps, by batch size (powers of two), without
    speculation ("off") and with each proposer (a step with a draft round counts as the draft's): the
    clock's check on the cost model. Speculation that the model likes but that the clock finds slower
    than off at this batch size is held off there."""

    MIN_WEIGHT = 3.0  # decayed observations of both before the check says anything

    def __init__(self):
        self._stats: dict[tuple[int, str], list[float]] = {}  # (bucket, mode) -> [seconds, tokens, weight]

    def observe(self, num_seqs: int, mode: str, seconds: float, tokens: int) -> None:
        stats = self._stats.setdefault((num_seqs.bit_length(), mode), [0.0, 0.0, 0.0])
        for i, v in enumerate((seconds, tokens, 1.0)):
            stats[i] = stats[i] * DECAY + v

    def slower(self, num_seqs: int, mode: str) -> bool:
        bucket = num_seqs.bit_length()
        mine, off = self._stats.get((bucket, mode)), self._stats.get((bucket, "off"))
        if mine is None or off is None or min(mine[2], off[2]) < self.MIN_WEIGHT:
            return False
        return mine[0] / mine[1] > off[0] / off[1]


def expected_tokens(alpha: float, k: int) -> float:
    """E(k) = 1 + alpha + ... + alpha^k."""
    return k + 1.0 if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


class SpecPolicy:
    def __init__(self, max_k: int, adaptive: bool, step_cost: LinearCost):
        self.max_k = max_k
        self.adaptive = adaptive
        self.step_cost = step_cost  # seconds of a step for (tokens, of them proposals)
        self.round_cost: dict[str, LinearCost] = {}  # per proposer: seconds per proposal pass for x sequences
        self.acceptance = Acceptance()

    def observe_round(self, proposer: str, num_seqs: int, k: int, seconds: float) -> None:
        if k > 0:
            self._round(proposer).observe((num_seqs,), seconds / k)

    def _round(self, proposer: str) -> LinearCost:
        cost = self.round_cost.get(proposer)
        if cost is None:  # prior: a pass of a model proposer costs like a target step; n-gram, about nothing
            a, b, _ = self.step_cost.coefficients
            cost = self.round_cost[proposer] = LinearCost(0.0, 0.0) if proposer == "ngram" else LinearCost(a, b)
        return cost

    def plan(self, alphas: list[float], limits: list[int], proposer_of: list[str], probe: int = -1) -> list[int]:
        """k per decoding sequence of the coming step. alphas: each one's acceptance; limits: the most
        tokens it may still take beyond one (max_tokens, context); proposer_of: who proposes for it.
        probe: a sequence that proposes even when the model says no, so that its acceptance (which
        only proposing measures) can change that answer; -1 for none."""
        n = len(alphas)
        if not n:
            return []
        own = [min(self.max_k, lim) for lim in limits]
        if not self.adaptive:
            return own
        planned = self._plan(alphas, own, proposer_of)
        if 0 <= probe < n and not any(planned):
            planned[probe] = own[probe]
        return planned

    def _plan(self, alphas: list[float], limits: list[int], proposer_of: list[str]) -> list[int]:
        n = len(alphas)
        own = list(limits)
        a, b, c = self.step_cost.coefficients
        per_token = a / n + b  # a token's cost without speculation at this batch size
        for i, alpha in enumerate(alphas):
            pos_cost = b + c + self._round(proposer_of[i]).coefficients[1]
            if alpha <= 0.0 or pos_cost >= per_token:
                own[i] = 0
            elif alpha < 1.0 and pos_cost > 0.0:
                own[i] = min(own[i], int(math.log(pos_cost / per_token) / math.log(alpha)))
        best_k, best_rate = 0, n / max(self.step_cost(n, 0), 1e-9)
        rounds_of = {name: self._round(name) for name in set(proposer_of)}
        for cap in range(1, max(own, default=0) + 1):
            ks = [min(cap, k) for k in own]
            num_proposals = sum(ks)
            seconds = self.step_cost(n + num_proposals, num_proposals)
            for name, round_cost in rounds_of.items():
                mine = [k for k, p in zip(ks, proposer_of) if k and p == name]
                if mine:
                    seconds += max(mine) * round_cost(len(mine))
            rate = sum(map(expected_tokens, alphas, ks)) / max(seconds, 1e-9)
            if rate <= best_rate:
                break  # NOTE: the rate rises then falls with the cap: past its peak it only falls
            best_k, best_rate = cap, rate
        return [min(best_k, k) for k in own]
