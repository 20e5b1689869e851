"""RRSC (Isik et al., NeurIPS 2023), its baselines and its local-DP accountant against independent facts.

Facts used:
* Privacy: the encoder's full output distribution, for a fixed rotation, from the codewords' inner products computed
  here (top-k, e^eps / Z and 1 / Z); every ratio over all pairs of inputs <= e^eps, and the sampler follows it.
* The regular simplex: unit norm, pairwise inner products -1/(M-1), sum zero (also after the rotation).
* For M = 2 and k = 1, sum_{T_1} <a, c_j> = |a_1 - a_2|/sqrt(2) ~ |a_1| for a uniform on S^{d-1}, whose mean is
  Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2)): B in closed form.
* Unbiasedness over many seeds (5 standard errors, per coordinate, from the measured spread); ||x_hat|| = B.
* MSE = (B^2 - 1)/n (fact sheet), within 15 % at d = 100, n = 1000, eps in {2, 4, 6}, bits = eps; B from 2 x 10^4
  Monte Carlo samples instead of the repo's 10^6 (its relative error, ~0.3 %, is far below the tolerance).
* PrivUnitG's closed-form MSE at d = 500, n = 5000 equals the sheet's values.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from opacus.accountants import IAccountant

from plpriv.privacy.rrsc import (
    RRSC,
    SQKR,
    LocalDPAccountant,
    PrivUnitG,
    bias_factors,
    choose_k,
    round_to_sphere,
    rrsc_mse_bound,
    simplex,
)


def unit_rows(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


def sheet_data(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    """Half normalize(N(10, 1)^d), half normalize(N(1, 1)^d) (the repo's main.py)."""
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + torch.tensor([10.0, 1.0]).repeat_interleave(
        torch.tensor([n // 2, n - n // 2])).to(torch.float64).unsqueeze(1)
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("eps,bits", [(0.5, 1), (1.0, 3), (4.0, 4)])
def test_exact_ldp_fixed_rotation(eps: float, bits: int) -> None:
    d, seed = 20, 123
    r = RRSC(d, eps, bits, samples=2000)
    g = torch.Generator().manual_seed(1)
    codebook = r.codebook(seed)
    near = codebook[:2] + 0.01 * unit_rows(2, d, g)  # near codewords (exactly on one, the other ranks tie)
    x = torch.cat([unit_rows(30, d, g), near / near.norm(dim=1, keepdim=True)])
    # The distribution from the definition: top-k inner products get e^eps / Z, the rest 1 / Z.
    ip = x @ codebook.T
    top = torch.argsort(ip, dim=1, descending=True)[:, : r.k]
    Z = r.k * math.exp(eps) + r.M - r.k
    expected = torch.full_like(ip, 1 / Z).scatter_(1, top, math.exp(eps) / Z)
    P = r.probabilities(x, [seed] * len(x))
    torch.testing.assert_close(P, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(P.sum(1), torch.ones(len(x), dtype=P.dtype))
    ratio = (P.unsqueeze(1) / P.unsqueeze(0)).max()  # over all pairs (x, x') and outputs j
    assert float(ratio) <= math.exp(eps) * (1 + 1e-12)
    assert float(ratio) >= math.exp(eps) * (1 - 1e-12)  # tight: some pair attains e^eps


def test_encoder_samples_its_distribution() -> None:
    r = RRSC(16, 1.0, 2, samples=2000)
    g = torch.Generator().manual_seed(2)
    x = unit_rows(1, 16, g)
    n, seed = 4000, 7
    J = r.encode(x.expand(n, -1), [seed] * n, generator=g)
    freq = torch.bincount(J, minlength=r.M).to(torch.float64) / n
    p = r.probabilities(x, [seed])[0]
    assert torch.all((freq - p).abs() <= 5 * torch.sqrt(p * (1 - p) / n))


@pytest.mark.parametrize("M", [2, 8, 32])
def test_simplex_codebook(M: int) -> None:
    c = simplex(M)
    gram = c.T @ c
    expected = torch.full((M, M), -1 / (M - 1), dtype=torch.float64).fill_diagonal_(1.0)
    torch.testing.assert_close(gram, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(c.sum(1), torch.zeros(M, dtype=torch.float64), rtol=0, atol=1e-12)
    if M <= 40:
        r = RRSC(40, 1.0, int(math.log2(M)), samples=1000)
        u = r.codebook(5)  # rotated: same Gram matrix, in R^40
        assert u.shape == (M, 40)
        torch.testing.assert_close(u @ u.T, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(u.sum(0), torch.zeros(40, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("d,eps", [(10, 1.0), (100, 3.0)])
def test_bias_factor_closed_form_m2(d: int, eps: float) -> None:
    mean_abs = math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)  # E|a_1|
    exact = (math.exp(eps) + 1) / ((math.exp(eps) - 1) * mean_abs)
    B = bias_factors(d, 2, eps, samples=200_000, seed=3)
    assert B.shape == (1,)
    assert abs(B[0] / exact - 1) < 0.01
    assert choose_k(d, 2, eps, samples=1000)[0] == 1


def test_choose_k_matches_sheet() -> None:
    # The sheet: at d = 500, eps = 6 the best k is 1 at low bitrates (here 3 bits).
    k, B = choose_k(500, 8, 6.0, samples=20_000)
    assert k == 1 and B == pytest.approx(RRSC(500, 6.0, 3, samples=20_000).B)


@pytest.mark.parametrize("norm", [1.0, 0.6])
def test_unbiased(norm: float) -> None:
    d, n = 16, 20_000
    r = RRSC(d, 1.0, 3, samples=50_000)
    g = torch.Generator().manual_seed(4)
    x = norm * unit_rows(1, d, g)
    xhat = r.decode(r.encode(x.expand(n, -1), range(n), generator=g), range(n))
    torch.testing.assert_close(xhat.norm(dim=1), torch.full((n,), r.B, dtype=torch.float64))
    se = xhat.std(0) / math.sqrt(n)
    assert torch.all((xhat.mean(0) - x[0]).abs() <= 5 * se)


def test_round_to_sphere() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.tensor([[0.3, 0.4, 0.0], [0.0, 0.0, 0.0], [0.6, 0.8, 0.0]], dtype=torch.float64)
    y = round_to_sphere(x.repeat(20_000, 1), g).view(20_000, 3, 3)
    torch.testing.assert_close(y.norm(dim=2), torch.ones(20_000, 3, dtype=torch.float64))
    torch.testing.assert_close(y.mean(0), x, rtol=0, atol=0.03)
    assert torch.equal(y[:, 2], x[2].expand(20_000, -1))  # unit rows are kept
    with pytest.raises(ValueError):
        round_to_sphere(2 * x)


@pytest.mark.parametrize("eps,reps", [(2.0, 20), (4.0, 20), (6.0, 20)])
def test_mse_matches_theory(eps: float, reps: int) -> None:
    d, n = 100, 1000
    r = RRSC(d, eps, int(eps), samples=20_000, dtype=torch.float32)  # float32 rotations: ~2x faster QR
    g = torch.Generator().manual_seed(6)
    errs = []
    for rep in range(reps):
        x = sheet_data(n, d, g)
        est = r.estimate_mean(x.float(), range(rep * n, (rep + 1) * n), generator=g).double()
        errs.append(float(((est - x.mean(0)) ** 2).sum()))
    predicted = (r.B ** 2 - 1) / n
    assert r.mse(n) == pytest.approx(predicted)
    print(f"eps {eps}: measured/predicted MSE {statistics.mean(errs) / predicted:.3f}")
    assert statistics.mean(errs) == pytest.approx(predicted, rel=0.15)


def test_mse_formula_inside_ball() -> None:
    d, n, reps = 32, 500, 20
    r = RRSC(d, 2.0, 3, samples=20_000)
    g = torch.Generator().manual_seed(7)
    errs = []
    for rep in range(reps):
        x = unit_rows(n, d, g) * torch.rand(n, 1, generator=g, dtype=torch.float64)
        est = r.estimate_mean(x, range(rep * n, (rep + 1) * n), generator=g)
        errs.append(float(((est - x.mean(0)) ** 2).sum()) / rrsc_mse_bound(r.B, n, (x ** 2).sum(1)))
    assert statistics.mean(errs) == pytest.approx(1.0, rel=0.15)


def test_rrsc_below_sqkr_at_equal_bits() -> None:
    d, n, eps, bits = 100, 1000, 4.0, 4
    r, s = RRSC(d, eps, bits, samples=20_000), SQKR(d, eps, bits, seed=0)
    assert r.bits_per_user == s.bits_per_user == bits
    g = torch.Generator().manual_seed(8)
    mse_r, mse_s = [], []
    for rep in range(3):
        x = sheet_data(n, d, g)
        seeds = range(rep * n, (rep + 1) * n)
        mse_r.append(float(((r.estimate_mean(x, seeds, g) - x.mean(0)) ** 2).sum()))
        mse_s.append(float(((s.estimate_mean(x, seeds, g) - x.mean(0)) ** 2).sum()))
    assert statistics.mean(mse_r) < 0.5 * statistics.mean(mse_s)


def test_sqkr_sends_bits_and_is_unbiased() -> None:
    d, n = 8, 20_000
    s = SQKR(d, 2.0, 2, seed=1)
    U = s.frame
    torch.testing.assert_close(U.T @ U, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-12)
    g = torch.Generator().manual_seed(9)
    x = 0.8 * unit_rows(1, d, g)
    a = s.kashin(x)
    torch.testing.assert_close(a @ U, x, rtol=0, atol=1e-12)  # U^T a = x
    bits = s.encode(x.expand(n, -1), range(n), g)
    assert bits.dtype == torch.bool and bits.shape == (n, 2)
    xhat = s.decode(bits, range(n))
    assert torch.all((xhat.mean(0) - x[0]).abs() <= 5 * xhat.std(0) / math.sqrt(n))


def test_privunitg() -> None:
    sheet = [0.633, 0.162, 0.0743, 0.0435, 0.0292, 0.0213, 0.0165, 0.0133]  # closed form, d = 500, n = 5000
    got = [PrivUnitG(500, eps).mse(5000) for eps in range(1, 9)]
    np.testing.assert_allclose(got, sheet, rtol=0.01)
    p = PrivUnitG(50, 2.0)
    assert p.p * (1 - (q := 1 - float(torch.special.ndtr(torch.tensor(p.gamma))))) / (q * (1 - p.p)) == \
        pytest.approx(math.exp(2.0))
    g = torch.Generator().manual_seed(10)
    errs = []
    for _ in range(20):
        x = unit_rows(200, 50, g)
        errs.append(float(((p.estimate_mean(x, g) - x.mean(0)) ** 2).sum()))
    assert statistics.mean(errs) == pytest.approx(p.mse(200), rel=0.15)


def test_local_dp_accountant() -> None:
    acc = LocalDPAccountant(2.0)
    assert isinstance(acc, IAccountant) and acc.mechanism() == "rrsc"
    assert len(acc) == 0 and acc.get_epsilon(delta=1e-5) == 0.0
    for _ in range(3):
        acc.step(noise_multiplier=0.0, sample_rate=0.1)
    acc.step(noise_multiplier=0.0, sample_rate=0.2)
    assert len(acc) == 4 and acc.history == [(0.0, 0.1, 3), (0.0, 0.2, 1)]
    assert acc.get_epsilon(delta=1e-5) == pytest.approx(8.0)  # basic composition: 4 participations x 2
    fresh = LocalDPAccountant(2.0)
    fresh.load_state_dict(acc.state_dict())
    assert fresh.get_epsilon(0.0) == pytest.approx(8.0)
    fresh.history = [(0.0, 1.0, 5)]  # what Mechanism.epsilon writes
    assert fresh.get_epsilon(1e-6) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        LocalDPAccountant(0.0)


def test_rrsc_api_checks() -> None:
    with pytest.raises(ValueError):
        RRSC(10, 1.0, 4)  # M = 16 > d
    r = RRSC(10, 1.0, 2, k=2, samples=1000)
    assert r.k == 2 and r.bits_per_user == 2
    with pytest.raises(ValueError):
        r.encode(torch.zeros(3, 10), [0, 1])
    with pytest.raises(ValueError):
        r.decode(torch.tensor([0, 4]), [0, 1])
    J = r.encode(torch.eye(10)[:2].to(torch.float64), torch.tensor([3, 4]), torch.Generator().manual_seed(0))
    assert J.shape == (2,) and J.dtype == torch.long
