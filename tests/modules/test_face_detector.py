"""TernaryFaceDetector: target encoding/decoding, a tiny ternary fit on RAW scenes, box PNGs, input checks."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torchmetrics.detection import MeanAveragePrecision

from plpriv.data import FaceScenesDataModule
from plpriv.modules import TernaryFaceDetector
from plpriv.nets.face_detector import decode, encode_targets
from plpriv.nets.ternary import TernaryConv2d


def test_decoding_the_encoded_targets_gives_the_boxes_back():
    targets = [{"boxes": torch.tensor([[4.0, 8.0, 20.0, 28.0], [40.0, 36.0, 60.0, 58.0]]), "labels": torch.zeros(2, dtype=torch.long)},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    heat, reg, mask, count = encode_targets(targets, (64, 64), stride=4)
    assert heat.shape == (2, 1, 16, 16) and count == 2 and heat[0, 0, 4, 3] == 1.0  # centre (12, 18) / 4
    logit = torch.logit(heat.clamp(1e-4, 1 - 1e-4))
    preds = decode(torch.cat([logit, reg], 1), stride=4, min_score=0.5)
    metric = MeanAveragePrecision(iou_thresholds=[0.5])
    metric.update(preds, targets)
    assert metric.compute()["map_50"].item() == pytest.approx(1.0)
    got = preds[0]["boxes"][preds[0]["boxes"][:, 0].argsort()]
    torch.testing.assert_close(got, targets[0]["boxes"], atol=1e-4, rtol=0)


def test_tiny_ternary_fit_reaches_a_nontrivial_map_and_draws_boxes(tmp_path):
    seed_everything(0)
    dm = FaceScenesDataModule(num_train=128, num_val=32, num_test=8, image_size=64, face_size=(16, 32), batch_size=16)
    model = TernaryFaceDetector(widths=(8, 16, 16, 16, 16), quantization="ternary", num_log_images=4,
                                optimizer=partial(torch.optim.AdamW, lr=1e-2))
    assert any(isinstance(m, TernaryConv2d) for m in model.modules())
    trainer = Trainer(max_epochs=10, accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="", version=""),
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    before = trainer.validate(model, dm, verbose=False)[0]["val/map50"]
    trainer.fit(model, dm)
    after = trainer.callback_metrics["val/map50"].item()
    assert after > 0.15 and after > before + 0.1, (before, after)
    pngs = sorted(p.name for p in (tmp_path / "val_boxes").glob("*.png"))
    assert "epoch009.png" in pngs


def test_input_checks():
    model = TernaryFaceDetector(widths=(4, 4, 4, 4, 4))
    with pytest.raises(ValueError, match="in_chans"):
        model.training_step((torch.zeros(1, 3, 16, 16), [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}]), 0)
    with pytest.raises(ValueError, match="quantization"):
        TernaryFaceDetector(quantization="binary")
