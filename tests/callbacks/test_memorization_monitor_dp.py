"""MemorizationMonitor under differential privacy: training-set statistics are refused before the first step.

Facts used:
* Under DP only the mechanism's output (the weights) is covered by epsilon; samples from fixed seeded latents are a
  function of the weights (post-processing), a statistic of the training set is not (plpriv/privacy/contract.py).
* The replication score of a sample is the top-1 cosine similarity of its (reference-mean centred) pixels to the
  reference set's, and ``replication_index`` is the argmax (Somepalli et al. 2023), recomputed here by brute force.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from plpriv.callbacks import DPSGD
from plpriv.callbacks.memorization_monitor import MemorizationMonitor
from plpriv.privacy.contract import PrivateTraining, PublicBatch

# A fixed DPSGD seed keeps these tests deterministic; its "replayable noise" warning is not what they check.
pytestmark = pytest.mark.filterwarnings(r"ignore:DPSGD\(seed=0\)")

SHAPE = (1, 4, 4)
N_TRAIN, N_REF = 8, 11


class FakePrivateTraining(Callback):
    """The smallest callback that satisfies the PrivateTraining protocol (no actual DP-SGD)."""

    @property
    def public_batch(self) -> PublicBatch | None:
        return PublicBatch(expected_batch_size=2.0, sample_rate=0.25)

    def get_epsilon(self, delta: float | None = None) -> float:
        return 1.0


class GaussianDenoiser(nn.Module):
    """Exact denoiser of N(0, diag(v)): samples are generic points, neither training nor reference images."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("v", torch.linspace(0.5, 4.0, 16).reshape(SHAPE))

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        s2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1) ** 2
        return self.v / (self.v + s2) * x


