"""Checks that ``plpriv`` runs before any work, so that a finished run is never lost.

* :func:`check_new_run`: ``fit`` never writes into a checkpoint directory that holds another run's checkpoints (the
  recipes use fixed run directories, so that ``--ckpt_path last`` finds them): it resumes that run (``--ckpt_path
  last``) or starts a new one elsewhere (``--trainer.logger.init_args.version NAME``).
* :func:`check_recorded_class` / :func:`check_checkpoint_model`: a checkpoint of another LightningModule class is
  refused (LightningCLI would otherwise take the class from the checkpoint's hyperparameters and train it on this
  config's data).
* :func:`resolve_best`: ``--ckpt_path best`` in a new process (``validate``/``test``/``predict``) reads the best
  checkpoint from the ModelCheckpoint state the fit saved, since the new trainer's callback has seen no fit.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

CLASS_KEY = "_class_path"  # LightningCLI records the module's class here, in checkpoint["hyper_parameters"]


class RunRefusal(RuntimeError):
    """A run refused before any work; ``plpriv`` prints ``plpriv: refusing to <action>: <message>``, exit code 2."""

    action = "run"


class RunExistsError(RunRefusal):
    """``fit`` would overwrite the checkpoints of another run."""

    action = "start a new run"


class CheckpointClassError(RunRefusal):
    """The checkpoint holds another LightningModule class than the config's model."""

    action = "load the checkpoint"


def load_checkpoint(path: str | os.PathLike) -> Any:
    """The checkpoint at ``path`` (memory-mapped when local: large checkpoints are not read whole)."""
    if os.path.isfile(path):
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    from lightning.fabric.utilities.cloud_io import _load

    return _load(path, map_location="cpu")  # remote (fsspec) paths


def checkpoint_dir(trainer: Trainer, callback: ModelCheckpoint) -> str:
    """Where ``callback`` will write (its ``dirpath``, else ``<logger dir>/checkpoints``), as Lightning resolves it."""
    return str(callback._ModelCheckpoint__resolve_ckpt_dir(trainer))  # type: ignore[attr-defined]


def _checkpoints_in(directory: str) -> list[str]:
    fs = get_filesystem(directory)
    if not fs.isdir(directory):
        return []
    return sorted(os.path.basename(str(p)) for p in fs.ls(directory, detail=False) if str(p).endswith(".ckpt"))


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b) if "://" not in a + b else a.rstrip("/") == b.rstrip("/")


def check_new_run(trainer: Trainer, resumed: str | None) -> None:
    """Refuse a ``fit`` whose checkpoint directory already holds checkpoints, unless it resumes one of them.

    ``resumed`` is the checkpoint the fit loads (``--ckpt_path``, resolved; None: a new run). Raises
    :class:`RunExistsError` naming the directory and the two ways out."""
    for callback in [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]:
        directory = checkpoint_dir(trainer, callback)
        found = _checkpoints_in(directory)
        if not found or (resumed is not None and _same_dir(os.path.dirname(str(resumed)), directory)):
            continue
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        if callback.dirpath is not None:
            elsewhere = f"another `dirpath` for that ModelCheckpoint (now {callback.dirpath})"
        elif trainer.loggers:
            run_dir = os.path.dirname(directory.rstrip("/"))
            elsewhere = f"--trainer.logger.init_args.version NAME (checkpoints in {os.path.join(run_dir, 'NAME')})"
        else:
            elsewhere = "--trainer.default_root_dir DIR"
        what = "a new run" if resumed is None else f"continuing {resumed}"
        raise RunExistsError(
            f"{directory} holds the checkpoints of an earlier run ({shown}), which {what} would overwrite. To"
            f" continue that run: --ckpt_path last. To start a new run beside it: {elsewhere}."
        )


