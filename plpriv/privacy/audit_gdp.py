"""GDP variant of the audit (Nasr et al. 2023, "Tight auditing"): mu_LB = Phi^-1(1 - FPR+) - Phi^-1(FNR+) from
Clopper-Pearson rates, converted to eps at delta through the mu-GDP privacy profile
delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Dong, Roth, Su 2019, Cor. 2.13); the mu interval and
a parametric mu estimate for Gaussian scores."""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, stats

from plpriv.privacy.audit_binomial import cp_lower, cp_upper
from plpriv.privacy.audit_checks import ArrayLike, check_confidence, check_delta, check_int, check_scores

__all__ = [
    "gaussian_mu_estimate",
    "gdp_delta",
    "gdp_epsilon_lower_bound",
    "gdp_mu_interval",
    "gdp_mu_lower_bound",
    "gdp_mu_to_epsilon",
    "mu_from_rates",
]


def mu_from_rates(fpr_u: np.ndarray, fnr_u: np.ndarray) -> np.ndarray:
    # Gaussian trade-off: FNR = Phi(Phi^-1(1 - FPR) - mu)  =>  mu = Phi^-1(1 - FPR) - Phi^-1(FNR). Upper rates -> LB.
    with np.errstate(divide="ignore", invalid="ignore"):
        mu = stats.norm.isf(fpr_u) - stats.norm.ppf(fnr_u)
    return np.maximum(np.nan_to_num(mu, nan=0.0, neginf=0.0), 0.0)


def gdp_mu_lower_bound(fp: int, fn: int, n_out: int, n_in: int, confidence: float = 0.95) -> float:
    """mu-GDP lower bound mu_LB = Phi^-1(1 - FPR+) - Phi^-1(FNR+) from Clopper-Pearson rates (clipped at 0)."""
    n_out = check_int("n_out", n_out, 1)
    n_in = check_int("n_in", n_in, 1)
    fp = check_int("fp", fp, 0, n_out)
    fn = check_int("fn", fn, 0, n_in)
    half_beta = (1.0 - check_confidence(confidence)) / 2.0
    return float(mu_from_rates(cp_upper(fp, n_out, half_beta), cp_upper(fn, n_in, half_beta)))


