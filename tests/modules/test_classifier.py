"""ImageClassifier: backbones, input checks, and the digits recipe end to end (accuracy, exact resume, DDP)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from plpriv.data import DigitsDataModule
from plpriv.modules import ImageClassifier

from _helpers import ROOT, run_plpriv

RECIPE = ROOT / "recipes" / "classifier" / "digits.yaml"


def test_small_cnn_and_timm_backbones_have_no_batchnorm_with_group_norm():
    for backbone in ("small_cnn", "resnet10t"):
        model = ImageClassifier(backbone, num_classes=10, in_chans=1, norm="group")
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    batchnorm = ImageClassifier("resnet10t", in_chans=1, norm="batch")
    assert any(isinstance(m, nn.BatchNorm2d) for m in batchnorm.modules())


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="not_a_model"):
        ImageClassifier("not_a_model")
    model = ImageClassifier(in_chans=1)
    with pytest.raises(ValueError, match="in_chans"):
        model.training_step((torch.randn(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)), 0)


def test_optimizer_and_scheduler_callables_are_used():
    model = ImageClassifier(
        optimizer=lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1),
    )
    config = model.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.SGD) and config["optimizer"].defaults["lr"] == 0.5
    assert isinstance(config["lr_scheduler"], torch.optim.lr_scheduler.StepLR)


def _load_weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def _accuracy(state_dict: dict[str, torch.Tensor]) -> float:
    """Accuracy on the recipe's validation split, computed here (independently of the module's own metric)."""
    model = ImageClassifier()
    model.load_state_dict(state_dict)
    model.eval()
    dm = DigitsDataModule(seed=0)
    dm.setup()
    x, y = dm.val_dataset.tensors
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _fit(tmp_path, name: str, *extra: str):
    result = run_plpriv(
        ["fit", "-c", str(RECIPE), "--trainer.logger.init_args.save_dir", str(tmp_path),
         "--trainer.logger.init_args.name", name, "--trainer.enable_progress_bar", "false", *extra],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    return tmp_path / name


def test_digits_recipe_accuracy_and_exact_resume(tmp_path):
    """The recipe reaches >= 95% val accuracy; stopped after 4 of 10 epochs and resumed with ``--ckpt_path last``,
    it ends at the same global step with the same weights as the uninterrupted run."""
    full = _fit(tmp_path, "full")
    full_ckpt = torch.load(full / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert _accuracy(full_ckpt["state_dict"]) >= 0.95
    assert (full / "config.yaml").exists()  # the resolved config is saved next to the logs

    part = _fit(tmp_path, "part", "--trainer.max_epochs", "4")
    stopped = torch.load(part / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert stopped["global_step"] == 4 * math.ceil(1437 / 64)
    resumed = _fit(tmp_path, "part", "--ckpt_path", "last")
    final = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)

    assert final["global_step"] == full_ckpt["global_step"] == 10 * math.ceil(1437 / 64)
    for key, value in full_ckpt["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.distributed
def test_ddp_two_cpu_processes(tmp_path):
    result = run_plpriv(
        ["fit", "-c", str(RECIPE), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
         "--trainer.strategy", "ddp", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
         "--trainer.logger.init_args.save_dir", str(tmp_path)],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "GLOBAL_RANK: 0" in result.stdout and "GLOBAL_RANK: 1" in result.stdout
    ckpt = torch.load(tmp_path / "classifier_digits" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)
    # Each rank sees half of the 1437 training images: half the steps of a single-process epoch.
    assert ckpt["global_step"] == math.ceil(math.ceil(1437 / 2) / 64)
