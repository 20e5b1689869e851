"""Poisson-sampled, resumable, rank-consistent training batches for DP-SGD (no Lightning imports).

DP-SGD's accountants (opacus ``prv``/``rdp``/``gdp``) assume *Poisson sampling*: at every step each of the N
training examples joins the batch independently with probability q (Abadi et al. 2016; Mironov et al. 2019).
opacus implements that in ``UniformWithReplacementSampler`` / ``DistributedUniformWithReplacementSampler``, but

* its distributed sampler *skips* empty local batches, so ranks can take different numbers of steps and
  deadlock (or silently desynchronise) under DDP, and
* the batch drawn at a step depends on the whole history of a shared generator, so a run resumed from a
  checkpoint mid-epoch cannot draw the batches the uninterrupted run would have drawn.

:class:`PoissonBatchSampler` keeps opacus' sampling rule (``torch.rand(N) < q`` per step) and fixes both: the
mask of step ``i`` of epoch ``e`` is drawn from a generator seeded by ``(seed, e, i)`` alone, every rank draws the
same *global* mask and keeps every ``world_size``-th selected index, and an empty (local) batch is yielded, never
skipped. A DDP run therefore trains on exactly the batches of the single-process run with the same seed, and a
resumed run continues with exactly the batches of the uninterrupted run.
With a cryptographically secure generator (``secure_mode``), per-step seeding is impossible: every rank then
Poisson-samples its own shard of the data set (the union of independent per-shard Poisson samples is a Poisson
sample of the whole data set), and batches are not reproducible across a resume (by design).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from opacus.data_loader import wrap_collate_with_empty
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
)
from torch.utils.data._utils.collate import default_collate

from plpriv.utils.seeding import derive_seed

__all__ = ["PoissonBatchSampler", "PoissonDataLoader", "sampler_support"]


def sampler_support(loader: DataLoader) -> list[int] | None:
    """The indices a loader's sampler can yield: ``None`` for the whole data set, a list for a subset.

    Poisson sampling draws from exactly these examples. Samplers whose support or probabilities Poisson sampling
    cannot reproduce (weighted, with replacement, custom batch samplers) are refused with what to do instead.
    """
    batch_sampler = loader.batch_sampler
    if batch_sampler is None or type(batch_sampler) is not BatchSampler:
        raise ValueError(
            f"DPSGD(poisson_sampling=True) cannot turn the train loader's batch sampler"
            f" ({type(batch_sampler).__name__}) into Poisson batches: it does not know which examples it may yield."
            " Give the DataLoader a `batch_size` (and a plain, random or SubsetRandomSampler sampler), or wrap the"
            " dataset in torch.utils.data.Subset to restrict the examples."
        )
    sampler = batch_sampler.sampler
    n = len(loader.dataset)  # type: ignore[arg-type]
    # exact types only: a subclass may restrict or reweight the indices it yields (its __iter__ is not the base's);
    # a sampler class of the user's may declare `poisson_support = "all"` in its own body (not inherited)
    if vars(type(sampler)).get("poisson_support") == "all":
        return None
    if type(sampler) is SubsetRandomSampler:
        return [int(i) for i in sampler.indices]
    if type(sampler) is SequentialSampler or (
        type(sampler) is RandomSampler and not sampler.replacement and sampler.num_samples == n
    ):
        return None
    hint = (
        " Its examples are drawn with unequal probabilities, which Poisson sampling (the same q for every example)"
        " cannot reproduce; to exclude examples wrap the dataset in torch.utils.data.Subset or use"
        " SubsetRandomSampler." if "Weighted" in type(sampler).__name__ else
        " Use a SequentialSampler, RandomSampler (no replacement) or SubsetRandomSampler, or wrap the dataset in"
        " torch.utils.data.Subset to restrict the examples."
    )
    if isinstance(sampler, (SubsetRandomSampler, SequentialSampler, RandomSampler)):
        hint = (f" {type(sampler).__name__} subclasses {type(sampler).__mro__[1].__name__}, but DPSGD cannot tell which"
                " examples its own sampling yields. Restrict the examples with torch.utils.data.Subset or a plain"
                " SubsetRandomSampler instead, or declare `poisson_support = \"all\"` in its class body if it yields every"
                " example of the data set.")
    raise ValueError(
        f"DPSGD(poisson_sampling=True) would replace the train loader's sampler {type(sampler).__name__} by Poisson"
        f" sampling over the data set and train on examples the sampler excludes.{hint}"
    )


class PoissonBatchSampler(Sampler[list[int]]):
    """Batch sampler: each example joins each batch independently with probability ``sample_rate``.

    Args:
        num_samples: size N of the data set.
        sample_rate: inclusion probability q; the expected global batch is ``q * N``.
        num_batches: batches per epoch (``len(sampler)``); every rank yields exactly this many.
        seed: seeds the per-step generators (ignored when ``generator`` is given).
        rank, world_size: this process' rank and the number of processes.
        generator: a (secure) generator used instead of per-step seeding; see the module docstring.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        num_batches: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"`num_samples` must be a positive int, got {num_samples!r}.")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"`sample_rate` must be in (0, 1], got {sample_rate!r}.")
        if not isinstance(num_batches, int) or num_batches <= 0:
            raise ValueError(f"`num_batches` must be a positive int, got {num_batches!r}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"Need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}.")
        self.num_samples = num_samples
        self.sample_rate = float(sample_rate)
        self.num_batches = num_batches
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.generator = generator
        self.epoch = 0
        self._start = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields (called by Lightning every epoch)."""
        self.epoch = int(epoch)

    def start_at(self, step: int) -> None:
        """Let the next iteration begin at batch ``step`` of the current epoch (resume mid-epoch)."""
        if not 0 <= step <= self.num_batches:
            raise ValueError(f"`step` must be in [0, {self.num_batches}], got {step!r}.")
        self._start = int(step)

    def global_batch(self, epoch: int, step: int) -> torch.Tensor:
        """Indices of the global Poisson batch of ``(epoch, step)`` (seeded mode only)."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, "poisson", epoch, step))
        mask = torch.rand(self.num_samples, generator=g) < self.sample_rate
        return mask.nonzero(as_tuple=False).reshape(-1)

    def _secure_local_batch(self) -> list[int]:
        shard = torch.arange(self.rank, self.num_samples, self.world_size)
        mask = torch.rand(len(shard), generator=self.generator) < self.sample_rate
        return shard[mask].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start, self._start = self.epoch, self._start, 0
        for step in range(start, self.num_batches):
            if self.generator is not None:
                yield self._secure_local_batch()
            else:
                yield self.global_batch(epoch, step)[self.rank :: self.world_size].tolist()

    def __len__(self) -> int:
        return self.num_batches


