"""Does each example's per-sample gradient depend only on that example? A probe at the first private step (no
Lightning imports).

DP-SGD's sensitivity argument needs it: removing or replacing one example must move the clipped sum by at most C.
A layer or loss that mixes the examples of a batch (a batch-centring layer, in-batch negatives, mixup, BatchNorm
in training mode) breaks it while passing every structural check: the per-sample gradients exist and are clipped,
yet example j's row changes when example i does. The probe runs the step three times on copies of the batch under
the same random state: ``A`` (the batch), ``A'`` (the batch again: is the step reproducible?) and ``B`` (the last
example replaced by the first), and compares the per-sample gradients of the other examples. Before each pass the
global RNGs (torch, Python's ``random``, numpy's) are seeded alike and the model's own state is put back: every
sub-module's plain attributes (step and call counters) and its ``torch.Generator`` / numpy generators, so a module
that seeds its randomness from a counter or owns a generator draws the same in all three passes. ``A == A'`` but
``A != B`` is a coupling: refused, naming the parameters (and so the modules) whose rows moved. ``A != A'`` (the
step draws randomness from elsewhere) leaves the question open: the caller refuses unless the user asserts
independence.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["IndependenceProbe", "ProbeResult", "replace_last_row"]


def replace_last_row(batch: Any, size: int) -> Any | None:
    """``batch`` (tensors / lists / tuples / dicts, batch dim 0) with row ``size - 1`` replaced by row 0; ``None``
    when the batch has no tensor of that many rows or the two rows are already equal."""
    changed = False

    def swap(obj: Any) -> Any:
        nonlocal changed
        if isinstance(obj, torch.Tensor) and obj.dim() > 0 and obj.shape[0] == size:
            out = obj.clone()
            out[size - 1] = obj[0]
            changed = changed or not torch.equal(obj[size - 1], obj[0])
            return out
        if isinstance(obj, dict):
            return type(obj)({k: swap(v) for k, v in obj.items()})
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):
            return type(obj)(*(swap(v) for v in obj))
        if isinstance(obj, (list, tuple)):
            return type(obj)(swap(v) for v in obj)
        return obj

    out = swap(batch)
    return out if changed else None


@contextlib.contextmanager
def _host_rngs(seed: int) -> Iterator[None]:
    """Python's and numpy's global generators seeded with ``seed`` inside, restored after."""
    py, npy = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


@contextlib.contextmanager
def _module_state(module: nn.Module | None) -> Iterator[None]:
    """Every sub-module's plain attributes (ints, floats, bools, strings) and generator states as they were before."""
    saved: list[tuple[Any, str, Any]] = []
    for sub in module.modules() if module is not None else ():
        for name, value in vars(sub).items():
            if isinstance(value, torch.Generator):
                saved.append((value, "torch", value.get_state()))
            elif isinstance(value, np.random.Generator):
                saved.append((value.bit_generator, "numpy", value.bit_generator.state))
            elif isinstance(value, (bool, int, float, str)) or value is None:
                saved.append((sub, name, value))
    try:
        yield
    finally:
        for owner, key, value in saved:
            if key == "torch":
                owner.set_state(value)
            elif key == "numpy":
                owner.state = value
            else:
                object.__setattr__(owner, key, value)


@dataclass(frozen=True)
class ProbeResult:
    """``coupled``: parameter names whose other-example rows moved; ``reproducible``: ``A == A'``."""

    coupled: tuple[str, ...]
    reproducible: bool


class IndependenceProbe:
    """Per-sample gradients of ``step(batch)`` (the mean loss; opacus' hooks fill ``p.grad_sample``) on A, A', B.

    Args:
        params: the private parameters (opacus' hooks on their modules).
        names: parameter name by ``id`` (for the message).
        clear: resets gradients and per-sample gradients between passes (the DP optimizer's ``zero_grad``).
        rtol: relative tolerance on a row's change (float round-off of batched kernels is far below it).
    """

    def __init__(self, params: Sequence[torch.Tensor], names: dict[int, str], clear: Callable[[], None],
                 rtol: float = 1e-4, module: nn.Module | None = None) -> None:
        self.params, self.names, self.clear, self.rtol = list(params), names, clear, rtol
        self.module = module  # whose state is put back before each pass

    def _rows(self, step: Callable[[Any], torch.Tensor], batch: Any, size: int, seed: int) -> list[torch.Tensor]:
        devices = sorted({p.device.index or 0 for p in self.params if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices), _module_state(self.module), _host_rngs(seed):
            torch.manual_seed(seed)
            loss = step(batch)
            torch.autograd.backward(loss)
        rows = []
        for p in self.params:
            gs = getattr(p, "grad_sample", None)
            rows.append(gs[: size - 1].detach().clone() if isinstance(gs, torch.Tensor) else torch.zeros(0))
        self.clear()
        return rows

    def _differs(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        if a.shape != b.shape:
            return True
        scale = max(float(a.norm()), float(b.norm()), 1e-12)
        return float((a - b).norm()) > self.rtol * scale

    def run(self, step: Callable[[Any], torch.Tensor], batch: Any, size: int, seed: int = 0) -> ProbeResult | None:
        """Compare the three passes; ``None`` when the batch cannot be probed (fewer than 2 rows, equal rows)."""
        other = replace_last_row(batch, size) if size >= 2 else None
        if other is None:
            return None
        self.clear()  # the previous step's per-sample gradients (Lightning zeroes them after training_step)
        a = self._rows(step, batch, size, seed)
        again = self._rows(step, batch, size, seed)
        if any(self._differs(x, y) for x, y in zip(a, again)):
            return ProbeResult((), reproducible=False)
        b = self._rows(step, other, size, seed)
        coupled = tuple(self.names.get(id(p), str(tuple(p.shape))) for p, x, y in zip(self.params, a, b)
                        if self._differs(x, y))
        return ProbeResult(coupled, reproducible=True)
