r"""Sparsified-Gaussian DP training (Chen, Isik, Kairouz, No, Oh, Xu, ICML 2024): DP-SGD whose participants send
only a random ~gamma fraction of their clipped update's coordinates, the indices drawn from a seed the aggregator
knows; the mechanism and its accountant are :mod:`plpriv.privacy.sparsified_gaussian`.

:class:`SparsifiedGaussian` is ``DPSGD(mechanism=SparsifiedMechanism(keep_fraction, mask))`` (same engine: Poisson
loader, per-sample hooks, secret seed, budget, resume, refusals, logging; the mechanism's optimizer masks every
participant's clipped update before the sum and divides by ``B gamma``; its accountant is the sparsified one), kept
under its class path for the YAML recipes, plus the client-level adapter: ``participants="clients"`` turns the train
batches into client ids and their data.

``participants="examples"``
    example-level DP: each example's clipped per-sample gradient gets its own mask (key: its position in the global
    Poisson batch). ``keep_fraction=1`` is DP-SGD exactly (opacus' own clipping code, same seed: same update).
``participants="clients"``
    client-level DP for federated simulation. The datamodule's train loader yields client ids (Poisson-sampled at
    q = clients per round / clients, DPSGD's loader) and ``client_batch(id)`` returns a client's data (see
    :class:`plpriv.data.FederatedDigits`). Each sampled client's update is its mean gradient over its own data
    (FedSGD), clipped to C, masked with its own mask (key: its client id), and only the ~gamma d kept values are
    summed; the noise is added once. Under DDP each rank hosts the clients the Poisson sampler gives it, and the
    ranks exchange only the kept values (``all_gather`` of packed values; indices regenerated from the seed) instead
    of DP-SGD's dense all-reduce: the sum of its clients' masked updates on the union of their masks, whose indices
    every rank regenerates from the client ids' seeds (at most min(clients x gamma, 1) d values); every rank adds the
    same noise (same seeded generator), so nothing dense is sent.
    (Not a Lightning ``ddp_comm_hook``: those see the gradient buckets of one backward pass, i.e. the unclipped batch
    gradient, while the values to send exist only after per-client clipping and masking in the optimizer step;
    DPSGD already disables DDP's own gradient sync.)

Logged with ``dp/*`` (and returned by :attr:`SparsifiedGaussian.comm_stats`, printed at the end): public
expectations only, functions of the public constants (B = ``expected_batch_size``, the expected participants per
step and the noise divisor; d, the private parameters; their element size; gamma; the world size). The
realised number of participants of a Poisson round (and so the bytes actually sent) reveals who took part; it never
leaves the process. ``comm/keep_fraction`` (gamma); ``comm/bytes_per_step`` = B gamma' d x element size, the
expected kept values all participants of a step send (gamma' = ``effective_keep_fraction``: gamma, or k / d with
k-subset masks); ``comm/dense_bytes_per_step`` = B d x element size; ``comm/compression`` = 1 / gamma'. Under DDP
with clients also ``comm/rank_bytes_sent``: the expected volume of this rank's all_gather contributions, ring:
(W-1) x (16 bytes of sizes + 8 per expected client of the rank + element size x the expected size of the union of
its clients' masks), the expectation over a global draw of M ~ Poisson(B) participants of which the rank takes the
positions rank, rank + W, ... (N, private under add/remove, is not used; padding to the longest chunk not
counted); and ``comm/rank_dense_bytes`` (DP-SGD's ring all-reduce of d values: 2 (W-1)/W x d values). The
realised counts of the last step stay in memory for measurement only (``_unpublished_last_step_comm``: never
logged, returned or checkpointed).

Refused before training, naming the value: ``keep_fraction`` outside (0, 1], client ids the data does not have,
client ids the train loader's dataset lists more than once (a client listed m times would be sampled up to m times
a round: sensitivity m C, accounted as C), ghost clipping (no per-sample gradients to mask), ``secure_mode``, and
with clients: manual optimization and ``max_physical_batch_size``.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from plpriv.callbacks._dp_training_step import batch_size_of
from plpriv.callbacks.dp_sgd import DPSGD, PRIVACY_RECORD_KEY
from plpriv.privacy.sparsified_gaussian import MASKS, SparsifiedMechanism, check_keep_fraction, epsilon_lower_bound
from plpriv.privacy.sparsified_step import Sparsifier

__all__ = ["PARTICIPANTS", "SparsifiedGaussian"]

PARTICIPANTS = ("examples", "clients")


def _cat(batches: Sequence[Any]) -> Any:
    """Concatenate collated batches along dim 0 (tensors, tuples / lists, dicts)."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(batches), 0)
    if isinstance(first, dict):
        return type(first)({k: _cat([b[k] for b in batches]) for k in first})
    if isinstance(first, (list, tuple)):
        return type(first)(_cat([b[i] for b in batches]) for i in range(len(first)))
    raise ValueError(f"SparsifiedGaussian: cannot concatenate client batches of type {type(first).__name__}.")


