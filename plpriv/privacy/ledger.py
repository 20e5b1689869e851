"""The epsilon ledger of a DP-SGD run: accountant history, cached and prefetched epsilon, the curve (no Lightning).

Every private step appends ``(noise_multiplier, sample_rate, 1)`` to an opacus-format history; epsilon is always the
opacus accountant's value for that history (:mod:`plpriv.privacy.accounting`). Accountant calls are slow (PRV:
0.03-1 s), so a callback can ask the ledger to precompute, in one background thread, epsilon for the next logging
step; the lookahead is bounded by the run's planned steps (never a million-step PRV domain for a one-step fit).

``memoize=True`` shares one process-wide cache of epsilon, calibration and budget results between ledgers: many
identical short runs in one process (an audit trains hundreds) then pay for each accounting question once.

Epsilon and calibration are the ledger's :class:`~plpriv.privacy.mechanisms.Mechanism`'s (its accountant; DP-SGD's
Gaussian by default), named in every cache key; the adjacency (add/remove or replace-one) is the ledger's.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from plpriv.privacy.adjacency import ADJACENCIES, DIRECT, replace_one_epsilon
from plpriv.privacy.accounting import ACCOUNTANTS, History, extend_history, max_steps_within_budget, num_steps
from plpriv.privacy.mechanisms import GaussianMechanism, Mechanism

__all__ = ["EpsilonLedger", "truncate_history"]

_SHARED: dict[tuple, float] = {}  # memoize=True: process-wide results, keyed by the full question
_SHARED_LOCK = threading.Lock()
_MAX_PENDING = 16


def truncate_history(history: History, steps: int) -> History:
    """The first ``steps`` steps of a history."""
    out, left = [], steps
    for s, q, k in history:
        if left <= 0:
            break
        out.append((s, q, min(k, left)))
        left -= k
    return out


class EpsilonLedger:
    """Accountant history, epsilon cache, bounded background prefetch and epsilon-vs-step curve of one run.

    Args:
        accountant: opacus accountant, ``"prv"``, ``"rdp"`` or ``"gdp"``.
        memoize: share results of identical accounting questions across ledgers of this process.
        adjacency: ``"add_remove"`` or ``"zero_out"`` (the accountant's value) or ``"replace_one"`` (group privacy
            of two add/remove or zero-out steps, :func:`plpriv.privacy.adjacency.replace_one_epsilon`).
    """

    def __init__(self, accountant: str = "prv", *, memoize: bool = False, adjacency: str = "add_remove",
                 mechanism: Mechanism | None = None) -> None:
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"`accountant` must be one of {ACCOUNTANTS}, got {accountant!r}.")
        if adjacency not in ADJACENCIES:
            raise ValueError(f"`adjacency` must be one of {ADJACENCIES}, got {adjacency!r}.")
        self.accountant = accountant
        self.adjacency = adjacency
        self.mechanism = GaussianMechanism() if mechanism is None else mechanism
        self.memoize = bool(memoize)
        self.history: History = []
        self.curve: list[tuple[int, float]] = []  # (steps, epsilon) at the run's delta, for the figure
        self._cache: dict[tuple, float] = {}
        self._pending: dict[tuple, Future] = {}
        self._pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ history
    @property
    def steps(self) -> int:
        return num_steps(self.history)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """``steps`` more Poisson-subsampled Gaussian releases at (noise_multiplier, sample_rate)."""
        self.history = extend_history(self.history, noise_multiplier, sample_rate, steps)

    # ------------------------------------------------------------------ accounting (the mechanism's)
    @property
    def title(self) -> str:
        return self.mechanism.title

    @property
    def mechanism_key(self) -> tuple:
        """What the cached results depend on besides the question: the accountant and the mechanism."""
        return (self.accountant, *self.mechanism.key)

    def compute_epsilon(self, history: History, delta: float) -> float:
        """Epsilon of ``history`` at ``delta`` (uncached, add/remove): the mechanism's accountant."""
        return self.mechanism.epsilon(history, delta, self.accountant)

    def compute_calibration(self, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
        """Smallest noise multiplier of ``steps`` steps at ``sample_rate`` within ``target_epsilon`` (uncached)."""
        return self.mechanism.calibrate(target_epsilon, delta, sample_rate, steps, self.accountant)

    def adjacent_epsilon(self, history: History, delta: float) -> float:
        """Epsilon of ``history`` at ``delta`` under the ledger's adjacency (uncached)."""
        if self.adjacency in DIRECT:
            return self.compute_epsilon(history, delta)
        return replace_one_epsilon(lambda d: self.compute_epsilon(history, d), delta)

    # ------------------------------------------------------------------ accounting (cached)
    def _memo(self, key: tuple, compute: Any) -> Any:
        if key in self._cache:
            return self._cache[key]
        if self.memoize:
            with _SHARED_LOCK:
                hit = _SHARED.get(key)
            if hit is not None:
                self._cache[key] = hit
                return hit
        value = compute()
        self._cache[key] = value
        if self.memoize:
            with _SHARED_LOCK:
                _SHARED[key] = value
        return value

    def _epsilon(self, history: History, delta: float, mechanism: str | None = None) -> float:
        # `mechanism` (max_steps_within_budget's argument) is always this ledger's accountant
        key = ("epsilon", *self.mechanism_key, self.adjacency, tuple(history), float(delta))
        future = self._pending.pop(key, None)
        if future is not None and key not in self._cache:
            self._cache[key] = future.result()
        return self._memo(key, lambda: self.adjacent_epsilon(list(history), delta))

    def epsilon_at(self, steps: int, delta: float) -> float:
        """Epsilon after the first ``steps`` steps at ``delta``."""
        return self._epsilon(truncate_history(self.history, steps), delta)

    def epsilon(self, delta: float, *, curve: bool = True) -> float:
        """Epsilon spent so far at ``delta``; with ``curve`` the point joins the epsilon-vs-step curve."""
        value = self.epsilon_at(self.steps, delta)
        if curve and self.steps > 0:
            self.curve = sorted({**dict(self.curve), self.steps: value}.items())
        return value

    def calibrate(self, target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
        """Smallest noise multiplier whose ``steps`` steps at ``sample_rate`` spend at most ``target_epsilon``."""
        key = ("calibrate", *self.mechanism_key, self.adjacency, float(target_epsilon), float(delta),
               float(sample_rate), int(steps))
        if self.adjacency in DIRECT:
            return self._memo(key, lambda: self.compute_calibration(target_epsilon, delta, sample_rate, steps))
        return self._memo(key, lambda: self._calibrate_replace_one(target_epsilon, delta, sample_rate, steps))

    def _calibrate_replace_one(self, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                               tolerance: float = 0.01) -> float:
        """Bisection on sigma of the replace-one epsilon (it falls as sigma grows), to ``tolerance`` in epsilon."""
        def eps(sigma: float) -> float:
            return self.adjacent_epsilon([(sigma, sample_rate, steps)], delta)

        lo, hi = 0.0, 1.0
        while eps(hi) > target_epsilon:
            lo, hi = hi, 2 * hi
            if hi > 1e4:
                raise ValueError(f"no noise multiplier up to {hi:g} reaches epsilon={target_epsilon}.")
        while hi - lo > 1e-3 * hi and eps(hi) < target_epsilon - tolerance:
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
        return hi

    def steps_within_budget(self, target_epsilon: float, delta: float, noise_multiplier: float,
                            sample_rate: float, horizon: int | None = None) -> int:
        """How many more steps at (noise_multiplier, sample_rate) keep epsilon <= target (-1: already over)."""
        key = ("budget", *self.mechanism_key, tuple(self.history), float(target_epsilon), float(delta),
               float(noise_multiplier), float(sample_rate), horizon)
        return self._memo(key, lambda: max_steps_within_budget(
            target_epsilon, delta, self.history, noise_multiplier, sample_rate, self.accountant, horizon=horizon,
            epsilon_fn=self._epsilon,
        ))

    # ------------------------------------------------------------------ background prefetch
    def prefetch(self, ahead: int, noise_multiplier: float, sample_rate: float, delta: float,
                 planned_steps: float) -> None:
        """Start computing epsilon after ``ahead`` more steps at (noise_multiplier, sample_rate) in the background.

        Nothing beyond ``planned_steps`` (the run's horizon) is ever asked for; the first call starts the thread.
        """
        if math.isfinite(planned_steps):
            ahead = min(ahead, int(planned_steps) - self.steps)
        if ahead <= 0:
            return
        history = extend_history(self.history, noise_multiplier, sample_rate, ahead)
        key = ("epsilon", *self.mechanism_key, self.adjacency, tuple(history), float(delta))
        if key in self._cache or key in self._pending:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plpriv-epsilon")
        while len(self._pending) >= _MAX_PENDING:  # predictions that were never used
            self._pending.pop(next(iter(self._pending))).cancel()
        self._pending[key] = self._pool.submit(self.adjacent_epsilon, history, float(delta))

    def close(self) -> None:
        """Stop the background thread (pending predictions are dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool, self._pending = None, {}

    # ------------------------------------------------------------------ curve, state
    def curve_points(self, delta: float, min_points: int = 8) -> tuple[list[int], list[float]]:
        """(steps, epsilon) of the curve, from 0, with at least ``min_points`` points for short runs."""
        points = dict(self.curve)
        if len(points) < min_points and self.steps > 0:
            for k in np.unique(np.linspace(1, self.steps, min_points).round().astype(int)):
                points[int(k)] = self.epsilon_at(int(k), delta)
        steps = [0, *sorted(points)]
        return steps, [0.0, *(points[k] for k in steps[1:])]

    def figure(self, delta: float, target_epsilon: float | None = None) -> Any:
        """Epsilon vs step (a matplotlib Figure)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        steps, eps = self.curve_points(delta)
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
        ax.plot(steps, eps, marker=".")
        if target_epsilon is not None:
            ax.axhline(target_epsilon, color="tab:red", ls="--", lw=1, label=f"target {target_epsilon:g}")
            ax.legend()
        ax.set(xlabel="step", ylabel="epsilon", title=f"{self.title} ({self.accountant}, {self.adjacency}, delta={delta:.2g})")
        fig.tight_layout()
        return fig

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "mechanism": self.accountant, "curve": list(self.curve),
                "adjacency": self.adjacency}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [(float(s), float(q), int(k)) for s, q, k in state["history"] if int(k) > 0]
        same = (state.get("mechanism", self.accountant) == self.accountant
                and state.get("adjacency", "add_remove") == self.adjacency)
        self.curve = [(int(k), float(e)) for k, e in state.get("curve", [])] if same else []
        self._cache = {}
