"""Every fit recipe resumes exactly with ``--ckpt_path last``: a run interrupted after some epochs and resumed ends at
the same step, with the same weights (and, under DP-SGD, the same privacy accounting) as one that never stopped.

Each recipe runs as written, only shrunk from the command line (tiny network, few batches, small batch); the
interruption is a callback that stops fit after a number of epochs, so the config (and a private run's noise,
calibrated for the full planned length) is the same in both runs. CIFAR-10 recipes read a tiny fake CIFAR-10 that the
test writes in torchvision's format.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml

from plpriv.callbacks import DPSGD
from plpriv.cli import PRIVACY_KEY, main

from _helpers import ROOT

FIT_RECIPES = sorted(
    p for p in (ROOT / "recipes").rglob("*.yaml") if "trainer" in (yaml.safe_load(p.read_text()) or {})
)
_QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
_CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"]
_CLASSIFIER = ["--trainer.max_epochs", "3", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
               "--data.init_args.batch_size", "16", "--data.init_args.image_size", "8",
               "--model.init_args.backbone_kwargs", "{width: 4}"]
_NET = "--model.init_args.net.init_args."
_EDM_DIGITS = ["--trainer.max_epochs", "3", "--trainer.limit_train_batches", "2", "--data.init_args.batch_size", "8",
               f"{_NET}model_channels", "8", f"{_NET}lora_mlp", "[8]"]
# 5 fake training images, 1 for validation: one step of 4 per epoch
_EDM_CIFAR = [*_CPU, "--trainer.benchmark", "false", "--trainer.max_epochs", "20", "--data.init_args.batch_size", "4",
              "--data.init_args.download", "false", "--data.init_args.num_workers", "0",
              "--data.init_args.val_fraction", "0.2", "--model.init_args.fid_feature", "null",
              f"{_NET}model_channels", "8", f"{_NET}channel_mult", "[1, 1]", f"{_NET}num_blocks", "1",
              f"{_NET}lora_mlp", "[8]"]
_DETECTOR = ["--trainer.max_epochs", "3", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
             "--data.init_args.batch_size", "4", "--data.init_args.num_train", "16", "--data.init_args.num_val", "4",
             "--data.init_args.num_test", "4", "--model.init_args.widths", "[4, 4, 8, 8, 8]"]
# Private recipes draw their noise seed from OS entropy (kept in a secret file that resume reads): two separate runs
# differ. A fixed seed on the private callback (the last one in those recipes) makes the uninterrupted run comparable.
_SEED = ["--trainer.callbacks.init_args.seed", "0"]
# recipe -> (overrides, epochs before the interruption, total epochs, training steps per epoch)
TINY: dict[str, tuple[list[str], int, int, int]] = {
    "classifier/digits.yaml": (_CLASSIFIER, 2, 3, 3),
    "classifier/digits_dp.yaml": (_CLASSIFIER, 2, 3, 3),
    "edm/digits_lora.yaml": (_EDM_DIGITS, 2, 3, 2),
    "edm/digits_lora_dp.yaml": (_EDM_DIGITS, 2, 3, 2),
    "sparsified/digits_examples.yaml": (_CLASSIFIER, 2, 3, 3),
    "sparsified/digits_clients.yaml": (["--trainer.max_epochs", "3", "--trainer.limit_train_batches", "3",
                                        "--trainer.limit_val_batches", "1", "--data.init_args.image_size", "8",
                                        "--model.init_args.backbone_kwargs", "{width: 4}"], 2, 3, 3),
    # last.ckpt every 10 epochs in these recipes: interrupted after 10 of 20 one-step epochs
    "edm/cifar10_cond.yaml": (_EDM_CIFAR, 10, 20, 1),
    "edm/cifar10_uncond.yaml": (_EDM_CIFAR, 10, 20, 1),
    "edm/cifar10_cond_lora.yaml": (_EDM_CIFAR, 10, 20, 1),
    "edm/cifar10_uncond_lora.yaml": (_EDM_CIFAR, 10, 20, 1),
    "tspn/digits_binary.yaml": (["--trainer.max_epochs", "3", "--trainer.limit_train_batches", "2",
                                 "--model.init_args.rank", "2", "--data.init_args.batch_size", "20"], 2, 3, 2),
    "loyal/digits_duplicated.yaml": (["--trainer.max_epochs", "3", "--trainer.limit_train_batches", "2",
                                      "--data.init_args.batch_size", "8", f"{_NET}model_channels", "8"], 2, 3, 2),
    "streaming/digits_ftrl.yaml": (_CLASSIFIER, 2, 3, 3),  # fixed order: resumed at an epoch end, as required
    "streaming/digits_clients_rrsc.yaml": (["--trainer.max_epochs", "3", "--trainer.limit_train_batches", "3",
                                            "--data.init_args.num_clients", "30", "--data.init_args.clients_per_round",
                                            "10"], 2, 3, 3),
    "relu_budget/digits_resnet.yaml": (["--trainer.max_epochs", "4", "--trainer.limit_train_batches", "2",
                                        "--trainer.limit_val_batches", "1", "--model.init_args.teacher_epochs", "1",
                                        "--model.init_args.mask_epochs", "2", "--model.init_args.backbone_kwargs",
                                        "{widths: [4, 4, 4]}"], 2, 4, 2),
    "detector/faces_raw_float.yaml": (_DETECTOR, 2, 3, 2),
    "detector/faces_raw_ternary.yaml": (_DETECTOR, 2, 3, 2),
}


# Recipes that cannot run on a CPU test machine without downloads (their resume config is the same ModelCheckpoint).
CANNOT_RUN = {"loyal/sd_finetune.yaml": "needs Stable Diffusion 2.1 weights and a GPU",
              "relu_budget/cifar100_resnet18.yaml": "CIFAR-100 files and a GPU (tests/modules/test_relu_budget.py"
                                                    " runs it on fake files)"}


def _name(recipe: Path) -> str:
    return recipe.relative_to(ROOT / "recipes").as_posix()


def _params() -> list:
    out = []
    for recipe in FIT_RECIPES:
        name = _name(recipe)
        marks = [] if name in TINY else [pytest.mark.slow]  # a new recipe without tiny overrides: opt-in
        if name in CANNOT_RUN:
            marks = [pytest.mark.skip(reason=CANNOT_RUN[name])]
        out.append(pytest.param(recipe, id=name, marks=marks))
    return out


def _private(recipe: Path) -> bool:
    """The recipe trains under DPSGD (or a subclass); its private callback must then be the last one."""
    callbacks = yaml.safe_load(recipe.read_text())["trainer"].get("callbacks") or []
    private = []
    for cb in callbacks:
        module, _, name = cb["class_path"].rpartition(".")
        private.append(issubclass(getattr(importlib.import_module(module), name), DPSGD))
    assert not any(private[:-1]), f"{recipe}: put the private callback last (the seed override targets it)"
    return bool(private) and private[-1]


def _fake_cifar10(root: Path, per_batch: int = 1) -> None:
    """torchvision's CIFAR-10 layout (five training batches and a test batch), random pixels and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": [int(v) for v in rng.integers(0, 10, per_batch)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


