r"""DP-SGD for any LightningModule, built on opacus (Abadi et al. 2016, "Deep Learning with Differential Privacy").

Every step :math:`t` draws a Poisson batch :math:`B_t` (each example independently with probability q), clips each
per-sample gradient to norm C and adds Gaussian noise once; the sum is divided by the public batch size B:

.. math::  \tilde g_t = \frac{1}{B}\Big(\sum_{i\in B_t} g_i \min\big(1, \tfrac{C}{\lVert g_i\rVert}\big)
           + \mathcal N(0, \sigma^2 C^2 I)\Big), \qquad q = B / N_{\text{public}}

B is the train loader's ``batch_size`` (a constant the user chose), never a function of the data set size.

The run itself is a :class:`plpriv.privacy.engine.DPEngine` (Lightning-free: Poisson loader, per-sample hooks,
the mechanism's optimizer and accountant, budget, secret, public record); ``mechanism`` chooses the release
(:class:`~plpriv.privacy.mechanisms.GaussianMechanism` by default). This callback is the Lightning adapter:

==========================  ===============================================================================
``setup("fit")``            checks the trainer, swaps BatchNorm & co. (``fix_modules``), wraps the data source's
                            ``train_dataloader`` to return a :class:`~plpriv.privacy.PoissonDataLoader`
``on_fit_start``            validates the private sub-modules and attaches opacus' hooks once (module type and
                            ``state_dict`` keys unchanged)
``on_train_start``          seed, rate, delta, noise calibration, budget; opacus ``DPOptimizer`` (or
                            ``DistributedDPOptimizer`` under DDP) in place of the private optimizer
``on_train_batch_start``    re-plans rate and budget when they changed (dataloader reload, accumulation scheduler)
``on_before_optimizer_step``  one private step per batch, budget guard, per-sample gradient checks
``on_train_batch_end``      stale-activation check, ``dp/*`` logging, budget stop (agreed by all ranks)
``on_save_checkpoint``      a public ``checkpoint["plpriv_privacy"]`` record of the mechanism and epsilon so far
==========================  ===============================================================================

Adjacency (``adjacency``): ``"add_remove"`` (default) keeps the data set size N private: q, delta and the steps
per epoch come from ``sample_rate`` or a public ``dataset_size`` (:mod:`plpriv.privacy.adjacency`); ``"replace_one"``
declares N public and reports the replace-one epsilon (group privacy).

Secrets: no artefact holds the noise or sampling seed, a generator state or sampled indices. Batch ``i`` of epoch
``e`` and the noise of step ``t`` are functions of a secret seed (128 bits of OS entropy) and ``(e, i)`` or ``t``.
By default the seed is kept nowhere (a resumed run draws fresh entropy; same epsilon and steps); ``secret_dir`` (a
private folder outside the run's folders) keeps it for exact resume until training ends.

The privacy boundary (:mod:`plpriv.privacy.contract`): modules are told the public batch constants
(``configure_private_training``); metrics the module logs from ``training_step`` or its other training hooks are
dropped unless named in ``log_training_metrics``; the first step probes that each example's per-sample gradient
depends on that example alone (:mod:`plpriv.privacy.independence`).

Refused before training, with the fix for the layer's type: BatchNorm, ``nn.MultiheadAttention``, LSTM/GRU
(``fix_modules``), 16-bit precision with a GradScaler,
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
from collections.abc import Callable, Sequence
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from opacus.optimizers import DPOptimizer, get_optimizer_class
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from plpriv.callbacks._dp_clients import ClientRounds
from plpriv.callbacks._dp_logging import (
    dp_metrics,
    dropped_metrics_warning,
    save_epsilon_plot,
    should_update_logs,
    start_line,
    summary,
    unverified_independence_warning,
)
from plpriv.callbacks._dp_setup import (
    artefact_dirs,
    budget_checkpoint,
    check_poisson_source,
    check_resumed_privately,
    check_trainer,
    flat_train_loaders,
    private_optimizer,
    replace_optimizer,
    wrap_train_dataloader,
)
from plpriv.callbacks._dp_training_step import batch_size_of, guard_training_logs, wrap_training_step
from plpriv.privacy.arguments import check_metric_names, private_optimizer_index, warn_fixed_seed
from plpriv.privacy.contract import PrivateTrainingAware
from plpriv.privacy.engine import DPEngine, World
from plpriv.privacy.mechanisms import Mechanism
from plpriv.privacy.participation import Participation, participation_of
from plpriv.privacy.poisson import PoissonDataLoader
from plpriv.privacy.validation import check_loss_modules, fix_modules, private_roots, validate_modules

__all__ = ["DPSGD", "PARTICIPANTS", "PRIVACY_RECORD_KEY"]

PARTICIPANTS = ("examples", "clients")
PRIVACY_RECORD_KEY = "plpriv_privacy"  # top-level checkpoint key: what mechanism trained it, epsilon so far


class _Engine:
    """A read-only view of the engine's attribute of the same name (the callback's public API is the engine's)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        return self if obj is None else getattr(obj.engine, self.name)


