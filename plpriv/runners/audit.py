"""``plpriv audit``: empirical epsilon lower bounds for DP-SGD from many final models (final-model threat model).

For every setting (each theoretical epsilon in ``epsilons``; ``noise_off``: noise multiplier 0; ``sanity_t1``: one
step at ``sanity.epsilon``) the runner

1. starts every model from the same initialisation (``init: fixed``, or ``pretrained`` non-privately on a split of
   the training set disjoint from the audited set D), or from a seeded one per model (``random``);
2. trains the *craft* split: ``crafting.per_side`` models on D alone (their trajectories give the white-box
   directions, their predictions the canaries' labels) and, for ``crafted``, as many on D + {blank canary};
3. builds the canaries (:mod:`plpriv.runners.audit_canaries`): ``mislabeled``, ``blank`` (worst-case label),
   ``in_distribution`` (the most exposed held-out record), ``crafted`` (the paper's query input, crafted on the
   craft split while IN models train on the blank canary) and ``crafted_insert`` (an input crafted over rounds of
   shadow models and inserted into training);
4. trains the reference and evaluation models: with ``canaries_per_model: one`` every IN model holds exactly one
   canary and the OUT models (D alone) serve every canary; with ``all`` every model holds each canary with
   probability 1/2 (balanced per split);
5. scores every final model (black-box loss / margin of the query input; white-box <theta_T - theta_0, g>) and
   bounds epsilon (:mod:`plpriv.runners.audit_eval`): the threshold is chosen with each estimator's own objective on
   the reference models and the bound computed on the evaluation models; GDP is the headline at q = 1 (full-batch
   DP-GD, exactly Gaussian), Clopper-Pearson beside it;
6. checks: IN and OUT models must share every public constant (q, divisor B, sigma, C, steps, delta); a bound above
   the theoretical epsilon (family-wise over the report) or a one-step mu estimate clearly above 1/sigma fails the
   audit: the report is written, then :class:`AuditFailed` is raised (``plpriv audit`` exits with status 1).

All training goes through ``lightning.Trainer.fit`` with :class:`plpriv.callbacks.DPSGD` and its public options only
(``target_epsilon`` calibrates the noise as for a user, ``sample_rate`` is the public q, ``plot=False``,
``memoize_accounting=True``). Models train in parallel processes (``workers``), each is saved as soon as it is done
(``<out_dir>/<setting>/<group>/<split>/<index>.pt``, atomically, without any DP seed), so an interrupted audit
resumes without retraining anything and more models can be added later by raising the counts.
``<out_dir>/report.json``, ``report.md``, ``audit_scores.png`` and ``audit_epsilon.png`` hold the results.
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from plpriv.privacy.canaries import Canary, flat_parameters, least_likely_label
from plpriv.runners.audit_canaries import (
    TRAINED_AS,
    Target,
    build_canaries,
    choose_query_step,
    craft_insert_round,
    craft_query,
    initial_model,
    load_models,
    own_directions,
    score_model,
    shared_directions,
    training_canaries,
)
from plpriv.runners.audit_config import AuditConfig, CraftingConfig, PretrainConfig, SanityConfig, SettingSpec, fingerprint
from plpriv.runners.audit_eval import check_report, evaluate_setting
from plpriv.runners.audit_report import write_report
from plpriv.runners.audit_train import (
    Job,
    Pool,
    atomic_save,
    inclusion_bits,
    load_file,
    pretrain,
    reinitialize,
    stack_dataset,
)
from plpriv.utils.seeding import derive_seed

__all__ = ["AuditConfig", "AuditFailed", "CraftingConfig", "PretrainConfig", "SanityConfig", "build_parser", "main",
           "run_audit"]

MAX_TRAJECTORIES = 8  # craft-split OUT models whose trajectories give the white-box directions


class AuditFailed(RuntimeError):
    """The audit found a bound above the theory, a mu above 1/sigma, or IN / OUT models with different public
    constants: a DP-SGD bug (or a broken audit). ``report`` is the full report (also written to disk)."""

    def __init__(self, failures: list[str], report: dict[str, Any]) -> None:
        super().__init__("\n".join(failures))
        self.failures, self.report = failures, report


def run_audit(cfg: AuditConfig) -> dict[str, Any]:
    """Run (or resume) the audit described by ``cfg``; returns the report (also written to ``cfg.out_dir``).

    Raises :class:`AuditFailed` after writing the report when a check fails."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_fingerprint(cfg, out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only contend with the workers (crafting, scoring)
    try:
        report = _run_audit(cfg, out)
    finally:
        torch.set_num_threads(threads)
    if report["failures"]:
        raise AuditFailed(report["failures"], report)
    return report


