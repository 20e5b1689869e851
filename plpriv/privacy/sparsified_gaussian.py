r"""The sparsified Gaussian mechanism and a provably valid privacy accountant for it (no Lightning imports).

Chen, Isik, Kairouz, No, Oh, Xu, "Improved Communication-Privacy Trade-offs in L2 Mean Estimation under Streaming
Differential Privacy" (ICML 2024, arXiv 2405.02341), abstract: a privacy accountant for the sparsified Gaussian
mechanism "that incorporates the randomness inherent in sparsification into the DP noise", "directly in L2".

Mechanism (one release; what :class:`SparsifiedGaussianMechanism` and the callback run)
    every participant i (an example or a client) clips its vector, ``x_i <- x_i min(1, C / ||x_i||)``, draws a
    coordinate mask ``m_i`` (``bernoulli``: each of the d coordinates kept independently with probability gamma;
    ``k_subset``: a uniform subset of k = round(gamma d) coordinates) from a seed the aggregator knows, and sends only
    its ~gamma d kept values (the indices follow from the seed). The aggregator adds Gaussian noise once, on all d
    coordinates, and rescales without bias::

        Y = sum_i x_i * m_i + N(0, sigma^2 C^2 I_d),        mu_hat = Y / (n gamma)

MSE [closed form, :func:`sparsified_gaussian_mse`; derived here, tested against Monte Carlo]
    ``E||mu_hat - mu||^2 = (1 - gamma) / (n^2 gamma) sum_i ||x_i||^2 + d sigma^2 C^2 / (n^2 gamma^2)``.
    The abstract's claim: MSEs that "fast converge to those of the uncompressed Gaussian mechanism" (d sigma_0^2 C^2
    / n^2 at the same epsilon): at fixed epsilon, subsampling the coordinates lets sigma shrink about like gamma, so
    the noise term tends to the Gaussian mechanism's, and the sparsification term, ``(1 - gamma) / (n gamma)`` per
    unit norm, vanishes as the number of participants n grows (the regime ``n gamma >> 1``; see the benchmark).

Privacy: what is assumed, what is proven, what is reported
    * Threat model: central DP with a trusted aggregator. The masks are secret from the adversary exactly like the
      noise (both come from the run's secret seed; see :func:`mask_seed`); whoever knows the seed knows the masks
      and the amplification below is void (the DP-SGD bound, which ignores the masks, still holds).
    * Add/remove neighbours, adaptive composition (every step's inputs may depend on earlier outputs).
    * ``keep_fraction == 1`` is DP-SGD: the epsilon is exactly DP-SGD's (same opacus accountant).
    * Always valid, masks known or not: for any fixed masks ``x_i * m_i`` lies in the C-ball, so every step is a
      Poisson-subsampled Gaussian (DP-SGD) step; by joint convexity the mixture over masks is no worse. So DP-SGD's
      epsilon at (sigma, q) is an upper bound for any mask (the only bound used for ``k_subset`` masks).
    * Bernoulli masks, Renyi DP at integer orders alpha (statements [A]-[E] below), one step at participant rate q:
        - [A] Mironov, Talwar, Zhang 2019 ("Renyi DP of the sampled Gaussian mechanism"), the integer-order formula
          and their result that its remove direction is the larger one: for SGM(q, sigma) with shift s <= C,
          ``(alpha-1) eps(alpha) = log sum_k binom(alpha,k) (1-q)^(alpha-k) q^k exp(k(k-1) s^2 / (2 sigma^2 C^2))``.
        - [B] (derived) q = 1: each coordinate is an SGM with rate gamma and shift |x_j|, the coordinates are
          independent, so the divergences add; the log-moment above is a log-sum-exp of affine functions of
          t = s^2, hence convex with value 0 at 0, so ``sum_j f(t_j) <= f(sum_j t_j) <= f(1)``: the worst input on
          the ball is 1-sparse and the RDP, both directions, is exactly SGM(gamma, sigma)'s. This is the paper's
          L2 accounting ("worst case is a one-hot vector"); it is tight (a 1-sparse input attains it).
        - [C] (derived) q < 1, remove direction: expanding ``(1 - q + q L)^alpha`` binomially, every moment
          ``E[L_x^k]`` of the product likelihood ratio is at most the 1-sparse one ([B]), so the worst input is
          again 1-sparse: exactly SGM(q gamma, sigma). This is what a "rate q gamma" accountant reports.
        - [D] q < 1, add direction: NOT reducible to the 1-sparse input by [B]/[C] (the masks of one participant
          share its participation coin, and dense inputs are not dominated by 1-sparse ones as experiments: their
          total variation is larger). We use valid bounds only: Zhu & Wang 2019 ("Poisson subsampled RDP",
          Theorem 6: general upper bound for Poisson subsampling of any mechanism with RDP eps(l), l = 2..alpha,
          within log(3)/(alpha-1) of optimal) applied to the q = 1 mechanism of [B]; two bounds (derived) from
          revealing side information to the adversary, with the add-direction moment ``int P^alpha R^(1-alpha)``
          convex in R: the mask revealed ([A] per mask, [B]'s convexity per coordinate),
          ``log(1 - gamma + gamma exp((alpha-1) eps_SGM(q, sigma)(alpha))) / (alpha-1)``, and the participation coin
          revealed ([B] given participation), ``log(1 - q + q exp((alpha-1) eps_SGM(gamma, sigma)(alpha))) /
          (alpha-1)``; and DP-SGD's.
        - [E] Balle et al. 2020 (Theorem 21; opacus' ``get_privacy_spent``): RDP -> (epsilon, delta).
      Reported epsilon: ``min(DP-SGD accountant's epsilon, RDP epsilon of max([C], min of the [D] bounds))``.
      :func:`epsilon_lower_bound` is the 1-sparse input's epsilon (rate q gamma), what the paper-style accountant
      reports; the true worst case lies between the two. At q = 1 the RDP bound equals the 1-sparse input's RDP
      (rate gamma) order by order, i.e. the RDP bound is tight there; the PRV figure of :func:`epsilon_lower_bound`
      is a lower *estimate* of that input's epsilon, so it can still be below the reported (RDP-converted) epsilon.
    * Not covered: the streaming / matrix-factorisation (DP-FTRL) extension of the paper.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from opacus.accountants import IAccountant
from opacus.accountants.analysis.rdp import get_privacy_spent
from opacus.optimizers import DPOptimizer
from scipy.special import gammaln, logsumexp

from plpriv.privacy.accounting import ACCOUNTANTS, History, calibrate_noise_multiplier, epsilon, extend_history
from plpriv.privacy.ledger import EpsilonLedger
from plpriv.privacy.mechanisms import Mechanism
from plpriv.privacy.sparsified_step import (  # re-exported: the masks are part of this module's public API
    MASK_SEED_TAG,
    MASKS,
    Sparsifier,
    check_keep_fraction,
    check_mask,
    clip_rows,
    draw_mask,
    draw_masks,
    effective_keep_fraction,
    kept_count,
    mask_seed,
    pack,
    sparsifying_class,
    unpack,
)

__all__ = [
    "MASK_SEED_TAG",
    "MASKS",
    "SparsifiedGaussianAccountant",
    "SparsifiedGaussianLedger",
    "SparsifiedGaussianMechanism",
    "SparsifiedMechanism",
    "SparsifiedRelease",
    "check_keep_fraction",
    "draw_mask",
    "draw_masks",
    "epsilon_lower_bound",
    "gaussian_mechanism_mse",
    "kept_count",
    "mask_seed",
    "pack",
    "rdp_bound",
    "rdp_lower_bound",
    "sparsified_gaussian_epsilon",
    "sparsified_gaussian_mse",
    "sparsified_gaussian_noise_multiplier",
    "sparsified_history_epsilon",
    "unpack",
]

ORDERS = np.array([*range(2, 129), 160, 192, 256, 320, 384, 512], dtype=float)  # integer orders only ([B]-[D])


# --------------------------------------------------------------------------------------------------- mechanism
@dataclass
class SparsifiedRelease:
    total: torch.Tensor  # Y: masked clipped sum plus noise, [d]
    estimate: torch.Tensor  # Y / (n gamma)
    packed: torch.Tensor  # every participant's kept values, concatenated
    masks: torch.Tensor  # [n, d]

    @property
    def bytes_sent(self) -> int:
        return self.packed.numel() * self.packed.element_size()


@dataclass
class SparsifiedGaussianMechanism:
    """One release of the sparsified Gaussian mechanism over ``n`` participants' vectors ``x`` ([n, d])."""

    max_norm: float
    noise_multiplier: float
    keep_fraction: float
    mask: str = "bernoulli"

    def __post_init__(self) -> None:
        self.keep_fraction = check_keep_fraction(self.keep_fraction)
        check_mask(self.mask)

    def release(self, x: torch.Tensor, seeds: Sequence[int], generator: torch.Generator | None = None,
                clip: bool = True) -> SparsifiedRelease:
        n, d = x.shape
        if len(seeds) != n:
            raise ValueError(f"need one mask seed per participant: {n} rows, {len(seeds)} seeds.")
        x = clip_rows(x, self.max_norm) if clip else x
        masks = draw_masks(d, self.keep_fraction, seeds, self.mask)
        packed = pack(x, masks)
        total = unpack(packed, masks).sum(0)
        noise = torch.randn(d, generator=generator, dtype=x.dtype, device=x.device)
        total = total + self.noise_multiplier * self.max_norm * noise
        gamma = effective_keep_fraction(d, self.keep_fraction, self.mask)
        return SparsifiedRelease(total, total / (n * gamma), packed, masks)


