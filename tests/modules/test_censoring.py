"""Reward models of censored sampling: the weighted BCE, training on a few labels, ensembles as EDM guidance."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer

from plpriv.data.crossed_digits import CrossedDigitsDataModule
from plpriv.modules import EDM
from plpriv.modules.censoring import (RewardEnsemble, RewardForwardGuidance, RewardGuidance, RewardModel,
                                      censoring_guidance, weighted_bce)
from plpriv.nets import SongUNet
from plpriv.runners.censoring import train_reward_model
from plpriv.sampling import ForwardGuidance, ScoreGuidance


def test_weighted_bce_is_the_papers_formula() -> None:
    g = torch.Generator().manual_seed(0)
    r = torch.randn(64, generator=g, dtype=torch.float64) * 3
    y = (torch.rand(64, generator=g) < 0.5).double()
    for alpha in (0.005, 0.02, 1.0, 3.0):
        s = 1 / (1 + np.exp(-r.numpy()))
        by_hand = np.mean(-alpha * y.numpy() * np.log(s) - (1 - y.numpy()) * np.log(1 - s))
        assert math.isclose(float(weighted_bce(r, y, alpha)), by_hand, rel_tol=1e-10)


def _crossed_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """10 malign + 10 benign training images and every other crossed 7 (held out)."""
    dm = CrossedDigitsDataModule(image_size=8, malign_fraction=0.2, seed=0)
    dm.setup()
    x, y = dm.train_base.tensors
    idx = torch.cat([(y == 0).nonzero()[:10, 0], (y == 1).nonzero()[:10, 0]])
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[idx] = False
    x_held = torch.cat([x[rest], dm.val_dataset.tensors[0], dm.test_dataset.tensors[0]])
    y_held = torch.cat([y[rest], dm.val_dataset.tensors[1], dm.test_dataset.tensors[1]])
    return x[idx], y[idx], x_held, y_held


def test_reward_training_separates_held_out_noisy_images() -> None:
    """20 labels, 200 steps: at sigma 0.05 every held-out benign 7 scores above every malign one (27 malign, 132
    benign). Measured over seeds 0-1: benign min 0.29 / malign max -1.33, group mean gap 3.3 vs spreads 0.26, 0.11."""
    x, y, x_held, y_held = _crossed_split()
    model = train_reward_model(x, y, steps=200, pos_weight=1.0, seed=0)
    noisy = x_held + 0.05 * torch.randn(x_held.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        r = model(noisy, 0.05)
    benign, malign = r[y_held == 1], r[y_held == 0]
    assert len(malign) >= 20 and float(benign.min()) > float(malign.max())
    assert float(benign.mean() - malign.mean()) > 3 * float(benign.std() + malign.std())


def test_pos_weight_lowers_the_benign_logits() -> None:
    """BCE_alpha's minimiser at a point with benign probability p is logit(alpha p / (alpha p + 1 - p)): alpha < 1
    moves every logit down (the paper's down-weighting of the abundant benign class)."""
    x, y, x_held, _ = _crossed_split()
    models = [train_reward_model(x, y, steps=100, pos_weight=a, seed=0, time_dependent=False) for a in (0.02, 1.0)]
    with torch.no_grad():
        low, high = (m(x_held) for m in models)
    assert float(low.mean()) < float(high.mean()) - 1.0


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    x, y, _, _ = _crossed_split()
    out = tmp_path_factory.mktemp("rewards")
    paths = [out / f"reward_{k}.ckpt" for k in range(2)]
    for k, p in enumerate(paths):
        train_reward_model(x, y, steps=5, seed=k, out_path=p)
    train_reward_model(x, y, steps=5, seed=0, time_dependent=False, out_path=out / "clean.ckpt")
    return paths + [out / "clean.ckpt"]


def test_reward_ensemble_is_the_sum_of_log_sigmoids(checkpoints: list[Path]) -> None:
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((6,), 0.7)
    members = [RewardModel.load_from_checkpoint(str(p)).eval() for p in checkpoints[:2]]
    ensemble = RewardEnsemble([str(p) for p in checkpoints[:2]])
    with torch.no_grad():
        expected = sum(F.logsigmoid(m(x, sigma)) for m in members)
        torch.testing.assert_close(ensemble(x, sigma), expected)
        torch.testing.assert_close(RewardEnsemble([str(checkpoints[0])])(x, sigma), F.logsigmoid(members[0](x, sigma)))
    assert isinstance(censoring_guidance([str(p) for p in checkpoints[:2]], 2.0), ScoreGuidance)
    assert isinstance(censoring_guidance([str(checkpoints[2])], 2.0), ForwardGuidance)
    with pytest.raises(ValueError, match="mix"):
        RewardEnsemble([str(checkpoints[0]), str(checkpoints[2])])
    with pytest.raises(ValueError, match="RewardForwardGuidance"):
        RewardGuidance([str(checkpoints[2])])
    with pytest.raises(ValueError, match="RewardGuidance"):
        RewardForwardGuidance([str(checkpoints[0])])


def _tiny_edm(**kwargs) -> EDM:
    torch.manual_seed(0)
    net = SongUNet(img_resolution=8, in_channels=1, out_channels=1, label_dim=0, model_channels=16,
                   channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0.0)
    return EDM(net, sampler_kwargs={"num_steps": 4}, predict_num_samples=6, predict_batch_size=6, **kwargs)


def test_predict_with_ensemble_guidance_writes_samples(checkpoints: list[Path], tmp_path: Path) -> None:
    ckpts = [str(p) for p in checkpoints[:2]]
    results = {}
    for name, guidance in (("plain", None), ("zero", RewardGuidance(ckpts, 0.0)),
                           ("guided", RewardGuidance(ckpts, 5.0)),
                           ("forward", RewardForwardGuidance([str(checkpoints[2])], 5.0))):
        model = _tiny_edm(guidance=guidance, predict_dir=str(tmp_path / name))
        trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.predict(model)
        with np.load(tmp_path / name / "samples.npz") as data:
            results[name] = data["images"]
        assert results[name].shape == (6, 8, 8, 1)
    np.testing.assert_array_equal(results["zero"], results["plain"])  # weight 0: the unguided sampler exactly
    assert np.abs(results["guided"].astype(int) - results["plain"]).max() > 0
    assert np.abs(results["forward"].astype(int) - results["plain"]).max() > 0
