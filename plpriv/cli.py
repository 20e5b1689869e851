"""The ``plpriv`` command: a LightningCLI over recipes (``recipes/*.yaml``) and fragments (``callbacks/*.yaml``).

``plpriv fit -c recipes/A.yaml -c callbacks/B.yaml`` merges the files left to right. Fragments write their callbacks
under ``trainer.callbacks+`` (jsonargparse's list-append syntax), so they are added to the recipe's own callbacks
instead of replacing them; the same works on the command line: ``--trainer.callbacks+=LearningRateMonitor``.

``validate``/``test``/``predict`` log into ``<fit log dir>/<subcommand>/`` (TensorBoard's ``sub_dir``), so they never
overwrite the fit's ``config.yaml`` or ``hparams.yaml``; ``fit --ckpt_path`` refuses to continue a checkpoint trained
under DP-SGD without the ``DPSGD`` callback. Before any work (:mod:`plpriv.cli_checks`), ``fit`` refuses to overwrite
another run's checkpoints, every subcommand refuses a checkpoint of another model class, and ``--ckpt_path best``
reads the best checkpoint that the fit recorded. A finished ``fit`` prints one line naming its log directory and
checkpoints; one stopped by Ctrl-C prints the command that resumes it and, under DP-SGD, the epsilon spent so far.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger

from plpriv.cli_callbacks import CallbackOverride, apply_overrides, split_overrides
from plpriv.cli_checks import RunRefusal, check_checkpoint_model, check_new_run, check_recorded_class, resolve_best
from plpriv.cli_formatter import PlprivArgumentParser
from plpriv.cli_errors import parser_error_message
from plpriv.cli_help import SUBCOMMANDS, print_top_level_help  # static text (no Lightning import there)

PRIVACY_KEY = "plpriv_privacy"  # top-level checkpoint key DPSGD writes: how the weights were trained privately

_HELP_CLASS = ("--model.help plpriv.modules.EDM",
               "a class's arguments (also --data.help CLASS, --trainer.callbacks.help CLASS)")
_EXAMPLES = {
    "fit": (
        ("-c recipes/classifier/digits.yaml", "a recipe (all in recipes/, listed in the README)"),
        ("-c RECIPE -c callbacks/dp_sgd.yaml", "add callback fragments (callbacks/*.yaml) after the recipe"),
        ("-c RECIPE --trainer.max_epochs 3", "override any key; --print_config shows the merged config"),
        ("-c RECIPE --ckpt_path last", "resume the recipe's run from its last checkpoint"),
        _HELP_CLASS,
    ),
    "other": (
        ("-c recipes/edm/digits_lora.yaml --ckpt_path last", "the recipe's run, from its last checkpoint"),
        ("-c RECIPE --ckpt_path PATH.ckpt", "any checkpoint (fragments and overrides as for fit)"),
        _HELP_CLASS,
    ),
}


def _classes(package: str, base: type) -> str:
    """The public ``base`` subclasses ``package`` exports, without shared base classes (kept in ``*.base`` modules)."""
    module = importlib.import_module(package)
    found = [c for n, c in vars(module).items() if not n.startswith("_") and isinstance(c, type)
             and issubclass(c, base) and c is not base and not c.__module__.endswith(".base")]
    return ", ".join(sorted(f"{package}.{c.__name__}" for c in found))


def _print_guidance(sub: str) -> None:
    """plpriv's own pointers, printed before Lightning's (long) option list."""
    from lightning.pytorch import LightningDataModule

    examples = _EXAMPLES["fit" if sub == "fit" else "other"]
    commands = [f"plpriv {sub} {args}" for args, _ in examples]
    width = max(map(len, commands))
    print(f"plpriv {sub}: {SUBCOMMANDS[sub]}.\n")
    for command, (_, what) in zip(commands, examples):
        print(f"  {command:<{width}}  {what}")
    print(f"\n  modules:     {_classes('plpriv.modules', LightningModule)} (or any LightningModule by class_path)")
    print(f"  datamodules: {_classes('plpriv.data', LightningDataModule)}")
    print(f"  callbacks:   {_classes('plpriv.callbacks', Callback)} (and fragments in callbacks/)")
    print("\nLightning's options follow.\n")


class PrivateCheckpointError(RuntimeError):
    """A checkpoint trained under DP-SGD was about to be continued without DP-SGD."""


def _privacy_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint's ``plpriv_privacy`` dict, or None (memory-mapped: large checkpoints are not read whole)."""
    if os.path.isfile(path):
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    else:  # remote (fsspec) paths
        from lightning.fabric.utilities.cloud_io import _load

        checkpoint = _load(path, map_location="cpu")
    record = checkpoint.get(PRIVACY_KEY) if isinstance(checkpoint, dict) else None
    return record if isinstance(record, dict) else None


