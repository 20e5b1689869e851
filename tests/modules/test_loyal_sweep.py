"""LoyalDiffusion.sweep_thresholds: one model per threshold, replication/quality numbers checked by brute force, the
"best trade-off" rule checked on hand-made rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from plpriv.metrics import ReplicationScore
from plpriv.modules import LoyalDiffusion
from plpriv.modules.loyal import select_best_threshold
from plpriv.nets import SongUNet

CFG = dict(img_resolution=8, in_channels=1, out_channels=1, label_dim=10, model_channels=8, channel_mult=[1, 2],
           num_blocks=1, attn_resolutions=[], dropout=0.0)


def test_sweep_trains_one_model_per_threshold_and_scores_its_samples() -> None:
    g = torch.Generator().manual_seed(0)
    train = torch.rand(20, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.arange(20) % 10
    loader = DataLoader(TensorDataset(train, labels), batch_size=10)
    torch.manual_seed(1)
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(),
                                     torch.nn.Linear(16, 10))
    rep = ReplicationScore(train, center=True, threshold=0.3, background_queries=None)
    out = LoyalDiffusion.sweep_thresholds(
        lambda: SongUNet(**CFG), [0.5, 3.0], loader, rep, classifier, max_steps=2, num_samples=12,
        fid_reference=train, duplicated=[0, 1], trainer_kwargs={"accelerator": "cpu"}, num_val_samples=0,
        sampler_kwargs={"num_steps": 3}, lr_rampup_img=0)
    rows, samples = out["rows"], out["samples"]
    assert [r["sigma_threshold"] for r in rows] == [0.5, 3.0] and [r["steps"] for r in rows] == [2, 2]
    assert samples[0].shape == (12, 1, 8, 8) and not torch.equal(samples[0], samples[1])  # two trained models
    centred = F.normalize((train - train.mean(0)).flatten(1), dim=1)
    for row, x in zip(rows, samples):
        # brute force: top-1 cosine similarity of mean-centred pixels to every training image
        sims, nearest = (F.normalize((x - train.mean(0)).flatten(1), dim=1) @ centred.T).max(1)
        assert row["sim_p95"] == pytest.approx(float(torch.quantile(sims.double(), 0.95)), abs=1e-5)
        assert row["frac_above"] == pytest.approx(float((sims > 0.3).float().mean()))
        assert row["frac_dup_replicas"] == pytest.approx(float(((nearest < 2) & (sims > 0.3)).float().mean()))
        with torch.no_grad():
            acc = (classifier(x).argmax(1) == torch.arange(12) % 10).float().mean()
        assert row["class_acc"] == pytest.approx(float(acc))
        assert row["cfid"] > 0 and row["train_s"] > 0
    assert out["best"] in rows and "sim_p95" in out["rule"]


def test_best_is_the_lowest_p95_at_comparable_accuracy() -> None:
    rows = [{"sigma_threshold": 0.5, "sim_p95": 0.80, "frac_above": 0.0, "class_acc": 0.70},  # too inaccurate
            {"sigma_threshold": 1.0, "sim_p95": 0.90, "frac_above": 0.2, "class_acc": 0.89},
            {"sigma_threshold": 2.0, "sim_p95": 0.90, "frac_above": 0.1, "class_acc": 0.90},  # p95 tie: fewer replicas
            {"sigma_threshold": 3.4, "sim_p95": 0.95, "frac_above": 0.3, "class_acc": 0.91}]
    assert select_best_threshold(rows, accuracy_tolerance=0.02)["sigma_threshold"] == 2.0
    assert select_best_threshold(rows, accuracy_tolerance=0.25)["sigma_threshold"] == 0.5
    assert select_best_threshold(rows, accuracy_tolerance=0.0)["sigma_threshold"] == 3.4
    # by the replica fraction instead: 2.0 (0.1) among the accurate ones
    assert select_best_threshold(rows, 0.02, replication_key="frac_above")["sigma_threshold"] == 2.0
    assert select_best_threshold(rows, 0.25, replication_key="frac_above")["sigma_threshold"] == 0.5
    with pytest.raises(ValueError, match="replication_key 'p99'"):
        select_best_threshold(rows, replication_key="p99")
    with pytest.raises(ValueError, match="at least one row"):
        select_best_threshold([])


def test_sweep_rejects_a_threshold_outside_the_sampler_range_before_training() -> None:
    loader = DataLoader(TensorDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)), batch_size=2)
    rep = ReplicationScore(torch.zeros(4, 1, 8, 8))
    with pytest.raises(ValueError, match="outside the sampler's noise range"):
        LoyalDiffusion.sweep_thresholds(lambda: SongUNet(**CFG), [100.0], loader, rep, max_steps=1)
