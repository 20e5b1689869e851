"""Messages of the real ``plpriv`` console script (issue 25, "Messages"): a range error in a callback's or model's
arguments shows only the constructor's message (no jsonargparse noise), exit code 2; after Ctrl-C a fit says how to
resume and, under DP-SGD, the epsilon spent; a finished fit says where its outputs are."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from lightning.pytorch import Callback, LightningModule, Trainer

from _helpers import ROOT
from test_cli_errors import PLPRIV, _plpriv, _short_error

DIGITS = str(ROOT / "recipes" / "classifier" / "digits.yaml")
FRAGMENTS = ROOT / "callbacks"
NOISE = ("Not a valid subclass", "a class path (str)", "Expected a <class", "Given value", "Union subtypes")


@pytest.mark.parametrize(("fragment", "key", "value", "needle"), [
    ("dp_sgd.yaml", "target_epsilon", "-1", "`target_epsilon` must be > 0, got -1.0"),
    ("sparsified_gaussian.yaml", "keep_fraction", "1.5", "`keep_fraction` must be in (0, 1]"),
    (None, "num_classes", "1", "`num_classes` must be >= 2, got 1"),
])
def test_range_error_shows_only_the_message(tmp_path: Path, fragment: str | None, key: str, value: str,
                                            needle: str) -> None:
    args = ["fit", "-c", DIGITS]
    if fragment is not None:
        args += ["-c", str(FRAGMENTS / fragment), f"--trainer.callbacks.init_args.{key}", value]
    else:
        args += [f"--model.init_args.{key}", value]
    proc = _plpriv(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    _short_error(proc, needle)
    message = proc.stderr.split("plpriv: error:", 1)[1]
    assert message.splitlines()[0].strip().startswith(needle), message
    assert not any(noise in message for noise in NOISE), message
    assert len(message.strip().splitlines()) == 2, message  # the message and the --debug hint


def test_union_noise_is_trimmed_from_nested_and_unknown_errors() -> None:
    from plpriv.cli import user_error_message

    nested = ValueError(
        "Does not validate against any of the Union subtypes\nErrors:\n"
        "  - Does not validate against any of the Union subtypes\n    Errors:\n"
        "      - Not a valid subclass of Callback\n        Subclass types expect one of:\n"
        "        - a class path (str)\n      - `x` must be > 0, got 0\n    Given value: 0\n"
        "  - Expected a <class 'NoneType'>\nGiven value: [Namespace(x=0)]")
    assert user_error_message(nested) == "`x` must be > 0, got 0"
    only_noise = ValueError("Does not validate against any of the Union subtypes\nErrors:\n"
                            "  - Not a valid subclass of Callback\n    Subclass types expect one of:\n"
                            "    - a class path (str)\n  - Expected a <class 'NoneType'>\nGiven value: 3")
    assert user_error_message(only_noise) == "Not a valid subclass of Callback"  # nothing better: still a message
    assert user_error_message(ValueError("plain message\nsecond line")) == "plain message\n  second line"


class InterruptAtStep(Callback):
    """Raise KeyboardInterrupt (as Ctrl-C does) before optimizer step ``step`` of a fresh run; a resumed run
    (``--ckpt_path``) is not interrupted. Used by the console script as ``test_cli_messages.InterruptAtStep``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: object, batch_idx: int) -> None:
        if trainer.ckpt_path is None and trainer.global_step >= self.step:
            raise KeyboardInterrupt


TESTS = {"PYTHONPATH": str(Path(__file__).parent)}  # the console script imports InterruptAtStep from here
TINY = ("--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false")
INTERRUPT = ("--trainer.callbacks+=test_cli_messages.InterruptAtStep", "--trainer.callbacks.init_args.step")