def check_private_resume(trainer: Trainer, ckpt_path: str | os.PathLike | None,
                         model: LightningModule | None = None) -> str | None:
    """Refuse to continue a checkpoint that DPSGD wrote when ``trainer`` has no DPSGD callback.

    ``ckpt_path`` is a path or one of Lightning's names (``last``, ``best``, ``hpc``), resolved as ``Trainer.fit``
    resolves it. Raises :class:`PrivateCheckpointError` with how to proceed knowingly; returns the resolved path
    (None: nothing to resume).
    """
    if ckpt_path is None:
        return None
    path = _resolve_ckpt_path(trainer, ckpt_path)
    record = _privacy_record(path) if path is not None else None
    if record is None:
        return path
    from plpriv.callbacks import DPSGD

    if any(isinstance(cb, DPSGD) for cb in trainer.callbacks):
        return path  # DPSGD itself checks that the noise, clipping and accountant match the checkpoint's
    raise PrivateCheckpointError(_refusal(str(path), record, model))


def _fresh_start_hint(model: LightningModule | None) -> str:
    """How to start a new run from a checkpoint's weights with this model: its own argument, if it has one."""
    import inspect

    cls = type(model) if model is not None else None
    if cls is not None and "init_checkpoint" in inspect.signature(cls.__init__).parameters:
        return f"--model.init_args.init_checkpoint PATH ({cls.__name__}), without --ckpt_path"
    name = cls.__name__ if cls is not None else "YourModule"
    return (f"{name}.load_from_checkpoint(PATH) in Python, then a new fit ({name} has no init_checkpoint argument"
            " for the CLI)")


def _refusal(path: str, record: dict[str, Any], model: LightningModule | None = None) -> str:
    shown = ", ".join(f"{k}={record[k]:.4g}" if isinstance(record[k], float) else f"{k}={record[k]}"
                      for k in ("mechanism", "accountant", "epsilon", "delta", "steps") if k in record)
    return (
        f"{path} was trained with differential privacy ({shown}), but this run has no DPSGD callback: resuming it"
        " would continue training without privacy. To continue privately, add DP-SGD as it was trained (its private"
        " recipe, or -c callbacks/dp_sgd.yaml after the recipe). To knowingly start a new, NON-private run from its"
        f" weights, which makes no privacy claim, load them instead of resuming: {_fresh_start_hint(model)}."
    )


def _resolve_ckpt_path(trainer: Trainer, ckpt_path: str | os.PathLike | None, fn: str = "fit") -> str | None:
    """Lightning's resolution of ``ckpt_path`` for ``fn`` (``last``: the newest ``last*.ckpt`` of any
    ModelCheckpoint; None: SLURM's requeue checkpoint, if any), without loading anything; None when there is nothing
    to resume."""
    from lightning.pytorch.trainer.states import TrainerFn

    state = {"fit": TrainerFn.FITTING, "validate": TrainerFn.VALIDATING, "test": TrainerFn.TESTING,
             "predict": TrainerFn.PREDICTING}[fn]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no last checkpoint": fit warns about it itself
            resolved = trainer._checkpoint_connector._parse_ckpt_path(
                state, ckpt_path, model_provided=True, model_connected=False
            )
    except ValueError:  # e.g. "best" before any fit: fit raises its own error
        return None
    return None if resolved is None else str(resolved)


