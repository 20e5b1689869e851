"""Binary density-estimation data: thresholded scikit-learn digits (embedded) and the 20 standard benchmarks.

The 20 datasets (Lowd & Davis 2010; Van Haaren & Davis 2012; Bekker et al. 2015) are read from a local directory in
their usual text format: one comma-separated row of 0/1 per example, in ``<name>.train.data``, ``<name>.valid.data``
and ``<name>.test.data`` (directly under ``root`` or under ``root/<name>/``). Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from plpriv.data.base import ImageDataModule, seeded_split

# canonical name -> (file stem, number of variables)
BENCHMARKS: dict[str, tuple[str, int]] = {
    "nltcs": ("nltcs", 16), "msnbc": ("msnbc", 17), "kdd": ("kdd", 64), "plants": ("plants", 69),
    "audio": ("baudio", 100), "jester": ("jester", 100), "netflix": ("bnetflix", 100), "accidents": ("accidents", 111),
    "retail": ("tretail", 135), "pumsb_star": ("pumsb_star", 163), "dna": ("dna", 180), "kosarek": ("kosarek", 190),
    "msweb": ("msweb", 294), "book": ("book", 500), "eachmovie": ("tmovie", 500), "webkb": ("cwebkb", 839),
    "reuters_52": ("cr52", 889), "20ng": ("c20ng", 910), "bbc": ("bbc", 1058), "ad": ("ad", 1556),
}
_ALIASES = {"kddcup2k": "kdd", "pumsb-star": "pumsb_star", "reuters-52": "reuters_52", "20newsgroups": "20ng"}
_ALIASES.update({stem: name for name, (stem, _) in BENCHMARKS.items()})


def read_binary_rows(path: Path, num_vars: int | None = None) -> torch.Tensor:
    """A ``.data`` file of comma-separated 0/1 rows -> int64 ``[N, d]``; errors name the path and the bad row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"binary density file not found: {path}")
    rows: list[list[int]] = []
    with path.open() as fh:
        for line_no, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                values = [int(v) for v in line.split(",")]
            except ValueError as err:
                raise ValueError(f"{path}:{line_no}: expected comma-separated 0/1 values, got {line[:60]!r}") from err
            if any(v not in (0, 1) for v in values):
                raise ValueError(f"{path}:{line_no}: values must be 0 or 1, got {sorted(set(values))}")
            width = num_vars if num_vars is not None else (len(rows[0]) if rows else len(values))
            if len(values) != width:
                raise ValueError(f"{path}:{line_no}: expected {width} values, got {len(values)}")
            rows.append(values)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return torch.as_tensor(np.asarray(rows, dtype=np.int64))


def canonical_name(dataset: str) -> str:
    """``"digits"`` or one of :data:`BENCHMARKS` (case-insensitive; file stems like ``baudio`` also work)."""
    if not isinstance(dataset, str):
        raise TypeError(f"`dataset` must be a str, got {type(dataset).__name__}")
    key = dataset.lower()
    key = _ALIASES.get(key, key)
    if key != "digits" and key not in BENCHMARKS:
        raise ValueError(f"unknown dataset {dataset!r}: use 'digits' or one of {sorted(BENCHMARKS)}")
    return key


class BinaryDensityDataModule(ImageDataModule):
    """Binary vectors ``x`` (int64 ``[d]``, items are 1-tuples ``(x,)``) for density estimation.

    Args:
        dataset: ``digits`` (scikit-learn's 1,797 8x8 digits, pixel > ``threshold`` -> 1: 64 variables, embedded) or
            one of the 20 benchmarks (``nltcs``, ``msnbc``, ``kdd``, ``plants``, ``audio``, ..., ``ad``).
        root: directory holding the benchmark's ``.train/.valid/.test.data`` files (not used for ``digits``).
        threshold: digits only: grey level (0..16) above which a pixel is 1.
        val_fraction, test_fraction: digits only: seeded split fractions (the benchmarks have fixed splits).
        batch_size, num_workers, seed, duplicate_indices, duplicate_factor, drop_last: as in
            :class:`plpriv.data.ImageDataModule` (seeded per-epoch shuffle, so resumed runs see the same batches).
    """

    num_states = 2

    def __init__(
        self,
        dataset: str = "digits",
        root: str | None = None,
        threshold: float = 7.0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        batch_size: int = 100,
        num_workers: int = 0,
        seed: int = 0,
        duplicate_indices: Sequence[int] | None = None,
        duplicate_factor: int = 1,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            batch_size=batch_size, num_workers=num_workers, seed=seed, duplicate_indices=duplicate_indices,
            duplicate_factor=duplicate_factor, drop_last=drop_last,
        )
        self.dataset = canonical_name(dataset)
        if self.dataset != "digits" and root is None:
            raise ValueError(f"dataset {dataset!r} is read from a local directory: set `root` to the folder with "
                             f"{BENCHMARKS[self.dataset][0]}.train.data")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 <= value < 1:
                raise ValueError(f"`{name}` must be in [0, 1), got {value!r}")
        if not 0 <= threshold < 16:
            raise ValueError(f"`threshold` must be in [0, 16), got {threshold!r}")
        self.root = root
        self.threshold = threshold
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction

    @property
    def num_vars(self) -> int:
        """Number of binary variables ``d``."""
        return 64 if self.dataset == "digits" else BENCHMARKS[self.dataset][1]

    def split_tensor(self, split: str) -> torch.Tensor:
        """The whole ``train`` (without duplicates), ``val`` or ``test`` split as one int64 ``[N, d]`` tensor."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"`split` must be 'train', 'val' or 'test', got {split!r}")
        self.setup()
        dataset = self.train_base if split == "train" else getattr(self, f"{split}_dataset")
        return dataset.tensors[0]  # type: ignore[union-attr]

    def _files(self) -> dict[str, Path]:
        stem = BENCHMARKS[self.dataset][0]
        root = Path(self.root)  # type: ignore[arg-type]
        if not root.is_dir():
            raise FileNotFoundError(f"`root` {root} is not a directory (expected {stem}.train.data etc. inside it)")
        base = root / stem if (root / stem / f"{stem}.train.data").is_file() else root
        parts = (("train", "train"), ("val", "valid"), ("test", "test"))
        return {split: base / f"{stem}.{part}.data" for split, part in parts}

    def _build(self) -> None:
        if self.dataset == "digits":
            from sklearn.datasets import load_digits

            x = torch.as_tensor(load_digits().data > self.threshold, dtype=torch.long)  # [1797, 64]
            train, val, test = seeded_split(len(x), [self.val_fraction, self.test_fraction], self.seed)
            self.split_indices = {"train": train, "val": val, "test": test}
            splits = {"train": x[train], "val": x[val], "test": x[test]}
        else:
            splits = {split: read_binary_rows(path, self.num_vars) for split, path in self._files().items()}
        self.train_base = TensorDataset(splits["train"])
        self.val_dataset = TensorDataset(splits["val"])
        self.test_dataset = TensorDataset(splits["test"])
