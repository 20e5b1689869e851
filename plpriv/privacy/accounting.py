"""Thin wrappers around opacus' accountants for DP-SGD bookkeeping (no Lightning imports).

A history is opacus' own format: a list of ``(noise_multiplier, sample_rate, steps)`` entries, each a run of
``steps`` Poisson-subsampled Gaussian mechanisms. Epsilon is always computed by an opacus accountant
(``"prv"``: Gopi et al. 2021, ``"rdp"``: Mironov et al. 2019, ``"gdp"``: Dong et al. 2019 CLT, can underestimate);
nothing here re-implements accounting.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

__all__ = [
    "ACCOUNTANTS",
    "History",
    "calibrate_noise_multiplier",
    "default_delta",
    "epsilon",
    "extend_history",
    "make_accountant",
    "max_steps_within_budget",
    "num_steps",
]

ACCOUNTANTS = ("prv", "rdp", "gdp")
# opacus' PRV accountant sizes its domain with RDP and warns when the largest RDP order is optimal; for the "rdp"
# accountant it means the bound is loose (too large), never too small. Said once per accountant call: silenced.
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", module="opacus")
History = list[tuple[float, float, int]]


def default_delta(num_samples: int) -> float:
    """delta = 1 / N^1.1: below 1/N, as a meaningful (epsilon, delta) guarantee requires."""
    if num_samples <= 0:
        raise ValueError(f"`num_samples` must be positive, got {num_samples!r}.")
    return 1.0 / num_samples**1.1


def make_accountant(mechanism: str, history: Sequence[tuple[float, float, int]] = ()) -> IAccountant:
    """An opacus accountant holding ``history`` (opacus' GDP accountant warns on construction: silenced here)."""
    if mechanism not in ACCOUNTANTS:
        raise ValueError(f"`accountant` must be one of {ACCOUNTANTS}, got {mechanism!r}.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        accountant = create_accountant(mechanism)
    accountant.history = [(float(s), float(q), int(k)) for s, q, k in history if k > 0]
    return accountant


def num_steps(history: Sequence[tuple[float, float, int]]) -> int:
    return sum(int(k) for _, _, k in history)


def extend_history(history: Sequence[tuple[float, float, int]], noise_multiplier: float, sample_rate: float,
                   steps: int) -> History:
    """``history`` followed by ``steps`` more steps at (noise_multiplier, sample_rate), merged as opacus does."""
    out: History = [(float(s), float(q), int(k)) for s, q, k in history if k > 0]
    if steps <= 0:
        return out
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        out[-1] = (out[-1][0], out[-1][1], out[-1][2] + int(steps))
    else:
        out.append((float(noise_multiplier), float(sample_rate), int(steps)))
    return out


def epsilon(history: Sequence[tuple[float, float, int]], delta: float, mechanism: str = "prv") -> float:
    """Epsilon spent by ``history`` at ``delta`` (0 for an empty history)."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"`delta` must be in (0, 1), got {delta!r}.")
    accountant = make_accountant(mechanism, history)
    if not accountant.history:
        return 0.0
    if any(s == 0 for s, _, _ in accountant.history):
        return math.inf
    return float(accountant.get_epsilon(delta=delta))


def calibrate_noise_multiplier(target_epsilon: float, target_delta: float, sample_rate: float, steps: int,
                               mechanism: str = "prv", epsilon_tolerance: float = 0.01) -> float:
    """Smallest noise multiplier (to ``epsilon_tolerance``) whose ``steps`` steps spend at most ``target_epsilon``
    (opacus' ``get_noise_multiplier``: bisection on the accountant's epsilon)."""
    if steps <= 0:
        raise ValueError(f"`steps` must be positive to calibrate the noise, got {steps!r}.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=target_delta,
                sample_rate=sample_rate,
                steps=int(steps),
                accountant=mechanism,
                epsilon_tolerance=epsilon_tolerance,
            )
        )


def max_steps_within_budget(target_epsilon: float, delta: float, history: Sequence[tuple[float, float, int]],
                            noise_multiplier: float, sample_rate: float, mechanism: str = "prv",
                            horizon: int | None = None,
                            epsilon_fn: Callable[[History, float, str], float] | None = None) -> int:
    """Largest k >= 0 such that ``history`` plus k steps at (noise_multiplier, sample_rate) spends at most
    ``target_epsilon``; when ``horizon`` is given the search stops there (returns ``horizon`` if it fits).
    Epsilon grows with the number of steps, so this is a bisection (about log2(k) accountant calls), each through
    ``epsilon_fn`` (default :func:`epsilon`; e.g. a memoised one)."""
    eps = epsilon if epsilon_fn is None else epsilon_fn

    def fits(k: int) -> bool:
        return eps(extend_history(history, noise_multiplier, sample_rate, k), delta, mechanism) <= target_epsilon

    if not fits(0):
        return -1  # already over budget
    if horizon is not None and fits(horizon):
        return horizon
    lo, hi = 0, 1  # fits(lo) holds; find hi with not fits(hi)
    while fits(hi):
        lo, hi = hi, 2 * hi
        if horizon is not None and hi >= horizon:
            hi = horizon
            break
        if hi > 2**40:  # noise_multiplier so large that the budget never runs out in practice
            return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