class _PrivateCheckpointGuard(Callback):
    """Backstop for :func:`check_private_resume`: sees the checkpoint fit actually loads (however it was named)."""

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        record = checkpoint.get(PRIVACY_KEY)
        if isinstance(record, dict):
            from plpriv.callbacks import DPSGD

            if not any(isinstance(cb, DPSGD) for cb in trainer.callbacks):
                raise PrivateCheckpointError(_refusal(str(trainer.ckpt_path), record, pl_module))


class ResumeCheckpoint(ModelCheckpoint):
    """``checkpoints/last.ckpt``, rewritten at the end of every ``every_n_epochs``-th epoch (validated or not): where
    ``--ckpt_path last`` resumes. Lightning's ``save_last`` writes it only when a top-k checkpoint is saved in the
    same step, i.e. with a monitor at the last improvement. plpriv recipes configure the same with a plain
    ModelCheckpoint (``filename: last``); PlprivCLI adds this one to a fit whose checkpoints lack it."""

    def __init__(self, every_n_epochs: int = 1, dirpath: str | os.PathLike | None = None) -> None:
        super().__init__(dirpath=dirpath, filename=self.CHECKPOINT_NAME_LAST, save_top_k=1,
                         every_n_epochs=every_n_epochs, save_on_train_epoch_end=True, enable_version_counter=False)


def ensure_resume_checkpoint(trainer: Trainer) -> ModelCheckpoint | None:
    """Add a :class:`ResumeCheckpoint` when checkpointing is on but no ModelCheckpoint writes ``last.ckpt`` by
    itself (``filename: last``); the others' ``save_last`` is turned off (it would write stale ``last-v1.ckpt``
    copies). Returns the checkpoint that writes ``last.ckpt``, or None without checkpointing."""
    checkpoints = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    if not checkpoints:
        return None
    for cb in checkpoints:
        if cb.filename == ModelCheckpoint.CHECKPOINT_NAME_LAST:
            return cb
    for cb in checkpoints:
        cb.save_last = False
    resume = ResumeCheckpoint()
    trainer.callbacks.append(resume)  # after every other callback, as Lightning orders checkpoints
    return resume


