"""The public-batch contract between a private-training callback and the modules and callbacks it runs with.

Under differential privacy the sampled batch is private: its size (a Poisson draw, ``len(batch)``), its contents
and anything computed from them may leave the process only through the mechanism (the clipped, noised update).
A LightningModule or an analysis callback that publishes something (a metric, a checkpoint buffer, an lr or EMA
schedule that lands in the weights' history) must therefore compute it from public quantities only:

* the expected global batch size B (the noise divisor), the public sample rate q, the optimizer step count;
* never ``len(batch)``, ``batch.shape[0]`` or a statistic of the batch (loss, accuracy, similarities).

``training_step`` may be called several times per optimizer step (virtual steps split a logical batch into
physical chunks); each call must draw fresh randomness (noise levels, dropout, augmentation): a seed that depends
only on ``(global_step, batch_idx)`` would repeat itself across the chunks of one step.

A private-training callback (e.g. :class:`plpriv.callbacks.DPSGD`) implements :class:`PrivateTraining`; a module
that has schedules to adapt implements :class:`PrivateTrainingAware` and is told the public constants through
:meth:`PrivateTrainingAware.configure_private_training` before the first step (again whenever they change, and with
``None`` when the fit ends); implementing it declares the module's hooks DP-aware (e.g. an ``on_before_optimizer_step``
that touches per-sample gradients only and publishes nothing). Other callbacks find the private-training callback among ``trainer.callbacks`` with
:func:`find_private_training` and refuse (or restrict themselves to public data) when there is one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = ["PrivateTraining", "PrivateTrainingAware", "PublicBatch", "find_private_training"]


@dataclass(frozen=True)
class PublicBatch:
    """The public constants of a private run's batches (what a module may read instead of ``len(batch)``).

    Attributes:
        expected_batch_size: B, the expected number of examples per optimizer step over all ranks (the divisor of
            the noised sum); a constant the user chose, never a function of the sampled data.
        sample_rate: q, the public Poisson rate of one optimizer step.
        max_physical_batch_size: the largest chunk ``training_step`` receives (virtual steps), or ``None``.
        adjacency: ``"add_remove"`` or ``"replace_one"``: the neighbouring relation the epsilon is for.
    """

    expected_batch_size: float
    sample_rate: float
    max_physical_batch_size: int | None = None
    adjacency: str = "add_remove"


@runtime_checkable
class PrivateTraining(Protocol):
    """What a callback that trains privately exposes: the public batch constants and the epsilon spent."""

    @property
    def public_batch(self) -> PublicBatch | None: ...

    def get_epsilon(self, delta: float | None = None) -> float: ...


@runtime_checkable
class PrivateTrainingAware(Protocol):
    """A module whose schedules (lr ramp, EMA, counters) must use the public batch constants under DP."""

    def configure_private_training(self, batch: PublicBatch | None) -> None: ...


def find_private_training(callbacks: Iterable[Any]) -> PrivateTraining | None:
    """The private-training callback among ``callbacks`` (e.g. ``trainer.callbacks``), or ``None``."""
    return next((cb for cb in callbacks if isinstance(cb, PrivateTraining)), None)
