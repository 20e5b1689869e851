r"""Correlated noise of a streaming (DP-FTRL / matrix-factorisation) run, step by step (no Lightning imports).

Step t adds ``std * (N w)_t`` to its clipped sum, with ``N`` the strategy's noise matrix (``C^{-1}`` for a square C,
:mod:`plpriv.privacy.matrix_factorization` Eq. N) and ``w_j ~ N(0, I)`` one independent draw per row of C, for every
parameter tensor, seeded by ``seed_fn(tensor index, j)`` (the engine's ``derive_seed``: secret seed + public indices).
So the noise of any step is a function of the secret and public indices only: nothing to checkpoint, nothing
secret in an artefact; a resumed run with the kept secret regenerates it exactly.

Two ways to compute the same numbers (:class:`NoiseStream`):

* direct: ``sum_j N[t, j] w_j`` over the nonzeros of row t (the tree: O(log n) draws a step; :func:`correlated_noise`);
* recursive, for a b-banded square C (BSR, optimized banded; C u = w solved by forward substitution, Eq. FS):
  ``u_t = (w_t - sum_{k=1}^{b-1} C[t, t-k] u_{t-k}) / C[t, t]``, keeping the last b - 1 vectors u in memory (never
  saved: they are as secret as the noise; after a resume they are rebuilt from the seeds by the direct formula).
  O(b) draws a step instead of O(t) (the inverse of a banded C is dense).

:class:`CorrelatedNoiseOptimizer` is the opacus optimizer mixin whose ``add_noise`` adds the stream's noise (once:
on rank zero under opacus' distributed all-reduce, on every rank when every rank holds the global sum).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from plpriv.privacy.matrix_factorization import DTYPE, Strategy, correlated_noise

__all__ = ["CorrelatedNoiseOptimizer", "NoiseStream", "correlated_class"]


class NoiseStream:
    """The unit-std correlated noise ``(N w)_t`` of ``strategy`` for a list of tensor shapes (see module docstring)."""

    def __init__(self, strategy: Strategy, seed_fn: Callable[[int, int], int]) -> None:
        self.strategy = strategy
        self.seed_fn = seed_fn
        b = strategy.bands
        square = strategy.C.shape[0] == strategy.C.shape[1]
        self.recursive = bool(square and b is not None and b < strategy.n)
        self._recent: dict[int, list[torch.Tensor]] = {}  # step -> u_step per tensor (float64; secret, in memory)

    @property
    def horizon(self) -> int:
        return self.strategy.n

    def _direct(self, step: int, shapes: Sequence[torch.Size], device: torch.device) -> list[torch.Tensor]:
        return [correlated_noise(self.strategy.noise, step, shape, functools.partial(self.seed_fn, i), std=1.0,
                                 dtype=DTYPE, device=device) for i, shape in enumerate(shapes)]

    def noise(self, step: int, shapes: Sequence[torch.Size], device: torch.device | str = "cpu"
              ) -> list[torch.Tensor]:
        """Unit-std noise of ``step`` (0-based, < horizon), one float64 tensor per shape."""
        if not 0 <= step < self.horizon:
            raise RuntimeError(f"step {step} is outside the strategy's horizon of {self.horizon} steps: its"
                               " sensitivity does not cover it (the run was planned for fewer steps).")
        device = torch.device(device)
        if not self.recursive:
            return self._direct(step, shapes, device)
        b = int(self.strategy.bands)  # type: ignore[arg-type]
        for s in range(max(0, step - b + 1), step):  # cold start (first step of a fit, or a resume)
            if s not in self._recent:
                self._recent[s] = self._direct(s, shapes, device)
        C = self.strategy.C
        out = []
        for i, shape in enumerate(shapes):
            generator = torch.Generator(device=device).manual_seed(int(self.seed_fn(i, step)))
            u = torch.randn(tuple(shape), generator=generator, dtype=DTYPE, device=device)  # w_step
            for k in range(1, min(b, step + 1)):
                u.sub_(self._recent[step - k][i], alpha=float(C[step, step - k]))
            out.append(u.div_(float(C[step, step])))  # Eq. FS
        self._recent[step] = out
        for s in [s for s in self._recent if s <= step - b + 1]:
            del self._recent[s]
        return out  # read-only for callers (the next steps use them)

    def forget(self) -> None:
        """Drop the in-memory noise (end of a fit)."""
        self._recent.clear()


class CorrelatedNoiseOptimizer:
    """Mixin over opacus' DPOptimizer / DistributedDPOptimizer (and the sparsifying one): ``add_noise`` adds the
    stream's correlated noise ``sigma C (N w)_t`` at the engine's step t instead of fresh noise."""

    stream: NoiseStream | None = None
    step_index: Callable[[], int] | None = None  # the engine's public step count
    adds_noise: bool = True  # False on ranks whose sums opacus all-reduces to rank zero's noise

    def add_noise(self) -> None:
        if self.stream is None or self.step_index is None:
            raise RuntimeError("CorrelatedNoiseOptimizer: no noise stream bound (Mechanism.bind was not called).")
        params = self.params  # type: ignore[attr-defined]
        noises: list[Any] = [None] * len(params)
        if self.adds_noise:
            std = float(self.noise_multiplier) * float(self.max_grad_norm)  # type: ignore[attr-defined]
            noises = self.stream.noise(self.step_index(), [p.summed_grad.shape for p in params],
                                       params[0].summed_grad.device if params else "cpu")
            noises = [std * z for z in noises]
        for p, z in zip(params, noises):
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad if z is None else p.summed_grad + z.to(p.summed_grad.dtype)).view_as(p)
            _mark_as_processed(p.summed_grad)


@functools.cache
def correlated_class(base: type) -> type:
    """``base`` (an opacus optimizer class, possibly already sparsifying) with the correlated noise step."""
    return type(f"Correlated{base.__name__}", (CorrelatedNoiseOptimizer, base), {})
