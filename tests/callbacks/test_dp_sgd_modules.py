"""DPSGD on plpriv's own modules (ImageClassifier, EDM) and on modules with extra forward passes.

Facts: the optimizer steps exactly once per (Poisson) batch with the DP update (the parameters move although the
learning-rate scheduler is stepped on the wrapped optimizer); opacus' hooks record activations only in training mode
with grad enabled, so an EMA / sampling pass under no_grad is invisible, while a stray training-mode forward pass
without backward would pair the next backward with the wrong activations and must be refused.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from _dp_toy import ToyClassifier, ToyData
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

from plpriv.callbacks import DPSGD
from plpriv.modules import EDM, ImageClassifier
from plpriv.nets import SongUNet


def _trainer(tmp_path: Path, dp: DPSGD, **kwargs: Any) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                   default_root_dir=tmp_path, callbacks=[dp], **kwargs)


class _Images(ToyData):
    def __init__(self, n: int = 40, batch_size: int = 8, size: int = 16) -> None:
        super().__init__(n=n, batch_size=batch_size)
        self.size = size

    def setup(self, stage: str) -> None:
        g = torch.Generator().manual_seed(0)
        images = torch.rand(self.n, 1, self.size, self.size, generator=g) * 2 - 1
        self.dataset = TensorDataset(images, torch.randint(0, 10, (self.n,), generator=g))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_image_classifier_with_scheduler(tmp_path: Path, precision: str) -> None:
    model = ImageClassifier(backbone="small_cnn", num_classes=10, in_chans=1, norm="group",
                            optimizer=partial(torch.optim.SGD, lr=0.1),
                            lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))
    before = [p.detach().clone() for p in model.parameters()]
    dp = DPSGD(dataset_size=40, max_grad_norm=1.0, noise_multiplier=1.0, seed=0, accountant="rdp", target_delta=1e-5)
    trainer = _trainer(tmp_path, dp, max_epochs=2, precision=precision)
    trainer.fit(model, _Images())
    assert dp.steps == trainer.global_step == 10  # 5 Poisson batches per epoch
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)  # scheduler saw the steps
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.filterwarnings("ignore:DPSGD.*on_before_optimizer_step")  # EDM's hook also cleans the per-sample grads
def test_edm_trains_privately(tmp_path: Path) -> None:
    net = SongUNet(img_resolution=8, in_channels=1, out_channels=1, label_dim=10, model_channels=8,
                   channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1, attn_resolutions=[4], dropout=0.0)
    model = EDM(net=net, num_val_samples=2, sample_batch_size=2)
    ema_before = [p.detach().clone() for p in model.ema.parameters()]
    clean = model.on_before_optimizer_step

    def poisoned(optimizer: torch.optim.Optimizer) -> None:  # a NaN in example 0's per-sample gradients, then EDM's
        for p in model.net.parameters():
            if getattr(p, "grad_sample", None) is not None:
                p.grad_sample[0] = float("nan")
        clean(optimizer)

    model.on_before_optimizer_step = poisoned  # type: ignore[method-assign]
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, seed=0, accountant="rdp", target_delta=1e-5)
    _trainer(tmp_path, dp, max_steps=2).fit(model, _Images(size=8))
    assert dp.steps == 2
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, model.ema.parameters()))  # EMA followed
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())  # nan_to_num before the DP clipping
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


class _ExtraForward(ToyClassifier):
    """Does a second training-mode forward pass in training_step (e.g. a consistency metric)."""

    def __init__(self, under_no_grad: bool) -> None:
        super().__init__()
        self.under_no_grad = under_no_grad

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.under_no_grad:
            with torch.no_grad():
                self(batch[0])
        else:
            self(batch[0])
        return loss


def test_extra_forward_pass_must_not_record_activations(tmp_path: Path) -> None:
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, seed=0, accountant="rdp", target_delta=1e-5)
    _trainer(tmp_path, dp, max_steps=3).fit(_ExtraForward(under_no_grad=True), ToyData())
    assert dp.steps == 3
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=1.0, seed=0, accountant="rdp", target_delta=1e-5)
    with pytest.raises(RuntimeError, match=r"`net\.0` kept activations.*torch\.no_grad"):
        _trainer(tmp_path, dp, max_steps=3).fit(_ExtraForward(under_no_grad=False), ToyData())


def test_unused_private_parameter_gets_zero_per_sample_gradient(tmp_path: Path) -> None:
    class Unused(ToyClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.spare = torch.nn.Linear(3, 3)  # in the optimizer, never used in the loss

    model = Unused()
    spare = model.spare.weight.detach().clone()
    dp = DPSGD(dataset_size=48, max_grad_norm=1.0, noise_multiplier=0.0, seed=0, accountant="rdp", target_delta=1e-5)
    _trainer(tmp_path, dp, max_steps=2).fit(model, ToyData())
    assert dp.steps == 2 and torch.equal(model.spare.weight, spare)  # zero gradient, zero noise: unchanged


def test_plain_dataloader_from_a_module_hook(tmp_path: Path) -> None:
    class WithLoader(ToyClassifier):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(torch.randn(24, 5), torch.randint(0, 3, (24,))), batch_size=6)

    model = WithLoader()
    dp = DPSGD(dataset_size=24, max_grad_norm=1.0, noise_multiplier=1.0, seed=0, accountant="rdp", target_delta=1e-5)
    _trainer(tmp_path, dp, max_steps=4).fit(model)
    assert dp.steps == 4 and dp.sample_rate == pytest.approx(1 / 4)
    assert "train_dataloader" not in vars(model)  # the hook wrapper was removed at teardown
