"""``plpriv audit``: empirical epsilon lower bounds for DP-SGD from many final models (final-model threat model).

For every setting (each theoretical epsilon in ``epsilons``, plus ``noise_off``: noise multiplier 0) the runner

1. trains ``crafting.shadow_out`` shadow models on the training set D only (the crafting split);
2. builds the canaries: ``mislabeled`` (a held-out image with the label the shadow models find least likely),
   ``blank`` (all ``-1``, least-likely label), ``in_distribution`` (a held-out image, true label) and ``crafted``
   (a held-out image with its least-likely label, then ``crafting.rounds`` rounds of: train ``crafting.shadow_in``
   models on D + {current canary}, optimise the input with :func:`plpriv.privacy.canaries.craft_canary`);
3. trains ``reference_models + eval_models`` audit models; in model i every canary is included independently with
   probability 1/2 (seeded), so one model audits every canary. This is a valid audit of each canary: the other
   canaries' inclusion is independent of its own, and a mixture over neighbouring pairs is as private as each pair;
4. scores every final model: black-box ``loss`` / ``margin`` of each canary, white-box projection of the parameters
   on the canary's loss gradient (direction from the crafting split's shadow models);
5. per canary and score picks the threshold on the reference models (:func:`plpriv.privacy.audit.select_threshold`)
   and bounds epsilon on the evaluation models (:func:`plpriv.privacy.audit.audit_scores`); the black-box row uses
   whichever of loss / margin won on the reference models (chosen before looking at the evaluation models).

All training goes through ``lightning.Trainer.fit`` with :class:`plpriv.callbacks.DPSGD` (``target_epsilon``
calibrates the noise exactly as for a user; ``noise_off`` passes ``noise_multiplier=0``), with a fixed
initialisation by default (``fixed_init``: the DP guarantee holds for every data-independent initialisation, and
fixing it removes variance the audit cannot use, as in Nasr et al. 2023). Models train in parallel processes
(``workers``, spawn), each finished model is saved at once (``<out_dir>/<setting>/<split>/<index>.pt``, written
atomically), so an interrupted audit resumes without retraining anything, and more models can be added later by
raising the counts. ``<out_dir>/report.json``, ``report.md`` and ``audit.png`` hold the results.

Accounting is memoised across the models of a process (``DPSGD(memoize_accounting=True)``: all models of a setting
share one DP-SGD history, and a PRV accountant call costs up to a second); the values are unchanged. IN and OUT
models share every public constant of the mechanism (q, the divisor B, sigma, C, steps, delta): q is passed to
DPSGD as a constant, and the report lists any constant that differs across models as a problem.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from plpriv.callbacks.dp_sgd import DPSGD
from plpriv.privacy.audit import audit_counts, audit_scores, select_threshold
from plpriv.utils.seeding import derive_seed
from plpriv.privacy.canaries import (
    CANARY_KINDS,
    SCORE_HIGHER_IS_IN,
    Canary,
    blank_canary,
    craft_canary,
    flat_parameters,
    gradient_direction,
    in_distribution_canary,
    least_likely_label,
    logit_margin_scores,
    loss_scores,
    mislabeled_canary,
    trajectory_direction,
    white_box_scores,
)

__all__ = ["AuditConfig", "CraftingConfig", "build_parser", "main", "run_audit"]

log = logging.getLogger(__name__)
BLACK_BOX_SCORES = ("loss", "margin")
_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class CraftingConfig:
    """Crafted-canary optimisation (per setting).

    Args:
        shadow_out: shadow models trained without any canary (also the reference for canary labels and white-box
            gradient directions).
        shadow_in: shadow models trained with the current crafted canary, per round.
        rounds: crafting rounds (train ``shadow_in`` models with the current input, then optimise it).
        steps: Adam steps on the input per round.
        lr: Adam learning rate on the input (pixels live in [-1, 1]).
        max_change: optional L-infinity bound on the change of the input per round.
        variance_floor: added to the pooled loss variance in the objective's denominator.
    """

    shadow_out: int = 16
    shadow_in: int = 8
    rounds: int = 2
    steps: int = 100
    lr: float = 0.05
    max_change: float | None = None
    variance_floor: float = 0.01


@dataclass
class AuditConfig:
    """An audit of DP-SGD (``plpriv audit -c recipes/audit/digits.yaml``).

    Args:
        model: the LightningModule to audit (trained from the same initial weights when ``fixed_init``).
        data: a LightningDataModule whose ``setup("fit")`` fills ``train_dataset`` (the audited training set D) and
            ``test_dataset`` (or ``val_dataset``: held-out images the canaries are taken from) with ``(x, y)``
            items; its ``batch_size`` B is the DP-SGD divisor and sets q = B / N (N without canaries, for every model).
        out_dir: models, report.json, report.md and audit.png go here; rerunning resumes.
        epsilons: theoretical epsilons to audit (the noise is calibrated by DPSGD's ``target_epsilon``).
        noise_off: also audit with ``noise_multiplier=0`` (sanity: the bound must then be large).
        canaries: any of ``mislabeled``, ``blank``, ``in_distribution``, ``crafted``.
        scores: any of ``loss``, ``margin`` (black-box) and ``white_box``.
        max_epochs: training epochs of every model.
        train_size: use only the first ``train_size`` training examples (quick runs); ``None``: all.
        max_grad_norm, target_delta, accountant, grad_sample_mode: passed to :class:`plpriv.callbacks.DPSGD`.
        fixed_init: every model starts from the same weights (else a seeded re-initialisation per model).
        reference_models: audit models used to choose thresholds (and the black-box score).
        eval_models: audit models the reported bounds are computed on.
        noise_off_models: ``[reference, eval]`` counts for the noise-off setting (default: the counts above).
        crafting: see :class:`CraftingConfig`.
        confidence: joint confidence of the Clopper-Pearson bounds.
        accelerator: Lightning accelerator of every model (tiny models: ``cpu``).
        seed: seeds canary choice, inclusion, DP-SGD sampling/noise and the initialisation.
        workers: parallel training processes (0: train in this process).
        progress: show progress bars.
    """

    model: LightningModule
    data: LightningDataModule
    out_dir: str = "runs/audit"
    epsilons: list[float] = field(default_factory=lambda: [2.0, 4.0, 10.0])
    noise_off: bool = True
    canaries: list[str] = field(default_factory=lambda: list(CANARY_KINDS))
    scores: list[str] = field(default_factory=lambda: ["loss", "margin", "white_box"])
    max_epochs: int = 8
    train_size: int | None = None
    max_grad_norm: float = 1.0
    target_delta: float = 1e-5
    accountant: str = "prv"
    grad_sample_mode: str = "hooks"
    fixed_init: bool = True
    reference_models: int = 80
    eval_models: int = 240
    noise_off_models: list[int] | None = None
    crafting: CraftingConfig = field(default_factory=CraftingConfig)
    confidence: float = 0.95
    accelerator: str = "cpu"
    seed: int = 0
    workers: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.model, LightningModule):
            raise TypeError(f"`model` must be a LightningModule, got {type(self.model).__name__}.")
        if not isinstance(self.data, LightningDataModule):
            raise TypeError(f"`data` must be a LightningDataModule, got {type(self.data).__name__}.")
        self.epsilons = [float(e) for e in self.epsilons]
        bad = [e for e in self.epsilons if not (math.isfinite(e) and e > 0)]
        if bad:
            raise ValueError(f"`epsilons` must be finite and > 0, got {bad}.")
        if len(set(self.epsilons)) != len(self.epsilons):
            raise ValueError(f"`epsilons` has duplicates: {self.epsilons}.")
        if not self.epsilons and not self.noise_off:
            raise ValueError("Nothing to audit: give `epsilons` or set `noise_off: true`.")
        unknown = [c for c in self.canaries if c not in CANARY_KINDS]
        if unknown or not self.canaries or len(set(self.canaries)) != len(self.canaries):
            raise ValueError(f"`canaries` must be distinct names from {CANARY_KINDS}, got {self.canaries}.")
        unknown = [s for s in self.scores if s not in SCORE_HIGHER_IS_IN]
        if unknown or not self.scores:
            raise ValueError(f"`scores` must be names from {sorted(SCORE_HIGHER_IS_IN)}, got {self.scores}.")
        for name in ("max_epochs", "reference_models", "eval_models"):
            _check_int(name, getattr(self, name), 1)
        _check_int("workers", self.workers, 0)
        _check_int("seed", self.seed, 0)
        if self.train_size is not None:
            _check_int("train_size", self.train_size, 2)
        if self.noise_off_models is not None:
            if len(self.noise_off_models) != 2:
                raise ValueError(f"`noise_off_models` must be [reference, eval], got {self.noise_off_models}.")
            for v in self.noise_off_models:
                _check_int("noise_off_models", v, 1)
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"`max_grad_norm` must be > 0, got {self.max_grad_norm}.")
        if not 0 < self.target_delta < 1:
            raise ValueError(f"`target_delta` must be in (0, 1), got {self.target_delta}.")
        if not 0 < self.confidence < 1:
            raise ValueError(f"`confidence` must be in (0, 1), e.g. 0.95, got {self.confidence}.")
        c = self.crafting
        if "crafted" in self.canaries:
            _check_int("crafting.shadow_in", c.shadow_in, 1)
            _check_int("crafting.rounds", c.rounds, 1)
            _check_int("crafting.steps", c.steps, 1)
        _check_int("crafting.shadow_out", c.shadow_out, 1)
        if not c.lr > 0:
            raise ValueError(f"`crafting.lr` must be > 0, got {c.lr}.")

    def settings(self) -> list[tuple[str, float | None]]:
        """``(name, target_epsilon)``; ``None`` marks the noise-off setting."""
        out: list[tuple[str, float | None]] = [(f"eps{e:g}", e) for e in self.epsilons]
        if self.noise_off:
            out.append(("noise_off", None))
        return out

    def counts(self, setting: str) -> tuple[int, int]:
        if setting == "noise_off" and self.noise_off_models is not None:
            return int(self.noise_off_models[0]), int(self.noise_off_models[1])
        return self.reference_models, self.eval_models


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
    return int(value)


# Everything that changes what a saved model means; the rest (counts, epsilons, workers, ...) may change on resume.
_FINGERPRINT_KEYS = (
    "canaries", "max_epochs", "train_size", "max_grad_norm", "target_delta", "accountant", "grad_sample_mode",
    "fixed_init", "crafting", "accelerator", "seed",
)


def _describe(obj: Any) -> dict[str, Any]:
    """Class path and hyper-parameters of a module / datamodule: ``hparams``, else the attributes named like its
    constructor's arguments (plain values only)."""
    hp = getattr(obj, "hparams", None)
    if hp:
        items = dict(hp)
    else:
        names = inspect.signature(type(obj).__init__).parameters
        items = {k: getattr(obj, k) for k in names if k != "self" and hasattr(obj, k)}
    plain = {k: v for k, v in items.items() if isinstance(v, (int, float, str, bool, type(None), list, tuple, dict))}
    return {"class": f"{type(obj).__module__}.{type(obj).__qualname__}", **json.loads(json.dumps(plain, default=str))}


def _describe_callable(fn: Any) -> Any:
    """A process-independent description of an optimizer factory (classes by name, plain keyword values)."""
    if fn is None:
        return None
    classes = [a for a in (getattr(fn, "func", fn), *getattr(fn, "args", ())) if isinstance(a, type)]
    keywords = {k: v for k, v in getattr(fn, "keywords", {}).items() if isinstance(v, (int, float, str, bool, type(None)))}
    return {"classes": [f"{c.__module__}.{c.__qualname__}" for c in classes], **keywords}


def _fingerprint(cfg: AuditConfig) -> dict[str, Any]:
    fp = {k: (asdict(v) if k == "crafting" else v) for k in _FINGERPRINT_KEYS for v in [getattr(cfg, k)]}
    return {
        "format": _FORMAT_VERSION,
        "model": _describe(cfg.model),
        "optimizer": _describe_callable(getattr(cfg.model, "optimizer_factory", None)),
        "data": _describe(cfg.data),
        **fp,
    }


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence per-model Lightning/DPSGD chatter (hundreds of short fits); warnings that matter are re-raised."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
        warnings.filterwarnings("ignore", message=".*Trying to infer the `batch_size`.*")
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        warnings.filterwarnings("ignore", message=".*Using a non-full backward hook.*")
        warnings.filterwarnings("ignore", message=".*`validation_step` but have no `val_dataloader`.*")
        warnings.filterwarnings("ignore", message=".*treespec.*")  # torch/lightning deprecation chatter
        warnings.filterwarnings("ignore", message=r".*DPSGD\(seed=.*replayable.*")  # the audit seeds its runs
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


# ----------------------------------------------------------------------------------------------------------------
# Data


def _stack(dataset: Dataset | None, name: str) -> tuple[Tensor, Tensor]:
    if dataset is None or len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError(f"The datamodule's `{name}` is empty; the audit needs it (see AuditConfig.data).")
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        x, y = dataset.tensors[0], dataset.tensors[1]
    else:
        items = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
        x = torch.stack([torch.as_tensor(it[0]) for it in items])
        y = torch.as_tensor([int(it[1]) for it in items])
    if y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"`{name}` must yield (input, integer label) items, got inputs {tuple(x.shape)} labels {tuple(y.shape)}.")
    return x.float().contiguous(), y.long().contiguous()