class DPSGD(Callback):
    r"""Differentially private training (DP-SGD and other mechanisms) of any LightningModule with opacus.

    Args:
        max_grad_norm: per-sample clipping bound C (flat clipping over all private parameters).
        noise_multiplier: sigma (noise std ``sigma * C`` on the clipped sum). ``None``: calibrated so that the planned
            steps (``trainer.estimated_stepping_batches``) spend at most ``target_epsilon``.
        target_epsilon: privacy budget; with ``noise_multiplier`` given it is only the budget that stops training.
        target_delta: delta of the reported (epsilon, delta); defaults to 1/N^1.1 for the public ``dataset_size`` N.
        accountant: ``"prv"`` (Gopi et al. 2021), ``"rdp"`` (Mironov et al. 2019) or ``"gdp"`` (CLT; can
            underestimate epsilon).
        sample_rate: Poisson rate q as a public constant; ``None``: q = B / dataset_size (B the loader's
            ``batch_size``).
        poisson_sampling: Poisson-sample the train loader; ``False`` keeps its fixed batches (epsilon then is an
            approximation, not a guarantee: warning).
        grad_sample_mode: ``"hooks"``, ``"functorch"`` or ``"ghost"`` (ghost clipping: ``training_step`` returns
            the per-sample losses, shape ``[batch]``).
        max_physical_batch_size: split logical batches into chunks of at most this size (virtual steps).
        fix_modules: make the model trainable by opacus in place before the optimizer is built: BatchNorm ->
            GroupNorm, ``nn.MultiheadAttention`` -> ``plpriv.nets.DPMultiheadAttention``, LSTM/GRU/RNN -> opacus'
            DP versions (both with the weights copied exactly), ``inplace=True`` layers -> ``inplace=False``
            (:func:`plpriv.privacy.validation.fix_modules`).
        stop_on_budget: with ``target_epsilon``, stop before the step that would exceed it and refuse to resume a
            spent run.
        secure_mode: cryptographically secure noise and sampling (``torchcsprng``).
        seed: a fixed seed for noise and sampling, for tests only: anyone who knows it (it is in your config) can
            replay the run. ``None``: 128 bits of OS entropy (kept only in ``secret_dir``, if given).
        private_optimizers: index of the optimizer that touches private data (e.g. a GAN's discriminator).
        allow_mechanism_change: resume a checkpoint trained with another noise multiplier, clipping bound,
            accountant, adjacency or mechanism (the accountant composes the histories); refused by default.
        plot: save (and log) ``dp_epsilon.png`` in the log directory at the end (nothing without a logger).
        memoize_accounting: share accounting results between DPSGD instances of this process (many identical
            short runs, e.g. an audit).
        adjacency: ``"add_remove"`` (N private: needs ``sample_rate`` or ``dataset_size``) or ``"replace_one"``
            (N public; the replace-one epsilon is reported).
        dataset_size: a public size of the training set (q = B / dataset_size, delta default 1/dataset_size^1.1).
        secret_dir: a private folder outside the run's folders that keeps the seed for exact resume (deleted when
            training ends); ``None``: kept nowhere.
        log_training_metrics: names of metrics the module logs from its training hooks to publish anyway (not
            covered by epsilon; said at start); all others are dropped.
        mechanism: the release of every private step and its accountant
            (:class:`~plpriv.privacy.mechanisms.GaussianMechanism` by default; e.g.
            :class:`~plpriv.privacy.sparsified_gaussian.SparsifiedMechanism`).
        participants: ``"examples"`` (example-level DP) or ``"clients"`` (client-level DP, federated simulation: the
            train loader yields client ids, the datamodule's ``client_batch(id)`` their data; each client's update
            is its mean gradient, clipped as one participant; needs a mechanism that groups participants, e.g.
            ``SparsifiedMechanism(keep_fraction=1.0)`` for client-level DP-SGD or ``MatrixFactorizationMechanism``).
        assume_independent_examples: run even when the first-step probe cannot verify that each example's gradient
            depends on that example alone (the step draws randomness the probe cannot replay): you assert it.

    Logged every ``log_every_n_steps``: ``dp/epsilon``, ``dp/delta``, ``dp/noise_multiplier``, ``dp/sample_rate``.
    One DPSGD instance per run: its history is the run's. Subclasses extend :meth:`dp_optimizer_class`,
    :meth:`on_dp_step` and :meth:`log_step`, and use :attr:`train_loader`, :attr:`dp_optimizer`, :meth:`add_teardown`
    and :meth:`derive_seed` (seeds derived from the secret one, which is never exposed).
    """


    # the run's constants and public state, read from the engine
    max_grad_norm = _Engine()
    noise_multiplier = _Engine()
    target_epsilon = _Engine()
    target_delta = _Engine()
    accountant = _Engine()
    fixed_sample_rate = _Engine()
    poisson_sampling = _Engine()
    grad_sample_mode = _Engine()
    max_physical_batch_size = _Engine()
    stop_on_budget = _Engine()
    secure_mode = _Engine()
    seed = _Engine()
    allow_mechanism_change = _Engine()
    adjacency = _Engine()
    dataset_size = _Engine()
    mechanism = _Engine()
    ledger = _Engine()
    effective_noise_multiplier = _Engine()
    sample_rate = _Engine()
    expected_batch_size = _Engine()
    delta = _Engine()
    num_samples = _Engine()
    public_rate = _Engine()
    run_id = _Engine()
    secret_path = _Engine()
    history = _Engine()
    steps = _Engine()
    public_batch = _Engine()

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
        mechanism: Mechanism | None = None,
        assume_independent_examples: bool = False,
        participants: str = "examples",
    ) -> None:
        super().__init__()
        if participants not in PARTICIPANTS:
            raise ValueError(f"`participants` must be one of {PARTICIPANTS}, got {participants!r}.")
        if participants == "clients" and not callable(getattr(mechanism, "bind_participants", None)):
            raise ValueError(f"{type(self).__name__}(participants='clients') needs a mechanism that groups each"
                             " client's examples into one clipped update: mechanism=SparsifiedMechanism(keep_fraction="
                             "1.0) for client-level DP-SGD, or MatrixFactorizationMechanism(...).")
        if participants == "clients" and max_physical_batch_size is not None:
            raise ValueError(f"{type(self).__name__}(participants='clients') cannot split batches"
                             f" (max_physical_batch_size={max_physical_batch_size!r}): a client split across two"
                             " chunks would be clipped twice. Use fewer clients per round instead.")
        self.participants = participants
        self.private_optimizers = private_optimizer_index(private_optimizers)
        self.log_training_metrics = check_metric_names(log_training_metrics)
        self.engine = DPEngine(
            max_grad_norm, noise_multiplier=noise_multiplier, target_epsilon=target_epsilon,
            target_delta=target_delta, accountant=accountant, sample_rate=sample_rate,
            poisson_sampling=poisson_sampling, grad_sample_mode=grad_sample_mode,
            max_physical_batch_size=max_physical_batch_size, stop_on_budget=stop_on_budget, secure_mode=secure_mode,
            seed=seed, allow_mechanism_change=allow_mechanism_change, memoize_accounting=memoize_accounting,
            adjacency=adjacency, dataset_size=dataset_size, mechanism=mechanism, info=rank_zero_info,
            warn=rank_zero_warn,
        )
        self.fix_modules = bool(fix_modules)
        self.plot = bool(plot)
        self.assume_independent_examples = bool(assume_independent_examples)
        self.secret_dir = None if secret_dir is None else str(secret_dir)
        self.budget_checkpoint_path: str | None = None
        # fit-time objects (never saved)
        self.log_guard: Any = None  # drops metrics logged from training_step
        self._module: LightningModule | None = None
        self._private_index = 0
        self._steps_this_batch = 0
        self._restore: list[Callable[[], None]] = []
        self._sync_off = contextlib.ExitStack()
        self._last_log_steps: list[int] = []
        self._warned_dropped: set[str] = set()
        self._unverified: str | None = None
        self._clients: ClientRounds | None = None

    @property
    @override
    def state_key(self) -> str:
        """One private-training callback per run: its class name (a checkpoint holds ``callbacks["DPSGD"]``)."""
        return type(self).__qualname__

    # ------------------------------------------------------------------ public API
    def get_epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at ``delta`` (default: the run's delta), by the mechanism's accountant."""
        return self.engine.get_epsilon(delta)

    @property
    def train_loader(self) -> PoissonDataLoader | None:
        """The Poisson loader built from the user's train loader (``None`` before ``setup`` or without Poisson
        sampling). Read-only: the loader's sampler holds secret state; use its ``dataset``, not its batches."""
        return self.engine.loader

    @property
    def dp_optimizer(self) -> DPOptimizer | None:
        """The opacus optimizer in place of the private optimizer, from ``on_train_start`` until the fit ends."""
        return self.engine.optimizer

    def add_teardown(self, undo: Callable[[], None]) -> None:
        """Call ``undo`` when the fit ends (``teardown`` or an exception), the last added first."""
        self._restore.append(undo)

    def derive_seed(self, *parts: int | str) -> int:
        """A seed derived from the run's secret seed and public ``parts`` (e.g. a tag, the step and a participant),
        known from ``on_train_start`` on: every rank and a resumed run derive the same one. It is as secret as the
        noise: never log or store it. The secret seed itself is not exposed."""
        return self.engine.derive_seed(*parts)

    @staticmethod
    def _world(trainer: Trainer) -> World:
        return World(trainer.global_rank, trainer.world_size, lambda value: trainer.strategy.broadcast(value, src=0))

    # ------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.participants == "clients" and not pl_module.automatic_optimization:
            raise ValueError(f"{type(self).__name__}(participants='clients') needs automatic optimization: it builds"
                             " each step's batch from the sampled clients' data.")
        check_trainer(self.engine, trainer, pl_module)
        if self.secret_dir is not None:
            self.engine.check_secret_dir(self.secret_dir, artefact_dirs(trainer))
        warn_fixed_seed(self.seed, rank_zero_warn)
        if self.fix_modules:
            fix_modules(pl_module, log=rank_zero_info)
        if self.grad_sample_mode != "ghost":
            check_loss_modules(pl_module)
        if self.poisson_sampling:
            self._restore.append(wrap_train_dataloader(trainer, lambda dl: self._make_poisson_loader(trainer, dl)))
        elif self.mechanism.amplified_by_sampling:
            rank_zero_warn(
                "DPSGD(poisson_sampling=False): the train loader's fixed-size batches do not satisfy the Poisson"
                " sampling the accountant assumes, so the reported epsilon is an approximation, not a guarantee."
            )

    def _make_poisson_loader(self, trainer: Trainer, loader: Any) -> PoissonDataLoader:
        if isinstance(loader, PoissonDataLoader):
            return loader
        check_poisson_source(loader)
        poisson = self.engine.poisson_loader(loader, self._world(trainer))
        if self.dp_optimizer is not None:  # reloaded during training (reload_dataloaders_every_n_epochs)
            self._set_rate(trainer)
            self._replan(trainer, spent="stop")
        return poisson

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        optimizers = trainer.strategy.optimizers
        index = self._private_index = private_optimizer(optimizers, self.private_optimizers)
        private = {id(p) for group in optimizers[index].param_groups for p in group["params"] if p.requires_grad}
        roots = private_roots(pl_module, private)
        validate_modules(roots)
        self.engine.attach(roots)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        engine, world = self.engine, self._world(trainer)
        check_resumed_privately(trainer, engine.loaded is not None, self.allow_mechanism_change)
        engine.resolve_seed(world, bool(trainer.ckpt_path), self.secret_dir)
        if self.secret_dir is not None:
            engine.keep_secret(self.secret_dir, world)
        if self.poisson_sampling:
            if engine.loader is None or not any(dl is engine.loader for dl in flat_train_loaders(trainer)):
                raise RuntimeError(
                    "DPSGD's Poisson loader is not the train loader Lightning uses; was `train_dataloader` replaced?"
                )
            engine.restore_loader()
        if self.participants == "clients":
            loaders = [engine.loader] if self.poisson_sampling else flat_train_loaders(trainer)
            self._clients = ClientRounds.check(type(self).__name__, trainer, pl_module, loaders[0].dataset)
        self._module = pl_module
        self._set_rate(trainer)
        original = trainer.strategy.optimizers[self._private_index]
        planned = float(trainer.estimated_stepping_batches)
        dp_optimizer = engine.start(original, self.dp_optimizer_class(trainer), planned, world, self.on_dp_step,
                                    None if self.mechanism.amplified_by_sampling else self._participation(trainer, planned))
        # Lightning has no hook to hand the strategy another optimizer after configure_optimizers: its public
        # `optimizers` setter is the way (the user's optimizer is wrapped, not replaced: opacus steps it)
        replace_optimizer(trainer, self._private_index, dp_optimizer)
        self._replan(trainer)
        if isinstance(trainer.strategy.model, DistributedDataParallel):
            # opacus' DistributedDPOptimizer all-reduces the noised gradient; DDP's own all-reduce would be wasted
            self._sync_off.enter_context(trainer.strategy.model.no_sync())
        self.log_guard, undo = guard_training_logs(pl_module, self.log_training_metrics)
        self._restore.append(undo)
        if pl_module.automatic_optimization:
            self._restore.append(wrap_training_step(engine, trainer, pl_module, self.log_guard,
                                                    self.note_unverified_independence))
        if self._clients is not None:  # outermost: ids -> the clients' data, then the DP-wrapped step
            sparsifier = self.mechanism.bind_participants(  # type: ignore[attr-defined]
                dp_optimizer, engine, "clients", trainer.global_rank, trainer.world_size, trainer.world_size > 1)
            self._restore.append(self._clients.wrap(pl_module, sparsifier))
        self._tell_module()
        rank_zero_info(start_line(engine))
        if self.log_training_metrics:
            rank_zero_warn(f"DPSGD: {list(self.log_training_metrics)} logged from the training hooks are published as"
                           " asked (log_training_metrics): they are NOT covered by epsilon.")

    @staticmethod
    def _participation(trainer: Trainer, planned: float) -> Participation | None:
        """The fixed-batch loader's participation schema (streaming mechanisms' sensitivity); ``None`` when the
        run is unbounded or has several train loaders (refused by the mechanisms that need it)."""
        loaders = flat_train_loaders(trainer)
        if len(loaders) != 1 or not math.isfinite(planned) or not isinstance(trainer.num_training_batches, int):
            return None
        per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        return participation_of(loaders[0], per_epoch, max(1, int(planned)))

    def _tell_module(self) -> None:
        """The module's side of the public-batch contract (:mod:`plpriv.privacy.contract`)."""
        if self._module is not None and isinstance(self._module, PrivateTrainingAware):
            self._module.configure_private_training(self.public_batch)

    def dp_optimizer_class(self, trainer: Trainer) -> type[DPOptimizer]:
        """Extension point: the opacus optimizer class (flat clipping) the mechanism builds on."""
        return get_optimizer_class(clipping="flat", distributed=trainer.world_size > 1,
                                   grad_sample_mode=self.grad_sample_mode)

    def _set_rate(self, trainer: Trainer) -> None:
        loaders = flat_train_loaders(trainer)
        self.engine.set_rate(loaders[0] if len(loaders) == 1 else None, trainer.world_size,
                             trainer.accumulate_grad_batches)
        if self.dp_optimizer is not None:
            self._tell_module()

    def _replan(self, trainer: Trainer, spent: str = "raise") -> None:
        """Steps left in the budget at the current (sigma, q); with none left, ``spent="raise"`` refuses to train,
        ``"stop"`` stops before the next epoch (checkpoint + message)."""
        rate = self.engine.step_rate(trainer.accumulate_grad_batches)
        if self.engine.budget.update(rate, trainer.global_step, self._world(trainer), spent):
            self._stop_for_budget(trainer)

    def on_dp_step(self, optimizer: DPOptimizer) -> None:
        """Extension point, opacus' step hook: runs after clipping and noise, before the inner optimizer step, once
        per private step; records the step. An override must call ``super().on_dp_step(optimizer)`` first."""
        self.engine.record_step(optimizer)

    # ------------------------------------------------------------------ per step
    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.dp_optimizer is None:
            return
        self._steps_this_batch = 0
        if self.poisson_sampling and trainer.accumulate_grad_batches != 1:
            raise ValueError(f"DPSGD(poisson_sampling=True) cannot accumulate {trainer.accumulate_grad_batches}"
                             " batches per step: use DPSGD(max_physical_batch_size=...) instead.")
        self._replan(trainer)  # no-op unless the rate changed (accumulation scheduler)
        if self.engine.hooks is not None:
            n = batch_size_of(batch)
            self.engine.hooks.batch_size = n if n >= 0 else None

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        if optimizer is not self.dp_optimizer:
            return
        self._steps_this_batch += 1
        if self._steps_this_batch > 1:
            raise ValueError(
                "DPSGD: the private optimizer stepped twice on one batch. Each step on the same Poisson batch is"
                " another Gaussian release of the same sample, which the accountant would count as an independent"
                " subsampled step (under-reporting epsilon). Step the private optimizer once per batch."
            )
        self.engine.budget.check_step()
        self.engine.hooks.fill_missing_grad_samples(self.dp_optimizer.params)  # type: ignore[union-attr]

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.dp_optimizer is None:
            return
        self.engine.hooks.check_no_stale_activations()  # type: ignore[union-attr]
        self._warn_dropped_metrics()
        if should_update_logs(trainer):
            self.log_step(trainer, pl_module)
        if self.engine.budget.spent and not trainer.should_stop:
            # all ranks count the same steps against the same broadcast budget; the reduction makes it explicit
            if trainer.strategy.reduce_boolean_decision(True, all=True):
                self._stop_for_budget(trainer)

    def _stop_for_budget(self, trainer: Trainer) -> None:
        """Stop the fit after this step: a checkpoint in the budget directory and a warning naming it."""
        trainer.should_stop = True
        self.budget_checkpoint_path = budget_checkpoint(trainer, self.steps)
        rank_zero_warn(
            f"DPSGD: stopping after step {self.steps}: epsilon={self.get_epsilon():.4f} (delta={self.delta:.3g}); the"
            f" next step would exceed the budget epsilon={self.target_epsilon}."
            f" Checkpoint: {self.budget_checkpoint_path}"
        )

    def _warn_dropped_metrics(self) -> None:
        new = sorted(self.log_guard.dropped - self._warned_dropped) if self.log_guard is not None else []
        if new:
            self._warned_dropped.update(new)
            rank_zero_warn(dropped_metrics_warning(new))

    def note_unverified_independence(self, module: str) -> None:
        """The first-step probe could not tell whether examples are independent (two identical passes differ):
        refused, unless the user asserted independence (``assume_independent_examples``; said once)."""
        if not self.assume_independent_examples:
            raise ValueError(unverified_independence_warning(module))
        if self._unverified is None:
            self._unverified = module
            rank_zero_warn(unverified_independence_warning(module) + " Asserted by the user"
                           " (assume_independent_examples=True): not verified.")

    def log_step(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Extension point: logs ``dp/*`` after a private step, at the steps Lightning keeps (``log_every_n_steps``).
        An override may log more with ``pl_module.log`` (call ``super().log_step(trainer, pl_module)``)."""
        pl_module.log_dict(dp_metrics(self.engine), on_step=True, on_epoch=False, batch_size=1)
        if trainer.is_global_zero:  # the history is the same on every rank; epsilon is precomputed by the ledger
            pl_module.log("dp/epsilon", self.get_epsilon(), on_step=True, on_epoch=False, batch_size=1,
                          rank_zero_only=True)
            self._last_log_steps = [*self._last_log_steps[-1:], self.steps]
            gap = self._last_log_steps[-1] - self._last_log_steps[0] if len(self._last_log_steps) == 2 else 0
            self.ledger.prefetch(gap or max(trainer.log_every_n_steps, 1), float(self.effective_noise_multiplier),
                                 float(self.sample_rate), float(self.delta), self.engine.budget.planned)

    # ------------------------------------------------------------------ end, teardown
    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.dp_optimizer is None or not self.history:
            return
        rank_zero_info(summary(self.engine))
        if trainer.is_global_zero:  # training ended: nothing left to resume
            self.engine.forget_secret()
        if self.plot:  # artefacts go to the log directory, or nowhere without a logger
            save_epsilon_plot(self.engine, trainer)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._undo()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._undo()

    def _undo(self) -> None:
        if self._module is not None and isinstance(self._module, PrivateTrainingAware):
            self._module.configure_private_training(None)
        self._module, self.log_guard = None, None
        self._sync_off.close()
        while self._restore:
            self._restore.pop()()
        self.engine.close()

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        """Public state only: no seed, no generator state, no sampled indices (see the module docstring)."""
        return {**self.engine.state_dict(), "participants": self.participants}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("participants", self.participants) != self.participants:
            raise ValueError(f"{type(self).__name__}: the checkpoint was trained with another mechanism (participants"
                             f" {state_dict['participants']!r} -> {self.participants!r}); the accountant cannot compose"
                             " them. Resume with the checkpoint's settings or start a new run.")
        self.engine.load_state_dict(state_dict)

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.dp_optimizer is None and not self.history:
            return
        checkpoint[PRIVACY_RECORD_KEY] = {**self.engine.record(), "participants": self.participants}
