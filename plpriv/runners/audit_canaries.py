"""The audit's canaries, the crafted query / inserted inputs, white-box directions and the per-model scores.

A *target* is one row of the report: the canary a model was (or was not) trained with (``membership``), the input
the black-box scores query (``query_x``, ``query_y``: the canary itself, or for ``crafted`` the input crafted on the
craft split while the blank canary is what IN models trained on, as in Yoon et al. 2024 v2) and the canary whose
parameter-space direction the white-box score projects on.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from plpriv.privacy.canaries import (
    Canary,
    blank_canary,
    craft_canary,
    flat_parameters,
    in_distribution_canary,
    least_likely_label,
    logit_margin_scores,
    loss_gradient,
    loss_scores,
    mislabeled_canary,
    trajectory_direction,
)
from plpriv.runners.audit_config import CraftingConfig
from plpriv.runners.audit_train import atomic_save, load_file, reinitialize

__all__ = ["Target", "build_canaries", "choose_query_step", "craft_insert_round", "craft_query", "load_models",
           "score_model"]

#: Canaries whose IN models train on the canary itself (``crafted`` trains on ``blank``).
TRAINED_AS = {"mislabeled": "mislabeled", "blank": "blank", "in_distribution": "in_distribution",
              "crafted": "blank", "crafted_insert": "crafted_insert"}


@dataclass
class Target:
    name: str
    membership: str  # the training canary deciding IN / OUT
    query_x: Tensor
    query_y: int
    info: dict[str, Any] = field(default_factory=dict)


def load_models(template: LightningModule, paths: Sequence[str]) -> list[LightningModule]:
    models = []
    for p in paths:
        m = copy.deepcopy(template)
        m.load_state_dict(torch.load(p, map_location="cpu", weights_only=False)["state_dict"])
        m.eval()
        models.append(m)
    return models


def training_canaries(names: Sequence[str]) -> list[str]:
    """The canaries IN models are trained with, in a stable order (``crafted`` needs ``blank``)."""
    out: list[str] = []
    for n in names:
        if TRAINED_AS[n] not in out:
            out.append(TRAINED_AS[n])
    return out


@torch.no_grad()
def _mean_loss(models: Sequence[torch.nn.Module], x: Tensor, y: Tensor) -> Tensor:
    return torch.stack([loss_scores(m, x, y) for m in models]).mean(0)


def build_canaries(
    names: Sequence[str],
    shadows: list[LightningModule],
    held_x: Tensor,
    held_y: Tensor,
    sources: dict[str, int],
    num_classes: int,
) -> dict[str, Canary]:
    """The fixed training canaries from the craft split's OUT models (deterministic given them, so a resumed audit
    rebuilds the same ones): ``mislabeled`` a held-out image with the label those models find least likely,
    ``blank`` the background image with its least likely label (the worst-case label of Annamalai & De Cristofaro
    2024), ``in_distribution`` the held-out image (true label) with the largest mean loss under those models: the
    most exposed real record (any record may be audited; picking a typical one measures something else)."""
    out: dict[str, Canary] = {}
    if "mislabeled" in names:
        i = sources["mislabeled"]
        wrong = least_likely_label(shadows, held_x[i])
        if wrong == int(held_y[i]):  # cannot happen for a model that learned anything; keep it a real mislabel
            wrong = (wrong + 1) % num_classes
        out["mislabeled"] = mislabeled_canary(held_x[i], int(held_y[i]), num_classes, wrong)
        out["mislabeled"].info["source_index"] = i
    if "blank" in names:
        shape = list(held_x.shape[1:])
        value = float(held_x.min())
        blank = torch.full(shape, value)
        out["blank"] = blank_canary(shape, least_likely_label(shadows, blank), value=value)
    if "in_distribution" in names:
        taken = {v for k, v in sources.items() if k != "in_distribution"}
        pool = torch.tensor([i for i in range(len(held_y)) if i not in taken])
        losses = _mean_loss(shadows, held_x[pool], held_y[pool])
        i = int(pool[int(losses.argmax())])
        out["in_distribution"] = in_distribution_canary(held_x[i], int(held_y[i]))
        out["in_distribution"].info.update(source_index=i, shadow_loss=float(losses.max()),
                                           shadow_loss_median=float(losses.median()))
        sources["in_distribution"] = i
    return out


def _objective_floor(models_out: list, models_in: list, x: Tensor, label: int, relative: float) -> float:
    """``relative`` x the pooled loss variance at the starting input (the crafting objective's floor)."""
    y = torch.tensor([label])
    lo = torch.stack([loss_scores(m, x, y) for m in models_out]).flatten()
    li = torch.stack([loss_scores(m, x, y) for m in models_in]).flatten() if models_in else lo.new_zeros(0)
    var = (lo.var(unbiased=False) + (li.var(unbiased=False) if len(li) > 1 else 0.0)) / (2 if len(li) else 1)
    return max(float(var) * relative, 1e-20)


def craft_query(
    path: Path, blank: Canary, models_out: list, models_in: list, c: CraftingConfig
) -> tuple[Tensor, dict[str, Any]]:
    """The paper's crafted canary (Yoon et al. 2024 v2): IN models trained on the *blank* canary; the input the
    final models are queried on is optimised to separate the craft split's IN from its OUT models (standardised
    loss gap, Adam), starting from the blank image, with the blank canary's label. Returns every iterate
    ``[steps + 1, C, H, W]`` (the step is chosen later on the reference models) and the crafting record; cached
    in ``path``."""
    params = {"steps": c.steps, "lr": c.lr, "max_change": c.max_change, "variance_floor": c.variance_floor,
              "n_out": len(models_out), "n_in": len(models_in), "label": blank.label}
    saved = load_file(path)
    if saved is not None and saved.get("params") == params:
        return saved["iterates"], saved["info"]
    floor = _objective_floor(models_out, models_in, blank.image, blank.label, c.variance_floor)
    res = craft_canary(blank.image, blank.label, models_out, models_in, steps=c.steps, lr=c.lr,
                       max_change=c.max_change, variance_floor=floor)
    best = int(np.argmax(res.objective))
    info = {"craft_objective": res.objective, "craft_best_step": best,
            "craft_models": {"out": len(models_out), "in": len(models_in)}}
    iterates = torch.stack(res.iterates)
    atomic_save({"iterates": iterates, "info": info, "params": params}, path)
    return iterates, info


def fisher_gap(losses_in: Tensor, losses_out: Tensor) -> Tensor:
    """Standardised loss gap (mean OUT - mean IN) / pooled sd, per column of ``[models, candidates]`` losses."""
    var = (losses_in.var(0, unbiased=True) + losses_out.var(0, unbiased=True)) / 2
    return (losses_out.mean(0) - losses_in.mean(0)) / var.clamp_min(1e-30).sqrt()


@torch.no_grad()
def choose_query_step(
    iterates: Tensor, label: int, models_in: list, models_out: list, seed: int = 0, resamples: int = 500,
    level: float = 0.05,
) -> tuple[int, dict[str, Any]]:
    """The crafting step whose input best separates the *reference* IN from OUT models (standardised loss gap).

    Few craft models overfit the input, so the step is chosen on other models, and kept only where it beats step 0
    (the blank canary itself) on them: the gain over step 0 of the best step must stay positive in all but a
    ``level`` fraction of paired bootstrap resamples of the reference models; otherwise step 0 is the query.
    """
    y = torch.full((len(iterates),), int(label))
    li = torch.stack([loss_scores(m, iterates, y) for m in models_in]).double()
    lo = torch.stack([loss_scores(m, iterates, y) for m in models_out]).double()
    gaps = fisher_gap(li, lo)
    best = int(gaps.argmax())
    gen = torch.Generator().manual_seed(seed)
    gains = []
    for _ in range(resamples):  # resample IN and OUT models separately; the same models for every step (paired)
        bi = li[torch.randint(len(li), (len(li),), generator=gen)]
        bo = lo[torch.randint(len(lo), (len(lo),), generator=gen)]
        g = fisher_gap(bi, bo)
        gains.append(float(g[best] - g[0]))
    lower = float(np.quantile(gains, level)) if best else 0.0
    step = best if best and lower > 0 else 0
    return step, {"reference_gap": gaps.tolist(), "best_reference_step": best, "gain_lower": lower,
                  "kept": bool(step)}


def craft_insert_round(
    path: Path, x: Tensor, label: int, models_out: list, models_in: list, c: CraftingConfig, r: int
) -> tuple[Tensor, dict[str, Any]]:
    """One round of the inserted variant: optimise the input against this round's IN models (trained with the
    current input) and the OUT craft models; the result is trained on by the next round (resumable)."""
    saved = load_file(path)
    if saved is None:
        floor = _objective_floor(models_out, models_in, x, label, c.variance_floor)
        res = craft_canary(x, label, models_out, models_in, steps=c.steps, lr=c.lr, max_change=c.max_change,
                           variance_floor=floor)
        best = int(np.argmax(res.objective))
        saved = {"image": res.image, "label": res.label, "objective_start": res.objective[0],
                 "objective_end": res.objective[best], "gap_start": res.gap[0], "gap_end": res.gap[best]}
        atomic_save(saved, path)
    return saved["image"], {k: v for k, v in saved.items() if k != "image"} | {"round": r}


# ----------------------------------------------------------------------------------------------------------------
# White-box directions and scores


def shared_directions(
    template: LightningModule, trajectories: list[Tensor], canaries: dict[str, Canary], max_grad_norm: float
) -> dict[str, Tensor]:
    """Per training canary: the unit mean of its summed clipped loss gradients along the craft split's OUT
    trajectories (the direction DP-SGD pushes a model trained with it, to first order), for a shared init."""
    return {name: trajectory_direction(template, trajectories, c.image, c.label, max_grad_norm)
            for name, c in canaries.items()}


def initial_model(template: LightningModule, init_seed: int | None) -> LightningModule:
    """A model at its initial parameters theta_0: the shared init, or the per-model seeded re-initialisation."""
    m = copy.deepcopy(template)
    if init_seed is not None:
        reinitialize(m, init_seed)
    m.eval()
    return m


def score_model(
    model: LightningModule,
    theta0: Tensor,
    targets: Sequence[Target],
    directions: dict[str, Tensor],
    scores: Sequence[str],
) -> dict[str, dict[str, float]]:
    """``{target: {score: value}}``: black-box ``loss`` / ``margin`` of the target's query input; ``white_box``:
    <theta_T - theta_0, d> with d the unit direction of the target's training canary (lower = IN)."""
    if not targets:
        return {}
    x = torch.stack([t.query_x for t in targets])
    y = torch.tensor([t.query_y for t in targets])
    out: dict[str, dict[str, float]] = {t.name: {} for t in targets}
    if "loss" in scores:
        for t, v in zip(targets, loss_scores(model, x, y).tolist()):
            out[t.name]["loss"] = float(v)
    if "margin" in scores:
        for t, v in zip(targets, logit_margin_scores(model, x, y).tolist()):
            out[t.name]["margin"] = float(v)
    if "white_box" in scores:
        delta = (flat_parameters(model).double() - theta0.double())
        d = torch.stack([directions[t.membership] for t in targets]).double()
        for t, v in zip(targets, (d @ delta).tolist()):
            out[t.name]["white_box"] = float(v)
    return out


def own_directions(theta0_model: LightningModule, canaries: dict[str, Canary], names: Sequence[str]) -> dict[str, Tensor]:
    """``init: random``: unit loss gradients of the canaries at this model's own theta_0."""
    out = {}
    for n in names:
        g = loss_gradient(theta0_model, canaries[n].image, canaries[n].label)
        out[n] = g / g.norm().clamp_min(1e-30)
    return out


__all__ += ["initial_model", "own_directions", "shared_directions", "training_canaries"]