class _TrajectoryRecorder(Callback):
    """Flat parameters before every training step (at most ``max_snapshots``, evenly strided): the reference
    trajectories the white-box direction is summed over."""

    def __init__(self, max_snapshots: int = 200) -> None:
        self.max_snapshots = max_snapshots
        self.stride = 1
        self.snapshots: list[Tensor] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        total = trainer.estimated_stepping_batches
        self.stride = max(1, math.ceil(total / self.max_snapshots)) if math.isfinite(total) else 1

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.stride == 0:
            self.snapshots.append(flat_parameters(pl_module))


class _AuditData(LightningDataModule):
    """D (+ the included canaries) as one shuffled DataLoader; DPSGD turns it into Poisson batches."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int) -> None:
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=True)


# ----------------------------------------------------------------------------------------------------------------
# Training jobs (run in worker processes, or in this process when workers == 0)


@dataclass
class _Job:
    path: str
    target_epsilon: float | None  # None: noise off
    extra_x: Tensor  # [k, C, H, W] canaries included in this model's training set
    extra_y: Tensor
    included: list[str]
    dp_seed: int
    init_seed: int | None  # None: fixed initialisation
    meta: dict[str, Any]
    record_trajectory: bool = False


_STATE: dict[str, Any] = {}


def _init_worker(state: dict[str, Any], memoize: bool = True) -> None:
    """Process initializer: shared data, the initial model, and the DPSGD / Trainer settings."""
    torch.set_num_threads(1)
    _STATE.clear()
    _STATE.update(state)
    _STATE["root_dir"] = tempfile.mkdtemp(prefix="plpriv_audit_")
    if memoize:  # lives as long as the worker process
        stack = contextlib.ExitStack()
        stack.enter_context(_quiet_lightning())
        _STATE["stack"] = stack


def _reinitialize(model: torch.nn.Module, seed: int) -> None:
    """Seeded fresh initialisation through each layer's ``reset_parameters``."""
    torch.manual_seed(seed)
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            if not hasattr(module, "reset_parameters"):
                raise ValueError(
                    f"`{name}` ({type(module).__name__}) has parameters but no `reset_parameters`; use fixed_init: true."
                )
            module.reset_parameters()


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _train_job(job: _Job) -> dict[str, Any]:
    s = _STATE
    start = time.perf_counter()
    model: LightningModule = copy.deepcopy(s["model"])
    if job.init_seed is not None:
        _reinitialize(model, job.init_seed)
    x = torch.cat([s["train_x"], job.extra_x]) if len(job.extra_x) else s["train_x"]
    y = torch.cat([s["train_y"], job.extra_y]) if len(job.extra_y) else s["train_y"]
    if job.target_epsilon is None:
        dpsgd = DPSGD(noise_multiplier=0.0, **s["dp_kwargs"], seed=job.dp_seed)
    else:
        dpsgd = DPSGD(target_epsilon=job.target_epsilon, **s["dp_kwargs"], seed=job.dp_seed)
    recorder = _TrajectoryRecorder() if job.record_trajectory else None
    trainer = Trainer(
        max_epochs=s["max_epochs"],
        accelerator=s["accelerator"],
        devices=1,
        callbacks=[dpsgd] + ([recorder] if recorder is not None else []),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10**9,  # no per-step epsilon logging; the final epsilon is read below
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=s["root_dir"],
    )
    trainer.fit(model, datamodule=_AuditData(x, y, s["batch_size"]))
    model.eval()
    with torch.no_grad():
        hx, hy = s["heldout_x"], s["heldout_y"]
        device = next(model.parameters()).device
        acc = float((model(hx.to(device)).argmax(1).cpu() == hy).float().mean()) if len(hy) else float("nan")
    meta = {
        **job.meta,
        "included": list(job.included),
        "noise_multiplier": float(dpsgd.effective_noise_multiplier),
        "expected_batch_size": float(dpsgd.expected_batch_size),
        "max_grad_norm": float(dpsgd.max_grad_norm),
        "sample_rate": float(dpsgd.sample_rate),
        "steps": int(dpsgd.steps),
        "delta": float(dpsgd.delta),
        "epsilon": float(dpsgd.get_epsilon()),
        "num_samples": int(dpsgd.num_samples),
        "heldout_accuracy": acc,
        "train_seconds": time.perf_counter() - start,
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    saved: dict[str, Any] = {"state_dict": state, "meta": meta}
    if recorder is not None:
        saved["trajectory"] = torch.stack(recorder.snapshots) if recorder.snapshots else None
    _atomic_save(saved, Path(job.path))
    return meta


def _load_model_file(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # a torn / foreign file: retrain it
        return None


class _Pool:
    """Runs jobs in ``workers`` spawned processes (or in-process), skipping jobs whose file already exists."""

    def __init__(self, state: dict[str, Any], workers: int, progress: bool) -> None:
        self.state, self.workers, self.progress = state, workers, progress
        self.executor: ProcessPoolExecutor | None = None
        self.trained = 0
        self.reused = 0
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _Pool:
        if self.workers > 0:
            self.executor = ProcessPoolExecutor(
                self.workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(self.state,)
            )
        else:
            _init_worker(self.state, memoize=False)
            self._stack.enter_context(_quiet_lightning())
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self._stack.close()
        if self.executor is not None:
            # on an error or Ctrl-C do not wait for queued models; finished ones are already on disk
            self.executor.shutdown(wait=exc_type is None, cancel_futures=True)

    def run(self, jobs: Sequence[_Job], desc: str) -> list[dict[str, Any]]:
        """Metadata of every job, in order; finished models are loaded, the others trained."""
        results: list[dict[str, Any] | None] = [None] * len(jobs)
        todo = []
        for i, job in enumerate(jobs):
            saved = _load_model_file(Path(job.path))
            if saved is not None:
                results[i] = saved["meta"]
                self.reused += 1
            else:
                todo.append(i)
        bar = _progress(len(jobs), desc, self.progress, initial=len(jobs) - len(todo))
        try:
            if self.executor is None:
                for i in todo:
                    results[i] = _train_job(jobs[i])
                    self.trained += 1
                    bar.update(1)
            else:
                futures: dict[Future, int] = {self.executor.submit(_train_job, jobs[i]): i for i in todo}
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        results[futures[fut]] = fut.result()
                        self.trained += 1
                        bar.update(1)
        finally:
            bar.close()
        return results  # type: ignore[return-value]


def _progress(total: int, desc: str, enabled: bool, initial: int = 0) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


# ----------------------------------------------------------------------------------------------------------------
# The audit


_seed = derive_seed


def _load_models(template: LightningModule, paths: Sequence[str]) -> list[LightningModule]:
    models = []
    for p in paths:
        m = copy.deepcopy(template)
        m.load_state_dict(torch.load(p, map_location="cpu", weights_only=False)["state_dict"])
        m.eval()
        models.append(m)
    return models


@dataclass
class _Setting:
    name: str
    target_epsilon: float | None
    dir: Path
    canaries: list[Canary] = field(default_factory=list)
    crafted_x: Tensor | None = None
    crafted_label: int | None = None
    craft_history: list[dict[str, Any]] = field(default_factory=list)
    shadow_out_paths: list[str] = field(default_factory=list)


def run_audit(cfg: AuditConfig) -> dict[str, Any]:
    """Run (or resume) the audit described by ``cfg``; returns the report (also written to ``cfg.out_dir``)."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_fingerprint(cfg, out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only contend with the workers (crafting, scoring)
    try:
        return _run_audit(cfg, out)
    finally:
        torch.set_num_threads(threads)


def _run_audit(cfg: AuditConfig, out: Path) -> dict[str, Any]:

    # data: D, the held-out pool, the sampling rate
    data = cfg.data
    data.setup("fit")
    train_x, train_y = _stack(getattr(data, "train_dataset", None), "train_dataset")
    if cfg.train_size is not None:
        if cfg.train_size > len(train_y):
            raise ValueError(f"`train_size` {cfg.train_size} exceeds the {len(train_y)} training examples.")
        train_x, train_y = train_x[: cfg.train_size], train_y[: cfg.train_size]
    held = getattr(data, "test_dataset", None) or getattr(data, "val_dataset", None)
    held_x, held_y = _stack(held, "test_dataset (or val_dataset)")
    num_classes = int(getattr(data, "num_classes", 0) or int(max(train_y.max(), held_y.max())) + 1)
    batch_size = getattr(data, "batch_size", None)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"The datamodule needs an int `batch_size` (the DP-SGD divisor; q = batch_size / N), got {batch_size!r}.")
    n, k = len(train_y), len(cfg.canaries)
    if math.ceil(n / batch_size) != math.ceil((n + k) / batch_size):
        raise ValueError(
            f"batch_size={batch_size} gives a different number of steps per epoch with and without the {k} canaries"
            f" (ceil({n}/{batch_size}) != ceil({n + k}/{batch_size})): IN and OUT models would differ in more than"
            " the canary. Pick a batch_size for which both are equal."
        )
    # source images of the canaries: distinct held-out examples, fixed for the whole audit
    rng = np.random.default_rng(_seed(cfg.seed, "canary-sources"))
    sources = dict(zip(("mislabeled", "in_distribution", "crafted"), rng.choice(len(held_y), 3, replace=False).tolist()))
    keep = np.setdiff1d(np.arange(len(held_y)), list(sources.values()))
    init_path = out / "init.pt"
    model = cfg.model.cpu()
    if init_path.is_file():  # resume: exactly the initialisation the saved models started from
        model.load_state_dict(torch.load(init_path, map_location="cpu", weights_only=False))
    else:
        try:  # a seeded initialisation, independent of how the config built the module
            _reinitialize(model, _seed(cfg.seed, "init"))
        except ValueError:
            if not cfg.fixed_init:
                raise
        _atomic_save(model.state_dict(), init_path)

    state = {
        "model": model,
        "train_x": train_x,
        "train_y": train_y,
        "heldout_x": held_x[keep],
        "heldout_y": held_y[keep],
        "batch_size": batch_size,
        "max_epochs": cfg.max_epochs,
        "accelerator": cfg.accelerator,
        "dp_kwargs": {  # public constants shared by IN and OUT models (q and delta from N without canaries)
            "max_grad_norm": cfg.max_grad_norm,
            "target_delta": cfg.target_delta,
            "sample_rate": min(1.0, batch_size / n),
            "accountant": cfg.accountant,
            "grad_sample_mode": cfg.grad_sample_mode,
            "plot": False,  # hundreds of identical runs: the figure costs more than training a tiny model
            "memoize_accounting": True,
        },
    }
    settings = [_Setting(name, eps, out / name) for name, eps in cfg.settings()]
    started = time.time()

    def job(st: _Setting, split: str, index: int, canaries: Sequence[Canary], extra: dict[str, Any] | None = None) -> _Job:
        return _Job(
            path=str(st.dir / split / f"{index:05d}.pt"),
            target_epsilon=st.target_epsilon,
            extra_x=torch.stack([c.image for c in canaries]) if canaries else train_x.new_zeros((0, *train_x.shape[1:])),
            extra_y=torch.tensor([c.label for c in canaries], dtype=torch.long),
            included=[c.name for c in canaries],
            dp_seed=_seed(cfg.seed, st.name, split, index),
            init_seed=None if cfg.fixed_init else _seed(cfg.seed, "init", st.name, split, index),
            meta={"setting": st.name, "split": split, "index": index, **(extra or {})},
            record_trajectory=split == "shadow_out",
        )

    with _Pool(state, cfg.workers, cfg.progress) as pool:
        # 1. shadow models without canaries (all settings at once keeps every worker busy)
        jobs = [job(st, "shadow_out", i, []) for st in settings for i in range(cfg.crafting.shadow_out)]
        pool.run(jobs, "shadow models (no canary)")
        for st in settings:
            st.shadow_out_paths = [j.path for j in jobs if j.meta["setting"] == st.name]
        # 2. canaries from the shadow models
        for st in settings:
            shadows = _load_models(model, st.shadow_out_paths)
            st.canaries = _build_fixed_canaries(cfg, st, shadows, held_x, held_y, sources, num_classes)
        # 3. crafting rounds
        if "crafted" in cfg.canaries:
            for r in range(cfg.crafting.rounds):
                round_jobs = []
                for st in settings:
                    canary = Canary("crafted", "crafted", st.crafted_x, st.crafted_label)  # type: ignore[arg-type]
                    round_jobs += [job(st, f"shadow_in_r{r}", i, [canary]) for i in range(cfg.crafting.shadow_in)]
                pool.run(round_jobs, f"shadow models (crafting round {r + 1}/{cfg.crafting.rounds})")
                for st in settings:
                    _craft_round(cfg, st, r, model, [j.path for j in round_jobs if j.meta["setting"] == st.name])
            for st in settings:
                st.canaries.append(
                    Canary("crafted", "crafted", st.crafted_x, st.crafted_label,  # type: ignore[arg-type]
                           {"source_index": sources["crafted"], "rounds": cfg.crafting.rounds})
                )
                st.canaries.sort(key=lambda c: cfg.canaries.index(c.name))
        for st in settings:
            _atomic_save({"canaries": st.canaries, "history": st.craft_history}, st.dir / "canaries.pt")
        # 4. audit models
        audit_jobs = []
        for st in settings:
            n_ref, n_eval = cfg.counts(st.name)
            for i in range(n_ref + n_eval):
                bits = np.random.default_rng(_seed(cfg.seed, st.name, "inclusion", i)).integers(0, 2, len(st.canaries))
                chosen = [c for c, b in zip(st.canaries, bits) if b]
                audit_jobs.append(job(st, "models", i, chosen))
        metas = pool.run(audit_jobs, "audit models")
        trained, reused = pool.trained, pool.reused

    # 5. scores and bounds
    report: dict[str, Any] = {
        "config": _fingerprint(cfg)
        | {"epsilons": cfg.epsilons, "noise_off": cfg.noise_off, "confidence": cfg.confidence, "scores": cfg.scores},
        "data": {"train_size": n, "num_classes": num_classes, "batch_size": batch_size, "heldout_size": int(len(keep))},
        "models": {"trained_this_run": trained, "reused": reused, "seconds_this_run": time.time() - started},
        "settings": {},
    }
    for st in settings:
        st_jobs = [j for j in audit_jobs if j.meta["setting"] == st.name]
        st_metas = [m for m in metas if m["setting"] == st.name]
        report["settings"][st.name] = _evaluate(cfg, st, model, st_jobs, st_metas)
    _write_report(cfg, report, settings, out)
    return report


def _check_fingerprint(cfg: AuditConfig, out: Path) -> None:
    path = out / "audit_fingerprint.json"
    fp = json.loads(json.dumps(_fingerprint(cfg), default=str))
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(fp) | set(old) if fp.get(k) != old.get(k))
        if diff:
            raise ValueError(
                f"{out} holds an audit with a different configuration ({', '.join(diff)} changed); its saved models"
                " would not match. Use a new `out_dir` (or delete the old one)."
            )
    else:
        path.write_text(json.dumps(fp, indent=2))


def _build_fixed_canaries(
    cfg: AuditConfig,
    st: _Setting,
    shadows: list[LightningModule],
    held_x: Tensor,
    held_y: Tensor,
    sources: dict[str, int],
    num_classes: int,
) -> list[Canary]:
    # deterministic given the (saved) shadow models, so a resumed audit rebuilds the same canaries
    canaries: list[Canary] = []
    if "mislabeled" in cfg.canaries:
        i = sources["mislabeled"]
        wrong = least_likely_label(shadows, held_x[i])
        if wrong == int(held_y[i]):  # cannot happen for a model that learned anything; keep it a real mislabel
            wrong = (wrong + 1) % num_classes
        canaries.append(mislabeled_canary(held_x[i], int(held_y[i]), num_classes, wrong))
        canaries[-1].info["source_index"] = i
    if "blank" in cfg.canaries:
        shape = list(held_x.shape[1:])
        blank = torch.full(shape, float(held_x.min()))
        canaries.append(blank_canary(shape, least_likely_label(shadows, blank), value=float(held_x.min())))
    if "in_distribution" in cfg.canaries:
        i = sources["in_distribution"]
        canaries.append(in_distribution_canary(held_x[i], int(held_y[i])))
        canaries[-1].info["source_index"] = i
    if "crafted" in cfg.canaries:
        i = sources["crafted"]
        st.crafted_x = held_x[i].clone()
        st.crafted_label = least_likely_label(shadows, held_x[i])
    return canaries


def _craft_round(cfg: AuditConfig, st: _Setting, r: int, template: LightningModule, in_paths: list[str]) -> None:
    """One crafting round: optimise the input against this round's IN and the OUT shadow models (resumable)."""
    path = st.dir / f"crafted_r{r}.pt"
    saved = _load_model_file(path)
    if saved is None:
        c = cfg.crafting
        res = craft_canary(
            st.crafted_x,  # type: ignore[arg-type]
            st.crafted_label,  # type: ignore[arg-type]
            _load_models(template, st.shadow_out_paths),
            _load_models(template, in_paths),
            steps=c.steps,
            lr=c.lr,
            max_change=c.max_change,
            variance_floor=c.variance_floor,
        )
        saved = {
            "image": res.image,
            "label": res.label,
            "objective_start": res.objective[0],
            "objective_end": max(res.objective),
            "gap_start": res.gap[0],
            "gap_end": res.gap[int(np.argmax(res.objective))],
        }
        _atomic_save(saved, path)
    st.crafted_x = saved["image"]
    st.crafted_label = int(saved["label"])
    st.craft_history.append({k: v for k, v in saved.items() if k != "image"} | {"round": r})


def _evaluate(
    cfg: AuditConfig, st: _Setting, template: LightningModule, jobs: list[_Job], metas: list[dict[str, Any]]
) -> dict[str, Any]:
    names = [c.name for c in st.canaries]
    images = torch.stack([c.image for c in st.canaries])
    labels = torch.tensor([c.label for c in st.canaries])
    directions = None
    if "white_box" in cfg.scores:
        trajectories = [torch.load(p, map_location="cpu", weights_only=False).get("trajectory") for p in st.shadow_out_paths]
        if all(t is not None for t in trajectories):
            directions = torch.stack(
                [trajectory_direction(template, trajectories, c.image, c.label, cfg.max_grad_norm) for c in st.canaries]
            )
        else:  # no recorded trajectories: the gradient at the references' final parameters
            shadows = _load_models(template, st.shadow_out_paths)
            directions = torch.stack([gradient_direction(shadows, c.image, c.label) for c in st.canaries])
    scores: dict[str, list[Tensor]] = {s: [] for s in cfg.scores}
    bits = []
    for j in jobs:
        m = _load_models(template, [j.path])[0]
        bits.append([name in j.included for name in names])
        if "loss" in scores:
            scores["loss"].append(loss_scores(m, images, labels))
        if "margin" in scores:
            scores["margin"].append(logit_margin_scores(m, images, labels))
        if "white_box" in scores:
            scores["white_box"].append(white_box_scores(m, directions))  # type: ignore[arg-type]
    inc = np.array(bits, dtype=bool)  # [models, canaries]
    arr = {s: torch.stack(v).numpy().astype(np.float64) for s, v in scores.items()}
    n_ref, n_eval = cfg.counts(st.name)
    is_ref = np.arange(len(jobs)) < n_ref

    # theoretical epsilon and the sanity of the DP-SGD runs (every model must share sigma, q, steps)
    keys = ("noise_multiplier", "sample_rate", "expected_batch_size", "max_grad_norm", "steps", "delta", "epsilon")
    distinct = {key: sorted({m[key] for m in metas}) for key in keys}
    shared = {key: vals[0] for key, vals in distinct.items() if len(vals) == 1}
    problems = [f"{key} differs across models: {vals}" for key, vals in distinct.items() if len(vals) != 1]
    theory = shared.get("epsilon", max(m["epsilon"] for m in metas))
    result: dict[str, Any] = {
        "target_epsilon": st.target_epsilon,
        "theoretical_epsilon": theory,
        "dp": shared,
        "problems": problems,
        "models": {"reference": n_ref, "eval": n_eval},
        "heldout_accuracy": float(np.nanmean([m["heldout_accuracy"] for m in metas])),
        "canaries": {c.name: c.as_dict() for c in st.canaries},
        "crafting": st.craft_history,
        "results": {},
    }
    for k, name in enumerate(names):
        rows: dict[str, Any] = {}
        for s in cfg.scores:
            hi = SCORE_HIGHER_IS_IN[s]
            v = arr[s][:, k]
            ref_in, ref_out = v[is_ref & inc[:, k]], v[is_ref & ~inc[:, k]]
            ev_in, ev_out = v[~is_ref & inc[:, k]], v[~is_ref & ~inc[:, k]]
            row: dict[str, Any] = {"higher_is_in": hi, "eval_in": ev_in.tolist(), "eval_out": ev_out.tolist()}
            if min(len(ref_in), len(ref_out), len(ev_in), len(ev_out)) == 0 or np.unique(np.r_[ref_in, ref_out]).size < 2:
                row["error"] = "a split has no IN or no OUT model (or constant scores): add models"
                rows[s] = row
                continue
            objective = _selection_objective(cfg.target_delta, cfg.confidence)
            t = select_threshold(ref_in, ref_out, cfg.target_delta, cfg.confidence, higher_is_in=hi, objective=objective)
            ref = audit_scores(ref_in, ref_out, t, cfg.target_delta, cfg.confidence, higher_is_in=hi)
            ev = audit_scores(ev_in, ev_out, t, cfg.target_delta, cfg.confidence, higher_is_in=hi)
            row.update(
                audit=ev.as_dict(),
                reference_epsilon=ref.epsilon,
                reference_objective=objective(ref.fp, ref.fn, ref.n_out, ref.n_in),
                max_certifiable=audit_counts(0, 0, len(ev_out), len(ev_in), cfg.target_delta, cfg.confidence).epsilon,
                auc=_auc(ev_in, ev_out, hi),
                exceeds_theory=bool(ev.epsilon > theory),
            )
            rows[s] = row
        bb = [s for s in BLACK_BOX_SCORES if s in rows and "audit" in rows[s]]
        rows["black_box"] = max(bb, key=lambda s: rows[s]["reference_objective"]) if bb else None  # ties: loss first
        result["results"][name] = rows
        for s in cfg.scores:
            if rows[s].get("exceeds_theory"):
                msg = (
                    f"AUDIT VIOLATION in {st.name}: canary {name!r}, score {s!r}: epsilon lower bound"
                    f" {rows[s]['audit']['epsilon']:.3f} > theoretical epsilon {theory:.3f}"
                    f" (FP={rows[s]['audit']['fp']}/{rows[s]['audit']['n_out']},"
                    f" FN={rows[s]['audit']['fn']}/{rows[s]['audit']['n_in']}) - a DP-SGD bug, or a 1-confidence event."
                )
                result["problems"].append(msg)
                warnings.warn(msg, stacklevel=2)
    return result


def _selection_objective(delta: float, confidence: float) -> Any:
    """Threshold choice on the reference models: the Clopper-Pearson epsilon first; where a small reference split
    certifies nothing (0 at every threshold) the GDP mu bound, then Youden's J (TPR - FPR), break the tie instead
    of the smallest candidate. Only the *choice* uses this; the reported bound is Clopper-Pearson on the eval split."""

    @functools.lru_cache(maxsize=None)
    def objective(fp: int, fn: int, n_out: int, n_in: int) -> float:
        r = audit_counts(fp, fn, n_out, n_in, delta, confidence)
        return 1e6 * r.epsilon + 1e3 * r.mu_lower + (1.0 - fp / n_out - fn / n_in)

    return objective


def _auc(s_in: np.ndarray, s_out: np.ndarray, higher_is_in: bool) -> float:
    """P(score of a random IN model is more member-like than a random OUT model's), ties counted 1/2."""
    a, b = (s_in, s_out) if higher_is_in else (-s_in, -s_out)
    diff = a[:, None] - b[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


# ----------------------------------------------------------------------------------------------------------------
# Report


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:.{digits}f}"


def _write_report(cfg: AuditConfig, report: dict[str, Any], settings: list[_Setting], out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=1, default=_json_default))
    lines = [
        "# DP-SGD audit (final model only)",
        "",
        f"Models: {report['config']['model']['class']}; data: {report['config']['data']['class']} "
        f"(N = {report['data']['train_size']}, batch {report['data']['batch_size']}), {cfg.max_epochs} epochs, "
        f"C = {cfg.max_grad_norm:g}, delta = {cfg.target_delta:g}, accountant {cfg.accountant}, "
        f"fixed init: {cfg.fixed_init}. Confidence {cfg.confidence:g} (Clopper-Pearson).",
        f"Trained this run: {report['models']['trained_this_run']}, reused: {report['models']['reused']}.",
        "",
        "epsilon_LB on the evaluation models; threshold (and the black-box score, loss or margin) chosen on the"
        " reference models. `max` is the largest bound the evaluation counts can certify (no error at all).",
        "",
        "| setting | theoretical eps | sigma | canary | black-box eps_LB (score) | white-box eps_LB | GDP eps (bb / wb)"
        " | AUC (bb / wb) | FP/n_out, FN/n_in (bb) | max |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in report["settings"].items():
        for canary, rows in res["results"].items():
            bb = rows.get("black_box")
            b = rows.get(bb, {}) if bb else {}
            w = rows.get("white_box", {})
            ba, wa = b.get("audit", {}), w.get("audit", {})
            lines.append(
                f"| {name} | {_fmt(res['theoretical_epsilon'])} | {_fmt(res['dp'].get('noise_multiplier'), 3)} | {canary} "
                f"| {_fmt(ba.get('epsilon'))} ({bb or '-'}) | {_fmt(wa.get('epsilon'))} "
                f"| {_fmt(ba.get('epsilon_gdp'))} / {_fmt(wa.get('epsilon_gdp'))} "
                f"| {_fmt(b.get('auc'))} / {_fmt(w.get('auc'))} "
                f"| {ba.get('fp', '-')}/{ba.get('n_out', '-')}, {ba.get('fn', '-')}/{ba.get('n_in', '-')} "
                f"| {_fmt(b.get('max_certifiable', w.get('max_certifiable')))} |"
            )
    problems = [p for res in report["settings"].values() for p in res["problems"]]
    lines += ["", "## Sanity", ""]
    lines += [f"- {p}" for p in problems] or ["- every epsilon_LB <= its theoretical epsilon; DP-SGD runs consistent."]
    lines += ["", "Held-out accuracy (mean over audit models): " + ", ".join(
        f"{k} {_fmt(v['heldout_accuracy'], 3)}" for k, v in report["settings"].items())]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plot(cfg, report, out)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Tensor):
        return obj.tolist()
    return str(obj)


def _plot(cfg: AuditConfig, report: dict[str, Any], out: Path) -> None:
    from plpriv.utils.figures import figure, save_and_log_figure

    settings = list(report["settings"])
    canaries = [c for c in cfg.canaries]
    kinds = [s for s in ("black_box", "white_box") if s != "white_box" or "white_box" in cfg.scores]
    ncols = len(canaries) * len(kinds)
    fig = figure(figsize=(2.4 * ncols, 2.0 * len(settings) + 3.0), dpi=90)
    grid = fig.add_gridspec(len(settings) + 1, ncols, height_ratios=[1.0] * len(settings) + [1.5])
    for r, name in enumerate(settings):
        res = report["settings"][name]["results"]
        for ci, canary in enumerate(canaries):
            for ki, kind in enumerate(kinds):
                ax = fig.add_subplot(grid[r, ci * len(kinds) + ki])
                score = res.get(canary, {}).get("black_box") if kind == "black_box" else "white_box"
                row = res.get(canary, {}).get(score or "", {})
                if "eval_in" in row and row["eval_in"] and row["eval_out"]:
                    both = np.r_[row["eval_in"], row["eval_out"]]
                    bins = np.linspace(both.min(), both.max() + 1e-12, 21)
                    ax.hist(row["eval_out"], bins=bins, alpha=0.6, label="OUT", color="tab:blue")
                    ax.hist(row["eval_in"], bins=bins, alpha=0.6, label="IN", color="tab:red")
                    if row.get("audit", {}).get("threshold") is not None:
                        ax.axvline(row["audit"]["threshold"], color="k", lw=0.8, ls="--")
                    eps = row.get("audit", {}).get("epsilon")
                    ax.set_title(f"{name} {canary}\n{score} eps_LB={_fmt(eps)}", fontsize=7)
                ax.tick_params(labelsize=6)
                if r == 0 and ci == 0 and ki == 0 and ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=6)
    ax = fig.add_subplot(grid[len(settings), :])
    finite = [s for s in settings if math.isfinite(report["settings"][s]["theoretical_epsilon"])]
    xs = [report["settings"][s]["theoretical_epsilon"] for s in finite]
    if xs:
        top = max(xs) * 1.1
        ax.plot([0, top], [0, top], color="grey", ls=":", label="eps_LB = theoretical eps")
        for canary in canaries:
            for kind, marker in (("black_box", "o"), ("white_box", "s")):
                ys = []
                for s in finite:
                    rows = report["settings"][s]["results"].get(canary, {})
                    key = rows.get("black_box") if kind == "black_box" else "white_box"
                    ys.append(rows.get(key or "", {}).get("audit", {}).get("epsilon", np.nan))
                ax.plot(xs, ys, marker=marker, label=f"{canary} ({kind.replace('_', '-')})")
        caps = [
            next((row["max_certifiable"] for rows in report["settings"][s]["results"].values()
                  for row in rows.values() if isinstance(row, dict) and "max_certifiable" in row), np.nan)
            for s in finite
        ]
        ax.plot(xs, caps, color="k", ls="--", lw=0.8, marker="_", ms=12, label="max certifiable (eval counts)")
        ax.set(xlabel="theoretical epsilon (DPSGD accountant)", ylabel="epsilon lower bound", xlim=(0, top))
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_and_log_figure(None, fig, "audit", directory=out)


# ----------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> Any:
    """jsonargparse parser of ``plpriv audit`` (``-c/--config`` YAML; unknown keys fail naming the key)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="plpriv audit", description=__doc__.split("\n\n")[0], default_env=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML config (see recipes/audit/)")
    parser.add_class_arguments(AuditConfig, None, fail_untyped=True)
    return parser


def main(args: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``plpriv audit``: parse, run (or resume), print where the report is."""
    import sys

    parser = build_parser()
    argv = list(sys.argv[1:] if args is None else args)
    cfg_ns = parser.parse_args(argv)
    init = parser.instantiate(cfg_ns) if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg_ns)
    fields = {k: init[k] for k in AuditConfig.__dataclass_fields__ if k in init}
    cfg = AuditConfig(**fields)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parser.save(cfg_ns, out / "config.yaml", overwrite=True)
    report = run_audit(cfg)
    print((out / "report.md").read_text())
    print(f"Report: {out / 'report.json'}, {out / 'report.md'}, {out / 'audit.png'}")
    return report
