"""DPSGD's Lightning-side set-up: trainer checks that refuse what cannot be accounted exactly, the choice of the
private optimizer, the wrapper that hands the fit loop a Poisson loader built from the user's loader, the run's
artefact folders and the budget-stop checkpoint."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import GradientAccumulationScheduler, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from opacus.optimizers import DPOptimizer
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from plpriv.callbacks._dp_training_step import MARK
from plpriv.privacy.contract import PrivateTrainingAware

if TYPE_CHECKING:
    from plpriv.privacy.engine import DPEngine

__all__ = [
    "artefact_dirs",
    "budget_checkpoint",
    "check_poisson_source",
    "check_resumed_privately",
    "check_trainer",
    "flat_train_loaders",
    "private_optimizer",
    "replace_optimizer",
    "wrap_train_dataloader",
]


def check_trainer(dp: DPEngine, trainer: Trainer, pl_module: LightningModule) -> None:
    """Refuse, before any work, trainer settings whose mechanism DP-SGD cannot account exactly."""
    if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise ValueError(
            f"DPSGD supports single-device and DDP training, got strategy {type(trainer.strategy).__name__}."
        )
    precision = str(trainer.precision)
    if precision in ("16-mixed", "16") or getattr(trainer.precision_plugin, "scaler", None) is not None:
        raise ValueError(
            f"DPSGD does not support precision={precision!r}: its GradScaler multiplies the loss, so per-sample"
            " gradients would be clipped while still scaled. Use precision='bf16-mixed' (no scaler) or '32-true'."
        )
    if trainer.gradient_clip_val:
        raise ValueError(
            f"DPSGD conflicts with Trainer(gradient_clip_val={trainer.gradient_clip_val!r}): Lightning would clip"
            " the non-private batch gradient, which DP-SGD discards; DP-SGD clips every per-sample gradient to"
            " `max_grad_norm` instead. Remove `gradient_clip_val`."
        )
    name = type(pl_module).__name__
    if is_overridden("configure_gradient_clipping", pl_module):
        rank_zero_warn(f"DPSGD: `{name}.configure_gradient_clipping` sees the non-private gradient; no effect.")
    if is_overridden("on_before_optimizer_step", pl_module) and not isinstance(pl_module, PrivateTrainingAware):
        # a module that implements the public-batch contract declares its hooks DP-aware (EDM: per-sample clean-up)
        rank_zero_warn(
            f"DPSGD: `{name}.on_before_optimizer_step` runs on the NON-private batch gradient (before per-sample"
            " clipping and noise, which then replace it): logging or using it is not covered by the DP guarantee."
        )
    schedulers = [cb for cb in trainer.callbacks if isinstance(cb, GradientAccumulationScheduler)]
    accumulates = trainer.accumulate_grad_batches != 1 or any(
        cb.going_to_accumulate_grad_batches() for cb in schedulers
    )
    if dp.poisson_sampling and accumulates:
        raise ValueError(
            f"DPSGD(poisson_sampling=True) conflicts with gradient accumulation (Trainer(accumulate_grad_batches="
            f"{trainer.accumulate_grad_batches}) or a GradientAccumulationScheduler): every Poisson batch is one"
            " DP step; accumulating several is not a Poisson sample the accountant models. Use"
            " DPSGD(max_physical_batch_size=...) to split large logical batches instead, or a larger batch_size."
        )
    manual = not pl_module.automatic_optimization
    if manual and dp.max_physical_batch_size is not None:
        raise ValueError(
            "DPSGD(max_physical_batch_size=...) needs automatic optimization; with manual optimization split the"
            " batch yourself (opacus' `signal_skip_step` protocol)."
        )
    if manual and dp.grad_sample_mode == "ghost":
        raise ValueError("DPSGD(grad_sample_mode='ghost') needs automatic optimization.")


def check_poisson_source(loader: Any) -> None:
    """The user's train loader must be one torch DataLoader (Poisson sampling rebuilds it over its dataset)."""
    if not isinstance(loader, DataLoader):
        raise ValueError(
            f"DPSGD(poisson_sampling=True) needs `train_dataloader` to return one torch DataLoader over a map-style"
            f" dataset, got {type(loader).__name__}. Return a single DataLoader or set poisson_sampling=False."
        )


