r"""Matrix-factorization (DP-FTRL) building blocks: strategies, sensitivity, error, seeded correlated noise and the
accountant (no Lightning imports; torch float64 for matrices, numpy/scipy for the scalar accounting).

The matrix mechanism (Denisov et al. 2022, arXiv 2202.08312; Choquette-Choo et al. 2023, arXiv 2211.06530) releases
the prefix sums ``A G`` of the per-step clipped sums ``G`` (rows g_1..g_n, each a flattened gradient sum) as::

    A G  ~  B (C G + Z),     A = B C,     Z = sigma * clip * W,  W iid N(0, 1)            (Eq. MM)

where ``A`` is the workload (here the lower-triangular ones, the prefix sums, Eq. A), ``C`` the *strategy*
(encoder) and ``B`` the decoder. Online, step t adds to its clipped sum the noise ``(N Z)_t`` with the *noise matrix*
``N = A^{-1} B`` (Eq. N): then ``A (G + N Z) = A G + B Z``, so the released prefix sums carry ``B Z``. For square,
invertible, lower-triangular C, ``N = C^{-1}``; for the binary tree (C has 2n - 1 rows) N is the causal left
inverse of C that reads each prefix sum from the completed nodes.

Error (the papers' measure, Choquette-Choo et al. 2023 Sec. 2, jax_privacy ``toeplitz.loss`` with
``reduction_fn=mean``, Kalinin & Lampert 2024): at unit noise (sigma * clip = 1) the released prefix sum t has
squared error ``||B[t]||^2``; the noise needed for a fixed privacy level scales with the sensitivity of C, so::

    prefix_rmse(B, C) = sqrt(||B||_F^2 / n) * sens(C)                                       (Eq. RMSE)

(normalisation: the mean over the n prefix sums of the expected squared error, then the square root).

Sensitivity (Eq. S1-S3, :func:`sensitivity`): one participant changes the rows of G it participates in by vectors
of norm <= clip; the L2 sensitivity of ``C G`` in units of clip is
    * single participation: the largest column norm of C (Eq. S1);
    * b-min-separation (participations at steps i < j need j - i >= b, at most k of them): when columns of C that
      are b or more apart are orthogonal (every b-banded lower-triangular C; Choquette-Choo et al. 2023b, arXiv
      2306.08153, Thm 2), exactly ``sqrt(max_pattern sum_{i in pattern} ||C[:, i]||^2)`` (Eq. S2, computed by the
      dynamic program "VecSens", their Algorithm 3); for column-normalised C this is ``sqrt(k)`` (the statement of
      Choquette-Choo et al. 2023: k participations of a unit-column banded strategy cost sqrt(k));
    * any other C (the tree, a BSR with more bands than b): the upper bound of their Algorithm 4 on |C^T C|
      (Eq. S3) -- valid for accounting, not always tight.

Privacy (:class:`MatrixMechanismAccountant`): with the sensitivity above, the whole run (all n releases together)
is ONE Gaussian mechanism with L2 sensitivity ``sens * clip`` and noise std ``sigma * clip``, i.e. mu = sens /
sigma in Gaussian DP (Dong, Roth, Su 2019). Epsilon at delta is the exact analytic Gaussian mechanism's (Balle &
Wang 2018, Thm 8, Eq. AG) or, on request, opacus' RDP of the Gaussian at q = 1 composed once (Mironov 2017, RDP
alpha * sens^2 / (2 sigma^2), converted by opacus' ``get_privacy_spent``). No amplification by sampling: the
participation schema is what the sensitivity encodes, not the sample rate. Adjacency: the sensitivity bounds one
participant's rows of G changing by at most clip each while every other row stays put, i.e. "zero-out" neighbours
(dp-accounting's REPLACE_SPECIAL: the participant's contribution replaced by zero). That is add/remove only for a
participation schema where removing one participant moves no one else (fixed slots, or each participant's own
steps): with fixed-order batches over a data set, removing an example shifts the later batches, which this bound
does not cover. The engine must state and enforce the schema before using this accountant (not wired yet).

Library check (why this module is written here): google's ``jax_privacy.matrix_factorization`` (banded, toeplitz,
sensitivity, streaming_matrix; Apache-2.0) has all of this but needs jax/jaxlib >= 0.7, optax, chex (not installed
here, and not to be installed); Apple's ``pfl`` 0.6.0 has a PyTorch port of the banded optimiser but pins
``dp-accounting<0.6`` (this environment has 0.6.0), ``packaging<26``, ``prv-accountant<0.3`` and builds its matrices
inside pfl's platform/ops framework; ``opacus-dpcr`` has tree mechanisms only, for opacus 1.1.2; tensorflow-privacy
is TF. So the ~100 lines of linear algebra are re-implemented here, following jax_privacy's formulas (cited at each
function) and tested against independent facts (tests/privacy/test_matrix_factorization.py).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from opacus.accountants import IAccountant
from opacus.accountants.analysis import rdp as opacus_rdp
from scipy.optimize import brentq
from scipy.special import log_ndtr

__all__ = [
    "DTYPE",
    "MatrixMechanismAccountant",
    "Strategy",
    "bsr",
    "bsr_coefficients",
    "calibrate_noise_multiplier",
    "correlated_noise",
    "gaussian_delta",
    "gaussian_epsilon",
    "identity",
    "optimized_banded",
    "prefix_rmse",
    "prefix_workload",
    "sensitivity",
    "strategy",
    "tree",
    "tree_restarts",
    "true_max_participations",
]

DTYPE = torch.float64
STRATEGIES = ("identity", "tree", "tree-restart", "bsr", "optimized_banded")
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))  # opacus' RDP


# ---------------------------------------------------------------------------------------------------- workload
def prefix_workload(n: int) -> torch.Tensor:
    """The prefix-sum workload A (Eq. A): ``A[t, s] = 1`` for s <= t (lower-triangular ones), n x n, float64."""
    _check_n(n)
    return torch.tril(torch.ones(n, n, dtype=DTYPE))


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be a positive int, got {n!r}.")


def _difference(B: torch.Tensor) -> torch.Tensor:
    """``A^{-1} B`` (A^{-1} is the first-difference operator: row t minus row t - 1)."""
    out = B.clone()
    out[1:] -= B[:-1]
    return out


# ---------------------------------------------------------------------------------------------------- strategies
@dataclass(frozen=True)
class Strategy:
    """A factorization ``A = B C`` of the n-step prefix workload, with the noise matrix ``N = A^{-1} B`` (Eq. N).

    ``B``: n x m decoder; ``C``: m x n strategy (encoder); ``noise``: n x m, row t is the combination of the
    independent draws w_1..w_m added to step t's clipped sum; it is causal (row t is zero on draws that are not
    available at step t), so the draws can be indexed by the step at which they are first used. ``bands``: number
    of nonzero diagonals of a square lower-triangular C (the diagonal included), ``None`` when C is not banded in
    that sense (the tree's C is not square)."""

    name: str
    B: torch.Tensor
    C: torch.Tensor
    noise: torch.Tensor
    bands: int | None = None

    @property
    def n(self) -> int:
        return int(self.B.shape[0])

    @property
    def draws(self) -> int:
        """m: the number of independent draws (rows of C): n, or ``2n - popcount(n)`` nodes for the tree (a node's
        index, in completion order, does not depend on n, so the seeds of a longer run extend a shorter one's)."""
        return int(self.C.shape[0])

    def first_use(self) -> list[int]:
        """For each draw j, the first step whose noise uses it (its public index in the seed derivation)."""
        nz = self.noise != 0
        return [int(torch.nonzero(nz[:, j])[0]) if bool(nz[:, j].any()) else self.n for j in range(self.draws)]

    def sensitivity(self, min_sep: int = 1, max_participations: int = 1, epochs: int | None = None) -> float:
        return sensitivity(self.C, min_sep=min_sep, max_participations=max_participations, epochs=epochs)

    def rmse(self, sens: float | None = None) -> float:
        return prefix_rmse(self.B, self.C, sens)


def _square_strategy(name: str, C: torch.Tensor, bands: int | None) -> Strategy:
    """B = A C^{-1} and N = C^{-1} for a square invertible lower-triangular C (triangular solves, no inverse)."""
    n = int(C.shape[0])
    A = prefix_workload(n)
    eye = torch.eye(n, dtype=DTYPE)
    C_inv = torch.linalg.solve_triangular(C, eye, upper=False)
    B = torch.linalg.solve_triangular(C, A, upper=False, left=False)  # X C = A  ->  X = A C^{-1}
    return Strategy(name=name, B=B, C=C, noise=C_inv, bands=bands)


def identity(n: int) -> Strategy:
    """C = I, B = A: independent noise on every step (DP-SGD without amplification); sens 1, RMSE sqrt((n+1)/2)."""
    _check_n(n)
    return Strategy(name="identity", B=prefix_workload(n), C=torch.eye(n, dtype=DTYPE), noise=torch.eye(n, dtype=DTYPE),
                    bands=1)


def _tree_nodes(n: int) -> list[tuple[int, int, int]]:
    """The complete dyadic intervals of [0, n) as (level h, start, end), sorted by completion step (end), then level:
    node [i 2^h, (i+1) 2^h - 1] exists when (i+1) 2^h <= n (what an online tree has materialised by step n - 1)."""
    nodes = []
    h = 0
    while (1 << h) <= n:
        size = 1 << h
        nodes += [(h, i * size, (i + 1) * size - 1) for i in range(n // size)]
        h += 1
    return sorted(nodes, key=lambda node: (node[2], node[0]))


def tree(n: int, efficient: bool = False) -> Strategy:
    """Binary-tree aggregation (Dwork et al. 2010; Chan et al. 2011; DP-FTRL, Kairouz et al. 2021, arXiv 2103.00039).

    C (m x n): one row per complete dyadic interval (node), ``C[v, s] = 1`` for the steps s the node covers (Eq. T1);
    every step lies in ``floor(log2 n) + 1`` nodes, so the single-participation sensitivity is
    ``sqrt(floor(log2 n) + 1) = sqrt(ceil(log2(n + 1)))`` (Eq. T2; dp_accounting's
    ``SingleEpochTreeAggregationDpEvent``: RDP ``alpha * ceil(log2(n + 1)) / (2 sigma^2)``).
    B (n x m), ``efficient=False`` (Kairouz et al.'s tree): prefix sum [0, t] is the sum of the nodes of the binary
    decomposition of t + 1 (at most floor(log2 n) + 1 nodes, all complete by step t) (Eq. T3).
    ``efficient=True``: Honaker's (2015) variance reduction restricted to each node's subtree (causal, the
    "efficient" tree of Kairouz et al. / tensorflow_privacy): node estimate ``e_v = a_h y_v + (1 - a_h)(e_l + e_r)``
    with inverse-variance weight ``a_h = v_h``, ``v_0 = 1``, ``v_h = 2 v_{h-1} / (2 v_{h-1} + 1) = 2^h / (2^{h+1} - 1)``
    (the variance of e_v at unit noise) (Eq. T4); each e_v is unbiased, so B C = A still holds exactly. These are
    tensorflow_privacy ``EfficientTreeAggregator``'s weights (buffer ``u = y + (u_l + u_r) / 2`` read as
    ``u / (2 - 2^{-h})``), checked against its test table in the tests."""
    _check_n(n)
    nodes = _tree_nodes(n)
    index = {(h, s): v for v, (h, s, _) in enumerate(nodes)}
    m = len(nodes)
    C = torch.zeros(m, n, dtype=DTYPE)
    for v, (_, s, e) in enumerate(nodes):
        C[v, s:e + 1] = 1.0  # Eq. T1
    # E: node estimates as linear maps of the noisy node values y (identity for the plain tree)
    E = torch.eye(m, dtype=DTYPE)
    if efficient:
        var = {0: 1.0}
        for v, (h, s, _) in enumerate(nodes):  # children complete before their parent: ascending order is safe
            if h == 0:
                continue
            var.setdefault(h, 2 * var[h - 1] / (2 * var[h - 1] + 1))  # Eq. T4
            a = var[h]
            left, right = index[(h - 1, s)], index[(h - 1, s + (1 << (h - 1)))]
            E[v] = (1 - a) * (E[left] + E[right])
            E[v, v] += a
    D = torch.zeros(n, m, dtype=DTYPE)  # Eq. T3: dyadic decomposition of t + 1
    for t in range(n):
        start, length = 0, t + 1
        for h in range(length.bit_length() - 1, -1, -1):
            if length >> h & 1:
                D[t, index[(h, start)]] = 1.0
                start += 1 << h
    B = D @ E
    return Strategy(name="tree-efficient" if efficient else "tree", B=B, C=C, noise=_difference(B), bands=None)


def tree_restarts(n: int, every: int, efficient: bool = False) -> Strategy:
    """DP-FTRL's tree restarted every ``every`` steps (Kairouz et al. 2021, Sec. 4, "tree restart" per epoch): one
    tree per block of ``every`` steps (the last block may be shorter), C block-diagonal (Eq. TR1); the released prefix
    sum at step t is the sum of the finished blocks' full-block estimates plus the current block's own prefix (Eq. TR2,
    ``B[t] = sum_{blocks e < cur} B_e[last] + B_cur[t]``), so A = B C still holds. Columns of different blocks are
    orthogonal: with one participation per block (fixed-order epochs, every = steps per epoch) the sensitivity is
    exactly ``sqrt(sum_epochs (floor(log2 every) + 1))`` (the fact sheet's restart RDP, alpha sum depth / (2 sigma^2))."""
    _check_n(n)
    if isinstance(every, bool) or not isinstance(every, int) or not 1 <= every:
        raise ValueError(f"`every` must be a positive int, got {every!r}.")
    blocks = [tree(min(every, n - start), efficient) for start in range(0, n, every)]
    m = sum(b.draws for b in blocks)
    C = torch.zeros(m, n, dtype=DTYPE)
    B = torch.zeros(n, m, dtype=DTYPE)
    row = col = 0
    finished = torch.zeros(m, dtype=DTYPE)  # sum of the finished blocks' full-block estimates (Eq. TR2)
    for block in blocks:
        k, r = block.n, block.draws
        C[row:row + r, col:col + k] = block.C  # Eq. TR1
        B[col:col + k] = finished
        B[col:col + k, row:row + r] += block.B
        finished = B[col + k - 1].clone()
        row, col = row + r, col + k
    name = "tree-efficient-restart" if efficient else "tree-restart"
    return Strategy(name=name, B=B, C=C, noise=_difference(B), bands=None)


def bsr_coefficients(p: int) -> torch.Tensor:
    """The first p Toeplitz coefficients of A^{1/2}: the series of (1 - x)^{-1/2}, ``c_k = binom(2k, k) / 4^k``
    (Eq. BSR1), computed as ``c_0 = 1, c_k = c_{k-1} (2k - 1) / (2k)`` (jax_privacy
    ``toeplitz.optimal_max_error_strategy_coefs``, Fichtenberger, Henzinger, Upadhyay 2023)."""
    _check_n(p)
    k = torch.arange(p, dtype=DTYPE)
    ratios = torch.where(k == 0, torch.ones_like(k), (2 * k - 1) / torch.clamp(2 * k, min=1))
    return torch.cumprod(ratios, dim=0)


def _lower_toeplitz(coef: torch.Tensor, n: int) -> torch.Tensor:
    """n x n lower-triangular Toeplitz matrix with first column ``coef`` (zero-padded / truncated to n)."""
    col = torch.zeros(n, dtype=coef.dtype)
    p = min(n, int(coef.shape[0]))
    col[:p] = coef[:p]
    i = torch.arange(n)
    d = i[:, None] - i[None, :]
    return torch.where(d >= 0, col[d.clamp(min=0)], torch.zeros((), dtype=coef.dtype))


def bsr(n: int, bands: int | None = None, normalize: bool = False) -> Strategy:
    """Banded square root (Kalinin & Lampert 2024, arXiv 2405.13763): C = the lower-triangular Toeplitz matrix of
    ``c_0..c_{p-1}`` (Eq. BSR1) with p = ``bands`` (default n, then C = A^{1/2} exactly and B = C) (Eq. BSR2),
    ``B = A C^{-1}``. ``normalize=True`` divides each column by its norm (jax_privacy's column-normalised banded
    Toeplitz; sensitivity 1 per participation)."""
    _check_n(n)
    p = n if bands is None else int(bands)
    if not 1 <= p <= n:
        raise ValueError(f"`bands` must be in [1, n={n}], got {bands!r}.")
    C = _lower_toeplitz(bsr_coefficients(p), n)
    if normalize:
        C = C / torch.linalg.vector_norm(C, dim=0, keepdim=True)
    return _square_strategy("bsr", C, p)


def _banded_from_params(params: torch.Tensor) -> torch.Tensor:
    """jax_privacy ``banded.ColumnNormalizedBanded.materialize``: ``C[j + d, j] = params[j, d]`` for d < b, then
    each column divided by its norm (Eq. OB1: unit columns, so sens = 1 per participation)."""
    n, b = params.shape
    i = torch.arange(n)
    d = i[:, None] - i[None, :]
    inside = (d >= 0) & (d < b)
    C = torch.where(inside, params[i[None, :].expand(n, n), d.clamp(0, b - 1)], torch.zeros((), dtype=params.dtype))
    return C / torch.linalg.vector_norm(C, dim=0, keepdim=True)


def _mean_squared_error(C: torch.Tensor) -> torch.Tensor:
    """``||A C^{-1}||_F^2 / n`` (Eq. OB2, the loss of jax_privacy ``banded.optimize`` with reduction mean), with
    ``A C^{-1}`` by a triangular solve."""
    n = int(C.shape[0])
    B = torch.linalg.solve_triangular(C, prefix_workload(n), upper=False, left=False)
    return (B * B).sum() / n


def optimized_banded(n: int, bands: int, seed: int = 0, max_iter: int = 500, jitter: float = 1e-3) -> Strategy:
    """A b-banded lower-triangular C with unit columns minimising the mean squared prefix error (Eq. OB2)
    ``min_C ||A C^{-1}||_F^2 / n  s.t.  C lower-triangular, C[i, j] = 0 for i - j >= b, ||C[:, j]|| = 1``
    (Choquette-Choo et al. 2023b, Eq. 6 / Sec. 4; parametrised and normalised as jax_privacy ``banded.optimize``).

    Full-batch L-BFGS (torch, float64, strong-Wolfe line search) from the column-normalised BSR of the same bands
    plus a seeded jitter of relative size ``jitter`` (``torch.Generator`` seeded with ``seed``): deterministic for a
    given (n, bands, seed) on one machine. Meant for small horizons (n up to a few hundred: O(n^3) per step).
    Unit columns make the sensitivity ``sqrt(k)`` under k participations with min-separation >= bands (Eq. S2)."""
    _check_n(n)
    if not 1 <= bands <= n:
        raise ValueError(f"`bands` must be in [1, n={n}], got {bands!r}.")
    coef = bsr_coefficients(bands)
    init = coef[None, :].expand(n, bands).clone()
    generator = torch.Generator().manual_seed(int(seed))
    init = init * (1 + jitter * torch.randn(init.shape, generator=generator, dtype=DTYPE))
    params = init.requires_grad_(True)
    optimizer = torch.optim.LBFGS([params], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-12,
                                  tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = _mean_squared_error(_banded_from_params(params))
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        C = _banded_from_params(params.detach())
    # rows of params that fall outside the matrix (j + d >= n) are unused; C is exactly b-banded by construction
    return _square_strategy("optimized_banded", C, bands)


def strategy(name: str, n: int, bands: int | None = None, **kwargs: Any) -> Strategy:
    """A strategy by name: ``identity``, ``tree`` (``efficient=``), ``bsr`` (``bands``, ``normalize=``),
    ``optimized_banded`` (``bands`` required, ``seed=``)."""
    if name == "identity":
        return identity(n)
    if name == "tree":
        return tree(n, **kwargs)
    if name == "tree-restart":
        return tree_restarts(n, **kwargs)
    if name == "bsr":
        return bsr(n, bands, **kwargs)
    if name == "optimized_banded":
        if bands is None:
            raise ValueError("`optimized_banded` needs `bands`.")
        return optimized_banded(n, bands, **kwargs)
    raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {name!r}.")


# ---------------------------------------------------------------------------------------------------- sensitivity
def true_max_participations(n: int, min_sep: int, limit: int | None = None) -> int:
    """k actually possible in n steps with min-separation ``min_sep`` (jax_privacy
    ``minsep_true_max_participations``): ``min(limit, ceil(n / min_sep))``."""
    k = -(-n // min_sep)
    return k if limit is None else min(int(limit), k)


def _vec_sens(x: np.ndarray, min_sep: int, k: int) -> float:
    """``max_pattern sum_{i in pattern} x_i`` over at most k indices pairwise >= min_sep apart: the dynamic program
    of Choquette-Choo et al. 2023b Algorithm 3 (VecSens; jax_privacy ``max_participation_for_linear_fn``)."""
    n = len(x)
    f = np.zeros(n + min_sep)
    for _ in range(k):
        f[:n] = x + f[min_sep:min_sep + n]
        f = np.maximum.accumulate(f[::-1])[::-1]
    return float(f[0])


def sensitivity(C: torch.Tensor, min_sep: int = 1, max_participations: int = 1, epochs: int | None = None) -> float:
    """L2 sensitivity of ``C G`` per unit clip (Eq. S1-S3 in the module docstring), for participation at most
    ``max_participations`` times with any two participations at least ``min_sep`` steps apart (min_sep = 1 allows
    consecutive steps). ``epochs=k`` is (k, b)-participation: n = k b steps, ``min_sep = b = n / k``,
    ``max_participations = k`` (Choquette-Choo et al. 2023; counted here as b-min-separation, which contains it).

    * k = 1: the largest column norm (Eq. S1), exact.
    * columns >= min_sep apart orthogonal (``C^T C`` zero outside ``|i - j| < min_sep``; e.g. C lower-triangular
      with ``bands <= min_sep``): exact, ``sqrt(VecSens(diag C^T C))`` (Eq. S2); ``= sqrt(k) max column norm`` when
      the columns have equal norms (Choquette-Choo et al. 2023).
    * otherwise: ``sqrt(VecSens_i(VecSens(|C^T C|[i, :])))``, Algorithm 4 of Choquette-Choo et al. 2023b
      (Eq. S3), an upper bound for any C (so accounting with it is valid, possibly loose)."""
    C_np = C.detach().to(DTYPE).cpu().numpy()
    n = C_np.shape[1]
    if epochs is not None:
        if epochs < 1 or n % epochs:
            raise ValueError(f"`epochs` must divide n={n}, got {epochs!r}.")
        min_sep, max_participations = n // epochs, epochs
    if min_sep < 1 or max_participations < 1:
        raise ValueError(f"`min_sep` and `max_participations` must be >= 1, got {min_sep!r}, {max_participations!r}.")
    k = true_max_participations(n, min_sep, max_participations)
    X = C_np.T @ C_np
    if k == 1:
        return float(math.sqrt(np.max(np.diag(X))))  # Eq. S1
    i = np.arange(n)
    far = np.abs(i[:, None] - i[None, :]) >= min_sep
    if not np.any(X[far]):  # exact zeros: columns with disjoint supports (banded C)
        return math.sqrt(_vec_sens(np.diag(X), min_sep, k))  # Eq. S2
    absX = np.abs(X)
    rows = np.array([_vec_sens(absX[r], min_sep, k) for r in range(n)])
    return math.sqrt(_vec_sens(rows, min_sep, k))  # Eq. S3


def prefix_rmse(B: torch.Tensor, C: torch.Tensor | None = None, sens: float | None = None) -> float:
    """``sqrt(||B||_F^2 / n) * sens`` (Eq. RMSE): the root of the mean over the n prefix sums of the expected squared
    error at noise std 1 per unit sensitivity. ``sens`` defaults to the single-participation sensitivity of C."""
    if sens is None:
        if C is None:
            raise ValueError("give `C` or `sens`.")
        sens = sensitivity(C)
    n = int(B.shape[0])
    return float(torch.sqrt((B.to(DTYPE) ** 2).sum() / n)) * float(sens)


# ---------------------------------------------------------------------------------------------------- noise
def correlated_noise(noise_matrix: torch.Tensor, step: int, shape: Sequence[int] | torch.Size,
                     seed_fn: Callable[[int], int], std: float = 1.0, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """The noise added to step ``step``'s clipped sum (0-based): ``std * sum_j N[step, j] w_j`` with
    ``N = A^{-1} B`` (= C^{-1} for square C; :attr:`Strategy.noise`) and ``w_j ~ N(0, I_shape)`` drawn by a
    ``torch.Generator`` seeded with ``seed_fn(j)`` (Eq. N). Every draw is regenerated from its seed, so the noise of
    any step is a pure function of (secret seed, public indices): no noise state to save, and exact resume. Only
    the draws with a nonzero coefficient are generated (the tree's rows have O(log n) of them; a banded C's inverse
    is dense: O(step * numel) work). Summed over steps 0..t the noise is ``std * (B W)_t`` exactly."""
    n = int(noise_matrix.shape[0])
    if not 0 <= step < n:
        raise ValueError(f"`step` must be in [0, {n}), got {step!r}.")
    row = noise_matrix[step].detach().to(DTYPE).cpu()
    device = torch.device("cpu") if device is None else torch.device(device)
    out = torch.zeros(tuple(shape), dtype=DTYPE, device=device)
    for j in torch.nonzero(row).flatten().tolist():
        generator = torch.Generator(device=device).manual_seed(int(seed_fn(j)))
        out.add_(torch.randn(tuple(shape), generator=generator, dtype=DTYPE, device=device), alpha=float(row[j]))
    return (out * std).to(dtype)


# ---------------------------------------------------------------------------------------------------- accounting
def gaussian_delta(mu: float, epsilon: float) -> float:
    """delta(epsilon) of the Gaussian mechanism with sensitivity/std ratio mu (Balle & Wang 2018, Thm 8):
    ``Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)`` (Eq. AG), evaluated with log Phi for stability."""
    if mu <= 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    a = float(log_ndtr(-epsilon / mu + mu / 2))
    b = float(epsilon + log_ndtr(-epsilon / mu - mu / 2))
    return max(0.0, math.exp(a) - math.exp(b))


def gaussian_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon >= 0 with ``gaussian_delta(mu, epsilon) <= delta`` (Eq. AG; exact, by root finding)."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"`delta` must be in (0, 1), got {delta!r}.")
    if mu <= 0:
        return 0.0
    if math.isinf(mu):
        return math.inf
    if gaussian_delta(mu, 0.0) <= delta:
        return 0.0
    hi = max(1.0, mu * mu)
    while gaussian_delta(mu, hi) > delta:
        hi *= 2
    return float(brentq(lambda e: gaussian_delta(mu, e) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12))


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sens: float, method: str = "analytic") -> float:
    """The noise multiplier sigma (std / clip of W) whose matrix mechanism of sensitivity ``sens`` spends exactly
    ``target_epsilon`` at ``delta`` (root finding on mu = sens / sigma)."""
    if target_epsilon <= 0:
        raise ValueError(f"`target_epsilon` must be positive, got {target_epsilon!r}.")

    def eps(mu: float) -> float:
        return _epsilon(mu, delta, method)

    lo, hi = 1e-6, 1.0
    while eps(hi) < target_epsilon:
        hi *= 2
    mu = brentq(lambda m: eps(m) - target_epsilon, lo, hi, xtol=1e-14, rtol=1e-12)
    return float(sens / mu)


def _rdp_epsilon(mu: float, delta: float, orders: Sequence[float] = RDP_ORDERS) -> float:
    """opacus' RDP of the Gaussian at q = 1 (``compute_rdp(q=1, noise_multiplier=1/mu, steps=1)``:
    ``alpha mu^2 / 2``), converted by opacus' ``get_privacy_spent`` (Balle et al. 2020, Thm 21)."""
    rdp = opacus_rdp.compute_rdp(q=1.0, noise_multiplier=1.0 / mu, steps=1, orders=list(orders))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps, _ = opacus_rdp.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)


def _epsilon(mu: float, delta: float, method: str) -> float:
    if method == "analytic":
        return gaussian_epsilon(mu, delta)
    if method == "rdp":
        return _rdp_epsilon(mu, delta)
    raise ValueError(f"`method` must be 'analytic' or 'rdp', got {method!r}.")


class MatrixMechanismAccountant(IAccountant):
    """opacus' accountant interface for a matrix mechanism: the whole run is one Gaussian mechanism with
    ``mu = sens / sigma`` (module docstring), whatever the number of steps taken so far (up to ``horizon``, the n
    the strategy and its sensitivity were built for: a prefix of the run is post-processing of the full release,
    so its epsilon is at most the full one; reported as the full one, i.e. conservatively).

    ``history`` keeps opacus' format ``[(noise_multiplier, sample_rate, steps)]`` (the engine's ledger); the
    sample rate is recorded but NOT used (no amplification), and every step must use the same noise multiplier
    (one sigma for the whole correlated release). ``method``: ``"analytic"`` (exact, Balle & Wang 2018) or
    ``"rdp"`` (opacus' RDP at q = 1, a slightly larger epsilon). Zero-out adjacency (module docstring)."""

    def __init__(self, sens: float, horizon: int | None = None, method: str = "analytic") -> None:
        super().__init__()
        if not sens > 0:
            raise ValueError(f"`sens` must be positive, got {sens!r}.")
        if method not in ("analytic", "rdp"):
            raise ValueError(f"`method` must be 'analytic' or 'rdp', got {method!r}.")
        self.sens = float(sens)
        self.horizon = None if horizon is None else int(horizon)
        self.method = method

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        if self.history and self.history[-1][0] == noise_multiplier and self.history[-1][1] == sample_rate:
            s, q, k = self.history[-1]
            self.history[-1] = (s, q, k + 1)
        else:
            self.history.append((float(noise_multiplier), float(sample_rate), 1))

    def noise_multiplier(self) -> float | None:
        """The run's single sigma (None before the first step); mixed sigmas are refused."""
        sigmas = {float(s) for s, _, k in self.history if int(k) > 0}
        if not sigmas:
            return None
        if len(sigmas) > 1:
            raise ValueError(f"a matrix mechanism needs one noise multiplier for the whole run, got {sorted(sigmas)}.")
        return sigmas.pop()

    def mu(self) -> float:
        """Gaussian-DP mu = sens / sigma of the release so far (0 before any step, inf at sigma = 0)."""
        sigma = self.noise_multiplier()
        if sigma is None:
            return 0.0
        if self.horizon is not None and len(self) > self.horizon:
            raise ValueError(f"{len(self)} steps exceed the strategy's horizon n={self.horizon}: its sensitivity "
                             f"does not cover them.")
        return math.inf if sigma == 0 else self.sens / sigma

    def rdp(self, orders: Sequence[float] = RDP_ORDERS) -> np.ndarray:
        """RDP curve ``alpha * sens^2 / (2 sigma^2)`` (Mironov 2017, the Gaussian at q = 1)."""
        mu = self.mu()
        return np.array([a * mu * mu / 2 for a in orders], dtype=float)

    def get_epsilon(self, delta: float, *args: Any, **kwargs: Any) -> float:
        mu = self.mu()
        if mu == 0.0:
            return 0.0
        if math.isinf(mu):
            return math.inf
        return _epsilon(mu, delta, self.method)

    def __len__(self) -> int:
        return sum(int(k) for _, _, k in self.history)

    @classmethod
    def mechanism(cls) -> str:
        return "matrix_factorization"

    def state_dict(self, destination: Any = None) -> Any:
        state = super().state_dict(destination)
        state.update(sens=self.sens, horizon=self.horizon, method=self.method)
        return state

    def load_state_dict(self, state_dict: Any) -> None:
        for key in ("sens", "horizon"):
            if key in state_dict and state_dict[key] != getattr(self, key):
                raise ValueError(f"the accountant state has {key}={state_dict[key]!r}, this accountant "
                                 f"{getattr(self, key)!r}.")
        super().load_state_dict(state_dict)
