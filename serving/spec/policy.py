"""How much to speculate: k per sequence from its acceptance, and per step from a measured cost model.

The model of a step (fitted online, `LinearCost`): the target's forward costs a + b * T for T
tokens in the step, and a proposer's round costs k * (c + d * B) for B sequences proposing k tokens
each (n-gram lookup: about nothing). A sequence whose proposals are each accepted with probability
alpha (the chance that the next one is accepted given that the ones before were) emits on average
E(k) = 1 + alpha + ... + alpha^k = (1 - alpha^(k+1)) / (1 - alpha) tokens per step when it proposes k.

- Per sequence: its j-th proposal is worth proposing while the tokens it is expected to bring,
  alpha^j, times the time a token costs without speculation, a/B + b, exceed the position's cost, b
  (verifying) + d (proposing): k_i = the largest such j.
- Per step: the cap K over all sequences maximises tokens per second,
  sum_i E_i(min(K, k_i)) / (a + b * (B + sum_i min(K, k_i)) + cost of the round), against K = 0.
  On a loaded step b * B dominates and K falls to 0: speculation turns itself off.
"""

from __future__ import annotations

import math

PRIOR_ALPHA = 0.6  # a proposer's acceptance before it has been seen; then its running mean
DECAY = 0.9  # per observation, for acceptance and the cost fit
PROBE_EVERY = 16  # steps: while speculation is off, one sequence in this many steps proposes anyway


class LinearCost:
    """y = a + b * x, least squares over exponentially decayed observations (weight DECAY per step back)."""

    def __init__(self, a: float, b: float, prior_weight: float = 2.0):
        # the prior as two pseudo-observations at x = 1 and x = 64
        self._s = [0.0] * 5  # sum of w, w x, w y, w x^2, w x y
        for x in (1.0, 64.0):
            self.observe(x, a + b * x, prior_weight / 2)

    def observe(self, x: float, y: float, weight: float = 1.0) -> None:
        s = self._s
        for i, v in enumerate((1.0, x, y, x * x, x * y)):
            s[i] = s[i] * DECAY + weight * v

    @property
    def coefficients(self) -> tuple[float, float]:
        w, sx, sy, sxx, sxy = self._s
        var = w * sxx - sx * sx
        b = (w * sxy - sx * sy) / var if var > 1e-9 * w * w else 0.0
        b = max(b, 0.0)
        a = max((sy - b * sx) / w, 0.0)
        return a, b

    def __call__(self, x: float) -> float:
        a, b = self.coefficients
        return a + b * x


class Acceptance:
    """The chance that a proposal is accepted given that those before it were: accepted / (accepted +
    rejections), decayed, per sequence, starting from the proposer's running mean."""

    def __init__(self):
        self._seq: dict[tuple[int, str], list[float]] = {}
        self._proposer: dict[str, list[float]] = {}

    def observe(self, seq_id: int, proposer: str, num_proposed: int, num_accepted: int) -> None:
        rejected = 1.0 if num_accepted < num_proposed else 0.0
        for stats in (self._seq.setdefault((seq_id, proposer), [0.0, 0.0]),
                      self._proposer.setdefault(proposer, [0.0, 0.0])):
            stats[0] = stats[0] * DECAY + num_accepted
            stats[1] = stats[1] * DECAY + num_accepted + rejected

    def alpha(self, seq_id: int, proposer: str) -> float:
        acc, trials = self._proposer.get(proposer, (0.0, 0.0))
        base = (acc + 2 * PRIOR_ALPHA) / (trials + 2)  # NOTE: never 0 or 1: a bad start does not end it for good
        acc, trials = self._seq.get((seq_id, proposer), (0.0, 0.0))
        return (acc + 2 * base) / (trials + 2)  # two pseudo-trials at the proposer's mean

    def release(self, seq_id: int) -> None:
        for key in [k for k in self._seq if k[0] == seq_id]:
            del self._seq[key]


def expected_tokens(alpha: float, k: int) -> float:
    """E(k) = 1 + alpha + ... + alpha^k."""
    return k + 1.0 if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


class SpecPolicy:
    def __init__(self, max_k: int, adaptive: bool, step_cost: LinearCost):
        self.max_k = max_k
        self.adaptive = adaptive
        self.step_cost = step_cost  # seconds of the target's forward for x tokens
        self.round_cost: dict[str, LinearCost] = {}  # per proposer: seconds per proposal pass for x sequences
        self.acceptance = Acceptance()

    def observe_round(self, proposer: str, num_seqs: int, k: int, seconds: float) -> None:
        if k > 0:
            self._round(proposer).observe(num_seqs, seconds / k)

    def _round(self, proposer: str) -> LinearCost:
        cost = self.round_cost.get(proposer)
        if cost is None:  # prior: a pass of a model proposer costs like a target step; n-gram, about nothing
            a, b = self.step_cost.coefficients
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
        a, b = self.step_cost.coefficients
        per_token = a / n + b  # a token's cost without speculation at this batch size
        for i, alpha in enumerate(alphas):
            pos_cost = b + self._round(proposer_of[i]).coefficients[1]
            if alpha <= 0.0 or pos_cost >= per_token:
                own[i] = 0
            elif alpha < 1.0 and pos_cost > 0.0:
                own[i] = min(own[i], int(math.log(pos_cost / per_token) / math.log(alpha)))
        best_k, best_rate = 0, n / max(self.step_cost(n), 1e-9)
        names = set(proposer_of)
        for cap in range(1, max(own, default=0) + 1):
            ks = [min(cap, k) for k in own]
            tokens = sum(expected_tokens(al, k) for al, k in zip(alphas, ks))
            rounds = sum(max((k for k, p in zip(ks, proposer_of) if p == name), default=0)
                         * self._round(name)(sum(1 for k, p in zip(ks, proposer_of) if p == name and k))
                         for name in names)
            rate = tokens / max(self.step_cost(n + sum(ks)) + rounds, 1e-9)
            if rate > best_rate:
                best_k, best_rate = cap, rate
        return [min(best_k, k) for k in own]