class _SaveConfig(SaveConfigCallback):
    """The resolved config, saved into the log directory only (none without a logger); a subcommand other than fit
    that was not redirected into its own directory writes ``config_<subcommand>.yaml`` instead of ``config.yaml``."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not trainer.loggers:  # no log directory: nowhere (not the current directory)
            return
        if stage != "fit" and not (isinstance(trainer.logger, TensorBoardLogger) and trainer.logger.sub_dir == stage):
            self.config_filename = f"config_{stage}.yaml"
        super().setup(trainer, pl_module, stage)


class PlprivCLI(LightningCLI):
    """LightningCLI with plpriv's defaults: any LightningModule / DataModule by ``class_path`` (subclass mode), the
    resolved config saved next to the logs (overwritten when a run is resumed into the same directory), non-fit
    subcommands logging into their own subdirectory, a ``last.ckpt`` at every epoch end
    (:func:`ensure_resume_checkpoint`), private checkpoints only resumed privately, and the checks of
    :mod:`plpriv.cli_checks` (no overwritten run, no checkpoint of another model class, ``--ckpt_path best``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", _SaveConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # exit_on_error=False: a parser error is raised (ArgumentError), and `main` prints one line for it
        kwargs.setdefault("parser_kwargs", {"default_env": False, "exit_on_error": False})
        kwargs.setdefault("parser_class", PlprivArgumentParser)  # concise "known subclasses" in every help
        argv = kwargs.get("args", args[11] if len(args) > 11 else None)  # LightningCLI's 12th positional: args
        self._argv: list[str] | None = (list(sys.argv[1:]) if argv is None else
                                        list(argv) if isinstance(argv, (list, tuple)) else None)
        self._callback_overrides: list[CallbackOverride] = []
        if self._argv is not None and any(a.startswith("--callback.") for a in self._argv):
            rest, self._callback_overrides = split_overrides(self._argv)  # applied after parsing
            if len(args) > 11:
                args = (*args[:11], rest, *args[12:])
            else:
                kwargs["args"] = rest
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--torch_threads", type=Optional[int], default=None,
            help="torch intra-op CPU threads (torch.set_num_threads) for the whole run; unset: torch's default."
            " Small networks on a few shared cores run faster on 1 thread than on several that wait for each other.")

    def before_instantiate_classes(self) -> None:
        """``torch_threads`` first (it must precede any work); then validate/test/predict: a TensorBoardLogger logs
        into ``<log dir>/<subcommand>`` (its ``sub_dir``), so the fit's files are never overwritten; its checkpoint
        directory (``--ckpt_path last``) stays the fit's."""
        config = self.config[self.subcommand] if self.subcommand is not None else self.config
        if self._callback_overrides:  # --callback.NAME.KEY VALUE (plpriv.cli_callbacks)
            apply_overrides(config.trainer.callbacks, self._callback_overrides)
        threads = config.get("torch_threads")
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise ValueError(f"`torch_threads` must be a positive int or null, got {threads!r}")
            torch.set_num_threads(threads)
        if self.subcommand in (None, "fit"):
            return
        logger = self.config[self.subcommand].trainer.logger
        for entry in logger if isinstance(logger, list) else [logger]:
            class_path = getattr(entry, "class_path", None)
            if class_path is None or entry.get("init_args") is None:
                continue
            module, _, name = class_path.rpartition(".")
            cls = getattr(importlib.import_module(module), name, None)
            if isinstance(cls, type) and issubclass(cls, TensorBoardLogger) and entry.init_args.get("sub_dir") is None:
                entry.init_args.sub_dir = self.subcommand

    def _parse_ckpt_path(self) -> None:
        """Refuse ``--ckpt_path FILE`` of another model class before LightningCLI takes the class (and its init
        arguments) from the file's hyperparameters."""
        subcommand = self.config.get("subcommand")
        if subcommand:
            config = self.config[subcommand]
            check_recorded_class(config.get("ckpt_path"), config.get("model.class_path"))
        super()._parse_ckpt_path()

    def _ckpt_path(self) -> Any:
        """``--ckpt_path``, with ``best`` replaced by the path the fit recorded (:func:`resolve_best`)."""
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "best":
            config["ckpt_path"] = resolve_best(self.trainer)
        return config.get("ckpt_path")

    def _check_checkpoint(self) -> None:
        """validate/test/predict: a checkpoint of another model class is refused."""
        ckpt_path = self._ckpt_path()
        if ckpt_path is not None:
            check_checkpoint_model(_resolve_ckpt_path(self.trainer, ckpt_path, self.subcommand), self.model)

    before_validate = before_test = before_predict = _check_checkpoint

    def _run_subcommand(self, subcommand: str) -> None:
        """The subcommand, then for ``fit`` one line on the console: where the outputs are, or after Ctrl-C (Lightning
        catches KeyboardInterrupt, calls ``on_exception`` and exits) how to resume and the epsilon spent so far."""
        try:
            super()._run_subcommand(subcommand)
        except SystemExit:
            if subcommand == "fit" and self.trainer.interrupted and self.trainer.is_global_zero:
                print(f"plpriv: {interrupted_message(self.trainer, self._argv)}", file=sys.stderr, flush=True)
            raise
        if subcommand == "fit" and self.trainer.state.finished and self.trainer.is_global_zero:
            print(f"plpriv: {outputs_message(self.trainer)}", file=sys.stderr, flush=True)

    def before_fit(self) -> None:
        ensure_resume_checkpoint(self.trainer)  # first: `--ckpt_path last` also looks in its directory
        ckpt_path = self._ckpt_path()
        resumed = check_private_resume(self.trainer, ckpt_path, self.model)
        if ckpt_path is not None or _resolve_ckpt_path(self.trainer, None) is None:  # not: SLURM requeue (hpc)
            check_new_run(self.trainer, resumed)  # never over another run's checkpoints
        check_checkpoint_model(resumed, self.model)
        if resumed is not None:
            # resuming: the run's own checkpoint directory holds its checkpoints, as it should
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty\.")
        self.trainer.callbacks.insert(0, _PrivateCheckpointGuard())


