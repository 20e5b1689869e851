"""Guidance for any denoiser ``D(x; sigma)``: reward (classifier) guidance, universal forward and backward guidance.

A guided denoiser ``D'`` is a denoiser again, so it drops into :func:`plpriv.sampling.edm_sampler` (or any sampler of
the ``D(x, sigma, class_labels)`` protocol) unchanged, and composes with class-conditional sampling. In EDM form the
score is ``(D(x; sigma) - x) / sigma^2``, so adding ``w grad log p(y | x)`` to the score is
``D'(x; sigma) = D(x; sigma) + w sigma^2 grad_x log p(y | x)``.

* :class:`ScoreGuidance` -- classifier guidance with a time-dependent reward ``log p(benign | x_sigma)`` (Dhariwal &
  Nichol 2021; censored sampling, Yoon et al. 2023, ``cond_fn``).
* :class:`ForwardGuidance` -- universal guidance's forward step (Bansal et al. 2023, eq. 6): a time-independent
  ``log p(x0)`` evaluated on the denoised estimate, differentiated *through* the denoiser.
* :class:`BackwardGuidance` -- universal guidance's backward step (eq. 8): a few optimiser steps on the clean estimate
  ``x0`` from ``D(x)``, maximising ``log p(x0)``; ``D'`` is the optimised ``x0``.
* Recurrence (eq. 9, "self-recurrence") is a sampler setting: ``edm_sampler(..., recurrence=R)``.

diffusers has no guidance of this kind for arbitrary denoisers (its pipelines hard-wire classifier-free guidance), so
the few formulas are written out here. No Lightning imports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BackwardGuidance",
    "Denoiser",
    "ForwardGuidance",
    "Guidance",
    "GuidedDenoiser",
    "LogSigmoidEnsemble",
    "ScoreGuidance",
]


@runtime_checkable
class Denoiser(Protocol):
    """EDM's denoiser protocol: ``D(x, sigma, class_labels) -> x0`` estimate, same shape as ``x``."""

    def __call__(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor: ...


def _per_image(value: Tensor, batch: int, what: str) -> Tensor:
    """A log-probability as ``[B]`` (accepts ``[B]`` or ``[B, 1]``)."""
    value = value.reshape(value.shape[0], -1) if value.ndim > 1 else value
    if value.ndim == 2 and value.shape[1] == 1:
        value = value[:, 0]
    if value.shape != (batch,):
        raise ValueError(f"{what} must return one value per image, shape ({batch},), got {tuple(value.shape)}")
    return value


def _grad_mode() -> contextlib.ExitStack:
    """Autograd on, also inside ``torch.inference_mode()`` (Lightning's predict/validate run under it)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    return stack


def _leaf(x: Tensor) -> Tensor:
    """A fresh leaf requiring grad (a clone: an inference-mode tensor cannot enter autograd itself)."""
    return x.detach().clone().requires_grad_(True)


def _sigma_images(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Noise level broadcastable against ``x``: ``[B, 1, ..., 1]``."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.numel() == 1:
        sigma = sigma.reshape(1).expand(x.shape[0])
    return sigma.reshape(x.shape[0], *([1] * (x.ndim - 1)))


class Guidance:
    """A guidance term; subclasses are :class:`ScoreGuidance`, :class:`ForwardGuidance`, :class:`BackwardGuidance`."""

    def __init__(self, weight: float = 1.0) -> None:
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight >= 0:
            raise ValueError(f"guidance `weight` must be a number >= 0, got {weight!r}")
        self.weight = float(weight)


class ScoreGuidance(Guidance):
    """Classifier guidance with a time-dependent log-probability: ``D' = D + w sigma^2 grad_x log_prob(x, sigma)``.

    Args:
        log_prob: ``log_prob(x, sigma) -> [B]``, e.g. a :class:`LogSigmoidEnsemble` of time-dependent reward models.
        weight: ``w`` (censored sampling: 1 per member of a 5-ensemble, 5 for a single model).
    """

    def __init__(self, log_prob: Callable[[Tensor, Tensor], Tensor], weight: float = 1.0) -> None:
        super().__init__(weight)
        if not callable(log_prob):
            raise TypeError(f"`log_prob` must be callable as log_prob(x, sigma), got {type(log_prob).__name__}")
        self.log_prob = log_prob

    def correction(self, x: Tensor, sigma: Tensor) -> Tensor:
        """``w sigma^2 grad_x log_prob(x, sigma)`` (no graph kept)."""
        with _grad_mode():
            x_in, sigma = _leaf(x), torch.as_tensor(sigma).clone()
            lp = _per_image(self.log_prob(x_in, sigma), x.shape[0], "ScoreGuidance's log_prob")
            (grad,) = torch.autograd.grad(lp.sum(), x_in)
        return self.weight * _sigma_images(sigma, x) ** 2 * grad


class ForwardGuidance(Guidance):
    """Universal guidance's forward step: ``D' = D + w sigma^2 grad_x log_prob(D(x; sigma))``, through the denoiser.

    Args:
        log_prob: ``log_prob(x0) -> [B]`` on a clean-image estimate (a time-independent reward, or e.g.
            ``100 <f(x0), y>`` for a feature target); the gradient flows through ``D``.
        weight: ``w`` (universal guidance's ``forward_guidance_wt``).
    """

    def __init__(self, log_prob: Callable[[Tensor], Tensor], weight: float = 1.0) -> None:
        super().__init__(weight)
        if not callable(log_prob):
            raise TypeError(f"`log_prob` must be callable as log_prob(x0), got {type(log_prob).__name__}")
        self.log_prob = log_prob


class BackwardGuidance(Guidance):
    """Universal guidance's backward step: ``steps`` optimiser steps on ``x0`` (from ``D(x)``) maximising
    ``log_prob(x0)``; ``D'`` is the optimised ``x0`` (Bansal et al. 2023, eq. 8; censored sampling's
    ``backward_guidance`` with per-sample early stop).

    Args:
        log_prob: ``log_prob(x0) -> [B]``.
        steps: optimiser steps ``B`` (``0`` = off).
        lr: learning rate (censored sampling's MNIST template: 2e-4 with Adam).
        loss_cutoff: an image stops moving once its ``-log_prob`` is below this (``None``: never).
        clamp: ``(low, high)`` range ``x0`` is clamped to after each step (``None``: no clamping).
        optimizer: ``"adam"`` (the authors' code) or ``"sgd"`` (plain gradient ascent).
    """

    def __init__(
        self,
        log_prob: Callable[[Tensor], Tensor],
        steps: int = 5,
        lr: float = 2e-4,
        loss_cutoff: float | None = None,
        clamp: tuple[float, float] | None = (-1.0, 1.0),
        optimizer: str = "adam",
    ) -> None:
        super().__init__(1.0)
        if not callable(log_prob):
            raise TypeError(f"`log_prob` must be callable as log_prob(x0), got {type(log_prob).__name__}")
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"`steps` must be an int >= 0, got {steps!r}")
        if not lr > 0:
            raise ValueError(f"`lr` must be > 0, got {lr!r}")
        if clamp is not None and not clamp[0] < clamp[1]:
            raise ValueError(f"`clamp` must be (low, high) with low < high, got {clamp!r}")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"`optimizer` must be 'adam' or 'sgd', got {optimizer!r}")
        self.log_prob, self.steps, self.lr = log_prob, steps, float(lr)
        self.loss_cutoff, self.clamp, self.optimizer = loss_cutoff, clamp, optimizer

    def optimise(self, x0: Tensor) -> Tensor:
        """The optimised clean estimate (no graph kept)."""
        if self.steps == 0:
            return x0
        with _grad_mode():
            z = _leaf(x0)
            opt_class = torch.optim.Adam if self.optimizer == "adam" else torch.optim.SGD
            opt = opt_class([z], lr=self.lr)
            for _ in range(self.steps):
                loss = -_per_image(self.log_prob(z), z.shape[0], "BackwardGuidance's log_prob")
                active = loss.detach() >= self.loss_cutoff if self.loss_cutoff is not None else None
                if active is not None and not bool(active.any()):
                    break
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                if active is not None:  # per-sample early stop: finished images get no gradient
                    z.grad.mul_(active.reshape(-1, *([1] * (z.ndim - 1))).to(z.grad.dtype))
                opt.step()
                if self.clamp is not None:
                    with torch.no_grad():
                        z.clamp_(*self.clamp)
        return z.detach()


class LogSigmoidEnsemble(nn.Module):
    """``log p(benign) = sum_k log sigmoid(r_k)`` of reward models ``r_k`` (label 1 = benign): the ensemble of censored
    sampling, whose reward is the product of the members' probabilities. An ensemble of one is the single model.

    Args:
        models: reward networks returning logits ``[B]`` or ``[B, 1]``.
        time_dependent: call them as ``r(x, sigma)`` (noisy input) rather than ``r(x0)``.
    """

    def __init__(self, models: Sequence[nn.Module], time_dependent: bool = True) -> None:
        super().__init__()
        models = list(models)
        if not models:
            raise ValueError("`models` is empty: give at least one reward model")
        for m in models:
            if not isinstance(m, nn.Module):
                raise TypeError(f"reward models must be nn.Modules, got {type(m).__name__}")
        self.models = nn.ModuleList(models)
        self.time_dependent = bool(time_dependent)

    def forward(self, x: Tensor, sigma: Tensor | None = None) -> Tensor:
        if self.time_dependent and sigma is None:
            raise ValueError("time-dependent reward models need `sigma`; use ScoreGuidance (it passes it)")
        param = next(self.models.parameters(), None)
        if param is not None and x.dtype != param.dtype:  # the sampler integrates in fp64; rewards run in theirs
            x = x.to(param.dtype)
            sigma = None if sigma is None else torch.as_tensor(sigma).to(param.dtype)
        total = x.new_zeros(x.shape[0])
        for m in self.models:
            logits = m(x, sigma) if self.time_dependent else m(x)
            total = total + F.logsigmoid(_per_image(logits, x.shape[0], "a reward model"))
        return total


class GuidedDenoiser(nn.Module):
    """``D'``: a denoiser with guidance terms applied; itself a denoiser (same call, same ``sigma_min``/``sigma_max``/
    ``round_sigma``), so samplers use it unchanged. Runs inside ``torch.no_grad()`` samplers (it enables grad itself).

    Score and forward terms are summed onto ``D``; backward terms then optimise the result, in the given order.
    The wrapped denoiser's parameters get no gradient (only ``x`` does).
    """

    def __init__(self, denoiser: Callable[..., Tensor], guidance: Guidance | Sequence[Guidance]) -> None:
        super().__init__()
        if not callable(denoiser):
            raise TypeError(f"`denoiser` must be callable as D(x, sigma, class_labels), got {type(denoiser).__name__}")
        terms = [guidance] if isinstance(guidance, Guidance) else list(guidance)
        for t in terms:
            if not isinstance(t, Guidance):
                raise TypeError(f"guidance terms must be ScoreGuidance/ForwardGuidance/BackwardGuidance, got "
                                f"{type(t).__name__}")
        self.denoiser = denoiser  # an nn.Module denoiser becomes a submodule (moves with .to())
        self.terms = terms
        # Reward networks move with ``.to()`` too (the terms themselves are plain objects).
        self.guidance_modules = nn.ModuleList([t.log_prob for t in terms if isinstance(t.log_prob, nn.Module)])
        for name in ("sigma_min", "sigma_max", "label_dim"):
            if hasattr(denoiser, name):
                setattr(self, name, getattr(denoiser, name))
        if hasattr(denoiser, "round_sigma"):
            self.round_sigma = denoiser.round_sigma

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device)
        forward_terms = [t for t in self.terms if isinstance(t, ForwardGuidance)]
        if forward_terms:
            with _grad_mode():
                x_in, sigma = _leaf(x), sigma.clone()
                denoised = self.denoiser(x_in, sigma, class_labels)
                lp = sum(t.weight * _per_image(t.log_prob(denoised), x.shape[0], "ForwardGuidance's log_prob")
                         for t in forward_terms)
                (grad,) = torch.autograd.grad(lp.sum(), x_in)
            out = denoised.detach() + _sigma_images(sigma, x).to(grad.dtype) ** 2 * grad.to(denoised.dtype)
        else:
            out = self.denoiser(x, sigma, class_labels)
        for t in self.terms:
            if isinstance(t, ScoreGuidance):
                out = out + t.correction(x, sigma).to(out.dtype)
        for t in self.terms:
            if isinstance(t, BackwardGuidance):
                out = t.optimise(out)
        return out
