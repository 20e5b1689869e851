"""The audit runner end to end on tiny models: DP-SGD runs checked against opacus' own accountant and the data
they saw, public constants shared by IN and OUT models, scores recomputed by hand, the noise-off bound against the
closed forms, the one-step sanity row (mu = 1/sigma), a leaking training step failing the audit loudly,
resumability (finished models are never retrained; a deleted one is retrained bit-identically), config checks and
the CLI."""

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
from plpriv.privacy.audit import gdp_mu_to_epsilon
from plpriv.runners.audit import AuditConfig, AuditFailed, CraftingConfig, PretrainConfig, SanityConfig, build_parser, run_audit

from _helpers import ROOT

TRAIN = 100  # first 100 examples of the audited split
OFF = SanityConfig(enabled=False)


def _model(lr: float = 0.5, cls: type = ImageClassifier) -> ImageClassifier:
    return cls(backbone="small_cnn", backbone_kwargs={"width": 2}, optimizer=partial(torch.optim.SGD, lr=lr))


def _cfg(out: Path, **overrides) -> AuditConfig:
    kw = dict(
        model=_model(),
        # q = 1 (batch >= N): opacus' RDP accountant is then a closed form, so calibration takes milliseconds
        data=DigitsDataModule(image_size=8, batch_size=200, val_fraction=0.0, test_fraction=0.1),
        out_dir=str(out),
        epsilons=[4.0],
        noise_off=False,
        canaries=["mislabeled", "blank", "crafted"],
        max_epochs=2,
        train_size=TRAIN,
        accountant="rdp",
        reference_per_side=2,
        eval_per_side=3,
        crafting=CraftingConfig(per_side=2, steps=2),
        sanity=OFF,
        workers=0,
        progress=False,
    )
    kw.update(overrides)
    return AuditConfig(**kw)


