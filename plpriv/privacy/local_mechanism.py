r"""Local DP as a DP-engine mechanism: every participant randomizes its own clipped update (no Lightning imports).

``DPSGD(mechanism=LocalRandomizerMechanism("rrsc", epsilon=..., bits=8), noise_multiplier=0.0,
poisson_sampling=False, adjacency="zero_out", participants="clients")`` clips each participant's update x (an
example's gradient, or a client's mean gradient) to C, and the participant itself sends ``C R(x / C)`` where R is a
pure epsilon-LDP randomizer of the unit ball with ``E R(u) = u`` (:mod:`plpriv.privacy.rrsc`): RRSC (b bits, Isik et
al. NeurIPS 2023), PrivUnitG (d floats, Asi et al. 2022) or SQKR (b bits, Chen et al. 2020). The server sums what it
receives and divides by the public B; no central noise is added (``noise_multiplier`` must be 0).

Trust model (what the epsilon means): *local* DP. Each message is epsilon-DP with respect to its sender's input
against anyone who sees it, the server included, given only that the sender's private randomness stays secret (here:
a generator seeded from the run's secret seed, never stored; the rotations' *shared* seeds are also derived from it,
and the guarantee holds even if they were public). A participant taking part k times sends k messages, so it is
``k epsilon``-LDP by basic composition of pure DP (valid at every delta); the aggregate, being post-processing of the
messages, is ``k epsilon``-DP centrally as well (zero-out or replace-one: the ratio bound holds for any two inputs).
The central sparsified / Gaussian mechanisms need a trusted aggregator instead, and get far smaller noise for it.

k: the loader's own batches (``poisson_sampling=False``), once per epoch (fixed order or reshuffled,
:mod:`plpriv.privacy.participation`): after t steps of b per epoch, ``k = ceil(t / b)``. Poisson sampling is refused
(the number of participations would be unbounded; amplification by subsampling of the *local* guarantee does not
apply, the server sees who sends).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from opacus.accountants import IAccountant
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from plpriv.privacy.accounting import History
from plpriv.privacy.mechanisms import Mechanism
from plpriv.privacy.participation import Participation
from plpriv.privacy.rrsc import RRSC, SQKR, LocalDPAccountant, PrivUnitG
from plpriv.privacy.sparsified_gaussian import SparsifiedMechanism
from plpriv.privacy.sparsified_step import sparsifying_class

__all__ = ["RANDOMIZERS", "LocalRandomizerMechanism", "PerEpochLocalAccountant"]

RANDOMIZERS = ("rrsc", "privunitg", "sqkr")


class PerEpochLocalAccountant(LocalDPAccountant):
    """Pure LDP of one participation per epoch: after t steps of ``steps_per_epoch``, ``ceil(t / b) epsilon``."""

    def __init__(self, epsilon: float, steps_per_epoch: int) -> None:
        super().__init__(epsilon)
        self.steps_per_epoch = int(steps_per_epoch)

    def get_epsilon(self, delta: float = 0.0, *args: Any, **kwargs: Any) -> float:
        return self.epsilon * math.ceil(len(self) / self.steps_per_epoch)


class _LocalOptimizer:
    """Mixin: no central noise (the participants' randomizers are the mechanism)."""

    def add_noise(self) -> None:
        for p in self.params:  # type: ignore[attr-defined]
            _check_processed_flag(p.summed_grad)
            p.grad = p.summed_grad.view_as(p)
            _mark_as_processed(p.summed_grad)


@functools.cache
def _local_class(base: type) -> type:
    return type(f"Local{base.__name__}", (_LocalOptimizer, sparsifying_class(base)), {})


class LocalRandomizerMechanism(SparsifiedMechanism):
    """Local DP with an unbiased pure-LDP randomizer of every participant's clipped update (module docstring).

    Args:
        randomizer: ``"rrsc"``, ``"privunitg"`` or ``"sqkr"``.
        epsilon: each message's pure LDP level epsilon_0 (per participation).
        bits: bits per message for RRSC / SQKR (M = 2^bits <= d codewords for RRSC).
    """

    name = "local-dp"
    title = "local DP epsilon (k participations x epsilon_0)"
    amplified_by_sampling: ClassVar[bool] = False
    needs_per_sample_gradients: ClassVar[bool] = True  # type: ignore[misc]

    def __init__(self, randomizer: str = "rrsc", epsilon: float = 4.0, bits: int = 8) -> None:
        super().__init__(1.0, "bernoulli")
        if randomizer not in RANDOMIZERS:
            raise ValueError(f"`randomizer` must be one of {RANDOMIZERS}, got {randomizer!r}.")
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 < epsilon < math.inf:
            raise ValueError(f"`epsilon` (per message) must be a positive number, got {epsilon!r}.")
        if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
            raise ValueError(f"`bits` must be a positive int, got {bits!r}.")
        self.randomizer, self.local_epsilon, self.bits = randomizer, float(epsilon), int(bits)
        self.steps_per_epoch: int | None = None

    def check_run(self, poisson_sampling: bool, adjacency: str, secure_mode: bool) -> None:
        if poisson_sampling:
            raise ValueError("LocalRandomizerMechanism: a participant's messages compose without amplification (the"
                             " server sees who sends); set DPSGD(poisson_sampling=False): one participation per epoch.")
        if adjacency == "add_remove":
            raise ValueError("LocalRandomizerMechanism: with fixed batches, removing a participant shifts every later"
                             " batch; use adjacency='zero_out' or 'replace_one' (local DP holds for any two inputs).")
        if secure_mode:
            raise ValueError("LocalRandomizerMechanism: secure_mode is not supported; use secure_mode=False.")

    def plan(self, horizon: int, steps_per_epoch: int, participation: Any = None) -> None:
        if not isinstance(participation, Participation):
            raise ValueError("LocalRandomizerMechanism needs exactly one train DataLoader with fixed batches.")
        self.steps_per_epoch = participation.steps_per_epoch

    # ------------------------------------------------------------------ accounting
    def accountant(self, accountant: str = "prv") -> IAccountant:
        if self.steps_per_epoch is None:
            raise RuntimeError("LocalRandomizerMechanism: not planned yet (the engine calls plan() at start).")
        return PerEpochLocalAccountant(self.local_epsilon, self.steps_per_epoch)

    def epsilon(self, history: History, delta: float, accountant: str = "prv") -> float:
        return Mechanism.epsilon(self, history, delta, accountant)

    def calibrate(self, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                  accountant: str = "prv") -> float:
        raise ValueError("LocalRandomizerMechanism adds no central noise: give DPSGD(noise_multiplier=0.0) and the"
                         " randomizer's per-message `epsilon`; `target_epsilon` is then only the budget that stops.")

    # ------------------------------------------------------------------ the release
    def optimizer_class(self, base: type[DPOptimizer]) -> type[DPOptimizer]:
        return _local_class(base)

    def _randomizer(self, dim: int) -> Callable[[torch.Tensor, list[int], torch.Generator], torch.Tensor]:
        if self.randomizer == "rrsc":
            rrsc = RRSC(dim, self.local_epsilon, self.bits)
            return lambda x, seeds, g: rrsc.privatize(x, seeds, g)
        if self.randomizer == "sqkr":
            sqkr = SQKR(dim, self.local_epsilon, self.bits)
            return lambda x, seeds, g: sqkr.decode(sqkr.encode(x, seeds, g), seeds)
        unit = PrivUnitG(dim, self.local_epsilon)
        return lambda x, seeds, g: unit.privatize(x, g)

    def bind_participants(self, optimizer: DPOptimizer, engine: Any, participants: str, rank: int, world_size: int,
                          sparse_exchange: bool) -> Any:
        if float(optimizer.noise_multiplier) != 0.0:
            raise ValueError(f"LocalRandomizerMechanism adds no central noise, got noise_multiplier="
                             f"{optimizer.noise_multiplier}: set DPSGD(noise_multiplier=0.0).")
        sparsifier = super().bind_participants(optimizer, engine, participants, rank, world_size, sparse_exchange)
        clip = float(optimizer.max_grad_norm)
        randomize = self._randomizer(sparsifier.dim)

        def local(updates: torch.Tensor, keys: list[int]) -> torch.Tensor:
            if updates.shape[0] == 0:
                return updates
            step = engine.steps
            shared = [engine.derive_seed("ldp-shared", step, k) for k in keys]  # the rotations (may be public)
            private = torch.Generator().manual_seed(engine.derive_seed("ldp-private", step, rank))  # secret
            x = updates.detach().to(torch.float64).cpu() / clip  # clipped: norm <= 1
            return (randomize(x, shared, private) * clip).to(updates.dtype).to(updates.device)

        sparsifier.local = local
        return sparsifier

    # ------------------------------------------------------------------ record
    @property
    def key(self) -> tuple:
        return (self.name, self.randomizer, self.local_epsilon, self.bits, self.steps_per_epoch)

    def record(self) -> dict[str, Any]:
        return {"mechanism": self.name, "randomizer": self.randomizer, "local_epsilon": self.local_epsilon,
                "bits": self.bits if self.randomizer != "privunitg" else None, "trust_model": "local"}