def _fit(recipe: Path, out: Path, *extra: str) -> None:
    args = ["fit", "-c", str(recipe), "--trainer.logger.init_args.save_dir", str(out),
            "--trainer.default_root_dir", str(out), *_QUIET, *extra]
    try:
        main(args)
    except SystemExit as err:  # LightningCLI exits on a bad config
        pytest.fail(f"plpriv {' '.join(args)} exited with {err.code}")


def _last(out: Path) -> dict:
    (path,) = out.glob("*/checkpoints/last.ckpt")
    return torch.load(path, map_location="cpu", weights_only=False)


_RECORD = ("accountant", "epsilon", "delta", "steps", "noise_multiplier", "max_grad_norm", "sample_rate")


def _assert_same_privacy(full: dict, resumed: dict, steps: int) -> None:
    """DPSGD's public record (``checkpoint["plpriv_privacy"]``): same accounting in both runs, over all steps."""
    a, b = full[PRIVACY_KEY], resumed[PRIVACY_KEY]
    for key in _RECORD:
        expected = pytest.approx(a[key], rel=1e-9) if isinstance(a[key], float) else a[key]
        assert b[key] == expected, key
    assert a["steps"] == steps and a["epsilon"] > 0


@pytest.mark.parametrize("recipe", _params())
def test_recipe_resumes_exactly(recipe: Path, tmp_path, monkeypatch):
    name = _name(recipe)
    if name not in TINY:
        pytest.fail(f"{name}: add its tiny overrides to TINY in {Path(__file__).name}")
    overrides, stop, total, per_epoch = TINY[name]
    private = _private(recipe)
    overrides = [*overrides, *_SEED] if private else overrides
    monkeypatch.setattr("sys.argv", ["plpriv"])
    monkeypatch.chdir(tmp_path)
    if "cifar10" in name:
        _fake_cifar10(tmp_path / "data")  # the recipes' root: data
        monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)  # md5s

    _fit(recipe, tmp_path / "full", *overrides)
    _fit(recipe, tmp_path / "part", *overrides, "--trainer.callbacks+=_stop.StopAfterEpochs",
         "--trainer.callbacks.epochs", str(stop))
    stopped = _last(tmp_path / "part")
    assert stopped["global_step"] == stop * per_epoch  # last.ckpt is where the run stopped, not an earlier save
    _fit(recipe, tmp_path / "part", *overrides, "--ckpt_path", "last")

    full, resumed = _last(tmp_path / "full"), _last(tmp_path / "part")
    assert resumed["global_step"] == full["global_step"] == total * per_epoch
    for key, value in full["state_dict"].items():  # CPU, one thread, seeded: deterministic
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    if private:
        _assert_same_privacy(full, resumed, total * per_epoch)
    else:
        assert PRIVACY_KEY not in full and PRIVACY_KEY not in resumed