def _empty(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, dict):
        return type(batch)({k: _empty(v) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        return type(batch)(_empty(v) for v in batch)
    return batch


class SparsifiedGaussian(DPSGD):
    r"""DP training with the sparsified Gaussian mechanism: DPSGD whose participants send ~``keep_fraction`` of d.

    Args:
        keep_fraction: gamma in (0, 1], the fraction of coordinates every participant keeps (1: DP-SGD).
        max_grad_norm: clipping bound C of every participant's update (an example's gradient or a client's update).
        noise_multiplier, target_epsilon, target_delta, accountant, sample_rate: as :class:`DPSGD`; the accountant
            is DP-SGD's bound, the epsilon the sparsified accountant's (:mod:`plpriv.privacy.sparsified_gaussian`).
        participants: ``"examples"`` (example-level DP) or ``"clients"`` (client-level DP; the train loader yields
            client ids, the datamodule's ``client_batch(id)`` their data).
        mask: ``"bernoulli"`` (each coordinate independently; privacy amplified) or ``"k_subset"`` (exactly
            round(gamma d) coordinates; accounted without amplification, as DP-SGD: no valid tighter analysis here).
        seed: as :class:`DPSGD` (tests only); the masks' seeds derive from the run's secret seed, never stored.
        Other arguments: as :class:`DPSGD`.
    """

    def __init__(
        self,
        keep_fraction: float,
        max_grad_norm: float,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        target_delta: float | None = None,
        participants: str = "examples",
        mask: str = "bernoulli",
        seed: int | None = None,
        accountant: str = "prv",
        sample_rate: float | None = None,
        grad_sample_mode: str = "hooks",
        max_physical_batch_size: int | None = None,
        fix_modules: bool = False,
        stop_on_budget: bool = True,
        private_optimizers: int | Sequence[int] | None = None,
        allow_mechanism_change: bool = False,
        plot: bool = True,
        memoize_accounting: bool = False,
        adjacency: str = "add_remove",
        dataset_size: int | None = None,
        secret_dir: str | None = None,
        log_training_metrics: Sequence[str] = (),
    ) -> None:
        keep_fraction = check_keep_fraction(keep_fraction)
        if participants not in PARTICIPANTS:
            raise ValueError(f"`participants` must be one of {PARTICIPANTS}, got {participants!r}.")
        if mask not in MASKS:
            raise ValueError(f"`mask` must be one of {MASKS}, got {mask!r}.")
        if grad_sample_mode == "ghost":
            raise ValueError("SparsifiedGaussian cannot use grad_sample_mode='ghost': ghost clipping never forms the"
                             " per-sample gradients the masks select coordinates of. Use 'hooks' or 'functorch'.")
        if participants == "clients" and max_physical_batch_size is not None:
            raise ValueError("SparsifiedGaussian(participants='clients') cannot split batches"
                             f" (max_physical_batch_size={max_physical_batch_size!r}): a client split across two"
                             " chunks would be clipped twice. Use fewer clients per round instead.")
        super().__init__(
            max_grad_norm, noise_multiplier=noise_multiplier, target_epsilon=target_epsilon, target_delta=target_delta,
            accountant=accountant, sample_rate=sample_rate, poisson_sampling=True, grad_sample_mode=grad_sample_mode,
            max_physical_batch_size=max_physical_batch_size, fix_modules=fix_modules, stop_on_budget=stop_on_budget,
            secure_mode=False, seed=seed, private_optimizers=private_optimizers,
            allow_mechanism_change=allow_mechanism_change, plot=plot, memoize_accounting=memoize_accounting,
            adjacency=adjacency, dataset_size=dataset_size, secret_dir=secret_dir,
            log_training_metrics=log_training_metrics, mechanism=SparsifiedMechanism(keep_fraction, mask),
        )
        self.participants = participants
        self._sparsifier: Sparsifier | None = None
        self._client_source: Any = None
        self._first_client = 0

    @property
    def keep_fraction(self) -> float:
        return self.engine.mechanism.keep_fraction

    @property
    def mask(self) -> str:
        return self.engine.mechanism.mask

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self.participants == "clients" and not pl_module.automatic_optimization:
            raise ValueError("SparsifiedGaussian(participants='clients') needs automatic optimization: it builds each"
                             " step's batch from the sampled clients' data.")
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.participants == "clients":
            self._check_clients(trainer, pl_module)
        super().on_train_start(trainer, pl_module)
        sparse = self.participants == "clients" and trainer.world_size > 1
        self._sparsifier = self.engine.mechanism.bind_participants(  # clients: re-bound with their participants
            self.dp_optimizer, self.engine, self.participants, trainer.global_rank, trainer.world_size, sparse)
        if self.participants == "clients":
            self.add_teardown(self._wrap_client_step(pl_module))
        rank_zero_info(f"SparsifiedGaussian: keep_fraction={self.keep_fraction:g} ({self.mask} masks),"
                       f" participants={self.participants}{', kept values exchanged by all_gather' if sparse else ''}.")

    def _check_clients(self, trainer: Trainer, pl_module: LightningModule) -> None:
        source = next((s for s in (trainer.datamodule, pl_module) if callable(getattr(s, "client_batch", None))),
                      None)
        if source is None:
            raise ValueError("SparsifiedGaussian(participants='clients') needs a datamodule (or module) with"
                             " `client_batch(client_id)` returning that client's data, and a train loader of client"
                             " ids (e.g. plpriv.data.FederatedDigits).")
        loader = self.train_loader
        ids = [int(loader.dataset[i]) for i in range(len(loader.dataset))]  # type: ignore[union-attr]
        repeated = sorted((i, m) for i, m in Counter(ids).items() if m > 1)
        if repeated:
            listed = ", ".join(f"{i} ({m} times)" for i, m in repeated[:10]) + (" ..." if len(repeated) > 10 else "")
            raise ValueError("SparsifiedGaussian(participants='clients'): the train loader's dataset lists client ids"
                             f" more than once: {listed}. A client listed m times is sampled up to m times a round"
                             " and its update counted m times (sensitivity m x max_grad_norm, accounted as one). List"
                             " every client id once (e.g. plpriv.data.ClientIds(num_clients)).")
        known = set(int(i) for i in source.client_ids()) if callable(getattr(source, "client_ids", None)) else None
        missing = [i for i in ids if (known is not None and i not in known)]
        if known is None:
            for i in ids:
                try:
                    if batch_size_of(source.client_batch(i)) <= 0:
                        missing.append(i)
                except (KeyError, IndexError):
                    missing.append(i)
        if missing:
            raise ValueError(f"SparsifiedGaussian(participants='clients'): the train loader yields client ids"
                             f" {missing[:10]}{' ...' if len(missing) > 10 else ''} that have no data in"
                             f" {type(source).__name__} (ids with data: client_ids()).")
        self._client_source, self._first_client = source, ids[0]

    def _wrap_client_step(self, pl_module: LightningModule) -> Any:
        """Client ids -> the sampled clients' data, concatenated; the optimizer learns which example is whose."""
        dp_step, source, sparsifier = pl_module.training_step, self._client_source, self._sparsifier
        first = self._first_client  # an empty round still needs the batch structure

        @functools.wraps(dp_step)
        def client_step(batch: Any, *args: Any, **kwargs: Any) -> Any:
            ids = batch[0] if isinstance(batch, (list, tuple)) else batch
            ids = [int(i) for i in torch.as_tensor(ids).reshape(-1).tolist()]
            if len(set(ids)) != len(ids):  # _check_clients refused repeated ids; the dataset changed since?
                raise RuntimeError(f"SparsifiedGaussian(participants='clients'): a round sampled client ids"
                                   f" {sorted(i for i, m in Counter(ids).items() if m > 1)} more than once; every"
                                   " client id must be listed once in the train loader's dataset.")
            batches = [source.client_batch(i) for i in ids]
            sizes = [batch_size_of(b) for b in batches]
            data = _cat(batches) if batches else _empty(source.client_batch(first))
            sparsifier.keys = ids  # type: ignore[union-attr]
            counts = torch.tensor(sizes, dtype=torch.long) if sizes else torch.zeros(0, dtype=torch.long)
            sparsifier.groups = torch.repeat_interleave(torch.arange(len(ids)), counts)  # type: ignore[union-attr]
            return dp_step(move_data_to_device(data, pl_module.device), *args, **kwargs)

        pl_module.training_step = client_step  # type: ignore[method-assign]
        return lambda: setattr(pl_module, "training_step", dp_step)

    # ------------------------------------------------------------------ logging, records, state
    def log_step(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().log_step(trainer, pl_module)
        stats = self.comm_stats  # public expectations only, never the step's realised counts
        if stats:
            pl_module.log_dict(stats, on_step=True, on_epoch=False, batch_size=1)

    @property
    def comm_stats(self) -> dict[str, float]:
        """The communication numbers per step as public expectations (expected bytes the participants send, dense
        bytes, compression, ...; see the module docstring): the same for every run with the same public constants,
        whatever the Poisson draws."""
        return self._sparsifier.public_stats() if self._sparsifier is not None else {}

    def _unpublished_last_step_comm(self) -> dict[str, float]:
        """UNPUBLISHED, for measurement only (benchmarks, tests): the last step's *realised* counts (participants,
        bytes actually packed). They reveal the Poisson draw (who took part), so they are not covered by the DP
        guarantee: never log, print, store or publish them. Published numbers: :attr:`comm_stats`."""
        return dict(self._sparsifier.realised) if self._sparsifier is not None else {}

    def get_epsilon_lower_bound(self, delta: float | None = None) -> float:
        """Epsilon of a 1-sparse input at every step (rate q gamma): the paper-style number, never above the truth."""
        delta = self.delta if delta is None else delta
        return epsilon_lower_bound(self.history, self.keep_fraction, float(delta)) if self.history else 0.0

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.dp_optimizer is not None and self.history and self._sparsifier is not None:
            stats = self.comm_stats  # public expectations (the realised counts are private)
            rank_zero_info(f"SparsifiedGaussian: keep_fraction={self.keep_fraction:g}: the participants of a step send"
                           f" {stats.get('comm/bytes_per_step', 0):.0f} bytes in expectation instead of"
                           f" {stats.get('comm/dense_bytes_per_step', 0):.0f} dense"
                           f" (expected participants B={self.expected_batch_size:g}).")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "participants": self.participants}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("participants", self.participants) != self.participants:
            raise ValueError(f"SparsifiedGaussian: the checkpoint was trained with another mechanism (participants"
                             f" {state_dict['participants']!r} -> {self.participants!r}); the accountant cannot compose"
                             " them. Resume with the checkpoint's settings or start a new run.")
        super().load_state_dict(state_dict)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if PRIVACY_RECORD_KEY in checkpoint:
            checkpoint[PRIVACY_RECORD_KEY]["participants"] = self.participants
