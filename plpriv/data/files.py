"""DataModules for cluster-scale data on disk: torchvision datasets and image folders."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms

from plpriv.data.base import ImageDataModule, seeded_split

_TORCHVISION = {
    "cifar10": (datasets.CIFAR10, 10, 3),
    "cifar100": (datasets.CIFAR100, 100, 3),
    "mnist": (datasets.MNIST, 10, 1),
    "fashion_mnist": (datasets.FashionMNIST, 10, 1),
}


class _ConvertMode:
    """Picklable ``PIL.Image.convert`` (a lambda would break DataLoader workers under spawn)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image):
        return image.convert(self.mode)


def image_transform(image_size: int | None, channels: int, hflip: bool = False) -> transforms.Compose:
    """PIL image -> float32 ``[channels, S, S]`` tensor in ``[-1, 1]``."""
    if channels not in (1, 3):
        raise ValueError(f"`channels` must be 1 or 3, got {channels!r}")
    steps: list = [_ConvertMode("L" if channels == 1 else "RGB")]
    if image_size is not None:
        steps += [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    if hflip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize([0.5] * channels, [0.5] * channels)]
    return transforms.Compose(steps)


class _FilesDataModule(ImageDataModule):
    def __init__(
        self,
        root: str,
        image_size: int | None,
        channels: int | None,
        val_fraction: float,
        hflip: bool,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not 0 <= val_fraction < 1:
            raise ValueError(f"`val_fraction` must be in [0, 1), got {val_fraction!r}")
        self.root = str(root)
        self.image_size = image_size
        self.channels = channels
        self.val_fraction = val_fraction
        self.hflip = hflip

    def _split_train(self, train_aug: Dataset, train_plain: Dataset) -> None:
        train_idx, val_idx = seeded_split(len(train_aug), [self.val_fraction], self.seed)  # type: ignore[arg-type]
        self.split_indices = {"train": train_idx, "val": val_idx}
        self.train_base = Subset(train_aug, train_idx)
        self.val_dataset = Subset(train_plain, val_idx)


class TorchvisionDataModule(_FilesDataModule):
    """CIFAR-10, CIFAR-100, MNIST or Fashion-MNIST from torchvision, for cluster runs.

    The official training set is split into train/val (``val_fraction``); the official test set is the test split.
    With ``download=True`` the files are fetched once, on local rank 0, in ``prepare_data``.
    """

    def __init__(
        self,
        name: Literal["cifar10", "cifar100", "mnist", "fashion_mnist"] = "cifar10",
        root: str = "data",
        download: bool = False,
        batch_size: int = 128,
        image_size: int | None = None,
        channels: int | None = None,
        val_fraction: float = 0.02,
        hflip: bool = False,
        seed: int = 0,
        num_workers: int = 4,
        duplicate_indices: Sequence[int] | None = None,
        duplicate_factor: int = 1,
        drop_last: bool = False,
    ) -> None:
        if name not in _TORCHVISION:
            raise ValueError(f"`name` must be one of {sorted(_TORCHVISION)}, got {name!r}")
        super().__init__(
            root=root,
            image_size=image_size,
            channels=channels,
            val_fraction=val_fraction,
            hflip=hflip,
            batch_size=batch_size,
            seed=seed,
            num_workers=num_workers,
            duplicate_indices=duplicate_indices,
            duplicate_factor=duplicate_factor,
            drop_last=drop_last,
        )
        self.name = name
        self.download = download
        dataset_cls, self.num_classes, native_channels = _TORCHVISION[name]
        self._dataset_cls = dataset_cls
        self.channels = channels if channels is not None else native_channels

    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                self._dataset_cls(self.root, train=train, download=True)

    def _open(self, train: bool, transform: transforms.Compose) -> Dataset:
        try:
            return self._dataset_cls(self.root, train=train, transform=transform, download=False)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted ..."
            raise FileNotFoundError(
                f"{self.name} was not found under root={os.path.abspath(self.root)!r} ({err}). "
                "Pass `download: true` (CLI: --data.init_args.download true) on a machine with internet access, "
                "or point `root` at a folder that already holds the dataset."
            ) from err

    def _build(self) -> None:
        plain = image_transform(self.image_size, self.channels)
        augmented = image_transform(self.image_size, self.channels, hflip=self.hflip)
        self._split_train(self._open(True, augmented), self._open(True, plain))
        self.test_dataset = self._open(False, plain)


class ImageFolderDataModule(_FilesDataModule):
    """Images in ``root/<class_name>/*.png|jpg`` (torchvision ``ImageFolder``); class names sorted into labels."""

    def __init__(
        self,
        root: str,
        batch_size: int = 64,
        image_size: int | None = 32,
        channels: int = 3,
        val_fraction: float = 0.1,
        hflip: bool = False,
        seed: int = 0,
        num_workers: int = 4,
        duplicate_indices: Sequence[int] | None = None,
        duplicate_factor: int = 1,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            root=root,
            image_size=image_size,
            channels=channels,
            val_fraction=val_fraction,
            hflip=hflip,
            batch_size=batch_size,
            seed=seed,
            num_workers=num_workers,
            duplicate_indices=duplicate_indices,
            duplicate_factor=duplicate_factor,
            drop_last=drop_last,
        )

    def _build(self) -> None:
        if not Path(self.root).is_dir():
            raise FileNotFoundError(f"ImageFolderDataModule: root={self.root!r} is not a directory")
        plain = datasets.ImageFolder(self.root, transform=image_transform(self.image_size, self.channels))  # type: ignore[arg-type]
        augmented = datasets.ImageFolder(
            self.root, transform=image_transform(self.image_size, self.channels, hflip=self.hflip)  # type: ignore[arg-type]
        )
        self.num_classes = len(plain.classes)
        self.classes = plain.classes
        self._split_train(augmented, plain)
        self.test_dataset = self.val_dataset
