"""Empirical privacy auditing: epsilon lower bounds from membership-inference outcomes.

Pure math (numpy + scipy), no Lightning. Three estimators:

* Clopper-Pearson (Jagielski et al. 2020; Nasr et al. 2021): from FP/FN counts over models trained without / with
  a canary, any (eps, delta)-DP mechanism satisfies FPR + e^eps FNR >= 1 - delta and FNR + e^eps FPR >= 1 - delta.
  Plugging in one-sided Clopper-Pearson upper bounds (each at level beta/2, union bound -> joint 1 - beta) gives
  eps_LB = max(ln((1 - delta - FPR+) / FNR+), ln((1 - delta - FNR+) / FPR+)).
* GDP variant (Nasr et al. 2023, "Tight auditing"): mu_LB = Phi^-1(1 - FPR+) - Phi^-1(FNR+), converted to eps at
  delta through the mu-GDP privacy profile delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)
  (Dong, Roth, Su 2019, Cor. 2.13). Tighter, but assumes a Gaussian trade-off curve.
* One-run audit (Steinke, Nasr, Jagielski 2023, "Privacy auditing with one (1) training run"): m canaries, each
  included with probability 1/2; guess IN / OUT on the k+ most / k- least member-like scores; r guesses, v correct.
  Under eps-DP, P[v correct] is dominated by Binomial(r, e^eps / (1 + e^eps)) (their Thm. 3.1); under
  (eps, delta)-DP the tail gains 2 m delta * alpha (their Sec. 5 / App. D p-value). eps_LB is the largest eps whose
  null hypothesis is rejected at level beta = 1 - confidence.

Score convention everywhere: lower score = more likely IN (e.g. the canary's loss); pass ``higher_is_in=True`` for
scores where higher means member (e.g. logit margin, likelihood ratio).

Many-model audits should go through :func:`estimate`: it chooses the threshold with the estimator's own objective
on *reference* models and computes the bound on disjoint *evaluation* models, and refuses to run when a model id
appears in both (taking the best threshold on the evaluation models themselves inflates the bound; see
``ASSUMPTIONS`` for what each estimator assumes).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal, Sequence, Union

import numpy as np
from scipy import optimize, stats

__all__ = [
    "ASSUMPTIONS",
    "ESTIMATORS",
    "AuditResult",
    "EstimateResult",
    "ScoreSplit",
    "OneRunResult",
    "audit_counts",
    "audit_scores",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "estimate",
    "epsilon_lower_bound",
    "gdp_delta",
    "gdp_epsilon_lower_bound",
    "gaussian_mu_estimate",
    "gdp_mu_interval",
    "gdp_mu_lower_bound",
    "gdp_mu_to_epsilon",
    "one_run_audit",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
    "select_threshold",
    "selection_objective",
]

ArrayLike = Union[Sequence[float], np.ndarray, Any]  # anything np.asarray accepts (lists, arrays, CPU tensors)
Objective = Union[Literal["epsilon", "gdp"], Callable[[int, int, int, int], float]]


# ----------------------------------------------------------------------------------------------------------------
# Input checks (eager, the message names the bad value and the fix)


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {value!r} ({type(value).__name__}).")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"`{name}` must be in {bound}, got {value}.")
    return value


def _check_delta(delta: float, *, positive: bool = False) -> float:
    delta = float(delta)
    if not (0.0 <= delta < 1.0) or (positive and delta == 0.0):
        need = "(0, 1)" if positive else "[0, 1)"
        hint = " (a Gaussian trade-off curve is not pure DP, so delta = 0 gives eps = inf)" if positive else ""
        raise ValueError(f"`delta` must be in {need}{hint}, got {delta}.")
    return delta


def _check_confidence(confidence: float) -> float:
    confidence = float(confidence)
    if not (0.0 < confidence < 1.0):
        raise ValueError(f"`confidence` must be in (0, 1), e.g. 0.95, got {confidence}.")
    return confidence


def _check_scores(name: str, scores: ArrayLike) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"`{name}` must be a non-empty 1-D array of scores, got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` contains non-finite values ({int((~np.isfinite(arr)).sum())} of {arr.size}).")
    return arr


# ----------------------------------------------------------------------------------------------------------------
# Clopper-Pearson bound (many-model audit)


def _cp_upper(k: np.ndarray | int, n: np.ndarray | int, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound at level alpha: BetaInv(1 - alpha; k + 1, n - k), = 1 when k = n."""
    k = np.asarray(k, dtype=np.float64)
    n = np.broadcast_to(np.asarray(n, dtype=np.float64), k.shape)
    out = np.ones(k.shape)
    ok = k < n
    out[ok] = stats.beta.ppf(1.0 - alpha, k[ok] + 1.0, n[ok] - k[ok])
    return out


