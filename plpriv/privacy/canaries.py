"""Canaries and membership scores for auditing DP-SGD from the final model (torch only, no Lightning).

A canary is one (image, label) example that an audit adds to the training set of half of many models; a score of
each final model tells how strongly it "remembers" the canary (:mod:`plpriv.privacy.audit` turns scores into an
epsilon lower bound). Canaries:

* ``mislabeled``: a real held-out image with a wrong label (Jagielski et al. 2020) - the usual baseline.
* ``blank``: a constant image (Nasr et al. 2021's "blank" input canary) with a chosen label.
* ``in_distribution``: a real held-out image with its true label, i.e. an ordinary training-like record.
* ``crafted``: the input is optimised so that its loss best separates models trained with it from models trained
  without it (Yoon, Jeung, No 2024, "Adversarial sample-based approach for tighter privacy auditing in final
  model-only scenarios", arXiv 2412.01756): :func:`craft_canary` maximises the standardised IN-vs-OUT loss gap over
  shadow models by projected gradient ascent in input space.

Scores (convention of :mod:`plpriv.privacy.audit`: lower = more likely IN unless ``higher_is_in``):

* black-box ``loss``: cross-entropy of the canary (lower = IN);
* black-box ``margin``: logit of the canary's label minus the largest other logit (higher = IN);
* white-box ``white_box``: the final parameters projected on the canary's loss gradient,
  ``<theta, g_hat>`` with ``g_hat`` the normalised mean of ``grad_theta loss(canary)`` over reference models
  trained *without* the canary (:func:`gradient_direction`). DP-SGD moves the parameters of a model trained with
  the canary by ``-lr * clip(g)`` each time the canary is sampled, so IN models have a lower projection; with a
  fixed initialisation this is, to first order, the one-dimensional statistic the Gaussian noise hides the least
  (the "gradient canary" view of Nasr et al. 2023, applied to an input-space canary). Lower = IN.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CANARY_KINDS",
    "SCORE_HIGHER_IS_IN",
    "Canary",
    "CraftResult",
    "blank_canary",
    "craft_canary",
    "flat_parameters",
    "gradient_direction",
    "in_distribution_canary",
    "trajectory_direction",
    "least_likely_label",
    "logit_margin_scores",
    "loss_gradient",
    "loss_scores",
    "mislabeled_canary",
    "white_box_scores",
]

CanaryKind = Literal["mislabeled", "blank", "in_distribution", "crafted"]
CANARY_KINDS: tuple[str, ...] = ("mislabeled", "blank", "in_distribution", "crafted")
#: For each score name: True if a higher score means "trained with the canary" (``higher_is_in`` of the audit).
SCORE_HIGHER_IS_IN: dict[str, bool] = {"loss": False, "margin": True, "white_box": False}


@dataclass
class Canary:
    """One canary example: ``image`` ``[C, H, W]`` (float, in the data's range) and its training ``label``."""

    name: str
    kind: str
    image: Tensor
    label: int
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in CANARY_KINDS:
            raise ValueError(f"`kind` must be one of {CANARY_KINDS}, got {self.kind!r}.")
        if not isinstance(self.image, Tensor) or self.image.ndim != 3 or not self.image.is_floating_point():
            raise ValueError(f"`image` must be a float tensor [C, H, W], got {getattr(self.image, 'shape', self.image)!r}.")
        if isinstance(self.label, bool) or int(self.label) != self.label or self.label < 0:
            raise ValueError(f"`label` must be a non-negative int, got {self.label!r}.")
        self.label = int(self.label)
        self.image = self.image.detach().to(torch.float32).cpu().contiguous()

    def as_dict(self) -> dict[str, Any]:
        """Metadata (no pixels) for reports."""
        return {"name": self.name, "kind": self.kind, "label": self.label, "shape": list(self.image.shape), **self.info}


def _check_label(name: str, label: int, num_classes: int) -> int:
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_classes:
        raise ValueError(f"`{name}` must be an int in [0, {num_classes - 1}], got {label!r}.")
    return label


def mislabeled_canary(
    image: Tensor, label: int, num_classes: int, new_label: int | None = None, name: str = "mislabeled"
) -> Canary:
    """A real image with a wrong label: ``new_label`` (default ``(label + 1) % num_classes``), never ``label``."""
    if num_classes < 2:
        raise ValueError(f"`num_classes` must be >= 2 to mislabel, got {num_classes!r}.")
    label = _check_label("label", int(label), num_classes)
    new_label = (label + 1) % num_classes if new_label is None else _check_label("new_label", new_label, num_classes)
    if new_label == label:
        raise ValueError(f"`new_label` must differ from the true label {label}, got {new_label}.")
    return Canary(name, "mislabeled", image, new_label, {"true_label": label})


def blank_canary(shape: Sequence[int], label: int, value: float = -1.0, name: str = "blank") -> Canary:
    """A constant image of ``shape`` ``[C, H, W]`` (default: all ``-1``, the background of [-1, 1] images)."""
    if len(shape) != 3 or any(int(s) < 1 for s in shape):
        raise ValueError(f"`shape` must be [C, H, W] with positive sizes, got {list(shape)!r}.")
    return Canary(name, "blank", torch.full([int(s) for s in shape], float(value)), label, {"value": float(value)})


def in_distribution_canary(image: Tensor, label: int, name: str = "in_distribution") -> Canary:
    """A real held-out example with its true label: what an ordinary training record looks like."""
    return Canary(name, "in_distribution", image, int(label))


# ---------------------------------------------------------------------------------------------------------------
# Scores


def _batch(images: Tensor, labels: Tensor | Sequence[int], device: torch.device) -> tuple[Tensor, Tensor]:
    x = images.unsqueeze(0) if images.ndim == 3 else images
    y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if x.ndim != 4 or x.shape[0] != y.shape[0]:
        raise ValueError(f"images [K, C, H, W] and K labels expected, got {tuple(images.shape)} and {tuple(y.shape)}.")
    return x.to(device), y.to(device)


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def loss_scores(model: nn.Module, images: Tensor, labels: Tensor | Sequence[int]) -> Tensor:
    """Cross-entropy of each canary under ``model`` (eval mode restored afterwards); lower = IN."""
    x, y = _batch(images, labels, _device(model))
    was_training = model.training
    model.eval()
    try:
        return F.cross_entropy(model(x).float(), y, reduction="none").cpu()
    finally:
        model.train(was_training)


@torch.no_grad()
def logit_margin_scores(model: nn.Module, images: Tensor, labels: Tensor | Sequence[int]) -> Tensor:
    """``z_y - max_{k != y} z_k`` for each canary (logits ``z``); higher = IN."""
    x, y = _batch(images, labels, _device(model))
    was_training = model.training
    model.eval()
    try:
        z = model(x).float()
    finally:
        model.train(was_training)
    true = z.gather(1, y[:, None]).squeeze(1)
    other = z.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return (true - other).cpu()


def _trainable(model: nn.Module) -> list[Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters to score.")
    return params


def flat_parameters(model: nn.Module) -> Tensor:
    """All trainable parameters, flattened in ``model.parameters()`` order (float32, CPU)."""
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in _trainable(model)])


