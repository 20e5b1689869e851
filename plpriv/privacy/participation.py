"""How often, and how far apart, one participant can take part in a run without Poisson sampling (no Lightning).

Matrix-factorisation (DP-FTRL) mechanisms get no amplification by sampling; their sensitivity is a function of the
*participation schema* (Choquette-Choo et al. 2023, arXiv 2211.06530, Sec. 2; jax_privacy ``sensitivity``):

``fixed-order``  every epoch visits the examples in the same order (``SequentialSampler``, or ``DistributedSampler``
                 with ``shuffle=False``): an example sits at the same step of every epoch, so two of its
                 participations are exactly ``steps_per_epoch`` apart (b-min-separation with b = steps per epoch, at
                 most ``ceil(n / b)`` participations: the papers' (k, b)-participation).
``reshuffled``   a fresh permutation every epoch (``RandomSampler`` without replacement, ``DistributedSampler`` with
                 ``shuffle=True``): once per epoch, anywhere in it: min-separation 1, at most one participation per
                 epoch (the sensitivity then is the general bound, valid for any placement).

Anything else (sampling with replacement, weighted samplers, custom samplers, a ``DistributedSampler`` that pads
the last shard with repeated examples) could put an example into one epoch twice, which neither schema covers: it
is refused, naming the fix. The schema reads only public constants (steps per epoch, the sampler's kind).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler

__all__ = ["SCHEMAS", "Participation", "participation_of"]

SCHEMAS = ("fixed-order", "reshuffled")


@dataclass(frozen=True)
class Participation:
    """A participation schema: at most ``max_participations`` participations, pairwise >= ``min_separation`` steps
    apart, in a run of ``horizon`` steps of ``steps_per_epoch`` each."""

    schema: str
    steps_per_epoch: int
    horizon: int

    def __post_init__(self) -> None:
        if self.schema not in SCHEMAS:
            raise ValueError(f"`schema` must be one of {SCHEMAS}, got {self.schema!r}.")
        if self.steps_per_epoch < 1 or self.horizon < 1:
            raise ValueError(f"steps per epoch and horizon must be >= 1, got {self.steps_per_epoch}, {self.horizon}.")

    @property
    def min_separation(self) -> int:
        return self.steps_per_epoch if self.schema == "fixed-order" else 1

    @property
    def max_participations(self) -> int:
        """One per epoch the horizon touches."""
        return math.ceil(self.horizon / self.steps_per_epoch)

    def record(self) -> dict[str, Any]:
        return {"participation": self.schema, "min_separation": self.min_separation,
                "max_participations": self.max_participations}


def _sampler_schema(sampler: Any) -> str:
    if isinstance(sampler, SequentialSampler):
        return "fixed-order"
    if isinstance(sampler, RandomSampler):
        if type(sampler) is not RandomSampler and "poisson_support" not in type(sampler).__dict__:
            raise ValueError(f"DP-FTRL: {type(sampler).__name__} overrides RandomSampler; it must declare that it yields"
                             " a permutation of all examples (class attribute poisson_support = 'all').")
        if sampler.replacement or sampler.num_samples != len(sampler.data_source):  # type: ignore[arg-type]
            raise ValueError(
                "DP-FTRL: the train loader's RandomSampler draws with replacement or another number of samples than"
                " the data set has, so an example can appear twice in one epoch. Use shuffle=True (a permutation) or"
                " shuffle=False.")
        return "reshuffled"
    if isinstance(sampler, DistributedSampler):
        if not sampler.drop_last and len(sampler.dataset) % sampler.num_replicas:  # type: ignore[arg-type]
            raise ValueError(
                f"DP-FTRL: the DistributedSampler pads the last shard with repeated examples ({len(sampler.dataset)}"  # type: ignore[arg-type]
                f" examples over {sampler.num_replicas} processes), so some examples take part twice in an epoch."
                " Use a data set size divisible by the number of processes, or drop_last=True.")
        return "reshuffled" if sampler.shuffle else "fixed-order"
    raise ValueError(
        f"DP-FTRL: cannot tell how often the train loader's {type(sampler).__name__} shows an example per epoch."
        " Use shuffle=False (fixed order, the tightest accounting) or shuffle=True (a permutation per epoch).")


def participation_of(loader: DataLoader, steps_per_epoch: int, horizon: int) -> Participation:
    """The schema of the train ``loader`` (the one the trainer iterates, after Lightning's distributed sampler)."""
    if not isinstance(loader, DataLoader):
        raise ValueError(f"DP-FTRL needs one train DataLoader, got {type(loader).__name__}.")
    batch_sampler = loader.batch_sampler
    sampler = getattr(batch_sampler, "sampler", None) if batch_sampler is not None else loader.sampler
    if batch_sampler is not None and type(batch_sampler) is not BatchSampler:
        raise ValueError(f"DP-FTRL: a custom batch sampler ({type(batch_sampler).__name__}) may repeat examples"
                         " within an epoch; use the DataLoader's batch_size with shuffle=False or True.")
    return Participation(_sampler_schema(sampler), int(steps_per_epoch), int(horizon))
