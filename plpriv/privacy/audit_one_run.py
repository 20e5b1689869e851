"""One-run audit (Steinke, Nasr, Jagielski 2023, "Privacy auditing with one (1) training run"): m canaries, each
included with probability 1/2; guess IN / OUT on the k+ most / k- least member-like scores; r guesses, v correct.
Under eps-DP, P[v correct] is dominated by Binomial(r, e^eps / (1 + e^eps)) (their Thm. 3.1); under (eps, delta)-DP
the tail gains 2 m delta * alpha (their Sec. 5 / App. D p-value)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import optimize, stats

from plpriv.privacy.audit_checks import ArrayLike, check_confidence, check_delta, check_int, check_scores

__all__ = ["OneRunResult", "one_run_audit", "one_run_epsilon_lower_bound", "one_run_p_value"]


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """P-value of >= v correct guesses out of r under the null "the mechanism is (epsilon, delta)-DP".

    p = P[Bin(r, q) >= v] + 2 m delta * max_{1<=i<=v} P[v - i <= Bin(r, q) < v] / i,  q = e^eps / (1 + e^eps);
    the second term vanishes for delta = 0 (Steinke et al. 2023, Thm. 3.1 and the approximate-DP p-value of Sec. 5).
    """
    m = check_int("m", m, 1)
    r = check_int("r", r, 0, m)
    v = check_int("v", v, 0, r)
    delta = check_delta(delta)
    if epsilon < 0 or not math.isfinite(epsilon):
        raise ValueError(f"`epsilon` must be finite and >= 0, got {epsilon}.")
    return _one_run_p(m, r, v, epsilon, delta)


def _one_run_p(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    if v == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of eps-DP randomized response
    p = float(stats.binom.sf(v - 1, r, q))
    if delta > 0:
        pmf = stats.binom.pmf(np.arange(v), r, q)  # P[Bin = j], j < v
        tail = np.cumsum(pmf[::-1])  # i-th entry: P[v - i <= Bin < v]
        alpha = float(np.max(tail / np.arange(1, v + 1)))
        p += 2.0 * m * delta * alpha
    return min(p, 1.0)


def one_run_epsilon_lower_bound(m: int, r: int, v: int, delta: float = 0.0, confidence: float = 0.95) -> float:
    """Largest eps rejected at level 1 - confidence given v correct of r guesses on m canaries (0 if none)."""
    m = check_int("m", m, 1)
    r = check_int("r", r, 0, m)
    v = check_int("v", v, 0, r)
    delta = check_delta(delta)
    level = 1.0 - check_confidence(confidence)
    f = lambda e: _one_run_p(m, r, v, e, delta) - level  # noqa: E731  p-value grows with eps
    if f(0.0) >= 0:
        return 0.0
    hi = 1.0
    while f(hi) < 0:  # finite for r >= 1: p(eps) -> 1 as eps -> inf
        hi *= 2.0
    return float(optimize.brentq(f, 0.0, hi, xtol=1e-12, rtol=1e-12))


@dataclass(frozen=True)
class OneRunResult:
    """Outcome of a one-run audit: v correct out of r = k_pos + k_neg guesses on m canaries."""

    epsilon: float
    m: int
    r: int
    v: int
    k_pos: int
    k_neg: int
    delta: float
    confidence: float
    higher_is_in: bool

    @property
    def accuracy(self) -> float:
        return self.v / self.r if self.r else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy": self.accuracy}


def one_run_audit(
    scores: ArrayLike,
    included: ArrayLike,
    k_pos: int,
    k_neg: int,
    delta: float = 0.0,
    confidence: float = 0.95,
    *,
    higher_is_in: bool = False,
) -> OneRunResult:
    """One-run audit of Steinke et al. 2023 from per-canary scores of a single trained model.

    Args:
        scores: one score per canary (m of them); lower = more member-like unless ``higher_is_in``.
        included: boolean per canary, True where it was in the training set (each should be drawn with prob. 1/2).
        k_pos: guess IN for the k_pos most member-like canaries. k_neg: guess OUT for the k_neg least member-like.
        delta: 0 audits pure eps-DP; > 0 adds the approximate-DP correction (needs m * delta well below 1).
    Choosing k_pos / k_neg on the same canaries inflates the bound; fix them in advance or on held-out canaries.
    """
    s = check_scores("scores", scores)
    inc = np.asarray(included)
    if inc.shape != s.shape:
        raise ValueError(f"`included` must have the shape of `scores` {s.shape}, got {inc.shape}.")
    if inc.dtype != np.bool_:
        if not np.all((inc == 0) | (inc == 1)):
            raise ValueError("`included` must be boolean (or 0/1) per canary.")
        inc = inc.astype(bool)
    m = s.size
    k_pos = check_int("k_pos", k_pos, 0, m)
    k_neg = check_int("k_neg", k_neg, 0, m - k_pos)
    order = np.argsort(-s if higher_is_in else s, kind="stable")  # most member-like first
    v = int(inc[order[:k_pos]].sum()) + int((~inc[order[m - k_neg :]]).sum())
    r = k_pos + k_neg
    eps = one_run_epsilon_lower_bound(m, r, v, delta, confidence)
    return OneRunResult(eps, m, r, v, k_pos, k_neg, float(delta), float(confidence), bool(higher_is_in))
