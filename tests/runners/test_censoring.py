"""Censored sampling's labelling step: label sheet and CSV round trip, label errors, subsets, the CLI steps."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from plpriv.data.crossed_digits import CrossedDigitsDataModule
from plpriv.modules.censoring import RewardGuidance
from plpriv.runners.censoring import (main, read_labels, select_subsets, wilson_interval, write_guidance_config,
                                      write_label_sheet)


def _images(n: int = 7) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_sheet_and_labels_round_trip(tmp_path: Path) -> None:
    images = _images(7)
    labels = [0, 1, None, 1, 1, 0, None]
    png, table = write_label_sheet(images, tmp_path, ncol=3, cell=16, labels=labels)
    assert read_labels(table, 7) == dict(enumerate(labels))
    sheet = np.asarray(Image.open(png).convert("L"))
    assert sheet.shape == (3 * (16 + 14 + 4), 3 * (16 + 4))
    # image 4 sits in row 1, column 1 below its 14-pixel index strip: its pixels, upscaled 2x by nearest neighbour
    top, left = 1 * 34 + 2 + 14, 1 * 20 + 2
    expected = ((images[4, 0] + 1) * 127.5).round().numpy().astype(np.uint8).repeat(2, 0).repeat(2, 1)
    np.testing.assert_array_equal(sheet[top:top + 16, left:left + 16], expected)
    assert (sheet[top - 14:top - 2, left:left + 16] < 128).any()  # the index text is drawn above it
    _, blank = write_label_sheet(images, tmp_path / "blank")
    assert read_labels(blank) == {i: None for i in range(7)}


def test_read_labels_accepts_text_forms(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("# my labels\nindex label\n0 1\n1\t0\n2, benign\n3,malign  # a crossed one\n\n4,?\n5\n6,unsure\n")
    assert read_labels(path) == {0: 1, 1: 0, 2: 1, 3: 0, 4: None, 5: None, 6: None}


@pytest.mark.parametrize("line, message", [
    ("x,1", "index 'x' is not an integer"),
    ("3,2", "label '2' must be 0"),
    ("9,1", "outside the 5 images"),
    ("-1,1", "outside"),
    ("1,1,1", "3 fields"),
    ("0,0", "labelled twice"),
])
def test_read_labels_errors_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(f"index,label\n0,1\n{line}\n")
    with pytest.raises(ValueError, match=message) as err:
        read_labels(path, num_images=5)
    assert f"{path}:3:" in str(err.value)


def test_subsets_share_malign_and_differ_in_benign() -> None:
    labels = {i: (0 if i % 10 == 0 else 1) for i in range(300)}
    labels.update({1: None, 2: None})
    subsets = select_subsets(labels, 10, 10, 5, seed=3)
    malign = {i for i, v in labels.items() if v == 0}
    shared = set(subsets[0]) & malign
    assert len(subsets) == 5 and len(shared) == 10
    benign_sets = []
    for s in subsets:
        assert len(s) == 20 and len(set(s)) == 20
        assert set(s) & malign == shared  # the same 10 malign images in every member
        benign = set(s) - malign
        assert all(labels[i] == 1 for i in benign)  # never an unsure one
        benign_sets.append(benign)
    assert len(set().union(*benign_sets)) == 50  # disjoint benign sets: the Union model's 10 + 50
    np.testing.assert_array_equal(np.concatenate(subsets), np.concatenate(select_subsets(labels, 10, 10, 5, seed=3)))
    assert set(select_subsets(labels, 10, 10, 5, seed=4)[0]) != set(subsets[0])
    with pytest.raises(ValueError, match="labelled malign"):
        select_subsets(labels, 31, 10, 1)
    with pytest.raises(ValueError, match="labelled benign"):
        select_subsets(labels, 10, 100, 5)


def test_wilson_interval_by_hand() -> None:
    k, n, z = 89, 1000, 1.959963984540054
    p = k / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    low, high = wilson_interval(k, n)
    assert math.isclose(low, centre - half, rel_tol=1e-9) and math.isclose(high, centre + half, rel_tol=1e-9)


def _samples_npz(path: Path) -> int:
    """The crossed 7s (20 % malign) as a plpriv predict samples.npz; returns the number of malign images."""
    dm = CrossedDigitsDataModule(image_size=8, malign_fraction=0.2, seed=0)
    dm.setup()
    x, y = dm.train_base.tensors
    uint8 = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez_compressed(path, images=uint8, seeds=np.arange(len(x)))
    return int((y == 0).sum())


def test_cli_label_train_rate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    samples = tmp_path / "samples.npz"
    n_malign = _samples_npz(samples)
    assert main(["label", "--samples", str(samples), "--out", str(tmp_path / "lab"), "--oracle", "crossed"]) == 0
    labels = read_labels(tmp_path / "lab" / "labels.csv")
    assert sum(v == 0 for v in labels.values()) == n_malign
    assert main(["train", "--samples", str(samples), "--labels", str(tmp_path / "lab" / "labels.csv"), "--out",
                 str(tmp_path / "rw"), "--members", "2", "--steps", "3", "--weight", "2.5", "--recurrence", "4"]) == 0
    cfg = yaml.safe_load((tmp_path / "rw" / "guidance.yaml").read_text())["model"]["init_args"]
    assert cfg["sampler_kwargs"]["recurrence"] == 4
    guidance = RewardGuidance(**cfg["guidance"]["init_args"])
    assert guidance.weight == 2.5 and len(guidance.log_prob.models) == 2
    assert main(["rate", "--samples", str(samples)]) == 0
    assert f"malign {n_malign}/" in capsys.readouterr().out


def test_guidance_config_for_time_independent_rewards(tmp_path: Path) -> None:
    cfg = yaml.safe_load(write_guidance_config(tmp_path / "g.yaml", ["a.ckpt"], 1.0, time_dependent=False).read_text())
    assert cfg["model"]["init_args"]["guidance"]["class_path"] == "plpriv.modules.censoring.RewardForwardGuidance"
    assert "sampler_kwargs" not in cfg["model"]["init_args"]


@pytest.mark.slow
def test_plpriv_predict_takes_the_guidance_config(tmp_path: Path) -> None:
    """The README's three steps through the CLI: fit (1 epoch), label, train, predict censored."""
    from _helpers import ROOT, run_plpriv

    recipe = str(ROOT / "recipes" / "censoring" / "digits7.yaml")
    proc = run_plpriv(["fit", "-c", recipe, "--trainer.max_epochs", "1"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    ckpt = "runs/censoring_digits7/checkpoints/last.ckpt"
    samples = tmp_path / "samples.npz"
    _samples_npz(samples)
    main(["label", "--samples", str(samples), "--out", str(tmp_path / "lab"), "--oracle", "crossed"])
    main(["train", "--samples", str(samples), "--labels", str(tmp_path / "lab" / "labels.csv"), "--out",
          str(tmp_path / "rw"), "--members", "2", "--steps", "3", "--recurrence", "2"])
    proc = run_plpriv(["predict", "-c", recipe, "--model.init_checkpoint", ckpt, "-c",
                       str(tmp_path / "rw" / "guidance.yaml"), "--model.predict_num_samples", "10",
                       "--model.predict_dir", "censored"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    with np.load(tmp_path / "censored" / "samples.npz") as data:
        assert data["images"].shape == (10, 8, 8, 1)


def test_plpriv_censoring_is_a_subcommand(tmp_path) -> None:
    from _helpers import run_plpriv

    result = run_plpriv(["censoring", "--help"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout
    assert "usage: plpriv censoring" in result.stdout and all(c in result.stdout for c in ("label", "train", "rate"))