def _resume_command(argv: Sequence[str] | None) -> str:
    """``plpriv fit`` with the same arguments (``-c`` files and overrides), ``--ckpt_path last`` instead of any
    ``--ckpt_path`` (shell-quoted); without a list of arguments (``args`` given as a dict), a placeholder for them."""
    import shlex

    if argv is None:
        return "plpriv fit -c <the same config files and overrides> --ckpt_path last"
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path=") and arg != "--debug":
            kept.append(arg)
    return shlex.join(["plpriv", *kept, "--ckpt_path", "last"])


def _epsilon_spent(trainer: Trainer) -> str | None:
    """``epsilon=E (delta=D) spent so far`` of the run's private-training callback (DPSGD), or None without one."""
    from plpriv.privacy.contract import find_private_training

    private = find_private_training(trainer.callbacks)
    if private is None:
        return None
    delta = getattr(getattr(private, "engine", None), "delta", None)
    try:
        epsilon = private.get_epsilon()
    except Exception:  # noqa: BLE001 - e.g. no delta known yet: the resume hint matters more
        return None
    return f"epsilon={epsilon:.4g}" + (f" (delta={delta:.3g})" if isinstance(delta, float) else "") + " spent so far"


def interrupted_message(trainer: Trainer, argv: Sequence[str] | None) -> str:
    """One line after an interrupted fit: how to resume (or that nothing was saved yet) and, under DP-SGD, the
    epsilon spent so far."""
    last = _resolve_ckpt_path(trainer, "last")
    if last is not None and os.path.exists(last):
        line = f"interrupted; resume from {_shown(last)} with: {_resume_command(argv)}"
    else:
        line = "interrupted before the first checkpoint: nothing to resume; run the same command again to start over"
    spent = _epsilon_spent(trainer)
    return f"{line}; {spent}" if spent else line


def outputs_message(trainer: Trainer) -> str:
    """One line at the end of a fit: the run's log directory and its checkpoints (last, best)."""
    # the logger's own log_dir: `trainer.log_dir` is a collective under DDP, and only rank zero prints this line
    log_dir = next((lg.log_dir for lg in trainer.loggers if getattr(lg, "log_dir", None)), None)
    parts = [f"outputs (logs, config, figures) in {_shown(log_dir)}"] if log_dir is not None else []
    last = _resolve_ckpt_path(trainer, "last")
    if last is not None and os.path.exists(last):
        parts.append(f"last checkpoint {_shown(last)}")
    best = next((cb.best_model_path for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)
                 and cb.monitor is not None and cb.best_model_path), None)
    if best and (last is None or _shown(best) != _shown(last)):
        parts.append(f"best checkpoint {_shown(best)}")
    spent = _epsilon_spent(trainer)
    if spent:
        parts.append(spent)
    return "fit finished: " + ("; ".join(parts) if parts else "no logger and no checkpoints: nothing was written")


