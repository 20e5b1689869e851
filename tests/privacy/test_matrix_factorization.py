"""Matrix-factorization (DP-FTRL) strategies, sensitivity, noise and accountant against independent facts.

Facts used:
* A = B C is an identity of matrices; the noise matrix N = A^{-1} B is a causal left inverse of C (N C = I).
* BSR: c_k = binom(2k, k) / 4^k exactly (math.comb), and the full BSR is a square root: C C = A.
* Tree: every step lies in floor(log2 n) + 1 = ceil(log2(n + 1)) complete dyadic intervals (dp_accounting's
  ``SingleEpochTreeAggregationDpEvent`` depth); its RDP is alpha * depth / (2 sigma^2) and dp_accounting's RDP
  accountant (REPLACE_SPECIAL) gives the same epsilon at the same orders.
* Efficient tree: tensorflow_privacy's ``EfficientTreeAggregator`` test table (cumulative sums of constant node
  values 1, and the variance of the cumulative noise at unit node noise).
* Closed-form RMSEs: identity sqrt((n + 1) / 2); tree sqrt(mean popcount(t + 1) * (floor(log2 n) + 1)).
* The optimised banded strategy solves the same problem as google-research's primal optimiser over X = C^T C
  (diag X = 1, X banded; ported here in 20 lines), which must reach the same optimum.
* Sensitivity: brute force over all participation patterns of small n.
* Noise: empirical covariance over many seeds against N N^T, tolerance from the measured spread.
* Epsilon: dp_accounting's analytic Gaussian (``get_epsilon_gaussian``) and PLD accountant; k participations of a
  unit-column banded strategy = the k-fold composition of a Gaussian (dp_accounting PLD of SelfComposedDpEvent).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import dp_accounting
import pytest
import torch
from dp_accounting import pld, rdp
from opacus.accountants import IAccountant

from plpriv.privacy.matrix_factorization import (
    RDP_ORDERS,
    MatrixMechanismAccountant,
    Strategy,
    bsr,
    bsr_coefficients,
    calibrate_noise_multiplier,
    correlated_noise,
    gaussian_epsilon,
    identity,
    optimized_banded,
    prefix_rmse,
    prefix_workload,
    sensitivity,
    strategy,
    tree,
)
from plpriv.utils.seeding import derive_seed

F64 = torch.float64


def _strategies(n: int) -> list[Strategy]:
    out = [identity(n), tree(n), tree(n, efficient=True), bsr(n), bsr(n, min(n, 3)), bsr(n, min(n, 3), normalize=True)]
    return out + [optimized_banded(n, min(n, 4), max_iter=200)]


# ------------------------------------------------------------------------------------------------ factorizations
@pytest.mark.parametrize("n", [1, 5, 16])
def test_every_strategy_factorizes_the_prefix_workload(n: int) -> None:
    A = prefix_workload(n)
    for s in _strategies(n):
        assert torch.allclose(s.B @ s.C, A, atol=1e-10, rtol=0), s.name
        assert torch.allclose(s.noise @ s.C, torch.eye(n, dtype=F64), atol=1e-10, rtol=0), s.name  # N C = I
        assert torch.allclose(A @ s.noise, s.B, atol=1e-10, rtol=0), s.name  # prefix sums of the noise: B W
        if s.C.shape[0] == n:  # square: lower-triangular C and N = C^{-1}
            assert torch.equal(s.C, torch.tril(s.C)), s.name
            assert torch.allclose(s.noise, torch.linalg.inv(s.C), atol=1e-10), s.name
        if s.bands is not None:  # C is exactly zero below its band
            i = torch.arange(n)
            assert not s.C[(i[:, None] - i[None, :]) >= s.bands].any(), s.name
        # causality: step t's noise only uses draws first used at or before t
        first = s.first_use()
        for t in range(n):
            assert all(first[j] <= t for j in torch.nonzero(s.noise[t]).flatten().tolist()), s.name


def test_bsr_coefficients_and_square_root() -> None:
    c = bsr_coefficients(40)
    exact = torch.tensor([math.comb(2 * k, k) / 4**k for k in range(40)], dtype=F64)
    assert torch.allclose(c, exact, rtol=1e-13, atol=0)
    s = bsr(40)
    assert torch.allclose(s.C @ s.C, prefix_workload(40), atol=1e-12)  # C = A^{1/2}
    assert torch.allclose(s.B, s.C, atol=1e-12)  # so B = A C^{-1} = C


def test_strategy_factory() -> None:
    assert strategy("identity", 4).name == "identity"
    assert strategy("tree", 4, efficient=True).name == "tree-efficient"
    assert strategy("bsr", 8, bands=2).bands == 2
    assert strategy("optimized_banded", 8, bands=2).bands == 2
    with pytest.raises(ValueError):
        strategy("optimized_banded", 8)
    with pytest.raises(ValueError):
        strategy("nope", 8)
    with pytest.raises(ValueError):
        bsr(8, 9)


# ------------------------------------------------------------------------------------------------ tree
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 100])
def test_tree_sensitivity_is_its_depth(n: int) -> None:
    depth = math.floor(math.log2(n)) + 1
    assert depth == math.ceil(math.log2(n + 1))  # dp_accounting's max_depth for SingleEpochTreeAggregationDpEvent
    for efficient in (False, True):
        assert sensitivity(tree(n, efficient).C) ** 2 == pytest.approx(depth, abs=1e-12)


@pytest.mark.parametrize("n,sigma", [(16, 0.8), (64, 2.0), (100, 5.0)])
def test_tree_accountant_equals_closed_form_and_dp_accounting(n: int, sigma: float) -> None:
    depth = math.ceil(math.log2(n + 1))
    acc = MatrixMechanismAccountant(sensitivity(tree(n).C), horizon=n, method="rdp")
    for _ in range(n):
        acc.step(noise_multiplier=sigma, sample_rate=0.1)
    closed = torch.tensor([a * depth / (2 * sigma**2) for a in RDP_ORDERS], dtype=F64)
    assert torch.allclose(torch.tensor(acc.rdp(), dtype=F64), closed, rtol=1e-12, atol=0)
    ref = rdp.RdpAccountant(orders=list(RDP_ORDERS),
                            neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    ref.compose(dp_accounting.SingleEpochTreeAggregationDpEvent(noise_multiplier=sigma, step_counts=n))
    for delta in (1e-5, 1e-8):
        assert acc.get_epsilon(delta) == pytest.approx(ref.get_epsilon(delta), rel=1e-9)


def test_efficient_tree_matches_tensorflow_privacy_table() -> None:
    # tensorflow_privacy tree_aggregation_test.EfficientTreeAggregatorTest: constant node value 1 (last cumulative
    # sum after `total` steps), and the variance of the cumulative noise at unit node noise.
    s = tree(8, efficient=True)
    sums = s.B.sum(dim=1)  # every node value 1
    expected = [1, 4 / 3, 4 / 3 + 1, 12 / 7, 12 / 7 + 1, 12 / 7 + 4 / 3, 12 / 7 + 4 / 3 + 1, 32 / 15]
    assert torch.allclose(sums, torch.tensor(expected, dtype=F64), rtol=1e-12)
    variances = (s.B**2).sum(dim=1)
    assert variances[3].item() == pytest.approx(4 / 7, rel=1e-12)
    assert variances[6].item() == pytest.approx(4 / 7 + 2 / 3 + 1, rel=1e-12)
    assert variances[7].item() == pytest.approx(8 / 15, rel=1e-12)
    assert bool(((s.B**2).sum(dim=1) <= (tree(8).B**2).sum(dim=1) + 1e-12).all())  # never worse than the plain tree


# ------------------------------------------------------------------------------------------------ error
@pytest.fixture(scope="module")
def rmse_table() -> dict[str, float]:
    n = 64
    table = {"identity": identity(n).rmse(), "tree": tree(n).rmse(), "tree-efficient": tree(n, efficient=True).rmse(),
             "bsr": bsr(n).rmse(), "optimized_banded(64)": optimized_banded(n, 64).rmse()}
    for b in (4, 16):
        table[f"bsr({b})"] = bsr(n, b).rmse()
        table[f"optimized_banded({b})"] = optimized_banded(n, b).rmse()
    return table


def test_rmse_closed_forms(rmse_table: dict[str, float]) -> None:
    n = 64
    assert rmse_table["identity"] == pytest.approx(math.sqrt((n + 1) / 2), rel=1e-12)
    mean_popcount = sum(bin(t + 1).count("1") for t in range(n)) / n
    assert rmse_table["tree"] == pytest.approx(math.sqrt(mean_popcount * (math.log2(n) + 1)), rel=1e-12)


def test_rmse_ordering_at_n64(rmse_table: dict[str, float]) -> None:
    """Optimised banded <= BSR < tree < identity at unit sensitivity, single participation (the MF papers' order)."""
    t = rmse_table
    print("\nprefix RMSE at unit sensitivity, n = 64:\n" + "\n".join(f"  {k:22s} {v:.4f}" for k, v in t.items()))
    assert t["optimized_banded(64)"] <= t["bsr"] < t["tree-efficient"] < t["tree"] < t["identity"]
    for b in (4, 16):
        assert t[f"optimized_banded({b})"] <= t[f"bsr({b})"]
    assert t["bsr(4)"] < t["tree"]


def _primal_optimum(n: int, bands: int) -> tuple[float, torch.Tensor]:
    """google-research/federated multi_epoch_dp_matrix_factorization primal_optimization (as ported by pfl):
    L-BFGS over X = C^T C for tr(A X^{-1} A^T), diag(X) fixed at 1, X masked to |i - j| < bands."""
    A = prefix_workload(n)
    i = torch.arange(n)
    mask = ((i[:, None] - i[None, :]).abs() < bands).to(F64)

    def loss_grad(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        H = torch.cholesky_solve(A.T, torch.linalg.cholesky(X))
        g = -H @ H.T
        g.fill_diagonal_(0)
        return torch.trace(H @ A), g * mask

    X = torch.eye(n, dtype=F64)
    loss, dX = loss_grad(X)
    X1, dX1, loss1, Z = X, dX, loss, dX
    for _ in range(2000):
        step = 1.0
        for _ in range(30):
            X = X1 - step * Z
            try:
                loss, dX = loss_grad(X)
            except RuntimeError:  # not positive definite
                step *= 0.25
                continue
            if loss < loss1:
                loss1 = loss
                break
        if dX.abs().max() <= 1e-10:
            break
        S, Y = X - X1, dX - dX1
        rho = 1 / (Y * S).sum()
        alpha = rho * (S * dX).sum()
        Z = (S * Y).sum() / (Y**2).sum() * (dX - alpha * Y)
        Z = Z + S * (alpha - rho * (Y * Z).sum())
        X1, dX1 = X, dX
    return math.sqrt(float(loss1) / n), X


def test_optimized_banded_reaches_the_primal_optimum() -> None:
    n, b = 16, 4
    rmse, X = _primal_optimum(n, b)
    s = optimized_banded(n, b)
    assert s.rmse() == pytest.approx(rmse, rel=1e-9)
    assert torch.allclose(s.C.T @ s.C, X, atol=1e-6)
    assert torch.allclose(torch.linalg.vector_norm(s.C, dim=0), torch.ones(n, dtype=F64), atol=1e-12)


def test_optimized_banded_is_deterministic_and_seed_robust() -> None:
    a, b = optimized_banded(16, 4, seed=3), optimized_banded(16, 4, seed=3)
    assert torch.equal(a.C, b.C)
    assert optimized_banded(16, 4, seed=4).rmse() == pytest.approx(a.rmse(), rel=1e-9)


def test_prefix_rmse_scales_with_sensitivity() -> None:
    s = bsr(16, 4, normalize=True)
    assert prefix_rmse(s.B, s.C) == pytest.approx(s.rmse())
    assert prefix_rmse(s.B, sens=2.0) == pytest.approx(2 * s.rmse())
    with pytest.raises(ValueError):
        prefix_rmse(s.B)


# ------------------------------------------------------------------------------------------------ sensitivity
def _patterns(n: int, min_sep: int, k: int) -> list[tuple[int, ...]]:
    out = []
    for size in range(1, k + 1):
        out += [p for p in itertools.combinations(range(n), size) if all(b - a >= min_sep for a, b in zip(p, p[1:]))]
    return out


def _brute_force(C: torch.Tensor, min_sep: int, k: int) -> tuple[float, float]:
    """(max over patterns of sum_{i in p} X_ii, max over patterns of sum_{i, j in p} |X_ij|), X = C^T C: the exact
    squared sensitivity when far columns are orthogonal, resp. when X >= 0 (worst case: aligned contributions)."""
    X = C.T @ C
    diag = max(float(sum(X[i, i] for i in p)) for p in _patterns(C.shape[1], min_sep, k))
    full = max(float(X[list(p)][:, list(p)].abs().sum()) for p in _patterns(C.shape[1], min_sep, k))
    return diag, full


@pytest.mark.parametrize("min_sep,k", [(2, 2), (3, 3), (4, 2), (4, 4), (6, 2)])
def test_sensitivity_banded_is_exact_and_sqrt_k(min_sep: int, k: int) -> None:
    n = 12
    for s in (optimized_banded(n, min(min_sep, 4), max_iter=100), bsr(n, min_sep, normalize=True), bsr(n, min_sep)):
        diag, full = _brute_force(s.C, min_sep, k)
        assert sensitivity(s.C, min_sep=min_sep, max_participations=k) ** 2 == pytest.approx(diag, rel=1e-12)
        assert diag == pytest.approx(full, rel=1e-12)  # far columns orthogonal: only the diagonal counts
    # unit columns: sqrt(k') with k' = min(k, ceil(n / min_sep)) (Choquette-Choo et al. 2023)
    unit = bsr(n, min_sep, normalize=True)
    assert sensitivity(unit.C, min_sep=min_sep, max_participations=k) == pytest.approx(
        math.sqrt(min(k, -(-n // min_sep))), rel=1e-12)


@pytest.mark.parametrize("min_sep,k", [(1, 2), (2, 3), (4, 2), (3, 4)])
def test_sensitivity_bound_for_non_banded(min_sep: int, k: int) -> None:
    n = 12
    for C in (tree(n).C, bsr(n).C, bsr(n, 6).C):  # nonnegative C: brute force "full" is the exact value
        _, exact = _brute_force(C, min_sep, k)
        bound = sensitivity(C, min_sep=min_sep, max_participations=k) ** 2
        assert bound >= exact - 1e-9
        assert bound <= k * k * float((C.T @ C).diagonal().max()) + 1e-9  # never worse than the triangle inequality


def test_sensitivity_epochs_is_k_b_participation() -> None:
    s = optimized_banded(16, 4, max_iter=100)
    assert s.sensitivity(epochs=4) == pytest.approx(2.0, rel=1e-12)  # b = 4 = bands, k = 4
    assert s.sensitivity(min_sep=4, max_participations=4) == pytest.approx(2.0, rel=1e-12)
    assert s.sensitivity() == pytest.approx(1.0, rel=1e-12)
    with pytest.raises(ValueError):
        sensitivity(s.C, epochs=3)


# ------------------------------------------------------------------------------------------------ noise
def _seeds(run: int) -> Callable[[int], int]:
    return lambda j: derive_seed(12345, "mf-noise", run, j)


@pytest.mark.parametrize("make", [lambda: bsr(8, 3), lambda: tree(8), lambda: optimized_banded(8, 4, max_iter=100)])
def test_noise_has_the_covariance_of_the_noise_matrix(make: Callable[[], Strategy]) -> None:
    s = make()
    n, runs, dim, std = s.n, 40, 500, 1.5
    x = torch.stack([torch.stack([correlated_noise(s.noise, t, (dim,), _seeds(r), std=std, dtype=F64)
                                  for t in range(n)]) for r in range(runs)])  # runs x n x dim
    samples = x.permute(1, 0, 2).reshape(n, -1)  # n x (runs * dim) independent draws of the n-vector
    m = samples.shape[1]
    products = samples[:, None, :] * samples[None, :, :]  # n x n x m
    emp = products.mean(dim=2)
    se = products.std(dim=2) / math.sqrt(m)  # spread of each entry's estimate, measured
    true = std**2 * (s.noise @ s.noise.T)  # N N^T (C^{-1} C^{-T} for square C)
    assert bool(((emp - true).abs() <= 5 * se + 1e-12).all()), (emp - true).abs().max()
    row_std = std * torch.linalg.vector_norm(s.noise, dim=1)
    assert bool((samples.mean(dim=1).abs() < 5 * row_std / math.sqrt(m)).all())


def test_noise_prefix_sums_are_B_W() -> None:
    s = tree(8, efficient=True)
    seed_fn, dim = _seeds(0), 7
    W = torch.stack([torch.randn(dim, generator=torch.Generator().manual_seed(seed_fn(j)), dtype=F64)
                     for j in range(s.draws)])
    noise = torch.stack([correlated_noise(s.noise, t, (dim,), seed_fn, dtype=F64) for t in range(s.n)])
    assert torch.allclose(noise.cumsum(dim=0), s.B @ W, atol=1e-12)
    assert torch.allclose(noise, s.noise @ W, atol=1e-12)


def test_noise_is_a_pure_function_of_seed_and_step() -> None:
    s = bsr(10, 4)
    calls: list[int] = []

    def recording(j: int) -> int:
        calls.append(j)
        return derive_seed(7, "mf", j)

    forward = [correlated_noise(s.noise, t, (3, 2), recording) for t in range(10)]
    backward = [correlated_noise(s.noise, t, (3, 2), recording) for t in reversed(range(10))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward))  # any order (resume): same noise
    assert forward[0].dtype == torch.float32 and forward[0].shape == (3, 2)
    other = correlated_noise(s.noise, 5, (3, 2), lambda j: derive_seed(8, "mf", j))
    assert not torch.equal(other, forward[5])
    calls.clear()
    correlated_noise(s.noise, 4, (3, 2), recording)
    assert sorted(calls) == list(range(5))  # step t regenerates w_0..w_t only
    calls.clear()
    correlated_noise(tree(16).noise, 10, (2,), recording)
    assert len(calls) <= 2 * 5  # the tree's rows are sparse: O(log n) draws
    with pytest.raises(ValueError):
        correlated_noise(s.noise, 10, (2,), recording)


# ------------------------------------------------------------------------------------------------ accountant
@pytest.mark.parametrize("sigma,sens", [(0.7, 1.0), (1.0, math.sqrt(7)), (3.0, 2.0), (10.0, 1.0)])
def test_epsilon_is_the_gaussian_mechanisms(sigma: float, sens: float) -> None:
    acc = MatrixMechanismAccountant(sens)
    for _ in range(5):
        acc.step(noise_multiplier=sigma, sample_rate=0.5)
    for delta in (1e-5, 1e-7):
        eps = acc.get_epsilon(delta)
        assert eps == pytest.approx(dp_accounting.get_epsilon_gaussian(sigma / sens, delta), rel=1e-8)
        ref = pld.PLDAccountant(value_discretization_interval=1e-4)
        ref.compose(dp_accounting.GaussianDpEvent(noise_multiplier=sigma / sens))
        assert eps <= ref.get_epsilon(delta) + 1e-9  # PLD is a pessimistic discretisation of the same mechanism
        assert eps == pytest.approx(ref.get_epsilon(delta), rel=2e-3)
        rdp_acc = MatrixMechanismAccountant(sens, method="rdp")
        rdp_acc.history = list(acc.history)
        assert rdp_acc.get_epsilon(delta) >= eps  # RDP conversion is an upper bound


@pytest.mark.parametrize("k,sigma", [(4, 2.0), (9, 5.0)])
def test_k_participations_are_a_k_fold_gaussian_composition(k: int, sigma: float) -> None:
    """Banded, unit columns, min-separation >= bands: sens sqrt(k) == composing the Gaussian(sigma) k times."""
    n, bands = 4 * k, 4
    s = bsr(n, bands, normalize=True)
    acc = MatrixMechanismAccountant(s.sensitivity(min_sep=bands, max_participations=k), horizon=n)
    acc.history = [(sigma, 1.0, n)]
    ref = pld.PLDAccountant(value_discretization_interval=1e-4)
    ref.compose(dp_accounting.GaussianDpEvent(noise_multiplier=sigma), count=k)
    assert acc.get_epsilon(1e-6) == pytest.approx(ref.get_epsilon(1e-6), rel=3e-3)


def test_accountant_interface() -> None:
    acc = MatrixMechanismAccountant(2.0, horizon=4)
    assert isinstance(acc, IAccountant) and acc.mechanism() == "matrix_factorization"
    assert acc.get_epsilon(1e-5) == 0.0 and len(acc) == 0
    acc.step(noise_multiplier=3.0, sample_rate=0.1)
    acc.step(noise_multiplier=3.0, sample_rate=0.1)
    assert acc.history == [(3.0, 0.1, 2)] and len(acc) == 2
    eps = acc.get_epsilon(1e-5)
    assert eps == pytest.approx(gaussian_epsilon(2.0 / 3.0, 1e-5))
    acc.step(noise_multiplier=3.0, sample_rate=1.0)  # the sample rate is not used (no amplification)
    assert acc.get_epsilon(1e-5) == eps
    state = acc.state_dict()
    other = MatrixMechanismAccountant(2.0, horizon=4)
    other.load_state_dict(state)
    assert other.history == acc.history and other.get_epsilon(1e-5) == eps
    with pytest.raises(ValueError):
        MatrixMechanismAccountant(1.0, horizon=4).load_state_dict(state)
    acc.step(noise_multiplier=3.0, sample_rate=1.0)
    acc.step(noise_multiplier=3.0, sample_rate=1.0)  # 5 > horizon 4
    with pytest.raises(ValueError):
        acc.get_epsilon(1e-5)
    mixed = MatrixMechanismAccountant(1.0)
    mixed.history = [(1.0, 0.1, 2), (2.0, 0.1, 1)]
    with pytest.raises(ValueError):
        mixed.get_epsilon(1e-5)
    zero = MatrixMechanismAccountant(1.0)
    zero.history = [(0.0, 0.1, 1)]
    assert zero.get_epsilon(1e-5) == math.inf
    with pytest.raises(ValueError):
        MatrixMechanismAccountant(1.0, method="prv")


@pytest.mark.parametrize("method", ["analytic", "rdp"])
def test_calibration_round_trip(method: str) -> None:
    sens = math.sqrt(7)
    sigma = calibrate_noise_multiplier(2.0, 1e-6, sens, method=method)
    acc = MatrixMechanismAccountant(sens, method=method)
    acc.history = [(sigma, 1.0, 64)]
    assert acc.get_epsilon(1e-6) == pytest.approx(2.0, rel=1e-6)
    if method == "analytic":
        assert sigma / sens == pytest.approx(dp_accounting.get_sigma_gaussian(2.0, 1e-6), rel=1e-6)


@pytest.mark.parametrize("n,every", [(12, 4), (10, 4), (46, 23)])
def test_tree_restarts_factorize_and_cost_the_sum_of_depths(n: int, every: int) -> None:
    """Kairouz et al.'s restart: A = B C exactly; one participation per block costs sum_blocks (floor(log2 size) + 1)
    (the fact sheet's closed form RDP alpha sum depth / (2 sigma^2))."""
    from plpriv.privacy.matrix_factorization import tree_restarts

    for efficient in (False, True):
        s = tree_restarts(n, every, efficient)
        torch.testing.assert_close(s.B @ s.C, prefix_workload(n), atol=1e-10, rtol=0)
        sizes = [min(every, n - start) for start in range(0, n, every)]
        depth = sum(math.floor(math.log2(k)) + 1 for k in sizes)
        assert sensitivity(s.C, min_sep=every, max_participations=len(sizes)) ** 2 == pytest.approx(depth, abs=1e-9)
        acc = MatrixMechanismAccountant(math.sqrt(depth), horizon=n)
        acc.history = [(2.0, 1.0, n)]
        assert acc.rdp([3.0])[0] == pytest.approx(3.0 * depth / (2 * 2.0 ** 2))