def _line(stderr: str, start: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith(start)]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def test_ctrl_c_says_how_to_resume_and_the_epsilon_spent(tmp_path: Path) -> None:
    """Ctrl-C in epoch 2 of a DP-SGD fit: one line with the command that resumes (which works) and the epsilon spent;
    the resumed fit ends with one line naming its log directory and last checkpoint."""
    dp = ("-c", DIGITS, "-c", str(FRAGMENTS / "dp_sgd.yaml"), *TINY)
    first = _plpriv(tmp_path, "fit", *dp, *INTERRUPT, "2", env=TESTS)
    assert first.returncode != 0 and "Traceback" not in first.stderr, first.stderr[-3000:]
    line = _line(first.stderr, "plpriv: interrupted")
    run_dir = tmp_path / "classifier_digits" / "dp_sgd"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert f"resume from {last} with: plpriv fit -c {DIGITS} -c {FRAGMENTS / 'dp_sgd.yaml'}" in line, line
    spent = re.search(r"epsilon=([0-9.e+-]+) \(delta=1e-05\) spent so far", line)
    assert spent is not None and 0 < float(spent.group(1)) < 8, line
    assert "plpriv: fit finished" not in first.stderr

    command = shlex.split(line.split(" with: ", 1)[1].rsplit("; epsilon=", 1)[0])
    assert command[0] == "plpriv" and command[-2:] == ["--ckpt_path", "last"], command
    second = subprocess.run([str(PLPRIV), *command[1:]], cwd=tmp_path, text=True, capture_output=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **TESTS})
    assert second.returncode == 0, second.stderr[-3000:]
    done = _line(second.stderr, "plpriv: fit finished:")
    assert f"outputs (logs, config, figures) in {run_dir};" in done and f"last checkpoint {last}" in done, done
    # the recipe's monitored checkpoint (which epoch is best depends on the run's fresh DP noise)
    assert re.search(rf"best checkpoint {re.escape(str(run_dir / 'checkpoints'))}/epoch0\d-acc[0-9.]+\.ckpt", done), done
    final = re.search(r"epsilon=([0-9.e+-]+) \(delta=1e-05\) spent so far", done)
    assert final is not None and float(final.group(1)) > float(spent.group(1)), done


def test_ctrl_c_before_any_checkpoint_says_there_is_nothing_to_resume(tmp_path: Path) -> None:
    proc = _plpriv(tmp_path, "fit", "-c", DIGITS, *TINY, *INTERRUPT, "1", env=TESTS)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = _line(proc.stderr, "plpriv: interrupted")
    assert "nothing to resume" in line and "epsilon" not in line, line  # no DP-SGD: no epsilon


@pytest.mark.parametrize(("yaml_text", "flags", "needle"), [
    ("trainer:\n  max_epoch: 2\n", (), "unknown key 'trainer.max_epoch' (did you mean 'trainer.max_epochs'?)"),
    ("seed_everythin: 3\n", (), "unknown key 'seed_everythin' (did you mean 'seed_everything'?)"),
    ("model:\n  init_args:\n    num_clases: 10\n", (),
     "plpriv.modules.ImageClassifier has no argument 'num_clases' (did you mean 'num_classes'?)"),
    ("data:\n  init_args:\n    batch_sise: 8\n", (), "--data.help plpriv.data.DigitsDataModule"),
    (None, ("--trainer.max_epochz", "2"), "unknown option '--trainer.max_epochz' (did you mean 'trainer.max_epochs'?)"),
    (None, ("-c", "recipes/classifier/nothere.yaml"), "File does not exist"),
])
def test_typos_get_one_line_with_the_closest_key(tmp_path: Path, yaml_text: str | None, flags: tuple[str, ...],
                                                 needle: str) -> None:
    """A recipe-key typo or a missing file: one line naming it (and the closest valid key), not ~50 lines of usage."""
    args = ["fit", "-c", DIGITS, *flags]
    if yaml_text is not None:
        (tmp_path / "typo.yaml").write_text(yaml_text)
        args += ["-c", str(tmp_path / "typo.yaml")]
    proc = _plpriv(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    _short_error(proc, needle)
    assert "usage:" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 2, proc.stderr