class PoissonDataLoader:
    """Iterable of Poisson-sampled batches over a map-style data set, resumable through ``state_dict``.

    Deliberately *not* a :class:`~torch.utils.data.DataLoader` subclass: Lightning re-instantiates
    ``DataLoader`` objects to inject a ``DistributedSampler`` under DDP (which would destroy Poisson sampling), but
    passes other iterables through untouched. Lightning calls ``sampler.set_epoch`` at each epoch start and saves /
    restores ``state_dict`` with the fit loop, which makes mid-epoch resumption exact.
    An inner ``DataLoader`` (workers, pinning, collate of the user's loader) does the loading; empty batches are
    collated to zero-length tensors with the structure of ``collate_fn([dataset[0]])`` (opacus'
    ``CollateFnWithEmpty``), so a step is taken (and accounted) even when no example was drawn.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        sample_rate: float,
        num_batches: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        generator: torch.Generator | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        **loader_kwargs: Any,
    ) -> None:
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise ValueError(
                f"Poisson sampling needs a map-style dataset with __len__, got {type(dataset).__name__}."
                " Use a map-style dataset or set `poisson_sampling=False`."
            )
        self.dataset = dataset
        self.sampler = PoissonBatchSampler(
            len(dataset),
            sample_rate,
            num_batches,
            seed=seed,
            rank=rank,
            world_size=world_size,
            generator=generator,
        )
        collate = wrap_collate_with_empty(collate_fn=collate_fn or default_collate)
        # Learn the batch structure now, so that even a first (or per-worker first) empty batch is well-formed.
        collate.first_batch = collate([dataset[0]])
        self._loader = DataLoader(dataset, batch_sampler=self.sampler, collate_fn=collate, **loader_kwargs)
        self._consumed = 0
        self._pending: tuple[int, int] | None = None
        self.batch_size: float = sample_rate * len(dataset)  # the public divisor; the user's B via from_data_loader

    @classmethod
    def from_data_loader(
        cls,
        loader: DataLoader,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        generator: torch.Generator | None = None,
        sample_rate: float | None = None,
        num_batches: int | None = None,
    ) -> PoissonDataLoader:
        """Poisson version of ``loader`` over the examples its sampler can yield (:func:`sampler_support`), with
        ``num_batches`` (default ``len(loader)``, which depends on N) steps per epoch; dataset, collate, workers and
        pinning are kept.

        The expected batch size is the loader's ``batch_size`` B, a public constant (the noise divisor), and
        q = B / N unless ``sample_rate`` is given. (opacus' q = 1/len(loader) makes q N, and so the update's scale,
        depend on the data set size N: N and N + 1 examples give different divisors.)
        """
        indices = sampler_support(loader)
        dataset = loader.dataset if indices is None else Subset(loader.dataset, indices)
        if indices is not None and not indices:
            raise ValueError("The train loader's SubsetRandomSampler has no indices: nothing to train on.")
        batch_size = int(loader.batch_size)  # type: ignore[arg-type]
        rate = min(1.0, batch_size / len(dataset)) if sample_rate is None else float(sample_rate)  # B >= N: all
        loader_ = cls(
            dataset,
            sample_rate=rate,
            num_batches=len(loader) if num_batches is None else int(num_batches),
            seed=seed,
            rank=rank,
            world_size=world_size,
            generator=generator,
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
            prefetch_factor=loader.prefetch_factor,
            persistent_workers=loader.persistent_workers,
        )
        loader_.batch_size = batch_size
        return loader_

    @property
    def sample_rate(self) -> float:
        return self.sampler.sample_rate

    @property
    def expected_batch_size(self) -> float:
        """Expected size of the *global* batch, q * N."""
        return self.sampler.sample_rate * self.sampler.num_samples

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        # A generator: its body runs at the first ``next``, i.e. after Lightning's ``set_epoch`` for this epoch.
        start = 0
        if self._pending is not None and self._pending[0] == self.sampler.epoch:
            start = self._pending[1]
        self._pending = None
        self.sampler.start_at(start)
        self._consumed = start
        for batch in self._loader:
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "consumed": self._consumed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        epoch, consumed = int(state_dict["epoch"]), int(state_dict["consumed"])
        if consumed >= len(self):  # saved at the end of an epoch: continue with the next one
            epoch, consumed = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self._pending = (epoch, consumed)


def split_batch(batch: Any, size: int, max_size: int) -> Sequence[Any]:
    """Split a collated batch (tensors / lists / tuples / dicts, batch dim 0) into chunks of <= ``max_size``."""
    if size <= max_size:
        return [batch]
    bounds = np.array_split(np.arange(size), -(-size // max_size))

    def take(obj: Any, lo: int, hi: int) -> Any:
        if isinstance(obj, torch.Tensor) and obj.dim() > 0 and obj.shape[0] == size:
            return obj[lo:hi]
        if isinstance(obj, dict):
            return type(obj)({k: take(v, lo, hi) for k, v in obj.items()})
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*(take(v, lo, hi) for v in obj))
        if isinstance(obj, (list, tuple)):
            if len(obj) == size and not any(isinstance(v, (torch.Tensor, list, tuple, dict)) for v in obj):
                return type(obj)(obj[lo:hi])  # e.g. a list of file names
            return type(obj)(take(v, lo, hi) for v in obj)
        return obj

    return [take(batch, int(b[0]), int(b[-1]) + 1) for b in bounds]