def _shown(path: str | os.PathLike | None) -> str:
    """A local path made absolute (the run may be read from another directory); remote paths as they are."""
    text = os.fspath(path) if path is not None else "?"
    return text if "://" in text else os.path.abspath(text)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``plpriv`` console script."""
    # Lightning <= 2.6 builds torch's deprecated LeafSpec on every run (torch >= 2.10 warns from Lightning's own
    # code): nothing a user can act on, so exactly that message from exactly that module is silenced.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print_top_level_help()
        raise SystemExit(0 if argv else 2)
    if argv[0] == "audit":  # `plpriv audit -c recipes/audit/...`: the DP-SGD audit runner, not a LightningCLI
        from plpriv.runners.audit import main as audit_main

        audit_main(argv[1:])
        return
    if argv[0] == "unlearn":  # `plpriv unlearn -c recipes/unlearning/...`: the unlearning runner
        from plpriv.runners.unlearn import main as unlearn_main

        unlearn_main(argv[1:])
        return
    if argv[0] == "censoring":  # `plpriv censoring label|train|rate`: censored sampling's human-feedback steps
        from plpriv.runners.censoring import main as censoring_main

        raise SystemExit(censoring_main(argv[1:], prog="plpriv censoring"))
    if argv[0] in SUBCOMMANDS and ("-h" in argv or "--help" in argv):
        _print_guidance(argv[0])
        sys.stdout.flush()
    debug = "--debug" in argv or os.environ.get("PLPRIV_DEBUG", "") not in ("", "0")
    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
        if args is None:
            sys.argv = [sys.argv[0], *argv]
    try:
        # args=None lets LightningCLI read sys.argv itself (passing both makes it warn on every run).
        PlprivCLI(args=None if args is None else argv)
    except PrivateCheckpointError as err:
        print(f"plpriv: refusing to resume: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunRefusal as err:  # another run's checkpoints, or a checkpoint of another model class
        print(f"plpriv: refusing to {err.action}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except argparse.ArgumentError as err:  # the parser's: unknown keys, values no type accepts, missing files
        if debug:
            raise
        message = parser_error_message(str(err), argv) or user_error_message(ValueError(str(err)))
        print(f"plpriv: error: {message}\n(`plpriv {argv[0]} --help` lists the options)", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:  # user-input errors: one short message, the traceback only with --debug
        message = user_error_message(err)
        if debug or message is None:
            raise
        print(f"plpriv: error: {message}\n(run with --debug or PLPRIV_DEBUG=1 for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's Inception-v3 (FID's standard)


def _hub_checkpoints() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def _raised_in(err: BaseException, words: Sequence[str]) -> bool:
    """Whether a frame of ``err``'s traceback lies in a file whose path contains one of ``words``."""
    tb = err.__traceback__
    while tb is not None:
        if any(w in tb.tb_frame.f_code.co_filename.lower() for w in words):
            return True
        tb = tb.tb_next
    return False


_CORRUPT_CHECKPOINT = ("PytorchStreamReader failed", "failed finding central directory", "invalid load key",
                       "Ran out of input", "unpickling")


def _file_torch_load_failed_on(err: BaseException) -> str | None:
    """The file ``torch.load`` was reading when ``err`` was raised inside it (``"a file"`` for a stream), else None.

    Unpickling random or truncated bytes raises UnpicklingError, but also IndexError, KeyError, UnicodeDecodeError...
    so the traceback, not the exception type, tells that the checkpoint was unreadable."""
    tb = err.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "load" and code.co_filename.replace("\\", "/").endswith("torch/serialization.py"):
            source = tb.tb_frame.f_locals.get("f")
            return os.fspath(source) if isinstance(source, (str, os.PathLike)) else "a file"
        tb = tb.tb_next
    return None


# jsonargparse's own reasons why a value matched none of a Union's types: noise next to the constructor's message
_UNION_NOISE = ("Not a valid subclass of", "Expected a <class", "Does not validate against any of", "Subclass types",
                "Type <class", "Problem with given class_path")


