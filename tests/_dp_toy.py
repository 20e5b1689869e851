"""Tiny user-side LightningModules and data for the DPSGD tests (deliberately not from plpriv)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


PROBE_CALLS = 3  # DPSGD's first private step runs training_step 3 extra times (the per-example independence probe)


def toy_tensors(n: int = 48, features: int = 5, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y.clamp(max=classes - 1)


class ToyData(LightningDataModule):
    def __init__(self, n: int = 48, batch_size: int = 8, features: int = 5, seed: int = 0) -> None:
        super().__init__()
        self.n, self.batch_size, self.features, self.seed = n, batch_size, features, seed

    def setup(self, stage: str) -> None:
        self.dataset = TensorDataset(*toy_tensors(self.n, self.features, seed=self.seed))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True)


class ToyClassifier(LightningModule):
    """Linear -> (norm) -> tanh -> Linear, mean cross-entropy, plain SGD."""

    def __init__(self, features: int = 5, hidden: int = 8, classes: int = 3, lr: float = 0.5, norm: str = "none",
                 seed: int = 0, per_sample: bool = False) -> None:
        super().__init__()
        self.per_sample = per_sample
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Linear(features, hidden)]
        if norm == "batch":
            layers.append(nn.BatchNorm1d(hidden))
        elif norm == "group":
            layers.append(nn.GroupNorm(2, hidden))
        self.net = nn.Sequential(*layers, nn.Tanh(), nn.Linear(hidden, classes))
        self.lr = lr
        self.seen_batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.seen_batch_sizes.append(len(y))
        return F.cross_entropy(self(x), y, reduction="none" if self.per_sample else "mean")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ZeroGradModel(LightningModule):
    """A loss with zero gradient: every DP-SGD update is pure noise."""

    def __init__(self, features: int = 5, width: int = 64) -> None:
        super().__init__()
        self.inp = nn.Linear(features, width, bias=False)
        self.layer = nn.Linear(width, width)
        self.calls = 0

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.calls += 1
        x, _ = batch
        return (self.layer(self.inp(x)) * 0.0).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)


class ToyGAN(LightningModule):
    """Manual optimization with two optimizers: optimizer 1 (the discriminator) sees the private data."""

    def __init__(self, features: int = 5) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, features))
        self.discriminator = nn.Sequential(nn.Linear(features, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, _ = batch
        opt_g, opt_d = self.optimizers()
        # discriminator on real (private) data only; the fake term is computed without per-sample hooks
        opt_d.zero_grad()
        real = F.binary_cross_entropy_with_logits(self.discriminator(x).squeeze(1), torch.ones(len(x)))
        self.manual_backward(real)
        opt_d.step()
        # generator step: the discriminator is frozen by toggling, so no per-sample gradients are recorded for it
        self.toggle_optimizer(opt_g)
        z = torch.randn(8, 2)
        fake = F.binary_cross_entropy_with_logits(self.discriminator(self.generator(z)).squeeze(1), torch.ones(8))
        opt_g.zero_grad()
        self.manual_backward(fake)
        opt_g.step()
        self.untoggle_optimizer(opt_g)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.SGD(self.generator.parameters(), lr=0.1),
            torch.optim.SGD(self.discriminator.parameters(), lr=0.1),
        ]
