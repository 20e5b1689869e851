"""Where runs write: validation grids per epoch (upscaled), validate/predict into their own subdirectories without
touching the fit's files, and nothing at all without a log directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from plpriv.cli import main

from _helpers import ROOT

EDM = ROOT / "recipes" / "edm" / "digits_lora.yaml"
_NET = "--model.init_args.net.init_args."
TINY = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
        "--trainer.check_val_every_n_epoch", "1", "--trainer.enable_progress_bar", "false",
        "--data.init_args.batch_size", "8", f"{_NET}model_channels", "8", f"{_NET}lora_mlp", "[8]",
        "--model.init_args.num_val_samples", "10", "--model.init_args.sample_batch_size", "10",
        "--model.init_args.predict_num_samples", "4", "--model.init_args.sampler_kwargs", "{num_steps: 2}"]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch, tmp_path):
    monkeypatch.setattr("sys.argv", ["plpriv"])
    monkeypatch.chdir(tmp_path)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_grids_per_epoch_and_other_subcommands_keep_the_fit_files(tmp_path):
    out = ["--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path)]
    main(["fit", "-c", str(EDM), *TINY, *out])
    run = tmp_path / "edm_digits_lora"
    grids = sorted((run / "val_samples").glob("*.png"))
    assert [g.name for g in grids] == ["epoch0000.png", "epoch0001.png"]  # one per validation, none overwritten
    # one row of 10 samples of 8 px with 2 px padding is 102 x 12 px: upscaled x6 to >= 512 px
    assert Image.open(grids[0]).size == (6 * (10 * 10 + 2), 6 * (8 + 4))
    fit_files = _files(run)
    assert "config.yaml" in fit_files and "hparams.yaml" in fit_files

    main(["validate", "-c", str(EDM), *TINY, *out, "--ckpt_path", "last"])
    main(["predict", "-c", str(EDM), *TINY, *out, "--ckpt_path", "last"])
    after = _files(run)
    assert {k: after[k] for k in fit_files} == fit_files  # the fit's files are byte-for-byte unchanged
    new = set(after) - set(fit_files)
    assert {k.split("/")[0] for k in new} == {"validate", "predict"}, sorted(new)
    assert {"validate/config.yaml", "validate/val_samples/epoch0001.png", "predict/config.yaml",
            "predict/samples/samples.npz"} <= new
    samples = np.load(run / "predict" / "samples" / "samples.npz")
    assert samples["images"].shape == (4, 8, 8, 1)


def test_no_logger_writes_nothing_but_checkpoints(tmp_path):
    main(["fit", "-c", str(EDM), *TINY, "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)])
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written and all(p.startswith("checkpoints/") for p in written), written