def _check_fingerprint(cfg: AuditConfig, out: Path) -> None:
    path = out / "audit_fingerprint.json"
    fp = json.loads(json.dumps(fingerprint(cfg), default=str))
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(fp) | set(old) if fp.get(k) != old.get(k))
        if diff:
            raise ValueError(
                f"{out} holds an audit with a different configuration ({', '.join(diff)} changed); its saved models"
                " would not match. Use a new `out_dir` (or delete the old one)."
            )
    else:
        path.write_text(json.dumps(fp, indent=2))


def _cpu() -> tuple[float, float]:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def _prepare(cfg: AuditConfig, out: Path) -> dict[str, Any]:
    """D, the pretraining split, the held-out pool, q and the shared initialisation (saved in ``init.pt``)."""
    data = cfg.data
    data.setup("fit")
    all_x, all_y = stack_dataset(getattr(data, "train_dataset", None), "train_dataset")
    held = getattr(data, "test_dataset", None) or getattr(data, "val_dataset", None)
    held_x, held_y = stack_dataset(held, "test_dataset (or val_dataset)")
    pre_x = pre_y = None
    if cfg.init == "pretrained":  # a seeded split of the training set: pretraining part, audited part (disjoint)
        perm = np.random.default_rng(derive_seed(cfg.seed, "pretrain-split")).permutation(len(all_y))
        n_pre = int(round(cfg.pretrain.fraction * len(all_y)))
        pre, aud = torch.as_tensor(np.sort(perm[:n_pre])), torch.as_tensor(np.sort(perm[n_pre:]))
        pre_x, pre_y, train_x, train_y = all_x[pre], all_y[pre], all_x[aud], all_y[aud]
    else:
        train_x, train_y = all_x, all_y
    if cfg.train_size is not None:
        if cfg.train_size > len(train_y):
            raise ValueError(f"`train_size` {cfg.train_size} exceeds the {len(train_y)} examples of the audited set.")
        train_x, train_y = train_x[: cfg.train_size], train_y[: cfg.train_size]
    num_classes = int(getattr(data, "num_classes", 0) or int(max(all_y.max(), held_y.max())) + 1)
    batch_size = getattr(data, "batch_size", None)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"The datamodule needs an int `batch_size` (the DP-SGD divisor; q = batch_size / N), got {batch_size!r}.")
    n = len(train_y)
    k = len(training_canaries(cfg.canaries)) if cfg.canaries_per_model == "all" else 1
    if math.ceil(n / batch_size) != math.ceil((n + k) / batch_size):
        raise ValueError(
            f"batch_size={batch_size} gives a different number of steps per epoch with and without {k} canary(ies)"
            f" (ceil({n}/{batch_size}) != ceil({n + k}/{batch_size})): IN and OUT models would differ in more than"
            " the canary. Pick a batch_size for which both are equal."
        )
    model = cfg.model.cpu()
    saved = load_file(out / "init.pt")
    if saved is not None:  # resume: exactly the initialisation the saved models started from
        model.load_state_dict(saved["state_dict"])
        info = saved["info"]
    else:
        info: dict[str, Any] = {}
        try:  # a seeded initialisation, independent of how the config built the module
            reinitialize(model, derive_seed(cfg.seed, "init"))
        except ValueError:
            if cfg.init == "random":
                raise
        if cfg.init == "pretrained":
            p = cfg.pretrain
            info = pretrain(model, pre_x, pre_y, p.epochs, p.lr, p.batch_size, derive_seed(cfg.seed, "pretrain"))
        atomic_save({"state_dict": model.state_dict(), "info": info}, out / "init.pt")
    # source images: distinct held-out examples, fixed for the whole audit (in_distribution is chosen later)
    rng = np.random.default_rng(derive_seed(cfg.seed, "canary-sources"))
    picks = rng.choice(len(held_y), 2, replace=False).tolist()
    sources = {"mislabeled": picks[0], "crafted_insert": picks[1]}
    return {"train_x": train_x, "train_y": train_y, "held_x": held_x, "held_y": held_y, "num_classes": num_classes,
            "batch_size": batch_size, "n": n, "model": model, "sources": sources, "pretrain_info": info,
            "pretrain_size": 0 if pre_y is None else len(pre_y)}