def _cp_lower(k: np.ndarray | int, n: np.ndarray | int, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound at level alpha: BetaInv(alpha; k, n - k + 1), = 0 when k = 0."""
    k = np.asarray(k, dtype=np.float64)
    n = np.broadcast_to(np.asarray(n, dtype=np.float64), k.shape)
    out = np.zeros(k.shape)
    ok = k > 0
    out[ok] = stats.beta.ppf(alpha, k[ok], n[ok] - k[ok] + 1.0)
    return out


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """Exact one-sided lower confidence bound on a binomial rate: P[Bin(n, p_lower) >= k] = alpha (0 for k = 0)."""
    n = _check_int("n", n, 1)
    k = _check_int("k", k, 0, n)
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"`alpha` must be in (0, 1), got {alpha}.")
    return float(_cp_lower(k, n, alpha))


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """Exact one-sided upper confidence bound on a binomial rate: P[Bin(n, p_upper) <= k] = alpha."""
    n = _check_int("n", n, 1)
    k = _check_int("k", k, 0, n)
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"`alpha` must be in (0, 1), got {alpha}.")
    return float(_cp_upper(k, n, alpha))


def _eps_from_rates(fpr_u: np.ndarray, fnr_u: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Both directions of the (eps, delta) hypothesis-testing bound; -inf where a direction gives nothing."""
    with np.errstate(divide="ignore", invalid="ignore"):
        num_a = 1.0 - delta - fpr_u  # FPR + e^eps FNR >= 1 - delta
        num_b = 1.0 - delta - fnr_u  # FNR + e^eps FPR >= 1 - delta
        eps_a = np.where(num_a > 0, np.log(np.where(num_a > 0, num_a, 1.0) / fnr_u), -np.inf)
        eps_b = np.where(num_b > 0, np.log(np.where(num_b > 0, num_b, 1.0) / fpr_u), -np.inf)
    return eps_a, eps_b


@dataclass(frozen=True)
class AuditResult:
    """Outcome of a threshold audit; ``epsilon`` is the Clopper-Pearson lower bound (>= 0).

    ``direction`` names the rate in the denominator of the winning bound: ``"fnr"`` means
    eps = ln((1 - delta - FPR+) / FNR+) won (the attack rarely misses members), ``"fpr"`` means
    eps = ln((1 - delta - FNR+) / FPR+) won (the attack rarely accuses non-members), ``"none"`` means both were <= 0.
    """

    epsilon: float
    fp: int
    fn: int
    n_out: int
    n_in: int
    delta: float
    confidence: float
    fpr_upper: float
    fnr_upper: float
    epsilon_fnr: float  # ln((1 - delta - FPR+) / FNR+), may be -inf
    epsilon_fpr: float  # ln((1 - delta - FNR+) / FPR+), may be -inf
    direction: Literal["fnr", "fpr", "none"]
    mu_lower: float  # GDP mu lower bound from the same Clopper-Pearson rates (>= 0)
    epsilon_gdp: float | None  # mu_lower converted at delta; None when delta == 0 (conversion needs delta > 0)
    threshold: float | None = None
    higher_is_in: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def audit_counts(
    fp: int, fn: int, n_out: int, n_in: int, delta: float, confidence: float = 0.95
) -> AuditResult:
    """Clopper-Pearson (and GDP) epsilon lower bound from error counts.

    Args:
        fp: OUT models (trained without the canary) called IN.
        fn: IN models (trained with the canary) called OUT.
        n_out: number of OUT models. n_in: number of IN models.
        delta: the delta of the (eps, delta) guarantee being audited, in [0, 1).
        confidence: joint confidence 1 - beta; each rate gets a one-sided bound at level beta / 2.
    """
    n_out = _check_int("n_out", n_out, 1)
    n_in = _check_int("n_in", n_in, 1)
    fp = _check_int("fp", fp, 0, n_out)
    fn = _check_int("fn", fn, 0, n_in)
    delta = _check_delta(delta)
    confidence = _check_confidence(confidence)
    half_beta = (1.0 - confidence) / 2.0
    fpr_u = float(_cp_upper(fp, n_out, half_beta))
    fnr_u = float(_cp_upper(fn, n_in, half_beta))
    eps_a, eps_b = (float(e) for e in _eps_from_rates(np.float64(fpr_u), np.float64(fnr_u), delta))
    best = max(eps_a, eps_b)
    direction: Literal["fnr", "fpr", "none"] = "none" if best <= 0 else ("fnr" if eps_a >= eps_b else "fpr")
    mu = float(_mu_from_rates(np.float64(fpr_u), np.float64(fnr_u)))
    eps_gdp = gdp_mu_to_epsilon(mu, delta) if delta > 0 else None
    return AuditResult(
        epsilon=max(0.0, best),
        fp=fp,
        fn=fn,
        n_out=n_out,
        n_in=n_in,
        delta=delta,
        confidence=confidence,
        fpr_upper=fpr_u,
        fnr_upper=fnr_u,
        epsilon_fnr=eps_a,
        epsilon_fpr=eps_b,
        direction=direction,
        mu_lower=mu,
        epsilon_gdp=eps_gdp,
    )


def epsilon_lower_bound(
    fp: int, fn: int, n_out: int, n_in: int, delta: float, confidence: float = 0.95
) -> float:
    """Clopper-Pearson epsilon lower bound (>= 0); see :func:`audit_counts` for the details."""
    return audit_counts(fp, fn, n_out, n_in, delta, confidence).epsilon


# ----------------------------------------------------------------------------------------------------------------
# GDP variant (Nasr et al. 2023)


def _mu_from_rates(fpr_u: np.ndarray, fnr_u: np.ndarray) -> np.ndarray:
    # Gaussian trade-off: FNR = Phi(Phi^-1(1 - FPR) - mu)  =>  mu = Phi^-1(1 - FPR) - Phi^-1(FNR). Upper rates -> LB.
    with np.errstate(divide="ignore", invalid="ignore"):
        mu = stats.norm.isf(fpr_u) - stats.norm.ppf(fnr_u)
    return np.maximum(np.nan_to_num(mu, nan=0.0, neginf=0.0), 0.0)


def gdp_mu_lower_bound(fp: int, fn: int, n_out: int, n_in: int, confidence: float = 0.95) -> float:
    """mu-GDP lower bound mu_LB = Phi^-1(1 - FPR+) - Phi^-1(FNR+) from Clopper-Pearson rates (clipped at 0)."""
    n_out = _check_int("n_out", n_out, 1)
    n_in = _check_int("n_in", n_in, 1)
    fp = _check_int("fp", fp, 0, n_out)
    fn = _check_int("fn", fn, 0, n_in)
    half_beta = (1.0 - _check_confidence(confidence)) / 2.0
    return float(_mu_from_rates(_cp_upper(fp, n_out, half_beta), _cp_upper(fn, n_in, half_beta)))


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
    delta = _check_delta(delta, positive=True)
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
    delta = _check_delta(delta, positive=True)
    return gdp_mu_to_epsilon(gdp_mu_lower_bound(fp, fn, n_out, n_in, confidence), delta)


# ----------------------------------------------------------------------------------------------------------------
# Threshold selection on a held-out split, then audit on the evaluation split


def _error_counts(
    scores_in: np.ndarray, scores_out: np.ndarray, thresholds: np.ndarray, higher_is_in: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(FP, FN) for each threshold; predict IN iff score < t (or score > t with higher_is_in)."""
    s_in, s_out = np.sort(scores_in), np.sort(scores_out)
    if higher_is_in:
        fp = s_out.size - np.searchsorted(s_out, thresholds, side="right")  # OUT with score > t
        fn = np.searchsorted(s_in, thresholds, side="right")  # IN with score <= t
    else:
        fp = np.searchsorted(s_out, thresholds, side="left")  # OUT with score < t
        fn = s_in.size - np.searchsorted(s_in, thresholds, side="left")  # IN with score >= t
    return fp, fn


def select_threshold(
    scores_in: ArrayLike,
    scores_out: ArrayLike,
    delta: float,
    confidence: float = 0.95,
    *,
    higher_is_in: bool = False,
    objective: Objective = "epsilon",
) -> float:
    """Threshold maximising an audit objective on a held-out split.

    Candidates are the midpoints between consecutive distinct scores (IN and OUT pooled), so the threshold separates
    the same way on any split. ``objective``: ``"epsilon"`` (Clopper-Pearson bound), ``"gdp"`` (maximises mu_LB,
    hence the GDP epsilon at any delta), or a callable ``f(fp, fn, n_out, n_in) -> float``. Ties keep the smallest
    candidate. Use the result with :func:`audit_scores` on a *different* split; reusing the selection split inflates
    the bound.
    """
    s_in = _check_scores("scores_in", scores_in)
    s_out = _check_scores("scores_out", scores_out)
    delta = _check_delta(delta)
    confidence = _check_confidence(confidence)
    uniq = np.unique(np.concatenate([s_in, s_out]))
    if uniq.size < 2:
        raise ValueError(f"All {s_in.size + s_out.size} scores equal {uniq[0]}; no threshold can separate them.")
    cand = (uniq[:-1] + uniq[1:]) / 2.0
    fp, fn = _error_counts(s_in, s_out, cand, higher_is_in)
    n_out, n_in = s_out.size, s_in.size
    half_beta = (1.0 - confidence) / 2.0
    if callable(objective) and getattr(objective, "vectorized", False):  # e.g. selection_objective(...)
        values = np.asarray(objective(fp, fn, n_out, n_in), dtype=np.float64)
    elif callable(objective):
        values = np.array([float(objective(int(a), int(b), n_out, n_in)) for a, b in zip(fp, fn)])
    elif objective == "epsilon":
        eps_a, eps_b = _eps_from_rates(_cp_upper(fp, n_out, half_beta), _cp_upper(fn, n_in, half_beta), delta)
        values = np.maximum(np.maximum(eps_a, eps_b), 0.0)
    elif objective == "gdp":
        values = _mu_from_rates(_cp_upper(fp, n_out, half_beta), _cp_upper(fn, n_in, half_beta))
    else:
        raise ValueError(f"`objective` must be 'epsilon', 'gdp' or a callable, got {objective!r}.")
    return float(cand[int(np.argmax(values))])


def audit_scores(
    scores_in: ArrayLike,
    scores_out: ArrayLike,
    threshold: float,
    delta: float,
    confidence: float = 0.95,
    *,
    higher_is_in: bool = False,
) -> AuditResult:
    """Apply a fixed threshold (predict IN iff score < threshold, or > with ``higher_is_in``) and audit the counts."""
    s_in = _check_scores("scores_in", scores_in)
    s_out = _check_scores("scores_out", scores_out)
    if not math.isfinite(float(threshold)):
        raise ValueError(f"`threshold` must be finite, got {threshold}.")
    fp, fn = _error_counts(s_in, s_out, np.array([float(threshold)]), higher_is_in)
    res = audit_counts(int(fp[0]), int(fn[0]), s_out.size, s_in.size, delta, confidence)
    return AuditResult(**{**res.as_dict(), "threshold": float(threshold), "higher_is_in": bool(higher_is_in)})


# ----------------------------------------------------------------------------------------------------------------
# Estimators with a reference / evaluation split (the many-model audit)

ESTIMATORS: tuple[str, ...] = ("gdp", "clopper_pearson")

#: What each estimator's bound assumes (the report prints these next to the numbers).
ASSUMPTIONS: dict[str, str] = {
    "clopper_pearson": (
        "Clopper-Pearson (Jagielski et al. 2020): valid for any (eps, delta)-DP mechanism; assumes only that the"
        " evaluation models are independent runs of the training pipeline and that the threshold was fixed without"
        " them. Conservative: with n models per side it cannot certify more than ln(n / 3.7) or so."
    ),
    "gdp": (
        "GDP (Nasr et al. 2023): the mu of the Gaussian trade-off curve through the attack's (FPR, FNR) point,"
        " converted to eps at delta through the mu-GDP privacy profile. It assumes the mechanism's trade-off curve is"
        " Gaussian, which holds for full-batch DP-GD (q = 1: a composition of Gaussian mechanisms, exactly"
        " sqrt(T)/sigma-GDP) and is only an approximation with Poisson subsampling (q < 1). mu_lower is a valid lower"
        " bound on the GDP parameter of any mechanism; the eps conversion is the assumption."
    ),
}


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
    n_out = _check_int("n_out", n_out, 1)
    n_in = _check_int("n_in", n_in, 1)
    fp = _check_int("fp", fp, 0, n_out)
    fn = _check_int("fn", fn, 0, n_in)
    half_beta = (1.0 - _check_confidence(confidence)) / 2.0
    lower = float(_mu_from_rates(_cp_upper(fp, n_out, half_beta), _cp_upper(fn, n_in, half_beta)))
    fpr_lo, fnr_lo = float(_cp_lower(fp, n_out, half_beta)), float(_cp_lower(fn, n_in, half_beta))
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
    s_in = _check_scores("scores_in", scores_in)
    s_out = _check_scores("scores_out", scores_out)
    if s_in.size < 2 or s_out.size < 2:
        raise ValueError(f"need >= 2 scores per side, got {s_in.size} IN and {s_out.size} OUT.")
    confidence = _check_confidence(confidence)
    pooled = ((s_in.size - 1) * s_in.var(ddof=1) + (s_out.size - 1) * s_out.var(ddof=1)) / (s_in.size + s_out.size - 2)
    if not pooled > 0:
        raise ValueError("The scores have zero variance; mu is undefined (noise off?).")
    mu = float((s_in.mean() - s_out.mean()) if higher_is_in else (s_out.mean() - s_in.mean())) / math.sqrt(pooled)
    se = math.sqrt(1.0 / s_in.size + 1.0 / s_out.size + mu * mu / (2.0 * (s_in.size + s_out.size)))
    z = float(stats.norm.isf((1.0 - confidence) / 2.0))
    return mu, mu - z * se, mu + z * se


def selection_objective(estimator: str, delta: float, confidence: float = 0.95) -> Callable[[int, int, int, int], float]:
    """The objective an estimator's threshold is chosen with on the reference models: its own bound first.

    ``gdp``: mu_lower (monotone in the GDP eps at any delta); ``clopper_pearson``: the Clopper-Pearson eps, with
    mu_lower breaking the tie where a small reference split certifies 0 at every threshold. Youden's J
    (1 - FPR - FNR) breaks the remaining ties, instead of the smallest candidate.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"`estimator` must be one of {ESTIMATORS}, got {estimator!r}.")
    delta = _check_delta(delta)
    confidence = _check_confidence(confidence)
    half_beta = (1.0 - confidence) / 2.0

    def objective(fp: Any, fn: Any, n_out: int, n_in: int) -> Any:
        """Scalars -> float; arrays of counts -> array (``select_threshold`` calls it once for all candidates)."""
        scalar = np.ndim(fp) == 0 and np.ndim(fn) == 0
        fp, fn = np.asarray(fp, dtype=np.float64), np.asarray(fn, dtype=np.float64)
        fpr_u, fnr_u = _cp_upper(fp, n_out, half_beta), _cp_upper(fn, n_in, half_beta)
        value = 1e3 * _mu_from_rates(fpr_u, fnr_u) + (1.0 - fp / n_out - fn / n_in)
        if estimator == "clopper_pearson":
            eps_a, eps_b = _eps_from_rates(fpr_u, fnr_u, delta)
            value = value + 1e6 * np.maximum(np.maximum(eps_a, eps_b), 0.0)
        return float(value) if scalar else value

    objective.vectorized = True  # type: ignore[attr-defined]
    return objective


@dataclass(frozen=True)
class ScoreSplit:
    """Scores of one split of models: IN (trained with the canary) and OUT, each model named by a hashable id."""

    scores_in: np.ndarray
    scores_out: np.ndarray
    ids_in: tuple[Any, ...]
    ids_out: tuple[Any, ...]

    def __post_init__(self) -> None:
        s_in = _check_scores("scores_in", self.scores_in)
        s_out = _check_scores("scores_out", self.scores_out)
        ids_in, ids_out = tuple(self.ids_in), tuple(self.ids_out)
        if len(ids_in) != s_in.size or len(ids_out) != s_out.size:
            raise ValueError(
                f"one id per model: {len(ids_in)} ids for {s_in.size} IN scores, {len(ids_out)} for {s_out.size} OUT."
            )
        if len(set(ids_in + ids_out)) != len(ids_in) + len(ids_out):
            raise ValueError("A model id appears twice in one split (or as both IN and OUT).")
        object.__setattr__(self, "scores_in", s_in)
        object.__setattr__(self, "scores_out", s_out)
        object.__setattr__(self, "ids_in", ids_in)
        object.__setattr__(self, "ids_out", ids_out)

    @property
    def ids(self) -> set[Any]:
        return set(self.ids_in) | set(self.ids_out)


@dataclass(frozen=True)
class EstimateResult:
    """An estimator's bound: threshold from the reference split, counts and bound from the evaluation split.

    ``epsilon`` is the estimator's lower bound (Clopper-Pearson eps, or the GDP eps of ``mu_lower``);
    ``reference`` holds the counts at the chosen threshold on the reference split (a diagnostic, never a bound).
    ``max_certifiable`` is the estimator's bound for zero errors on the evaluation counts.
    """

    estimator: str
    assumption: str
    epsilon: float
    mu_lower: float
    mu_estimate: float
    mu_upper: float
    threshold: float
    higher_is_in: bool
    evaluation: AuditResult
    reference: AuditResult
    reference_objective: float
    max_certifiable: float

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["evaluation"], out["reference"] = self.evaluation.as_dict(), self.reference.as_dict()
        return out


def estimate(
    reference: ScoreSplit,
    evaluation: ScoreSplit,
    delta: float,
    confidence: float = 0.95,
    *,
    estimator: str = "gdp",
    higher_is_in: bool = False,
) -> EstimateResult:
    """Threshold chosen with ``estimator``'s own objective on ``reference``, bound computed on ``evaluation``.

    Raises if a model id is in both splits: selecting the threshold on the models the bound is computed on (the
    max over thresholds on the evaluation set) is optimistic. ``estimator``: ``"gdp"`` or ``"clopper_pearson"``
    (``ASSUMPTIONS`` says what each assumes). ``delta`` > 0 for ``"gdp"`` (the conversion needs it).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"`estimator` must be one of {ESTIMATORS}, got {estimator!r}.")
    if not isinstance(reference, ScoreSplit) or not isinstance(evaluation, ScoreSplit):
        raise TypeError("`reference` and `evaluation` must be ScoreSplit objects (scores with model ids).")
    shared = reference.ids & evaluation.ids
    if reference is evaluation or shared:
        some = sorted(map(str, shared))[:5]
        raise ValueError(
            f"The threshold must be chosen on models disjoint from the evaluation models; {len(shared)} model(s) are"
            f" in both splits (e.g. {some}). Choosing it on the evaluation models inflates the bound."
        )
    delta = _check_delta(delta, positive=estimator == "gdp")
    confidence = _check_confidence(confidence)
    objective = selection_objective(estimator, delta, confidence)
    threshold = select_threshold(
        reference.scores_in, reference.scores_out, delta, confidence, higher_is_in=higher_is_in, objective=objective
    )
    ref = audit_scores(reference.scores_in, reference.scores_out, threshold, delta, confidence, higher_is_in=higher_is_in)
    ev = audit_scores(evaluation.scores_in, evaluation.scores_out, threshold, delta, confidence, higher_is_in=higher_is_in)
    lower, point, upper = gdp_mu_interval(ev.fp, ev.fn, ev.n_out, ev.n_in, confidence)
    best = audit_counts(0, 0, ev.n_out, ev.n_in, delta, confidence)
    if estimator == "gdp":
        eps, cap = gdp_mu_to_epsilon(lower, delta), float(best.epsilon_gdp)  # type: ignore[arg-type]
    else:
        eps, cap = ev.epsilon, best.epsilon
    return EstimateResult(
        estimator=estimator,
        assumption=ASSUMPTIONS[estimator],
        epsilon=float(eps),
        mu_lower=lower,
        mu_estimate=point,
        mu_upper=upper,
        threshold=float(threshold),
        higher_is_in=bool(higher_is_in),
        evaluation=ev,
        reference=ref,
        reference_objective=float(objective(ref.fp, ref.fn, ref.n_out, ref.n_in)),
        max_certifiable=float(cap),
    )


# ----------------------------------------------------------------------------------------------------------------
# One-run audit (Steinke, Nasr, Jagielski 2023)


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """P-value of >= v correct guesses out of r under the null "the mechanism is (epsilon, delta)-DP".

    p = P[Bin(r, q) >= v] + 2 m delta * max_{1<=i<=v} P[v - i <= Bin(r, q) < v] / i,  q = e^eps / (1 + e^eps);
    the second term vanishes for delta = 0 (Steinke et al. 2023, Thm. 3.1 and the approximate-DP p-value of Sec. 5).
    """
    m = _check_int("m", m, 1)
    r = _check_int("r", r, 0, m)
    v = _check_int("v", v, 0, r)
    delta = _check_delta(delta)
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
    m = _check_int("m", m, 1)
    r = _check_int("r", r, 0, m)
    v = _check_int("v", v, 0, r)
    delta = _check_delta(delta)
    level = 1.0 - _check_confidence(confidence)
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
    s = _check_scores("scores", scores)
    inc = np.asarray(included)
    if inc.shape != s.shape:
        raise ValueError(f"`included` must have the shape of `scores` {s.shape}, got {inc.shape}.")
    if inc.dtype != np.bool_:
        if not np.all((inc == 0) | (inc == 1)):
            raise ValueError("`included` must be boolean (or 0/1) per canary.")
        inc = inc.astype(bool)
    m = s.size
    k_pos = _check_int("k_pos", k_pos, 0, m)
    k_neg = _check_int("k_neg", k_neg, 0, m - k_pos)
    order = np.argsort(-s if higher_is_in else s, kind="stable")  # most member-like first
    v = int(inc[order[:k_pos]].sum()) + int((~inc[order[m - k_neg :]]).sum())
    r = k_pos + k_neg
    eps = one_run_epsilon_lower_bound(m, r, v, delta, confidence)
    return OneRunResult(eps, m, r, v, k_pos, k_neg, float(delta), float(confidence), bool(higher_is_in))
