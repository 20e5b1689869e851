"""The privacy budget of a DP engine's run: the noise multiplier for a target epsilon, and how many steps the budget
still allows at the current (sigma, q) (no Lightning imports).

Accounting runs on rank zero and every rank gets its result through the world's ``broadcast``. The plan is remade
whenever (sigma, q) changes (a dataloader reload, an accumulation scheduler) and on every fit, counting the steps
left in *this* fit from its own starting step: a second fit with the same engine is guarded too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

from plpriv.privacy.ledger import EpsilonLedger
from plpriv.privacy.world import World

__all__ = ["BudgetPlan", "Budgeted"]


class Budgeted(Protocol):
    """What the plan reads of a run (:class:`plpriv.privacy.engine.DPEngine`); it writes ``sample_rate`` only."""

    noise_multiplier: float | None
    effective_noise_multiplier: float | None
    target_epsilon: float | None
    delta: float | None
    sample_rate: float | None
    accountant: str
    stop_on_budget: bool
    ledger: EpsilonLedger
    info: Callable[[str], None]

    @property
    def history(self) -> list[tuple[float, float, int]]: ...

    @property
    def steps(self) -> int: ...


class BudgetPlan:
    """Sigma calibration and the step after which ``engine``'s budget is spent (``None``: the plan fits)."""

    def __init__(self, engine: Budgeted) -> None:
        self.engine = engine
        self.planned = math.inf  # the fit's planned optimizer steps (trainer's estimate)
        self.end: int | None = None  # the step count after which the budget is spent
        self._key: tuple[float, float] | None = None

    def reset(self) -> None:
        self._key, self.end = None, None

    @property
    def spent(self) -> bool:
        """No further step fits the budget."""
        return self.end is not None and self.engine.steps >= self.end

    def noise_multiplier(self, world: World) -> float:
        """The run's sigma: the user's, else the resumed run's calibrated one, else calibrated so that the planned
        steps at the current q spend at most ``target_epsilon``."""
        dp = self.engine
        if dp.noise_multiplier is not None:
            return dp.noise_multiplier
        if dp.history:  # calibrated before: keep it, the budget was planned with it
            return dp.history[-1][0]
        if not math.isfinite(self.planned):
            raise ValueError(
                "DPSGD cannot calibrate the noise from `target_epsilon` for an unbounded run: set Trainer(max_steps)"
                " or Trainer(max_epochs), or give `noise_multiplier`."
            )
        sigma = 0.0
        if world.is_zero:
            try:
                sigma = dp.ledger.calibrate(dp.target_epsilon, dp.delta, dp.sample_rate,  # type: ignore[arg-type]
                                            int(self.planned))
            except ValueError as err:
                raise ValueError(
                    f"DPSGD: no noise multiplier reaches epsilon={dp.target_epsilon} at delta={dp.delta:.3g} over"
                    f" {int(self.planned)} steps at q={dp.sample_rate:.4g} ({err}). Raise `target_epsilon`, train"
                    " fewer steps or use a smaller batch_size."
                ) from None
        sigma = float(world.broadcast(sigma))
        dp.info(f"DPSGD: calibrated noise_multiplier={sigma:.4f} for epsilon={dp.target_epsilon} at delta="
                f"{dp.delta:.3g} over {int(self.planned)} steps (q={dp.sample_rate:.4g}, {dp.accountant}).")
        return sigma

    def update(self, rate: float, current_step: int, world: World, spent: str = "raise") -> bool:
        """Re-plan at the engine's sigma and ``rate`` (no-op unless they changed); ``current_step`` is the fit's own
        step counter. With no step left ``spent="raise"`` refuses to train, ``"stop"`` returns True (stop now)."""
        dp = self.engine
        sigma = float(dp.effective_noise_multiplier)  # type: ignore[arg-type]
        dp.sample_rate = rate
        if self._key == (sigma, rate):
            return False
        self._key, self.end = (sigma, rate), None
        self.end = self._end(sigma, rate, current_step, world, spent)
        return self.end == dp.steps

    def _end(self, sigma: float, rate: float, current_step: int, world: World, spent: str) -> int | None:
        dp = self.engine
        if dp.target_epsilon is None or not dp.stop_on_budget:
            return None
        horizon = max(int(self.planned) - current_step, 0) if math.isfinite(self.planned) else None
        if horizon == 0:  # nothing left to train in this fit
            return None
        extra = 0
        if world.is_zero:
            extra = dp.ledger.steps_within_budget(dp.target_epsilon, dp.delta, sigma, rate,  # type: ignore[arg-type]
                                                  horizon=horizon)
        extra = int(world.broadcast(extra))
        if extra <= 0 and not dp.history:
            raise ValueError(
                f"DPSGD: not even one step at noise_multiplier={sigma:.4g}, q={rate:.4g} fits the budget"
                f" epsilon={dp.target_epsilon} (delta={dp.delta:.3g}): raise `target_epsilon` or"
                " `noise_multiplier`, or leave `noise_multiplier` unset to calibrate it."
            )
        if extra <= 0 and spent == "stop":
            return dp.steps
        if extra <= 0:
            raise RuntimeError(
                f"DPSGD: the privacy budget epsilon={dp.target_epsilon} (delta={dp.delta:.3g}) is spent: after"
                f" {dp.steps} steps another step at noise_multiplier={sigma:.4g}, q={rate:.4g} would exceed it."
                " Refusing to train further; raise `target_epsilon` knowingly or start a new run."
            )
        if horizon is None or extra < horizon:
            dp.info(f"DPSGD: the budget epsilon={dp.target_epsilon} allows {extra} more steps at q={rate:.4g};"
                    f" training will stop after step {dp.steps + extra}.")
            return dp.steps + extra
        return None

    def check_step(self) -> None:
        """Refuse a step past the budget (the trainer did not stop: min_steps / min_epochs?)."""
        if self.spent:
            raise RuntimeError(
                f"DPSGD: step {self.engine.steps + 1} would exceed the privacy budget epsilon="
                f"{self.engine.target_epsilon}; the trainer did not stop (min_steps / min_epochs?). Refusing to take"
                " the step."
            )
