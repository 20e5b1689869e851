"""TSPN LightningModule: metrics against direct computation, NLL training, and exact resume from a checkpoint."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from plpriv.data import BinaryDensityDataModule
from plpriv.modules import TSPN
from plpriv.modules.tspn import BitsPerDim, LogLikelihood


def test_metrics_accumulate_over_batches():
    values = torch.tensor([-3.0, -1.0, -2.5, -4.5, -0.5])
    ll, bpd = LogLikelihood(), BitsPerDim(num_vars=4)
    for chunk in values.split(2):
        ll.update(chunk)
        bpd.update(chunk)
    assert ll.compute().item() == pytest.approx(-11.5 / 5)
    assert bpd.compute().item() == pytest.approx(11.5 / 5 / (4 * math.log(2)))
    with pytest.raises(ValueError, match="1-d"):
        ll.update(values[None])
    with pytest.raises(TypeError, match="batch"):
        TSPN(num_vars=4).training_step("not a tensor", 0)


def _module(init_seed: int = 0) -> TSPN:
    return TSPN(num_vars=64, rank=3, init_seed=init_seed, em_init_steps=3, optimizer=partial(torch.optim.Adam, lr=0.05),
                lr_scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=4))


def _trainer(tmp_path, max_epochs: int) -> Trainer:
    return Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)],
    )


def test_training_improves_test_ll_and_resume_is_exact(tmp_path):
    dm = BinaryDensityDataModule(batch_size=128)
    seed_everything(0)
    full = _module()
    before = full(dm.split_tensor("test")).mean().item()
    _trainer(tmp_path / "full", 4).fit(full, dm)
    test = _trainer(tmp_path / "full", 4).test(full, dm, verbose=False)[0]
    direct = full(dm.split_tensor("test")).mean().item()  # the metric against a direct mean over the split
    assert test["test/ll"] == pytest.approx(direct, abs=1e-4)
    assert test["test/bpd"] == pytest.approx(-direct / (64 * math.log(2)), abs=1e-5)
    assert direct > before + 5  # NLL training moved well away from the initial cores

    seed_everything(0)
    part = _module()
    first = _trainer(tmp_path / "part", 2)
    first.fit(part, dm)
    seed_everything(1)  # a resumed run depends neither on the global seed nor on the fresh module's cores
    resumed = _module(init_seed=5)  # (nor runs the EM initialisation again)
    second = _trainer(tmp_path / "part", 4)
    second.fit(resumed, dm, ckpt_path=str(tmp_path / "part" / "ckpt" / "last.ckpt"))
    assert second.global_step == 4 * math.ceil(len(dm.split_tensor("train")) / 128)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_num_vars_from_datamodule_learnt_order_and_converged_em_are_checkpointed(tmp_path):
    """num_vars comes from the datamodule; the Chow-Liu order is learnt from the training split only and saved with
    the weights; converged EM reports its steps (em/steps) and they are fewer than the cap."""
    from plpriv.nets.variable_order import chow_liu_order

    dm = BinaryDensityDataModule(batch_size=256)
    seed_everything(0)
    model = TSPN(rank=2, order="chow_liu", em_init_steps=200, em_tol=1e-2, em_patience=2)
    assert model.net is None
    trainer = _trainer(tmp_path, 1)
    trainer.fit(model, dm)
    assert model.net.num_vars == dm.num_vars == 64
    assert model.net.order.tolist() == chow_liu_order(dm.split_tensor("train"))
    steps = trainer.callback_metrics["em/steps"].item()
    assert steps == model.em_steps_taken.item() and 2 <= steps < 200
    restored = TSPN.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert torch.equal(restored.net.order, model.net.order)
    x = dm.split_tensor("test")
    assert torch.allclose(restored(x), model(x))
    with pytest.raises(ValueError, match="datamodule has 64"):
        bad = TSPN(num_vars=10, em_init_steps=0)
        _trainer(tmp_path / "bad", 1).fit(bad, dm)
