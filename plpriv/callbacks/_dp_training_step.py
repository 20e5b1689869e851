"""DPSGD's ``training_step`` wrappers: virtual steps, ghost clipping's two backward passes, loss checks and the
per-example independence probe (automatic optimization), and the guard that keeps statistics of the private batch
out of the logs (both modes). Lightning's closure still calls the step once per batch; the wrappers are instance
attributes of the module, removed again when the fit ends: Lightning has no public hook around ``training_step``
or around ``LightningModule.log``, and filtering metrics after the fact (loggers, ``callback_metrics``) is too late
for the progress bar, checkpoint file names and monitors that already read them."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.model_helpers import is_overridden

from plpriv.privacy.independence import IndependenceProbe
from plpriv.privacy.poisson import split_batch

if TYPE_CHECKING:
    from plpriv.privacy.engine import DPEngine

__all__ = ["MARK", "batch_size_of", "guard_training_logs", "wrap_training_step"]

MARK = "_plpriv_dpsgd_wrapper"


def batch_size_of(batch: Any) -> int:
    """Size of the batch dimension (Lightning's rule: the first tensor's dim 0); -1 if there is no tensor."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return int(extract_batch_size(batch))
    except Exception:
        return -1


def _loss_of(output: Any) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, dict) else output
    if not isinstance(loss, torch.Tensor):
        raise ValueError("DPSGD: `training_step` must return the loss tensor (or a dict with 'loss').")
    return loss


def _with_loss(output: Any, loss: torch.Tensor) -> Any:
    return {**output, "loss": loss} if isinstance(output, dict) else loss


# the module's hooks of the training loop: whatever they log may be a statistic of the private batches
TRAINING_HOOKS = ("training_step", "on_train_batch_start", "on_train_batch_end", "on_train_epoch_start",
                  "on_train_epoch_end", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
                  "on_before_zero_grad", "optimizer_step")


class _LogGuard:
    """Replaces ``pl_module.log`` while one of the module's training hooks runs (re-entrant: ``optimizer_step`` runs
    ``training_step``): metrics not named in ``allowed`` are dropped (their names collected in ``dropped``);
    ``silent`` drops everything (probe passes). Validation hooks and callbacks log as usual."""

    def __init__(self, pl_module: LightningModule, allowed: tuple[str, ...]) -> None:
        self.pl_module, self.allowed = pl_module, set(allowed)
        self.dropped: set[str] = set()
        self.silent = False
        self._depth = 0

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        module = self.pl_module
        if self._depth == 0:
            log = module.log

            def private_log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
                if name in self.allowed and not self.silent:
                    return log(name, value, *args, **kwargs)
                if not self.silent:
                    self.dropped.add(name)
                return None

            module.log = private_log  # type: ignore[method-assign]  # log_dict calls self.log: covered too
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                vars(module).pop("log", None)


def _guarded(guard: _LogGuard, hook: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(hook)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        with guard.active():
            return hook(*args, **kwargs)

    return guarded


def guard_training_logs(pl_module: LightningModule, allowed: tuple[str, ...]) -> tuple[_LogGuard, Callable[[], None]]:
    """Run ``training_step`` and every training hook the module overrides under the log guard; returns the guard and
    the function that removes the wrappers (instance attributes: no public hook surrounds a module's hooks)."""
    guard, undo = _LogGuard(pl_module, allowed), []
    for name in TRAINING_HOOKS:
        if name != "training_step" and not is_overridden(name, pl_module):
            continue
        had_own, original = name in vars(pl_module), getattr(pl_module, name)
        setattr(pl_module, name, _guarded(guard, original))
        undo.append((name, original if had_own else None))

    def remove() -> None:
        for name, own in reversed(undo):
            if own is None:
                vars(pl_module).pop(name, None)
            else:
                setattr(pl_module, name, own)

    return guard, remove


def wrap_training_step(dp: DPEngine, trainer: Trainer, pl_module: LightningModule, guard: _LogGuard | None,
                       on_unverified: Callable[[str], None]) -> Callable[[], None]:
    """Install the wrapper on ``pl_module``; returns the function that removes it. ``guard`` silences the probe's
    passes; ``on_unverified`` hears when the probe could not decide (the step's randomness is its own)."""
    original = pl_module.training_step
    if getattr(original, MARK, False):
        return lambda: None
    optimizer, hooks = dp.optimizer, dp.hooks
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

    probe = not ghost and dp.steps == 0  # once per run, at its first step (a resumed run was probed before)

    def probe_independence(chunk: Any, m: int, args: tuple, kwargs: dict) -> None:
        hooks.batch_size = m

        def step(b: Any) -> torch.Tensor:
            loss = _loss_of(original(b, *args, **kwargs))
            return loss if loss.dim() == 0 else loss.mean()

        if guard is not None:
            guard.silent = True
        try:
            result = IndependenceProbe(optimizer.params, hooks.parameter_names,
                                       lambda: optimizer.zero_grad(set_to_none=True), module=pl_module
                                       ).run(step, chunk, m)
        finally:
            if guard is not None:
                guard.silent = False
        if result is not None and result.coupled:
            names = ", ".join(f"`{n}`" for n in result.coupled[:6])
            raise ValueError(
                f"DPSGD: `{type(pl_module).__name__}.training_step` couples the examples of a batch: replacing one"
                f" example changed the per-sample gradients of the others (parameters {names}). A layer or loss that"
                " mixes examples (batch statistics, in-batch negatives, mixup, a sequence-first layer whose dim 0 is"
                " not the batch) breaks DP-SGD's sensitivity bound C: epsilon would not hold. Compute each example's"
                " loss from that example alone (GroupNorm/LayerNorm instead of batch statistics; per-example"
                " augmentation; the batch dimension first in every private layer, e.g. batch_first=True)."
            )
        if result is not None and not result.reproducible:
            on_unverified(type(pl_module).__name__)

    @functools.wraps(original)
    def training_step(batch: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal probe
        n = batch_size_of(batch)
        chunks = split_batch(batch, n, max_physical) if max_physical and n > 0 else [batch]
        if probe and batch_size_of(chunks[0]) >= 2:
            probe = False
            probe_independence(chunks[0], batch_size_of(chunks[0]), args, kwargs)
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
