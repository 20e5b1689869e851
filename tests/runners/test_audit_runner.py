"""The audit runner end to end on tiny models: DP-SGD runs checked against opacus' own accountant and the data
they saw, scores recomputed by hand, the noise-off bound against the Clopper-Pearson closed form, resumability
(finished models are never retrained; a deleted one is retrained bit-identically), config checks and the CLI."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from opacus.accountants import RDPAccountant

from plpriv.data import DigitsDataModule
from plpriv.modules import ImageClassifier
from plpriv.runners.audit import AuditConfig, CraftingConfig, build_parser, run_audit

from _helpers import ROOT

TRAIN = 100  # first 100 digits of the training split


def _cfg(out: Path, **overrides) -> AuditConfig:
    kw = dict(
        model=ImageClassifier(backbone="small_cnn", backbone_kwargs={"width": 2}, optimizer=partial(torch.optim.SGD, lr=0.5)),
        # q = 1 (batch >= N): opacus' RDP accountant is then a closed form, so calibration takes milliseconds
        data=DigitsDataModule(image_size=8, batch_size=200, val_fraction=0.0, test_fraction=0.1),
        out_dir=str(out),
        epsilons=[4.0],
        noise_off=False,
        canaries=["mislabeled", "blank", "crafted"],
        max_epochs=2,
        train_size=TRAIN,
        accountant="rdp",
        reference_models=2,
        eval_models=3,
        crafting=CraftingConfig(shadow_out=2, shadow_in=1, rounds=1, steps=2),
        workers=0,
        progress=False,
    )
    kw.update(overrides)
    return AuditConfig(**kw)


def _files(out: Path, setting: str, split: str = "models") -> list[Path]:
    return sorted((out / setting / split).glob("*.pt"))


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_tiny_audit_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "audit"
    report = run_audit(_cfg(out))
    for name in ("report.json", "report.md", "audit.png", "audit_fingerprint.json", "init.pt"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text())["settings"]["eps4"]["theoretical_epsilon"] > 0
    res = report["settings"]["eps4"]
    assert res["problems"] == []
    files = _files(out, "eps4")
    assert len(files) == 5 and len(_files(out, "eps4", "shadow_out")) == 2 and len(_files(out, "eps4", "shadow_in_r0")) == 1

    # every DP-SGD run: the data it saw (D + its canaries), q = 1/ceil(N/B), steps, and epsilon from opacus itself
    metas = [_load(p)["meta"] for p in files]
    for m in metas:
        assert m["num_samples"] == TRAIN + len(m["included"])
        assert m["sample_rate"] == 1 / math.ceil((TRAIN + len(m["included"])) / 200) == 1.0
        assert m["steps"] == 2  # 2 epochs of 1 batch
        acc = RDPAccountant()
        acc.history = [(m["noise_multiplier"], m["sample_rate"], m["steps"])]
        assert m["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
        assert 4.0 - 0.05 <= m["epsilon"] <= 4.0  # calibrated to the target from below
    assert len({m["noise_multiplier"] for m in metas}) == 1

    # scores recomputed by hand from the saved final parameters; counts at the threshold counted by hand
    canaries = {c.name: c for c in _load(out / "eps4" / "canaries.pt")["canaries"]}
    assert set(canaries) == {"mislabeled", "blank", "crafted"}
    assert canaries["mislabeled"].label != canaries["mislabeled"].info["true_label"]
    for name, c in canaries.items():
        row = res["results"][name]["loss"]
        own_in, own_out = [], []
        for p, m in zip(files[2:], metas[2:]):  # the first 2 models are the reference split
            model = ImageClassifier(backbone="small_cnn", backbone_kwargs={"width": 2})
            model.load_state_dict(_load(p)["state_dict"])
            model.eval()
            with torch.no_grad():
                loss = float(F.cross_entropy(model(c.image[None]), torch.tensor([c.label])))
            (own_in if name in m["included"] else own_out).append(loss)
        np.testing.assert_allclose(sorted(row["eval_in"]), sorted(own_in), rtol=1e-5)
        np.testing.assert_allclose(sorted(row["eval_out"]), sorted(own_out), rtol=1e-5)
        if "audit" in row:
            t = row["audit"]["threshold"]
            assert row["audit"]["fp"] == sum(s < t for s in own_out)  # OUT called IN (lower loss = IN)
            assert row["audit"]["fn"] == sum(s >= t for s in own_in)
            assert 0 <= row["audit"]["epsilon"] <= row["max_certifiable"]
    assert "| eps4 |" in (out / "report.md").read_text()
    # the saved models carry no DP seed (a secret: it replays the noise)
    meta = _load(next((out / "eps4" / "shadow_out").glob("*.pt")))["meta"]
    assert not any("seed" in key for key in meta) and meta["expected_batch_size"] == 200.0


def test_noise_off_full_batch_reaches_the_largest_certifiable_bound(tmp_path: Path) -> None:
    """No noise and q = 1: training is deterministic, so all IN models coincide, all OUT models coincide, and one
    gradient step on the canary lowers its loss: IN and OUT are perfectly separated on every score. The bound must
    then equal the Clopper-Pearson closed form for zero errors: p = 1 - (beta/2)^(1/n), eps = ln((1-delta-p)/p)."""
    out = tmp_path / "audit"
    cfg = _cfg(
        out,
        epsilons=[],
        noise_off=True,
        canaries=["mislabeled"],
        reference_models=4,
        eval_models=24,
    )
    res = run_audit(cfg)["settings"]["noise_off"]
    assert res["theoretical_epsilon"] == math.inf and res["dp"]["noise_multiplier"] == 0.0
    assert res["dp"]["sample_rate"] == 1.0
    for score in ("loss", "margin", "white_box"):
        audit = res["results"]["mislabeled"][score]["audit"]
        n_in, n_out = audit["n_in"], audit["n_out"]
        assert n_in >= 2 and n_out >= 2 and audit["fp"] == audit["fn"] == 0
        p_in, p_out = 1 - 0.025 ** (1 / n_in), 1 - 0.025 ** (1 / n_out)
        closed = max(math.log((1 - 1e-5 - p_out) / p_in), math.log((1 - 1e-5 - p_in) / p_out))
        assert closed > 0.5 and audit["epsilon"] == pytest.approx(closed, rel=1e-9)
        assert res["results"]["mislabeled"][score]["auc"] == 1.0


def test_resume_never_retrains_finished_models(tmp_path: Path) -> None:
    out = tmp_path / "audit"
    small = dict(epsilons=[], noise_off=True, canaries=["blank", "in_distribution"], eval_models=2,
                 crafting=CraftingConfig(shadow_out=1))
    first = run_audit(_cfg(out, **small))
    assert first["models"]["trained_this_run"] == 1 + 2 + 2 and first["models"]["reused"] == 0
    before = {p: p.stat().st_mtime_ns for p in (out / "noise_off").rglob("*.pt") if p.name != "canaries.pt"}

    # interrupted-then-extended: two more evaluation models; nothing finished is trained again
    second = run_audit(_cfg(out, **{**small, "eval_models": 4}))
    assert second["models"]["trained_this_run"] == 2 and second["models"]["reused"] == 5
    assert {p: p.stat().st_mtime_ns for p in before} == before

    # a lost model is retrained, bit-identically (seeds depend on the model's index only)
    victim = _files(out, "noise_off")[3]
    saved = _load(victim)
    victim.unlink()
    third = run_audit(_cfg(out, **{**small, "eval_models": 4}))
    assert third["models"]["trained_this_run"] == 1
    again = _load(victim)
    assert again["meta"]["included"] == saved["meta"]["included"]
    for key, value in saved["state_dict"].items():
        torch.testing.assert_close(again["state_dict"][key], value, rtol=0, atol=0)
    assert third["settings"]["noise_off"]["results"] == second["settings"]["noise_off"]["results"]


def test_changed_training_config_in_the_same_out_dir_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "audit"
    small = dict(epsilons=[], noise_off=True, canaries=["blank"], eval_models=2, crafting=CraftingConfig(shadow_out=1))
    run_audit(_cfg(out, **small))
    with pytest.raises(ValueError, match="max_epochs"):
        run_audit(_cfg(out, **{**small, "max_epochs": 3}))
    other_lr = ImageClassifier(backbone="small_cnn", backbone_kwargs={"width": 2}, optimizer=partial(torch.optim.SGD, lr=0.1))
    with pytest.raises(ValueError, match="optimizer"):
        run_audit(_cfg(out, **small, model=other_lr))
    run_audit(_cfg(out, **{**small, "eval_models": 3}))  # counts may change: more models, same meaning


def test_config_errors_name_the_bad_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="canaries"):
        _cfg(tmp_path, canaries=["mislabelled"])
    with pytest.raises(ValueError, match="epsilons"):
        _cfg(tmp_path, epsilons=[-1.0])
    with pytest.raises(ValueError, match="Nothing to audit"):
        _cfg(tmp_path, epsilons=[], noise_off=False)
    # 100 + 3 canaries: ceil(100/50) = 2 but ceil(103/50) = 3 -> IN and OUT would have a different q
    bad = _cfg(tmp_path / "a", data=DigitsDataModule(image_size=8, batch_size=50, val_fraction=0.0, test_fraction=0.1))
    with pytest.raises(ValueError, match="batch_size=50"):
        run_audit(bad)


AUDIT_RECIPES = sorted((ROOT / "recipes" / "audit").glob("*.yaml"))


@pytest.mark.parametrize("recipe", AUDIT_RECIPES, ids=lambda p: p.name)
def test_audit_recipe_parses_and_builds(recipe: Path) -> None:
    parser = build_parser()
    ns = parser.parse_args(["-c", str(recipe)])
    init = parser.instantiate(ns)
    cfg = AuditConfig(**{k: init[k] for k in AuditConfig.__dataclass_fields__})
    assert isinstance(cfg.model, ImageClassifier) and cfg.settings()


def test_audit_recipe_typo_fails_naming_the_key(tmp_path: Path, capsys) -> None:
    raw = yaml.safe_load((ROOT / "recipes" / "audit" / "digits.yaml").read_text())
    raw["crafting"]["shadow_outt"] = raw["crafting"].pop("shadow_out")
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["-c", str(path)])
    assert "shadow_outt" in capsys.readouterr().err


def test_plpriv_audit_command_writes_the_report(tmp_path: Path, monkeypatch) -> None:
    from plpriv.cli import main

    monkeypatch.setattr("sys.argv", ["plpriv"])
    config = {
        "out_dir": str(tmp_path / "cli"),
        "model": {"class_path": "plpriv.modules.ImageClassifier",
                  "init_args": {"backbone_kwargs": {"width": 2},
                                "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}}}},
        "data": {"class_path": "plpriv.data.DigitsDataModule",
                 "init_args": {"image_size": 8, "batch_size": 60, "val_fraction": 0.0, "test_fraction": 0.1}},
        "epsilons": [], "noise_off": True, "canaries": ["blank"], "max_epochs": 1, "train_size": TRAIN,
        "reference_models": 2, "eval_models": 2, "crafting": {"shadow_out": 1}, "workers": 0, "progress": False,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["audit", "-c", str(path)])
    for name in ("report.json", "report.md", "audit.png", "config.yaml"):
        assert (tmp_path / "cli" / name).is_file(), name


@pytest.mark.slow
def test_process_pool_matches_in_process_training(tmp_path: Path) -> None:
    """Two spawned workers train the same models as the in-process path (same seeds -> same parameters)."""
    small = dict(epsilons=[], noise_off=True, canaries=["blank"], eval_models=2, crafting=CraftingConfig(shadow_out=1))
    run_audit(_cfg(tmp_path / "a", **small, workers=0))
    run_audit(_cfg(tmp_path / "b", **small, workers=2))
    for pa, pb in zip(_files(tmp_path / "a", "noise_off"), _files(tmp_path / "b", "noise_off")):
        for key, value in _load(pa)["state_dict"].items():
            torch.testing.assert_close(_load(pb)["state_dict"][key], value, rtol=0, atol=0)


def test_runner_imports_only_public_plpriv_api() -> None:
    """The runner builds on public API only: no private name of another plpriv module, no subclassing DPSGD."""
    import ast

    import plpriv.runners.audit as runner

    tree = ast.parse(Path(runner.__file__).read_text())
    private = [f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and (node.module or "").startswith("plpriv") for alias in node.names if alias.name.startswith("_")]
    subclasses = [node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
                  and any(getattr(b, "id", "") == "DPSGD" for b in node.bases)]
    setattrs = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Call)
                and getattr(node.func, "id", "") == "setattr"]
    assert private == [] and subclasses == [] and setattrs == []