class _Run:
    """The jobs of one audit (paths and seeds depend only on setting, group, split and index)."""

    def __init__(self, cfg: AuditConfig, out: Path, prep: dict[str, Any]) -> None:
        self.cfg, self.out, self.prep = cfg, out, prep
        self.canaries: dict[str, dict[str, Canary]] = {}
        self.targets: dict[str, list[Target]] = {}
        self.crafting: dict[str, dict[str, Any]] = {}
        self.iterates: dict[str, Tensor] = {}

    def job(self, spec: SettingSpec, group: str, split: str, index: int, canaries: Sequence[Canary] = (),
            record: bool = False) -> Job:
        x = self.prep["train_x"]
        ident = f"{group}/{split}/{index:05d}"
        return Job(
            path=str(self.out / spec.name / group / split / f"{index:05d}.pt"),
            target_epsilon=spec.target_epsilon,
            max_epochs=spec.max_epochs,
            extra_x=torch.stack([c.image for c in canaries]) if canaries else x.new_zeros((0, *x.shape[1:])),
            extra_y=torch.tensor([c.label for c in canaries], dtype=torch.long),
            included=[c.name for c in canaries],
            dp_seed=derive_seed(self.cfg.seed, spec.name, group, split, index),
            init_seed=derive_seed(self.cfg.seed, "init", spec.name, group, split, index)
            if self.cfg.init == "random" else None,
            meta={"setting": spec.name, "group": group, "split": split, "index": index, "id": ident},
            record_trajectory=record and self.cfg.init != "random",
        )

    def craft_out(self, spec: SettingSpec) -> list[Job]:
        return [self.job(spec, "out", "craft", i, record=i < MAX_TRAJECTORIES) for i in range(spec.craft)]

    def craft_paths(self, spec: SettingSpec) -> list[str]:
        """The craft-split OUT models that recorded their trajectories."""
        return [str(self.out / spec.name / "out" / "craft" / f"{i:05d}.pt")
                for i in range(min(spec.craft, MAX_TRAJECTORIES))]

    def audit_jobs(self, spec: SettingSpec) -> list[Job]:
        """Reference and evaluation models of a setting (see ``canaries_per_model``)."""
        canaries = self.canaries[spec.name]
        names = training_canaries(spec.canaries)
        jobs = []
        for split, per_side in (("reference", spec.reference), ("eval", spec.eval)):
            if self.cfg.canaries_per_model == "one":
                jobs += [self.job(spec, "out", split, i) for i in range(per_side)]
                for name in names:
                    jobs += [self.job(spec, f"in_{name}", split, i, [canaries[name]]) for i in range(per_side)]
            else:
                bits = inclusion_bits(2 * per_side, len(names), derive_seed(self.cfg.seed, spec.name, "inclusion", split))
                jobs += [self.job(spec, "mixed", split, i, [canaries[n] for n, b in zip(names, row) if b])
                         for i, row in enumerate(bits)]
        return jobs


