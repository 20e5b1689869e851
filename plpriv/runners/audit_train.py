"""Training the audit's models: one ``lightning.Trainer.fit`` with :class:`plpriv.callbacks.DPSGD` per model.

Models train in spawned worker processes (or in this process), each finished model is written atomically to its own
file at once, and a job whose file exists is never retrained: an interrupted audit resumes where it stopped. Every
DP-SGD run uses DPSGD's public options only (``sample_rate``: the public q, ``plot=False``,
``memoize_accounting=True``, a per-model ``seed`` derived from the audit's seed); the saved file holds the final
``state_dict`` and public metadata (sigma, q, divisor B, C, steps, delta, epsilon), never a DP seed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.data._utils.collate import default_collate

from plpriv.callbacks.dp_sgd import DPSGD
from plpriv.privacy.canaries import flat_parameters

__all__ = ["Job", "Pool", "atomic_save", "load_file", "pretrain", "quiet_lightning", "reinitialize", "stack_dataset"]


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence per-model Lightning/DPSGD chatter (hundreds of short fits); other warnings still show."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        for message in (
            ".*does not have many workers.*", ".*log_every_n_steps.*", ".*Full backward hook is firing.*",
            ".*Trying to infer the `batch_size`.*", ".*Secure RNG turned off.*", ".*Using a non-full backward hook.*",
            ".*`validation_step` but have no `val_dataloader`.*", ".*treespec.*",
            r".*DPSGD\(seed=.*replayable.*",  # the audit seeds its runs (reproducible, resumable models)
            ".*divide by zero encountered in log.*",  # opacus' PRV accountant at q = 1
        ):
            warnings.filterwarnings("ignore", message=message)
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


# ----------------------------------------------------------------------------------------------------------------
# Data


def stack_dataset(dataset: Dataset | None, name: str) -> tuple[Tensor, Tensor]:
    """``(x, y)`` tensors of a map-style dataset of ``(input, integer label)`` items."""
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


class _Batch(list):
    """A batch fetched at once (``__getitems__``); ``len`` is its number of examples (empty batches stay empty)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        super().__init__(range(len(y)))
        self.x, self.y = x, y


class _FastTensorDataset(Dataset):
    """``(x[i], y[i])`` items; a batch of indices is one tensor index (no per-item Python loop: the 1,000-example
    full batches of the audit otherwise spend a fifth of each step in collation)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, indices: Sequence[int]) -> _Batch:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        return _Batch(self.x[index], self.y[index])


def _collate(batch: Any) -> Any:
    return (batch.x, batch.y) if isinstance(batch, _Batch) else default_collate(batch)


class _AuditData(LightningDataModule):
    """D (+ the included canaries) as one DataLoader of batch size B; DPSGD turns it into Poisson batches."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int) -> None:
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_FastTensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=True,
                          collate_fn=_collate)


class _TrajectoryRecorder(Callback):
    """Flat parameters before every training step (at most ``max_snapshots``, evenly strided): the trajectories the
    white-box direction is summed over."""

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


# ----------------------------------------------------------------------------------------------------------------
# Jobs (run in worker processes, or in this process when workers == 0)


@dataclass
class Job:
    """One model to train: D + ``extra`` canaries, a setting's noise and steps; ``path`` is its file."""

    path: str
    target_epsilon: float | None  # None: noise off
    max_epochs: int
    extra_x: Tensor  # [k, C, H, W] canaries included in this model's training set
    extra_y: Tensor
    included: list[str]
    dp_seed: int
    init_seed: int | None  # None: the shared (fixed or pretrained) initialisation
    meta: dict[str, Any]
    record_trajectory: bool = False


_STATE: dict[str, Any] = {}


def _init_worker(state: dict[str, Any], quiet: bool = True) -> None:
    """Process initializer: shared data, the initial model, and the DPSGD / Trainer settings."""
    torch.set_num_threads(1)
    _STATE.clear()
    _STATE.update(state)
    _STATE["root_dir"] = tempfile.mkdtemp(prefix="plpriv_audit_")
    if quiet:  # lives as long as the worker process
        stack = contextlib.ExitStack()
        stack.enter_context(quiet_lightning())
        _STATE["stack"] = stack


def reinitialize(model: torch.nn.Module, seed: int) -> None:
    """Seeded fresh initialisation through each layer's ``reset_parameters``."""
    torch.manual_seed(seed)
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            if not hasattr(module, "reset_parameters"):
                raise ValueError(
                    f"`{name}` ({type(module).__name__}) has parameters but no `reset_parameters`; use init: fixed."
                )
            module.reset_parameters()


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_file(path: Path | str) -> dict[str, Any] | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # a torn / foreign file: retrain it
        return None