def loss_gradient(model: nn.Module, image: Tensor, label: int) -> Tensor:
    """``grad_theta cross_entropy(model(image), label)`` flattened like :func:`flat_parameters` (eval mode)."""
    x, y = _batch(image, [label], _device(model))
    params = _trainable(model)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            loss = F.cross_entropy(model(x).float(), y)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        model.train(was_training)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float().cpu() for p, g in zip(params, grads)])


def gradient_direction(models: Sequence[nn.Module], image: Tensor, label: int) -> Tensor:
    """Unit vector along the mean canary loss gradient over reference ``models`` (trained without the canary)."""
    if not models:
        raise ValueError("`models` must hold at least one reference model.")
    g = torch.stack([loss_gradient(m, image, label) for m in models]).mean(0)
    norm = g.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError(f"The canary's mean loss gradient has norm {float(norm)}; no direction to project on.")
    return g / norm


def trajectory_direction(
    model: nn.Module, trajectories: Sequence[Tensor], image: Tensor, label: int, max_grad_norm: float | None = None
) -> Tensor:
    """Unit vector along the canary's summed (clipped) loss gradients over reference training trajectories.

    ``trajectories`` holds one ``[S, P]`` tensor per reference model trained *without* the canary: its flat
    parameters (:func:`flat_parameters` order) before each recorded step. DP-SGD adds ``clip(grad loss(canary))``
    at every step the canary is sampled, so a model trained with it moves (to first order) by a negative multiple of
    ``sum_t clip_C(g_t)``; the mean of that sum over the references is the direction to project on. ``model`` is
    only a template (copied, never changed). ``max_grad_norm=None``: no clipping.
    """
    if not trajectories:
        raise ValueError("`trajectories` must hold at least one [steps, parameters] tensor.")
    work = copy.deepcopy(model)
    params = _trainable(work)
    size = sum(p.numel() for p in params)
    total = torch.zeros(size)
    for traj in trajectories:
        if traj.ndim != 2 or traj.shape[1] != size:
            raise ValueError(f"each trajectory must be [steps, {size}] for this model, got {tuple(traj.shape)}.")
        for theta in traj:
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(theta.to(params[0].dtype), params)
            g = loss_gradient(work, image, label)
            if max_grad_norm is not None:
                g = g * min(1.0, float(max_grad_norm) / (float(g.norm()) + 1e-12))
            total += g
    norm = total.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError(f"The canary's summed gradient has norm {float(norm)}; no direction to project on.")
    return total / norm


