r"""DP-SGD for any LightningModule, built on opacus (Abadi et al. 2016, "Deep Learning with Differential Privacy").

Every step :math:`t` draws a Poisson batch :math:`B_t` (each of the N examples independently with probability q),
clips each per-sample gradient to norm C and adds Gaussian noise once:

.. math::  \tilde g_t = \frac{1}{qN}\Big(\sum_{i\in B_t} g_i \min\big(1, \tfrac{C}{\lVert g_i\rVert}\big)
           + \mathcal N(0, \sigma^2 C^2 I)\Big)

opacus does the per-sample gradients (hooks / functorch / ghost clipping), the clipping, the noise and the
accounting (PRV / RDP / GDP); this callback wires them into Lightning's loop without wrapping the module:

==========================  ===============================================================================
Lightning hook              what DPSGD does
==========================  ===============================================================================
``setup("fit")``            checks precision / clipping / accumulation / strategy, swaps BatchNorm & co. when
                            ``fix_modules=True`` (before ``configure_optimizers``), wraps the data source's
                            ``train_dataloader`` so that it returns a :class:`~plpriv.privacy.PoissonDataLoader`
``on_fit_start``            (after ``configure_optimizers`` and DDP wrapping) finds the sub-modules owning the
                            private optimizers' parameters, validates them (errors name the sub-module path) and
                            attaches opacus' per-sample hooks to them once (``wrap_model=False`` style: the module's
                            type and ``state_dict`` keys are unchanged, so checkpoints load without the callback)
``on_train_start``          (after data set-up and checkpoint restore) sample rate, delta, noise calibration,
                            budget, then replaces ``trainer.strategy.optimizers`` with opacus ``DPOptimizer`` (or
                            ``DistributedDPOptimizer`` under DDP: noise added on rank 0 only, then one all-reduce)
``on_before_optimizer_step``  budget guard; zero per-sample gradients for parameters unused in this step
``on_train_batch_end``      ``dp/*`` logging, stale-activation check, budget stop (agreed by all ranks)
``on_train_end``            epsilon-vs-step curve (PNG), summary
``state_dict``              accountant history, noise-generator state, loader position, seed, curve
==========================  ===============================================================================

Details that each were a real bug somewhere (see ``/work/shared/reference/dp_sgd.md``):

* ``DPOptimizer.step(closure)`` runs Lightning's closure (training_step, zero_grad, backward) exactly once, then
  clips, noises and calls the inner optimizer *without* the closure, so the noise is never overwritten (opacus #313).
* Under DDP the gradient all-reduce of ``DistributedDataParallel`` is switched off for training (its public
  ``no_sync()`` context, entered at train start), because opacus' distributed optimizer all-reduces the clipped,
  noised gradient itself; the two never double-average. All ranks draw the same global Poisson batch and keep
  their share of it; empty local batches are yielded, so ranks never take different numbers of steps.
* The Poisson loader enters through public API: the datamodule's (or module's) ``train_dataloader`` is wrapped for
  the fit (loaders passed to ``fit`` directly are only reachable through the fit loop's data source). It is built
  from the user's loader (dataset, collate, workers; q = 1/len(loader) as opacus) and is *not* a ``DataLoader``, so
  Lightning never injects a ``DistributedSampler`` (no ``use_distributed_sampler=False`` needed) and saves / restores
  its position with the fit loop; batch ``i`` of epoch ``e`` is a function of ``(seed, e, i)``, so resumed and DDP
  runs draw the batches of the uninterrupted single-process run.
* The expected batch size is q*N exactly (a float), not opacus' ``int(q * N)``.
* Virtual steps (``max_physical_batch_size``) split a logical batch *inside* one Lightning step (opacus'
  ``signal_skip_step``/``pre_step`` protocol), so ``global_step``, ``max_steps``, LR schedulers, checkpoints and the
  accountant all count logical steps.
* opacus' hooks record activations only when the module is in training mode *and* grad is enabled: EMA updates,
  sampling or evaluation passes must run under ``torch.no_grad()`` or in eval mode; a forward pass that left
  activations without a backward pass is detected after the step and raises (it would silently pair the next
  backward with the wrong activations).

Loss reduction: opacus' hooks multiply the backpropagated gradient by the (local) batch size, i.e. they assume
``loss = mean_i loss_i``. A "sum" loss cannot be told apart from a "mean" loss from one backward pass (the summed
per-sample gradients reproduce the autograd gradient either way), so DPSGD checks statically that every
``torch.nn`` loss module of the LightningModule has ``reduction="mean"`` and at run time that ``training_step``
returns a scalar (a ``reduction="none"`` vector is rejected; in ``grad_sample_mode="ghost"`` it is required).
Privacy holds for any per-sample-separable loss (clipping bounds each example's contribution); a wrong reduction
only rescales the gradient before clipping.

Empty Poisson batches are never skipped (the accountant counts the step): the batch then has zero-length tensors,
the update is pure noise, and a non-finite loss of an empty batch is replaced by 0 for Lightning's bookkeeping
(the gradient is taken from the per-sample gradients, so this changes nothing in the update).

``secure_mode=True`` uses opacus' secure noise (``torchcsprng``) for noise and sampling; a secure generator has no
state to save, so a resumed secure run draws fresh noise and batches (never replayed) and cannot be bit-exact.

Limitations: one private optimizer (several would share each batch, which the accountants do not model); with
manual optimization and several optimizers the noise is calibrated for ``estimated_stepping_batches``, which counts
every optimizer's steps (conservative); ``LearningRateMonitor`` lists the learning rate twice (the user's optimizer,
which schedulers hold, and the DPOptimizer around it, same values); ghost clipping needs ``training_step`` to return
per-sample losses; strategies other than single-device and DDP (FSDP, DeepSpeed) are refused.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from opacus.grad_sample.utils import get_hooks_class
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.loss import _Loss
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from plpriv.privacy.accounting import (
    ACCOUNTANTS,
    calibrate_noise_multiplier,
    default_delta,
    epsilon,
    extend_history,
    make_accountant,
    max_steps_within_budget,
    num_steps,
)
from plpriv.privacy.poisson import PoissonDataLoader, split_batch

__all__ = ["DPSGD"]

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")
_MARK = "_plpriv_dpsgd_wrapper"


@functools.cache
def _gated_hooks_class(mode: str) -> type:
    """opacus' hooks class for ``mode`` whose backward hook ignores passes whose forward recorded nothing.

    opacus computes per-sample gradients in every backward pass through a hooked layer, even when the forward pass
    recorded no activations (eval mode, or parameters frozen by ``toggle_optimizer`` as in a GAN's generator step)
    and then fails on the empty activation list. Such passes are not part of the private step: skip them.
    """
    base = get_hooks_class(mode)

    def capture_backprops_hook(self: Any, module: nn.Module, *args: Any, **kwargs: Any) -> None:
        if not getattr(module, "activations", None):
            return
        base.capture_backprops_hook(self, module, *args, **kwargs)

    return type(f"Gated{base.__name__}", (base,), {"capture_backprops_hook": capture_backprops_hook})


def _positive_float(name: str, value: Any, *, allow_zero: bool = False, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"`{name}` must be {'>= 0' if allow_zero else '> 0'}, got {value!r}.")
    return float(value)


def _derived_seed(seed: int, tag: int) -> int:
    return int(np.random.SeedSequence([seed, tag]).generate_state(1, dtype=np.uint64)[0])


def _truncate(history: Sequence[tuple[float, float, int]], steps: int) -> list[tuple[float, float, int]]:
    """The first ``steps`` steps of a history."""
    out, left = [], steps
    for s, q, k in history:
        if left <= 0:
            break
        out.append((s, q, min(k, left)))
        left -= k
    return out


def _batch_size(batch: Any) -> int:
    """Size of the batch dimension (Lightning's rule: the first tensor's dim 0); -1 if there is no tensor."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return int(extract_batch_size(batch))
    except Exception:
        return -1


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


class DPSGD(Callback):
    r"""Differentially private training (DP-SGD) of any LightningModule with opacus.

    Args:
        max_grad_norm: per-sample clipping bound C (flat clipping over all private parameters).
        noise_multiplier: sigma: the noise added to the summed clipped gradients has std ``sigma * C``.
            If ``None``, it is calibrated so that the run's planned steps (``trainer.estimated_stepping_batches``)
            spend at most ``target_epsilon``.
        target_epsilon: privacy budget. With ``noise_multiplier`` given as well, it is only the budget at which
            training stops (``stop_on_budget``).
        target_delta: delta of the reported (epsilon, delta); defaults to 1/N^1.1 for N training examples.
        accountant: ``"prv"`` (Gopi et al. 2021, tight), ``"rdp"`` (Mironov et al. 2019) or ``"gdp"`` (CLT; can
            underestimate epsilon).
        poisson_sampling: build a Poisson-sampled train loader (q = 1/len(train loader), batch sizes vary); if
            ``False`` the user's loader is used and the accountant's sampling assumption does not hold (warning).
        grad_sample_mode: opacus per-sample gradients: ``"hooks"``, ``"functorch"`` or ``"ghost"`` (ghost clipping:
            two backward passes, no per-sample gradients in memory; ``training_step`` must return the per-sample
            losses, shape ``[batch]``).
        max_physical_batch_size: split logical (Poisson) batches into chunks of at most this many examples inside
            one optimizer step (virtual steps); ``None``: no split.
        fix_modules: replace modules opacus cannot handle (BatchNorm -> GroupNorm, ...) in place before the
            optimizer is built; otherwise they raise an error that names them.
        stop_on_budget: with ``target_epsilon``, stop before the step that would exceed it (checkpoint + message)
            and refuse to resume a spent run.
        secure_mode: cryptographically secure noise and sampling (opacus, needs ``torchcsprng``).
        seed: seeds the Poisson sampler and the noise; ``None`` draws one (rank 0) and stores it in the state.
        private_optimizers: indices (in ``configure_optimizers`` order) of the optimizers that touch private data,
            e.g. ``1`` for a GAN whose discriminator is optimizer 1; ``None``: the only optimizer. One private
            optimizer is supported (several would share each batch, which opacus' accountants do not model).

    Logged (``on_step``, on every step Lightning hands to its loggers, i.e. every ``log_every_n_steps``):
    ``dp/epsilon`` (exact, by the accountant, precomputed in a background thread), ``dp/delta``,
    ``dp/noise_multiplier``, ``dp/sample_rate``; ``dp_epsilon.png`` (epsilon vs step) in the log directory at the end.
    Use one DPSGD instance per run: its accountant history is the run's.

    Example::

        trainer = Trainer(callbacks=[DPSGD(max_grad_norm=1.0, target_epsilon=3.0)], max_epochs=10)
        trainer.fit(model, datamodule)
        print(trainer.callbacks[0].get_epsilon())  # or the logged `dp/epsilon`
    """

    def __init__(
        self,
        max_grad_norm: float,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        target_delta: float | None = None,
        accountant: str = "prv",
        poisson_sampling: bool = True,
        grad_sample_mode: str = "hooks",
        max_physical_batch_size: int | None = None,
        fix_modules: bool = False,
        stop_on_budget: bool = True,
        secure_mode: bool = False,
        seed: int | None = None,
        private_optimizers: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.max_grad_norm = _positive_float("max_grad_norm", max_grad_norm)
        self.noise_multiplier = _positive_float("noise_multiplier", noise_multiplier, allow_zero=True, allow_none=True)
        self.target_epsilon = _positive_float("target_epsilon", target_epsilon, allow_none=True)
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError(
                "DPSGD needs `noise_multiplier` or `target_epsilon` (to calibrate the noise), got neither."
            )
        if target_delta is not None and not (isinstance(target_delta, (int, float)) and 0.0 < target_delta < 1.0):
            raise ValueError(f"`target_delta` must be in (0, 1), got {target_delta!r}.")
        self.target_delta = None if target_delta is None else float(target_delta)
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"`accountant` must be one of {ACCOUNTANTS}, got {accountant!r}.")
        if accountant == "gdp":
            rank_zero_warn("DPSGD(accountant='gdp') uses the CLT approximation, which can underestimate epsilon.")
        self.accountant = accountant
        self.poisson_sampling = bool(poisson_sampling)
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"`grad_sample_mode` must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}.")
        self.grad_sample_mode = grad_sample_mode
        if max_physical_batch_size is not None and (
            isinstance(max_physical_batch_size, bool)
            or not isinstance(max_physical_batch_size, int)
            or max_physical_batch_size < 1
        ):
            raise ValueError(
                f"`max_physical_batch_size` must be a positive int or None, got {max_physical_batch_size!r}."
            )
        self.max_physical_batch_size = max_physical_batch_size
        self.fix_modules = bool(fix_modules)
        self.stop_on_budget = bool(stop_on_budget)
        self.secure_mode = bool(secure_mode)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"`seed` must be a non-negative int or None, got {seed!r}.")
        if secure_mode and seed is not None:
            raise ValueError("`seed` must be None with `secure_mode=True`: secure noise cannot be seeded.")
        self._secure_rng: torch.Generator | None = None
        if secure_mode:
            try:
                import torchcsprng  # noqa: F401
            except ImportError as err:
                raise ImportError(
                    "DPSGD(secure_mode=True) needs the `torchcsprng` package for cryptographically secure noise and"
                    " sampling (https://github.com/pytorch/csprng); install it or use secure_mode=False."
                ) from err
        self.seed = seed
        if private_optimizers is not None:
            indices = [private_optimizers] if isinstance(private_optimizers, int) else list(private_optimizers)
            if not indices or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices):
                raise ValueError(
                    f"`private_optimizers` must be a non-negative int or a list of them, got {private_optimizers!r}."
                )
            if len(set(indices)) > 1:
                raise ValueError(
                    f"`private_optimizers={private_optimizers!r}` names {len(set(indices))} optimizers; DPSGD supports"
                    " one private optimizer: several private optimizers see the same Poisson batch, a composition"
                    " opacus' accountants do not model. Combine their parameters into one optimizer."
                )
            private_optimizers = indices[0]
        self.private_optimizers = private_optimizers

        # run state (saved in ``state_dict``)
        self.history: list[tuple[float, float, int]] = []
        self.curve: list[tuple[int, float]] = []
        self.effective_noise_multiplier: float | None = self.noise_multiplier
        self.sample_rate: float | None = None
        self.delta: float | None = self.target_delta
        self.num_samples: int | None = None
        self.budget_checkpoint_path: str | None = None
        self._seed: int | None = seed
        self._loaded_generator_state: torch.Tensor | None = None
        self._loaded_loader_state: dict[str, int] | None = None
        # fit-time objects (never saved)
        self._loader: PoissonDataLoader | None = None
        self._hooks: list[Any] = []
        self._hooked_modules: list[tuple[str, nn.Module]] = []
        self._dp_optimizer: DPOptimizer | None = None
        self._original_optimizer: Optimizer | None = None
        self._private_index: int | None = None
        self._generator: torch.Generator | None = None
        self._budget_steps: int | None = None
        self._batch_rate: float = 0.0
        self._restore: list[Callable[[], None]] = []
        self._sync_off = contextlib.ExitStack()
        self._eps_cache: dict[tuple[tuple, float], float] = {}
        self._eps_pending: dict[tuple[tuple, float], Future] = {}
        self._eps_pool: ThreadPoolExecutor | None = None
        self._dp_params: list[torch.Tensor] = []
        self._last_log_steps: list[int] = []

    # ------------------------------------------------------------------ public API
    @property
    def steps(self) -> int:
        """DP steps taken so far (the accountant's count, across resumes)."""
        return num_steps(self.history)

    def get_epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at ``delta`` (default: the run's delta), by the configured opacus accountant."""
        delta = self.delta if delta is None else delta
        if delta is None:
            if not self.history:
                return 0.0
            raise ValueError("No delta known yet: pass `delta` or set `target_delta`.")
        return self._epsilon_at(self.steps, float(delta))

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_trainer(trainer, pl_module)
        if self._seed is None and not self.secure_mode:
            self._seed = int(np.random.SeedSequence().generate_state(1, dtype=np.uint32)[0])
        if not self.secure_mode and trainer.world_size > 1:
            self._seed = trainer.strategy.broadcast(self._seed, src=0)
        if self.secure_mode and self._secure_rng is None:
            import torchcsprng

            self._secure_rng = torchcsprng.create_random_device_generator("/dev/urandom")
        if self.fix_modules:
            self._fix_modules(pl_module)
        if self.grad_sample_mode != "ghost":
            self._check_loss_modules(pl_module)
        if self.poisson_sampling:
            self._wrap_train_dataloader(trainer, pl_module)
        else:
            rank_zero_warn(
                "DPSGD(poisson_sampling=False): the train loader's fixed-size batches do not satisfy the Poisson"
                " sampling the accountant assumes, so the reported epsilon is an approximation, not a guarantee."
            )

    def _check_trainer(self, trainer: Trainer, pl_module: LightningModule) -> None:
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
            rank_zero_warn(
                f"DPSGD: `{name}.configure_gradient_clipping` sees the non-private gradient, which DP-SGD replaces by"
                " the clipped, noised one; its clipping has no effect."
            )
        if is_overridden("on_before_optimizer_step", pl_module):
            rank_zero_warn(
                f"DPSGD: `{name}.on_before_optimizer_step` runs on the NON-private batch gradient (before per-sample"
                " clipping and noise, which then replace it): logging or using it is not covered by the DP guarantee."
            )
        if self.poisson_sampling and trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"DPSGD(poisson_sampling=True) conflicts with Trainer(accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches}): every Poisson batch is one DP step (one sample of the"
                " subsampled Gaussian mechanism); accumulating several would break the accountant's assumption."
                " Use DPSGD(max_physical_batch_size=...) to split large logical batches instead, or a larger batch."
            )
        manual = not pl_module.automatic_optimization
        if manual and self.max_physical_batch_size is not None:
            raise ValueError(
                "DPSGD(max_physical_batch_size=...) needs automatic optimization; with manual optimization split the"
                " batch yourself (opacus' `signal_skip_step` protocol)."
            )
        if manual and self.grad_sample_mode == "ghost":
            raise ValueError("DPSGD(grad_sample_mode='ghost') needs automatic optimization.")

    def _fix_modules(self, pl_module: LightningModule) -> None:
        """Replace modules opacus cannot train (BatchNorm, ...) in place, keeping device, dtype and trainability."""
        for path, sub in list(pl_module.named_modules()):
            fixer = ModuleValidator.FIXERS.get(type(sub))
            validator = ModuleValidator.VALIDATORS.get(type(sub))
            if fixer is None or not path:
                continue
            if not isinstance(sub, _BatchNorm) and not (validator and validator(sub)):
                continue
            new = fixer(sub)
            ref = next(iter(sub.parameters()), None)
            ref = next(iter(sub.buffers()), None) if ref is None else ref
            if ref is not None:
                new = new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
            trainable = any(p.requires_grad for p in sub.parameters())
            for p in new.parameters():
                p.requires_grad_(trainable)
            parent_path, _, name = path.rpartition(".")
            setattr(pl_module.get_submodule(parent_path), name, new)
            rank_zero_info(f"DPSGD(fix_modules=True): replaced `{path}` ({type(sub).__name__}) by {new}.")

    @staticmethod
    def _check_loss_modules(pl_module: LightningModule) -> None:
        for path, sub in pl_module.named_modules():
            if isinstance(sub, _Loss) and getattr(sub, "reduction", "mean") != "mean":
                raise ValueError(
                    f"`{path}` ({type(sub).__name__}) has reduction={sub.reduction!r}; DPSGD needs the mean over the"
                    " batch (opacus rescales per-sample gradients by the batch size). Use reduction='mean'."
                )

    def _wrap_train_dataloader(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Make the fit loop's data source return a Poisson loader built from the user's loader.

        The source is the datamodule when one is attached, else loaders passed to ``fit`` directly, else the
        module's ``train_dataloader`` (Lightning's precedence). Hooks are wrapped as instance attributes (public
        API, undone in ``teardown``); loaders passed to ``fit`` directly are only reachable through the fit loop's
        data source (no public API), which is replaced for the duration of the fit.
        """
        source = getattr(trainer.fit_loop, "_data_source", None)
        instance = getattr(source, "instance", None)
        if isinstance(instance, (LightningModule, LightningDataModule)):
            target = instance
            original = target.train_dataloader
            if getattr(original, _MARK, False):
                return  # already wrapped (re-entry)

            @functools.wraps(original)
            def train_dataloader() -> Any:
                return self._make_poisson_loader(trainer, original())

            setattr(train_dataloader, _MARK, True)
            had_own = "train_dataloader" in vars(target)
            target.train_dataloader = train_dataloader
            self._restore.append(
                (lambda: setattr(target, "train_dataloader", original))
                if had_own
                else (lambda: vars(target).pop("train_dataloader", None))
            )
        elif source is not None and instance is not None:
            original_instance = instance
            source.instance = self._make_poisson_loader(trainer, instance)
            self._restore.append(lambda: setattr(source, "instance", original_instance))
        else:
            raise ValueError("DPSGD found no train dataloader: pass a datamodule or `train_dataloaders` to `fit`.")

    def _make_poisson_loader(self, trainer: Trainer, loader: Any) -> PoissonDataLoader:
        if isinstance(loader, PoissonDataLoader):
            return loader
        if not isinstance(loader, DataLoader):
            raise ValueError(
                f"DPSGD(poisson_sampling=True) needs `train_dataloader` to return one torch DataLoader over a map-style"
                f" dataset, got {type(loader).__name__}. Return a single DataLoader or set poisson_sampling=False."
            )
        self._loader = PoissonDataLoader.from_data_loader(
            loader,
            seed=_derived_seed(self._seed or 0, 1),
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            generator=self._secure_rng,
        )
        return self._loader

    # ------------------------------------------------------------------ hooks & optimizer
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._cleanup_hooks()  # re-entry: a previous fit that died before teardown
        optimizers = trainer.strategy.optimizers
        if not optimizers:
            raise ValueError("DPSGD found no optimizer: `configure_optimizers` must return one.")
        index = self.private_optimizers
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
            raise ValueError(
                "The private optimizer is already an opacus DPOptimizer: do not combine DPSGD with opacus'"
                " PrivacyEngine."
            )
        self._private_index = index
        private = {id(p) for group in optimizers[index].param_groups for p in group["params"] if p.requires_grad}
        roots = self._private_roots(pl_module, private)
        self._validate_modules(roots)
        # opacus' hook on the first layer fires although the input needs no gradient: harmless, said every step
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        hooks_cls = _gated_hooks_class(self.grad_sample_mode)
        kwargs: dict[str, Any] = {"batch_first": True, "loss_reduction": "mean", "strict": True}
        if self.grad_sample_mode == "functorch":
            kwargs["force_functorch"] = True
        if self.grad_sample_mode == "ghost":
            kwargs["max_grad_norm"] = self.max_grad_norm
        for path, root in roots:
            if hasattr(root, "autograd_grad_sample_hooks"):
                raise ValueError(f"`{path or 'the LightningModule'}` already has opacus hooks: attach DPSGD once.")
            hooks = hooks_cls(root, **kwargs)
            if self.poisson_sampling:
                hooks.forbid_grad_accumulation()
            self._hooks.append(hooks)
            self._hooked_modules.extend(
                (_join(path, name), m) for name, m in root.named_modules() if any(True for _ in m.parameters(False))
            )

    @staticmethod
    def _private_roots(pl_module: LightningModule, private: set[int]) -> list[tuple[str, nn.Module]]:
        """Largest sub-modules whose trainable parameters are all private (opacus' hooks go on these)."""
        roots: list[tuple[str, nn.Module]] = []
        seen: set[int] = set()

        def visit(path: str, module: nn.Module) -> None:
            if id(module) in seen:
                return
            seen.add(id(module))
            params = {id(p) for p in module.parameters() if p.requires_grad}
            if not params & private:
                return
            if params <= private:
                roots.append((path, module))
                return
            if any(id(p) in private for p in module.parameters(recurse=False) if p.requires_grad):
                raise ValueError(
                    f"`{path or 'the LightningModule'}` ({type(module).__name__}) directly holds parameters of the"
                    " private and of a non-private optimizer; put them in different sub-modules."
                )
            for name, child in module.named_children():
                visit(_join(path, name), child)

        visit("", pl_module)
        covered = {id(p) for _, root in roots for p in root.parameters()}
        if not private <= covered:
            raise ValueError("Some parameters of the private optimizer are not parameters of the LightningModule.")
        return roots

    def _validate_modules(self, roots: list[tuple[str, nn.Module]]) -> None:
        problems = []
        for root_path, root in roots:
            for name, sub in root.named_modules():
                path = _join(root_path, name) or "the LightningModule"
                fixable = type(sub) in ModuleValidator.FIXERS
                if isinstance(sub, _BatchNorm):
                    reason = "BatchNorm mixes the examples of a batch (batch statistics, running buffers)"
                elif any(p.requires_grad for p in sub.parameters(recurse=False)):
                    validator = ModuleValidator.VALIDATORS.get(type(sub))
                    errors = validator(sub) if validator else []
                    if errors:
                        reason = str(errors[0]).split(". ")[0]
                    elif any(True for _ in sub.buffers()):
                        reason = "trainable layer with buffers, which opacus cannot compute per-sample gradients for"
                    else:
                        continue
                else:
                    continue
                fix = (
                    "set DPSGD(fix_modules=True) to replace it, or replace it by hand (e.g. GroupNorm)"
                    if fixable
                    else "replace it by a supported layer (Linear, Conv, GroupNorm, LayerNorm, Embedding, ...)"
                )
                problems.append(f"`{path}` ({type(sub).__name__}): {reason}; {fix}.")
        if problems:
            raise ValueError("DPSGD cannot train these modules privately:\n  " + "\n  ".join(problems))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        world_size = trainer.world_size
        # sampling: q and N from the loader actually used
        if self.poisson_sampling:
            loader = self._loader
            if loader is None or not any(dl is loader for dl in self._flat_train_loaders(trainer)):
                raise RuntimeError(
                    "DPSGD's Poisson loader is not the train loader Lightning uses; was `train_dataloader` replaced?"
                )
            if not self.secure_mode:  # the seed may have come from the checkpoint after the loader was built
                loader.sampler.seed = _derived_seed(self._seed or 0, 1)
            if self._loaded_loader_state is not None:  # loader state restore, even if the loader was built early
                loader.load_state_dict(self._loaded_loader_state)
                self._loaded_loader_state = None
            batch_rate, num_samples = loader.sample_rate, len(loader.dataset)
        else:
            loaders = self._flat_train_loaders(trainer)
            if len(loaders) != 1 or not hasattr(loaders[0], "dataset"):
                raise ValueError("DPSGD needs exactly one train DataLoader with a `dataset`.")
            # as opacus: q = 1 / len(loader) (per rank under DDP, where each rank sees 1/world_size of the data)
            num_samples, batch_rate = len(loaders[0].dataset), 1.0 / len(loaders[0])
        self._batch_rate = batch_rate  # per Lightning batch; a step with k accumulated batches has rate k * q
        sample_rate = min(1.0, batch_rate * trainer.accumulate_grad_batches)
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        if self.delta is None:
            self.delta = default_delta(num_samples)
            rank_zero_info(
                f"DPSGD: `target_delta` not given; using delta = 1/N^1.1 = {self.delta:.3g} for N = {num_samples}."
            )
        if self.delta >= 1.0 / num_samples:
            rank_zero_warn(f"DPSGD: delta = {self.delta:.3g} >= 1/N = {1 / num_samples:.3g} allows leaking a record.")

        planned = trainer.estimated_stepping_batches
        sigma = self._resolve_noise_multiplier(trainer, planned)
        self.effective_noise_multiplier = sigma
        self._setup_budget(trainer, planned, sigma)

        # the optimizer: opacus' DPOptimizer around the user's, in place in the strategy
        index = self._private_index if self._private_index is not None else 0
        optimizers = list(trainer.strategy.optimizers)
        original = optimizers[index]
        distributed = world_size > 1
        device = next((p.device for g in original.param_groups for p in g["params"]), torch.device("cpu"))
        self._generator = self._make_generator(device)
        optimizer_cls = get_optimizer_class(
            clipping="flat", distributed=distributed, grad_sample_mode=self.grad_sample_mode
        )
        dp_optimizer = optimizer_cls(
            optimizer=original,
            noise_multiplier=sigma,
            max_grad_norm=self.max_grad_norm,
            # per rank and Lightning batch (q N / world size); the all-reduce then averages the ranks
            expected_batch_size=batch_rate * num_samples / world_size,
            loss_reduction="mean",
            generator=self._generator,
            secure_mode=self.secure_mode,
        )
        dp_optimizer.attach_step_hook(self._on_dp_step)
        optimizers[index] = dp_optimizer
        trainer.strategy.optimizers = optimizers
        self._original_optimizer, self._dp_optimizer = original, dp_optimizer
        self._dp_params = list(dp_optimizer.params)
        if trainer.is_global_zero:
            self._start_epsilon_prefetch(trainer, planned)

        if isinstance(trainer.strategy.model, DistributedDataParallel):
            # opacus' DistributedDPOptimizer all-reduces the noised gradient; DDP's own all-reduce would be wasted
            self._sync_off.enter_context(trainer.strategy.model.no_sync())
        if pl_module.automatic_optimization:
            self._wrap_training_step(trainer, pl_module)
        rank_zero_info(
            f"DPSGD: sigma={sigma:.4g}, C={self.max_grad_norm:g}, q={sample_rate:.4g} (expected batch"
            f" {sample_rate * num_samples:.1f} of N={num_samples}), delta={self.delta:.3g},"
            f" accountant={self.accountant}, {'Poisson' if self.poisson_sampling else 'fixed-size'} batches,"
            f" grad_sample_mode={self.grad_sample_mode}."
        )

    @staticmethod
    def _flat_train_loaders(trainer: Trainer) -> list[Any]:
        loaders = trainer.train_dataloader
        if isinstance(loaders, (list, tuple)):
            return list(loaders)
        if isinstance(loaders, dict):
            return list(loaders.values())
        return [loaders]

    def _resolve_noise_multiplier(self, trainer: Trainer, planned: float) -> float:
        loaded = self.history[-1][0] if self.history else None
        if self.noise_multiplier is not None:
            if loaded is not None and loaded != self.noise_multiplier:
                rank_zero_warn(
                    f"DPSGD: resuming with noise_multiplier={self.noise_multiplier} after {self.steps} steps at"
                    f" {loaded}; the accountant composes both."
                )
            return self.noise_multiplier
        if loaded is not None:  # calibrated before: keep it, the budget was planned with it
            return loaded
        if not math.isfinite(planned):
            raise ValueError(
                "DPSGD cannot calibrate the noise from `target_epsilon` for an unbounded run: set Trainer(max_steps)"
                " or Trainer(max_epochs), or give `noise_multiplier`."
            )
        sigma = 0.0
        if trainer.is_global_zero:
            sigma = calibrate_noise_multiplier(
                self.target_epsilon, self.delta, self.sample_rate, int(planned),  # type: ignore[arg-type]
                self.accountant,
            )
        sigma = float(trainer.strategy.broadcast(sigma, src=0))
        rank_zero_info(
            f"DPSGD: calibrated noise_multiplier={sigma:.4f} for epsilon={self.target_epsilon} at delta="
            f"{self.delta:.3g} over {int(planned)} steps (q={self.sample_rate:.4g}, {self.accountant} accountant)."
        )
        return sigma

    def _setup_budget(self, trainer: Trainer, planned: float, sigma: float) -> None:
        self._budget_steps = None
        if self.target_epsilon is None or not self.stop_on_budget:
            return
        taken = self.steps
        horizon = None if not math.isfinite(planned) else max(int(planned) - trainer.global_step, 0)
        if horizon == 0:  # nothing left to train
            return
        extra = 0
        if trainer.is_global_zero:
            extra = max_steps_within_budget(
                self.target_epsilon, self.delta, self.history, sigma, self.sample_rate,  # type: ignore[arg-type]
                self.accountant, horizon=horizon,
            )
        extra = int(trainer.strategy.broadcast(extra, src=0))
        if extra <= 0:
            raise RuntimeError(
                f"DPSGD: the privacy budget epsilon={self.target_epsilon} (delta={self.delta:.3g}) is spent: after"
                f" {taken} steps another step at noise_multiplier={sigma:.4g} would exceed it. Refusing to train"
                " further; raise `target_epsilon` knowingly or start a new run."
            )
        if horizon is None or extra < horizon:
            self._budget_steps = taken + extra
            rank_zero_info(
                f"DPSGD: the budget epsilon={self.target_epsilon} allows {extra} more steps; training will stop after"
                f" step {self._budget_steps}."
            )

    def _make_generator(self, device: torch.device) -> torch.Generator | None:
        if self.secure_mode:
            return self._secure_rng
        generator = torch.Generator(device=device)
        generator.manual_seed(_derived_seed(self._seed or 0, 2))
        if self._loaded_generator_state is not None:
            generator.set_state(self._loaded_generator_state.to("cpu"))
            self._loaded_generator_state = None
        return generator

    def _on_dp_step(self, optimizer: DPOptimizer) -> None:
        """opacus step hook: runs after clipping and noise, before the inner step (as opacus' accountant hook)."""
        self.history = extend_history(
            self.history, optimizer.noise_multiplier, min(1.0, self._batch_rate * optimizer.accumulated_iterations), 1
        )

    # ------------------------------------------------------------------ training-step wrapper
    def _wrap_training_step(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Wrap ``pl_module.training_step`` (instance attribute, undone in teardown) for virtual steps, ghost
        clipping's two backward passes, and loss checks. Lightning's closure still calls it once per batch."""
        original = pl_module.training_step
        if getattr(original, _MARK, False):
            return
        optimizer = self._dp_optimizer
        max_physical = self.max_physical_batch_size
        ghost = self.grad_sample_mode == "ghost"

        def loss_of(output: Any) -> torch.Tensor:
            loss = output.get("loss") if isinstance(output, dict) else output
            if not isinstance(loss, torch.Tensor):
                raise ValueError("DPSGD: `training_step` must return the loss tensor (or a dict with 'loss').")
            return loss

        def with_loss(output: Any, loss: torch.Tensor) -> Any:
            if isinstance(output, dict):
                return {**output, "loss": loss}
            return loss

        def run(batch: Any, n: int, args: tuple, kwargs: dict) -> tuple[Any, torch.Tensor, torch.Tensor]:
            """One physical batch: (output, loss to backpropagate, loss value to report)."""
            if ghost:
                for hooks in self._hooks:
                    hooks.enable_hooks()
            output = original(batch, *args, **kwargs)
            loss = loss_of(output)
            if ghost:
                if loss.dim() != 1 or (n >= 0 and loss.shape[0] != n):
                    raise ValueError(
                        f"DPSGD(grad_sample_mode='ghost') needs `training_step` to return the per-sample losses, shape"
                        f" [{n}], got shape {tuple(loss.shape)} (compute the loss with reduction='none')."
                    )
                if loss.numel() == 0:
                    return output, loss.sum(), loss.sum().detach()
                # ghost clipping (Li et al. 2022): pass 1 gives per-sample gradient norms, pass 2 the clipped sum
                torch.autograd.backward(loss.mean(), retain_graph=True)
                norms = torch.stack(
                    [p._norm_sample for hooks in self._hooks for p in hooks.trainable_parameters], dim=0
                ).norm(2, dim=0)
                coef = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0).to(loss.device)
                for hooks in self._hooks:
                    hooks.disable_hooks()
                for p in optimizer.params:
                    p.grad = None
                clipped = (coef.detach() * loss).sum()
                return output, clipped, loss.mean().detach()
            if loss.dim() != 0:
                raise ValueError(
                    f"DPSGD: `training_step` returned a loss of shape {tuple(loss.shape)}; it must be the mean over the"
                    " batch (a scalar), as opacus rescales per-sample gradients by the batch size."
                )
            if n == 0 and not torch.isfinite(loss):
                loss = torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)  # zero gradient, no NaN in logs
            return output, loss, loss.detach()

        @functools.wraps(original)
        def training_step(batch: Any, *args: Any, **kwargs: Any) -> Any:
            n = _batch_size(batch)
            chunks = split_batch(batch, n, max_physical) if max_physical and n > 0 else [batch]
            total, count = 0.0, 0
            if len(chunks) > 1:  # Lightning zeroes gradients after training_step: clear the last step's first
                optimizer.zero_grad()
            for chunk in chunks[:-1]:  # virtual steps: clip and accumulate, no noise, no optimizer step
                m = _batch_size(chunk)
                _, loss, value = run(chunk, m, args, kwargs)
                trainer.strategy.backward(loss, optimizer)
                total, count = total + float(value) * m, count + m
                self._fill_missing_grad_samples(optimizer)
                optimizer.signal_skip_step(do_skip=True)
                optimizer.pre_step()
                optimizer.zero_grad()
            m = _batch_size(chunks[-1])
            output, loss, value = run(chunks[-1], m, args, kwargs)
            if count:  # report the mean over the logical batch; the gradient stays the last chunk's
                mean = (total + value * m) / (count + m)
                loss = loss + (mean - loss).detach()
            elif ghost:
                loss = loss + (value - loss).detach()
            return with_loss(output, loss)

        setattr(training_step, _MARK, True)
        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._restore.append(lambda: vars(pl_module).pop("training_step", None))

    # ------------------------------------------------------------------ per step
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        if optimizer is not self._dp_optimizer:
            return
        if self._budget_steps is not None and self.steps >= self._budget_steps:
            raise RuntimeError(
                f"DPSGD: step {self.steps + 1} would exceed the privacy budget epsilon={self.target_epsilon}; the"
                " trainer did not stop (min_steps / min_epochs?). Refusing to take the step."
            )
        self._fill_missing_grad_samples(optimizer)

    def _fill_missing_grad_samples(self, optimizer: DPOptimizer) -> None:
        """opacus raises on parameters without per-sample gradients (unused in this step): those are zero."""
        if self.grad_sample_mode == "ghost":
            return
        params = self._dp_params
        if all(p.grad_sample is not None for p in params):
            return
        n = next((len(p.grad_sample) for p in params if isinstance(p.grad_sample, torch.Tensor)), 0)
        for p in params:
            if p.grad_sample is None:
                p.grad_sample = p.new_zeros((n, *p.shape))

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._dp_optimizer is None:
            return
        for path, module in self._hooked_modules:
            if getattr(module, "activations", None):
                raise RuntimeError(
                    f"DPSGD: `{path or 'the LightningModule'}` kept activations of a forward pass without backward"
                    " (opacus records activations in training mode with grad enabled). Run extra forward passes (EMA,"
                    " sampling, metrics) under torch.no_grad() or in eval mode."
                )
        self._log(trainer, pl_module)
        if self._budget_steps is not None and self.steps >= self._budget_steps and not trainer.should_stop:
            # all ranks count the same steps against the same broadcast budget; the reduction makes it explicit
            if trainer.strategy.reduce_boolean_decision(True, all=True):
                self._stop_on_budget(trainer)

    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning hands step metrics to the loggers every `log_every_n_steps` steps and drops the others, so the
        # dp/* values are logged on exactly those steps (no public API for the condition; without it: every step).
        # Epsilon costs 0.03-1 s per accountant call: it is precomputed in a background thread (see
        # `_prefetch_epsilon`) for the next logging step and only read here.
        connector = getattr(trainer, "_logger_connector", None)
        if not getattr(connector, "should_update_logs", True):
            return
        values = {
            "dp/delta": float(self.delta),  # type: ignore[arg-type]
            "dp/noise_multiplier": float(self.effective_noise_multiplier),  # type: ignore[arg-type]
            "dp/sample_rate": float(self.sample_rate),  # type: ignore[arg-type]
        }
        pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=1)
        if trainer.is_global_zero:  # the accountant history is the same on every rank
            pl_module.log("dp/epsilon", self.get_epsilon(), on_step=True, on_epoch=False, batch_size=1,
                          rank_zero_only=True)
            self._last_log_steps = [*self._last_log_steps[-1:], self.steps]
            gap = self._last_log_steps[-1] - self._last_log_steps[0] if len(self._last_log_steps) == 2 else 0
            self._prefetch_epsilon(gap or max(trainer.log_every_n_steps, 1))

    def _start_epsilon_prefetch(self, trainer: Trainer, planned: float) -> None:
        """Background epsilon for the first logging step and, for short runs, the points of the final curve."""
        self._eps_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpsgd-epsilon")
        every = max(trainer.log_every_n_steps, 1)
        self._prefetch_epsilon(every - self.steps % every)
        if math.isfinite(planned) and planned // every < 8:
            for k in np.unique(np.linspace(1, int(planned), 8).round().astype(int)):
                self._prefetch_epsilon(int(k) - self.steps)

    def _prefetch_epsilon(self, ahead: int) -> None:
        """Submit epsilon after ``ahead`` more steps at the current (sigma, q) to the background thread."""
        if self._eps_pool is None or ahead <= 0 or self.delta is None:
            return
        sigma, rate = float(self.effective_noise_multiplier), float(self.sample_rate)  # type: ignore[arg-type]
        history = extend_history(self.history, sigma, rate, ahead)
        key = (tuple(history), float(self.delta))
        if key in self._eps_cache or key in self._eps_pending:
            return
        while len(self._eps_pending) >= 16:  # predictions that were never used
            self._eps_pending.pop(next(iter(self._eps_pending))).cancel()
        self._eps_pending[key] = self._eps_pool.submit(epsilon, history, float(self.delta), self.accountant)

    def _stop_on_budget(self, trainer: Trainer) -> None:
        trainer.should_stop = True
        checkpoint_callback = trainer.checkpoint_callback
        directory = getattr(checkpoint_callback, "dirpath", None) or os.path.join(
            trainer.log_dir or trainer.default_root_dir, "checkpoints"
        )
        path = os.path.join(directory, f"dp-budget-spent-step={self.steps}.ckpt")
        trainer.save_checkpoint(path)
        self.budget_checkpoint_path = path
        rank_zero_warn(
            f"DPSGD: stopping after step {self.steps}: epsilon={self.get_epsilon():.4f} (delta={self.delta:.3g}); the"
            f" next step would exceed the budget epsilon={self.target_epsilon}. Checkpoint: {path}"
        )

    # ------------------------------------------------------------------ end, teardown
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._dp_optimizer is None or not self.history:
            return
        eps = self.get_epsilon()
        rank_zero_info(
            f"DPSGD: {self.steps} steps, (epsilon, delta) = ({eps:.4f}, {self.delta:.3g}) by the {self.accountant}"
            f" accountant (sigma={self.effective_noise_multiplier:.4g}, q={self.sample_rate:.4g},"
            f" C={self.max_grad_norm:g})."
        )
        directory = trainer.log_dir or trainer.default_root_dir  # `log_dir` is collective under DDP: all ranks
        if trainer.is_global_zero:
            self._plot_curve(trainer, directory)

    def _plot_curve(self, trainer: Trainer, directory: str) -> None:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        from plpriv.utils.figures import save_and_log_figure

        total = self.steps
        points = dict(self.curve)
        if len(points) < 8:  # short runs: a few more points (cached accountant calls)
            for k in np.unique(np.linspace(1, total, 8).round().astype(int)):
                points[int(k)] = self._epsilon_at(int(k), float(self.delta))  # type: ignore[arg-type]
        steps = [0, *sorted(points)]
        eps = [0.0, *(points[k] for k in steps[1:])]
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
        ax.plot(steps, eps, marker=".")
        if self.target_epsilon is not None:
            ax.axhline(self.target_epsilon, color="tab:red", ls="--", lw=1, label=f"target {self.target_epsilon:g}")
            ax.legend()
        ax.set(xlabel="step", ylabel="epsilon", title=f"DP-SGD epsilon ({self.accountant}, delta={self.delta:.2g})")
        fig.tight_layout()
        save_and_log_figure(trainer, fig, "dp_epsilon", directory=directory)

    def _epsilon_at(self, steps: int, delta: float) -> float:
        """Epsilon after the first ``steps`` steps (cached; precomputed values are taken from the thread)."""
        history = _truncate(self.history, steps)
        key = (tuple(history), delta)
        if key not in self._eps_cache:
            future = self._eps_pending.pop(key, None)
            value = future.result() if future is not None else epsilon(history, delta, self.accountant)
            self._eps_cache[key] = value
            if delta == self.delta and steps > 0:
                self.curve = sorted({**dict(self.curve), steps: value}.items())
        return self._eps_cache[key]

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._undo(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._undo(trainer)

    def _undo(self, trainer: Trainer) -> None:
        self._sync_off.close()
        self._cleanup_hooks()
        while self._restore:
            self._restore.pop()()
        if self._dp_optimizer is not None:
            for p in self._dp_optimizer.params:
                if hasattr(p, "summed_grad"):
                    del p.summed_grad
        self._dp_optimizer = None
        self._dp_params = []
        if self._eps_pool is not None:
            self._eps_pool.shutdown(wait=False, cancel_futures=True)
            self._eps_pool, self._eps_pending = None, {}

    def _cleanup_hooks(self) -> None:
        for hooks in self._hooks:
            hooks.cleanup()
        for _, module in self._hooked_modules:
            for attr in ("activations", "max_batch_len"):
                if hasattr(module, attr):
                    delattr(module, attr)
        self._hooks, self._hooked_modules = [], []

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": {"history": list(self.history), "mechanism": self.accountant},
            "noise_multiplier": self.effective_noise_multiplier,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "num_samples": self.num_samples,
            "seed": self._seed,
            "noise_generator_state": (
                None if self._generator is None or self.secure_mode else self._generator.get_state().clone()
            ),
            "loader": self._loader.state_dict() if self._loader is not None else None,
            "curve": list(self.curve),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(float(s), float(q), int(k)) for s, q, k in state_dict["accountant"]["history"]]
        if state_dict["accountant"].get("mechanism", self.accountant) != self.accountant:
            rank_zero_info(
                f"DPSGD: the checkpoint was accounted with {state_dict['accountant']['mechanism']!r}; recomputing the"
                f" same history with {self.accountant!r}."
            )
            self.curve = []
        else:
            self.curve = [(int(k), float(e)) for k, e in state_dict.get("curve", [])]
        self.effective_noise_multiplier = state_dict.get("noise_multiplier", self.effective_noise_multiplier)
        self.sample_rate = state_dict.get("sample_rate")
        if self.target_delta is None:
            self.delta = state_dict.get("delta")
        self.num_samples = state_dict.get("num_samples")
        if not self.secure_mode and state_dict.get("seed") is not None:
            self._seed = int(state_dict["seed"])
        self._loaded_generator_state = state_dict.get("noise_generator_state")
        self._loaded_loader_state = state_dict.get("loader")
        self._eps_cache = {}