def _run_audit(cfg: AuditConfig, out: Path) -> dict[str, Any]:
    started, (cpu_me0, cpu_kids0) = time.time(), _cpu()
    prep = _prepare(cfg, out)
    model: LightningModule = prep["model"]
    state = {
        "model": model,
        "train_x": prep["train_x"],
        "train_y": prep["train_y"],
        "heldout_x": prep["held_x"],
        "heldout_y": prep["held_y"],
        "batch_size": prep["batch_size"],
        "accelerator": cfg.accelerator,
        "dp_kwargs": {  # public constants shared by IN and OUT models (q and delta from N without canaries)
            "max_grad_norm": cfg.max_grad_norm,
            "target_delta": cfg.target_delta,
            "sample_rate": min(1.0, prep["batch_size"] / prep["n"]),
            "accountant": cfg.accountant,
            "grad_sample_mode": cfg.grad_sample_mode,
            "plot": False,  # hundreds of identical runs: the figure costs more than training a tiny model
            "memoize_accounting": True,
        },
    }
    run = _Run(cfg, out, prep)
    specs = cfg.settings()
    all_jobs: dict[str, list[Job]] = {s.name: [] for s in specs}
    with Pool(state, cfg.workers, cfg.progress) as pool:
        # 1. craft split, OUT (all settings at once keeps every worker busy)
        jobs = [j for s in specs for j in run.craft_out(s)]
        pool.run(jobs, "craft split (no canary)")
        for s in specs:
            all_jobs[s.name] += [j for j in jobs if j.meta["setting"] == s.name]
        # 2. the fixed canaries from the craft split's OUT models
        for s in specs:
            shadows = load_models(model, [j.path for j in all_jobs[s.name]])
            names = training_canaries(s.canaries)
            run.canaries[s.name] = build_canaries(names, shadows, prep["held_x"], prep["held_y"], prep["sources"],
                                                  prep["num_classes"])
        # 3. crafted query (IN craft models with the blank canary) and the inserted variant's rounds
        _craft(cfg, run, specs, pool, all_jobs, model)
        # 4. reference and evaluation models: the cheap one-step sanity first, then by decreasing epsilon
        order = sorted(specs, key=lambda s: (s.kind != "sanity", s.kind == "noise_off", -(s.target_epsilon or 0)))
        jobs = [j for s in order for j in run.audit_jobs(s)]
        pool.run(jobs, "audit models (reference + eval)")
        for s in specs:
            all_jobs[s.name] += [j for j in jobs if j.meta["setting"] == s.name]
        trained, reused, pool_cpu = pool.trained, pool.reused, pool.cpu_seconds
    for s in specs:
        if s.name in run.iterates:
            _choose_query(cfg, run, s, model, [j for j in all_jobs[s.name] if j.meta["split"] == "reference"])
        atomic_save({"canaries": run.canaries[s.name], "targets": run.targets[s.name],
                     "crafting": run.crafting[s.name]}, out / s.name / "canaries.pt")

    # 5. scores and bounds
    report: dict[str, Any] = {
        "config": fingerprint(cfg) | {"epsilons": cfg.epsilons, "noise_off": cfg.noise_off, "scores": cfg.scores,
                                      "confidence": cfg.confidence, "sanity": vars(cfg.sanity)},
        "data": {"train_size": prep["n"], "num_classes": prep["num_classes"], "batch_size": prep["batch_size"],
                 "sample_rate": state["dp_kwargs"]["sample_rate"], "heldout_size": int(len(prep["held_y"])),
                 "pretrain_size": prep["pretrain_size"], "pretrain": prep["pretrain_info"]},
        "settings": {},
    }
    all_metas = []
    for s in specs:
        metas = [load_file(j.path)["meta"] for j in all_jobs[s.name]]  # type: ignore[index]
        all_metas += metas
        records = _score(cfg, run, s, model, [j for j in all_jobs[s.name] if j.meta["split"] in ("reference", "eval")])
        res = evaluate_setting(cfg, s, records, metas, [t.name for t in run.targets[s.name]])
        res["canaries"] = {c.name: c.as_dict() for c in run.canaries[s.name].values()}
        res["crafting"] = run.crafting[s.name]
        report["settings"][s.name] = res
    report["failures"] = check_report(report, cfg.target_delta, cfg.confidence)
    report["status"] = "failed" if report["failures"] else "passed"
    cpu_me, cpu_kids = _cpu()
    me, kids = cpu_me - cpu_me0, cpu_kids - cpu_kids0
    train_here = pool_cpu if cfg.workers > 0 else 0.0  # workers=0: training CPU is inside this process's own
    train_cpu = [m.get("train_cpu_seconds", 0.0) for m in all_metas]
    report["models"] = {
        "total": len(all_metas), "trained_this_run": trained, "reused": reused,
        "seconds_this_run": time.time() - started,
        "cpu_minutes_this_run": (me + max(kids, train_here)) / 60,
        "train_cpu_minutes_this_run": pool_cpu / 60,
        "main_cpu_minutes_this_run": (me - (pool_cpu if cfg.workers == 0 else 0.0)) / 60,
        "train_cpu_minutes_all": float(sum(train_cpu)) / 60,
        "train_cpu_seconds_per_model": float(np.mean(train_cpu)) if train_cpu else 0.0,
    }
    write_report(cfg, report, out)
    return report


