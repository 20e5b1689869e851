"""Crossed digits: the bar is drawn on exactly the chosen images, and the oracle recovers the drawing process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from plpriv.data.crossed_digits import (BAR_COLS, BAR_ROW, ORACLE_THRESHOLD, CrossedDigitsDataModule, bar_intensity,
                                        crossed_oracle)


def _data(**kwargs) -> CrossedDigitsDataModule:
    dm = CrossedDigitsDataModule(**kwargs)
    dm.setup()
    return dm


def test_each_split_has_the_fraction_and_only_those_images_change() -> None:
    dm = _data(image_size=8, malign_fraction=0.1, seed=3)
    sevens = load_digits().images[load_digits().target == 7] / 16 * 2 - 1  # independent: sklearn's own 7s
    for split, ds in (("train", dm.train_base), ("val", dm.val_dataset), ("test", dm.test_dataset)):
        x, y = ds.tensors
        n = len(y)
        malign = dm.malign_indices[split]
        assert len(malign) == int(round(0.1 * n))
        assert torch.equal((y == 0).nonzero()[:, 0], torch.tensor(malign, dtype=torch.long))
        original = torch.as_tensor(sevens[dm.split_indices[split]], dtype=torch.float32)
        diff = (x[:, 0] - original).abs() > 1e-6
        assert not diff[y == 1].any()  # benign images are sklearn's, untouched
        # malign images differ from the original only on the bar's pixels, which are full ink
        mask = torch.zeros(8, 8, dtype=torch.bool)
        mask[BAR_ROW, BAR_COLS[0]:BAR_COLS[1]] = True
        assert not diff[y == 0][:, ~mask].any()
        assert torch.all(x[y == 0][:, 0, BAR_ROW, BAR_COLS[0]:BAR_COLS[1]] == 1.0)


@pytest.mark.parametrize("image_size", [8, 16])
def test_oracle_precision_and_recall_on_the_generated_data(image_size: int) -> None:
    """The oracle against the drawing process over all 179 sevens (three seeds: different images get the bar)."""
    tp = fp = fn = 0
    benign_max, malign_min = 0.0, 1.0
    for seed in range(3):
        dm = _data(image_size=image_size, malign_fraction=0.1, seed=seed)
        for ds in (dm.train_base, dm.val_dataset, dm.test_dataset):
            x, y = ds.tensors
            pred = crossed_oracle(x)
            tp += int(((pred == 0) & (y == 0)).sum())
            fp += int(((pred == 0) & (y == 1)).sum())
            fn += int(((pred == 1) & (y == 0)).sum())
            b = bar_intensity(x)
            benign_max, malign_min = max(benign_max, float(b[y == 1].max())), min(malign_min, float(b[y == 0].min()))
    assert tp >= 3 * 16 and fp == 0 and fn == 0  # precision = recall = 1
    # the threshold leaves a margin of >= 0.15 on both sides (measured: 0.40 / 0.77 at 16x16, 0.35 / 1.0 at 8x8)
    assert benign_max + 0.15 < ORACLE_THRESHOLD < malign_min - 0.15


def test_oracle_on_a_hand_drawn_bar() -> None:
    x = -torch.ones(2, 1, 8, 8)
    x[1, 0, BAR_ROW, BAR_COLS[0]:BAR_COLS[1]] = 1.0
    assert crossed_oracle(x).tolist() == [1, 0]
    np.testing.assert_allclose(bar_intensity(x).numpy(), [0.0, 1.0])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="digit"):
        CrossedDigitsDataModule(digit=10)
    with pytest.raises(ValueError, match="malign_fraction"):
        CrossedDigitsDataModule(malign_fraction=1.5)
    with pytest.raises(ValueError, match="threshold"):
        crossed_oracle(torch.zeros(1, 1, 8, 8), threshold=1.0)
