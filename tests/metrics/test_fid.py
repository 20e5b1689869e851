"""FID with a pluggable feature network: Frechet distance vs an independent scipy computation, classifier features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg
from torch import nn

from plpriv.metrics import FID, ClassifierFeatures, inception_available
from plpriv.nets import SmallCNN


def frechet_scipy(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


class Flatten(nn.Module):
    num_features = 4

    def forward(self, x):
        return x.flatten(1)


def test_fid_matches_scipy_frechet_distance_on_identity_features() -> None:
    g = torch.Generator().manual_seed(0)
    real = (torch.randn(400, 1, 2, 2, generator=g) * 0.3).clamp(-1, 1)  # images live in [-1, 1]
    fake = (torch.randn(300, 1, 2, 2, generator=g) * torch.tensor([0.2, 0.4, 0.3, 0.1]).view(1, 1, 2, 2) + 0.1).clamp(-1, 1)
    fid = FID(Flatten(), input_shape=(1, 2, 2))
    fid.update(real[:250], real=True)
    fid.update(real[250:], real=True)
    fid.update(fake, real=False)
    expected = frechet_scipy(real.flatten(1).double().numpy(), fake.flatten(1).double().numpy())
    assert fid.compute().item() == pytest.approx(expected, rel=1e-4)


def test_fid_of_gaussians_approaches_closed_form() -> None:
    """N(0, I) vs N(m, s^2 I) in d dims: FID = |m|^2 + d (1 - s)^2."""
    g = torch.Generator().manual_seed(1)
    fid = FID(Flatten(), input_shape=(1, 2, 2))
    fid.update(torch.randn(40000, 1, 2, 2, generator=g) * 0.2, real=True)
    fid.update(torch.randn(40000, 1, 2, 2, generator=g) * 0.1 + 0.15, real=False)
    closed = 4 * 0.15**2 + 4 * (0.2 - 0.1) ** 2
    assert fid.compute().item() == pytest.approx(closed, rel=0.03)


def test_classifier_features_are_penultimate_activations_and_hidden() -> None:
    torch.manual_seed(2)
    clf = SmallCNN(in_chans=1, num_classes=10)
    feats = ClassifierFeatures(clf)
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    clf.eval()
    with torch.no_grad():
        torch.testing.assert_close(feats(x), clf.forward_features(x).flatten(1))
        torch.testing.assert_close(feats.logits(x), clf(x))
    assert feats.num_features == clf.head.in_features
    # Not in parameters/state_dict of the wrapper nor of a metric holding it; frozen, stays in eval mode.
    fid = FID(feats, input_shape=(1, 16, 16))
    assert list(fid.parameters()) == [] and not any("head" in k for k in fid.state_dict())
    fid.train()
    assert not clf.training and not any(p.requires_grad for p in clf.parameters())
    fid.to(torch.float64)
    assert clf.head.weight.dtype == torch.float64


def test_classifier_features_from_lightning_checkpoint(tmp_path) -> None:
    import lightning.pytorch as pl

    from plpriv.modules import ImageClassifier

    torch.manual_seed(3)
    model = ImageClassifier(num_classes=10, in_chans=1)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)
    path = tmp_path / "clf.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match="class_path"):
        ClassifierFeatures(checkpoint_path=str(path))
    feats = ClassifierFeatures(checkpoint_path=str(path), class_path="plpriv.modules.ImageClassifier")
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(feats.logits(x), model(x))
    # As written by the plpriv CLI (LightningCLI stores the class in `_class_path`).
    ckpt = torch.load(path, weights_only=False)
    ckpt["hyper_parameters"]["_class_path"] = "plpriv.modules.ImageClassifier"
    torch.save(ckpt, path)
    torch.testing.assert_close(ClassifierFeatures(checkpoint_path=str(path)).logits(x), feats.logits(x))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ClassifierFeatures()
    with pytest.raises(ValueError, match="layer"):
        ClassifierFeatures(SmallCNN(), layer="nope")
    with pytest.raises(ValueError, match="N, C, H, W"):
        FID(Flatten(), input_shape=(1, 2, 2)).update(torch.zeros(4, 4), real=True)
    if not inception_available():
        with pytest.raises(ValueError, match="torch-fidelity"):
            FID()
