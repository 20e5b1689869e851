from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from plpriv.callbacks.memorization_monitor import MemorizationMonitor

SHAPE = (1, 4, 4)


class PointsDenoiser(nn.Module):
    """Exact denoiser of the uniform mixture of the training points: a model that memorised everything."""

    def __init__(self, points: Tensor) -> None:
        super().__init__()
        self.register_buffer("points", points.flatten(1))
        self.modes: list[bool] = []

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        self.modes.append(self.training)
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1).expand(x.shape[0])
        flat = x.reshape(x.shape[0], -1).to(self.points.dtype)
        logits = -((flat[:, None] - self.points[None]) ** 2).sum(-1) / (2 * sigma[:, None].to(flat.dtype) ** 2)
        return (torch.softmax(logits, -1) @ self.points).reshape(x.shape).to(x.dtype)


class GaussianDenoiser(nn.Module):
    """Exact denoiser of N(0, diag(v)): generalising, the Hessian is -diag(1/(v + s^2)) everywhere."""

    def __init__(self, v: Tensor) -> None:
        super().__init__()
        self.register_buffer("v", v.reshape(SHAPE))

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        s2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1) ** 2
        return self.v / (self.v + s2) * x


class Module(pl.LightningModule):
    def __init__(self, denoiser: nn.Module, attr: str = "denoiser") -> None:
        super().__init__()
        setattr(self, attr, denoiser)
        self.w = nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _points() -> Tensor:
    return torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(0))


def _fit(tmp_path: Path, module: pl.LightningModule, monitor: MemorizationMonitor, epochs: int, **kw) -> pl.Trainer:
    loader = DataLoader(TensorDataset(_points(), torch.zeros(6, dtype=torch.long)), batch_size=6)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=CSVLogger(tmp_path, name="", version=0), callbacks=[monitor],
        enable_progress_bar=False, enable_model_summary=False, **kw,
    )
    trainer.fit(module, loader)
    return trainer


def _rows(tmp_path: Path) -> list[dict[str, str]]:
    with (tmp_path / "version_0" / "memorization_scores.csv").open() as f:
        return list(csv.DictReader(f))


def test_memorising_model_is_flagged_and_replicates(tmp_path: Path) -> None:
    points = _points()
    den = PointsDenoiser(points)
    monitor = MemorizationMonitor(num_samples=5, sigma=0.1, k=4, num_steps=8, threshold=0.5, replication=True,
                                  replication_center=False, replication_threshold=0.99, batch_size=3)
    _fit(tmp_path, Module(den), monitor, epochs=1, enable_checkpointing=False)
    # Samples of the exact mixture denoiser are training points: Hessian -I/s^2, normalised eigenvalues -1.
    assert monitor.history[0]["rate"] == 1.0
    assert monitor.history[0]["score_mean"] == pytest.approx(1.0, abs=1e-3)
    rows = _rows(tmp_path)
    assert len(rows) == 5 and all(r["memorized"] == "1" for r in rows)
    assert all(float(r["replication"]) > 0.999 for r in rows)
    assert monitor.history[0]["replication_fraction"] == 1.0
    # Every call ran in eval mode; the module is back in train mode afterwards.
    assert den.modes and not any(den.modes) and den.training
    png = list((tmp_path / "version_0" / "memorization").glob("eigenvalues_epoch0000.png"))
    assert png
    logged = (tmp_path / "version_0" / "metrics.csv").read_text()
    assert "memorization/rate" in logged and "memorization/replication_mean" in logged


def test_generalising_gaussian_scores_match_closed_form(tmp_path: Path) -> None:
    v = torch.linspace(0.5, 4.0, 16)
    sigma, k = 0.5, 4
    monitor = MemorizationMonitor(num_samples=3, sigma=sigma, k=k, source="train", threshold=0.5, num_iters=16,
                                  denoiser_attr="ema")
    _fit(tmp_path, Module(GaussianDenoiser(v), attr="ema"), monitor, epochs=1, enable_checkpointing=False)
    # Normalised eigenvalues -s^2/(v + s^2); the k largest (flattest) belong to the k largest variances.
    expected = (sigma**2 / (v[-k:] + sigma**2)).mean().item()
    rows = _rows(tmp_path)
    assert len(rows) == 3
    for r in rows:
        assert float(r["score"]) == pytest.approx(expected, rel=1e-4)
        assert float(r["max_eig_normalized"]) == pytest.approx(-sigma**2 / (4.0 + sigma**2), rel=1e-4)
        assert float(r["min_eig_normalized"]) == pytest.approx(-sigma**2 / (0.5 + sigma**2), rel=1e-4)
        assert r["memorized"] == "0"
    assert monitor.history[0]["rate"] == 0.0


def test_getter_protocol_every_n_epochs_and_resume(tmp_path: Path) -> None:
    class GetterModule(Module):
        def ema_denoiser(self) -> nn.Module:
            return self.net

    def monitor() -> MemorizationMonitor:
        return MemorizationMonitor(every_n_epochs=2, num_samples=2, sigma=0.1, k=2, num_steps=4, source="train")

    first = monitor()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    loader = DataLoader(TensorDataset(_points(), torch.zeros(6, dtype=torch.long)), batch_size=6)
    common = dict(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                  logger=CSVLogger(tmp_path, name="", version=0))
    pl.Trainer(max_epochs=2, callbacks=[first, ckpt], **common).fit(GetterModule(PointsDenoiser(_points()), "net"), loader)
    assert [h["epoch"] for h in first.history] == [1.0]
    resumed = monitor()
    pl.Trainer(max_epochs=4, callbacks=[resumed], **common).fit(
        GetterModule(PointsDenoiser(_points()), "net"), loader, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [h["epoch"] for h in resumed.history] == [1.0, 3.0]  # epoch 1 restored from the checkpoint
    assert resumed.history[0] == first.history[0]
    # Fixed seeds: the resumed history equals an uninterrupted run's.
    straight = monitor()
    common["logger"] = CSVLogger(tmp_path / "straight", name="", version=0)
    pl.Trainer(max_epochs=4, callbacks=[straight], enable_checkpointing=False, **common).fit(
        GetterModule(PointsDenoiser(_points()), "net"), loader)
    assert resumed.history == straight.history


def test_non_zero_rank_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pl.Trainer, "is_global_zero", property(lambda self: False))
    monitor = MemorizationMonitor(num_samples=2, sigma=0.1, k=2, source="train")
    _fit(tmp_path, Module(PointsDenoiser(_points())), monitor, epochs=1, enable_checkpointing=False)
    assert monitor.history == []
    assert not (tmp_path / "version_0" / "memorization_scores.csv").exists()


def test_argument_errors_and_missing_denoiser(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="every_n_epochs"):
        MemorizationMonitor(every_n_epochs=0)
    with pytest.raises(ValueError, match="source"):
        MemorizationMonitor(source="val")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sigma"):
        MemorizationMonitor(sigma=0.0)
    with pytest.raises(ValueError, match="num_iters"):
        MemorizationMonitor(k=8, num_iters=4)
    monitor = MemorizationMonitor(num_samples=2, sigma=0.1, k=2, source="train", denoiser_attr="nope")
    with pytest.raises(AttributeError, match="denoiser_attr"):
        _fit(tmp_path, Module(PointsDenoiser(_points())), monitor, epochs=1, enable_checkpointing=False)
