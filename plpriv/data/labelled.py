"""A small labelled image set (a few dozen human labels) with censored sampling's rotation augmentation.

Yoon et al. (NeurIPS 2023) train each reward model on 10 malign + 10 benign MNIST images, each expanded to 10 copies
rotated by a random angle in ``[-20, 20]`` degrees. The copies are drawn once at ``setup`` from a seeded generator
(a fixed augmented set, as the authors' ``reward_train.py`` builds it), so a run is reproducible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from plpriv.utils.seeding import derive_seed

__all__ = ["LabelledImagesDataModule", "load_labelled_images", "rotation_copies"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def rotation_copies(images: Tensor, copies: int, max_degrees: float, generator: torch.Generator) -> Tensor:
    """``copies`` rotated versions of each ``[N, C, H, W]`` image in ``[-1, 1]`` (angles uniform in ``+-max_degrees``,
    bilinear, background -1), ordered copy-major: ``[copies * N, C, H, W]``."""
    from torchvision.transforms.v2.functional import InterpolationMode, rotate

    out = []
    for _ in range(copies):
        angles = (torch.rand(len(images), generator=generator) * 2 - 1) * max_degrees
        out.append(torch.stack([rotate(img, float(a), interpolation=InterpolationMode.BILINEAR, fill=-1.0)
                                for img, a in zip(images, angles)]))
    return torch.cat(out) if out else images[:0]


def _uint8_to_unit(images: np.ndarray) -> Tensor:
    """uint8 ``[N, H, W, C]`` (or ``[N, H, W]``) -> float32 ``[N, C, H, W]`` in ``[-1, 1]``."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x[..., None]
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


def load_labelled_images(source: str | Path) -> tuple[Tensor, Tensor]:
    """``(images [N, C, H, W] in [-1, 1], labels [N] int64)`` from a folder with ``benign/`` and ``malign/`` image
    subfolders (label 1 and 0), or an ``.npz`` with ``images`` (uint8 NHWC, as ``plpriv predict`` writes) and
    ``labels`` (1 benign, 0 malign)."""
    path = Path(source)
    if path.suffix == ".npz":
        with np.load(path) as data:
            missing = {"images", "labels"} - set(data.files)
            if missing:
                raise ValueError(f"{path} lacks the arrays {sorted(missing)} (it has {data.files})")
            return _uint8_to_unit(data["images"]), torch.as_tensor(data["labels"], dtype=torch.long)
    if not path.is_dir():
        raise ValueError(f"labelled images {str(path)!r}: give a folder with benign/ and malign/ subfolders or an .npz")
    from PIL import Image

    images, labels = [], []
    for label, sub in ((1, "benign"), (0, "malign")):
        files = sorted(p for p in (path / sub).glob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
        for f in files:
            images.append(np.asarray(Image.open(f)))
            labels.append(label)
    if not images:
        raise ValueError(f"no images in {path}/benign or {path}/malign ({', '.join(_IMAGE_SUFFIXES)})")
    return _uint8_to_unit(np.stack(images)), torch.as_tensor(labels, dtype=torch.long)


class LabelledImagesDataModule(LightningDataModule):
    """Labelled images (1 = benign, 0 = malign) plus ``copies`` rotated copies of each, for reward training.

    Args:
        images: float ``[N, C, H, W]`` in ``[-1, 1]``, or a folder / ``.npz`` (see :func:`load_labelled_images`).
        labels: int ``[N]`` with values in {0, 1} (ignored when ``images`` is a path).
        copies: rotated copies per image added to the originals (paper: 10); 0 = no augmentation.
        max_degrees: rotation range (paper: 20).
        batch_size: paper: 128 (a batch larger than the set just repeats images: sampling is with replacement).
        seed: seeds the rotations and the batch order.
    """

    def __init__(
        self,
        images: Tensor | str,
        labels: Tensor | None = None,
        copies: int = 10,
        max_degrees: float = 20.0,
        batch_size: int = 128,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(images, (str, Path)):
            images, labels = load_labelled_images(images)
        if labels is None:
            raise ValueError("give `labels` with an image tensor (1 = benign, 0 = malign)")
        images, labels = torch.as_tensor(images, dtype=torch.float32), torch.as_tensor(labels).long().reshape(-1)
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"need images [N, C, H, W] and labels [N], got {tuple(images.shape)} and "
                             f"{tuple(labels.shape)}")
        if not bool(((labels == 0) | (labels == 1)).all()):
            raise ValueError(f"labels must be 0 (malign) or 1 (benign), got values {sorted(set(labels.tolist()))}")
        if not isinstance(copies, int) or copies < 0:
            raise ValueError(f"`copies` must be an int >= 0, got {copies!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
        self.images, self.labels = images, labels
        self.copies, self.max_degrees = copies, float(max_degrees)
        self.batch_size, self.seed = batch_size, int(seed)
        self.train_dataset: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "rotations"))
        rotated = rotation_copies(self.images, self.copies, self.max_degrees, generator)
        x = torch.cat([self.images, rotated])
        y = self.labels.repeat(self.copies + 1)
        self.train_dataset = TensorDataset(x, y)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        dataset = self.train_dataset
        # A batch may exceed the set (128 vs 220 images): draw with replacement; an "epoch" is 50 batches (training
        # is counted in steps, ``max_steps``, as the paper's iterations).
        order = torch.Generator().manual_seed(derive_seed(self.seed, "order"))
        sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=50 * self.batch_size,
                                                 generator=order)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)
