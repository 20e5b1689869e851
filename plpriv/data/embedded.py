"""DataModules on datasets bundled with scikit-learn and scikit-image: real images, no download."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from plpriv.data.base import ImageDataModule, seeded_split


def to_image_tensor(images: np.ndarray, max_value: float, image_size: int | None, channels: int) -> torch.Tensor:
    """``[N, H, W]`` grey images in ``[0, max_value]`` -> float32 ``[N, channels, S, S]`` in ``[-1, 1]``."""
    if channels not in (1, 3):
        raise ValueError(f"`channels` must be 1 or 3, got {channels!r}")
    x = torch.as_tensor(np.asarray(images, dtype=np.float32) / max_value).unsqueeze(1)
    if image_size is not None and image_size != x.shape[-1]:
        if image_size < 4:
            raise ValueError(f"`image_size` must be >= 4, got {image_size!r}")
        mode = "bilinear" if image_size > x.shape[-1] else "area"
        x = F.interpolate(x, size=(image_size, image_size), mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))
    x = (x.clamp(0, 1) * 2 - 1).expand(-1, channels, -1, -1).contiguous()
    return x


class _TensorSplitDataModule(ImageDataModule):
    """Holds a whole small dataset in memory and splits it train/val/test with a seeded permutation."""

    def __init__(
        self, image_size: int | None, channels: int, val_fraction: float, test_fraction: float, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if channels not in (1, 3):
            raise ValueError(f"`channels` must be 1 or 3, got {channels!r}")
        self.image_size = image_size
        self.channels = channels
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 <= value < 1:
                raise ValueError(f"`{name}` must be in [0, 1), got {value!r}")
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _build(self) -> None:
        images, labels = self._load()
        train, val, test = seeded_split(len(labels), [self.val_fraction, self.test_fraction], self.seed)
        self.split_indices = {"train": train, "val": val, "test": test}
        self.train_base = TensorDataset(images[train], labels[train])
        self.val_dataset = TensorDataset(images[val], labels[val])
        self.test_dataset = TensorDataset(images[test], labels[test])


class DigitsDataModule(_TensorSplitDataModule):
    """scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes), plpriv's embedded default.

    Images are resized to ``image_size`` and scaled to ``[-1, 1]``; ``channels=3`` repeats the grey channel.
    ``split_indices`` maps each split to positions in the original ``load_digits`` order.
    ``classes`` / ``exclude_classes`` keep only (or drop) these digits in every split, after the seeded split: the
    retained images of each split are those of the unfiltered module (e.g. a model trained without class 9 and a
    classifier trained on all digits share one test split). Labels keep their digit values.
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        image_size: int = 32,
        channels: int = 1,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        duplicate_indices: Sequence[int] | None = None,
        duplicate_factor: int = 1,
        drop_last: bool = False,
        shuffle: bool = True,
        classes: Sequence[int] | None = None,
        exclude_classes: Sequence[int] | None = None,
    ) -> None:
        super().__init__(
            image_size=image_size,
            channels=channels,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            batch_size=batch_size,
            seed=seed,
            num_workers=num_workers,
            duplicate_indices=duplicate_indices,
            duplicate_factor=duplicate_factor,
            drop_last=drop_last,
            shuffle=shuffle,
        )
        keep = set(range(self.num_classes)) if classes is None else {int(c) for c in classes}
        keep -= {int(c) for c in exclude_classes or ()}
        bad = sorted({int(c) for c in [*(classes or ()), *(exclude_classes or ())]} - set(range(self.num_classes)))
        if bad or not keep:
            raise ValueError(f"`classes`/`exclude_classes` must name digits 0..9 and keep at least one, got "
                             f"classes={classes!r}, exclude_classes={exclude_classes!r}")
        self.classes = sorted(keep)

    def _build(self) -> None:
        super()._build()
        if len(self.classes) == self.num_classes:
            return
        keep = torch.tensor(self.classes)
        for split, name in (("train", "train_base"), ("val", "val_dataset"), ("test", "test_dataset")):
            images, labels = getattr(self, name).tensors
            mask = torch.isin(labels, keep)
            setattr(self, name, TensorDataset(images[mask], labels[mask]))
            self.split_indices[split] = [i for i, m in zip(self.split_indices[split], mask.tolist()) if m]

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = to_image_tensor(digits.images, 16.0, self.image_size, self.channels)
        return images, torch.as_tensor(digits.target, dtype=torch.long)


class LFWFacesDataModule(_TensorSplitDataModule):
    """scikit-image's ``lfw_subset``: 100 face and 100 non-face 25x25 crops; label 1 = face, 0 = non-face."""

    num_classes = 2

    def __init__(
        self,
        batch_size: int = 32,
        image_size: int | None = None,
        channels: int = 1,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
        duplicate_indices: Sequence[int] | None = None,
        duplicate_factor: int = 1,
        drop_last: bool = False,
        shuffle: bool = True,
    ) -> None:
        super().__init__(
            image_size=image_size,
            channels=channels,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            batch_size=batch_size,
            seed=seed,
            num_workers=num_workers,
            duplicate_indices=duplicate_indices,
            duplicate_factor=duplicate_factor,
            drop_last=drop_last,
            shuffle=shuffle,
        )

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        from skimage.data import lfw_subset

        faces = lfw_subset()  # (200, 25, 25) float in [0, 1]: the first 100 are faces
        images = to_image_tensor(faces, 1.0, self.image_size, self.channels)
        labels = torch.cat([torch.ones(100, dtype=torch.long), torch.zeros(len(faces) - 100, dtype=torch.long)])
        return images, labels