def _files(out: Path, setting: str, group: str = "*", split: str = "*") -> list[Path]:
    return sorted((out / setting).glob(f"{group}/{split}/*.pt"))


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_tiny_audit_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "audit"
    cfg = _cfg(out, init="pretrained", pretrain=PretrainConfig(epochs=1),
               canaries=["mislabeled", "blank", "crafted", "crafted_insert"],
               crafting=CraftingConfig(per_side=2, steps=2, rounds=1, shadow_in=1))
    report = run_audit(cfg)
    for name in ("report.json", "report.md", "audit_scores.png", "audit_epsilon.png", "audit_fingerprint.json", "init.pt"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text())["status"] == "passed"
    res = report["settings"]["eps4"]
    assert res["problems"] == [] and res["headline_estimator"] == "gdp"
    # one canary per IN model: OUT models (craft + reference + eval) hold none; crafted trains on the blank canary
    assert len(_files(out, "eps4", "out")) == 2 + 2 + 3
    assert len(_files(out, "eps4", "in_blank", "craft")) == 2 and not _files(out, "eps4", "in_crafted")
    groups = {"out", "in_mislabeled", "in_blank", "in_crafted_insert", "shadow_in_r0"}  # inserted: 1 round, 1 model
    assert {p.parent.parent.name for p in _files(out, "eps4")} == groups

    # every DP-SGD run: the data it saw (D + at most one canary), the public q and divisor, steps, opacus' epsilon
    metas = [_load(p)["meta"] for p in _files(out, "eps4")]
    assert len(metas) == res["models"]["total"] == 7 + 2 + 1 + 3 * 5
    for m in metas:
        assert len(m["included"]) == (0 if m["group"] == "out" else 1)
        assert m["num_samples"] == TRAIN + len(m["included"]) and m["sample_rate"] == 1.0
        assert m["expected_batch_size"] == 200.0 and m["steps"] == 2  # 2 epochs of 1 batch
        acc = RDPAccountant()
        acc.history = [(m["noise_multiplier"], m["sample_rate"], m["steps"])]
        assert m["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
        assert 4.0 - 0.05 <= m["epsilon"] <= 4.0  # calibrated to the target from below
        assert not any("seed" in key for key in m)  # a saved model carries no DP seed (it replays the noise)
    for key in ("noise_multiplier", "sample_rate", "expected_batch_size", "max_grad_norm", "steps", "delta"):
        assert len({m[key] for m in metas}) == 1 and res["dp"][key] == metas[0][key]
    assert res["mu_theory"] == pytest.approx(math.sqrt(2) / res["dp"]["noise_multiplier"])

    # scores recomputed by hand from the saved final parameters; counts at the reference threshold by hand
    saved = _load(out / "eps4" / "canaries.pt")
    canaries, targets = saved["canaries"], {t.name: t for t in saved["targets"]}
    assert canaries["mislabeled"].label != canaries["mislabeled"].info["true_label"]
    assert targets["crafted"].membership == "blank" and targets["crafted"].query_y == canaries["blank"].label
    assert targets["crafted_insert"].membership == "crafted_insert" and canaries["crafted_insert"].kind == "crafted"
    for name in ("mislabeled", "blank", "crafted", "crafted_insert"):
        t = targets[name]
        row = res["results"][name]["loss"]
        own_in, own_out = [], []
        for p in _files(out, "eps4", "*", "eval"):
            group = p.parent.parent.name
            if group not in ("out", f"in_{t.membership}"):
                continue
            model = _model()
            model.load_state_dict(_load(p)["state_dict"])
            model.eval()
            with torch.no_grad():
                loss = float(F.cross_entropy(model(t.query_x[None]), torch.tensor([t.query_y])))
            (own_out if group == "out" else own_in).append(loss)
        np.testing.assert_allclose(sorted(row["eval_in"]), sorted(own_in), rtol=1e-5)
        np.testing.assert_allclose(sorted(row["eval_out"]), sorted(own_out), rtol=1e-5)
        for est in ("gdp", "clopper_pearson"):
            if est in row:
                thr, ev = row[est]["threshold"], row[est]["evaluation"]
                assert ev["fp"] == sum(s < thr for s in own_out) and ev["fn"] == sum(s >= thr for s in own_in)
                assert 0 <= row[est]["epsilon"] <= row[est]["max_certifiable"]
    md = (out / "report.md").read_text()
    assert "| eps4 |" in md and "GDP (Nasr et al. 2023)" in md and "Clopper-Pearson (Jagielski" in md
    assert "## Cost" in md and report["models"]["train_cpu_minutes_all"] > 0
    assert report["data"]["pretrain_size"] > 0 and report["data"]["pretrain"]["accuracy"] > 0.1


def test_noise_off_full_batch_reaches_the_largest_certifiable_bound(tmp_path: Path) -> None:
    """No noise, q = 1 and a fixed init: training is deterministic, all IN models coincide, all OUT models coincide,
    and the canary's push changes every score: IN and OUT are perfectly separated. The bounds must equal the closed
    forms for zero errors: p = 1 - (beta/2)^(1/n), CP eps = ln((1-delta-p)/p), GDP mu = 2 Phi^-1(1 - p)."""
    out = tmp_path / "audit"
    cfg = _cfg(out, epsilons=[], noise_off=True, canaries=["mislabeled"], reference_per_side=2, eval_per_side=12)
    res = run_audit(cfg)["settings"]["noise_off"]
    assert res["theoretical_epsilon"] == math.inf and res["dp"]["noise_multiplier"] == 0.0
    assert res["dp"]["sample_rate"] == 1.0 and res["warnings"] == []
    p = 1 - 0.025 ** (1 / 12)
    from scipy import stats

    for score in ("loss", "margin", "white_box"):
        row = res["results"]["mislabeled"][score]
        cp, gdp = row["clopper_pearson"], row["gdp"]
        assert cp["evaluation"]["fp"] == cp["evaluation"]["fn"] == 0 and row["auc"] == 1.0
        assert cp["epsilon"] == pytest.approx(math.log((1 - 1e-5 - p) / p), rel=1e-9)
        assert gdp["mu_lower"] == pytest.approx(2 * stats.norm.isf(p), rel=1e-9)
        assert gdp["epsilon"] == pytest.approx(gdp_mu_to_epsilon(gdp["mu_lower"], 1e-5), rel=1e-9)


def test_one_step_sanity_row_recovers_mu_of_the_gaussian_mechanism(tmp_path: Path) -> None:
    """T = 1 step of full-batch DP-GD at epsilon 10 is exactly (1/sigma)-GDP with 1/sigma ~ 2 (PRV accountant),
    and the white-box score is then an equal-variance Gaussian: its mu estimate must cover 1/sigma."""
    out = tmp_path / "audit"
    cfg = _cfg(out, epsilons=[], canaries=["blank"], accountant="prv", model=_model(lr=0.05),
               sanity=SanityConfig(epsilon=10.0, reference_per_side=20, eval_per_side=60))
    res = run_audit(cfg)["settings"]["sanity_t1"]
    sigma = res["dp"]["noise_multiplier"]
    assert res["dp"]["steps"] == 1 and res["mu_theory"] == pytest.approx(1 / sigma)
    assert res["mu_theory"] == pytest.approx(2.0, abs=0.02)  # eps 10 at delta 1e-5 is mu = 2 in GDP terms
    s = res["sanity"]
    assert s["n_in"] == s["n_out"] == 80 and s["status"] != "fail"
    se = math.sqrt(2 / 80 + s["mu_hat"] ** 2 / 320)
    assert abs(s["mu_hat"] - 1 / sigma) < 3 * se  # 3 standard errors (~0.55 on this budget)
    assert s["interval"][0] < 1 / sigma < s["interval"][1] or abs(s["mu_hat"] - 1 / sigma) < 3 * se
    gdp = res["results"]["blank"]["white_box"]["gdp"]
    assert gdp["epsilon"] <= res["theoretical_epsilon"] and gdp["mu_lower"] <= res["mu_theory"]
    assert "## Sanity: one step (T = 1)" in (out / "report.md").read_text()


class _LeakyClassifier(ImageClassifier):
    """A DP-SGD bug on purpose: after every step the head's bias moves by the label counts of the batch, with no
    clipping and no noise, so a model trained with the blank canary shifts along that canary's direction."""

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            self.net.head.bias.add_(0.05 * torch.bincount(batch[1], minlength=10).float())


def test_a_leaking_training_step_fails_the_audit_loudly(tmp_path: Path) -> None:
    out = tmp_path / "audit"
    cfg = _cfg(out, epsilons=[1.0], canaries=["blank"], max_epochs=1, model=_model(lr=0.05, cls=_LeakyClassifier),
               reference_per_side=6, eval_per_side=30)
    with pytest.warns(UserWarning, match="AUDIT FAILED"), pytest.raises(AuditFailed) as err:
        run_audit(cfg)
    assert "eps1: blank / white_box" in str(err.value) and "a DP-SGD bug" in str(err.value)
    report = err.value.report
    assert report["status"] == "failed" and json.loads((out / "report.json").read_text())["status"] == "failed"
    assert "**AUDIT FAILED**" in (out / "report.md").read_text()
    assert report["settings"]["eps1"]["results"]["blank"]["white_box"]["gdp"]["epsilon"] > 1.0


def test_resume_never_retrains_finished_models(tmp_path: Path) -> None:
    out = tmp_path / "audit"
    small = dict(epsilons=[], noise_off=True, canaries=["blank", "in_distribution"], reference_per_side=1,
                 eval_per_side=1, crafting=CraftingConfig(per_side=1))
    first = run_audit(_cfg(out, **small))
    assert first["models"]["trained_this_run"] == 1 + 3 * 2 and first["models"]["reused"] == 0
    before = {p: p.stat().st_mtime_ns for p in _files(out, "noise_off")}

    # interrupted-then-extended: one more evaluation model per side; nothing finished is trained again
    second = run_audit(_cfg(out, **{**small, "eval_per_side": 2}))
    assert second["models"]["trained_this_run"] == 3 and second["models"]["reused"] == 7
    assert {p: p.stat().st_mtime_ns for p in before} == before

    # a lost model is retrained, bit-identically (seeds depend on setting, group, split and index only)
    victim = _files(out, "noise_off", "in_blank", "eval")[1]
    saved = _load(victim)
    victim.unlink()
    third = run_audit(_cfg(out, **{**small, "eval_per_side": 2}))
    assert third["models"]["trained_this_run"] == 1
    again = _load(victim)
    assert again["meta"]["included"] == saved["meta"]["included"] == ["blank"]
    for key, value in saved["state_dict"].items():
        torch.testing.assert_close(again["state_dict"][key], value, rtol=0, atol=0)
    assert third["settings"]["noise_off"]["results"] == second["settings"]["noise_off"]["results"]


def test_all_canaries_per_model_is_balanced(tmp_path: Path) -> None:
    out = tmp_path / "audit"
    cfg = _cfg(out, epsilons=[], noise_off=True, canaries=["mislabeled", "blank"], canaries_per_model="all",
               reference_per_side=2, eval_per_side=3, crafting=CraftingConfig(per_side=1))
    res = run_audit(cfg)["settings"]["noise_off"]
    metas = [_load(p)["meta"] for p in _files(out, "noise_off", "mixed")]
    assert len(metas) == 2 * (2 + 3)
    for split, n in (("reference", 2), ("eval", 3)):
        for name in ("mislabeled", "blank"):
            assert sum(name in m["included"] for m in metas if m["split"] == split) == n
    assert len(res["results"]["blank"]["loss"]["eval_in"]) == len(res["results"]["blank"]["loss"]["eval_out"]) == 3


def test_changed_training_config_in_the_same_out_dir_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "audit"
    small = dict(epsilons=[], noise_off=True, canaries=["blank"], reference_per_side=1, eval_per_side=1,
                 crafting=CraftingConfig(per_side=1))
    run_audit(_cfg(out, **small))
    with pytest.raises(ValueError, match="max_epochs"):
        run_audit(_cfg(out, **{**small, "max_epochs": 3}))
    with pytest.raises(ValueError, match="optimizer"):
        run_audit(_cfg(out, **small, model=_model(lr=0.1)))
    with pytest.raises(ValueError, match="init"):
        run_audit(_cfg(out, **small, init="random"))
    run_audit(_cfg(out, **{**small, "eval_per_side": 2}))  # counts may change: more models, same meaning


def test_config_errors_name_the_bad_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="canaries"):
        _cfg(tmp_path, canaries=["mislabelled"])
    with pytest.raises(ValueError, match="epsilons"):
        _cfg(tmp_path, epsilons=[-1.0])
    with pytest.raises(ValueError, match="Nothing to audit"):
        _cfg(tmp_path, epsilons=[], noise_off=False)
    with pytest.raises(ValueError, match="init"):
        _cfg(tmp_path, init="warm")
    with pytest.raises(ValueError, match="per_side"):
        _cfg(tmp_path, per_side={"eps3": [1, 2]})
    with pytest.raises(ValueError, match="pretrain.fraction"):
        _cfg(tmp_path, init="pretrained", pretrain=PretrainConfig(fraction=1.0))
    # all canaries per model: 100 + 2 canaries, ceil(100/50) = 2 but ceil(102/50) = 3 -> IN and OUT would differ
    bad = _cfg(tmp_path / "a", canaries_per_model="all",
               data=DigitsDataModule(image_size=8, batch_size=50, val_fraction=0.0, test_fraction=0.1))
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
    raw["crafting"]["per_sidee"] = raw["crafting"].pop("per_side")
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["-c", str(path)])
    assert "per_sidee" in capsys.readouterr().err


