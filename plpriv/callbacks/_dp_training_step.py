"""DPSGD's ``training_step`` wrapper (automatic optimization): virtual steps, ghost clipping's two backward passes,
and loss checks. Lightning's closure still calls it once per batch; it is an instance attribute of the module,
removed again when the fit ends."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.data import extract_batch_size

from plpriv.privacy.poisson import split_batch

if TYPE_CHECKING:
    from plpriv.callbacks.dp_sgd import DPSGD

__all__ = ["MARK", "batch_size_of", "clear_per_sample_state", "wrap_training_step"]

MARK = "_plpriv_dpsgd_wrapper"


def batch_size_of(batch: Any) -> int:
    """Size of the batch dimension (Lightning's rule: the first tensor's dim 0); -1 if there is no tensor."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return int(extract_batch_size(batch))
    except Exception:
        return -1


def clear_per_sample_state(params: list[torch.Tensor]) -> None:
    """Remove what opacus left on the parameters (summed / per-sample gradients, ghost norms) when the fit ends."""
    for p in params:
        for attr in ("summed_grad", "grad_sample", "_norm_sample"):
            if hasattr(p, attr):
                delattr(p, attr)


def _loss_of(output: Any) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, dict) else output
    if not isinstance(loss, torch.Tensor):
        raise ValueError("DPSGD: `training_step` must return the loss tensor (or a dict with 'loss').")
    return loss


def _with_loss(output: Any, loss: torch.Tensor) -> Any:
    return {**output, "loss": loss} if isinstance(output, dict) else loss


def wrap_training_step(dp: DPSGD, trainer: Trainer, pl_module: LightningModule) -> Callable[[], None]:
    """Install the wrapper on ``pl_module``; returns the function that removes it."""
    original = pl_module.training_step
    if getattr(original, MARK, False):
        return lambda: None
    optimizer, hooks = dp.dp_optimizer, dp._hooks
    max_physical, ghost, clip = dp.max_physical_batch_size, dp.grad_sample_mode == "ghost", dp.max_grad_norm

    def run(batch: Any, n: int, args: tuple, kwargs: dict) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """One physical batch: (output, loss to backpropagate, loss value to report)."""
        hooks.batch_size = n if n >= 0 else None
        if ghost:
            hooks.enable()
            hooks.clear_norm_samples()
        output = original(batch, *args, **kwargs)
        loss = _loss_of(output)
        if ghost:
            if loss.dim() != 1 or (n >= 0 and loss.shape[0] != n):
                raise ValueError(
                    f"DPSGD(grad_sample_mode='ghost') needs `training_step` to return the per-sample losses, shape"
                    f" [{n}], got shape {tuple(loss.shape)} (compute the loss with reduction='none')."
                )
            if loss.numel() == 0:
                return output, loss.sum(), loss.sum().detach()
            # ghost clipping (Li et al. 2022): pass 1 gives per-sample gradient norms, pass 2 the clipped sum
            torch.autograd.backward(loss.mean(), retain_graph=True)
            norms = hooks.per_sample_norms(len(loss))
            coef = (clip / (norms + 1e-6)).clamp(max=1.0).to(loss.device)
            hooks.disable()
            for p in optimizer.params:
                p.grad = None
            return output, (coef.detach() * loss).sum(), loss.mean().detach()
        if loss.dim() != 0:
            raise ValueError(
                f"DPSGD: `training_step` returned a loss of shape {tuple(loss.shape)}; it must be the mean over the"
                " batch (a scalar), as opacus rescales per-sample gradients by the batch size."
            )
        if n == 0 and not torch.isfinite(loss):
            loss = torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)  # zero gradient, no NaN in logs
        return output, loss, loss.detach()

    @functools.wraps(original)
    def training_step(batch: Any, *args: Any, **kwargs: Any) -> Any:
        n = batch_size_of(batch)
        chunks = split_batch(batch, n, max_physical) if max_physical and n > 0 else [batch]
        total, count = 0.0, 0
        if len(chunks) > 1:  # Lightning zeroes gradients after training_step: clear the last step's first
            optimizer.zero_grad()
        for chunk in chunks[:-1]:  # virtual steps: clip and accumulate, no noise, no optimizer step
            m = batch_size_of(chunk)
            _, loss, value = run(chunk, m, args, kwargs)
            trainer.strategy.backward(loss, optimizer)
            total, count = total + float(value) * m, count + m
            hooks.fill_missing_grad_samples(optimizer.params)
            optimizer.signal_skip_step(do_skip=True)
            optimizer.pre_step()
            optimizer.zero_grad()
        m = batch_size_of(chunks[-1])
        output, loss, value = run(chunks[-1], m, args, kwargs)
        if count:  # report the mean over the logical batch; the gradient stays the last chunk's
            loss = loss + ((total + value * m) / (count + m) - loss).detach()
        elif ghost:
            loss = loss + (value - loss).detach()
        return _with_loss(output, loss)

    setattr(training_step, MARK, True)
    pl_module.training_step = training_step  # type: ignore[method-assign]
    return lambda: vars(pl_module).pop("training_step", None)
