"""The threshold audit (many-model): Clopper-Pearson epsilon lower bound from FP/FN counts (Jagielski et al. 2020;
Nasr et al. 2021): any (eps, delta)-DP mechanism satisfies FPR + e^eps FNR >= 1 - delta and
FNR + e^eps FPR >= 1 - delta; the counts of a threshold on scores, and the threshold chosen on a held-out split."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal, Union

import numpy as np

from plpriv.privacy.audit_binomial import cp_upper
from plpriv.privacy.audit_checks import ArrayLike, check_confidence, check_delta, check_int, check_scores
from plpriv.privacy.audit_gdp import gdp_mu_to_epsilon, mu_from_rates

__all__ = [
    "AuditResult",
    "Objective",
    "audit_counts",
    "audit_scores",
    "epsilon_lower_bound",
    "eps_from_rates",
    "select_threshold",
]

Objective = Union[Literal["epsilon", "gdp"], Callable[[int, int, int, int], float]]


def eps_from_rates(fpr_u: np.ndarray, fnr_u: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
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
    n_out = check_int("n_out", n_out, 1)
    n_in = check_int("n_in", n_in, 1)
    fp = check_int("fp", fp, 0, n_out)
    fn = check_int("fn", fn, 0, n_in)
    delta = check_delta(delta)
    confidence = check_confidence(confidence)
    half_beta = (1.0 - confidence) / 2.0
    fpr_u = float(cp_upper(fp, n_out, half_beta))
    fnr_u = float(cp_upper(fn, n_in, half_beta))
    eps_a, eps_b = (float(e) for e in eps_from_rates(np.float64(fpr_u), np.float64(fnr_u), delta))
    best = max(eps_a, eps_b)
    direction: Literal["fnr", "fpr", "none"] = "none" if best <= 0 else ("fnr" if eps_a >= eps_b else "fpr")
    mu = float(mu_from_rates(np.float64(fpr_u), np.float64(fnr_u)))
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
    s_in = check_scores("scores_in", scores_in)
    s_out = check_scores("scores_out", scores_out)
    delta = check_delta(delta)
    confidence = check_confidence(confidence)
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
        eps_a, eps_b = eps_from_rates(cp_upper(fp, n_out, half_beta), cp_upper(fn, n_in, half_beta), delta)
        values = np.maximum(np.maximum(eps_a, eps_b), 0.0)
    elif objective == "gdp":
        values = mu_from_rates(cp_upper(fp, n_out, half_beta), cp_upper(fn, n_in, half_beta))
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
    s_in = check_scores("scores_in", scores_in)
    s_out = check_scores("scores_out", scores_out)
    if not math.isfinite(float(threshold)):
        raise ValueError(f"`threshold` must be finite, got {threshold}.")
    fp, fn = _error_counts(s_in, s_out, np.array([float(threshold)]), higher_is_in)
    res = audit_counts(int(fp[0]), int(fn[0]), s_out.size, s_in.size, delta, confidence)
    return AuditResult(**{**res.as_dict(), "threshold": float(threshold), "higher_is_in": bool(higher_is_in)})
