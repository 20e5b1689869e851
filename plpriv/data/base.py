"""Shared machinery of plpriv's image DataModules: seeded splits, duplication, resumable shuffling."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import ConcatDataset, DataLoader, Dataset, RandomSampler, SequentialSampler, Subset


class EpochSeededRandomSampler(RandomSampler):
    """A ``RandomSampler`` whose order depends only on ``(seed, epoch)``.

    Lightning calls ``set_epoch`` at every epoch start, so a run resumed from a checkpoint at an epoch boundary sees
    exactly the batches an uninterrupted run would. It stays a ``RandomSampler``, so under DDP Lightning still
    recognises the loader as shuffled and swaps in its ``DistributedSampler`` (which is seeded per epoch as well).
    It yields a permutation of the whole data source: DP-SGD may replace it by Poisson sampling over all examples
    (``poisson_support``, declared by this exact class; a subclass must declare it again).
    """

    poisson_support = "all"

    def __init__(self, data_source: Sequence[Any], seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):  # type: ignore[override]
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


def seeded_split(n: int, fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Split ``range(n)`` into ``len(fractions) + 1`` disjoint index lists; the first takes the remainder."""
    if any(f < 0 for f in fractions) or sum(fractions) >= 1:
        raise ValueError(f"split fractions must be >= 0 and sum to < 1, got {list(fractions)}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    sizes = [int(round(f * n)) for f in fractions]
    first = n - sum(sizes)
    out, start = [perm[:first]], first
    for size in sizes:
        out.append(perm[start : start + size])
        start += size
    return out


class ImageDataModule(LightningDataModule):
    """Base class: subclasses fill ``self.train_base``, ``self.val_dataset``, ``self.test_dataset`` in ``_build``.

    Items are ``(image, label)``: a float32 ``[C, H, W]`` tensor in ``[-1, 1]`` and an int64 label.

    Args:
        batch_size: training (and evaluation) batch size.
        num_workers: DataLoader workers.
        seed: seeds the train/val/test split and the per-epoch shuffle.
        duplicate_indices: positions in the training split whose images are repeated (memorization studies).
        duplicate_factor: how many times each of those images appears in the training set in total (>= 1).
        drop_last: drop the last incomplete training batch.
        shuffle: a seeded permutation every epoch (default); ``False``: the same order every epoch (DP-FTRL's
            fixed-order participation, :mod:`plpriv.privacy.participation`).
    """

    num_classes: int = 0

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        duplicate_indices: Sequence[int] | None = None,
        duplicate_factor: int = 1,
        drop_last: bool = False,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers!r}")
        if not isinstance(duplicate_factor, int) or duplicate_factor < 1:
            raise ValueError(f"`duplicate_factor` must be an int >= 1, got {duplicate_factor!r}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.duplicate_indices = [int(i) for i in (duplicate_indices or [])]
        self.duplicate_factor = duplicate_factor
        self.drop_last = drop_last
        self.shuffle = bool(shuffle)
        self.train_base: Dataset | None = None
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    # -- subclass API --------------------------------------------------------------------------------------------
    def _build(self) -> None:
        """Fill ``train_base`` (without duplicates), ``val_dataset`` and ``test_dataset``."""
        raise NotImplementedError

    # -- LightningDataModule --------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_base is not None:
            return
        self._build()
        if self.train_base is None:
            raise RuntimeError(f"{type(self).__name__}._build() did not set `train_base`")
        n = len(self.train_base)  # type: ignore[arg-type]
        bad = [i for i in self.duplicate_indices if not 0 <= i < n]
        if bad:
            raise ValueError(f"`duplicate_indices` {bad} are outside the training split of {n} images (0..{n - 1})")
        self.train_dataset = self.train_base
        if self.duplicate_indices and self.duplicate_factor > 1:
            extra = Subset(self.train_base, self.duplicate_indices * (self.duplicate_factor - 1))
            self.train_dataset = ConcatDataset([self.train_base, extra])

    @property
    def duplicated_indices(self) -> list[int]:
        """Positions in the training split (before duplication) whose images occur ``duplicate_factor`` times."""
        return list(self.duplicate_indices) if self.duplicate_factor > 1 else []

    def train_dataloader(self) -> DataLoader:
        dataset = self._require(self.train_dataset, "train")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochSeededRandomSampler(dataset, seed=self.seed) if self.shuffle  # type: ignore[arg-type]
            else SequentialSampler(dataset),  # type: ignore[arg-type]
            num_workers=self.num_workers,
            drop_last=self.drop_last,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self._require(self.val_dataset, "val"))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self._require(self.test_dataset, "test"))

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def _require(self, dataset: Dataset | None, split: str) -> Dataset:
        if dataset is None:
            self.setup()
            dataset = getattr(self, f"{split}_dataset")
        if dataset is None or len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError(f"{type(self).__name__} has an empty {split} split: raise its `{split}_fraction`")
        return dataset
