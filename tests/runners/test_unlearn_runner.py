"""`plpriv unlearn`: a recipe runs from an original checkpoint, writes JSON/Markdown reports, and resumes exactly."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import Dataset

from plpriv.cli import main as cli_main
from plpriv.data import DigitsDataModule
from plpriv.modules import ImageClassifier
from plpriv.modules.unlearning import RL
from plpriv.runners.unlearn import build_parser, report_markdown, run_unlearning

from _helpers import ROOT
from _stop import StopAfterEpochs

RECIPES = sorted((ROOT / "recipes" / "unlearning").glob("*.yaml"))
TINY_DATA = ["--data.init_args.image_size", "8"]


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> str:
    seed_everything(0)
    model = ImageClassifier(backbone="small_cnn", backbone_kwargs={"width": 4},
                            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer = Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, datamodule=DigitsDataModule(image_size=8, seed=0))
    path = tmp_path_factory.mktemp("original") / "original.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def test_there_is_a_recipe_per_method_and_each_parses():
    names = {p.stem for p in RECIPES}
    assert names == {"retrain", "ft", "ga", "rl", "l1_sparse", "salun", "scrub", "head_distillation", "cola"}
    for recipe in RECIPES:
        cfg = build_parser().parse_args(["-c", str(recipe)])
        assert cfg.model.class_path.startswith("plpriv.modules.unlearning.")
        assert cfg.model.init_args.forget_classes == [0]


def test_cli_runs_a_recipe_and_writes_the_reports(original: str, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    retrain_dir, cola_dir = tmp_path / "retrain", tmp_path / "cola"
    cli_main(["unlearn", "-c", str(ROOT / "recipes/unlearning/retrain.yaml"), "--model.init_args.original", original,
              "--model.init_args.epochs", "2", *TINY_DATA, "--out_dir", str(retrain_dir), "--progress", "false",
              "--relearn", "false"])
    cli_main(["unlearn", "-c", str(ROOT / "recipes/unlearning/cola.yaml"), "--model.init_args.original", original,
              "--model.init_args.epochs", "2", "--model.init_args.collapse_epochs", "1", *TINY_DATA,
              "--out_dir", str(cola_dir), "--reference", str(retrain_dir / "checkpoints/last.ckpt"),
              "--idi_steps", "10", "--idi_trials", "2", "--progress", "false"])
    retrain = json.loads((retrain_dir / "report.json").read_text())
    report = json.loads((cola_dir / "report.json").read_text())
    for r in (retrain, report):
        assert {"UA", "RA", "TA", "MIA", "MIA_loss", "IDI", "relearn", "seconds"} <= set(r)
        assert all(0 <= r[k] <= 100 for k in ("UA", "RA", "TA", "MIA", "MIA_loss")) and r["seconds"] > 0
    assert retrain["relearn"] is None and 0 <= report["relearn"] <= 100
    assert len(report["relearn_trials"]) == 5 and report["relearn_std"] >= 0
    assert 0 <= retrain["MIA_AUC"] <= 1 and retrain["MIA_AUC_gap"] == 0.0
    assert report["MIA_AUC_gap"] == pytest.approx(abs(report["MIA_AUC"] - retrain["MIA_AUC"]))
    assert retrain["IDI"] == 0.0 and retrain["method"] == "Retrain"
    assert report["method"] == "COLA" and isinstance(report["IDI"], float) and "avg_gap" in report
    assert report["idi"]["layers"] == ["features.3", "features.7", "features.11"]
    low, high = report["IDI_ci95"]
    assert low <= high and report["idi"]["trials"] == 2 and isinstance(report["IDI_std"], float)
    samples = report["idi"]["samples"]  # every forget and retain sample of the training split reaches the estimator
    labels = torch.tensor([int(item[1]) for item in _train_split()])  # type: ignore[attr-defined]
    n_forget = int((labels == 0).sum())
    assert (samples["forget_available"], samples["retain_available"]) == (n_forget, len(labels) - n_forget)
    assert samples["per_label"] == n_forget
    assert (cola_dir / "idi.png").read_bytes()[:4] == b"\x89PNG"
    md = (cola_dir / "report.md").read_text()
    assert md.startswith("| method | UA |") and "| COLA |" in md
    assert "MIA-Eff. (SalUn)" in md and "MIA AUC (f vs unseen)" in md and f"| {report['MIA_AUC']:.3f} |" in md
    assert f"| {report['IDI']:.3f} [{low:.2f}, {high:.2f}] |" in md


def _train_split() -> Dataset:
    data = DigitsDataModule(image_size=8, seed=0)
    data.setup("fit")
    return data.train_dataset


def test_the_report_never_prints_a_zero_spread_for_one_trial():
    one = {"IDI": 0.5, "IDI_ci95": None, "IDI_std": None, "idi": {"trials": 1}}
    ten = {"IDI": 0.5, "IDI_ci95": [0.25, 0.75], "IDI_std": 0.3, "idi": {"trials": 10}}
    md = report_markdown({"one": one, "ten": ten, "Retrain": {"IDI": 0.0}})
    assert "| 0.500 (n=1) |" in md and "| 0.500 [0.25, 0.75] |" in md and "| 0.000 (by definition) |" in md
    assert build_parser().parse_args(["--model", "plpriv.modules.unlearning.FT", "--model.original", "x.ckpt",
                                      "--model.forget_classes", "[0]", "--data", "plpriv.data.DigitsDataModule"]
                                     ).idi_trials == 10


def _run(original: str, out: Path, *callbacks) -> dict:
    seed_everything(0)
    model = RL(original, forget_classes=[0], epochs=3, lr=0.05)
    return run_unlearning(model, DigitsDataModule(image_size=8, seed=0), out, relearn=False, progress=False,
                          callbacks=list(callbacks))


def test_an_interrupted_run_resumes_to_the_same_weights(original: str, tmp_path):
    full = _run(original, tmp_path / "full")
    part = _run(original, tmp_path / "part", StopAfterEpochs(1))
    assert part == {"interrupted_at_epoch": 1}
    assert not (tmp_path / "part" / "report.json").exists()
    first = torch.load(tmp_path / "part/checkpoints/last.ckpt", weights_only=False)
    assert first["epoch"] == 0 and first["global_step"] > 0
    resumed = _run(original, tmp_path / "part")
    a = torch.load(tmp_path / "full/checkpoints/last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "part/checkpoints/last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 3 * first["global_step"]
    for key, value in a["state_dict"].items():  # RL's random labels are seeded by the step: the same run
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    for k in ("UA", "RA", "TA"):
        assert resumed[k] == pytest.approx(full[k])
    assert resumed["seconds"] > 0
    # the logged metrics of the resumed run are those of the uninterrupted one (Lightning's CSV logger alone deletes
    # the first attempt's rows), and rerunning the finished run keeps them
    def rows(run: str) -> list[tuple[str, str]]:
        with (tmp_path / run / "metrics.csv").open() as f:
            table = list(csv.DictReader(f))
        return sorted((r["step"], r.get("train/loss", "")) for r in table)

    assert rows("part") == rows("full") and len(rows("full")) > 2
    _run(original, tmp_path / "full")
    assert rows("full") == rows("part")


def test_a_non_unlearning_model_is_refused(tmp_path):
    with pytest.raises(TypeError, match="UnlearningModule"):
        run_unlearning(ImageClassifier(), DigitsDataModule(image_size=8), tmp_path)  # type: ignore[arg-type]


def test_the_report_explains_every_column():
    from plpriv.runners.unlearn import COLUMNS, LEGEND

    md = report_markdown({"A": {"UA": 1.0}})
    assert LEGEND in md
    for header in COLUMNS.values():
        assert header.split(" [")[0].split(" (")[0] in LEGEND, header