def _craft(cfg: AuditConfig, run: _Run, specs: list[SettingSpec], pool: Pool, all_jobs: dict[str, list[Job]],
           model: LightningModule) -> None:
    """The ``crafted`` query input and the ``crafted_insert`` canary of every setting; the targets (report rows)."""
    c: CraftingConfig = cfg.crafting
    need_query = [s for s in specs if "crafted" in s.canaries]
    jobs = [run.job(s, "in_blank", "craft", i, [run.canaries[s.name]["blank"]]) for s in need_query
            for i in range(s.craft)]
    pool.run(jobs, "craft split (blank canary)")
    for s in specs:
        all_jobs[s.name] += [j for j in jobs if j.meta["setting"] == s.name]
        run.crafting[s.name] = {}
    for s in need_query:
        outs = load_models(model, [j.path for j in all_jobs[s.name] if j.meta["group"] == "out"])
        ins = load_models(model, [j.path for j in jobs if j.meta["setting"] == s.name])
        blank = run.canaries[s.name]["blank"]
        iterates, info = craft_query(run.out / s.name / "crafted_query.pt", blank, outs, ins, c)
        run.crafting[s.name]["crafted"] = info
        run.iterates[s.name] = iterates
        # the craft split's best input for now; the reference models choose the step (_choose_queries)
        run.canaries[s.name]["crafted"] = Canary("crafted", "crafted", iterates[info["craft_best_step"]],
                                                 blank.label, {"trained_on": "blank", "query": True})
    insert = [s for s in specs if "crafted_insert" in s.canaries]
    if insert:
        i = run.prep["sources"]["crafted_insert"]
        x0 = run.prep["held_x"][i]
        state: dict[str, tuple[Tensor, int]] = {}
        history: dict[str, list[dict[str, Any]]] = {s.name: [] for s in insert}
        for s in insert:
            outs = load_models(model, [j.path for j in all_jobs[s.name] if j.meta["group"] == "out"])
            state[s.name] = (x0.clone(), least_likely_label(outs, x0))
        for r in range(c.rounds):
            jobs = [run.job(s, f"shadow_in_r{r}", "craft", k,
                            [Canary("crafted_insert", "crafted", state[s.name][0], state[s.name][1])])
                    for s in insert for k in range(c.shadow_in)]
            pool.run(jobs, f"crafted_insert: shadow models (round {r + 1}/{c.rounds})")
            for s in insert:
                mine = [j for j in jobs if j.meta["setting"] == s.name]
                all_jobs[s.name] += mine
                outs = load_models(model, [j.path for j in all_jobs[s.name] if j.meta["group"] == "out"])
                image, info = craft_insert_round(run.out / s.name / f"crafted_insert_r{r}.pt", *state[s.name], outs,
                                                 load_models(model, [j.path for j in mine]), c, r)
                state[s.name] = (image, state[s.name][1])
                history[s.name].append(info)
        for s in insert:
            run.canaries[s.name]["crafted_insert"] = Canary(
                "crafted_insert", "crafted", state[s.name][0], state[s.name][1], {"source_index": i, "rounds": c.rounds})
            run.crafting[s.name]["crafted_insert"] = history[s.name]
    for s in specs:
        cans = run.canaries[s.name]
        run.targets[s.name] = [Target(n, TRAINED_AS[n], cans[n].image, cans[n].label) for n in s.canaries]