def private_optimizer(optimizers: Sequence[Optimizer], index: int | None) -> int:
    """Index of the private optimizer among ``configure_optimizers``' (``index``: the user's choice, or None)."""
    if not optimizers:
        raise ValueError("DPSGD found no optimizer: `configure_optimizers` must return one.")
    if index is None:
        if len(optimizers) > 1:
            raise ValueError(
                f"`configure_optimizers` returned {len(optimizers)} optimizers; name the one that sees private"
                " data with DPSGD(private_optimizers=<index>) (e.g. a GAN's discriminator)."
            )
        index = 0
    if index >= len(optimizers):
        raise ValueError(
            f"`private_optimizers={index}` but `configure_optimizers` returned {len(optimizers)} optimizer(s)."
        )
    if isinstance(optimizers[index], DPOptimizer):
        raise ValueError("The private optimizer is already an opacus DPOptimizer: do not combine DPSGD with"
                         " opacus' PrivacyEngine.")
    return index


def replace_optimizer(trainer: Trainer, index: int, optimizer: Optimizer) -> Optimizer:
    """Put ``optimizer`` in place of the strategy's optimizer ``index``; returns it."""
    optimizers = list(trainer.strategy.optimizers)
    optimizers[index] = optimizer
    trainer.strategy.optimizers = optimizers
    return optimizer


def flat_train_loaders(trainer: Trainer) -> list[Any]:
    """The fit loop's train loaders as a list (one loader, or a list / dict of them)."""
    loaders = trainer.train_dataloader
    if isinstance(loaders, (list, tuple)):
        return list(loaders)
    if isinstance(loaders, dict):
        return list(loaders.values())
    return [loaders]


def wrap_train_dataloader(trainer: Trainer, make: Callable[[Any], Any]) -> Callable[[], None]:
    """Make the fit loop's data source return ``make(user's loader)``; returns the function that undoes it.

    The source is the datamodule, else loaders passed to ``fit``, else the module's ``train_dataloader``
    (Lightning's precedence). Hooks become instance attributes (undone in ``teardown``); loaders passed to
    ``fit`` are only reachable through the fit loop's data source, replaced for the duration of the fit. Lightning
    has no public hook that transforms the train loader before the fit loop iterates it (and again on every
    reload), so the wrapper sits at the source; reading the fit loop's private ``_data_source`` is the only way to
    find which source Lightning will ask.
    """
    source = getattr(trainer.fit_loop, "_data_source", None)
    instance = getattr(source, "instance", None)
    if isinstance(instance, (LightningModule, LightningDataModule)):
        target, original = instance, instance.train_dataloader
        if getattr(original, MARK, False):
            return lambda: None  # already wrapped (re-entry)

        def train_dataloader() -> Any:
            return make(original())

        setattr(train_dataloader, MARK, True)
        had_own = "train_dataloader" in vars(target)
        target.train_dataloader = train_dataloader  # type: ignore[method-assign]
        if had_own:
            return lambda: setattr(target, "train_dataloader", original)
        return lambda: vars(target).pop("train_dataloader", None)
    elif source is not None and instance is not None:
        original_instance = instance
        source.instance = make(instance)
        return lambda: setattr(source, "instance", original_instance)
    raise ValueError("DPSGD found no train dataloader: pass a datamodule or `train_dataloaders` to `fit`.")


def budget_checkpoint(trainer: Trainer, steps: int) -> str:
    """Save the checkpoint of a run stopped by its budget (beside the others, else in ``<log dir>/checkpoints``)."""
    directory = getattr(trainer.checkpoint_callback, "dirpath", None) or os.path.join(
        trainer.log_dir or trainer.default_root_dir, "checkpoints")
    path = os.path.join(directory, f"dp-budget-spent-step={steps}.ckpt")
    trainer.save_checkpoint(path)
    return path


def artefact_dirs(trainer: Trainer) -> list[str]:
    """The folders a run writes artefacts into (checkpoints, logs, the root dir): published with the run."""
    dirs = [cb.dirpath for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    return [*dirs, trainer.default_root_dir, *(lg.log_dir for lg in trainer.loggers if getattr(lg, "log_dir", None))]


def check_resumed_privately(trainer: Trainer, has_state: bool, allow_mechanism_change: bool) -> None:
    """Refuse to resume a checkpoint of steps taken without DPSGD (no DPSGD state in it): epsilon would not cover
    them; unless ``allow_mechanism_change``."""
    if trainer.ckpt_path and not has_state and trainer.global_step > 0 and not allow_mechanism_change:
        raise ValueError(
            f"DPSGD: {trainer.ckpt_path} was trained for {trainer.global_step} steps without DPSGD; epsilon would"
            " not cover them. Start from its weights as a new run (no --ckpt_path; e.g. a public pretrained"
            " model), or set DPSGD(allow_mechanism_change=True) to continue knowingly."
        )
