"""opacus' per-sample gradient hooks on a model's private sub-modules, with the checks DP-SGD needs (no Lightning).

opacus computes per-sample gradients from the activations its forward hooks record and the gradients its backward
hooks see. Three ways to get a wrong clipped sum silently, each turned into an error here that names the culprit:

* a second forward pass through a hooked layer on a batch of another size (e.g. the private batch plus a public
  batch): opacus stacks both passes' rows, so one example's row mixes with another's and the clipped sum moves by
  more than C. Every recorded activation must have the private batch's size (:attr:`PerSampleHooks.batch_size`).
* a parameter whose gradient does not pass through its module's forward (``F.linear(x, self.lin.weight)``, an
  ``nn.Parameter`` used directly): it gets a gradient but no per-sample gradient, opacus would train it on zeros
  (hooks) or leave it out of the clipping norm (ghost clipping).
* activations of a forward pass without backward (EMA, sampling in training mode) would pair with the next backward.

The backward half of opacus' hooks is a tensor hook on each layer's output instead of opacus' full backward hook: a
full backward hook returns the output as a view of a custom Function, and in-place code after the layer (ResNets'
``x += shortcut``, ``ReLU(inplace=True)``) then fails. A tensor hook registered before an in-place op receives the
gradient of the layer's own output, which is what opacus' per-sample rule needs (same values, same order).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from opacus.grad_sample.functorch import prepare_layer
from opacus.grad_sample.utils import get_hooks_class
from opacus.layers import DPGRU, DPLSTM, DPRNN
from torch import nn

from plpriv.privacy.validation import join_path

__all__ = ["GRAD_SAMPLE_MODES", "PerSampleHooks"]

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """Half/bf16 activations and output gradients (autocast) as fp32, so opacus' per-sample rules form per-sample
    gradients and norms in fp32: with bf16 norms the clip factor C / ||g|| is rounded, and one example's clipped
    gradient reached 1.004-1.007 C (CPU autocast), above the sensitivity the accountant assumes. Costs fp32 copies
    of the recorded activations."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@functools.cache
def _checked_hooks_class(mode: str) -> type:
    """opacus' hooks class for ``mode`` with four changes: a backward pass whose forward recorded nothing (eval mode,
    parameters frozen by ``toggle_optimizer``) is not part of the private step and is skipped (opacus would fail on
    the empty activation list); every recorded activation is made contiguous (and fp32 under autocast, with the
    output gradients: :func:`_fp32`) and goes through
    ``self.on_activation`` (the size check); the backward half is a tensor hook on the output (module docstring)."""
    base = get_hooks_class(mode)

    def capture_activations_hook(self: Any, module: nn.Module, forward_input: Any, output: Any) -> None:
        before = len(getattr(module, "activations", ()))
        try:
            base.capture_activations_hook(self, module, forward_input, output)
        except NotImplementedError as error:  # ghost clipping: opacus' "Parameter tying is not supported"
            path = self.module_path(module) if self.module_path is not None else type(module).__name__
            raise ValueError(
                f"DPSGD(grad_sample_mode='ghost'): `{path}` ({type(module).__name__}) runs more than once per forward"
                f" pass (a shared or tied layer), which ghost clipping cannot norm per example ({error}). Use"
                " grad_sample_mode='hooks' or 'functorch', which support it."
            ) from error
        if len(getattr(module, "activations", ())) > before:
            # opacus 1.6's conv rule (unfold2d) reads the padded input with NCHW strides: a channels-last input
            # (e.g. after diffusers' attention reshape) gave silently wrong per-sample gradients (zeros)
            module.activations[-1] = [_fp32(t.contiguous()) if isinstance(t, torch.Tensor) else t
                                      for t in module.activations[-1]]
            if self.on_activation is not None:
                self.on_activation(module)

    def capture_backprops_hook(self: Any, module: nn.Module, *args: Any, **kwargs: Any) -> None:
        if not getattr(module, "activations", None):
            return
        base.capture_backprops_hook(self, module, *args, **kwargs)

    def watch_output(self: Any, module: nn.Module, _inputs: Any, output: Any, *, loss_reduction: str,
                     batch_first: bool) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        if not (isinstance(out, torch.Tensor) and out.requires_grad and self.hooks_enabled and module.training
                and torch.is_grad_enabled()):
            return

        def on_grad(grad: torch.Tensor) -> None:
            self.capture_backprops_hook(module, None, (_fp32(grad),), loss_reduction=loss_reduction,
                                        batch_first=batch_first)

        out.register_hook(on_grad)

    def add_hooks(self: Any, *, loss_reduction: str = "mean", batch_first: bool = True,
                  force_functorch: bool = False) -> None:
        # opacus' add_hooks with the full backward hook replaced by `watch_output` (see the module docstring);
        # its handles go where opacus' remove_hooks finds them
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError("Trying to add hooks twice to the same model")
        handles: list[Any] = []
        self._module.autograd_grad_sample_hooks = handles
        self.autograd_grad_sample_hooks = handles
        for module in self.iterate_submodules(self._module):
            if type(module) in (DPRNN, DPLSTM, DPGRU):  # their RNNLinear cells carry the hooks
                continue
            if force_functorch or self._get_module_type(module) not in self.GRAD_SAMPLERS:
                prepare_layer(module, batch_first=batch_first)
            handles.append(module.register_forward_hook(self.capture_activations_hook))
            handles.append(module.register_forward_hook(
                functools.partial(watch_output, self, loss_reduction=loss_reduction, batch_first=batch_first)))
        self.enable_hooks()

    return type(
        f"Checked{base.__name__}",
        (base,),
        {"capture_activations_hook": capture_activations_hook, "capture_backprops_hook": capture_backprops_hook,
         "add_hooks": add_hooks, "on_activation": None, "module_path": None},
    )


