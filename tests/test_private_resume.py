"""A checkpoint trained under DP-SGD is only continued under DP-SGD; private runs have their own run directories."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer

from plpriv.callbacks import DPSGD
from plpriv.cli import PRIVACY_KEY, PlprivCLI, PrivateCheckpointError, _PrivateCheckpointGuard, _resolve_ckpt_path
from plpriv.cli import check_private_resume

from _helpers import ROOT

BASE = ROOT / "recipes" / "classifier" / "digits.yaml"
DP_FRAGMENT = ROOT / "callbacks" / "dp_sgd.yaml"
RECORD = {"mechanism": "dp-sgd", "accountant": "prv", "epsilon": 2.3, "delta": 1e-5, "steps": 480,
          "noise_multiplier": 1.1, "max_grad_norm": 1.0, "sample_rate": 0.01}
PLPRIV = Path(sys.executable).parent / "plpriv"  # the installed console script


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["plpriv"])


def _trainer(tmp_path: Path, *configs: Path) -> Trainer:
    args = [a for c in (BASE, *configs) for a in ("-c", str(c))]
    cli = PlprivCLI(args=[*args, "--trainer.logger.init_args.save_dir", str(tmp_path),
                          "--trainer.default_root_dir", str(tmp_path)], run=False)
    return cli.trainer


def _fake_checkpoint(path: Path, private: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, **({PRIVACY_KEY: RECORD} if private else {})}, path)
    return path


def test_refusal_through_the_console_script(tmp_path):
    """`plpriv fit RECIPE --ckpt_path last` on a DP checkpoint stops before anything is trained or written."""
    run_dir = tmp_path / "classifier_digits"
    _fake_checkpoint(run_dir / "checkpoints" / "last.ckpt", private=True)
    result = subprocess.run(
        [str(PLPRIV), "fit", "-c", str(BASE), "--trainer.logger.init_args.save_dir", str(tmp_path),
         "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", "last"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "refusing to resume" in result.stderr and "epsilon=2.3" in result.stderr
    assert "-c callbacks/dp_sgd.yaml" in result.stderr and "ImageClassifier.load_from_checkpoint(PATH)" in result.stderr
    assert "init_checkpoint PATH" not in result.stderr  # ImageClassifier has no such argument
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints"]  # no config.yaml, no logs
    assert "Epoch 0" not in result.stdout + result.stderr


def test_the_key_is_the_one_dpsgd_writes():
    from plpriv.callbacks import dp_sgd

    assert dp_sgd.PRIVACY_RECORD_KEY == PRIVACY_KEY


def test_check_private_resume(tmp_path):
    private = _fake_checkpoint(tmp_path / "private.ckpt", private=True)
    public = _fake_checkpoint(tmp_path / "public.ckpt", private=False)
    plain = Trainer(logger=False, enable_checkpointing=False)
    with pytest.raises(PrivateCheckpointError, match="without privacy"):
        check_private_resume(plain, private)
    check_private_resume(plain, public)
    check_private_resume(plain, None)
    check_private_resume(plain, "last")  # nothing to resume: no checkpoint callback, nothing found
    private_trainer = Trainer(logger=False, enable_checkpointing=False,
                              callbacks=[DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.1)])
    check_private_resume(private_trainer, private)  # DPSGD itself checks noise, clipping and accountant


def test_guard_sees_the_checkpoint_fit_loads():
    plain = Trainer(logger=False, enable_checkpointing=False)
    with pytest.raises(PrivateCheckpointError, match="callbacks/dp_sgd.yaml"):
        _PrivateCheckpointGuard().on_load_checkpoint(plain, None, {PRIVACY_KEY: RECORD})
    _PrivateCheckpointGuard().on_load_checkpoint(plain, None, {"state_dict": {}})
    private = Trainer(logger=False, enable_checkpointing=False, callbacks=[DPSGD(dataset_size=48, max_grad_norm=1, noise_multiplier=1)])
    _PrivateCheckpointGuard().on_load_checkpoint(private, None, {PRIVACY_KEY: RECORD})


def test_dp_fragment_has_its_own_run_directory(tmp_path):
    """The fragment moves the run to <recipe run dir>/dp_sgd: the recipe's `--ckpt_path last` never finds its
    checkpoints, and the fragment's finds them."""
    plain, private = _trainer(tmp_path), _trainer(tmp_path, DP_FRAGMENT)
    assert Path(plain.log_dir) == tmp_path / "classifier_digits"
    assert Path(private.log_dir) == tmp_path / "classifier_digits" / "dp_sgd"
    assert any(isinstance(cb, DPSGD) for cb in private.callbacks)
    dp_last = _fake_checkpoint(tmp_path / "classifier_digits" / "dp_sgd" / "checkpoints" / "last.ckpt", True)
    assert _resolve_ckpt_path(plain, "last") is None
    assert Path(_resolve_ckpt_path(private, "last")) == dp_last


@pytest.mark.parametrize("private", sorted((ROOT / "recipes").rglob("*_dp.yaml")), ids=lambda p: p.name)
def test_private_recipes_log_elsewhere_than_their_public_twins(private: Path):
    public = private.with_name(private.name.replace("_dp.yaml", ".yaml"))
    names = [yaml.safe_load(p.read_text())["trainer"]["logger"]["init_args"]["name"] for p in (private, public)]
    assert names[0] != names[1] and names[0].endswith("_dp")


def test_real_dp_checkpoint_is_refused_without_dpsgd_and_resumed_with_it(tmp_path, monkeypatch):
    """End to end: a tiny DP-SGD fit, then the non-private recipe on its checkpoint (refused), then the private
    recipe (resumes)."""
    from plpriv.cli import main

    monkeypatch.chdir(tmp_path)
    dp = ROOT / "recipes" / "classifier" / "digits_dp.yaml"
    tiny = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--data.init_args.batch_size",
            "16", "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--trainer.max_epochs", "2"]  # the noise is calibrated for 2 epochs; the first run stops after 1
    main(["fit", "-c", str(dp), *tiny, "--trainer.callbacks+=_stop.StopAfterEpochs", "--trainer.callbacks.epochs", "1"])
    last = tmp_path / "classifier_digits_dp" / "checkpoints" / "last.ckpt"
    if PRIVACY_KEY not in torch.load(last, map_location="cpu", weights_only=False):
        pytest.skip(f"DPSGD does not write checkpoint[{PRIVACY_KEY!r}] yet")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(BASE), *tiny, "--ckpt_path", str(last)])
    assert exit_info.value.code == 2
    main(["fit", "-c", str(dp), *tiny, "--ckpt_path", "last"])
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4


def test_refusal_suggests_what_the_model_has():
    """The fresh-start hint names --model.init_args.init_checkpoint only for modules that take it (EDM), else the
    module's load_from_checkpoint (ImageClassifier has no such argument)."""
    from plpriv.cli import _refusal
    from plpriv.modules import EDM, ImageClassifier

    record = {"mechanism": "dp-sgd", "epsilon": 1.0, "steps": 3}
    classifier = _refusal("x.ckpt", record, ImageClassifier())
    assert "init_checkpoint PATH" not in classifier and "ImageClassifier.load_from_checkpoint(PATH)" in classifier
    edm = _refusal("x.ckpt", record, EDM.__new__(EDM))
    assert "--model.init_args.init_checkpoint PATH (EDM)" in edm