@pytest.mark.parametrize("own_last", [True, False], ids=["recipe-last-checkpoint", "cli-default"])
def test_last_checkpoint_is_the_last_epoch_when_the_monitor_never_improves(own_last: bool, tmp_path, monkeypatch):
    """lr 0: val/acc never improves after epoch 0, so the monitored checkpoint stays at epoch 0; last.ckpt must not,
    whether the recipe has its own last-checkpoint callback or only Lightning's `save_last` (the CLI adds one)."""
    monkeypatch.setattr("sys.argv", ["plpriv"])
    monkeypatch.chdir(tmp_path)
    recipe = ROOT / "recipes" / "classifier" / "digits.yaml"
    if not own_last:  # the recipe as it was: only the monitored checkpoint, with save_last
        config = yaml.safe_load(recipe.read_text())
        callbacks = config["trainer"]["callbacks"]
        config["trainer"]["callbacks"] = [c for c in callbacks if c["init_args"].get("filename") != "last"]
        assert len(config["trainer"]["callbacks"]) == len(callbacks) - 1
        config["trainer"]["callbacks"][0]["init_args"]["save_last"] = True
        recipe = tmp_path / "monitor_only.yaml"
        recipe.write_text(yaml.safe_dump(config))
    _fit(recipe, tmp_path, *_CLASSIFIER, "--model.init_args.optimizer.init_args.lr", "0")
    (best,) = tmp_path.glob("*/checkpoints/epoch*.ckpt")
    assert best.name.startswith("epoch00-")  # the scenario under test: no improvement after the first epoch
    assert _last(tmp_path)["global_step"] == 3 * 3
    assert [p.name for p in tmp_path.glob("*/checkpoints/last*.ckpt")] == ["last.ckpt"]  # no stale last-v1.ckpt


def test_private_recipe_resumes_its_drawn_seed_with_the_same_accounting(tmp_path, monkeypatch):
    """As written (noise seed from OS entropy, kept in the secret file beside the checkpoints): the resumed run ends
    at the same step with the same accounting as an uninterrupted one (whose noise differs, so weights are not
    compared)."""
    monkeypatch.setattr("sys.argv", ["plpriv"])
    monkeypatch.chdir(tmp_path)
    recipe = ROOT / "recipes" / "classifier" / "digits_dp.yaml"
    _fit(recipe, tmp_path / "full", *_CLASSIFIER)
    _fit(recipe, tmp_path / "part", *_CLASSIFIER, "--trainer.callbacks+=_stop.StopAfterEpochs",
         "--trainer.callbacks.epochs", "2")
    _fit(recipe, tmp_path / "part", *_CLASSIFIER, "--ckpt_path", "last")
    full, resumed = _last(tmp_path / "full"), _last(tmp_path / "part")
    assert resumed["global_step"] == full["global_step"] == 9
    _assert_same_privacy(full, resumed, 9)
