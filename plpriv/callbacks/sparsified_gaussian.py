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

from collections.abc import Sequence

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from plpriv.callbacks.dp_sgd import DPSGD, PARTICIPANTS
from plpriv.privacy.sparsified_gaussian import MASKS, SparsifiedMechanism, check_keep_fraction, epsilon_lower_bound
from plpriv.privacy.sparsified_step import Sparsifier

__all__ = ["PARTICIPANTS", "SparsifiedGaussian"]


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
        if mask not in MASKS:
            raise ValueError(f"`mask` must be one of {MASKS}, got {mask!r}.")
        if grad_sample_mode == "ghost":
            raise ValueError("SparsifiedGaussian cannot use grad_sample_mode='ghost': ghost clipping never forms the"
                             " per-sample gradients the masks select coordinates of. Use 'hooks' or 'functorch'.")
        super().__init__(
            max_grad_norm, noise_multiplier=noise_multiplier, target_epsilon=target_epsilon, target_delta=target_delta,
            accountant=accountant, sample_rate=sample_rate, poisson_sampling=True, grad_sample_mode=grad_sample_mode,
            max_physical_batch_size=max_physical_batch_size, fix_modules=fix_modules, stop_on_budget=stop_on_budget,
            secure_mode=False, seed=seed, private_optimizers=private_optimizers,
            allow_mechanism_change=allow_mechanism_change, plot=plot, memoize_accounting=memoize_accounting,
            adjacency=adjacency, dataset_size=dataset_size, secret_dir=secret_dir,
            log_training_metrics=log_training_metrics, mechanism=SparsifiedMechanism(keep_fraction, mask),
            participants=participants,
        )
        self._sparsifier: Sparsifier | None = None

    @property
    def keep_fraction(self) -> float:
        return self.engine.mechanism.keep_fraction

    @property
    def mask(self) -> str:
        return self.engine.mechanism.mask

    # ------------------------------------------------------------------ set-up
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._sparsifier = self.dp_optimizer.sparsifier  # type: ignore[union-attr]  # bound by the mechanism
        sparse = self._sparsifier is not None and self._sparsifier.sparse_exchange
        rank_zero_info(f"SparsifiedGaussian: keep_fraction={self.keep_fraction:g} ({self.mask} masks),"
                       f" participants={self.participants}{', kept values exchanged by all_gather' if sparse else ''}.")

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