def gdp_delta(epsilon: float, mu: float) -> float:
    """Privacy profile of mu-GDP: delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    if mu < 0 or not math.isfinite(mu):
        raise ValueError(f"`mu` must be finite and >= 0, got {mu}.")
    if epsilon < 0:
        raise ValueError(f"`epsilon` must be >= 0, got {epsilon}.")
    if mu == 0:
        return 0.0
    a = -epsilon / mu + mu / 2.0
    b = -epsilon / mu - mu / 2.0
    # e^eps Phi(b) in log space: Phi(b) underflows long before e^eps overflows matters.
    return float(max(stats.norm.cdf(a) - math.exp(epsilon + stats.norm.logcdf(b)), 0.0))


def gdp_mu_to_epsilon(mu: float, delta: float) -> float:
    """Smallest eps such that mu-GDP implies (eps, delta)-DP, i.e. the root of gdp_delta(eps, mu) = delta."""
    delta = check_delta(delta, positive=True)
    if mu < 0 or not math.isfinite(mu):
        raise ValueError(f"`mu` must be finite and >= 0, got {mu}.")
    if gdp_delta(0.0, mu) <= delta:
        return 0.0
    hi = max(1.0, mu * mu)
    while gdp_delta(hi, mu) > delta:  # delta(eps) decreases to 0; find a bracket
        hi *= 2.0
    return float(optimize.brentq(lambda e: gdp_delta(e, mu) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12))


def gdp_epsilon_lower_bound(
    fp: int, fn: int, n_out: int, n_in: int, delta: float, confidence: float = 0.95
) -> float:
    """GDP epsilon lower bound: :func:`gdp_mu_lower_bound` converted at ``delta`` (> 0)."""
    delta = check_delta(delta, positive=True)
    return gdp_mu_to_epsilon(gdp_mu_lower_bound(fp, fn, n_out, n_in, confidence), delta)


def _mu_point(fp: int, fn: int, n_out: int, n_in: int) -> float:
    """Point estimate Phi^-1(1 - FPR) - Phi^-1(FNR) at the rates (k + 1/2) / (n + 1) (finite at 0 and n errors)."""
    fpr, fnr = (fp + 0.5) / (n_out + 1.0), (fn + 0.5) / (n_in + 1.0)
    return float(stats.norm.isf(fpr) - stats.norm.ppf(fnr))


def gdp_mu_interval(fp: int, fn: int, n_out: int, n_in: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mu_lower, mu_estimate, mu_upper)`` of the Gaussian trade-off curve through an attack's error counts.

    ``mu_lower`` (Clopper-Pearson upper rates, beta/2 each) is :func:`gdp_mu_lower_bound`; ``mu_upper`` uses the
    Clopper-Pearson *lower* rates (``inf`` with no error), so ``[mu_lower, mu_upper]`` covers the curve's mu with
    probability >= 1 - 2 beta. For equal-variance Gaussian scores (DP-GD with q = 1 and a linear score) the curve
    through every threshold's point is the mechanism's own, and the interval covers its mu.
    """
    n_out = check_int("n_out", n_out, 1)
    n_in = check_int("n_in", n_in, 1)
    fp = check_int("fp", fp, 0, n_out)
    fn = check_int("fn", fn, 0, n_in)
    half_beta = (1.0 - check_confidence(confidence)) / 2.0
    lower = float(mu_from_rates(cp_upper(fp, n_out, half_beta), cp_upper(fn, n_in, half_beta)))
    fpr_lo, fnr_lo = float(cp_lower(fp, n_out, half_beta)), float(cp_lower(fn, n_in, half_beta))
    upper = math.inf if fpr_lo == 0.0 or fnr_lo == 0.0 else float(stats.norm.isf(fpr_lo) - stats.norm.ppf(fnr_lo))
    return lower, _mu_point(fp, fn, n_out, n_in), max(upper, lower)


def gaussian_mu_estimate(
    scores_in: ArrayLike, scores_out: ArrayLike, confidence: float = 0.95, *, higher_is_in: bool = False
) -> tuple[float, float, float]:
    """``(estimate, lower, upper)`` of mu = (mean_out - mean_in) / pooled sd (sign by ``higher_is_in``).

    A parametric estimate for scores that are Gaussian with equal variance under both hypotheses (e.g. the
    white-box projection after one step of full-batch DP-GD): then mu is the trade-off curve's GDP parameter.
    The two-sided interval at ``confidence`` uses the large-sample standard error
    sqrt(1/n_in + 1/n_out + mu^2 / (2 (n_in + n_out))). Not a privacy bound (it trusts the Gaussian shape); a
    sanity statistic.
    """
    s_in = check_scores("scores_in", scores_in)
    s_out = check_scores("scores_out", scores_out)
    if s_in.size < 2 or s_out.size < 2:
        raise ValueError(f"need >= 2 scores per side, got {s_in.size} IN and {s_out.size} OUT.")
    confidence = check_confidence(confidence)
    pooled = ((s_in.size - 1) * s_in.var(ddof=1) + (s_out.size - 1) * s_out.var(ddof=1)) / (s_in.size + s_out.size - 2)
    if not pooled > 0:
        raise ValueError("The scores have zero variance; mu is undefined (noise off?).")
    mu = float((s_in.mean() - s_out.mean()) if higher_is_in else (s_out.mean() - s_in.mean())) / math.sqrt(pooled)
    se = math.sqrt(1.0 / s_in.size + 1.0 / s_out.size + mu * mu / (2.0 * (s_in.size + s_out.size)))
    z = float(stats.norm.isf((1.0 - confidence) / 2.0))
    return mu, mu - z * se, mu + z * se
