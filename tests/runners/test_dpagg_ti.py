"""plpriv.runners.dpagg_ti: loading private images, the end-to-end job on a tiny checkpoint, the public record."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from plpriv.modules import EDM
from plpriv.nets import SongUNet
from plpriv.runners.dpagg_ti import load_private_images, main, noiseless_mean, per_image_embeddings


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An (untrained) tiny class-conditional EDM saved as a plpriv checkpoint with its hyperparameters."""
    torch.manual_seed(0)
    spec = dict(img_resolution=8, in_channels=1, out_channels=1, label_dim=4, model_channels=8, channel_mult=[1],
                num_blocks=1, attn_resolutions=[], dropout=0.0)
    edm = EDM(net=SongUNet(**spec), sampler_kwargs={"num_steps": 3})
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    hparams = {"_class_path": "plpriv.modules.EDM", "net": {"class_path": "plpriv.nets.SongUNet", "init_args": spec},
               "sampler_kwargs": {"num_steps": 3}, "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    torch.save({"state_dict": edm.state_dict(), "hyper_parameters": hparams, "pytorch-lightning_version": "2.6.6"},
               path)  # what `plpriv fit` saves (LightningCLI's hyperparameters)
    return path


def test_load_private_images_folder_and_array(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    x = load_private_images(tmp_path, (1, 8, 8))
    assert x.shape == (3, 1, 8, 8) and x.dtype == torch.float32 and -1 <= float(x.min()) and float(x.max()) <= 1
    # an array at the model's size: only the affine map [0, 255] -> [-1, 1]
    grey = rng.integers(0, 256, size=(2, 8, 8), dtype=np.uint8)
    torch.testing.assert_close(load_private_images(grey, (1, 8, 8))[:, 0], torch.as_tensor(grey / 127.5 - 1).float())
    np.save(tmp_path / "a.npy", grey.astype(np.float32) / 255)
    assert load_private_images(tmp_path / "a.npy", (3, 8, 8)).shape == (2, 3, 8, 8)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_private_images(tmp_path / "missing", (1, 8, 8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_private_images(np.full((2, 8, 8), 3.0), (1, 8, 8))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_private_images(empty, (1, 8, 8))


def test_noiseless_mean_is_the_mean_of_unit_rows() -> None:
    u = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    torch.testing.assert_close(noiseless_mean(u, 2.0), torch.tensor([0.6, -0.2]))


def test_end_to_end_release_and_record(checkpoint: Path, tmp_path: Path) -> None:
    from plpriv.modules.textual_inversion import load_frozen_edm
    from plpriv.privacy.noisy_mean import NoisyMeanMechanism

    images = np.random.default_rng(1).random((6, 8, 8)).astype(np.float32)
    out = tmp_path / "out"
    args = ["--checkpoint", str(checkpoint), "--images", str(tmp_path / "x.npy"), "--out", str(out), "--epsilon", "2",
            "--steps", "3", "--noise-draws", "2", "--num-samples", "4", "--noise-seed", "7", "--sample-rate", "0.5"]
    np.save(tmp_path / "x.npy", images)
    with pytest.warns(UserWarning, match="NOT private"):
        result = main(args)
    saved = torch.load(out / "embedding.pt")
    record = json.loads((out / "release.json").read_text())
    assert (out / "samples.png").is_file() and result["samples"].shape == (4, 1, 8, 8)
    assert record["adjacency"] == "replace_one" and record["num_images"] == 6 and record["delta"] == 1e-5
    assert record["epsilon"] <= 2.0 + 1e-9 and record["epsilon"] > 1.9  # calibrated to the target
    # the release is exactly the mechanism's on the per-image vectors (same noise seed): recompute both stages
    denoiser, _ = load_frozen_edm(checkpoint)
    u = per_image_embeddings(denoiser, load_private_images(images, (1, 8, 8)), steps=3, noise_draws=2, progress=False)
    mech = NoisyMeanMechanism(norm=1.0, sample_rate=0.5, target_epsilon=2.0, delta=1e-5)
    expected = mech.release(u, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(saved["vector"], expected)
    assert record["noise_std"] == pytest.approx(mech.noise_std(6))
    # nothing per-image or secret in the public record
    assert not any(k in json.dumps(record) for k in ("noise_seed", "picked", "per_image", "seconds"))
    # a release whose noise seed the caller chose is marked as not private (anyone with the seed removes the noise)
    assert record["covered_by_epsilon"] is False and "NOT private" in record["warning"]
    # epsilon = inf: no noise, the subsample's mean of unit rows
    inf = main([*args[:-8], "--epsilon", "inf", "--steps", "3", "--noise-draws", "2", "--num-samples", "2",
                "--noise-seed", "7", "--sample-rate", "1.0"])
    torch.testing.assert_close(inf["vector"], noiseless_mean(u), rtol=1e-5, atol=1e-6)
    assert math.isinf(inf["privacy"]["epsilon"])
    # the default draws the noise from OS entropy: private, no warning in the record
    fresh = main([a for a in args if a not in ("--noise-seed", "7")])
    assert "warning" not in fresh["privacy"] and not torch.equal(fresh["vector"], saved["vector"])
    # sampling later from the saved release reads no private data and uses the saved vector
    more = main(["--checkpoint", str(checkpoint), "--embedding", str(out / "embedding.pt"), "--out",
                 str(tmp_path / "more"), "--num-samples", "3"])
    latest = torch.load(out / "embedding.pt")["vector"]  # the eps = inf run wrote the same folder last
    assert torch.equal(more["vector"], latest) and (tmp_path / "more" / "samples.pt").is_file()
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(checkpoint)])  # neither --images nor --embedding


def test_digits_exclude_classes_keeps_the_unfiltered_splits() -> None:
    from plpriv.data import DigitsDataModule

    full, withheld = DigitsDataModule(image_size=8, seed=0), DigitsDataModule(image_size=8, seed=0, exclude_classes=[9])
    full.setup()
    withheld.setup()
    for split, name in (("train", "train_base"), ("val", "val_dataset"), ("test", "test_dataset")):
        x, y = getattr(full, name).tensors
        keep = y != 9
        wx, wy = getattr(withheld, name).tensors
        assert torch.equal(wx, x[keep]) and torch.equal(wy, y[keep]) and 9 not in wy.tolist()
        assert withheld.split_indices[split] == [i for i, k in zip(full.split_indices[split], keep.tolist()) if k]
    only = DigitsDataModule(image_size=8, classes=[3, 5])
    only.setup()
    assert set(only.train_base.tensors[1].tolist()) == {3, 5}
    with pytest.raises(ValueError, match="digits 0..9"):
        DigitsDataModule(exclude_classes=[10])
    with pytest.raises(ValueError, match="keep at least one"):
        DigitsDataModule(classes=[1], exclude_classes=[1])