def sparsified_gaussian_mse(sum_sq_norms: float, n: int, dim: int, max_norm: float, noise_multiplier: float,
                            keep_fraction: float) -> float:
    """E||mu_hat - mu||^2 of the mean estimate (clipped inputs with ``sum_i ||x_i||^2 = sum_sq_norms``):
    ``(1-gamma)/(n^2 gamma) sum_i ||x_i||^2 + d sigma^2 C^2 / (n^2 gamma^2)`` (independent coordinates of mask and
    noise: per coordinate Var(x m / gamma) = x^2 (1-gamma)/gamma; also the k-subset mask with gamma = k/d, whose
    coordinates are dependent but enter the squared error only through their marginals)."""
    g = check_keep_fraction(keep_fraction)
    return (1 - g) / (n**2 * g) * sum_sq_norms + dim * (noise_multiplier * max_norm) ** 2 / (n**2 * g**2)


def gaussian_mechanism_mse(n: int, dim: int, max_norm: float, noise_multiplier: float) -> float:
    """MSE of the uncompressed Gaussian mechanism's mean estimate, d sigma^2 C^2 / n^2."""
    return dim * (noise_multiplier * max_norm) ** 2 / n**2


# --------------------------------------------------------------------------------------------------- accounting
def _sgm_log_moments(q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """(alpha - 1) * RDP of the Poisson-subsampled Gaussian SGM(q, sigma) at integer orders: [A]'s formula
    (opacus' ``_compute_log_a_for_int_alpha``, vectorised)."""
    if q <= 0:
        return np.zeros_like(orders)
    if sigma == 0:
        return np.full_like(orders, np.inf)
    if q >= 1:
        return orders * (orders - 1) / (2 * sigma**2)
    a = orders[:, None]
    k = np.arange(int(orders.max()) + 1, dtype=float)[None, :]
    with np.errstate(invalid="ignore"):
        terms = (gammaln(a + 1) - gammaln(k + 1) - gammaln(np.maximum(a - k, 0) + 1) + k * math.log(q)
                 + (a - k) * math.log1p(-q) + k * (k - 1) / (2 * sigma**2))
    terms[k.repeat(len(orders), 0) > a] = -np.inf  # binom(alpha, k) = 0 for k > alpha
    return logsumexp(terms, axis=1)


def _zhu_wang_log_moments(q: float, base: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """[D] Zhu & Wang 2019, Theorem 6: (alpha-1) eps(alpha) of Poisson subsampling at rate q of a mechanism whose
    (l-1) eps(l) is ``base[l - 2]`` (l = 2, 3, ...): log{(1-q)^(alpha-1)(alpha q - q + 1) + binom(alpha,2) q^2
    (1-q)^(alpha-2) e^{eps(2)} + 3 sum_{l=3}^alpha binom(alpha,l) q^l (1-q)^(alpha-l) e^{(l-1) eps(l)}}."""
    a = orders[:, None]
    ell = np.arange(2, int(orders.max()) + 1, dtype=float)[None, :]
    with np.errstate(invalid="ignore"):
        terms = (gammaln(a + 1) - gammaln(ell + 1) - gammaln(np.maximum(a - ell, 0) + 1) + ell * math.log(q)
                 + (a - ell) * math.log1p(-q) + base[None, : ell.shape[1]])
    terms[:, 1:] += math.log(3.0)
    terms[ell.repeat(len(orders), 0) > a] = -np.inf
    first = (orders - 1) * math.log1p(-q) + np.log(orders * q - q + 1)
    return logsumexp(np.concatenate([first[:, None], terms], axis=1), axis=1)


@lru_cache(maxsize=4096)
def _rdp_bound_cached(noise_multiplier: float, sample_rate: float, keep_fraction: float) -> np.ndarray:
    orders = ORDERS
    q, g, s = sample_rate, keep_fraction, noise_multiplier
    if s == 0:
        return np.full_like(orders, np.inf)
    dpsgd = _sgm_log_moments(q, s, orders)  # valid for any mask (module docstring)
    if g >= 1:
        return dpsgd / (orders - 1)
    if q >= 1:  # [B]: exact, both directions
        return np.minimum(_sgm_log_moments(g, s, orders), dpsgd) / (orders - 1)
    remove = _sgm_log_moments(q * g, s, orders)  # [C]: exact
    all_orders = np.arange(2, int(orders[-1]) + 1, dtype=float)
    base = _sgm_log_moments(g, s, all_orders)  # [B]: the q = 1 mechanism, (l-1) eps(l) for l = 2 .. max order
    zhu_wang = _zhu_wang_log_moments(q, base, orders)
    reveal_mask = np.logaddexp(math.log1p(-g), math.log(g) + dpsgd)  # [D], derived (mask revealed)
    base_at_orders = _sgm_log_moments(g, s, orders)
    reveal_coin = np.logaddexp(math.log1p(-q), math.log(q) + base_at_orders)  # [D], derived (participation revealed)
    add = np.minimum.reduce([zhu_wang, reveal_mask, reveal_coin, dpsgd])
    out = np.maximum(remove, add) / (orders - 1)
    out.setflags(write=False)
    return out


def rdp_bound(noise_multiplier: float, sample_rate: float, keep_fraction: float) -> np.ndarray:
    """Per-step RDP upper bound at :data:`ORDERS` of the Bernoulli-sparsified Gaussian at participant rate q
    (module docstring, [A]-[D]); keep_fraction 1: DP-SGD's RDP."""
    return _rdp_bound_cached(float(noise_multiplier), float(sample_rate), check_keep_fraction(keep_fraction))


def rdp_lower_bound(noise_multiplier: float, sample_rate: float, keep_fraction: float) -> np.ndarray:
    """Per-step RDP of a 1-sparse input (SGM at rate q gamma): no valid accountant can report less ([C])."""
    return _sgm_log_moments(sample_rate * keep_fraction, noise_multiplier, ORDERS) / (ORDERS - 1)


def _rdp_epsilon(history: History, delta: float, keep_fraction: float) -> float:
    total = np.zeros_like(ORDERS)
    for s, q, k in history:
        total = total + k * rdp_bound(s, q, keep_fraction)
    if not np.isfinite(total).any():
        return math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the optimal order at an end of ORDERS: the bound is loose, never small
        eps, _ = get_privacy_spent(orders=ORDERS, rdp=total, delta=delta)
    return float(eps)


def sparsified_history_epsilon(history: History, delta: float, keep_fraction: float, accountant: str = "prv",
                               mask: str = "bernoulli") -> float:
    """Epsilon at ``delta`` of an opacus-format history ``[(noise_multiplier, sample_rate, steps)]`` of sparsified
    Gaussian steps with ``keep_fraction``: DP-SGD's ``accountant`` epsilon at keep_fraction 1 (or for ``k_subset``
    masks, which get no amplification here), else the smaller of it and the RDP bound (module docstring)."""
    keep_fraction, mask = check_keep_fraction(keep_fraction), check_mask(mask)
    history = [(float(s), float(q), int(k)) for s, q, k in history if int(k) > 0]
    dpsgd = epsilon(history, delta, accountant)
    if keep_fraction == 1.0 or mask == "k_subset" or not history:
        return dpsgd
    return min(dpsgd, _rdp_epsilon(history, delta, keep_fraction))


def sparsified_gaussian_epsilon(noise_multiplier: float, sample_rate: float, keep_fraction: float, steps: int,
                                delta: float, accountant: str = "prv", mask: str = "bernoulli") -> float:
    """Epsilon of ``steps`` sparsified Gaussian steps at (noise_multiplier, sample_rate, keep_fraction)."""
    return sparsified_history_epsilon([(noise_multiplier, sample_rate, steps)], delta, keep_fraction, accountant,
                                      mask)


def epsilon_lower_bound(history: History, keep_fraction: float, delta: float) -> float:
    """Epsilon of the 1-sparse input fed at every step of ``history``: SGM at rate q gamma (opacus PRV, its lower
    estimate). What a rate-q-gamma ("paper-style") accountant reports; the mechanism's epsilon is at least this."""
    from opacus.accountants import PRVAccountant

    keep_fraction = check_keep_fraction(keep_fraction)
    accountant = PRVAccountant()
    accountant.history = [(float(s), float(q) * keep_fraction, int(k)) for s, q, k in history if int(k) > 0]
    if not accountant.history:
        return 0.0
    dprv = accountant._get_dprv(eps_error=0.01, delta_error=delta / 1000)
    lower, _, _ = dprv.compute_epsilon(delta, delta / 1000, 0.01)
    return float(max(lower, 0.0))


def sparsified_gaussian_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float,
                                         keep_fraction: float, steps: int, accountant: str = "prv",
                                         mask: str = "bernoulli", tolerance: float = 0.01) -> float:
    """Smallest noise multiplier (to ``tolerance`` in epsilon) whose ``steps`` steps spend at most
    ``target_epsilon``: the inverse of :func:`sparsified_gaussian_epsilon`. Its epsilon is a minimum of two bounds,
    each decreasing in sigma, so the answer is the smaller of the two calibrations."""
    keep_fraction, mask = check_keep_fraction(keep_fraction), check_mask(mask)
    if steps <= 0:
        raise ValueError(f"`steps` must be positive to calibrate the noise, got {steps!r}.")
    def dpsgd_sigma() -> float:
        return calibrate_noise_multiplier(target_epsilon, delta, sample_rate, steps, accountant,
                                          epsilon_tolerance=tolerance)

    if keep_fraction == 1.0 or mask == "k_subset":
        return dpsgd_sigma()
    history = lambda s: [(s, sample_rate, steps)]  # noqa: E731
    fits = lambda s: _rdp_epsilon(history(s), delta, keep_fraction) <= target_epsilon  # noqa: E731
    lo, hi = 0.0, 1.0
    while not fits(hi):
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            raise ValueError(f"no noise multiplier up to {hi:g} reaches epsilon={target_epsilon}.")
    while hi - lo > 1e-4 * hi and _rdp_epsilon(history(hi), delta, keep_fraction) < target_epsilon - tolerance:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    if epsilon(history(hi), delta, accountant) > target_epsilon:  # DP-SGD's bound needs more noise than the RDP one
        return hi
    return min(hi, dpsgd_sigma())


class SparsifiedGaussianAccountant(IAccountant):
    """opacus' accountant interface (``step``, ``get_epsilon``, ``history``, ``state_dict``) for sparsified Gaussian
    steps with a fixed ``keep_fraction`` and ``mask``; ``accountant`` names DP-SGD's bound (module docstring)."""

    def __init__(self, keep_fraction: float, mask: str = "bernoulli", accountant: str = "prv") -> None:
        super().__init__()
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"`accountant` must be one of {ACCOUNTANTS}, got {accountant!r}.")
        self.keep_fraction = check_keep_fraction(keep_fraction)
        self.mask = check_mask(mask)
        self.accountant = accountant

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        self.history = extend_history(self.history, noise_multiplier, sample_rate, 1)

    def get_epsilon(self, delta: float, *args: Any, **kwargs: Any) -> float:
        return sparsified_history_epsilon(self.history, delta, self.keep_fraction, self.accountant, self.mask)

    def __len__(self) -> int:
        return sum(int(k) for _, _, k in self.history)

    @classmethod
    def mechanism(cls) -> str:
        return "sparsified_gaussian"

    def state_dict(self, destination: Any = None) -> Any:
        state = super().state_dict(destination)
        state.update(keep_fraction=self.keep_fraction, mask=self.mask, accountant=self.accountant)
        return state

    def load_state_dict(self, state_dict: Any) -> None:
        for key in ("keep_fraction", "mask"):
            if key in state_dict and state_dict[key] != getattr(self, key):
                raise ValueError(f"the accountant state has {key}={state_dict[key]!r}, this accountant"
                                 f" {getattr(self, key)!r}.")
        super().load_state_dict(state_dict)


