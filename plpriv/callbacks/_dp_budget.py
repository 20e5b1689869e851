"""DPSGD's budget: the run's delta, noise calibration from ``target_epsilon``, the steps the budget allows at the
current (sigma, q), and the stop (checkpoint + message) when it is spent. Accounting runs on rank zero; every rank
gets its result."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from lightning.pytorch import Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from plpriv.callbacks._dp_setup import budget_dir
from plpriv.privacy.adjacency import PublicRate

if TYPE_CHECKING:
    from plpriv.callbacks.dp_sgd import DPSGD

__all__ = ["budget_end", "noise_multiplier_for", "run_delta", "stop_for_budget"]


def run_delta(delta: float | None, public: PublicRate) -> float:
    """The run's delta: the user's, else 1/N^1.1 of the public size (said); a warning when it is >= 1/N (public N
    only: under add/remove with a bare ``sample_rate`` the size is unknown here, by design)."""
    if delta is None:
        if public.default_delta is None:
            raise ValueError("DPSGD: give `target_delta`: no public data set size to derive it from.")
        delta = public.default_delta
        rank_zero_info(f"DPSGD: `target_delta` not given; delta = 1/N^1.1 = {delta:.3g} for the public N.")
    if public.default_delta is not None and delta >= public.default_delta ** (1 / 1.1):
        rank_zero_warn(f"DPSGD: delta = {delta:.3g} >= 1/N allows leaking a record.")
    return delta


def noise_multiplier_for(dp: DPSGD, trainer: Trainer, planned: float) -> float:
    """The run's sigma: the user's, else the resumed run's calibrated one, else calibrated so that ``planned``
    steps at the current q spend at most ``target_epsilon`` (agreed by all ranks)."""
    loaded = dp.history[-1][0] if dp.history else None
    if dp.noise_multiplier is not None:
        return dp.noise_multiplier
    if loaded is not None:  # calibrated before: keep it, the budget was planned with it
        return loaded
    if not math.isfinite(planned):
        raise ValueError(
            "DPSGD cannot calibrate the noise from `target_epsilon` for an unbounded run: set Trainer(max_steps)"
            " or Trainer(max_epochs), or give `noise_multiplier`."
        )
    sigma = 0.0
    if trainer.is_global_zero:
        try:
            sigma = dp.ledger.calibrate(dp.target_epsilon, dp.delta, dp.sample_rate,  # type: ignore[arg-type]
                                        int(planned))
        except ValueError as err:
            raise ValueError(
                f"DPSGD: no noise multiplier reaches epsilon={dp.target_epsilon} at delta={dp.delta:.3g} over"
                f" {int(planned)} steps at q={dp.sample_rate:.4g} ({err}). Raise `target_epsilon`, train"
                " fewer steps or use a smaller batch_size."
            ) from None
    sigma = float(trainer.strategy.broadcast(sigma, src=0))
    rank_zero_info(
        f"DPSGD: calibrated noise_multiplier={sigma:.4f} for epsilon={dp.target_epsilon} at delta="
        f"{dp.delta:.3g} over {int(planned)} steps (q={dp.sample_rate:.4g}, {dp.accountant})."
    )
    return sigma


def budget_end(dp: DPSGD, trainer: Trainer, sigma: float, rate: float, planned: float, spent: str) -> int | None:
    """The step count after which the budget is spent at (sigma, q), ``None`` if the plan fits in it.

    ``dp.steps`` means no step is left: ``spent="raise"`` refuses to train instead, ``"stop"`` returns it (the caller
    stops). Without any step taken yet a spent budget is always refused."""
    if dp.target_epsilon is None or not dp.stop_on_budget:
        return None
    # steps left in THIS fit (not planned - dp.steps: a second fit with the same callback starts at global step 0
    # with the first fit's steps already in the ledger, and must be guarded too)
    horizon = max(int(planned) - trainer.global_step, 0) if math.isfinite(planned) else None
    if horizon == 0:  # nothing left to train
        return None
    extra = 0
    if trainer.is_global_zero:
        extra = dp.ledger.steps_within_budget(dp.target_epsilon, dp.delta, sigma, rate,  # type: ignore[arg-type]
                                              horizon=horizon)
    extra = int(trainer.strategy.broadcast(extra, src=0))
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
        rank_zero_info(f"DPSGD: the budget epsilon={dp.target_epsilon} allows {extra} more steps at q={rate:.4g};"
                       f" training will stop after step {dp.steps + extra}.")
        return dp.steps + extra
    return None


def stop_for_budget(dp: DPSGD, trainer: Trainer) -> None:
    """Stop the fit after this step: a checkpoint in the budget directory and a warning naming it."""
    trainer.should_stop = True
    path = os.path.join(budget_dir(trainer), f"dp-budget-spent-step={dp.steps}.ckpt")
    trainer.save_checkpoint(path)
    dp.budget_checkpoint_path = path
    rank_zero_warn(
        f"DPSGD: stopping after step {dp.steps}: epsilon={dp.get_epsilon():.4f} (delta={dp.delta:.3g}); the"
        f" next step would exceed the budget epsilon={dp.target_epsilon}. Checkpoint: {path}"
    )
