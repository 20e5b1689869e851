"""Bad input through the real ``plpriv`` console script: one short message naming the problem and the fix, a
non-zero exit, no traceback (``--debug`` / ``PLPRIV_DEBUG=1`` shows it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from _helpers import ROOT

PLPRIV = Path(sys.executable).parent / "plpriv"
DP = ROOT / "recipes" / "classifier" / "digits_dp.yaml"


def _plpriv(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    run_dir = ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)]
    return subprocess.run([str(PLPRIV), *args, *run_dir], cwd=tmp_path, text=True, capture_output=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _short_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "plpriv: error:" in proc.stderr
    message = proc.stderr.split("plpriv: error:", 1)[1]
    assert len(message.splitlines()) <= 12
    for needle in needles:
        assert needle in message, message


def test_corrupt_checkpoint_and_debug_switch(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(__import__("random").Random(2).randbytes(2000))  # bytes on which torch's unpickler raises IndexError
    args = ("fit", "-c", str(ROOT / "recipes" / "classifier" / "digits.yaml"), "--ckpt_path", str(bad))
    _short_error(_plpriv(tmp_path, *args), "checkpoint could not be read", "--ckpt_path")
    assert "Traceback" in _plpriv(tmp_path, *args, env={"PLPRIV_DEBUG": "1"}).stderr


def test_missing_dataset_root(tmp_path: Path) -> None:
    proc = _plpriv(tmp_path, "fit", "-c", str(ROOT / "recipes" / "edm" / "cifar10_uncond.yaml"),
                   "--data.init_args.root", str(tmp_path / "nowhere"), "--data.init_args.download", "false",
                   "--model.init_args.fid_feature", "null", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                   "--trainer.strategy", "auto", "--trainer.max_steps", "1")
    _short_error(proc, "nowhere", "download")


def test_unsupported_layer(tmp_path: Path) -> None:
    _short_error(_plpriv(tmp_path, "fit", "-c", str(DP), "--model.init_args.norm", "batch"),
                 "BatchNorm2d", "fix_modules=True")


def test_unreachable_epsilon(tmp_path: Path) -> None:
    _short_error(_plpriv(tmp_path, "fit", "-c", str(DP), "--trainer.callbacks.init_args.target_epsilon", "0.0001"),
                 "no noise multiplier reaches epsilon=0.0001", "Raise `target_epsilon`")


def test_spent_budget_refuses_to_resume(tmp_path: Path) -> None:
    budget = ("--trainer.callbacks.init_args.noise_multiplier", "2.0", "--trainer.callbacks.init_args.target_epsilon",
              "2.0", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0")
    first = _plpriv(tmp_path, "fit", "-c", str(DP), *budget)
    assert first.returncode == 0, first.stderr[-3000:]
    (spent,) = tmp_path.rglob("dp-budget-spent-step=*.ckpt")
    _short_error(_plpriv(tmp_path, "fit", "-c", str(DP), *budget, "--ckpt_path", str(spent)),
                 "is spent", "raise `target_epsilon` knowingly")


def test_budget_too_small_for_one_step(tmp_path: Path) -> None:
    _short_error(_plpriv(tmp_path, "fit", "-c", str(DP), "--trainer.callbacks.init_args.noise_multiplier", "0.6",
                         "--trainer.callbacks.init_args.target_epsilon", "2.0"), "not even one step", "raise")


@pytest.mark.parametrize("message", ["", "x"])
def test_user_error_message_keeps_bugs_loud(message: str) -> None:
    from plpriv.cli import user_error_message

    assert user_error_message(KeyError(message)) is None  # not user input: the traceback stays
    assert user_error_message(RuntimeError("CUDA error" + message)) is None
    wrapped = ValueError("Does not validate against any of the Union subtypes\nErrors:\n  - root missing: set it\n"
                         "  - Expected a <class 'NoneType'>\nGiven value: Namespace(a=1)")
    assert user_error_message(wrapped) == "root missing: set it"


def test_every_kind_of_unreadable_checkpoint_gets_the_short_message(tmp_path: Path) -> None:
    """Random bytes make torch's unpickler raise UnpicklingError, IndexError, KeyError or UnicodeDecodeError (seeds
    below found by trying); each must read as an unreadable checkpoint, naming the file, never as a bug."""
    import random

    import torch

    from plpriv.cli import user_error_message

    kinds = set()
    for seed in (0, 2, 20, 195):  # UnpicklingError, IndexError, KeyError, UnicodeDecodeError
        path = tmp_path / f"bad{seed}.ckpt"
        path.write_bytes(random.Random(seed).randbytes(2000))
        with pytest.raises(Exception) as info:
            torch.load(path, weights_only=True, map_location="cpu")
        kinds.add(type(info.value).__name__)
        message = user_error_message(info.value)
        assert message is not None and "checkpoint could not be read" in message and str(path) in message
    assert len(kinds) >= 3  # the seeds do cover several exception types on this torch
    assert user_error_message(IndexError("a bug elsewhere")) is None  # not from torch.load: shown as a bug


def test_gpu_recipe_on_a_cpu_machine_names_the_flags(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = _plpriv(tmp_path, "fit", "-c", str(ROOT / "recipes" / "edm" / "cifar10_uncond.yaml"),
                   "--data.init_args.root", str(tmp_path), "--data.init_args.download", "false",
                   "--model.init_args.fid_feature", "null")
    assert proc.returncode == 2
    _short_error(proc, "asks for GPUs", "--trainer.accelerator cpu")


def test_offline_inception_download_says_where_the_weights_go() -> None:
    """A URLError raised inside torch-fidelity (offline FID) names the weights file and the folder, not the data set."""
    from urllib.error import URLError

    from plpriv.cli import INCEPTION_WEIGHTS, user_error_message

    scope: dict = {"URLError": URLError}
    exec(compile("def fetch():\n    raise URLError('no network')\n", "torch_fidelity/helpers.py", "exec"), scope)
    try:
        scope["fetch"]()
    except URLError as err:
        message = user_error_message(err)
    assert message is not None and INCEPTION_WEIGHTS in message and "fid_feature null" in message
    assert "download: false" not in message
    plain = user_error_message(URLError("no network"))  # a data set download
    assert plain is not None and "download: false" in plain
