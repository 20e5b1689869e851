"""The neighbouring relation an epsilon is for, and the public constants it allows (no Lightning imports).

``add_remove`` (the default; opacus' accountants): neighbouring data sets differ by one example added or removed,
so the data set size N is itself private. Nothing published may depend on N: the sample rate q, the delta and the
steps per epoch come from a public figure, ``sample_rate`` (q) or ``dataset_size`` (a size the user declares
public, e.g. a rounded or documented one; q = B / dataset_size), never from ``len(dataset)``.

``replace_one``: neighbours differ by one example replaced, N is public (declared so by the user), q = B / N.
The accountants bound add/remove; one replacement is a removal followed by an addition, so by group privacy
(Dwork & Roth 2014, Thm 2.2 with k = 2, the (epsilon, delta) form) an add/remove (eps, d)-DP mechanism is
(2 eps, (1 + e^eps) d)-DP under replace-one. :func:`replace_one_epsilon` reports the smallest such 2 eps whose
delta meets the target: a valid upper bound (the tight value for Poisson subsampling is lower, never higher).

``zero_out``: neighbours differ by one example's contribution replaced by zero (dp-accounting's REPLACE_SPECIAL;
the relation of the matrix-factorisation / DP-FTRL papers): the size N and every other example's place stay put, so
N is public. For Poisson-subsampled Gaussian steps the add/remove epsilon bounds it (a zeroed example sampled adds
nothing, as a removed one; the divisor B is public), and the matrix mechanisms' accountants are zero-out accountants.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from plpriv.privacy.accounting import default_delta

__all__ = ["ADJACENCIES", "DIRECT", "PublicRate", "public_rate", "replace_one_epsilon"]

ADJACENCIES = ("add_remove", "replace_one", "zero_out")
DIRECT = ("add_remove", "zero_out")  # epsilon as the accountant reports it; replace_one: group privacy


@dataclass(frozen=True)
class PublicRate:
    """What a private run may publish about its sampling: q, the steps of one epoch, the default delta (``None``:
    the user must give one)."""

    sample_rate: float
    steps_per_epoch: int
    default_delta: float | None


def public_rate(batch_size: int, num_samples: int, adjacency: str, sample_rate: float | None = None,
                dataset_size: int | None = None) -> PublicRate:
    """The public (q, steps per epoch, default delta) of a loader of ``batch_size`` B over ``num_samples`` N.

    ``add_remove`` uses ``sample_rate`` or ``dataset_size`` only (refused without either); ``replace_one`` and
    ``zero_out`` may use N.
    An epoch is ``ceil(1 / q)`` steps (opacus' convention), so its length reveals no more than q does.
    """
    if adjacency not in ADJACENCIES:
        raise ValueError(f"`adjacency` must be one of {ADJACENCIES}, got {adjacency!r}.")
    if adjacency == "add_remove" and sample_rate is None and dataset_size is None:
        raise ValueError(
            "DPSGD(adjacency='add_remove'): the data set size N is private under add/remove adjacency (one example"
            " more or less), and q = B / N, delta = 1/N^1.1 and the steps per epoch would publish it. Give"
            " `sample_rate=q` or `dataset_size=<a public figure>` (e.g. rounded), or declare N public with"
            " adjacency='replace_one' (epsilon then is the replace-one epsilon)."
        )
    public_n = dataset_size if dataset_size is not None else (num_samples if adjacency != "add_remove" else None)
    if sample_rate is not None:
        q = float(sample_rate)
    else:
        q = min(1.0, batch_size / public_n)  # type: ignore[operator]
    steps = max(1, math.ceil(1.0 / q - 1e-9))
    return PublicRate(q, steps, None if public_n is None else default_delta(public_n))


def replace_one_epsilon(add_remove_epsilon: Callable[[float], float], delta: float, *, refine: int = 6) -> float:
    """Replace-one epsilon at ``delta`` from an add/remove epsilon-of-delta function (group privacy, k = 2): ``2
    eps(d)`` for the largest ``d`` found with ``(1 + e^eps(d)) d <= delta`` (eps falls as d grows, so that is the
    smallest such value): a log grid from delta / 2 down, then ``refine`` bisection steps between grid points."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"`delta` must be in (0, 1), got {delta!r}.")

    def feasible(log_d: float) -> float | None:
        d = math.exp(log_d)
        eps = add_remove_epsilon(d)
        return eps if math.isfinite(eps) and (1.0 + math.exp(eps)) * d <= delta else None

    hi = math.log(delta / 2)  # (1 + e^eps) d <= delta needs d <= delta / 2
    eps = feasible(hi)
    if eps is not None:
        return 2.0 * eps
    for _ in range(40):  # down to delta / 2^41
        lo = hi - math.log(2.0)
        eps = feasible(lo)
        if eps is not None:
            break
        hi = lo
    else:
        return math.inf
    for _ in range(refine):  # lo feasible, hi not
        mid = (lo + hi) / 2
        found = feasible(mid)
        lo, hi, eps = (mid, hi, found) if found is not None else (lo, mid, eps)
    return 2.0 * eps