def test_plpriv_audit_command_writes_the_report(tmp_path: Path, monkeypatch) -> None:
    from plpriv.cli import main

    monkeypatch.setattr("sys.argv", ["plpriv"])
    config = {
        "out_dir": str(tmp_path / "cli"),
        "model": {"class_path": "plpriv.modules.ImageClassifier",
                  "init_args": {"backbone_kwargs": {"width": 2},
                                "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}}}},
        "data": {"class_path": "plpriv.data.DigitsDataModule",
                 "init_args": {"image_size": 8, "batch_size": 120, "val_fraction": 0.0, "test_fraction": 0.1}},
        "epsilons": [], "noise_off": True, "canaries": ["blank"], "max_epochs": 1, "train_size": TRAIN,
        "reference_per_side": 1, "eval_per_side": 1, "crafting": {"per_side": 1}, "sanity": {"enabled": False},
        "workers": 0, "progress": False,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["audit", "-c", str(path)])
    for name in ("report.json", "report.md", "audit_scores.png", "audit_epsilon.png", "config.yaml"):
        assert (tmp_path / "cli" / name).is_file(), name


@pytest.mark.slow
def test_process_pool_matches_in_process_training(tmp_path: Path) -> None:
    """Two spawned workers train the same models as the in-process path (same seeds -> same parameters)."""
    small = dict(epsilons=[], noise_off=True, canaries=["blank"], reference_per_side=1, eval_per_side=1,
                 crafting=CraftingConfig(per_side=1))
    run_audit(_cfg(tmp_path / "a", **small, workers=0))
    run_audit(_cfg(tmp_path / "b", **small, workers=2))
    for pa, pb in zip(_files(tmp_path / "a", "noise_off"), _files(tmp_path / "b", "noise_off")):
        for key, value in _load(pa)["state_dict"].items():
            torch.testing.assert_close(_load(pb)["state_dict"][key], value, rtol=0, atol=0)


def test_runner_imports_only_public_plpriv_api() -> None:
    """The runner builds on public API only: no private name of another plpriv module, no subclassing DPSGD, no
    setattr; its files stay short."""
    import ast

    files = sorted((ROOT / "plpriv" / "runners").glob("audit*.py"))
    assert len(files) >= 4
    for path in files:
        source = path.read_text()
        assert len(source.splitlines()) <= 500, f"{path.name}: split it"
        tree = ast.parse(source)
        private = [f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   and (node.module or "").startswith("plpriv") and not (node.module or "").startswith("plpriv.runners")
                   for alias in node.names if alias.name.startswith("_")]
        subclasses = [node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
                      and any(getattr(b, "id", "") == "DPSGD" for b in node.bases)]
        setattrs = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Call)
                    and getattr(node.func, "id", "") == "setattr"]
        assert private == [] and subclasses == [] and setattrs == [], path.name


@pytest.mark.parametrize(("flag", "value", "needle"), [("--max_grad_norm", "-1", "`max_grad_norm` must be > 0"),
                                                       ("--epsilons", "[-1]", "`epsilons` must be finite and > 0")])
def test_audit_config_value_error_is_one_line(tmp_path: Path, capsys, flag: str, value: str, needle: str) -> None:
    """A bad value in the audit config: exit 2 with the config's own message, no traceback (issue 25)."""
    from plpriv.runners.audit import main

    with pytest.raises(SystemExit) as info:
        main(["-c", str(ROOT / "recipes" / "audit" / "digits.yaml"), flag, value, "--out_dir", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"plpriv audit: error: {needle}") and "Traceback" not in err
    assert not (tmp_path / "config.yaml").exists()  # nothing written before the refusal