def _rows(activation: Sequence[Any]) -> int | None:
    """Batch size of one recorded activation (opacus' rule: the last input's dim 0, e.g. EmbeddingBag offsets)."""
    last = activation[-1] if len(activation) else None
    return int(last.shape[0]) if isinstance(last, torch.Tensor) and last.dim() > 0 else None


class PerSampleHooks:
    """Per-sample gradient hooks of opacus on ``roots`` (sub-modules holding only private parameters).

    Args:
        roots: ``(path, module)`` pairs; paths name modules and parameters in errors.
        mode: ``"hooks"``, ``"functorch"`` or ``"ghost"`` (ghost clipping: per-sample norms, no per-sample grads).
        max_grad_norm: clipping bound (ghost clipping needs it in the hooks).
        forbid_accumulation: raise if gradients of two batches are accumulated (Poisson sampling).
    """

    def __init__(self, roots: Sequence[tuple[str, nn.Module]], *, mode: str, max_grad_norm: float,
                 forbid_accumulation: bool = True) -> None:
        if mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"`grad_sample_mode` must be one of {GRAD_SAMPLE_MODES}, got {mode!r}.")
        self.mode = mode
        self.batch_size: int | None = None  # the private (physical) batch's size; other sizes raise
        hooks_cls = _checked_hooks_class(mode)
        kwargs: dict[str, Any] = {"batch_first": True, "loss_reduction": "mean", "strict": True}
        if mode == "functorch":
            kwargs["force_functorch"] = True
        if mode == "ghost":
            kwargs["max_grad_norm"] = max_grad_norm
        self._hooks: list[Any] = []
        self.modules: list[tuple[str, nn.Module]] = []
        self._names: dict[int, str] = {}
        self._paths: dict[int, str] = {}
        for path, root in roots:
            if hasattr(root, "autograd_grad_sample_hooks"):
                raise ValueError(f"`{path or 'the LightningModule'}` already has opacus hooks: attach DPSGD once.")
            hooks = hooks_cls(root, **kwargs)
            hooks.on_activation = self._check_activation
            hooks.module_path = lambda m: self._paths.get(id(m), type(m).__name__)
            if forbid_accumulation:
                hooks.forbid_grad_accumulation()
            self._hooks.append(hooks)
            for name, module in root.named_modules():
                self._paths[id(module)] = join_path(path, name) or "the LightningModule"
                if any(True for _ in module.parameters(recurse=False)):
                    self.modules.append((join_path(path, name), module))
            self._names.update({id(p): join_path(path, name) for name, p in root.named_parameters()})

    @property
    def parameter_names(self) -> dict[int, str]:
        """Parameter path by ``id`` (for messages)."""
        return dict(self._names)

    # ------------------------------------------------------------------ checks
    def _check_activation(self, module: nn.Module) -> None:
        rows = [_rows(a) for a in module.activations]
        expected = self.batch_size
        sizes = {r for r in rows if r is not None}
        if (expected is not None and sizes - {expected}) or len(sizes) > 1:
            self.clear_activations()
            raise ValueError(
                f"DPSGD: `{self._paths.get(id(module), type(module).__name__)}` ran a forward pass on a batch of"
                f" {sorted(sizes - {expected}) or sorted(sizes)} rows, but the private batch has {expected} examples:"
                " per-sample gradients would mix the rows of different examples and break the clipping bound. Run"
                " other forward passes (public data, EMA, sampling) under torch.no_grad() or in eval mode, and keep"
                " the batch dimension first in every private layer."
            )

    def check_no_stale_activations(self) -> None:
        for path, module in self.modules:
            if getattr(module, "activations", None):
                self.clear_activations()
                raise RuntimeError(
                    f"DPSGD: `{path or 'the LightningModule'}` kept activations of a forward pass without backward"
                    " (opacus records activations in training mode with grad enabled). Run extra forward passes"
                    " (EMA, sampling, metrics) under torch.no_grad() or in eval mode."
                )

    def _missing(self, params: Sequence[torch.Tensor], has: Callable[[torch.Tensor], bool]) -> list[torch.Tensor]:
        missing = [p for p in params if not has(p)]
        frozen = [p for p in missing if p.grad is not None and bool(p.grad.detach().ne(0).any())]
        if frozen:
            names = ", ".join(f"`{self._names.get(id(p), tuple(p.shape))}`" for p in frozen)
            raise ValueError(
                f"DPSGD: {names} got a gradient but no per-sample gradient: the gradient does not pass through the"
                " forward of the module that owns the parameter (e.g. `F.linear(x, self.lin.weight)` or an"
                " `nn.Parameter` used directly in `training_step`), so opacus cannot clip it per example. Call the"
                " owning module (`self.lin(x)`) or move the parameter into a supported layer."
            )
        return missing

    def fill_missing_grad_samples(self, params: Sequence[torch.Tensor]) -> None:
        """Zero per-sample gradients for parameters unused in this step; raise for parameters used without hooks.
        Ghost clipping keeps no per-sample gradients: an unused parameter gets a zero (clipped-sum) gradient, as
        opacus' accumulation reads every parameter's ``grad``."""
        if self.mode == "ghost":
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            return
        self.check_no_stale_activations()  # an extra forward pass also leaves per-sample gradients unfinished
        missing = self._missing(params, lambda p: getattr(p, "grad_sample", None) is not None)
        if not missing:
            return
        n = next((len(p.grad_sample) for p in params if isinstance(getattr(p, "grad_sample", None), torch.Tensor)),
                 0)
        for p in missing:
            p.grad_sample = p.new_zeros((n, *p.shape))

    # ------------------------------------------------------------------ ghost clipping
    def enable(self) -> None:
        for hooks in self._hooks:
            hooks.enable_hooks()

    def disable(self) -> None:
        for hooks in self._hooks:
            hooks.disable_hooks()

    def clear_norm_samples(self) -> None:
        for hooks in self._hooks:
            for p in hooks.trainable_parameters:
                if hasattr(p, "_norm_sample"):
                    del p._norm_sample

    def per_sample_norms(self, batch_size: int) -> torch.Tensor:
        """Per-sample gradient norms over all private parameters after ghost clipping's first backward pass."""
        params = [p for hooks in self._hooks for p in hooks.trainable_parameters]
        missing = {id(p) for p in self._missing(params, lambda p: getattr(p, "_norm_sample", None) is not None)}
        norms = [p._norm_sample for p in params if id(p) not in missing]  # unused parameters: norm 0
        return torch.stack(norms, dim=0).norm(2, dim=0) if norms else torch.zeros(batch_size)

    # ------------------------------------------------------------------ teardown
    def clear_activations(self) -> None:
        for _, module in self.modules:
            for attr in ("activations", "max_batch_len"):
                if hasattr(module, attr):
                    delattr(module, attr)

    def cleanup(self) -> None:
        for hooks in self._hooks:
            hooks.cleanup()
        self.clear_activations()
        self._hooks, self.modules = [], []