def white_box_scores(model: nn.Module, directions: Tensor) -> Tensor:
    """``directions @ theta``: one projection per row of ``directions`` ``[K, P]``; lower = IN (see module doc)."""
    theta = flat_parameters(model)
    d = directions.reshape(-1, theta.numel()) if directions.ndim == 1 else directions
    if d.ndim != 2 or d.shape[1] != theta.numel():
        raise ValueError(f"`directions` must be [K, {theta.numel()}] for this model, got {tuple(directions.shape)}.")
    return d.float().cpu() @ theta


@torch.no_grad()
def least_likely_label(models: Sequence[nn.Module], image: Tensor) -> int:
    """Class with the lowest mean softmax probability over ``models``: the most surprising label for ``image``."""
    if not models:
        raise ValueError("`models` must hold at least one model.")
    probs = []
    for m in models:
        was_training = m.training
        m.eval()
        try:
            probs.append(F.softmax(m(image.unsqueeze(0).to(_device(m))).float(), dim=1).cpu()[0])
        finally:
            m.train(was_training)
    return int(torch.stack(probs).mean(0).argmin())


# ---------------------------------------------------------------------------------------------------------------
# Crafted canary


@dataclass
class CraftResult:
    """Output of :func:`craft_canary`: the crafted image and the objective before each step (and after the last)."""

    image: Tensor
    label: int
    objective: list[float]
    gap: list[float]  # mean OUT loss - mean IN loss along the way
    iterates: list[Tensor] = field(default_factory=list)  # the input at which each objective value was taken


def _losses(models: Sequence[nn.Module], x: Tensor, y: Tensor) -> Tensor:
    return torch.stack([F.cross_entropy(m(x.to(_device(m))).float(), y.to(_device(m))).cpu() for m in models])


