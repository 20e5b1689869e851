"""``plpriv unlearn``: run one unlearning method from an original checkpoint and write a report.

``plpriv unlearn -c recipes/unlearning/cola.yaml [--reference RETRAIN.ckpt] [--out_dir DIR]``

A recipe holds ``seed_everything``, ``model`` (a :class:`plpriv.modules.unlearning.UnlearningModule` with the
original checkpoint and the forget spec) and ``data``: the keys ``plpriv fit`` knows, so ``plpriv fit --print_config``
checks it. The runner builds the Trainer itself (``max_epochs`` = the method's ``epochs``, a progress bar, a
``last.ckpt`` at every epoch end in ``<out_dir>/checkpoints``), so rerunning the same command after an interruption
resumes from the last epoch; the runtime in the report sums the time of all attempts (kept in the checkpoint).

``<out_dir>/report.json`` and ``report.md`` hold UA, RA, TA, MIA (SalUn's MIA-Efficacy), MIA_loss, MIA_AUC (the
forget-vs-unseen loss-attack AUC, unseen = test samples of the forget classes), relearn (mean over 5 seeds, with
relearn_std and relearn_trials), seconds, and, given a retrained model (``--reference``: the last.ckpt of a Retrain run,
or ``model`` is Retrain), IDI with its 95 % interval over ``--idi_trials`` trials (default 10; every forget and retain
sample; the counts in ``idi.samples``), its per-layer MI curves with intervals (``idi.png``), the average gap to
Retrain and MIA_AUC_gap (|MIA_AUC - Retrain's|).
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from plpriv.metrics.idi import information_difference_index
from plpriv.modules.unlearning import Retrain, UnlearningModule, relearn_trials, unlearning_metrics
from plpriv.modules.unlearning.evaluation import average_gap, tensor_of

__all__ = ["build_parser", "main", "report_markdown", "run_unlearning"]


class _Timer(Callback):
    """Training seconds summed over all attempts of a run (saved in the checkpoint)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start: float | None = None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def state_dict(self) -> dict[str, float]:
        return {"seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seconds = float(state.get("seconds", 0.0))


def _read_metrics(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _keep_earlier_metrics(path: Path, earlier: list[dict[str, str]]) -> None:
    """Put back the rows of the attempts before a resume: Lightning's CSV logger deletes ``metrics.csv`` when it
    opens a non-empty log directory. Rows from the resumed step on are this attempt's."""
    if not earlier:
        return
    new = _read_metrics(path)
    first = min((int(r["step"]) for r in new if r.get("step", "").isdigit()), default=None)
    rows = [r for r in earlier if first is None or not r.get("step", "").isdigit() or int(r["step"]) < first] + new
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _load_net(path: str | None, like: UnlearningModule) -> torch.nn.Module | None:
    """The network of a checkpoint: an unlearning run's last.ckpt (``net.*`` keys) or an ImageClassifier's."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise ValueError(f"--reference {path!r} does not exist: give the last.ckpt of a Retrain run")
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    net = like.original_net()
    net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
    return net.eval()


def run_unlearning(
    model: UnlearningModule,
    data: LightningDataModule,
    out_dir: str | Path,
    reference: str | torch.nn.Module | None = None,
    idi: dict[str, Any] | None = None,
    idi_cache: dict[int, Any] | None = None,
    relearn: bool = True,
    accelerator: str = "cpu",
    progress: bool = True,
    validate: bool = False,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Train ``model`` (resuming ``<out_dir>/checkpoints/last.ckpt`` if present), evaluate it, write the reports.

    ``reference``: the retrained network (or a checkpoint path) for IDI and the average gap; ``idi``: keyword
    arguments of :func:`plpriv.metrics.information_difference_index` (``layers``, ``trials``, ``steps``, ...);
    ``idi_cache``: shared across calls, so the original's and Retrain's estimates are computed once.
    """
    if not isinstance(model, UnlearningModule):
        raise TypeError(f"`model` must be an UnlearningModule (plpriv.modules.unlearning.*), got "
                        f"{type(model).__name__}")
    out = Path(out_dir)
    model.attach_data(data)
    timer = _Timer()
    last = ModelCheckpoint(dirpath=out / "checkpoints", filename="last", save_top_k=1, every_n_epochs=1,
                           save_on_train_epoch_end=True, enable_version_counter=False)
    trainer = Trainer(max_epochs=model.hparams.epochs, accelerator=accelerator, devices=1, default_root_dir=out,
                      logger=CSVLogger(out, name="", version=""), callbacks=[timer, last, *callbacks],
                      enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=5,
                      limit_val_batches=None if validate else 0, num_sanity_val_steps=0)
    ckpt = out / "checkpoints" / "last.ckpt"
    earlier = _read_metrics(out / "metrics.csv") if ckpt.is_file() else []
    trainer.fit(model, ckpt_path=str(ckpt) if ckpt.is_file() else None)
    _keep_earlier_metrics(out / "metrics.csv", earlier)
    if trainer.current_epoch < model.hparams.epochs:  # interrupted (a callback stopped it): no report yet
        return {"interrupted_at_epoch": trainer.current_epoch}

    model.eval().cpu()
    net = model.net
    forget, retain, test = model.split("forget"), model.split("retain"), model.test_split()
    unseen = model.forget_test_split()
    unseen = test if unseen is None else unseen  # held-out samples like D_f (random forgetting: the whole test set)
    report: dict[str, Any] = {"method": type(model).__name__,
                              **unlearning_metrics(net, forget, retain, test, unseen=unseen), "seconds": timer.seconds}
    report["relearn"] = None
    if relearn:
        trials = relearn_trials(net, model.split("both"), forget)
        report.update(relearn=float(np.mean(trials)), relearn_std=float(np.std(trials, ddof=1)),
                      relearn_trials=trials)
    ref_net = _load_net(reference, model) if isinstance(reference, (str, Path)) else reference
    if isinstance(model, Retrain):
        report["IDI"] = 0.0  # ID(retrain) = 0 by definition
    elif ref_net is not None:
        original = model.original_net()
        if idi_cache is not None:
            original = idi_cache.setdefault("original_net", original)
        kwargs = {k: v for k, v in (idi or {}).items() if v is not None}
        limit = kwargs.pop("max_samples", None)  # default: every forget and retain sample
        result = information_difference_index(net, ref_net, original, tensor_of(forget, limit),
                                              tensor_of(retain, limit), cache=idi_cache, plot=out / "idi.png",
                                              **kwargs)
        summary = result.to_dict()
        report.update(IDI=result.idi, IDI_ci95=summary["IDI_ci95"], IDI_std=summary["IDI_std"], idi=summary)
    else:
        report["IDI"] = None  # needs --reference
    if isinstance(model, Retrain):
        report["MIA_AUC_gap"] = 0.0
    elif ref_net is not None:
        ref = unlearning_metrics(ref_net, forget, retain, test, unseen=unseen)
        report["avg_gap"] = average_gap(report, ref)
        report["MIA_AUC_gap"] = abs(report["MIA_AUC"] - ref["MIA_AUC"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(report_markdown({report["method"]: report}))
    return report


def _idi_cell(r: dict[str, Any]) -> str:
    """``IDI [low, high]`` (95 % interval over the trials), ``IDI (n=1)`` for one trial, ``IDI (by definition)``
    for Retrain (0) and the original (1), ``-`` without IDI."""
    if r.get("IDI") is None:
        return "-"
    ci, trials = r.get("IDI_ci95"), (r.get("idi") or {}).get("trials")
    if ci is not None:
        return f"{r['IDI']:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"
    return f"{r['IDI']:.3f} (n={trials})" if trials is not None else f"{r['IDI']:.3f} (by definition)"


#: report key -> column title: MIA-Eff. is SalUn's MIA-Efficacy (% of D_f called non-member), MIA AUC the
#: forget-vs-unseen loss attack (0.5: D_f looks unseen) and its gap to Retrain's AUC
COLUMNS = {"UA": "UA", "RA": "RA", "TA": "TA", "MIA": "MIA-Eff. (SalUn)", "MIA_loss": "MIA_loss",
           "MIA_AUC": "MIA AUC (f vs unseen)", "MIA_AUC_gap": "AUC gap to Retrain", "IDI": "IDI [95% CI]",
           "relearn": "relearn (mean ± sd)", "seconds": "seconds"}


LEGEND = (
    "Columns (%, from plpriv.modules.unlearning.evaluation): UA = 100 - accuracy on the forget set D_f (Retrain's is"
    " the target); RA / TA: accuracy on the retain / test set. MIA-Eff. (SalUn): % of D_f that an SVC on the"
    " confidence, fitted on retain (member) vs test (non-member), calls non-member. MIA_loss: the same with a loss"
    " threshold. MIA AUC (f vs unseen): ROC AUC of -loss between D_f and unseen test samples of the same classes"
    " (Retrain ~0.5; higher: D_f still remembered); AUC gap to Retrain: its distance to Retrain's. IDI [95% CI]:"
    " information difference index (Jeon et al. 2024; 0 = Retrain, 1 = the original) with its interval over trials."
    " relearn: forget accuracy after re-training only a fresh head on 2% of the training data (mean ± sd over"
    " seeds; lower = features hold less about D_f). seconds: unlearning time."
)


def _cell(key: str, r: dict[str, Any]) -> str:
    if key == "IDI":
        return _idi_cell(r)
    if r.get(key) is None:
        return "-"
    if key == "relearn" and r.get("relearn_std") is not None:
        return f"{r[key]:.1f} ± {r['relearn_std']:.1f}"
    return f"{r[key]:.3f}" if key.startswith("MIA_AUC") else f"{r[key]:.2f}"


def report_markdown(results: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of method -> metrics (UA, RA, TA, MIA-Efficacy, MIA_loss, MIA AUC and its gap to Retrain,
    IDI with its 95 % interval, relearn with its spread over seeds, seconds)."""
    lines = ["| method | " + " | ".join(COLUMNS.values()) + " |", "|---|" + "---|" * len(COLUMNS)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(_cell(k, r) for k in COLUMNS) + " |")
    return "\n".join(lines) + "\n\n" + LEGEND + "\n"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="plpriv unlearn", description=__doc__.split("\n\n")[0], default_env=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="a recipe (recipes/unlearning/*.yaml)")
    parser.add_argument("--seed_everything", type=int, default=0)
    parser.add_subclass_arguments(UnlearningModule, "model", required=True)
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    parser.add_argument("--out_dir", type=str | None, default=None,
                        help="default: runs/unlearning/<method class name, lower case>")
    parser.add_argument("--reference", type=str | None, default=None, help="last.ckpt of a Retrain run (for IDI)")
    parser.add_argument("--idi_trials", type=int, default=10, help="IDI trials (>= 2 for its 95%% interval)")
    parser.add_argument("--idi_steps", type=int, default=200)
    parser.add_argument("--idi_layers", type=list[str] | None, default=None)
    parser.add_argument("--relearn", type=bool, default=True)
    parser.add_argument("--accelerator", type=str, default="cpu")
    parser.add_argument("--progress", type=bool, default=True)
    return parser


def main(args: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    cfg = parser.parse_args(args)
    seed_everything(cfg.seed_everything, workers=True)
    init = parser.instantiate_classes(cfg)
    out_dir = cfg.out_dir or f"runs/unlearning/{type(init.model).__name__.lower()}"
    idi = {"trials": cfg.idi_trials, "steps": cfg.idi_steps, "layers": cfg.idi_layers}
    report = run_unlearning(init.model, init.data, out_dir, reference=cfg.reference, idi=idi, relearn=cfg.relearn,
                            accelerator=cfg.accelerator, progress=cfg.progress)
    print(report_markdown({report.get("method", "?"): report}) if "method" in report else report)
    print(f"plpriv unlearn: report in {out_dir}/report.json and report.md")
    return report
