r"""DP-FTRL as a DP-engine mechanism: correlated noise from a matrix factorisation, optionally sparsified (no Lightning).

``DPSGD(mechanism=MatrixFactorizationMechanism(...), poisson_sampling=False, adjacency="zero_out")`` clips every
participant's update as DP-SGD does (opacus), and adds to step t's clipped sum the noise ``sigma C_clip (N w)_t`` of
the strategy (:mod:`plpriv.privacy.streaming`; N = C^{-1}) instead of fresh noise, so the running sum of the noisy
steps is the matrix mechanism's release ``B (C G + Z)`` of the prefix sums (Kairouz et al. 2021, arXiv 2103.00039;
Denisov et al. 2022; Choquette-Choo et al. 2023, arXiv 2211.06530 / 2306.08153; BSR: Kalinin & Lampert 2024).

What is accounted (and refused otherwise, before training):
    * No sampling amplification: the train loader's own batches (``poisson_sampling=False``) in a fixed order
      (an example at the same step of every epoch: b-min-separation, b = steps per epoch) or reshuffled each epoch
      (min-separation 1, one participation per epoch) (:mod:`plpriv.privacy.participation`).
    * Zero-out adjacency (an example's contribution replaced by zero; N public): removing an example would shift the
      fixed batches of every later one. ``replace_one`` is reported by group privacy of two zero-outs.
    * The horizon n is the run's planned steps; the strategy and its sensitivity cover exactly those, so a longer
      run, or a resume without the kept secret (fresh noise would be a second, unaccounted release), is refused.
    * Epsilon: the whole run is one Gaussian mechanism, mu = sens(C) / sigma (``MatrixMechanismAccountant``), reported
      for the full horizon from the first step on (a prefix of the run is post-processing of the whole release).

Sparsified DP-FTRL (``keep_fraction < 1``; Chen, Isik, Kairouz, No, Oh, Xu, ICML 2024, the streaming extension of
the sparsified Gaussian mechanism): every participant's clipped update keeps a random ``keep_fraction`` of its
coordinates (masks from the run's secret seed, :mod:`plpriv.privacy.sparsified_step`) before the correlated noise.
Its accountant (the paper's own was not readable; this is derived, proof sketch):
    Let C be square, lower-triangular, b-banded with unit columns (identity, column-normalised BSR, optimized banded)
    and let every participant's participations be >= b steps apart (fixed order with b <= steps per epoch). Then
    the columns of C of two participations have disjoint row supports, so ``C G + Z`` splits into independent blocks
    of rows, one per participation (the rows no participation touches carry no information about the participant).
    Within the block of participation j, with every other participant's rows known to the adversary, the release is
    ``C[:, j] (m_j * x_j)^T + Z_block`` with Z iid N(0, sigma^2 C_clip^2); projecting onto the unit vector C[:, j]
    is a sufficient statistic (the orthogonal complement is pure noise independent of x_j), i.e. ``m_j * x_j +
    N(0, sigma^2 C_clip^2 I)``: one round of the sparsified Gaussian mechanism at participation rate 1. The masks of
    different steps are independent, and the inputs may depend on earlier outputs (adaptive composition), so the run
    is the k-fold adaptive composition of that round, k = the largest number of participations: epsilon =
    :func:`~plpriv.privacy.sparsified_gaussian.sparsified_history_epsilon` of ``[(sigma, 1, k)]`` (its RDP bound
    [B], exact for one round). Any fixed mask keeps ``m * x`` in the C-ball, so the dense MF epsilon (the naive
    bound that ignores the masks) is always valid; the reported epsilon is the smaller of the two, and only the
    naive one for strategies or schedules outside the banded case (the tree, reshuffled epochs).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from opacus.accountants import IAccountant
from opacus.optimizers import DPOptimizer
from scipy.optimize import brentq

from plpriv.privacy.accounting import History
from plpriv.privacy.matrix_factorization import (
    MatrixMechanismAccountant,
    Strategy,
    calibrate_noise_multiplier,
    strategy as make_strategy,
)
from plpriv.privacy.mechanisms import Mechanism
from plpriv.privacy.participation import Participation
from plpriv.privacy.sparsified_gaussian import SparsifiedMechanism, sparsified_history_epsilon
from plpriv.privacy.sparsified_step import sparsifying_class
from plpriv.privacy.streaming import NoiseStream, correlated_class

__all__ = ["MF_STRATEGIES", "MatrixFactorizationMechanism", "SparsifiedMatrixAccountant"]

MF_STRATEGIES = ("identity", "tree", "tree-efficient", "tree-restart", "bsr", "optimized_banded")
NOISE_TAG = "mf-noise"
OPTIMIZED_MAX_HORIZON = 256  # optimized_banded: ~3 min of L-BFGS at n = 256 (bands 16) on a busy 2-core machine


class SparsifiedMatrixAccountant(MatrixMechanismAccountant):
    """The matrix mechanism's accountant with sparsified participations (module docstring): the smaller of the
    dense bound (mu = sens / sigma) and, when ``participations`` is given (banded case), the k-fold composition of
    one sparsified Gaussian round at rate 1."""

    def __init__(self, sens: float, horizon: int | None, keep_fraction: float, mask: str,
                 participations: int | None, method: str = "analytic") -> None:
        super().__init__(sens, horizon, method)
        self.keep_fraction, self.mask, self.participations = keep_fraction, mask, participations

    def get_epsilon(self, delta: float, *args: Any, **kwargs: Any) -> float:
        dense = super().get_epsilon(delta)
        if self.participations is None or self.keep_fraction >= 1.0 or dense in (0.0, math.inf):
            return dense
        sigma = float(self.noise_multiplier())  # type: ignore[arg-type]
        # at rate 1 the DP-SGD term inside is the dense bound again: RDP there (PRV's domain explodes for small sigma)
        sparse = sparsified_history_epsilon([(sigma, 1.0, self.participations)], delta, self.keep_fraction, "rdp",
                                            self.mask)
        return min(dense, sparse)


class MatrixFactorizationMechanism(SparsifiedMechanism):
    """DP-FTRL with a matrix-factorisation strategy (module docstring).

    Args:
        strategy: ``"identity"`` (DP-SGD without amplification), ``"tree"`` / ``"tree-efficient"`` (binary-tree
            aggregation over the whole run, Kairouz et al. 2021), ``"tree-restart"`` (an efficient tree restarted
            every epoch, their multi-epoch DP-FTRL), ``"bsr"`` (column-normalised banded square root), or
            ``"optimized_banded"`` (banded C minimising the prefix-sum error, Choquette-Choo et al. 2023; O(n^3) per
            L-BFGS iteration: horizons up to a few hundred steps).
        bands: b for ``bsr`` / ``optimized_banded``; default the steps per epoch (then fixed-order participations are
            >= b apart and the sensitivity is exactly sqrt(k)).
        keep_fraction: sparsification gamma in (0, 1] of every participant's clipped update (1: dense).
        mask: ``"bernoulli"`` or ``"k_subset"`` (as :class:`~plpriv.privacy.sparsified_gaussian.SparsifiedMechanism`).
        optimizer_seed: seed of the ``optimized_banded`` L-BFGS start (public: the strategy is public).
    """

    name = "matrix-factorization"
    title = "DP-FTRL epsilon"
    amplified_by_sampling: ClassVar[bool] = False
    needs_kept_secret: ClassVar[bool] = True

    def __init__(self, strategy: str = "bsr", bands: int | None = None, keep_fraction: float = 1.0,
                 mask: str = "bernoulli", optimizer_seed: int = 0) -> None:
        super().__init__(keep_fraction, mask)
        if strategy not in MF_STRATEGIES:
            raise ValueError(f"`strategy` must be one of {MF_STRATEGIES}, got {strategy!r}.")
        if bands is not None and (isinstance(bands, bool) or not isinstance(bands, int) or bands < 1):
            raise ValueError(f"`bands` must be a positive int or None, got {bands!r}.")
        if bands is not None and strategy not in ("bsr", "optimized_banded"):
            raise ValueError(f"`bands` applies to 'bsr' and 'optimized_banded', not {strategy!r}.")
        self.strategy_name, self.bands, self.optimizer_seed = strategy, bands, int(optimizer_seed)
        self.strategy: Strategy | None = None
        self.participation: Participation | None = None
        self.participation_steps = 1  # the steps per epoch of the plan (tree-restart's block length)
        self.sens: float | None = None
        self._resumed: dict[str, Any] | None = None

    @property
    def needs_per_sample_gradients(self) -> bool:  # type: ignore[override]
        return self.keep_fraction < 1.0

    # ------------------------------------------------------------------ the run
    def check_run(self, poisson_sampling: bool, adjacency: str, secure_mode: bool) -> None:
        if poisson_sampling:
            raise ValueError("MatrixFactorizationMechanism: DP-FTRL is accounted without sampling amplification, on"
                             " the train loader's own batches: set DPSGD(poisson_sampling=False) (shuffle=False for"
                             " fixed-order epochs, the tightest accounting).")
        if adjacency == "add_remove":
            raise ValueError("MatrixFactorizationMechanism: with fixed batches, removing an example shifts every later"
                             " batch, which the matrix mechanism's sensitivity does not cover. Use"
                             " adjacency='zero_out' (the DP-FTRL papers' relation; N public) or 'replace_one'.")
        if secure_mode:
            raise ValueError("MatrixFactorizationMechanism: secure_mode draws noise that cannot be regenerated, and"
                             " correlated noise must be regenerated every step: use secure_mode=False.")

    def plan(self, horizon: int, steps_per_epoch: int, participation: Any = None) -> None:
        if not math.isfinite(horizon) or horizon < 1:
            raise ValueError("MatrixFactorizationMechanism: the strategy is built for the run's planned steps; set"
                             " Trainer(max_steps) or Trainer(max_epochs).")
        if not isinstance(participation, Participation):
            raise ValueError("MatrixFactorizationMechanism needs exactly one train DataLoader with fixed batches"
                             " (its participation schema bounds the sensitivity).")
        resumed = self._resumed or {}
        n = int(resumed.get("horizon") or horizon)
        if int(horizon) > n:
            raise ValueError(f"MatrixFactorizationMechanism: the checkpoint's run was planned for {n} steps and its"
                             f" strategy covers no more; this fit plans {int(horizon)}. Keep max_steps/max_epochs"
                             " as they were, or start a new run.")
        if resumed.get("participation") not in (None, participation.schema):
            raise ValueError(f"MatrixFactorizationMechanism: the checkpoint's participation was"
                             f" {resumed['participation']!r}, this loader's is {participation.schema!r}.")
        participation = Participation(participation.schema, participation.steps_per_epoch, n)
        bands = self.bands
        if self.strategy_name in ("bsr", "optimized_banded"):
            bands = min(n, bands if bands is not None else participation.steps_per_epoch)
        if self.strategy is None or self.strategy.n != n or self.participation != participation:
            self.participation_steps = participation.steps_per_epoch
            self.strategy = self._build(n, bands)
        self.participation = participation
        self.sens = self.strategy.sensitivity(min_sep=participation.min_separation,
                                              max_participations=participation.max_participations)

    def _build(self, n: int, bands: int | None) -> Strategy:
        if self.strategy_name == "tree-efficient":
            return make_strategy("tree", n, efficient=True)
        if self.strategy_name == "tree-restart":  # one (efficient) tree per epoch
            return make_strategy("tree-restart", n, every=self.participation_steps, efficient=True)
        if self.strategy_name == "bsr":
            return make_strategy("bsr", n, bands, normalize=True)
        if self.strategy_name == "optimized_banded":
            if n > OPTIMIZED_MAX_HORIZON:
                raise ValueError(f"MatrixFactorizationMechanism('optimized_banded'): {n} steps is too long a horizon for"
                                 f" its O(n^3) L-BFGS (at most {OPTIMIZED_MAX_HORIZON}); use strategy='bsr', within a"
                                 " few percent of it in prefix-sum error (benchmarks/dp_ftrl.py's RMSE table).")
            return make_strategy("optimized_banded", n, bands, seed=self.optimizer_seed)
        return make_strategy(self.strategy_name, n)

    @property
    def banded_participations(self) -> int | None:
        """k when the sparsified accountant's banded argument holds (module docstring), else ``None``."""
        s, p = self.strategy, self.participation
        if s is None or p is None or s.bands is None or s.bands > p.min_separation:
            return None
        norms = s.C.norm(dim=0)
        return p.max_participations if bool(((norms - 1).abs() < 1e-9).all()) else None

    def _planned(self) -> tuple[float, int]:
        if self.sens is None or self.strategy is None:
            raise RuntimeError("MatrixFactorizationMechanism: not planned yet (the engine calls plan() at start).")
        return self.sens, self.strategy.n

    # ------------------------------------------------------------------ accounting
    def accountant(self, accountant: str = "prv") -> IAccountant:
        sens, n = self._planned()
        method = "rdp" if accountant == "rdp" else "analytic"
        if self.keep_fraction >= 1.0:
            return MatrixMechanismAccountant(sens, n, method)
        return SparsifiedMatrixAccountant(sens, n, self.keep_fraction, self.mask, self.banded_participations, method)

    def epsilon(self, history: History, delta: float, accountant: str = "prv") -> float:
        _, n = self._planned()
        if sum(int(k) for _, _, k in history) > n:
            return math.inf  # beyond the horizon: not covered (the budget stops the run there)
        return Mechanism.epsilon(self, history, delta, accountant)  # this accountant's, not the sparsified one's

    def calibrate(self, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                  accountant: str = "prv") -> float:
        sens, n = self._planned()
        method = "rdp" if accountant == "rdp" else "analytic"
        sigma = calibrate_noise_multiplier(target_epsilon, delta, sens, method)
        if self.keep_fraction < 1.0 and self.banded_participations is not None:
            def excess(log_sigma: float) -> float:
                return self.epsilon([(math.exp(log_sigma), sample_rate, n)], delta, accountant) - target_epsilon

            lo, hi = math.log(sigma * self.keep_fraction / 4), math.log(sigma) + 1e-6  # sparse <= dense epsilon: the root is below
            if excess(lo) > 0 >= excess(hi):
                sigma = math.exp(brentq(excess, lo, hi, xtol=1e-10))
        return sigma * (1 + 1e-9)  # on the safe side of the root finder's tolerance

    # ------------------------------------------------------------------ the release
    def optimizer_class(self, base: type[DPOptimizer]) -> type[DPOptimizer]:
        return correlated_class(sparsifying_class(base))

    def bind(self, optimizer: DPOptimizer, engine: Any, rank: int, world_size: int) -> None:
        super().bind(optimizer, engine, rank, world_size)
        if self.strategy is None:
            raise RuntimeError("MatrixFactorizationMechanism: not planned yet (the engine calls plan() at start).")
        optimizer.stream = NoiseStream(self.strategy, lambda i, j: engine.derive_seed(NOISE_TAG, i, j))  # type: ignore
        optimizer.step_index = lambda: engine.steps  # type: ignore[attr-defined]
        optimizer.adds_noise = rank == 0 or world_size == 1  # opacus all-reduces rank zero's noise  # type: ignore

    def bind_participants(self, optimizer: DPOptimizer, engine: Any, participants: str, rank: int, world_size: int,
                          sparse_exchange: bool) -> Any:
        sparsifier = super().bind_participants(optimizer, engine, participants, rank, world_size, sparse_exchange)
        if sparse_exchange:  # every rank holds the global sum: every rank adds the same (seeded) noise
            optimizer.adds_noise = True  # type: ignore[attr-defined]
        return sparsifier

    # ------------------------------------------------------------------ record, resume
    @property
    def key(self) -> tuple:
        return (self.name, self.strategy_name, self.bands, self.keep_fraction, self.mask,
                None if self.strategy is None else self.strategy.n, self.participation, self.sens)

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mechanism": self.name, "strategy": self.strategy_name, "bands": self.bands,
                               "keep_fraction": self.keep_fraction, "mask": self.mask}
        if self.strategy is not None and self.participation is not None:
            out.update(horizon=self.strategy.n, sensitivity=self.sens, **self.participation.record())
        return out

    def changes(self, state: dict[str, Any]) -> list[str]:
        return [f"{k} {state[k]!r} -> {getattr(self, a)!r}" for k, a in
                (("strategy", "strategy_name"), ("bands", "bands"), ("keep_fraction", "keep_fraction"),
                 ("mask", "mask")) if k in state and state[k] != getattr(self, a)]

    def resume(self, state: dict[str, Any]) -> None:
        """A checkpoint's record: its horizon and participation schema bind this run (checked in :meth:`plan`)."""
        self._resumed = dict(state) if state.get("horizon") else None