def _choose_query(cfg: AuditConfig, run: _Run, spec: SettingSpec, template: LightningModule, ref: list[Job]) -> None:
    """The ``crafted`` query: the crafting step that best separates the reference split's blank-canary IN models
    from its OUT models, if it beats the blank itself there (the threshold is chosen on the same reference models;
    the bound never sees them)."""
    def member(j: Job) -> bool:
        return "blank" in j.included

    ins = load_models(template, [j.path for j in ref if member(j)])
    outs = load_models(template, [j.path for j in ref if not member(j) and (cfg.canaries_per_model == "all"
                                                                           or j.meta["group"] == "out")])
    label = run.canaries[spec.name]["blank"].label
    step, choice = choose_query_step(run.iterates[spec.name], label, ins, outs,
                                     seed=derive_seed(cfg.seed, spec.name, "query-step"))
    query = run.iterates[spec.name][step]
    info = run.crafting[spec.name]["crafted"]
    info.update(choice, step=step, linf_change=float((query - run.iterates[spec.name][0]).abs().max()))
    run.canaries[spec.name]["crafted"] = Canary("crafted", "crafted", query, label,
                                                {"trained_on": "blank", "query": True, "step": step})
    run.targets[spec.name] = [Target(t.name, t.membership, query, label) if t.name == "crafted" else t
                              for t in run.targets[spec.name]]


def _score(cfg: AuditConfig, run: _Run, spec: SettingSpec, template: LightningModule, jobs: list[Job]
           ) -> list[dict[str, Any]]:
    """Per reference / evaluation model: its id, split, IN / OUT per target and the scores."""
    targets = run.targets[spec.name]
    canaries = run.canaries[spec.name]
    names = training_canaries(spec.canaries)
    directions: dict[str, Tensor] = {}
    theta0 = flat_parameters(template)
    if "white_box" in cfg.scores and cfg.init != "random":
        trajectories = [t for j in run.craft_paths(spec) for t in [load_file(j)["trajectory"]] if t is not None]  # type: ignore[index]
        directions = shared_directions(template, trajectories, {n: canaries[n] for n in names}, cfg.max_grad_norm)
    records = []
    for j in jobs:
        m = load_models(template, [j.path])[0]
        if cfg.canaries_per_model == "one":
            group = j.meta["group"]
            member = {t.name: False for t in targets} if group == "out" else \
                {t.name: True for t in targets if f"in_{t.membership}" == group}
        else:
            member = {t.name: t.membership in j.included for t in targets}
        mine = [t for t in targets if t.name in member]
        dirs, t0 = directions, theta0
        if "white_box" in cfg.scores and cfg.init == "random":
            start = initial_model(template, j.init_seed)
            dirs = own_directions(start, canaries, sorted({t.membership for t in mine}))
            t0 = flat_parameters(start)
        records.append({"id": j.meta["id"], "split": j.meta["split"], "in": member,
                        "scores": score_model(m, t0, mine, dirs, cfg.scores)})
    return records


# ----------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> Any:
    """jsonargparse parser of ``plpriv audit`` (``-c/--config`` YAML; unknown keys fail naming the key)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="plpriv audit", description=__doc__.split("\n\n")[0], default_env=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML config (see recipes/audit/)")
    parser.add_class_arguments(AuditConfig, None, fail_untyped=True)
    return parser


def main(args: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``plpriv audit``: parse, run (or resume), print the report; a failed audit exits with 1."""
    import sys

    parser = build_parser()
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    cfg_ns = parser.parse_args(argv)
    try:  # the config's own checks: one line naming the value (the traceback with --debug)
        init = parser.instantiate(cfg_ns) if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg_ns)
        fields = {k: init[k] for k in AuditConfig.__dataclass_fields__ if k in init}
        cfg = AuditConfig(**fields)
    except (ValueError, TypeError) as err:
        if debug:
            raise
        print(f"plpriv audit: error: {err}\n(run with --debug for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parser.save(cfg_ns, out / "config.yaml", overwrite=True)
    try:
        report = run_audit(cfg)
    except AuditFailed as err:
        print((out / "report.md").read_text())
        print("\n".join(err.failures), file=sys.stderr)
        raise SystemExit(f"AUDIT FAILED ({len(err.failures)} failure(s)); report: {out / 'report.md'}") from None
    print((out / "report.md").read_text())
    print(f"Report: {out / 'report.json'}, {out / 'report.md'}, {out / 'audit_scores.png'}, {out / 'audit_epsilon.png'}")
    return report
