from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from plpriv.metrics.replication import ReplicationScore


def _brute_force(queries: torch.Tensor, refs: torch.Tensor, exclude_self: bool = False):
    """Pairwise loop with torch's own cosine_similarity: (max, argmax) per query."""
    best, arg = [], []
    for i, q in enumerate(queries):
        sims = [F.cosine_similarity(q.flatten(), r.flatten(), dim=0).item() for r in refs]
        if exclude_self:
            sims[i] = -np.inf
        best.append(max(sims))
        arg.append(int(np.argmax(sims)))
    return torch.tensor(best), torch.tensor(arg)


def test_planted_copies_are_found() -> None:
    g = torch.Generator().manual_seed(0)
    train = torch.rand(400, 1, 8, 8, generator=g) * 2 - 1
    planted = torch.tensor([3, 77, 150, 399])
    fresh = torch.rand(12, 1, 8, 8, generator=g) * 2 - 1
    copies = train[planted] + 0.02 * torch.randn(4, 1, 8, 8, generator=g)
    metric = ReplicationScore(train, threshold=0.9, batch_size=64)
    metric.update(fresh)
    metric.update(copies)
    sims, idx = metric.per_sample()
    assert idx[12:].tolist() == planted.tolist()
    assert bool((sims[12:] > 0.99).all()) and bool((sims[:12] < 0.9).all())
    out = metric.compute()
    assert out["fraction_above"].item() == pytest.approx(4 / 16)
    # Random images: background well below a copy.
    assert out["background_p95"].item() < 0.9


def test_matches_brute_force_loop_with_chunking_and_dataloader() -> None:
    g = torch.Generator().manual_seed(1)
    train = torch.randn(37, 2, 3, 3, generator=g)
    gen = torch.randn(23, 2, 3, 3, generator=g)
    loader = DataLoader(TensorDataset(train, torch.zeros(37)), batch_size=10)
    metric = ReplicationScore(loader, batch_size=5, threshold=0.3, background_queries=None)  # forces many blocks
    metric.update(gen[:11])
    metric.update(gen[11:])
    sims, idx = metric.per_sample()
    ref_sims, ref_idx = _brute_force(gen, train)
    torch.testing.assert_close(sims, ref_sims, rtol=0, atol=1e-5)
    assert idx.tolist() == ref_idx.tolist()
    out = metric.compute()
    bg, _ = _brute_force(train, train, exclude_self=True)
    np.testing.assert_allclose(out["mean"].item(), ref_sims.mean().item(), atol=1e-6)
    np.testing.assert_allclose(out["p95"].item(), np.percentile(ref_sims.numpy(), 95), atol=1e-5)
    np.testing.assert_allclose(out["fraction_above"].item(), (ref_sims > 0.3).float().mean().item())
    np.testing.assert_allclose(out["background_mean"].item(), bg.mean().item(), atol=1e-6)
    np.testing.assert_allclose(out["background_p95"].item(), np.percentile(bg.numpy(), 95), atol=1e-5)


def test_background_subset_excludes_only_self_and_keeps_duplicates() -> None:
    g = torch.Generator().manual_seed(2)
    train = torch.randn(30, 16, generator=g)
    train[20] = train[5]  # an exact duplicate: its background similarity must be 1
    metric = ReplicationScore(train, batch_size=7, background_queries=30)
    bg = metric.background()
    ref, _ = _brute_force(train, train, exclude_self=True)
    torch.testing.assert_close(bg, ref, rtol=0, atol=1e-5)
    assert bg[5].item() == pytest.approx(1.0) and bg[20].item() == pytest.approx(1.0)
    sub = ReplicationScore(train, batch_size=7, background_queries=10, seed=3).background()
    assert sub.shape == (10,) and set(np.round(sub.numpy(), 5)) <= set(np.round(ref.numpy(), 5))


def test_user_network_features_and_centering() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten())
    train, gen = torch.randn(19, 1, 5, 5), torch.randn(6, 1, 5, 5)
    with torch.no_grad():
        ft, fg = net(train), net(gen)
    metric = ReplicationScore(train, feature=net, center=True, batch_size=4)
    metric.update(gen)
    sims, idx = metric.per_sample()
    mean = ft.mean(0)
    ref_sims, ref_idx = _brute_force(fg - mean, ft - mean)
    torch.testing.assert_close(sims, ref_sims, rtol=0, atol=1e-5)
    assert idx.tolist() == ref_idx.tolist()


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_sscd_torchscript_loading(tmp_path) -> None:
    # A stand-in TorchScript descriptor (the real one is a 512-d ResNet-50): check preprocessing and loading.
    torch.manual_seed(0)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 8))
    path = tmp_path / "sscd.pt"
    torch.jit.save(torch.jit.trace(model, torch.randn(1, 3, 320, 320)), str(path))
    train, gen = torch.rand(5, 1, 8, 8) * 2 - 1, torch.rand(2, 1, 8, 8) * 2 - 1
    metric = ReplicationScore(train, feature="sscd", sscd_path=str(path))
    metric.update(gen)

    def reference_features(x):  # SSCD's skew_320 preprocessing, written out
        x = ((x + 1) / 2).expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(320, 320), mode="bilinear", antialias=True)
        mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
        with torch.no_grad():
            return model((x - mean) / std)

    ref_sims, ref_idx = _brute_force(reference_features(gen), reference_features(train))
    sims, idx = metric.per_sample()
    torch.testing.assert_close(sims, ref_sims, rtol=0, atol=1e-5)
    assert idx.tolist() == ref_idx.tolist()


def test_argument_errors() -> None:
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="sscd_path"):
        ReplicationScore(x, feature="sscd")
    with pytest.raises(ValueError, match="feature"):
        ReplicationScore(x, feature="clip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold"):
        ReplicationScore(x, threshold=2.0)
    with pytest.raises(TypeError, match="reference batches"):
        ReplicationScore([{"image": x}]).update(x)


def test_tens_of_thousands_of_references_in_blocks() -> None:
    # 30k references, 512-wide blocks: memory O(512^2); result equals one dense similarity matrix.
    g = torch.Generator().manual_seed(4)
    train = torch.randn(30_000, 12, generator=g)
    gen = torch.randn(40, 12, generator=g)
    gen[7] = train[29_999]
    metric = ReplicationScore(train, batch_size=512, background_queries=64)
    metric.update(gen)
    sims, idx = metric.per_sample()
    dense = F.normalize(gen, dim=1) @ F.normalize(train, dim=1).T
    torch.testing.assert_close(sims, dense.max(1).values)
    assert idx.tolist() == dense.argmax(1).tolist() and idx[7].item() == 29_999
    assert metric.compute()["background_mean"].isfinite()
