"""The base of every unlearning module: an original classifier checkpoint, a forget spec, D_f / D_r / test loaders.

A module starts from the weights of an original :class:`plpriv.modules.ImageClassifier` checkpoint (``original``),
splits the training set of its DataModule into the forget set D_f and the retain set D_r, and trains for ``epochs``
epochs with SGD (momentum, weight decay: the SalUn recipes). The DataModule is attached with :meth:`attach_data`
(``plpriv unlearn`` does this), because the module chooses its own training loaders (D_r, D_f or both).

Forget specs: ``forget_classes`` (one class or several: every training sample of those classes) or
``forget_fraction`` (a seeded random fraction of the training samples, e.g. 0.1).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from plpriv.data.base import EpochSeededRandomSampler
from plpriv.metrics.idi import sequential_chain
from plpriv.modules.classifier import ImageClassifier


class FlaggedSubset(Dataset):
    """``(x, y, is_forget)`` items of the chosen positions of a ``(x, y)`` dataset."""

    def __init__(self, base: Dataset, indices: list[int], forget: set[int]) -> None:
        self.base, self.indices, self.forget = base, list(indices), forget

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int, bool]:
        x, y = self.base[self.indices[i]][:2]
        return x, int(y), self.indices[i] in self.forget


def dataset_labels(dataset: Dataset) -> Tensor:
    """The labels of a ``(x, y)`` dataset (fast path for TensorDatasets)."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) >= 2:
        return tensors[1].long()
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])  # type: ignore[arg-type]


