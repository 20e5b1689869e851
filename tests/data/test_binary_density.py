"""BinaryDensityDataModule: thresholded digits, and the benchmark text format read from files written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from plpriv.data import BinaryDensityDataModule


def test_digits_are_thresholded_pixels_split_disjointly():
    dm = BinaryDensityDataModule("digits", threshold=7.0, val_fraction=0.1, test_fraction=0.2, seed=0)
    dm.setup()
    raw = load_digits().data
    parts = {s: dm.split_tensor(s) for s in ("train", "val", "test")}
    assert dm.num_vars == 64 and sum(len(v) for v in parts.values()) == len(raw)
    assert (len(parts["val"]), len(parts["test"])) == (180, 359)
    for split, rows in parts.items():
        expected = torch.as_tensor(raw[dm.split_indices[split]] > 7.0, dtype=torch.long)
        assert torch.equal(rows, expected) and rows.dtype == torch.long
    ids = [set(v) for v in dm.split_indices.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    (batch,) = next(iter(dm.train_dataloader()))
    assert batch.shape == (100, 64)


def _write(path, rows: np.ndarray) -> None:
    path.write_text("\n".join(",".join(str(v) for v in row) for row in rows) + "\n")


@pytest.mark.parametrize("nested", [False, True])
def test_benchmark_files_are_read_from_a_local_path(tmp_path, nested):
    rng = np.random.default_rng(0)
    folder = tmp_path / "nltcs" if nested else tmp_path
    folder.mkdir(exist_ok=True)
    data = {part: rng.integers(0, 2, size=(n, 16)) for part, n in (("train", 30), ("valid", 7), ("test", 9))}
    for part, rows in data.items():
        _write(folder / f"nltcs.{part}.data", rows)
    dm = BinaryDensityDataModule("NLTCS", root=str(tmp_path), batch_size=8)
    assert dm.num_vars == 16
    for split, part in (("train", "train"), ("val", "valid"), ("test", "test")):
        assert torch.equal(dm.split_tensor(split), torch.as_tensor(data[part]))
    assert sum(len(b[0]) for b in dm.train_dataloader()) == 30


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nltcs.train.data"):
        BinaryDensityDataModule("nltcs", root=str(tmp_path)).setup()
    with pytest.raises(FileNotFoundError, match="not_there"):
        BinaryDensityDataModule("nltcs", root=str(tmp_path / "not_there")).setup()
    rows = np.zeros((3, 16), dtype=int)
    for part in ("train", "valid", "test"):
        _write(tmp_path / f"nltcs.{part}.data", rows)
    bad = tmp_path / "nltcs.valid.data"
    bad.write_text("0," * 15 + "2\n")
    with pytest.raises(ValueError, match=r"nltcs\.valid\.data:1: values must be 0 or 1"):
        BinaryDensityDataModule("nltcs", root=str(tmp_path)).setup()
    bad.write_text("0,1,0\n")
    with pytest.raises(ValueError, match="expected 16 values, got 3"):
        BinaryDensityDataModule("nltcs", root=str(tmp_path)).setup()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="mnist_bits"):
        BinaryDensityDataModule("mnist_bits")
    with pytest.raises(ValueError, match="root"):
        BinaryDensityDataModule("plants")
    with pytest.raises(ValueError, match="threshold"):
        BinaryDensityDataModule(threshold=20)
    with pytest.raises(TypeError, match="dataset"):
        BinaryDensityDataModule(3)  # type: ignore[arg-type]