class SparsifiedMechanism(Mechanism):
    """The DP engine's sparsified Gaussian mechanism: every participant's clipped update keeps a random ``keep_fraction``
    of its coordinates (``mask``) before the sum; accounted by :class:`SparsifiedGaussianAccountant` (module
    docstring). The masking optimizer is :mod:`plpriv.privacy.sparsified_step`'s."""

    name = "sparsified-gaussian"
    title = "sparsified Gaussian epsilon"
    needs_per_sample_gradients = True  # the masks select coordinates of each participant's clipped gradient

    def __init__(self, keep_fraction: float, mask: str = "bernoulli") -> None:
        self.keep_fraction = check_keep_fraction(keep_fraction)
        self.mask = check_mask(mask)

    def optimizer_class(self, base: type[DPOptimizer]) -> type[DPOptimizer]:
        return sparsifying_class(base)

    def bind(self, optimizer: DPOptimizer, engine: Any, rank: int, world_size: int) -> None:
        """Example-level masks on the engine's optimizer (each example keyed by its position in the global batch);
        client-level runs re-bind with their participants (see :class:`plpriv.callbacks.SparsifiedGaussian`)."""
        self.bind_participants(optimizer, engine, "examples", rank, world_size, sparse_exchange=False)

    def bind_participants(self, optimizer: DPOptimizer, engine: Any, participants: str, rank: int, world_size: int,
                          sparse_exchange: bool) -> Sparsifier:
        dim = sum(p.numel() for p in optimizer.params)
        elem = optimizer.params[0].element_size() if optimizer.params else 4
        sparsifier = Sparsifier(engine, self.keep_fraction, self.mask, participants, rank, world_size,
                                sparse_exchange, dim, elem)
        optimizer.sparsifier = sparsifier  # type: ignore[attr-defined]  # the mixin's own attribute
        return sparsifier

    def accountant(self, accountant: str = "prv") -> SparsifiedGaussianAccountant:
        return SparsifiedGaussianAccountant(self.keep_fraction, self.mask, accountant)

    def epsilon(self, history: History, delta: float, accountant: str = "prv") -> float:
        return sparsified_history_epsilon(history, delta, self.keep_fraction, accountant, self.mask)

    def calibrate(self, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                  accountant: str = "prv") -> float:
        return sparsified_gaussian_noise_multiplier(target_epsilon, delta, sample_rate, self.keep_fraction, steps,
                                                    accountant, self.mask)

    @property
    def key(self) -> tuple:
        return (self.name, self.keep_fraction, self.mask)

    def record(self) -> dict[str, Any]:
        return {"mechanism": self.name, "keep_fraction": self.keep_fraction, "mask": self.mask}


class SparsifiedGaussianLedger(EpsilonLedger):
    """:class:`~plpriv.privacy.ledger.EpsilonLedger` (cache, prefetch, curve, budget) of :class:`SparsifiedMechanism`."""

    def __init__(self, keep_fraction: float, mask: str = "bernoulli", accountant: str = "prv", *,
                 memoize: bool = False, adjacency: str = "add_remove") -> None:
        super().__init__(accountant, memoize=memoize, adjacency=adjacency,
                         mechanism=SparsifiedMechanism(keep_fraction, mask))
        self.keep_fraction, self.mask = self.mechanism.keep_fraction, self.mechanism.mask
