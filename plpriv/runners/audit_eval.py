"""Bounds and checks of one audited setting, and the checks across the whole report.

Per target (report row) and score: both estimators of :func:`plpriv.privacy.audit.estimate` (threshold chosen with
the estimator's own objective on the reference models, bound on the disjoint evaluation models); the headline
estimator is GDP for full-batch DP-GD (q = 1, where the trade-off curve is exactly Gaussian) and Clopper-Pearson
otherwise; the black-box row uses whichever of ``loss`` / ``margin`` wins the headline objective on the reference
models (chosen before looking at the evaluation models).

Checks that fail the audit (a DP-SGD bug, or a broken audit): IN and OUT models that differ in a public constant
of the mechanism; a bound above the theoretical epsilon (or a GDP mu_lower above sqrt(T)/sigma) that survives a
Bonferroni correction over every bound of the report; a one-step sanity mu estimate clearly above 1/sigma.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from plpriv.privacy.audit import (
    ESTIMATORS,
    ScoreSplit,
    audit_counts,
    estimate,
    gaussian_mu_estimate,
    gdp_mu_lower_bound,
    gdp_mu_to_epsilon,
)
from plpriv.privacy.canaries import SCORE_HIGHER_IS_IN
from plpriv.runners.audit_config import AuditConfig, SettingSpec

__all__ = ["check_report", "evaluate_setting"]

BLACK_BOX_SCORES = ("loss", "margin")
CONSTANTS = ("noise_multiplier", "sample_rate", "expected_batch_size", "max_grad_norm", "steps", "delta")


def auc(s_in: np.ndarray, s_out: np.ndarray, higher_is_in: bool) -> float:
    """P(a random IN model's score is more member-like than a random OUT model's), ties counted 1/2."""
    a, b = (s_in, s_out) if higher_is_in else (-s_in, -s_out)
    diff = a[:, None] - b[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def _split(records: Sequence[dict[str, Any]], target: str, score: str, split: str) -> ScoreSplit:
    rows = [r for r in records if r["split"] == split and target in r["in"]]
    ins = [r for r in rows if r["in"][target]]
    outs = [r for r in rows if not r["in"][target]]
    return ScoreSplit(
        np.array([r["scores"][target][score] for r in ins], dtype=np.float64),
        np.array([r["scores"][target][score] for r in outs], dtype=np.float64),
        tuple(r["id"] for r in ins),
        tuple(r["id"] for r in outs),
    )


def _constants(metas: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    distinct = {key: sorted({m[key] for m in metas}) for key in CONSTANTS}
    shared = {key: vals[0] for key, vals in distinct.items() if len(vals) == 1}
    problems = [f"{key} differs across this setting's models (IN and OUT must share it): {vals}"
                for key, vals in distinct.items() if len(vals) != 1]
    return shared, problems


def evaluate_setting(
    cfg: AuditConfig,
    spec: SettingSpec,
    records: Sequence[dict[str, Any]],
    metas: Sequence[dict[str, Any]],
    targets: Sequence[str],
) -> dict[str, Any]:
    """Bounds of every target x score of one setting (``records``: the reference and evaluation models' scores)."""
    shared, problems = _constants(metas)
    theory = float(max(m["epsilon"] for m in metas)) if spec.target_epsilon is not None else math.inf
    sigma, q, steps = shared.get("noise_multiplier"), shared.get("sample_rate"), shared.get("steps")
    full_batch = q == 1.0
    mu_theory: float | None = None
    if spec.target_epsilon is None:
        mu_theory = math.inf
    elif full_batch and sigma and steps:
        mu_theory = math.sqrt(steps) / sigma  # q = 1 DP-GD: exactly sqrt(T)/sigma-GDP
    headline = "gdp" if full_batch else "clopper_pearson"
    result: dict[str, Any] = {
        "kind": spec.kind,
        "target_epsilon": spec.target_epsilon,
        "theoretical_epsilon": theory,
        "mu_theory": mu_theory,
        "headline_estimator": headline,
        "dp": shared,
        "problems": problems,
        "warnings": [],
        "models": {"reference_per_side": spec.reference, "eval_per_side": spec.eval, "craft_per_side": spec.craft,
                   "total": len(metas)},
        "heldout_accuracy": float(np.nanmean([m["heldout_accuracy"] for m in metas])),
        "train_cpu_seconds": float(sum(m.get("train_cpu_seconds", 0.0) for m in metas)),
        "results": {},
    }
    if not full_batch:
        result["warnings"].append(
            f"q = {q}: the GDP bounds assume a Gaussian trade-off curve, which Poisson subsampling only approximates;"
            " Clopper-Pearson is the headline here.")
    delta, conf = cfg.target_delta, cfg.confidence
    for name in targets:
        rows: dict[str, Any] = {}
        for s in cfg.scores:
            hi = SCORE_HIGHER_IS_IN[s]
            ref, ev = _split(records, name, s, "reference"), _split(records, name, s, "eval")
            row: dict[str, Any] = {"higher_is_in": hi, "eval_in": ev.scores_in.tolist(),
                                   "eval_out": ev.scores_out.tolist()}
            sizes = (ref.scores_in.size, ref.scores_out.size, ev.scores_in.size, ev.scores_out.size)
            if min(sizes) == 0 or np.unique(np.r_[ref.scores_in, ref.scores_out]).size < 2:
                row["error"] = f"a split has no IN or no OUT model, or constant scores ({sizes}): add models"
                rows[s] = row
                continue
            for est in ESTIMATORS:
                row[est] = estimate(ref, ev, delta, conf, estimator=est, higher_is_in=hi).as_dict()
            row["auc"] = auc(ev.scores_in, ev.scores_out, hi)
            try:
                row["gaussian_mu"] = list(gaussian_mu_estimate(ev.scores_in, ev.scores_out, conf, higher_is_in=hi))
            except ValueError:  # constant scores (noise off)
                row["gaussian_mu"] = None
            rows[s] = row
        bb = [s for s in BLACK_BOX_SCORES if headline in rows.get(s, {})]
        # ties: loss first (the order of BLACK_BOX_SCORES)
        rows["black_box"] = max(bb, key=lambda s: rows[s][headline]["reference_objective"]) if bb else None
        result["results"][name] = rows
    if spec.kind == "sanity":
        result["sanity"] = _sanity(cfg, spec, records, targets[0], mu_theory)
        if result["sanity"]["status"] == "fail":
            result["problems"].append(result["sanity"]["message"])
        elif result["sanity"]["status"] != "pass":
            result["warnings"].append(result["sanity"]["message"])
    if spec.kind == "noise_off":
        best = [rows[s][headline]["epsilon"] / max(rows[s][headline]["max_certifiable"], 1e-12)
                for rows in result["results"].values() for s in cfg.scores
                if headline in rows.get(s, {}) and rows[s][headline]["max_certifiable"] > 0]
        if best and max(best) < 0.5:
            result["warnings"].append(
                f"noise off, yet no score reaches half of the largest certifiable bound (best {max(best):.0%}):"
                " the scores barely see the canary, so the other settings' bounds are weak for the same reason.")
    return result


def _sanity(cfg: AuditConfig, spec: SettingSpec, records: Sequence[dict[str, Any]], target: str,
            mu_theory: float | None) -> dict[str, Any]:
    """T = 1: the white-box score is an equal-variance Gaussian (the data's gradient sum is a constant at q = 1
    and a shared init; a random init adds a spread and reads low); its mu, estimated from every reference and
    evaluation model, must match 1/sigma when the canary's gradient is clipped."""
    tol = cfg.sanity.tolerance
    out: dict[str, Any] = {"mu_theory": mu_theory, "tolerance": tol, "score": "white_box"}
    if mu_theory is None or not math.isfinite(mu_theory):
        return out | {"status": "skipped", "message": "sanity_t1 needs q = 1 (full batch) and noise: skipped."}
    if "white_box" not in cfg.scores:
        out["score"] = "loss"  # nearly Gaussian for a small learning rate; the white-box score is exact
    rows = [r for r in records if target in r["in"]]
    s_in = np.array([r["scores"][target][out["score"]] for r in rows if r["in"][target]])
    s_out = np.array([r["scores"][target][out["score"]] for r in rows if not r["in"][target]])
    mu, lo, hi = gaussian_mu_estimate(s_in, s_out, cfg.confidence, higher_is_in=SCORE_HIGHER_IS_IN[out["score"]])
    out.update(mu_hat=mu, interval=[lo, hi], n_in=int(s_in.size), n_out=int(s_out.size))
    text = (f"T = 1 sanity ({target}, {out['score']} score, {s_in.size} IN / {s_out.size} OUT models): mu_hat ="
            f" {mu:.3f} [{lo:.3f}, {hi:.3f}] vs 1/sigma = {mu_theory:.3f} (tolerance {tol:g})")
    if mu > mu_theory + tol and lo > mu_theory:
        status, text = "fail", f"AUDIT FAILED: {text}: the model leaks more than DP-SGD's noise allows (a DP-SGD bug)."
    elif mu > mu_theory + tol:
        status, text = "high", f"{text}: above the tolerance but within the confidence interval (add models)."
    elif mu < mu_theory - tol:
        status, text = "weak", f"{text}: below the tolerance: the score loses signal (the bounds are not tight)."
    else:
        status, text = "pass", f"{text}: pass."
    return out | {"status": status, "message": text}


def check_report(report: dict[str, Any], delta: float, confidence: float) -> list[str]:
    """Bounds above the theory, Bonferroni-corrected over all of the report's bounds; adds problems / warnings to
    the settings and returns every failure message."""
    checks = []
    for name, res in report["settings"].items():
        theory, mu_t = res["theoretical_epsilon"], res["mu_theory"]
        if not math.isfinite(theory):
            continue
        for target, rows in res["results"].items():
            for score, row in rows.items():
                for est in ESTIMATORS:
                    if isinstance(row, dict) and est in row:
                        checks.append((name, target, score, est, row[est], theory, mu_t))
    m = max(len(checks), 1)
    family = 1.0 - (1.0 - confidence) / m  # each bound at this confidence: all hold jointly with >= `confidence`
    failures = []
    for name, target, score, est, r, theory, mu_t in checks:
        ev = r["evaluation"]
        over_eps = r["epsilon"] > theory
        over_mu = est == "gdp" and mu_t is not None and r["mu_lower"] > mu_t
        if not (over_eps or over_mu):
            continue
        if est == "gdp":
            mu_fw = gdp_mu_lower_bound(ev["fp"], ev["fn"], ev["n_out"], ev["n_in"], family)
            eps_fw = gdp_mu_to_epsilon(mu_fw, delta)
            still = eps_fw > theory or (mu_t is not None and mu_fw > mu_t)
            what = f"GDP eps_LB {r['epsilon']:.3f} (mu_lower {r['mu_lower']:.3f}; theory mu {mu_t})"
        else:
            eps_fw = audit_counts(ev["fp"], ev["fn"], ev["n_out"], ev["n_in"], delta, family).epsilon
            still = eps_fw > theory
            what = f"Clopper-Pearson eps_LB {r['epsilon']:.3f}"
        msg = (f"{name}: {target} / {score}: {what} > theoretical epsilon {theory:.3f} (FP={ev['fp']}/{ev['n_out']},"
               f" FN={ev['fn']}/{ev['n_in']})")
        if still:
            msg = (f"AUDIT FAILED: {msg}, also at the family-wise confidence {family:.5f} over the report's {m}"
                   f" bounds (bound there {eps_fw:.3f}): a DP-SGD bug.")
            report["settings"][name]["problems"].append(msg)
            failures.append(msg)
            warnings.warn(msg, stacklevel=2)
        else:
            report["settings"][name]["warnings"].append(
                f"{msg} at confidence {confidence:g}, but not at the family-wise confidence {family:.5f} over the"
                f" report's {m} bounds (bound there {eps_fw:.3f}): expected now and then among many bounds.")
    for name, res in report["settings"].items():
        failures += [p if p.startswith("AUDIT FAILED") else f"AUDIT FAILED: {name}: {p}" for p in res["problems"]
                     if p not in failures]
    return failures
