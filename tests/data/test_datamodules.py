"""plpriv.data: real embedded data, seeded splits, duplication, resumable shuffling, real on-disk loaders."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.data import _is_dataloader_shuffled
from PIL import Image
from sklearn.datasets import load_digits

from plpriv.data import (
    DigitsDataModule,
    EpochSeededRandomSampler,
    ImageFolderDataModule,
    LFWFacesDataModule,
    TorchvisionDataModule,
)


def test_digits_are_the_real_sklearn_digits():
    dm = DigitsDataModule(image_size=8, channels=1, val_fraction=0.1, test_fraction=0.1, seed=3)
    dm.setup()
    sizes = [len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)]
    assert sum(sizes) == 1797 and sizes[1] == sizes[2] == 180
    # At native size every image is the sklearn image mapped [0, 16] -> [-1, 1], with its label.
    digits = load_digits()
    x, y = dm.train_dataset[5]
    source = dm.split_indices["train"][5]
    np.testing.assert_allclose(x[0].numpy(), digits.images[source] / 8.0 - 1.0, atol=1e-6)
    assert int(y) == digits.target[source]


def test_digits_resize_channels_and_range():
    dm = DigitsDataModule(image_size=32, channels=3)
    dm.setup()
    x, y = dm.train_dataset[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    assert torch.equal(x[0], x[2])
    images = dm.train_dataset.tensors[0]
    assert images.min() == -1.0 and images.max() <= 1.0 and images.max() > 0.9
    assert dm.num_classes == 10


def test_splits_are_disjoint_seeded_and_cover_everything():
    a, b, c = DigitsDataModule(seed=1), DigitsDataModule(seed=1), DigitsDataModule(seed=2)
    for dm in (a, b, c):
        dm.setup()
    parts = [set(a.split_indices[k]) for k in ("train", "val", "test")]
    assert set().union(*parts) == set(range(1797)) and sum(map(len, parts)) == 1797
    assert a.split_indices == b.split_indices and a.split_indices != c.split_indices


def test_duplication_repeats_chosen_training_images():
    dm = DigitsDataModule(duplicate_indices=[0, 7], duplicate_factor=5)
    dm.setup()
    base = dm.train_base
    assert len(dm.train_dataset) == len(base) + 2 * 4
    assert dm.duplicated_indices == [0, 7]
    # Count exact copies of image 7 in the training set: it must appear 5 times, a non-duplicated one once.
    stacked = torch.stack([dm.train_dataset[i][0] for i in range(len(dm.train_dataset))])
    for index, expected in ((7, 5), (1, 1)):
        copies = (stacked == base[index][0]).flatten(1).all(1).sum().item()
        assert copies == expected


def test_duplication_rejects_bad_input():
    with pytest.raises(ValueError, match="duplicate_factor"):
        DigitsDataModule(duplicate_factor=0)
    dm = DigitsDataModule(duplicate_indices=[5000], duplicate_factor=2)
    with pytest.raises(ValueError, match="5000"):
        dm.setup()


def test_lfw_faces_labels():
    dm = LFWFacesDataModule(val_fraction=0.0, test_fraction=0.0)
    dm.setup()
    x, y = dm.train_dataset.tensors
    assert x.shape == (200, 1, 25, 25) and int(y.sum()) == 100 and dm.num_classes == 2


def test_epoch_seeded_sampler_depends_only_on_seed_and_epoch():
    data = list(range(50))
    s1, s2 = EpochSeededRandomSampler(data, seed=4), EpochSeededRandomSampler(data, seed=4)
    list(s1)  # consuming an epoch (or the global RNG) must not change what the next epoch yields
    torch.rand(10)
    s1.set_epoch(3)
    s2.set_epoch(3)
    assert list(s1) == list(s2) and sorted(s1) == data
    s2.set_epoch(4)
    assert list(s1) != list(s2)


def test_train_loader_counts_as_shuffled_for_lightning():
    """Under DDP Lightning swaps in a shuffling DistributedSampler only if it sees a shuffled loader."""
    dm = DigitsDataModule()
    dm.setup()
    assert _is_dataloader_shuffled(dm.train_dataloader())
    assert not _is_dataloader_shuffled(dm.val_dataloader())


def _write_idx(path, array: np.ndarray) -> None:
    """MNIST's IDX format: magic (0, 0, dtype 0x08=uint8, ndim), big-endian dims, raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") if str(path).endswith(".gz") else open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_loader_reads_real_format(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 10)):
        images = rng.integers(0, 256, size=(n, 28, 28))
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    dm = TorchvisionDataModule(name, root=str(tmp_path), val_fraction=0.25, num_workers=0, batch_size=8)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (30, 10, 10)
    x, y = dm.test_dataset[3]
    assert x.shape == (1, 28, 28) and y == 3
    expected = torch.as_tensor(images[3] / 255.0 * 2 - 1, dtype=torch.float32)
    torch.testing.assert_close(x[0], expected, atol=1e-6, rtol=0)
    batch = next(iter(dm.train_dataloader()))
    assert batch[0].shape == (8, 1, 28, 28)


def test_torchvision_missing_files_name_path_and_flag(tmp_path):
    dm = TorchvisionDataModule("cifar10", root=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(FileNotFoundError) as err:
        dm.setup()
    assert "nowhere" in str(err.value) and "download" in str(err.value)
    with pytest.raises(ValueError, match="imagenet"):
        TorchvisionDataModule("imagenet")  # type: ignore[arg-type]


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / label / f"{i}.png")
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, channels=3, val_fraction=0.25, num_workers=0)
    dm.setup()
    assert dm.classes == ["cat", "dog"] and dm.num_classes == 2
    assert len(dm.train_dataset) == 9 and len(dm.val_dataset) == 3
    x, y = dm.train_dataset[0]
    assert x.shape == (3, 16, 16) and -1 <= x.min() and x.max() <= 1
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolderDataModule(str(tmp_path / "missing")).setup()