class UnlearningModule(LightningModule):
    """Shared machinery; subclasses implement :meth:`unlearning_loss` and choose :attr:`train_sets`.

    Args:
        original: path of the original ImageClassifier checkpoint (Lightning ``.ckpt``).
        forget_classes: forget every training sample of these classes (class-wise forgetting).
        forget_fraction: forget this seeded random fraction of the training samples (``forget_seed``).
        forget_seed: seed of the random forget set and of every random choice of the method.
        epochs: training epochs of the method.
        lr, momentum, weight_decay: SGD settings.
        batch_size: batch size of the training loaders (evaluation uses the DataModule's).
    """

    #: which training set the method reads: "retain", "forget" or "both" (D_r u D_f, flagged); a method with its
    #: own loader (SCRUB) overrides :meth:`train_dataloader`
    train_sets: str = "retain"

    def __init__(
        self,
        original: str,
        forget_classes: list[int] | None = None,
        forget_fraction: float | None = None,
        forget_seed: int = 0,
        epochs: int = 5,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        batch_size: int = 64,
    ) -> None:
        super().__init__()
        if (forget_classes is None) == (forget_fraction is None):
            raise ValueError("give exactly one forget spec: `forget_classes` (e.g. [0]) or `forget_fraction` "
                             f"(e.g. 0.1); got forget_classes={forget_classes!r}, forget_fraction={forget_fraction!r}")
        if forget_fraction is not None and not 0 < forget_fraction < 1:
            raise ValueError(f"`forget_fraction` must be in (0, 1), got {forget_fraction!r}")
        if epochs < 1 or batch_size < 1 or lr < 0:
            raise ValueError(f"`epochs`, `batch_size` >= 1 and `lr` >= 0 required, got {epochs}, {batch_size}, {lr}")
        self.save_hyperparameters()
        classifier = ImageClassifier.load_from_checkpoint(original, map_location="cpu")
        self.num_classes = int(classifier.hparams.num_classes)
        bad = [c for c in forget_classes or [] if not 0 <= c < self.num_classes]
        if bad or (forget_classes is not None and len(set(forget_classes)) in (0, self.num_classes)):
            raise ValueError(f"`forget_classes` must be 1..{self.num_classes - 1} distinct classes in "
                             f"0..{self.num_classes - 1}, got {forget_classes!r}")
        self.net = classifier.net
        self.classifier_hparams = dict(classifier.hparams)
        self.datamodule: LightningDataModule | None = None
        self.forget_indices: list[int] = []
        self.retain_indices: list[int] = []

    # -- data ------------------------------------------------------------------------------------------------------
    def attach_data(self, datamodule: LightningDataModule) -> UnlearningModule:
        """Use ``datamodule``'s ``train_dataset`` (split into D_f / D_r) and ``test_dataset``."""
        if not isinstance(datamodule, LightningDataModule):
            raise TypeError(f"`datamodule` must be a LightningDataModule, got {type(datamodule).__name__}")
        self.datamodule = datamodule
        datamodule.setup("fit")
        train = datamodule.train_dataset
        labels = dataset_labels(train)
        if self.hparams.forget_classes is not None:
            mask = torch.isin(labels, torch.tensor(self.hparams.forget_classes))
        else:
            gen = torch.Generator().manual_seed(self.hparams.forget_seed)
            mask = torch.zeros(len(labels), dtype=torch.bool)
            count = max(1, round(self.hparams.forget_fraction * len(labels)))
            mask[torch.randperm(len(labels), generator=gen)[:count]] = True
        self.forget_indices = mask.nonzero().flatten().tolist()
        self.retain_indices = (~mask).nonzero().flatten().tolist()
        if not self.forget_indices or not self.retain_indices:
            raise ValueError(f"the forget spec leaves D_f ({len(self.forget_indices)}) or D_r "
                             f"({len(self.retain_indices)}) empty: choose classes present in the training data")
        return self

    def _require_data(self) -> LightningDataModule:
        if self.datamodule is None:
            raise RuntimeError(f"{type(self).__name__} has no data: call `attach_data(datamodule)` first, or run the"
                               " recipe with `plpriv unlearn -c recipes/unlearning/<method>.yaml` (not `plpriv fit`)")
        return self.datamodule

    def split(self, which: str) -> FlaggedSubset:
        """``forget``, ``retain`` or ``both`` as a flagged dataset."""
        data = self._require_data()
        indices = {"forget": self.forget_indices, "retain": self.retain_indices,
                   "both": sorted(self.forget_indices + self.retain_indices)}[which]
        return FlaggedSubset(data.train_dataset, indices, set(self.forget_indices))

    def test_split(self) -> Dataset:
        """The test set; for class-wise forgetting only its remaining classes (TA convention of SalUn)."""
        test = self._require_data().test_dataset
        if self.hparams.forget_classes is None:
            return test
        keep = (~torch.isin(dataset_labels(test), torch.tensor(self.hparams.forget_classes))).nonzero().flatten()
        return Subset(test, keep.tolist())

    def forget_test_split(self) -> Dataset | None:
        """Test samples of the forgotten classes (None for random-sample forgetting)."""
        if self.hparams.forget_classes is None:
            return None
        test = self._require_data().test_dataset
        keep = torch.isin(dataset_labels(test), torch.tensor(self.hparams.forget_classes)).nonzero().flatten()
        return Subset(test, keep.tolist())

    def _loader(self, which: str, seed_offset: int = 0) -> DataLoader:
        dataset = self.split(which)
        sampler = EpochSeededRandomSampler(dataset, seed=self.hparams.forget_seed + seed_offset)  # resumable order
        return DataLoader(dataset, batch_size=self.hparams.batch_size, sampler=sampler)

    def train_dataloader(self) -> Any:
        return self._loader(self.train_sets)

    def val_dataloader(self) -> list[DataLoader]:
        """Forget-set accuracy (dataloader 0) and test accuracy (1) at every validation."""
        bs = self.hparams.batch_size
        return [DataLoader(self.split("forget"), batch_size=bs), DataLoader(self.test_split(), batch_size=bs)]

    def setup(self, stage: str) -> None:
        if self.trainer is not None and self.trainer.datamodule is not None:
            raise RuntimeError("unlearning modules choose their own loaders: run `plpriv unlearn -c RECIPE` (or "
                               "`trainer.fit(module.attach_data(datamodule))`), not `plpriv fit` / fit(datamodule=)")
        self._require_data()

    # -- model pieces ----------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def encoder_and_head(self) -> tuple[nn.Module, nn.Module]:
        """The network's own encoder (input -> pre-logit features) and classifier head (shared parameters)."""
        chain, head = sequential_chain(self.net)
        return _Encoder([m for _, m in chain]), head

    def original_net(self) -> nn.Module:
        """A fresh, frozen copy of the original network (teachers)."""
        net = ImageClassifier.load_from_checkpoint(self.hparams.original, map_location="cpu").net
        net.requires_grad_(False)
        return net.eval()

    def forget_mask_logits(self, logits: Tensor) -> Tensor:
        """Logits with the forget classes set to -inf (masked distillation of Head Distillation)."""
        out = logits.clone()
        out[:, self.hparams.forget_classes] = float("-inf")
        return out

    # -- training --------------------------------------------------------------------------------------------------
    def unlearning_loss(self, batch: Any) -> Tensor:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.unlearning_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=self.hparams.batch_size)
        return loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch[0], batch[1]
        acc = (self(x).argmax(1) == y).float().mean()
        name = ("val/forget_acc", "val/test_acc")[dataloader_idx]
        self.log(name, acc, prog_bar=True, batch_size=len(y), add_dataloader_idx=False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        h = self.hparams
        return torch.optim.SGD(self.trainable_parameters(), lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)

    def random_other_labels(self, y: Tensor) -> Tensor:
        """Uniform labels different from ``y``, seeded by the global step (the same after a resume)."""
        gen = torch.Generator().manual_seed(self.hparams.forget_seed * 100003 + self.global_step)
        shift = torch.randint(1, self.num_classes, y.shape, generator=gen).to(y.device)
        return (y + shift) % self.num_classes


class _Encoder(nn.Module):
    def __init__(self, modules: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(modules)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x.flatten(1) if x.ndim > 2 else x


__all__ = ["FlaggedSubset", "UnlearningModule", "dataset_labels"]
