"""Exact (Clopper-Pearson) one-sided confidence bounds on a binomial rate: the error rates every audit bound
plugs in (Clopper and Pearson 1934; as used by Jagielski et al. 2020 and Nasr et al. 2021)."""

from __future__ import annotations

import numpy as np
from scipy import stats

from plpriv.privacy.audit_checks import check_int

__all__ = ["clopper_pearson_lower", "clopper_pearson_upper", "cp_lower", "cp_upper"]


def cp_upper(k: np.ndarray | int, n: np.ndarray | int, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound at level alpha: BetaInv(1 - alpha; k + 1, n - k), = 1 when k = n."""
    k = np.asarray(k, dtype=np.float64)
    n = np.broadcast_to(np.asarray(n, dtype=np.float64), k.shape)
    out = np.ones(k.shape)
    ok = k < n
    out[ok] = stats.beta.ppf(1.0 - alpha, k[ok] + 1.0, n[ok] - k[ok])
    return out


def cp_lower(k: np.ndarray | int, n: np.ndarray | int, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound at level alpha: BetaInv(alpha; k, n - k + 1), = 0 when k = 0."""
    k = np.asarray(k, dtype=np.float64)
    n = np.broadcast_to(np.asarray(n, dtype=np.float64), k.shape)
    out = np.zeros(k.shape)
    ok = k > 0
    out[ok] = stats.beta.ppf(alpha, k[ok], n[ok] - k[ok] + 1.0)
    return out


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """Exact one-sided lower confidence bound on a binomial rate: P[Bin(n, p_lower) >= k] = alpha (0 for k = 0)."""
    n = check_int("n", n, 1)
    k = check_int("k", k, 0, n)
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"`alpha` must be in (0, 1), got {alpha}.")
    return float(cp_lower(k, n, alpha))


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """Exact one-sided upper confidence bound on a binomial rate: P[Bin(n, p_upper) <= k] = alpha."""
    n = check_int("n", n, 1)
    k = check_int("k", k, 0, n)
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"`alpha` must be in (0, 1), got {alpha}.")
    return float(cp_upper(k, n, alpha))