def _train_job(job: Job) -> dict[str, Any]:
    s = _STATE
    start, cpu_start = time.perf_counter(), time.process_time()
    model: LightningModule = copy.deepcopy(s["model"])
    if job.init_seed is not None:
        reinitialize(model, job.init_seed)
    model.train()
    x = torch.cat([s["train_x"], job.extra_x]) if len(job.extra_x) else s["train_x"]
    y = torch.cat([s["train_y"], job.extra_y]) if len(job.extra_y) else s["train_y"]
    noise = {"noise_multiplier": 0.0} if job.target_epsilon is None else {"target_epsilon": job.target_epsilon}
    dpsgd = DPSGD(**noise, **s["dp_kwargs"], seed=job.dp_seed)
    recorder = _TrajectoryRecorder() if job.record_trajectory else None
    trainer = Trainer(
        max_epochs=job.max_epochs,
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
        "train_cpu_seconds": time.process_time() - cpu_start,
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    saved: dict[str, Any] = {"state_dict": state, "meta": meta}
    if recorder is not None:
        saved["trajectory"] = torch.stack(recorder.snapshots) if recorder.snapshots else None
    atomic_save(saved, Path(job.path))
    return meta


class Pool:
    """Runs jobs in ``workers`` spawned processes (or in-process), skipping jobs whose file already exists."""

    def __init__(self, state: dict[str, Any], workers: int, progress: bool) -> None:
        self.state, self.workers, self.progress = state, workers, progress
        self.executor: ProcessPoolExecutor | None = None
        self.trained = 0
        self.reused = 0
        self.cpu_seconds = 0.0  # training CPU time of the models trained this run (all processes)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Pool:
        if self.workers > 0:
            self.executor = ProcessPoolExecutor(
                self.workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(self.state,)
            )
        else:
            _init_worker(self.state, quiet=False)
            self._stack.enter_context(quiet_lightning())
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self._stack.close()
        if self.executor is not None:
            # on an error or Ctrl-C do not wait for queued models; finished ones are already on disk
            self.executor.shutdown(wait=exc_type is None, cancel_futures=True)

    def run(self, jobs: Sequence[Job], desc: str) -> list[dict[str, Any]]:
        """Metadata of every job, in order; finished models are loaded, the others trained."""
        results: list[dict[str, Any] | None] = [None] * len(jobs)
        todo = []
        for i, job in enumerate(jobs):
            saved = load_file(job.path)
            if saved is not None:
                results[i] = saved["meta"]
                self.reused += 1
            else:
                todo.append(i)
        if not jobs:
            return []
        bar = _progress(len(jobs), desc, self.progress, initial=len(jobs) - len(todo))

        def done(i: int, meta: dict[str, Any]) -> None:
            results[i] = meta
            self.trained += 1
            self.cpu_seconds += float(meta.get("train_cpu_seconds", 0.0))
            bar.update(1)

        try:
            if self.executor is None:
                for i in todo:
                    done(i, _train_job(jobs[i]))
            else:
                futures: dict[Future, int] = {self.executor.submit(_train_job, jobs[i]): i for i in todo}
                pending = set(futures)
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        done(futures[fut], fut.result())
        finally:
            bar.close()
        return results  # type: ignore[return-value]


def _progress(total: int, desc: str, enabled: bool, initial: int = 0) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


# ----------------------------------------------------------------------------------------------------------------
# Pretraining (init: pretrained)


def pretrain(
    model: torch.nn.Module, x: Tensor, y: Tensor, epochs: int, lr: float, batch_size: int, seed: int
) -> dict[str, float]:
    """Non-private training of the shared initialisation on a public split (Adam, cross-entropy, seeded shuffles).

    The pretraining examples are disjoint from the audited set D and from the held-out pool the canaries come from;
    the DP guarantee audited afterwards holds for any data-independent initialisation, which a model trained on
    other data is. Returns the final training loss and accuracy on the pretraining split.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    opt.zero_grad(set_to_none=True)  # no stale .grad: DPSGD refuses a gradient without a per-sample gradient
    model.eval()
    with torch.no_grad():
        logits = model(x)
        info = {"loss": float(F.cross_entropy(logits, y)), "accuracy": float((logits.argmax(1) == y).float().mean())}
    model.train()  # as a fresh module: Lightning keeps submodules' modes, and opacus' hooks record in training mode
    return {**info, "examples": float(len(y)), "epochs": float(epochs)}


def inclusion_bits(n_models: int, n_canaries: int, seed: int) -> np.ndarray:
    """``[n_models, n_canaries]`` booleans, each column exactly half True (rounded down), seeded: the balanced
    design of ``canaries_per_model: all`` (each canary IN in half the models, independently of the others)."""
    rng = np.random.default_rng(seed)
    bits = np.zeros((n_models, n_canaries), dtype=bool)
    for k in range(n_canaries):
        bits[rng.permutation(n_models)[: n_models // 2], k] = True
    return bits