def _union_items(text: str) -> list[str]:
    """The top-level items under jsonargparse's ``Errors:`` (each with its indented continuation lines, dedented)."""
    body = text.split("Errors:", 1)[1]
    lines = [ln for ln in body.split("\nGiven value")[0].splitlines() if ln.strip()]
    bullets = [len(ln) - len(ln.lstrip()) for ln in lines if ln.lstrip().startswith("- ")]
    if not bullets:
        return []
    indent = min(bullets)
    items: list[list[str]] = []
    for ln in lines:
        depth = len(ln) - len(ln.lstrip())
        if depth == indent and ln.lstrip().startswith("- "):
            items.append([ln.lstrip()[2:]])
        elif items and depth > indent:
            items[-1].append(ln[indent + 2:] if ln[:indent + 2].strip() == "" else ln.strip())
    return ["\n".join(item) for item in items]


def _union_error_message(text: str) -> str:
    """jsonargparse's "Does not validate against any of the Union subtypes ... Errors: - msg ... Given value: ..."
    reduced to the first meaningful item (e.g. the constructor's ValueError naming the value), nested unions
    included; without such an item, the first line of each item; text without ``Errors:`` as it is."""
    if "Errors:" not in text:
        return text
    items = [_union_error_message(item) for item in _union_items(text)]  # nested unions reduced first
    meaningful = [item for item in items if not item.lstrip().startswith(_UNION_NOISE)]
    if meaningful:
        return meaningful[0]
    shown = [item.splitlines()[0] for item in items if not item.lstrip().startswith("Expected a <class")]
    return "; ".join(shown) or text


def user_error_message(err: BaseException) -> str | None:
    """A short message for an error caused by the user's input (config, data, checkpoint, privacy budget), or None
    for anything else (a bug: shown with its traceback).

    plpriv raises ValueError/TypeError/FileNotFoundError with messages that name the problem and the fix; jsonargparse
    wraps errors of a class's constructor in a long Namespace dump, from which the constructor's own message is kept.
    """
    import pickle
    from urllib.error import URLError

    text = str(err)
    unreadable = None if isinstance(err, OSError) else _file_torch_load_failed_on(err)
    if unreadable is not None:  # any error from inside torch.load: a corrupt file raises whatever the bytes trigger
        return (f"the checkpoint could not be read ({unreadable}): it is truncated or not a Lightning checkpoint. Pass"
                " a complete .ckpt file to --ckpt_path (e.g. <run dir>/checkpoints/last.ckpt).")
    if isinstance(err, URLError) and _raised_in(err, ("fidelity", "inception")):
        return (f"FID's Inception-v3 weights could not be downloaded ({err.reason}). Without internet access copy"
                f" {INCEPTION_WEIGHTS} into {_hub_checkpoints()} (where torch-fidelity looks first), or pass"
                " --model.init_args.fid_feature null (no FID) or a feature net (plpriv.metrics.ClassifierFeatures).")
    if isinstance(err, URLError):
        return (f"a download failed ({err.reason}); without internet access put the data set under the recipe's"
                " `root` and set `download: false` (--data.init_args.download false).")
    if type(err).__name__ == "MisconfigurationException" and "No supported gpu backend" in text:
        return ("this recipe asks for GPUs and this machine has none: add --trainer.accelerator cpu --trainer.devices"
                " 1 (and --trainer.strategy auto; slow for the full recipe), or run it on a GPU machine.")
    if isinstance(err, (pickle.UnpicklingError, EOFError)) or (
        isinstance(err, RuntimeError) and any(s in text for s in _CORRUPT_CHECKPOINT)
    ):
        return ("the checkpoint could not be read: it is truncated or not a Lightning checkpoint. Pass a complete"
                " .ckpt file to --ckpt_path (e.g. <run dir>/checkpoints/last.ckpt).")
    if isinstance(err, RuntimeError) and text.startswith("DPSGD"):
        return text  # budget spent, refused steps: plpriv's own messages
    if not isinstance(err, (ValueError, TypeError, FileNotFoundError, NotADirectoryError, ImportError)):
        return None
    text = _union_error_message(text)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return "\n  ".join(lines[:12]) if lines else type(err).__name__


if __name__ == "__main__":  # pragma: no cover
    main()
