"""``plpriv audit``'s report: ``report.json`` (everything, scores included), ``report.md`` (the tables, the sanity row,
each estimator's assumption, the checks and the cost) and two figures: ``audit_scores.png`` (IN / OUT histograms of
the evaluation models' scores with the chosen thresholds) and ``audit_epsilon.png`` (epsilon_LB against the
theoretical epsilon)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from plpriv.privacy.audit import ASSUMPTIONS
from plpriv.runners.audit_config import AuditConfig

__all__ = ["write_report"]


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return ("inf" if x > 0 else "-inf") if math.isinf(x) else f"{x:.{digits}f}"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, Tensor):
        return obj.tolist()
    return str(obj)


def _row(rows: dict[str, Any], kind: str) -> tuple[str | None, dict[str, Any]]:
    score = rows.get("black_box") if kind == "black_box" else "white_box"
    return score, rows.get(score or "", {})


def write_report(cfg: AuditConfig, report: dict[str, Any], out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=1, default=_json_default))
    (out / "report.md").write_text(markdown(cfg, report))
    _plot_scores(cfg, report, out)
    _plot_epsilon(cfg, report, out)


def markdown(cfg: AuditConfig, report: dict[str, Any]) -> str:
    d, c = report["data"], report["config"]
    init = cfg.init + (f" (trained non-privately on {d['pretrain_size']} examples disjoint from D, accuracy"
                       f" {_fmt(d['pretrain'].get('accuracy'), 3)} there)" if cfg.init == "pretrained" else "")
    status = report["status"]
    lines = [
        "# DP-SGD audit (final model only)",
        "",
        *([f"**AUDIT FAILED** ({len(report['failures'])} failure(s), listed under Checks)", ""]
          if status == "failed" else []),
        f"Models: {c['model']['class']} trained by `lightning.Trainer.fit` with `plpriv.callbacks.DPSGD`; data:"
        f" {c['data']['class']}, audited set D of N = {d['train_size']} examples, public divisor B ="
        f" {d['batch_size']}, q = {_fmt(d['sample_rate'], 4)}, {cfg.max_epochs} epochs, C = {cfg.max_grad_norm:g},"
        f" delta = {cfg.target_delta:g}, accountant {cfg.accountant}. Init: {init}. Canaries per IN model:"
        f" {cfg.canaries_per_model}. Confidence {cfg.confidence:g}.",
        "",
        "epsilon_LB on the evaluation models. Every threshold (and the black-box score, loss or margin) was chosen"
        " with the estimator's own objective on disjoint reference models; the canaries' labels, the white-box"
        " directions and the crafted query on a third, craft split. `max` is the largest bound the evaluation counts"
        " can certify (no error at all). mu bb / wb: GDP mu_lower / point estimate at the chosen threshold. mu fit:"
        " the white-box score's Gaussian-fit mu on the evaluation models with its 95% interval (not a bound: the"
        " leakage the scores see, to compare with the theory's mu = sqrt(T)/sigma).",
        "",
        "| setting | theory eps (mu) | sigma | models/side (ref+eval) | canary | **black-box GDP** (score) |"
        " **white-box GDP** | black-box CP | white-box CP | mu bb | mu wb | mu fit wb | AUC bb / wb | max GDP / CP |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in report["settings"].items():
        for target, rows in res["results"].items():
            (bbs, b), (_, w) = _row(rows, "black_box"), _row(rows, "white_box")
            bg, bc, wg, wc = b.get("gdp", {}), b.get("clopper_pearson", {}), w.get("gdp", {}), w.get("clopper_pearson", {})
            cap = bg or wg
            cap_cp = bc or wc
            fit = w.get("gaussian_mu")
            fit_s = f"{fit[0]:.2f} [{fit[1]:.2f}, {fit[2]:.2f}]" if fit else "-"
            lines.append(
                f"| {name} | {_fmt(res['theoretical_epsilon'])} ({_fmt(res['mu_theory'])}) |"
                f" {_fmt(res['dp'].get('noise_multiplier'), 3)} |"
                f" {res['models']['reference_per_side']}+{res['models']['eval_per_side']} | {target} |"
                f" {_fmt(bg.get('epsilon'))} ({bbs or '-'}) | {_fmt(wg.get('epsilon'))} |"
                f" {_fmt(bc.get('epsilon'))} | {_fmt(wc.get('epsilon'))} |"
                f" {_fmt(bg.get('mu_lower'))} / {_fmt(bg.get('mu_estimate'))} |"
                f" {_fmt(wg.get('mu_lower'))} / {_fmt(wg.get('mu_estimate'))} | {fit_s} |"
                f" {_fmt(b.get('auc'))} / {_fmt(w.get('auc'))} |"
                f" {_fmt(cap.get('max_certifiable'))} / {_fmt(cap_cp.get('max_certifiable'))} |"
            )
    lines += ["", "Headline estimator per setting: " + ", ".join(
        f"{k} {v['headline_estimator']}" for k, v in report["settings"].items()) + "."]
    sanity = [(k, v["sanity"]) for k, v in report["settings"].items() if "sanity" in v]
    if sanity:
        lines += ["", "## Sanity: one step (T = 1)", ""]
        for k, s in sanity:
            lines.append(f"- {k}: **{s['status']}**. {s['message']}")
        lines.append("- A bound above the theoretical epsilon, or a mu estimate clearly above 1/sigma, fails the audit"
                     " (it means a DP-SGD bug); below the tolerance means the audit's scores lose signal.")
    crafted = {k: v["crafting"]["crafted"] for k, v in report["settings"].items() if "crafted" in v.get("crafting", {})}
    if crafted:
        steps = ", ".join(
            f"{k} step {c['step']} (best on reference {c['best_reference_step']}, paired-bootstrap 5% gain"
            f" {c['gain_lower']:+.2f}{'' if c['kept'] else ': not kept'})" for k, c in crafted.items())
        lines += ["", "`crafted`: IN models trained on the blank canary; the black-box scores query an input crafted"
                  f" on the craft split (Yoon et al. 2024 v2), so its white-box row is the blank canary's. Adam"
                  f" {cfg.crafting.steps} steps from the blank image; the step is chosen on the reference models and"
                  f" kept only if it beats the blank itself there (step 0 = the blank): {steps}."]
    lines += ["", "## Estimators and what they assume", ""]
    lines += [f"- `{k}`: {v}" for k, v in ASSUMPTIONS.items()]
    lines += ["", "## Checks", ""]
    problems = [p for res in report["settings"].values() for p in res["problems"]]
    notes = [f"{k}: {w}" for k, res in report["settings"].items() for w in res["warnings"]]
    lines += [f"- {p}" for p in problems] or ["- every bound <= its theoretical epsilon (family-wise); IN and OUT"
                                              " models share every public constant (q, B, sigma, C, steps, delta)."]
    lines += [f"- note: {n}" for n in notes]
    m = report["models"]
    lines += [
        "", "## Cost", "",
        f"- models in this report: {m['total']} (trained this run: {m['trained_this_run']}, reused: {m['reused']}).",
        f"- training CPU time of all of them: {m['train_cpu_minutes_all']:.1f} CPU-minutes"
        f" ({m['train_cpu_seconds_per_model']:.2f} s per model on average).",
        f"- this run: {m['seconds_this_run'] / 60:.1f} min wall, {m['cpu_minutes_this_run']:.1f} CPU-minutes"
        f" (training {m['train_cpu_minutes_this_run']:.1f}; scoring, crafting and pretraining in the main process"
        f" {m['main_cpu_minutes_this_run']:.1f}).",
        "", "Held-out accuracy (mean over models): " + ", ".join(
            f"{k} {_fmt(v['heldout_accuracy'], 3)}" for k, v in report["settings"].items()),
    ]
    return "\n".join(lines) + "\n"


def _plot_scores(cfg: AuditConfig, report: dict[str, Any], out: Path) -> None:
    from plpriv.utils.figures import figure, save_and_log_figure

    settings = list(report["settings"])
    cols = [(t, kind) for t in cfg.canaries for kind in ("black_box", "white_box")
            if kind != "white_box" or "white_box" in cfg.scores]
    fig = figure(figsize=(2.3 * len(cols), 1.9 * len(settings) + 0.6), dpi=90)
    axes = fig.subplots(len(settings), len(cols), squeeze=False)
    for r, name in enumerate(settings):
        res = report["settings"][name]
        for ci, (target, kind) in enumerate(cols):
            ax = axes[r][ci]
            ax.tick_params(labelsize=5)
            rows = res["results"].get(target)
            if rows is None:
                ax.set_axis_off()
                continue
            score, row = _row(rows, kind)
            if row.get("eval_in") and row.get("eval_out"):
                both = np.r_[row["eval_in"], row["eval_out"]]
                bins = np.linspace(both.min(), both.max() + 1e-12 * (1 + abs(both.max())), 25)
                ax.hist(row["eval_out"], bins=bins, alpha=0.6, label="OUT", color="tab:blue")
                ax.hist(row["eval_in"], bins=bins, alpha=0.6, label="IN", color="tab:red")
                est = res["headline_estimator"]
                if est in row:
                    ax.axvline(row[est]["threshold"], color="k", lw=0.8, ls="--")
                ax.set_title(f"{name} {target}\n{score} {est} eps_LB={_fmt(row.get(est, {}).get('epsilon'))}",
                             fontsize=6)
            if r == 0 and ci == 0 and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=5)
    fig.tight_layout()
    save_and_log_figure(None, fig, "audit_scores", directory=out)


def _plot_epsilon(cfg: AuditConfig, report: dict[str, Any], out: Path) -> None:
    from plpriv.utils.figures import figure, save_and_log_figure

    fig = figure(figsize=(6.4, 4.4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    finite = [s for s, v in report["settings"].items() if v["kind"] == "audit" and math.isfinite(v["theoretical_epsilon"])]
    xs = [report["settings"][s]["theoretical_epsilon"] for s in finite]
    if xs:
        top = max(xs) * 1.1
        ax.plot([0, top], [0, top], color="grey", ls=":", label="eps_LB = theoretical eps")
        for ti, target in enumerate(cfg.canaries):
            for kind, marker in (("black_box", "o"), ("white_box", "s")):
                for est, ls in (("gdp", "-"), ("clopper_pearson", "--")):
                    ys = [_row(report["settings"][s]["results"].get(target, {}), kind)[1].get(est, {})
                          .get("epsilon", np.nan) for s in finite]
                    ax.plot(xs, ys, marker=marker, ls=ls, color=f"C{ti}", ms=4, lw=1,
                            label=f"{target} {kind.replace('_', '-')} {'GDP' if est == 'gdp' else 'CP'}")
        caps = []
        for s in finite:
            rows = next(iter(report["settings"][s]["results"].values()), {})
            caps.append(_row(rows, "white_box")[1].get("gdp", {}).get("max_certifiable", np.nan))
        if any(c <= top for c in caps):  # GDP's cap is usually far above the theory: then it stays off the chart
            ax.plot(xs, caps, color="k", ls="-.", lw=0.8, marker="_", ms=12, label="max certifiable (GDP, eval counts)")
        ax.set(xlabel="theoretical epsilon (DPSGD accountant)", ylabel="epsilon lower bound", xlim=(0, top),
               ylim=(0, top))
        ax.legend(fontsize=5, ncol=2)
    ax.set_title("DP-SGD audit: epsilon_LB vs theory (threshold on reference, bound on evaluation models)", fontsize=8)
    fig.tight_layout()
    save_and_log_figure(None, fig, "audit_epsilon", directory=out)
