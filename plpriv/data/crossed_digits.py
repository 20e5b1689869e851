"""Censored sampling's toy data: scikit-learn's digits of one class with a synthetic "malign" bar through a fraction.

The crossed-7 MNIST setting of Yoon et al. (NeurIPS 2023, "Censored Sampling of Diffusion Models Using 3 Minutes of
Human Feedback"), on the embedded 8x8 digits. At 8x8 many of scikit-learn's 7s already carry a crossbar in rows 3-4
(their mean ink there is 0.4-0.6), so the malign feature is a full-intensity horizontal bar through the lower stem
(row 6, columns 1-6 of the native 8x8 grid, where real 7s have at most 0.35 mean ink): a struck-through 7 that a
rule can tell apart. :func:`crossed_oracle` is that rule, the stand-in for a human labeller in tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import TensorDataset

from plpriv.data.base import seeded_split
from plpriv.data.embedded import _TensorSplitDataModule, to_image_tensor
from plpriv.utils.seeding import derive_seed

__all__ = ["BAR_COLS", "BAR_ROW", "CrossedDigitsDataModule", "ORACLE_THRESHOLD", "bar_intensity", "crossed_oracle",
           "draw_bar"]

#: Row and columns (``[start, stop)``) of the native 8x8 grid that the bar covers.
BAR_ROW = 6
BAR_COLS = (1, 7)
#: Mean ink in ``[0, 1]`` over the bar's pixels above which the oracle calls an image malign. Real 7s reach at most
#: 0.35 there and a drawn bar 1.0 at 8x8 (0.40 and 0.77 after a bilinear resize to 16x16 and back; measured on all
#: 179 digits "7", see tests/data/test_crossed_digits.py); between the two, with room for the partial bars a
#: diffusion model draws.
ORACLE_THRESHOLD = 0.6


def draw_bar(images: np.ndarray, max_value: float, row: int = BAR_ROW, cols: tuple[int, int] = BAR_COLS) -> np.ndarray:
    """A copy of native ``[N, 8, 8]`` images in ``[0, max_value]`` with the bar's pixels set to ``max_value``."""
    out = np.array(images, dtype=np.float32, copy=True)
    out[:, row, cols[0]:cols[1]] = max_value
    return out


def bar_intensity(images: Tensor, row: int = BAR_ROW, cols: tuple[int, int] = BAR_COLS) -> Tensor:
    """Mean ink in ``[0, 1]`` over the bar's pixels of ``[N, C, H, W]`` images in ``[-1, 1]`` (any size: area-resized
    to the native 8x8 grid first; channels averaged). Returns ``[N]``."""
    if images.ndim != 4:
        raise ValueError(f"`images` must be [N, C, H, W], got shape {tuple(images.shape)}")
    ink = ((images.detach().float().clamp(-1, 1) + 1) / 2).mean(1, keepdim=True)
    ink = F.adaptive_avg_pool2d(ink, 8)[:, 0]
    return ink[:, row, cols[0]:cols[1]].mean(-1)


def crossed_oracle(images: Tensor, threshold: float = ORACLE_THRESHOLD) -> Tensor:
    """The oracle labeller: int64 ``[N]`` labels, 1 = benign, 0 = malign (the bar's mean ink above ``threshold``)."""
    if not 0 < threshold < 1:
        raise ValueError(f"`threshold` must be in (0, 1), got {threshold!r}")
    return (bar_intensity(images) <= threshold).long()


class CrossedDigitsDataModule(_TensorSplitDataModule):
    """scikit-learn's digits of one class (179 "7"s), the malign bar drawn through ``malign_fraction`` of each split.

    Items are ``(image, label)`` with label 1 = benign (as drawn), 0 = malign (bar drawn): the ground truth against
    which :func:`crossed_oracle` is validated; an unconditional EDM ignores it. In each split, ``round(malign_fraction
    * n)`` images chosen with a seeded permutation get the bar; ``malign_indices[split]`` lists their positions in the
    split. The split itself is :class:`~plpriv.data.DigitsDataModule`'s (seeded, over this class's images).
    """

    num_classes = 2

    def __init__(
        self,
        batch_size: int = 64,
        image_size: int = 8,
        channels: int = 1,
        digit: int = 7,
        malign_fraction: float = 0.1,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
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
        if isinstance(digit, bool) or not isinstance(digit, int) or not 0 <= digit <= 9:
            raise ValueError(f"`digit` must be an int in 0..9, got {digit!r}")
        if not 0 <= malign_fraction <= 1:
            raise ValueError(f"`malign_fraction` must be in [0, 1], got {malign_fraction!r}")
        self.digit = digit
        self.malign_fraction = float(malign_fraction)
        self.malign_indices: dict[str, list[int]] = {}

    def _build(self) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        raw = digits.images[digits.target == self.digit].astype(np.float32)
        train, val, test = seeded_split(len(raw), [self.val_fraction, self.test_fraction], self.seed)
        self.split_indices = {"train": train, "val": val, "test": test}
        datasets = {}
        for i, (split, idx) in enumerate(self.split_indices.items()):
            n = len(idx)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(self.seed, "crossed", i)))
            malign = sorted(order[: int(round(self.malign_fraction * n))].tolist())
            self.malign_indices[split] = malign
            images = raw[idx]
            if malign:
                images[malign] = draw_bar(images[malign], 16.0)
            labels = torch.ones(n, dtype=torch.long)
            labels[malign] = 0
            datasets[split] = TensorDataset(to_image_tensor(images, 16.0, self.image_size, self.channels), labels)
        self.train_base, self.val_dataset, self.test_dataset = datasets["train"], datasets["val"], datasets["test"]