def craft_canary(
    image: Tensor,
    label: int,
    models_out: Sequence[nn.Module],
    models_in: Sequence[nn.Module] = (),
    steps: int = 100,
    lr: float = 0.05,
    bounds: tuple[float, float] = (-1.0, 1.0),
    max_change: float | None = None,
    variance_floor: float = 0.01,
) -> CraftResult:
    """Optimise the canary's input so that its loss separates models trained with it from models trained without.

    Maximises the standardised loss gap (Yoon et al. 2024, Sec. 4: the canary's loss is the membership signal of the
    final model, so the sample that best separates the two loss distributions is the strongest canary)::

        J(x) = (mean_out L(x) - mean_in L(x)) / sqrt((var_out L(x) + var_in L(x)) / 2 + variance_floor)

    with Adam on ``x``, projected onto ``bounds`` (the data range) and, if ``max_change`` is given, onto the
    L-infinity ball of that radius around the starting image. ``models_in`` were trained with the starting image
    (the gap is a first-order estimate around it; re-train them with the new image and call again for another
    round). Without ``models_in`` the IN term is dropped and J = mean_out L / sqrt(var_out + floor): an adversarial
    example against the models that never saw it. The label stays fixed (pick it e.g. with
    :func:`least_likely_label`). Models are put in eval mode and are not changed. ``iterates`` keeps every input
    visited, so that the stopping step can be chosen on other models (few crafting models overfit).
    """
    if not models_out:
        raise ValueError("`models_out` must hold at least one model trained without the canary.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"`steps` must be a non-negative int, got {steps!r}.")
    if not lr > 0:
        raise ValueError(f"`lr` must be > 0, got {lr!r}.")
    lo, hi = float(bounds[0]), float(bounds[1])
    if not lo < hi:
        raise ValueError(f"`bounds` must be (low, high) with low < high, got {bounds!r}.")
    if max_change is not None and not max_change > 0:
        raise ValueError(f"`max_change` must be > 0 or None, got {max_change!r}.")
    if not variance_floor > 0:
        raise ValueError(f"`variance_floor` must be > 0, got {variance_floor!r}.")
    x0 = image.detach().float().cpu()
    if x0.ndim != 3:
        raise ValueError(f"`image` must be [C, H, W], got {tuple(image.shape)}.")
    y = torch.tensor([int(label)])
    models = list(models_out) + list(models_in)
    states = [m.training for m in models]
    grad_flags = [[p.requires_grad for p in m.parameters()] for m in models]
    for m in models:
        m.eval()
        m.requires_grad_(False)
    n_out = len(models_out)

    def objective(x: Tensor) -> tuple[Tensor, Tensor]:
        losses = _losses(models, x.unsqueeze(0), y)
        out, inn = losses[:n_out], losses[n_out:]
        var_out = out.var(unbiased=False) if n_out > 1 else out.new_zeros(())
        if len(inn):
            var_in = inn.var(unbiased=False) if len(inn) > 1 else inn.new_zeros(())
            gap = out.mean() - inn.mean()
            return gap / torch.sqrt((var_out + var_in) / 2 + variance_floor), gap
        return out.mean() / torch.sqrt(var_out + variance_floor), out.mean()

    x = x0.clone().clamp_(lo, hi).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    history: list[float] = []
    gaps: list[float] = []
    iterates: list[Tensor] = []
    best_x, best_j = x.detach().clone(), -float("inf")
    try:
        for step in range(steps + 1):
            j, gap = objective(x)
            history.append(float(j.detach()))
            gaps.append(float(gap.detach()))
            iterates.append(x.detach().clone())
            if history[-1] > best_j:
                best_j, best_x = history[-1], x.detach().clone()
            if step == steps:
                break
            opt.zero_grad()
            (-j).backward()
            opt.step()
            with torch.no_grad():
                if max_change is not None:
                    x.copy_(torch.maximum(torch.minimum(x, x0 + max_change), x0 - max_change))
                x.clamp_(lo, hi)
    finally:
        for m, state, flags in zip(models, states, grad_flags):
            m.train(state)
            for p, flag in zip(m.parameters(), flags):
                p.requires_grad_(flag)
    return CraftResult(best_x, int(label), history, gaps, iterates)
