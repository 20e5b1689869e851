r"""DP-SGD for any LightningModule, built on opacus (Abadi et al. 2016, "Deep Learning with Differential Privacy").

Every step :math:`t` draws a Poisson batch :math:`B_t` (each example independently with probability q), clips each
per-sample gradient to norm C and adds Gaussian noise once; the sum is divided by the public batch size B:

.. math::  \tilde g_t = \frac{1}{B}\Big(\sum_{i\in B_t} g_i \min\big(1, \tfrac{C}{\lVert g_i\rVert}\big)
           + \mathcal N(0, \sigma^2 C^2 I)\Big), \qquad q = B / N

B is the train loader's ``batch_size`` (a constant the user chose), never a function of the data set size: with
opacus' q = 1/len(loader) the divisor q N differs between N and N + 1 examples, which a threshold on the update
scale detects. q, delta and the steps per epoch are computed from N as in opacus (N is treated as public); give
``sample_rate`` to fix q as a public constant too.

opacus does the per-sample gradients, clipping, noise and accounting; the Lightning-free parts live in
:mod:`plpriv.privacy` (Poisson loader, per-sample hooks and their checks, module validation, the epsilon ledger,
the secret file) for other privacy callbacks to reuse. This callback wires them into Lightning's loop:

==========================  ===============================================================================
``setup("fit")``            checks the trainer, swaps BatchNorm & co. (``fix_modules``), wraps the data source's
                            ``train_dataloader`` to return a :class:`~plpriv.privacy.PoissonDataLoader`
``on_fit_start``            validates the private sub-modules and attaches opacus' hooks once (module type and
                            ``state_dict`` keys unchanged)
``on_train_start``          seed (secret file), rate, delta, noise calibration, budget; opacus ``DPOptimizer`` (or
                            ``DistributedDPOptimizer`` under DDP) in place of the private optimizer
``on_train_batch_start``    re-plans rate and budget when they changed (dataloader reload, accumulation scheduler)
``on_before_optimizer_step``  one private step per batch, budget guard, per-sample gradient checks
``on_train_batch_end``      stale-activation check, ``dp/*`` logging, budget stop (agreed by all ranks)
``on_save_checkpoint``      a public ``checkpoint["plpriv_privacy"]`` record of the mechanism and epsilon so far
==========================  ===============================================================================

Secrets: checkpoints never hold the noise or sampling seed, a generator state or sampled indices. Batch ``i`` of
epoch ``e`` and the noise of step ``t`` are functions of a secret seed (128 bits of OS entropy) and ``(e, i)`` or
``t``; the seed is written to ``dpsgd-secret-<run id>.json`` (mode 0600) next to the checkpoints and read back on
resume, which is then exact. Without that file a resumed run continues with fresh noise and batches (warning;
accounting unchanged). Never publish the secret file.

Refused before training, with what to do: BatchNorm (``fix_modules``), 16-bit precision with a GradScaler,
``gradient_clip_val``, gradient accumulation with Poisson sampling (use ``max_physical_batch_size``), samplers whose
examples Poisson sampling cannot reproduce, strategies other than single-device and DDP, several private optimizers.
Refused at the first step: two private optimizer steps on one batch (manual optimization), a forward pass through a
private layer on a batch of another size, a parameter with a gradient but no per-sample gradient, a ``sum`` or
per-sample loss (except ghost clipping, which needs per-sample losses).

Notes: opacus' hooks record activations in training mode with grad enabled: EMA updates, sampling or evaluation
passes must run under ``torch.no_grad()`` or in eval mode. Empty Poisson batches are steps (never skipped). Virtual
steps (``max_physical_batch_size``) split a logical batch inside one Lightning step. ``secure_mode=True`` uses
``torchcsprng`` for noise and sampling (never reproducible, never in a file).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from opacus.optimizers import DPOptimizer, get_optimizer_class
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from plpriv.callbacks._dp_args import (
    check_adjacency,
    check_dataset_size,
    check_metric_names,
    check_physical_batch_size,
    check_rates,
    check_secure_mode,
    check_seed,
    number,
    private_optimizer_index,
    secure_generator,
    warn_fixed_seed,
)
from plpriv.callbacks._dp_budget import budget_end, noise_multiplier_for, run_delta, stop_for_budget
from plpriv.callbacks._dp_logging import dp_metrics, save_epsilon_plot, should_update_logs, start_line, summary
from plpriv.callbacks._dp_records import (
    PRIVACY_RECORD_KEY,
    check_resumed_privately,
    check_same_mechanism,
    privacy_record,
    public_state,
)
from plpriv.callbacks._dp_setup import (
    check_poisson_source,
    check_trainer,
    check_secret_dir,
    flat_train_loaders,
    loader_constants,
    private_optimizer,
    replace_optimizer,
    resolve_seed,
    save_secret,
    wrap_train_dataloader,
)
from plpriv.callbacks._dp_training_step import (
    batch_size_of,
    clear_per_sample_state,
    guard_training_logs,
    wrap_training_step,
)
from plpriv.privacy.accounting import ACCOUNTANTS
from plpriv.privacy.adjacency import PublicRate, public_rate
from plpriv.privacy.contract import PrivateTrainingAware, PublicBatch
from plpriv.privacy.ledger import EpsilonLedger
from plpriv.privacy.per_sample import GRAD_SAMPLE_MODES, PerSampleHooks
from plpriv.privacy.poisson import PoissonDataLoader, sampler_support
from plpriv.privacy.validation import check_loss_modules, fix_modules, private_roots, validate_modules
from plpriv.utils import seeding

__all__ = ["DPSGD", "PRIVACY_RECORD_KEY"]

class DPSGD(Callback):
    r"""Differentially private training (DP-SGD) of any LightningModule with opacus.

    Args:
        max_grad_norm: per-sample clipping bound C (flat clipping over all private parameters).
        noise_multiplier: sigma (noise std ``sigma * C`` on the clipped sum). ``None``: calibrated so that the planned
            steps (``trainer.estimated_stepping_batches``) spend at most ``target_epsilon``.
        target_epsilon: privacy budget; with ``noise_multiplier`` given it is only the budget that stops training.
        target_delta: delta of the reported (epsilon, delta); defaults to 1/N^1.1 for N training examples.
        accountant: ``"prv"`` (Gopi et al. 2021), ``"rdp"`` (Mironov et al. 2019) or ``"gdp"`` (CLT; can
            underestimate epsilon).
        sample_rate: Poisson rate q as a public constant; ``None``: q = B / N (B the loader's ``batch_size``).
        poisson_sampling: Poisson-sample the train loader; ``False`` keeps its fixed batches (epsilon then is an
            approximation, not a guarantee: warning).
        grad_sample_mode: ``"hooks"``, ``"functorch"`` or ``"ghost"`` (ghost clipping: ``training_step`` returns
            the per-sample losses, shape ``[batch]``).
        max_physical_batch_size: split logical batches into chunks of at most this size (virtual steps).
        fix_modules: replace BatchNorm & co. in place before the optimizer is built.
        stop_on_budget: with ``target_epsilon``, stop before the step that would exceed it and refuse to resume a
            spent run.
        secure_mode: cryptographically secure noise and sampling (``torchcsprng``).
        seed: a fixed seed for noise and sampling, for tests only: anyone who knows it (it is in your config) can
            replay the run. ``None``: 128 bits of OS entropy, kept in the secret file.
        private_optimizers: index of the optimizer that touches private data (e.g. a GAN's discriminator).
        allow_mechanism_change: resume a checkpoint trained with another noise multiplier, clipping bound or
            accountant (the accountant composes the histories); refused by default.
        plot: save (and log) ``dp_epsilon.png`` in the log directory at the end (nothing without a logger).
        memoize_accounting: share accounting results between DPSGD instances of this process (many identical
            short runs, e.g. an audit).

    Logged every ``log_every_n_steps``: ``dp/epsilon``, ``dp/delta``, ``dp/noise_multiplier``, ``dp/sample_rate``.
    One DPSGD instance per run: its history is the run's. Subclasses extend :meth:`dp_optimizer_class`,
    :meth:`on_dp_step` and :meth:`log_step`, and use :attr:`train_loader`, :attr:`dp_optimizer`, :meth:`add_teardown`
    and :meth:`derive_seed` (seeds derived from the secret one, which is never exposed).
    """

    state_key_name = "DPSGD"

    def __init__(
        self,
        max_grad_norm: float,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        target_delta: float | None = None,
        accountant: str = "prv",
        sample_rate: float | None = None,
        poisson_sampling: bool = True,
        grad_sample_mode: str = "hooks",
        max_physical_batch_size: int | None = None,
        fix_modules: bool = False,
        stop_on_budget: bool = True,
        secure_mode: bool = False,
        seed: int | None = None,
        private_optimizers: int | Sequence[int] | None = None,
        allow_mechanism_change: bool = False,
        plot: bool = True,
        memoize_accounting: bool = False,
        adjacency: str = "add_remove",
        dataset_size: int | None = None,
        secret_dir: str | None = None,
        log_training_metrics: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.max_grad_norm = number("max_grad_norm", max_grad_norm)
        self.noise_multiplier = number("noise_multiplier", noise_multiplier, allow_zero=True, allow_none=True)
        self.target_epsilon = number("target_epsilon", target_epsilon, allow_none=True)
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("DPSGD needs `noise_multiplier` or `target_epsilon` (to calibrate the noise), got neither.")
        check_rates(target_delta, sample_rate)
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"`accountant` must be one of {ACCOUNTANTS}, got {accountant!r}.")
        if accountant == "gdp":
            rank_zero_warn("DPSGD(accountant='gdp') uses the CLT approximation, which can underestimate epsilon.")
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"`grad_sample_mode` must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}.")
        check_physical_batch_size(max_physical_batch_size)
        check_seed(seed, secure_mode)
        check_secure_mode(secure_mode)
        private_optimizers = private_optimizer_index(private_optimizers)
        adjacency, dataset_size = check_adjacency(adjacency), check_dataset_size(dataset_size)
        if adjacency == "add_remove" and sample_rate is None and dataset_size is None:
            public_rate(1, 1, adjacency)  # raises: under add/remove q must not come from N (names the fix)
        if adjacency == "add_remove" and target_delta is None and dataset_size is None:
            raise ValueError(
                "DPSGD(adjacency='add_remove'): the default delta 1/N^1.1 would publish the private data set size N."
                " Give `target_delta` (e.g. 1e-5), or `dataset_size=<a public figure>` to derive it from."
            )
        self.target_delta = None if target_delta is None else float(target_delta)
        self.accountant = accountant
        self.fixed_sample_rate = None if sample_rate is None else float(sample_rate)
        self.poisson_sampling = bool(poisson_sampling)
        self.grad_sample_mode = grad_sample_mode
        self.max_physical_batch_size = max_physical_batch_size
        self.fix_modules = bool(fix_modules)
        self.stop_on_budget = bool(stop_on_budget)
        self.secure_mode = bool(secure_mode)
        self.seed = seed
        self.private_optimizers = private_optimizers
        self.allow_mechanism_change = bool(allow_mechanism_change)
        self.plot = bool(plot)
        self.adjacency, self.dataset_size = adjacency, dataset_size
        self.secret_dir = None if secret_dir is None else str(secret_dir)
        self.log_training_metrics = check_metric_names(log_training_metrics)
        self._module: LightningModule | None = None
        self.log_guard: Any = None  # drops metrics logged from training_step (fit-time)
        self._warned_dropped: set[str] = set()
        self._unverified: str | None = None

        # run state (public; saved in ``state_dict``)
        self.ledger = EpsilonLedger(accountant, memoize=memoize_accounting, adjacency=adjacency)
        self.effective_noise_multiplier: float | None = self.noise_multiplier
        self.sample_rate: float | None = None  # q of the latest step
        self.expected_batch_size: float | None = None  # the public divisor B (global)
        self.delta: float | None = self.target_delta
        self.num_samples: int | None = None  # N of the latest loader (private under add/remove: never published)
        self.public_rate: PublicRate | None = None  # q, steps per epoch, default delta from public figures
        self.run_id: str | None = None
        self.secret_path: str | None = None
        self.budget_checkpoint_path: str | None = None
        self._loaded: dict[str, Any] | None = None
        # fit-time objects (never saved)
        self._seed: int | None = None
        self._loader: PoissonDataLoader | None = None
        self._batch_rate = 0.0  # q per Lightning batch without accumulation
        self._hooks: PerSampleHooks | None = None
        self._dp_optimizer: DPOptimizer | None = None
        self._private_index = 0
        self._generator: torch.Generator | None = None
        self._secure_rng: torch.Generator | None = None
        self._planned = math.inf
        self._plan: tuple[float, float] | None = None
        self._budget_steps: int | None = None
        self._steps_this_batch = 0
        self._restore: list[Callable[[], None]] = []
        self._sync_off = contextlib.ExitStack()
        self._last_log_steps: list[int] = []

    # ------------------------------------------------------------------ public API
    @property
    def history(self) -> list[tuple[float, float, int]]:
        """opacus-format accountant history ``[(noise_multiplier, sample_rate, steps), ...]``."""
        return self.ledger.history

    @property
    def steps(self) -> int:
        """DP steps taken so far (across resumes)."""
        return self.ledger.steps

    def get_epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at ``delta`` (default: the run's delta), by :attr:`ledger` (its mechanism)."""
        delta = self.delta if delta is None else delta
        if delta is None:
            if not self.history:
                return 0.0
            raise ValueError("No delta known yet: pass `delta` or set `target_delta`.")
        return self.ledger.epsilon(float(delta), curve=delta == self.delta)

    @property
    def public_batch(self) -> PublicBatch | None:
        """The public batch constants (B, q, physical chunk size, adjacency) once known, for modules and callbacks
        (:mod:`plpriv.privacy.contract`); ``None`` before ``on_train_start``."""
        if self.expected_batch_size is None or self.sample_rate is None:
            return None
        return PublicBatch(float(self.expected_batch_size), float(self.sample_rate), self.max_physical_batch_size,
                           self.adjacency)

    # ------------------------------------------------------------------ for subclasses (fit-time objects)
    @property
    def train_loader(self) -> PoissonDataLoader | None:
        """The Poisson loader built from the user's train loader (``None`` before ``setup`` or without Poisson
        sampling). Read-only: the loader's sampler holds secret state; use its ``dataset``, not its batches."""
        return self._loader

    @property
    def dp_optimizer(self) -> DPOptimizer | None:
        """The opacus optimizer in place of the private optimizer, from ``on_train_start`` until the fit ends."""
        return self._dp_optimizer

    def add_teardown(self, undo: Callable[[], None]) -> None:
        """Call ``undo`` when the fit ends (``teardown`` or an exception), the last added first: e.g. to remove a
        wrapper a subclass installed on the module for this fit."""
        self._restore.append(undo)

    def derive_seed(self, *parts: int | str) -> int:
        """A seed derived from the run's secret seed and public ``parts`` (e.g. a tag, the step and a participant),
        known from ``on_train_start`` on: every rank and a resumed run derive the same one. It is as secret as the
        noise: never log or store it. The secret seed itself is not exposed."""
        if self._seed is None:
            raise RuntimeError("DPSGD.derive_seed: no secret seed (before on_train_start, or secure_mode=True).")
        return seeding.derive_seed(self._seed, *parts)

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_trainer(self, trainer, pl_module)
        if self.secret_dir is not None:
            check_secret_dir(trainer, self.secret_dir)
        warn_fixed_seed(self.seed)
        if self.secure_mode and self._secure_rng is None:
            self._secure_rng = secure_generator()
        if self.fix_modules:
            fix_modules(pl_module, log=rank_zero_info)
        if self.grad_sample_mode != "ghost":
            check_loss_modules(pl_module)
        if self.poisson_sampling:
            self._restore.append(wrap_train_dataloader(trainer, lambda dl: self._make_poisson_loader(trainer, dl)))
        else:
            rank_zero_warn(
                "DPSGD(poisson_sampling=False): the train loader's fixed-size batches do not satisfy the Poisson"
                " sampling the accountant assumes, so the reported epsilon is an approximation, not a guarantee."
            )

    def _make_poisson_loader(self, trainer: Trainer, loader: Any) -> PoissonDataLoader:
        if isinstance(loader, PoissonDataLoader):
            return loader
        check_poisson_source(loader)
        support = sampler_support(loader)
        self.public_rate = public_rate(int(loader.batch_size), len(loader.dataset) if support is None else len(support),
                                       self.adjacency, self.fixed_sample_rate, self.dataset_size)
        self._loader = PoissonDataLoader.from_data_loader(
            loader, seed=seeding.derive_seed(self._seed or 0, "sample"), rank=trainer.global_rank,
            world_size=trainer.world_size, generator=self._secure_rng, sample_rate=self.public_rate.sample_rate,
            num_batches=self.public_rate.steps_per_epoch,
        )
        if self._dp_optimizer is not None:  # reloaded during training (reload_dataloaders_every_n_epochs)
            self._set_rate(trainer)
            self._replan(trainer, spent="stop")
        return self._loader

    # ------------------------------------------------------------------ hooks & optimizer
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._hooks is not None:  # re-entry: a previous fit that died before teardown
            self._hooks.cleanup()
        optimizers = trainer.strategy.optimizers
        index = self._private_index = private_optimizer(optimizers, self.private_optimizers)
        private = {id(p) for group in optimizers[index].param_groups for p in group["params"] if p.requires_grad}
        roots = private_roots(pl_module, private)
        validate_modules(roots)
        self._hooks = PerSampleHooks(roots, mode=self.grad_sample_mode, max_grad_norm=self.max_grad_norm,
                                     forbid_accumulation=self.poisson_sampling)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        check_resumed_privately(self, trainer, self._loaded is not None)
        if not self.secure_mode:
            self._seed, self.run_id = resolve_seed(trainer, self.seed, self.run_id, self.secret_dir)
            if self.seed is None and self.secret_dir is not None:
                self.secret_path = save_secret(trainer, self.secret_dir, self.run_id, self._seed)
        if self.poisson_sampling:
            loader = self._loader
            if loader is None or not any(dl is loader for dl in flat_train_loaders(trainer)):
                raise RuntimeError(
                    "DPSGD's Poisson loader is not the train loader Lightning uses; was `train_dataloader` replaced?"
                )
            if not self.secure_mode:  # the seed is known only now (secret file next to the restored checkpoint)
                loader.sampler.seed = seeding.derive_seed(self._seed, "sample")
            if self._loaded and self._loaded.get("loader") is not None:
                loader.load_state_dict(self._loaded["loader"])
        self._set_rate(trainer)
        self.delta = run_delta(self.delta, self.public_rate)  # type: ignore[arg-type]
        self._planned = float(trainer.estimated_stepping_batches)
        sigma = noise_multiplier_for(self, trainer, self._planned)
        self.effective_noise_multiplier = sigma
        self._loaded = None

        original = trainer.strategy.optimizers[self._private_index]
        device = next((p.device for g in original.param_groups for p in g["params"]), torch.device("cpu"))
        self._generator = self._secure_rng if self.secure_mode else torch.Generator(device=device)
        self._reseed_noise()
        dp_optimizer = self.dp_optimizer_class(trainer)(
            optimizer=original, noise_multiplier=sigma, max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.expected_batch_size / trainer.world_size,  # type: ignore[operator]
            loss_reduction="mean", generator=self._generator, secure_mode=self.secure_mode,
        )
        dp_optimizer.attach_step_hook(self.on_dp_step)
        self._dp_optimizer = replace_optimizer(trainer, self._private_index, dp_optimizer)
        self._replan(trainer)
        if isinstance(trainer.strategy.model, DistributedDataParallel):
            # opacus' DistributedDPOptimizer all-reduces the noised gradient; DDP's own all-reduce would be wasted
            self._sync_off.enter_context(trainer.strategy.model.no_sync())
        self.log_guard, undo = guard_training_logs(pl_module, self.log_training_metrics)
        self._restore.append(undo)
        if pl_module.automatic_optimization:
            self._restore.append(wrap_training_step(self, trainer, pl_module))
        self._module = pl_module
        self._tell_module(pl_module)
        rank_zero_info(start_line(self))
        if self.log_training_metrics:
            rank_zero_warn(f"DPSGD: {list(self.log_training_metrics)} logged from training_step are published as"
                           " asked (log_training_metrics): they are NOT covered by epsilon.")

    def _tell_module(self, pl_module: LightningModule | None) -> None:
        """The module's side of the public-batch contract (:mod:`plpriv.privacy.contract`)."""
        if pl_module is not None and isinstance(pl_module, PrivateTrainingAware):
            pl_module.configure_private_training(self.public_batch)

    def dp_optimizer_class(self, trainer: Trainer) -> type[DPOptimizer]:
        """Extension point: the opacus optimizer class (flat clipping); subclasses may return a subclass of it."""
        return get_optimizer_class(clipping="flat", distributed=trainer.world_size > 1,
                                   grad_sample_mode=self.grad_sample_mode)

    def _set_rate(self, trainer: Trainer) -> None:
        """q, N and the public divisor B of the loader in use (per Lightning batch)."""
        poisson = self._loader if self.poisson_sampling else None
        if self.poisson_sampling and poisson is None:
            raise RuntimeError("DPSGD: no Poisson loader yet (`setup` did not wrap `train_dataloader`).")
        self._batch_rate, self.num_samples, self.expected_batch_size = loader_constants(trainer, poisson)
        if poisson is None:  # fixed-size batches: q from the public figures too
            self.public_rate = public_rate(int(self.expected_batch_size), self.num_samples, self.adjacency,
                                           self.fixed_sample_rate, self.dataset_size)
            self._batch_rate = self.public_rate.sample_rate
        if self._dp_optimizer is not None:
            self._dp_optimizer.expected_batch_size = self.expected_batch_size / trainer.world_size
        self.sample_rate = self._step_rate(trainer)
        if self._dp_optimizer is not None:
            self._tell_module(self._module)

    def _step_rate(self, trainer: Trainer) -> float:
        return min(1.0, self._batch_rate * trainer.accumulate_grad_batches)

    def _replan(self, trainer: Trainer, spent: str = "raise") -> None:
        """Steps left in the budget at the current (sigma, q), re-planned whenever the rate changes; with none left,
        ``spent="raise"`` refuses to train, ``"stop"`` stops before the next epoch (checkpoint + message)."""
        sigma, rate = float(self.effective_noise_multiplier), self._step_rate(trainer)  # type: ignore[arg-type]
        self.sample_rate = rate
        if self._plan == (sigma, rate):
            return
        self._plan, self._budget_steps = (sigma, rate), None
        self._budget_steps = budget_end(self, trainer, sigma, rate, self._planned, spent)
        if self._budget_steps == self.steps:  # spent="stop" and no step left
            stop_for_budget(self, trainer)

    def _reseed_noise(self) -> None:
        """The noise of step t comes from a generator seeded by (secret seed, t): resume needs no generator state."""
        if not self.secure_mode and self._generator is not None:
            self._generator.manual_seed(seeding.derive_seed(self._seed, "noise", self.steps))

    def on_dp_step(self, optimizer: DPOptimizer) -> None:
        """Extension point, opacus' step hook: runs after clipping and noise, before the inner optimizer step (as
        opacus' accountant hook), once per private step. Records the step in the ledger and reseeds the next step's
        noise; an override must call ``super().on_dp_step(optimizer)`` first."""
        self.ledger.record(optimizer.noise_multiplier, min(1.0, self._batch_rate * optimizer.accumulated_iterations))
        self._reseed_noise()

    # ------------------------------------------------------------------ per step
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._dp_optimizer is None:
            return
        self._steps_this_batch = 0
        if self.poisson_sampling and trainer.accumulate_grad_batches != 1:
            raise ValueError(f"DPSGD(poisson_sampling=True) cannot accumulate {trainer.accumulate_grad_batches}"
                             " batches per step: use DPSGD(max_physical_batch_size=...) instead.")
        self._replan(trainer)  # no-op unless the rate changed (accumulation scheduler)
        if self._hooks is not None:
            n = batch_size_of(batch)
            self._hooks.batch_size = n if n >= 0 else None

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        if optimizer is not self._dp_optimizer:
            return
        self._steps_this_batch += 1
        if self._steps_this_batch > 1:
            raise ValueError(
                "DPSGD: the private optimizer stepped twice on one batch. Each step on the same Poisson batch is"
                " another Gaussian release of the same sample, which the accountant would count as an independent"
                " subsampled step (under-reporting epsilon). Step the private optimizer once per batch."
            )
        if self._budget_steps is not None and self.steps >= self._budget_steps:
            raise RuntimeError(
                f"DPSGD: step {self.steps + 1} would exceed the privacy budget epsilon={self.target_epsilon}; the"
                " trainer did not stop (min_steps / min_epochs?). Refusing to take the step."
            )
        self._hooks.fill_missing_grad_samples(self._dp_optimizer.params)  # type: ignore[union-attr]

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._dp_optimizer is None:
            return
        self._hooks.check_no_stale_activations()  # type: ignore[union-attr]
        self._warn_dropped_metrics()
        if should_update_logs(trainer):
            self.log_step(trainer, pl_module)
        if self._budget_steps is not None and self.steps >= self._budget_steps and not trainer.should_stop:
            # all ranks count the same steps against the same broadcast budget; the reduction makes it explicit
            if trainer.strategy.reduce_boolean_decision(True, all=True):
                stop_for_budget(self, trainer)

    def _warn_dropped_metrics(self) -> None:
        new = sorted(self.log_guard.dropped - self._warned_dropped) if self.log_guard is not None else []
        if new:
            self._warned_dropped.update(new)
            rank_zero_warn(
                f"DPSGD: dropped {new} logged from training_step: statistics of the private batch are not covered by"
                " epsilon. Publish them knowingly with DPSGD(log_training_metrics=[...]) (the run then says they are"
                " not covered), or log them from validation."
            )

    def note_unverified_independence(self, module: str) -> None:
        """The first-step probe could not tell whether examples are independent (the step's randomness is not the
        global RNG's); said once. Called by the training-step wrapper."""
        if self._unverified is None:
            self._unverified = module
            rank_zero_warn(
                f"DPSGD: could not verify that `{module}.training_step` treats the examples of a batch independently"
                " (it draws randomness the global RNG does not control, so two identical passes differ). Make sure"
                " no layer or loss mixes examples: DP-SGD's sensitivity bound assumes it."
            )

    def log_step(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Extension point: logs ``dp/*`` after a private step, at the steps Lightning keeps (``log_every_n_steps``).
        An override may log more with ``pl_module.log`` (call ``super().log_step(trainer, pl_module)``)."""
        pl_module.log_dict(dp_metrics(self), on_step=True, on_epoch=False, batch_size=1)
        if trainer.is_global_zero:  # the history is the same on every rank; epsilon is precomputed by the ledger
            pl_module.log("dp/epsilon", self.get_epsilon(), on_step=True, on_epoch=False, batch_size=1,
                          rank_zero_only=True)
            self._last_log_steps = [*self._last_log_steps[-1:], self.steps]
            gap = self._last_log_steps[-1] - self._last_log_steps[0] if len(self._last_log_steps) == 2 else 0
            self.ledger.prefetch(gap or max(trainer.log_every_n_steps, 1), float(self.effective_noise_multiplier),
                                 float(self.sample_rate), float(self.delta), self._planned)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ end, teardown
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._dp_optimizer is None or not self.history:
            return
        rank_zero_info(summary(self))
        if self.secret_path is not None and trainer.is_global_zero:  # training ended: nothing left to resume
            Path(self.secret_path).unlink(missing_ok=True)
            self.secret_path = None
        if self.plot:  # artefacts go to the log directory, or nowhere without a logger
            save_epsilon_plot(self, trainer)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._undo()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._undo()

    def _undo(self) -> None:
        if self._module is not None and isinstance(self._module, PrivateTrainingAware):
            self._module.configure_private_training(None)
        self._module, self.log_guard = None, None
        self._sync_off.close()
        if self._hooks is not None:
            self._hooks.cleanup()
            self._hooks = None
        while self._restore:
            self._restore.pop()()
        if self._dp_optimizer is not None:
            clear_per_sample_state(self._dp_optimizer.params)
        self._dp_optimizer, self._plan = None, None
        self.ledger.close()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Public state only: no seed, no generator state, no sampled indices (see the module docstring)."""
        return public_state(self, self._loader)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_same_mechanism(self, state_dict)
        sigma = state_dict.get("noise_multiplier")
        self.ledger.load_state_dict(state_dict["accountant"])
        if sigma is not None:
            self.effective_noise_multiplier = sigma
        self.sample_rate = state_dict.get("sample_rate")
        self.expected_batch_size = state_dict.get("expected_batch_size")
        if self.target_delta is None:
            self.delta = state_dict.get("delta")
        self.run_id = state_dict.get("run_id")
        self._loaded = dict(state_dict)
        self._plan = None

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._dp_optimizer is None and not self.history:
            return
        checkpoint[PRIVACY_RECORD_KEY] = privacy_record(self)