class Module(pl.LightningModule):
    """A linear regressor on the training images (trainable by DP-SGD) carrying a fixed denoiser."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(16, 1)
        self.denoiser = GaussianDenoiser()
        self.steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.steps += 1
        x, _ = batch
        return self.head(x.flatten(1)).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def train_images() -> Tensor:
    return torch.randn(N_TRAIN, *SHAPE, generator=torch.Generator().manual_seed(0))


def reference_images() -> Tensor:
    return torch.randn(N_REF, *SHAPE, generator=torch.Generator().manual_seed(1))


def real_dp() -> DPSGD:
    return DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, sample_rate=0.25, target_delta=1e-5, accountant="rdp",
                 seed=0, plot=False)


def fit(
    tmp_path: Path, monitor: MemorizationMonitor, dp: Callback | None, epochs: int = 1
) -> tuple[pl.Trainer, Module]:
    loader = DataLoader(TensorDataset(train_images(), torch.zeros(N_TRAIN, dtype=torch.long)), batch_size=2)
    callbacks = [cb for cb in (dp, monitor) if cb is not None]
    callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True))
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path, name="", version=0),
        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
    )
    module = Module()
    trainer.fit(module, loader)
    return trainer, module


def rows(tmp_path: Path) -> list[dict[str, str]]:
    with (tmp_path / "version_0" / "memorization_scores.csv").open() as f:
        return list(csv.DictReader(f))


def brute_force_nearest(samples: Tensor, reference: Tensor, center: bool) -> tuple[Tensor, Tensor]:
    """Top-1 cosine similarity (and argmax) of each sample's pixels among the reference images', double precision."""
    ref = reference.double().flatten(1)
    q = samples.double().flatten(1)
    if center:
        mean = ref.mean(0)
        ref, q = ref - mean, q - mean
    sims = F.normalize(q, dim=1) @ F.normalize(ref, dim=1).T
    return sims.max(dim=1)


def test_stand_in_satisfies_the_protocol() -> None:
    assert isinstance(FakePrivateTraining(), PrivateTraining)
    assert isinstance(real_dp(), PrivateTraining)


# --------------------------------------------------------------------------- (a) refused before the first step
@pytest.mark.parametrize("dp_kind", ["stand_in", "dpsgd"])
@pytest.mark.parametrize(
    ("options", "match"),
    [(dict(replication=True), "replication_reference"), (dict(source="train"), "source='generated'")],
)
def test_training_set_statistics_are_refused_before_any_step(
    tmp_path: Path, dp_kind: str, options: dict[str, Any], match: str
) -> None:
    dp = FakePrivateTraining() if dp_kind == "stand_in" else real_dp()
    monitor = MemorizationMonitor(num_samples=3, sigma=0.5, k=2, num_steps=4, **options)
    loader = DataLoader(TensorDataset(train_images(), torch.zeros(N_TRAIN, dtype=torch.long)), batch_size=2)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path, name="", version=0),
        callbacks=[dp, monitor, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
        enable_progress_bar=False, enable_model_summary=False,
    )
    module = Module()
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match=match) as err:
        trainer.fit(module, loader)
    assert "DP" in str(err.value) and "allow_private_statistics" in str(err.value)
    assert trainer.global_step == 0 and module.steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert not list(tmp_path.rglob("memorization_scores.csv"))
    assert not list(tmp_path.rglob("*.ckpt"))
    assert not list(tmp_path.rglob("*.png"))
    assert monitor.history == []


def test_manual_run_under_dp_is_refused_too() -> None:
    monitor = MemorizationMonitor(num_samples=2, sigma=0.5, k=2, source="train")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[FakePrivateTraining(), monitor],
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="source='train'"):
        monitor.run(trainer, Module())


def test_generated_samples_without_replication_are_allowed_under_dp(tmp_path: Path) -> None:
    monitor = MemorizationMonitor(num_samples=3, sigma=0.5, k=2, num_steps=4, img_shape=SHAPE)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*allow_private_statistics.*")
        trainer, _ = fit(tmp_path, monitor, FakePrivateTraining())
    assert trainer.global_step > 0
    r = rows(tmp_path)
    assert len(r) == 3 and "replication" not in r[0] and "replication_index" not in r[0]


# --------------------------------------------------------------------------- (b) a public reference set
@pytest.mark.parametrize(("dp_kind", "as_dataset", "center"),
                         [("dpsgd", True, True), ("dpsgd", False, False), ("none", True, True)])
def test_replication_is_computed_against_the_public_reference(
    tmp_path: Path, dp_kind: str, as_dataset: bool, center: bool
) -> None:
    ref = reference_images()
    reference = TensorDataset(ref, torch.zeros(N_REF, dtype=torch.long)) if as_dataset else ref
    monitor = MemorizationMonitor(num_samples=6, sigma=0.5, k=2, num_steps=6, replication=True,
                                  replication_reference=reference, replication_center=center, batch_size=4)
    captured: list[dict[str, Any]] = []
    score = monitor._score
    monitor._score = lambda *a: captured.append(score(*a)) or captured[-1]  # type: ignore[method-assign]
    dp = real_dp() if dp_kind == "dpsgd" else None
    trainer, module = fit(tmp_path, monitor, dp)
    assert trainer.global_step > 0
    if dp is not None:
        assert dp.steps == trainer.global_step and dp.get_epsilon() > 0
    samples = captured[0]["samples"]
    assert samples.shape == (6, *SHAPE)  # shape taken from the reference set (the module declares none)
    sims, idx = brute_force_nearest(samples, ref, center)
    r = rows(tmp_path)
    assert len(r) == 6
    assert [int(x["replication_index"]) for x in r] == idx.tolist()
    assert [float(x["replication"]) for x in r] == pytest.approx(sims.tolist(), rel=1e-4, abs=1e-5)
    # Not the training set's answer: the training-set nearest neighbours differ.
    train_sims, _ = brute_force_nearest(samples, train_images(), center)
    assert not torch.allclose(train_sims, sims, atol=1e-3)
    assert max(idx.tolist()) < N_REF and monitor.history[0]["replication_mean"] == pytest.approx(
        sims.mean().item(), rel=1e-4)


# --------------------------------------------------------------------------- (c) the explicit opt-in
def test_opt_in_computes_training_set_statistics_and_warns_once(tmp_path: Path) -> None:
    monitor = MemorizationMonitor(num_samples=3, sigma=0.5, k=2, num_steps=4, replication=True,
                                  allow_private_statistics=True, img_shape=SHAPE, replication_center=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, monitor, FakePrivateTraining(), epochs=2)
    ours = [w for w in caught if "allow_private_statistics" in str(w.message)]
    assert len(ours) == 1
    assert "NOT covered" in str(ours[0].message) and "memorization_scores.csv" in str(ours[0].message)
    r = rows(tmp_path)
    assert len(r) == 6 and all(0 <= int(x["replication_index"]) < N_TRAIN for x in r)
    assert len(monitor.history) == 2


def test_without_dp_the_opt_in_is_silent(tmp_path: Path) -> None:
    monitor = MemorizationMonitor(num_samples=2, sigma=0.5, k=2, source="train", allow_private_statistics=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, monitor, None)
    assert not [w for w in caught if "allow_private_statistics" in str(w.message)]
    assert len(rows(tmp_path)) == 2
