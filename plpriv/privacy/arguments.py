"""The DP engine's eager argument checks (each message names the bad value and what to do), and what two arguments
imply at set-up: the warning for a fixed seed, the secure generator (no Lightning imports)."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from plpriv.privacy.adjacency import ADJACENCIES, public_rate

__all__ = [
    "check_adjacency",
    "check_dataset_size",
    "check_metric_names",
    "check_physical_batch_size",
    "check_public_size",
    "check_rates",
    "check_secure_mode",
    "check_seed",
    "number",
    "private_optimizer_index",
    "secure_generator",
    "warn_fixed_seed",
]


def number(name: str, value: Any, *, allow_zero: bool = False, allow_none: bool = False) -> float | None:
    """``value`` as a float, refused unless finite and > 0 (>= 0 with ``allow_zero``; ``None`` with ``allow_none``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"`{name}` must be {'>= 0' if allow_zero else '> 0'}, got {value!r}.")
    return float(value)


def check_adjacency(adjacency: Any) -> str:
    if adjacency not in ADJACENCIES:
        raise ValueError(f"`adjacency` must be one of {ADJACENCIES}, got {adjacency!r}.")
    return str(adjacency)


def check_dataset_size(value: Any) -> int | None:
    """The user's public data set size (add/remove adjacency: q = B / dataset_size without revealing N)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"`dataset_size` must be a positive int (a public figure) or None, got {value!r}.")
    return value


def check_metric_names(names: Any) -> tuple[str, ...]:
    """Names of metrics a user publishes from ``training_step`` knowingly (not covered by epsilon)."""
    names = [names] if isinstance(names, str) else list(names or ())
    if any(not isinstance(n, str) or not n for n in names):
        raise ValueError(f"`log_training_metrics` must be a list of metric names, got {names!r}.")
    return tuple(names)


def check_public_size(adjacency: Any, dataset_size: Any, sample_rate: float | None, target_delta: float | None
                      ) -> tuple[str, int | None]:
    """Under add/remove the data set size is private: q and delta need public figures (refused otherwise)."""
    adjacency, dataset_size = check_adjacency(adjacency), check_dataset_size(dataset_size)
    if adjacency == "add_remove" and sample_rate is None and dataset_size is None:
        public_rate(1, 1, adjacency)  # raises, naming the fix
    if adjacency == "add_remove" and target_delta is None and dataset_size is None:
        raise ValueError(
            "DPSGD(adjacency='add_remove'): the default delta 1/N^1.1 would publish the private data set size N."
            " Give `target_delta` (e.g. 1e-5), or `dataset_size=<a public figure>` to derive it from."
        )
    return adjacency, dataset_size


def check_physical_batch_size(value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"`max_physical_batch_size` must be a positive int or None, got {value!r}.")


def check_rates(target_delta: Any, sample_rate: Any) -> None:
    if target_delta is not None and not (isinstance(target_delta, (int, float)) and 0.0 < target_delta < 1.0):
        raise ValueError(f"`target_delta` must be in (0, 1), got {target_delta!r}.")
    if sample_rate is not None and not (isinstance(sample_rate, (int, float)) and 0.0 < sample_rate <= 1.0):
        raise ValueError(f"`sample_rate` must be in (0, 1] or None, got {sample_rate!r}.")


def check_seed(seed: Any, secure_mode: bool) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"`seed` must be a non-negative int or None, got {seed!r}.")
    if secure_mode and seed is not None:
        raise ValueError("`seed` must be None with `secure_mode=True`: secure noise cannot be seeded.")


def check_secure_mode(secure_mode: bool) -> None:
    """``secure_mode=True`` needs ``torchcsprng``: refused at construction, not at the first step."""
    if not secure_mode:
        return
    try:
        importlib.import_module("torchcsprng")
    except ImportError as err:
        raise ImportError(
            "DPSGD(secure_mode=True) needs the `torchcsprng` package for cryptographically secure noise and"
            " sampling (https://github.com/pytorch/csprng); install it or use secure_mode=False."
        ) from err


def secure_generator() -> torch.Generator:
    """``torchcsprng``'s generator over ``/dev/urandom`` (never reproducible, no state to store)."""
    return importlib.import_module("torchcsprng").create_random_device_generator("/dev/urandom")


def warn_fixed_seed(seed: int | None, warn: Callable[[str], None]) -> None:
    if seed is not None:
        warn(
            f"DPSGD(seed={seed}): noise and sampling are replayable by anyone who knows the seed (it is in"
            " your config). Use seed=None for a run whose privacy you report."
        )


def private_optimizer_index(private_optimizers: int | Sequence[int] | None) -> int | None:
    """The one private optimizer's index (``None``: the only optimizer); several distinct indices are refused."""
    if private_optimizers is None:
        return None
    indices = [private_optimizers] if isinstance(private_optimizers, int) else list(private_optimizers)
    if not indices or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices):
        raise ValueError(
            f"`private_optimizers` must be a non-negative int or a list of them, got {private_optimizers!r}."
        )
    if len(set(indices)) > 1:
        raise ValueError(
            f"`private_optimizers={private_optimizers!r}` names {len(set(indices))} optimizers; DPSGD supports"
            " one private optimizer: several private optimizers see the same Poisson batch, a composition"
            " opacus' accountants do not model. Combine their parameters into one optimizer."
        )
    return indices[0]
