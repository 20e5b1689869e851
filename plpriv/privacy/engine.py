"""The DP engine: one private run's sampling, mechanism step, accounting, budget, secret and public record (no
Lightning imports).

Plain objects in, plain objects out. The user's ``DataLoader`` becomes a :class:`PoissonDataLoader` whose rate,
steps per epoch and default delta come from public figures only (:mod:`plpriv.privacy.adjacency`); the private
sub-modules get opacus' per-sample hooks (:class:`PerSampleHooks`); the user's optimizer becomes the mechanism's
opacus optimizer (:mod:`plpriv.privacy.mechanisms`); every private step is recorded in the mechanism's
:class:`EpsilonLedger`; :meth:`DPEngine.plan` says how many steps the budget allows; :meth:`DPEngine.record` and
:meth:`DPEngine.state_dict` say, publicly, what ran. The secret seed (noise, sampling, masks) never leaves the engine:
:meth:`DPEngine.derive_seed` hands out derived seeds, and the seed is written only to a private ``secret_dir``.

:class:`plpriv.callbacks.DPSGD` maps Lightning's hooks onto it; a plain training loop can drive it the same way.
Collectives come in as a :class:`World` (rank, world size, ``broadcast`` from rank zero); messages go to the
``info`` / ``warn`` callables (rank zero only, under DDP).
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from plpriv.privacy.adjacency import PublicRate, public_rate
from plpriv.privacy.arguments import (
    check_physical_batch_size,
    check_public_size,
    check_rates,
    check_secure_mode,
    check_seed,
    number,
    secure_generator,
)
from plpriv.privacy.accounting import ACCOUNTANTS
from plpriv.privacy.budget import BudgetPlan
from plpriv.privacy.contract import PublicBatch
from plpriv.privacy.ledger import EpsilonLedger
from plpriv.privacy.mechanisms import GaussianMechanism, Mechanism
from plpriv.privacy.participation import Participation
from plpriv.privacy.per_sample import GRAD_SAMPLE_MODES, PerSampleHooks
from plpriv.privacy.poisson import PoissonDataLoader, sampler_support
from plpriv.privacy.secret_file import read_secret, secret_path, write_secret
from plpriv.privacy.world import World
from plpriv.utils import seeding

__all__ = ["DPEngine", "World"]


class DPEngine:
    """One differentially private training run (arguments as :class:`plpriv.callbacks.DPSGD`'s)."""

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
        stop_on_budget: bool = True,
        secure_mode: bool = False,
        seed: int | None = None,
        allow_mechanism_change: bool = False,
        memoize_accounting: bool = False,
        adjacency: str = "add_remove",
        dataset_size: int | None = None,
        mechanism: Mechanism | None = None,
        info: Callable[[str], None] = lambda message: None,
        warn: Callable[[str], None] = warnings.warn,
    ) -> None:
        self.max_grad_norm = number("max_grad_norm", max_grad_norm)
        self.noise_multiplier = number("noise_multiplier", noise_multiplier, allow_zero=True, allow_none=True)
        self.target_epsilon = number("target_epsilon", target_epsilon, allow_none=True)
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("DPSGD needs `noise_multiplier` or `target_epsilon` (to calibrate the noise), got neither.")
        check_rates(target_delta, sample_rate)
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"`accountant` must be one of {ACCOUNTANTS}, got {accountant!r}.")
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"`grad_sample_mode` must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}.")
        check_physical_batch_size(max_physical_batch_size)
        check_seed(seed, secure_mode)
        check_secure_mode(secure_mode)
        if mechanism is not None and not isinstance(mechanism, Mechanism):
            raise TypeError(f"`mechanism` must be a plpriv.privacy.mechanisms.Mechanism, got {type(mechanism)!r}.")
        if mechanism is not None and mechanism.needs_per_sample_gradients and grad_sample_mode == "ghost":
            raise ValueError(f"{type(mechanism).__name__} needs per-sample gradients, which ghost clipping never forms:"
                             " use grad_sample_mode='hooks' or 'functorch'.")
        self.adjacency, self.dataset_size = check_public_size(adjacency, dataset_size, sample_rate, target_delta)
        if mechanism is not None:
            mechanism.check_run(bool(poisson_sampling), self.adjacency, bool(secure_mode))
        if accountant == "gdp":
            warn("DPSGD(accountant='gdp') uses the CLT approximation, which can underestimate epsilon.")
        self.target_delta = None if target_delta is None else float(target_delta)
        self.accountant = accountant
        self.fixed_sample_rate = None if sample_rate is None else float(sample_rate)
        self.poisson_sampling = bool(poisson_sampling)
        self.grad_sample_mode = grad_sample_mode
        self.max_physical_batch_size = max_physical_batch_size
        self.stop_on_budget = bool(stop_on_budget)
        self.secure_mode = bool(secure_mode)
        self.seed = seed
        self.allow_mechanism_change = bool(allow_mechanism_change)
        self.mechanism = GaussianMechanism() if mechanism is None else mechanism
        self.info, self.warn = info, warn

        # run state (public; in state_dict)
        self.ledger = EpsilonLedger(accountant, memoize=memoize_accounting, adjacency=self.adjacency,
                                    mechanism=self.mechanism)
        self.effective_noise_multiplier: float | None = self.noise_multiplier
        self.sample_rate: float | None = None  # q of the latest step
        self.expected_batch_size: float | None = None  # the public divisor B (global)
        self.delta: float | None = self.target_delta
        self.num_samples: int | None = None  # N of the latest loader (private under add/remove: never published)
        self.public_rate: PublicRate | None = None  # q, steps per epoch, default delta from public figures
        self.run_id: str | None = None
        self.secret_path: str | None = None
        self.budget = BudgetPlan(self)
        # fit-time objects (never saved)
        self.loader: PoissonDataLoader | None = None
        self.hooks: PerSampleHooks | None = None
        self.optimizer: DPOptimizer | None = None
        self.loaded: dict[str, Any] | None = None  # the checkpoint's state until the run starts
        self._seed: int | None = None
        self._batch_rate = 0.0  # q per loader batch (without accumulation)
        self._accumulate = 1  # loader batches per optimizer step (fixed-size batches only)
        self._generator: torch.Generator | None = None
        self._secure_rng: torch.Generator | None = secure_generator() if self.secure_mode else None

    # ------------------------------------------------------------------ accounting
    @property
    def history(self) -> list[tuple[float, float, int]]:
        """opacus-format accountant history ``[(noise_multiplier, sample_rate, steps), ...]``."""
        return self.ledger.history

    @property
    def steps(self) -> int:
        """Private steps taken so far (across resumes)."""
        return self.ledger.steps

    def get_epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at ``delta`` (default: the run's delta), by the mechanism's accountant."""
        delta = self.delta if delta is None else delta
        if delta is None:
            if not self.history:
                return 0.0
            raise ValueError("No delta known yet: pass `delta` or set `target_delta`.")
        return self.ledger.epsilon(float(delta), curve=delta == self.delta)

    @property
    def public_batch(self) -> PublicBatch | None:
        """The public batch constants for modules and callbacks (:mod:`plpriv.privacy.contract`)."""
        if self.expected_batch_size is None or self.sample_rate is None:
            return None
        per_step = float(self.expected_batch_size) * self._accumulate  # opacus divides by B x accumulated batches
        return PublicBatch(per_step, float(self.sample_rate), self.max_physical_batch_size, self.adjacency)

    def derive_seed(self, *parts: int | str) -> int:
        """A seed derived from the secret seed and public ``parts``: as secret as the noise, never log or store it."""
        if self._seed is None:
            raise RuntimeError("DPSGD.derive_seed: no secret seed (before on_train_start, or secure_mode=True).")
        return seeding.derive_seed(self._seed, *parts)

    # ------------------------------------------------------------------ the secret
    def resolve_seed(self, world: World, resuming: bool, secret_dir: str | None) -> None:
        """The run's seed: the user's, else the resumed run's from ``secret_dir``, else 128 bits of fresh OS entropy
        (agreed by all ranks). Without a kept secret a resumed run draws fresh noise: same epsilon and steps."""
        if self.secure_mode:
            return
        seed, note, lost = self.seed, "", False
        if world.is_zero and seed is None:
            if self.run_id is not None and secret_dir is not None and resuming:
                seed = read_secret(secret_dir, self.run_id)
                if seed is None:
                    note = (f"DPSGD: no secret file {secret_path(secret_dir, self.run_id)}: continuing with fresh noise"
                            " and sampling (accounting unchanged; not bit-identical to an uninterrupted run).")
            lost = resuming and self.steps > 0 and seed is None
            if seed is None:
                seed = seeding.fresh_seed()
        run_id = self.run_id or uuid.uuid4().hex
        seed, self.run_id, lost = world.broadcast((seed, run_id, lost))
        if lost and self.mechanism.needs_kept_secret:  # every rank raises (the flag was broadcast)
            raise ValueError(
                f"DPSGD: {type(self.mechanism).__name__} adds noise correlated across steps; resuming with fresh noise"
                " would be a second release that its epsilon does not cover. Resume with the run's kept secret"
                " (DPSGD(secret_dir=...) from the start of the run), or start a new run.")
        self._seed = int(seed)  # type: ignore[arg-type]
        if note:
            self.warn(note)
        if self.loader is not None:  # the sampler's seed is known only now
            self.loader.sampler.seed = self.derive_seed("sample")

    @staticmethod
    def check_secret_dir(secret_dir: str, artefact_dirs: Sequence[str]) -> None:
        """Refuse a secret folder inside an artefact folder (checkpoints, logs, the root dir): those get copied and
        published, and whoever holds the seed replays the noise and the batches."""
        target = os.path.realpath(secret_dir)
        for d in artefact_dirs:
            root = os.path.realpath(d)
            if target == root or target.startswith(root.rstrip(os.sep) + os.sep):
                raise ValueError(
                    f"DPSGD(secret_dir={secret_dir!r}) is inside the run's artefact folder {d!r}, which gets copied"
                    " and published with the checkpoints. Give a private path outside it (e.g. ~/.plpriv/secrets), or"
                    " secret_dir=None (nothing kept; a resumed run draws fresh noise, same epsilon)."
                )

    def keep_secret(self, secret_dir: str, world: World) -> None:
        """Write the seed to ``secret_dir`` (rank zero, mode 0600) for exact resume (checked by
        :meth:`check_secret_dir` before training)."""
        if self.secure_mode or self.seed is not None or self._seed is None or not world.is_zero:
            return
        self.secret_path = str(write_secret(secret_dir, self.run_id, self._seed))  # type: ignore[arg-type]
        self.info(f"DPSGD: the noise and sampling secret is in {self.secret_path} (owner-only, outside the run"
                  " folder; it makes resume exact and is deleted when training ends).")

    def forget_secret(self) -> None:
        """Training ended: delete the kept secret (nothing left to resume)."""
        if self.secret_path is not None:
            Path(self.secret_path).unlink(missing_ok=True)
            self.secret_path = None

    # ------------------------------------------------------------------ data
    def poisson_loader(self, loader: DataLoader, world: World) -> PoissonDataLoader:
        """The Poisson version of the user's loader: q, steps per epoch and delta from public figures only."""
        support = sampler_support(loader)
        n = len(loader.dataset) if support is None else len(support)  # type: ignore[arg-type]
        self.public_rate = public_rate(int(loader.batch_size), n, self.adjacency,  # type: ignore[arg-type]
                                       self.fixed_sample_rate, self.dataset_size)
        seed = self.derive_seed("sample") if self._seed is not None else 0  # reseeded once the seed is known
        self.loader = PoissonDataLoader.from_data_loader(
            loader, seed=seed, rank=world.rank, world_size=world.world_size, generator=self._secure_rng,
            sample_rate=self.public_rate.sample_rate, num_batches=self.public_rate.steps_per_epoch,
        )
        return self.loader

    def set_rate(self, loader: DataLoader | None, world_size: int, accumulate: int) -> None:
        """q per batch, N and the public divisor B of the Poisson loader, else of the user's fixed-size ``loader``;
        the step's q (``accumulate`` batches per step, fixed batches only)."""
        if self.poisson_sampling:
            if self.loader is None:
                raise RuntimeError("DPSGD: no Poisson loader yet (`setup` did not wrap `train_dataloader`).")
            self._batch_rate, self.num_samples = self.loader.sample_rate, len(self.loader.dataset)  # type: ignore
            self.expected_batch_size = float(self.loader.batch_size)
        else:
            if not isinstance(loader, DataLoader) or loader.batch_size is None:
                raise ValueError("DPSGD needs exactly one train DataLoader with a `dataset` and a `batch_size`.")
            self.num_samples = len(loader.dataset)  # type: ignore[arg-type]
            self.expected_batch_size = float(loader.batch_size * world_size)
            self.public_rate = public_rate(int(self.expected_batch_size), self.num_samples, self.adjacency,
                                           self.fixed_sample_rate, self.dataset_size)
            self._batch_rate = self.public_rate.sample_rate
        if self.optimizer is not None:
            self.optimizer.expected_batch_size = self.expected_batch_size / world_size
        self._accumulate = int(accumulate)
        self.sample_rate = self.step_rate(accumulate)

    def step_rate(self, accumulate: int) -> float:
        return min(1.0, self._batch_rate * accumulate)

    # ------------------------------------------------------------------ per-sample gradients, optimizer
    def attach(self, roots: Sequence[tuple[str, nn.Module]]) -> PerSampleHooks:
        """opacus' per-sample hooks on the private sub-modules (replacing a previous fit's)."""
        if self.hooks is not None:
            self.hooks.cleanup()
        self.hooks = PerSampleHooks(roots, mode=self.grad_sample_mode, max_grad_norm=self.max_grad_norm,
                                    forbid_accumulation=self.poisson_sampling)
        return self.hooks

    def start(self, optimizer: Optimizer, optimizer_class: type[DPOptimizer], planned_steps: float, world: World,
              on_step: Callable[[DPOptimizer], None], participation: Participation | None = None) -> DPOptimizer:
        """Delta, the mechanism's plan (``participation``: the fixed-batch loader's schema), sigma (the user's, the
        resumed run's, or calibrated for ``planned_steps``), then the mechanism's opacus optimizer in place of
        ``optimizer``; ``on_step`` runs after every private step's noise."""
        if self.delta is None:
            if self.public_rate is None or self.public_rate.default_delta is None:
                raise ValueError("DPSGD: give `target_delta`: no public data set size to derive it from.")
            self.delta = self.public_rate.default_delta
            self.info(f"DPSGD: `target_delta` not given; delta = 1/N^1.1 = {self.delta:.3g} for the public N.")
        if self.public_rate is not None and self.public_rate.default_delta is not None and (
                self.delta >= self.public_rate.default_delta ** (1 / 1.1)):
            self.warn(f"DPSGD: delta = {self.delta:.3g} >= 1/N allows leaking a record.")
        self.budget.planned = float(planned_steps)
        steps_per_epoch = participation.steps_per_epoch if participation is not None else (
            self.public_rate.steps_per_epoch if self.public_rate is not None else 1)
        if participation is not None and self.steps % participation.steps_per_epoch:
            # Lightning restarts a plain DataLoader at its first batch when resuming mid-epoch (batch_idx goes on):
            # the examples of the epoch's first batches would take part twice within b steps
            raise ValueError(
                f"DPSGD: resuming at step {self.steps}, inside an epoch of {participation.steps_per_epoch} steps:"
                " Lightning restarts the train loader at its first batch, so those examples would take part twice"
                " in one epoch, which the participation schema does not cover. Resume from an end-of-epoch"
                " checkpoint (e.g. ModelCheckpoint(save_on_train_epoch_end=True), or `--ckpt_path last`).")
        self.mechanism.plan(planned_steps, steps_per_epoch, participation)  # type: ignore[arg-type]
        self.effective_noise_multiplier = self.budget.noise_multiplier(world)
        self.loaded = None
        device = next((p.device for g in optimizer.param_groups for p in g["params"]), torch.device("cpu"))
        self._generator = self._secure_rng if self.secure_mode else torch.Generator(device=device)
        self._reseed_noise()
        self.optimizer = self.mechanism.optimizer_class(optimizer_class)(
            optimizer=optimizer, noise_multiplier=self.effective_noise_multiplier, max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.expected_batch_size / world.world_size,  # type: ignore[operator]
            loss_reduction="mean", generator=self._generator, secure_mode=self.secure_mode,
        )
        self.mechanism.bind(self.optimizer, self, world.rank, world.world_size)
        self.optimizer.attach_step_hook(on_step)
        return self.optimizer

    def record_step(self, optimizer: DPOptimizer) -> None:
        """One private step taken (opacus' step hook, after clipping and noise): into the ledger; the next step's
        noise generator is seeded by (secret seed, step), so resume needs no generator state."""
        self.ledger.record(optimizer.noise_multiplier, min(1.0, self._batch_rate * optimizer.accumulated_iterations))
        self._reseed_noise()

    def _reseed_noise(self) -> None:
        if not self.secure_mode and self._generator is not None and self._seed is not None:
            self._generator.manual_seed(self.derive_seed("noise", self.steps))

    def close(self) -> None:
        """End of a fit: hooks removed, per-sample state cleared, the accountant's thread stopped."""
        if self.hooks is not None:
            self.hooks.cleanup()
            self.hooks = None
        if self.optimizer is not None:
            for p in self.optimizer.params:
                for attr in ("summed_grad", "grad_sample", "_norm_sample"):
                    if hasattr(p, attr):
                        delattr(p, attr)
        self.optimizer = None
        self.budget.reset()
        self.ledger.close()

    # ------------------------------------------------------------------ public record and state
    def record(self) -> dict[str, Any]:
        """The public record of how the weights were trained (the checkpoint's ``plpriv_privacy``)."""
        return {
            "mechanism": self.mechanism.name,
            "trained_privately": True,
            "adjacency": self.adjacency,
            "accountant": self.accountant,
            "epsilon": self.get_epsilon() if self.delta is not None else None,
            "delta": self.delta,
            "steps": self.steps,
            "noise_multiplier": self.effective_noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "sample_rate": self.sample_rate,
            "expected_batch_size": self.expected_batch_size,
            "poisson_sampling": self.poisson_sampling,
            "target_epsilon": self.target_epsilon,
            **{k: v for k, v in self.mechanism.record().items() if k != "mechanism"},
        }

    def state_dict(self) -> dict[str, Any]:
        """Public state only: accountant history, mechanism constants, run id and the loader's position; no seed,
        no generator state, no sampled indices."""
        return {
            "accountant": self.ledger.state_dict(),
            "noise_multiplier": self.effective_noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "sample_rate": self.sample_rate,
            "expected_batch_size": self.expected_batch_size,
            "delta": self.delta,
            "run_id": self.run_id,
            "loader": self.loader.state_dict() if self.loader is not None else None,  # (epoch, batches consumed)
            **self.mechanism.record(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: refuses another mechanism (sigma, C, accountant, adjacency, the mechanism's constants) unless
        ``allow_mechanism_change``."""
        accountant = state["accountant"]
        changes = self.mechanism.changes(state)
        kind = state.get("mechanism", "sparsified-gaussian" if "keep_fraction" in state else "dp-sgd")
        if kind != self.mechanism.name:
            changes.append(f"mechanism {kind!r} -> {self.mechanism.name!r}")
        if accountant.get("mechanism", self.accountant) != self.accountant:
            changes.append(f"accountant {accountant.get('mechanism')!r} -> {self.accountant!r}")
        if accountant.get("adjacency", "add_remove") != self.adjacency:
            changes.append(f"adjacency {accountant.get('adjacency', 'add_remove')!r} -> {self.adjacency!r}")
        sigma = state.get("noise_multiplier")
        if self.noise_multiplier is not None and accountant["history"] and sigma is not None and (
                sigma != self.noise_multiplier):
            changes.append(f"noise_multiplier {sigma} -> {self.noise_multiplier}")
        clip = state.get("max_grad_norm")
        if clip is not None and clip != self.max_grad_norm:
            changes.append(f"max_grad_norm {clip} -> {self.max_grad_norm}")
        if changes and not self.allow_mechanism_change:
            raise ValueError(
                f"DPSGD: the checkpoint was trained with another mechanism ({'; '.join(changes)}). Resume with the"
                " checkpoint's settings, or set DPSGD(allow_mechanism_change=True) to continue knowingly (the"
                " accountant then composes both parts of the history)."
            )
        self.ledger.load_state_dict(accountant)
        self.mechanism.resume(state)
        if sigma is not None:
            self.effective_noise_multiplier = sigma
        self.sample_rate = state.get("sample_rate")
        self.expected_batch_size = state.get("expected_batch_size")
        if self.target_delta is None:
            self.delta = state.get("delta")
        self.run_id = state.get("run_id")
        self.loaded = dict(state)
        self.budget.reset()

    def restore_loader(self) -> None:
        """Continue the Poisson loader where the checkpoint left it (mid-epoch resume)."""
        if self.loader is not None and self.loaded and self.loaded.get("loader") is not None:
            self.loader.load_state_dict(self.loaded["loader"])
