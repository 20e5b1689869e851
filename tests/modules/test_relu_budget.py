"""ReLUBudgetClassifier (issue 27): SENet's stages on digits meet the budget, lower the loss, export, resume, parse."""

from __future__ import annotations

import math
import statistics
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything

from plpriv.data import DigitsDataModule
from plpriv.modules.relu_budget import ReLUBudgetClassifier, build_backbone
from plpriv.nets.relu_budget import relu_counts, relu_counts_by_hooks, to_masked
from plpriv.nets.relu_export import load_relu_budget

from _helpers import ROOT

SGD = partial(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True)


def _trainer(epochs: int, **kwargs) -> Trainer:
    return Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def _data() -> DigitsDataModule:
    return DigitsDataModule(batch_size=64, image_size=8, seed=0)


def _batch_losses(module: ReLUBudgetClassifier, batches: list) -> list[float]:
    module.eval()
    with torch.no_grad():
        return [float(F.cross_entropy(module(x), y)) for x, y in batches]


def test_short_run_meets_the_budget_and_lowers_the_loss():
    seed_everything(0)
    data = _data()
    data.setup("fit")
    batches = list(data.train_dataloader())[:12]
    module = ReLUBudgetClassifier(relu_budget=0.25, teacher_epochs=3, mask_epochs=1, shallow_blocks=1,
                                  at_weight=62.5, optimizer=SGD)
    before = _batch_losses(module, batches)  # the untrained all-ReLU net
    trainer = _trainer(6)
    trainer.fit(module, data)
    after = _batch_losses(module, batches)  # the masked student at 25 % of the ReLUs
    diffs = [b - a for b, a in zip(before, after)]
    margin = 4 * statistics.stdev(diffs) / math.sqrt(len(diffs))  # 4 standard errors of the paired mean
    assert statistics.mean(diffs) > margin, (before, after)
    budget = round(0.25 * 4608)
    assert trainer.callback_metrics["relu/count"] == budget == sum(relu_counts(module.net).values())
    assert sum(relu_counts_by_hooks(module.net, torch.zeros(1, 1, 8, 8)).values()) == budget
    assert float(trainer.callback_metrics["val/acc_budget"]) > 0.5  # logged once the masks are frozen
    assert module.plan["shallow"] and module.plan["counts"][f"{module.plan['shallow'][0]}.acts.0"] == 0
    assert all(bool(m.frozen) for m in module.net.modules() if hasattr(m, "frozen"))


def test_export_round_trip_from_the_module(tmp_path):
    seed_everything(0)
    module = ReLUBudgetClassifier(relu_budget=0.1, teacher_epochs=1, mask_epochs=1, shallow_blocks=1,
                                  backbone_kwargs={"widths": [8, 16, 16]}, optimizer=SGD,
                                  export_path=str(tmp_path / "relu.pt"))
    _trainer(3, limit_train_batches=3, limit_val_batches=1).fit(module, _data())
    x = torch.randn(4, 1, 8, 8)
    module.eval()
    masked, merged = load_relu_budget(tmp_path / "relu.pt"), load_relu_budget(tmp_path / "relu.pt", "merged")
    assert torch.equal(masked(x), module(x))
    scale = module(x).abs().max().item()  # a 3-step model's logits are large: compare in float32 relative terms
    assert (merged(x) - module(x)).abs().max().item() < 1e-5 * scale  # the folded inner ReLU had 0 ReLUs
    report = torch.load(tmp_path / "relu.pt", weights_only=True)["report"]
    assert report["folded"] == module.plan["shallow"]
    assert report["merged"]["relus"] == report["masked"]["relus"] == module.budget
    assert len(report["merged"]["relu_counts"]) == len(report["masked"]["relu_counts"]) - 1


def test_teacher_checkpoint_and_allocations(tmp_path):
    seed_everything(0)
    teacher = ReLUBudgetClassifier(teacher_epochs=1, mask_epochs=0, backbone_kwargs={"widths": [8, 8, 8]})
    torch.save(teacher.net.state_dict(), tmp_path / "t.pt")
    for allocation in ("linearize", "uniform"):
        module = ReLUBudgetClassifier(relu_budget=100, allocation=allocation, teacher_epochs=0, mask_epochs=1,
                                      teacher_checkpoint=str(tmp_path / "t.pt"), mask_criterion="relu_gap",
                                      backbone_kwargs={"widths": [8, 8, 8]}, optimizer=SGD)
        assert torch.equal(module.net.conv1.weight, teacher.net.conv1.weight)
        _trainer(1, limit_train_batches=2, limit_val_batches=1).fit(module, _data())
        assert sum(module.plan["counts"].values()) == 100 == sum(relu_counts(module.net).values())
    with pytest.raises(ValueError, match="relu_budget"):
        ReLUBudgetClassifier(relu_budget=1e9)
    with pytest.raises(ValueError, match="allocation"):
        ReLUBudgetClassifier(allocation="random")
    with pytest.raises(ValueError, match="teacher_checkpoint"):
        ReLUBudgetClassifier(teacher_checkpoint=str(tmp_path / "t.pt"))  # widths 16/32/64: does not fit


def test_backbones_torchvision_cifar_stem_and_timm():
    x = torch.zeros(1, 3, 32, 32)
    net = to_masked(build_backbone("torchvision.resnet18", 100, 3, {"cifar_stem": True}), x)
    assert sum(relu_counts(net).values()) == 557056  # SENet's CIFAR ResNet-18
    timm_net = to_masked(build_backbone("resnet18", 10, 1), torch.zeros(1, 1, 32, 32))
    assert sum(relu_counts(timm_net).values()) == 47104


def test_recipe_parses_and_resumes_exactly(tmp_path, monkeypatch):
    """The digits recipe, shrunk: an uninterrupted run and one stopped after stage 1 and resumed end identical."""
    from plpriv.cli import main

    recipe = ROOT / "recipes" / "relu_budget" / "digits_resnet.yaml"
    monkeypatch.setattr("sys.argv", ["plpriv"])
    monkeypatch.chdir(tmp_path)
    tiny = ["--trainer.max_epochs", "4", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--model.init_args.teacher_epochs", "1", "--model.init_args.mask_epochs", "2",
            "--model.init_args.backbone_kwargs", "{widths: [4, 4, 4]}", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu"]

    def fit(out: str, *extra: str) -> dict:
        main(["fit", "-c", str(recipe), "--trainer.logger.init_args.save_dir", out, "--trainer.default_root_dir",
              out, "--model.init_args.export_path", str(tmp_path / out / "relu.pt"), *tiny, *extra])
        (path,) = (tmp_path / out).glob("*/checkpoints/last.ckpt")
        return torch.load(path, map_location="cpu", weights_only=False)

    full = fit("full")
    fit("part", "--trainer.callbacks+=_stop.StopAfterEpochs", "--trainer.callbacks.epochs", "2")
    resumed = fit("part", "--ckpt_path", "last")
    assert resumed["global_step"] == full["global_step"] == 8
    assert resumed["relu_budget_plan"] == full["relu_budget_plan"]
    for key, value in full["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    assert (tmp_path / "full" / "relu.pt").is_file()
