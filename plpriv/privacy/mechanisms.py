"""Mechanisms of the DP engine: what one private step releases, and the accountant that bounds it (no Lightning).

Every private step of :class:`plpriv.privacy.engine.DPEngine` clips each participant's update (an example's
gradient, or a client's) to the bound C with opacus' per-sample gradients, and releases a noised aggregate; the
mechanism decides how, through the opacus optimizer class it returns (:meth:`Mechanism.optimizer_class`: opacus'
``DPOptimizer`` and its documented steps ``clip_and_accumulate``, ``add_noise``, ``scale_grad``), and how that
release is accounted, through an accountant with opacus' ``IAccountant`` interface (:meth:`Mechanism.accountant`).

The interface is meant for mechanisms beyond the two here:

* streaming mechanisms whose noise is correlated across steps (DP-FTRL, banded matrix factorisation): the noise of
  step t stays a function of the run's secret seed and public indices (the engine's ``derive_seed``), so a
  mechanism regenerates the independent draws w_1..w_t and adds row t of B w in ``add_noise``; its accountant
  accounts the whole strategy matrix (its ``history`` is the step count, not independent Poisson steps);
* local randomizers (each participant randomises its own clipped update before the sum, no central noise): the
  optimizer class overrides ``clip_and_accumulate``; the accountant is the randomizer's local epsilon.

A mechanism's :meth:`record` is public (it lands in the checkpoint's ``plpriv_privacy`` record and the callback
state); :meth:`changes` lists what differs from a checkpoint's record, for the resume refusal.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

from opacus.accountants import IAccountant
from opacus.optimizers import DPOptimizer

from plpriv.privacy.accounting import History, calibrate_noise_multiplier, epsilon, make_accountant

__all__ = ["GaussianMechanism", "Mechanism"]


class Mechanism(abc.ABC):
    """A private step's release (through the optimizer class) and its accountant (opacus' ``IAccountant``)."""

    name: ClassVar[str]  # the record's "mechanism" and the epsilon figure's title
    title: ClassVar[str]
    needs_per_sample_gradients: ClassVar[bool] = False  # True: not with ghost clipping (it forms only their norms)
    amplified_by_sampling: ClassVar[bool] = True  # its accountant assumes Poisson sampling (False: fixed batches)
    needs_kept_secret: ClassVar[bool] = False  # noise correlated across steps: no resume with a fresh seed

    def check_run(self, poisson_sampling: bool, adjacency: str, secure_mode: bool) -> None:
        """Refuse, before training, a run this mechanism cannot account (raise ``ValueError`` naming the fix)."""

    def plan(self, horizon: int, steps_per_epoch: int, participation: Any = None) -> None:
        """Called before calibration with the run's public plan: ``horizon`` planned private steps,
        ``steps_per_epoch``, and the loader's participation schema (:mod:`plpriv.privacy.participation`; ``None``
        with Poisson sampling). Streaming mechanisms build their strategy here."""

    @abc.abstractmethod
    def accountant(self, accountant: str = "prv") -> IAccountant:
        """A fresh accountant of this mechanism (``accountant`` names the opacus accountant underneath)."""

    def epsilon(self, history: History, delta: float, accountant: str = "prv") -> float:
        """Epsilon of an opacus-format history ``[(noise_multiplier, sample_rate, steps)]`` at ``delta``
        (add/remove adjacency; :class:`plpriv.privacy.ledger.EpsilonLedger` converts to replace-one)."""
        acc = self.accountant(accountant)
        acc.history = [(float(s), float(q), int(k)) for s, q, k in history if int(k) > 0]
        return float(acc.get_epsilon(delta=delta)) if acc.history else 0.0

    @abc.abstractmethod
    def calibrate(self, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                  accountant: str = "prv") -> float:
        """Smallest noise multiplier whose ``steps`` steps at ``sample_rate`` spend at most ``target_epsilon``."""

    def resume(self, state: dict[str, Any]) -> None:
        """A checkpoint's record/state was accepted (no :meth:`changes`): adopt what binds the resumed run."""

    def optimizer_class(self, base: type[DPOptimizer]) -> type[DPOptimizer]:
        """The opacus optimizer class that runs the release (``base``: opacus' flat-clipping class for the run)."""
        return base

    def bind(self, optimizer: DPOptimizer, engine: Any, rank: int, world_size: int) -> None:
        """Called once the engine built ``optimizer``: hand it what the release needs from the run (the engine's
        public step count and ``derive_seed``, this process' rank)."""

    @property
    def key(self) -> tuple:
        """What accounting results depend on besides the question (part of every cache key)."""
        return (self.name,)

    def record(self) -> dict[str, Any]:
        """Public constants of the mechanism (checkpoint record, callback state)."""
        return {"mechanism": self.name}

    def changes(self, state: dict[str, Any]) -> list[str]:
        """What differs between this mechanism and a checkpoint's record/state (``"key old -> new"``)."""
        return [f"{k} {state[k]!r} -> {v!r}" for k, v in self.record().items()
                if k != "mechanism" and k in state and state[k] != v]


class GaussianMechanism(Mechanism):
    """DP-SGD's release (Abadi et al. 2016): the clipped sum plus N(0, sigma^2 C^2 I), divided by the public B;
    opacus' optimizer and accountants as they are."""

    name = "dp-sgd"
    title = "DP-SGD epsilon"

    def accountant(self, accountant: str = "prv") -> IAccountant:
        return make_accountant(accountant)

    def epsilon(self, history: History, delta: float, accountant: str = "prv") -> float:
        return epsilon(history, delta, accountant)  # also sigma = 0 (infinite) and the empty history

    def calibrate(self, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                  accountant: str = "prv") -> float:
        return calibrate_noise_multiplier(target_epsilon, delta, sample_rate, steps, accountant)