def _import_class(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
    return cls if isinstance(cls, type) else None


def _same_class(recorded: str, cls: type) -> bool:
    found = _import_class(recorded)
    return found is cls if found is not None else recorded.rpartition(".")[2] == cls.__qualname__


def _class_refusal(path: str, recorded: str, configured: str) -> CheckpointClassError:
    config = os.path.normpath(os.path.join(os.path.dirname(path), os.pardir, "config.yaml"))  # <run dir>/config.yaml
    trained = f" (-c {config})" if os.path.isfile(config) else ""
    return CheckpointClassError(
        f"{path} holds a {recorded}, but this config's model is {configured}. Pass a checkpoint of {configured}"
        f" (e.g. --ckpt_path last for the recipe's own run), or use {path} with the config that trained it{trained}."
    )


def check_recorded_class(ckpt_path: Any, class_path: str | None) -> None:
    """Before LightningCLI reads ``--ckpt_path FILE``'s hyperparameters (which replace the config's model class by
    the checkpoint's): refuse a checkpoint whose recorded class is not ``class_path``, the configured model's."""
    if not ckpt_path or not class_path or not os.path.isfile(ckpt_path):
        return  # names (last, best) and remote paths: checked by check_checkpoint_model once they are resolved
    cls = _import_class(class_path)
    hparams = _hyperparameters(load_checkpoint(ckpt_path))
    recorded = hparams.get(CLASS_KEY)
    if cls is not None and isinstance(recorded, str) and not _same_class(recorded, cls):
        raise _class_refusal(str(ckpt_path), recorded, class_path)


def _hyperparameters(checkpoint: Any) -> dict[str, Any]:
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    return hparams if isinstance(hparams, dict) else {}


def check_checkpoint_model(path: str | None, model: LightningModule) -> None:
    """Refuse the checkpoint at ``path`` (resolved) when it holds another class than ``model``'s: the class LightningCLI
    recorded, or, when none is recorded, the ``state_dict`` keys (some of the model's are missing from it)."""
    if path is None:
        return
    checkpoint = load_checkpoint(path)
    cls = type(model)
    configured = f"{cls.__module__}.{cls.__qualname__}"
    recorded = _hyperparameters(checkpoint).get(CLASS_KEY)
    if isinstance(recorded, str):
        if not _same_class(recorded, cls):
            raise _class_refusal(str(path), recorded, configured)
        return
    weights = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(weights, dict) or not getattr(model, "strict_loading", True):
        return  # not a Lightning checkpoint (Lightning says so), or the model loads partial weights on purpose
    expected = set(model.state_dict())
    missing = sorted(expected - set(weights))
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise CheckpointClassError(
            f"{path} records no model class, and {len(missing)} of the {len(expected)} weights of {configured} are"
            f" missing from it ({shown}): it holds another model. Pass a checkpoint of {configured}."
        )


def _best_record(checkpoint: Any, callback: ModelCheckpoint) -> str | None:
    """``best_model_path`` of ``callback``'s state in ``checkpoint`` (its ``state_key``, else the same monitor)."""
    states = checkpoint.get("callbacks") if isinstance(checkpoint, dict) else None
    if not isinstance(states, dict):
        return None
    state = states.get(callback.state_key)
    if not isinstance(state, dict):
        state = next((s for k, s in states.items() if k.startswith("ModelCheckpoint") and isinstance(s, dict)
                      and s.get("monitor") == callback.monitor), None)
    best = state.get("best_model_path") if state else None
    return str(best) if best else None


def resolve_best(trainer: Trainer) -> str:
    """``--ckpt_path best``: the checkpoint that the first monitoring ModelCheckpoint recorded as best, read from the
    newest checkpoint in its directory (a fit saves that state in every checkpoint, e.g. ``last.ckpt``).

    Lightning resolves ``best`` from the callback's state in this process, which only a ``fit`` in the same process
    has filled (``ModelCheckpoint is not configured to save the best model``). Raises ValueError when there is none."""
    monitored = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor is not None]
    if not monitored:
        raise ValueError("--ckpt_path best: no ModelCheckpoint of this config monitors a metric, so no checkpoint is"
                         " the best; pass --ckpt_path last or a checkpoint path.")
    callback = monitored[0]
    if callback.best_model_path:  # a fit in this process
        return callback.best_model_path
    directory = checkpoint_dir(trainer, callback)
    fs = get_filesystem(directory)
    found = [os.path.join(directory, name) for name in _checkpoints_in(directory)]
    if not found:
        raise ValueError(f"--ckpt_path best: {directory} holds no checkpoints; run `plpriv fit` with this config"
                         " first, or pass a checkpoint path.")
    newest = max(found, key=fs.modified)
    best = _best_record(load_checkpoint(newest), callback)
    if best is None:
        raise ValueError(f"--ckpt_path best: {newest} records no best checkpoint for monitor {callback.monitor!r};"
                         " pass --ckpt_path last or a checkpoint path.")
    for candidate in (os.path.join(directory, os.path.basename(best)), best):  # recorded relative to the fit's cwd
        if fs.exists(candidate):
            return candidate
    raise ValueError(f"--ckpt_path best: the best checkpoint recorded in {newest}, {best}, no longer exists; pass"
                     " --ckpt_path last or a checkpoint path.")
