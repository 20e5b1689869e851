"""Where a process stands in a private run: its rank, the world size and a broadcast from rank zero (no Lightning).

The DP engine's collective decisions (the seed, the calibrated sigma, the budget) are taken on rank zero and
broadcast; a Lightning adapter passes ``trainer.strategy.broadcast``, a single process the identity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["World"]


@dataclass(frozen=True)
class World:
    """This process' place in the run: rank, world size and a broadcast from rank zero (identity alone)."""

    rank: int = 0
    world_size: int = 1
    broadcast: Callable[[Any], Any] = lambda value: value

    @property
    def is_zero(self) -> bool:
        return self.rank == 0
