"""A finished run is never lost (issue 25, "Runs lost" 1-3), through the real ``plpriv`` console script: running a
recipe again is refused before any work (the finished run's files keep their bytes and mtimes), a checkpoint of
another model class is refused naming both classes, and ``--ckpt_path best`` loads the checkpoint that the fit's
ModelCheckpoint recorded as best.

One tiny classifier fit (recipes/classifier/digits.yaml as written, shrunk from the command line, lr 0 so that the
monitored checkpoint stays at epoch 0 while last.ckpt is epoch 2) is shared by the tests, which only read it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from plpriv.cli import main

from _helpers import ROOT

PLPRIV = Path(sys.executable).parent / "plpriv"  # the installed console script
CLASSIFIER = ROOT / "recipes" / "classifier" / "digits.yaml"
EDM = ROOT / "recipes" / "edm" / "digits_lora.yaml"
TINY = ["--trainer.max_epochs", "3", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
        "--data.init_args.batch_size", "16", "--data.init_args.image_size", "8",
        "--model.init_args.backbone_kwargs", "{width: 4}", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false"]
_NET = "--model.init_args.net.init_args."
TINY_EDM = [f"{_NET}model_channels", "8", f"{_NET}lora_mlp", "[8]", "--trainer.enable_progress_bar", "false"]
RUN = Path("runs") / "classifier_digits"  # the recipe's fixed run directory, relative to the working directory


def _plpriv(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PLPRIV), *args], cwd=cwd, text=True, capture_output=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Epoch 0" not in proc.stdout + proc.stderr
    (message,) = [line for line in proc.stderr.splitlines() if line.startswith("plpriv: refusing")]
    for needle in needles:
        assert needle in message, message
    return message


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A working directory holding one finished run of the classifier recipe (in ``runs/classifier_digits``)."""
    cwd = tmp_path_factory.mktemp("finished")
    proc = _plpriv(cwd, "fit", "-c", str(CLASSIFIER), *TINY, "--model.init_args.optimizer.init_args.lr", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["plpriv"])  # in-process calls read `args`, not pytest's command line


def _best_recorded(run: Path) -> str:
    """The best checkpoint that the monitored ModelCheckpoint recorded in the run's last.ckpt."""
    states = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["callbacks"]
    (state,) = [s for key, s in states.items() if key.startswith("ModelCheckpoint") and s["monitor"] == "val/acc"]
    return state["best_model_path"]


def test_running_a_recipe_again_is_refused_before_any_work(finished: Path):
    before = _snapshot(finished)
    assert str(RUN / "checkpoints" / "last.ckpt") in before
    proc = _plpriv(finished, "fit", "-c", str(CLASSIFIER), *TINY, "--trainer.max_epochs", "1")
    _refused(proc, "refusing to start a new run", str(RUN / "checkpoints"), "--ckpt_path last",
             "--trainer.logger.init_args.version NAME")
    assert _snapshot(finished) == before  # same files, same bytes, same mtimes: nothing was trained or written


def test_a_new_version_is_a_new_run_and_resumes_with_last(finished: Path, monkeypatch):
    """The way out `--trainer.logger.init_args.version NAME` writes beside the finished run, which stays untouched;
    that new run resumes with `--ckpt_path last` (without the 'directory is not empty' warning)."""
    before = _snapshot(finished)
    monkeypatch.chdir(finished)
    new = ["--trainer.logger.init_args.version", "second"]
    main(["fit", "-c", str(CLASSIFIER), *TINY, *new, "--trainer.max_epochs", "1"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", "-c", str(CLASSIFIER), *TINY, *new, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    second = torch.load(finished / RUN / "second" / "checkpoints" / "last.ckpt", map_location="cpu",
                        weights_only=False)
    assert second["global_step"] == 2 * 3  # resumed after epoch 1 and ran epoch 2
    after = _snapshot(finished)
    assert {k: after[k] for k in before} == before
    assert all(k.startswith(str(RUN / "second")) for k in set(after) - set(before))


@pytest.mark.parametrize("subcommand", ["fit", "predict"])
def test_checkpoint_of_another_model_is_refused(finished: Path, subcommand: str):
    """The quickstart's EDM recipe with the classifier's checkpoint: refused naming both classes, nothing written."""
    ckpt = str(finished / RUN / "checkpoints" / "last.ckpt")
    before = _snapshot(finished)
    proc = _plpriv(finished, subcommand, "-c", str(EDM), *TINY_EDM, "--ckpt_path", ckpt)
    _refused(proc, "refusing to load the checkpoint", ckpt, "plpriv.modules.ImageClassifier", "plpriv.modules.EDM")
    assert _snapshot(finished) == before and not (finished / "runs" / "edm_digits_lora").exists()


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_checkpoint_of_another_model_is_refused_in_process(finished: Path, tmp_path: Path, monkeypatch, capsys,
                                                           subcommand: str):
    monkeypatch.chdir(tmp_path)
    ckpt = str(finished / RUN / "checkpoints" / "last.ckpt")
    with pytest.raises(SystemExit) as info:
        main([subcommand, "-c", str(EDM), *TINY_EDM, "--ckpt_path", ckpt])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "plpriv.modules.ImageClassifier" in err and "plpriv.modules.EDM" in err
    assert not list(tmp_path.iterdir())


def test_checkpoint_without_a_recorded_class_is_compared_by_its_weights(finished: Path, tmp_path: Path, monkeypatch,
                                                                        capsys):
    """A checkpoint written outside LightningCLI records no class: its state_dict keys tell the models apart."""
    monkeypatch.chdir(tmp_path)
    checkpoint = torch.load(finished / RUN / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for key in ("hyper_parameters", "hparams_name"):
        checkpoint.pop(key)
    torch.save(checkpoint, tmp_path / "anonymous.ckpt")
    with pytest.raises(SystemExit) as info:
        main(["predict", "-c", str(EDM), *TINY_EDM, "--ckpt_path", str(tmp_path / "anonymous.ckpt")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "records no model class" in err and "EDM" in err and "anonymous.ckpt" in err


def test_ckpt_path_best_in_validate_loads_the_recorded_best(finished: Path):
    best = _best_recorded(finished / RUN)
    assert Path(best).name.startswith("epoch00-")  # lr 0: no improvement after epoch 0, while last.ckpt is epoch 2
    assert torch.load(finished / RUN / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 2
    before = _snapshot(finished / RUN / "checkpoints")
    proc = _plpriv(finished, "validate", "-c", str(CLASSIFIER), *TINY, "--ckpt_path", "best")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Loaded model weights from the checkpoint at {best}\n" in proc.stdout + proc.stderr
    assert "val/acc" in proc.stdout
    assert _snapshot(finished / RUN / "checkpoints") == before


def test_ckpt_path_best_in_test_loads_the_recorded_best(finished: Path, monkeypatch):
    from plpriv.cli import PlprivCLI

    monkeypatch.chdir(finished)  # the recipe's relative run directory, as a user runs it
    cli = PlprivCLI(args=["test", "-c", str(CLASSIFIER), *TINY, "--ckpt_path", "best"])
    best = _best_recorded(finished / RUN)
    assert Path(cli.trainer.ckpt_path).resolve() == (finished / best).resolve()
    weights = torch.load(finished / best, map_location="cpu", weights_only=False)["state_dict"]
    for key, value in cli.model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0, msg=key)
