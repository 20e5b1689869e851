"""NoisyMeanMechanism (DPAgg-TI's one-shot noisy mean): accountant against independent facts (closed forms, brute
force over small data sets, dp-accounting's DpEvent accountants, opacus' PRV), calibration, the release's moments
and sensitivity, what add/remove keeps private, refusals, and an empirical audit."""

from __future__ import annotations

import itertools
import math
import re
import warnings

import numpy as np
import pytest
import torch
from dp_accounting import NeighboringRelation, dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import optimize, stats
from scipy.special import logsumexp

from plpriv.privacy.accounting import epsilon as prv_epsilon
from plpriv.privacy.noisy_mean import NoisyMeanMechanism, calibrate_noisy_mean, noisy_mean_epsilon
from plpriv.privacy.noisy_mean_audit import audit_noisy_mean

DELTA = 1e-5


# --- independent closed forms ---------------------------------------------------------------------------------------
def gaussian_delta(eps: float, shift: float, sigma: float) -> float:
    """Privacy profile of N(0, s^2) vs N(shift, s^2) (Balle & Wang 2018, Thm 8), any real eps."""
    a, b = shift / (2 * sigma), eps * sigma / shift
    return float(stats.norm.cdf(a - b) - math.exp(eps) * stats.norm.cdf(-a - b))


def wor_replace_one_delta(eps: float, z: float, q: float) -> float:
    """Balle, Barthe, Gaboardi 2018 Thm 10 on the Gaussian at shift 2: q delta_G(eps0), e^eps = 1 + q (e^eps0 - 1)."""
    return q * gaussian_delta(math.log1p(math.expm1(eps) / q), 2.0, z)


def poisson_add_remove_delta(eps: float, z: float, q: float) -> float:
    """Both orders of ((1-q) P + q Q, P), shift 1: remove = q H_{(a-1+q)/q}(Q||P), add = x H_{aq/x}(P||Q),
    x = 1 - a (1 - q), a = e^eps (the hockey-stick divergence is linear in the mixture)."""
    remove = q * gaussian_delta(math.log1p(math.expm1(eps) / q), 1.0, z)
    x = 1.0 - math.exp(eps) * (1.0 - q)
    add = x * gaussian_delta(eps + math.log(q) - math.log(x), 1.0, z) if x > 0 else 0.0
    return max(remove, add)


def epsilon_of(profile, delta: float = DELTA) -> float:
    if profile(0.0) <= delta:
        return 0.0
    hi = 1.0
    while profile(hi) > delta:
        hi *= 2
    return float(optimize.brentq(lambda e: profile(e) - delta, 0.0, hi, xtol=1e-12))


def hockey_stick_1d(log_p: np.ndarray, log_r: np.ndarray, x: np.ndarray, eps: float) -> float:
    """max over both orders of int (p - e^eps r)_+ on the grid x (trapezoid)."""
    p, r = np.exp(log_p), np.exp(log_r)
    return max(float(np.trapezoid(np.maximum(p - math.exp(eps) * r, 0), x)),
               float(np.trapezoid(np.maximum(r - math.exp(eps) * p, 0), x)))


# --- accountant -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("z,q", [(0.8, 0.5), (2.0, 0.5), (5.0, 0.1), (3.0, 1.0), (1.5, 0.9)])
def test_replace_one_fixed_size_matches_bbg_closed_form_and_is_below_rdp(z: float, q: float) -> None:
    ours = noisy_mean_epsilon(z, DELTA, q, "replace_one", "fixed")
    exact = epsilon_of(lambda e: wor_replace_one_delta(e, z, q))
    assert exact - 1e-9 <= ours <= exact * (1 + 3e-3) + 1e-4  # pessimistic PLD: slightly above, never below
    # dp-accounting's RDP bound for sampling without replacement (Wang, Balle, Kasiviswanathan 2019), noise
    # multiplier relative to the replace-one sensitivity 2C: a valid but looser bound.
    acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    n = 1000
    acc.compose(dp_event.SampledWithoutReplacementDpEvent(n, round(q * n), dp_event.GaussianDpEvent(z / 2)))
    assert ours <= acc.get_epsilon(DELTA) + 1e-9


@pytest.mark.parametrize("z,q", [(1.0, 0.5), (2.0, 0.1), (0.8, 1.0), (3.0, 0.3)])
def test_add_remove_poisson_matches_dp_accounting_closed_form_and_prv(z: float, q: float) -> None:
    ours = noisy_mean_epsilon(z, DELTA, q, "add_remove", "poisson")
    acc = pld_privacy_accountant.PLDAccountant(NeighboringRelation.ADD_OR_REMOVE_ONE)
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)))
    reference = acc.get_epsilon(DELTA)  # default 1e-4 grid, DpEvent path
    assert abs(ours - reference) <= 2e-3 * reference + 2e-4
    exact = epsilon_of(lambda e: poisson_add_remove_delta(e, z, q))
    assert exact - 1e-9 <= ours <= exact * (1 + 3e-3) + 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prv = prv_epsilon([(z, q, 1)], DELTA, "prv")  # plpriv's DP-SGD accountant (opacus PRV, an upper estimate)
    assert ours - 1e-3 <= prv <= ours + 0.03


@pytest.mark.parametrize("z,q", [(1.0, 0.5), (2.5, 0.2)])
def test_replace_one_poisson_matches_dp_accounting_and_numerical_integration(z: float, q: float) -> None:
    ours = noisy_mean_epsilon(z, DELTA, q, "replace_one", "poisson")
    acc = pld_privacy_accountant.PLDAccountant(NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)))
    assert abs(ours - acc.get_epsilon(DELTA)) <= 2e-3 * ours + 2e-4
    # the pair ((1-q) N(0) + q N(1), (1-q) N(0) + q N(-1)), std z, integrated on a grid: delta at our epsilon
    x = np.linspace(-1 - 14 * z, 1 + 14 * z, 400_001)
    log_mix = lambda c: logsumexp([np.log1p(-q) + stats.norm.logpdf(x, 0, z), np.log(q) + stats.norm.logpdf(x, c, z)],
                                  axis=0)  # noqa: E731
    assert 0.9 * DELTA <= hockey_stick_1d(log_mix(1.0), log_mix(-1.0), x, ours) <= DELTA * 1.001


@pytest.mark.parametrize("adjacency,shift", [("replace_one", 2.0), ("add_remove", 1.0)])
def test_no_subsampling_is_the_analytic_gaussian_mechanism(adjacency: str, shift: float) -> None:
    for z in (0.7, 2.0, 6.0):
        exact = epsilon_of(lambda e: gaussian_delta(e, shift, z))  # Balle & Wang 2018
        ours = noisy_mean_epsilon(z, DELTA, 1.0, adjacency, "none" if adjacency == "add_remove" else "fixed")
        assert exact - 1e-9 <= ours <= exact * (1 + 3e-3) + 1e-4
        assert ours == pytest.approx(noisy_mean_epsilon(z, DELTA, 1.0, adjacency, "none"), abs=1e-9)


def test_replace_one_fixed_size_brute_force_over_small_data_sets() -> None:
    """d = 1 (rows +-C after normalisation), n = 6, m = 3: the exact output density (a mixture over all subsets)
    of random neighbouring sets keeps delta(claimed eps) <= delta; the worst pair (one row against the rest)
    attains it (the accountant is exact)."""
    n, m, C = 6, 3, 1.0
    mech = NoisyMeanMechanism(norm=C, sample_size=m, target_epsilon=1.0)
    eps, s = mech.epsilon(n), mech.noise_std(n)
    x = np.linspace(-C - 14 * s, C + 14 * s, 200_001)

    def log_density(signs: np.ndarray) -> np.ndarray:
        means = [C * signs[list(S)].mean() for S in itertools.combinations(range(n), m)]
        return logsumexp([stats.norm.logpdf(x, mu, s) for mu in means], axis=0) - math.log(len(means))

    rng = np.random.default_rng(0)
    for _ in range(6):
        signs = rng.choice([-1.0, 1.0], size=n)
        other = signs.copy()
        other[rng.integers(n)] *= -1
        assert hockey_stick_1d(log_density(signs), log_density(other), x, eps) <= DELTA * 1.001
    worst = np.ones(n)
    flipped = worst.copy()
    flipped[0] = -1
    assert hockey_stick_1d(log_density(worst), log_density(flipped), x, eps) >= 0.9 * DELTA


def test_epsilon_decreases_in_noise_and_calibration_hits_the_target() -> None:
    for adjacency, sampling, q in (("replace_one", "fixed", 0.5), ("add_remove", "poisson", 0.2)):
        eps = [noisy_mean_epsilon(z, DELTA, q, adjacency, sampling) for z in np.geomspace(0.5, 20, 12)]
        assert all(a > b for a, b in zip(eps, eps[1:]))
        zs = []
        for target in (0.5, 1.0, 2.0, 4.0):
            z = calibrate_noisy_mean(target, DELTA, q, adjacency, sampling)
            got = noisy_mean_epsilon(z, DELTA, q, adjacency, sampling)
            assert target * (1 - 5e-3) <= got <= target
            assert noisy_mean_epsilon(z / 1.01, DELTA, q, adjacency, sampling) > target  # smallest such z (to 1%)
            zs.append(z)
        assert all(a > b for a, b in zip(zs, zs[1:]))
    assert calibrate_noisy_mean(math.inf, DELTA) == 0.0
    assert noisy_mean_epsilon(0.0, DELTA) == math.inf


def test_mechanism_epsilon_noise_std_and_lazy_calibration() -> None:
    mech = NoisyMeanMechanism(norm=2.0, sample_size=10, target_epsilon=1.0)
    z = calibrate_noisy_mean(1.0, DELTA, 10 / 40, "replace_one", "fixed")
    assert mech.noise_std(40) == pytest.approx(z * 2.0 / 10) and mech.calibrate(40) == mech.noise_std(40)
    assert mech.epsilon(40) <= 1.0 and mech.epsilon(40) == pytest.approx(1.0, rel=5e-3)
    assert mech.noise_std(20) > mech.noise_std(40)  # less amplification with q = 1/2
    with pytest.raises(ValueError, match="number of rows n is needed"):
        NoisyMeanMechanism(sample_size=10, target_epsilon=1.0).epsilon()
    free = NoisyMeanMechanism(target_epsilon=math.inf)
    assert free.noise_std(7) == 0.0 and free.epsilon(7) == math.inf


# --- release ----------------------------------------------------------------------------------------------------------
def _releases(mech: NoisyMeanMechanism, rows: torch.Tensor, count: int) -> torch.Tensor:
    return torch.stack([mech.release(rows, generator=torch.Generator().manual_seed(s)) for s in range(count)])


def test_release_moments_fixed_size_match_the_formula() -> None:
    torch.manual_seed(0)
    n, m, d, C, K = 12, 5, 3, 1.5, 4000
    rows = torch.randn(n, d, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.2], dtype=torch.float64)
    mech = NoisyMeanMechanism(norm=C, sample_size=m, noise_multiplier=1.0)
    unit = C * rows / rows.norm(dim=1, keepdim=True)
    out = _releases(mech, rows, K)
    # sampling without replacement: Var(mean) = (1 - m/n) S^2 / m (finite population correction), plus the noise
    var = (1 - m / n) * unit.var(dim=0, unbiased=True) / m + mech.noise_std(n) ** 2
    assert torch.all((out.mean(0) - unit.mean(0)).abs() <= 5 * (var / K).sqrt())
    assert torch.all((out.var(0) / var - 1).abs() <= 6 * math.sqrt(2 / (K - 1)))


def test_release_moments_poisson_add_remove_match_the_formula() -> None:
    torch.manual_seed(1)
    n, d, C, q, B, K = 30, 2, 1.0, 0.3, 8.0, 4000
    rows = torch.randn(n, d, dtype=torch.float64)
    mech = NoisyMeanMechanism(norm=C, sample_rate=q, noise_multiplier=0.5, adjacency="add-remove", expected_count=B)
    unit = C * rows / rows.norm(dim=1, keepdim=True)
    out = _releases(mech, rows, K)
    mean = q * unit.sum(0) / B
    var = q * (1 - q) * (unit**2).sum(0) / B**2 + (0.5 * C / B) ** 2
    assert mech.noise_std() == pytest.approx(0.5 * C / B)
    assert torch.all((out.mean(0) - mean).abs() <= 5 * (var / K).sqrt())
    assert torch.all((out.var(0) / var - 1).abs() <= 6 * math.sqrt(2 / (K - 1)))


def test_sensitivity_of_the_noiseless_release() -> None:
    """Replace one row: the noiseless outputs (same sample) differ by at most 2C/m, and by exactly 2C/m for the
    opposite row when it is sampled; add one row (Poisson, last place): at most C/B."""
    n, m, d, C = 10, 4, 5, 2.0
    gen = torch.Generator().manual_seed(5)
    mech = NoisyMeanMechanism(norm=C, sample_size=m, target_epsilon=math.inf)
    worst = 0.0
    for seed in range(300):
        rows = torch.randn(n, d, generator=gen, dtype=torch.float64)
        other = rows.clone()
        i = seed % n
        other[i] = -rows[i] if seed % 2 else torch.randn(d, generator=gen, dtype=torch.float64)
        a = mech.release(rows, generator=torch.Generator().manual_seed(seed))
        b = mech.release(other, generator=torch.Generator().manual_seed(seed))
        worst = max(worst, float((a - b).norm()))
        assert worst <= 2 * C / m + 1e-12
    assert worst == pytest.approx(2 * C / m, rel=1e-9)
    B = 3.0
    added = NoisyMeanMechanism(norm=C, sample_rate=0.5, adjacency="add-remove", expected_count=B,
                               target_epsilon=math.inf)
    for seed in range(50):
        rows = torch.randn(n + 1, d, generator=gen, dtype=torch.float64)
        a = added.release(rows[:n], generator=torch.Generator().manual_seed(seed))
        b = added.release(rows, generator=torch.Generator().manual_seed(seed))
        assert float((a - b).norm()) <= C / B + 1e-12


def test_release_normalises_maps_zero_rows_renormalizes_and_keeps_dtype() -> None:
    rows = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    mech = NoisyMeanMechanism(norm=2.0, target_epsilon=math.inf)
    assert torch.allclose(mech.normalize(rows), torch.tensor([[1.2, 1.6], [2.0, 0.0]], dtype=torch.float64))
    out = mech.release(rows, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == (2,)
    assert torch.allclose(out, torch.tensor([1.6, 0.8]))
    renorm = NoisyMeanMechanism(norm=2.0, noise_multiplier=1.0, renormalize=True)
    assert float(renorm.release(rows, generator=torch.Generator().manual_seed(0)).norm()) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="NaN/inf"):
        mech.release(torch.tensor([[1.0, float("nan")]]), generator=torch.Generator())


def test_release_is_a_function_of_the_generator_which_is_not_kept() -> None:
    rows = torch.randn(20, 4)
    mech = NoisyMeanMechanism(sample_size=5, target_epsilon=2.0)
    a = mech.release(rows, generator=torch.Generator().manual_seed(3))
    b = mech.release(rows, generator=torch.Generator().manual_seed(3))
    c = mech.release(rows, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not any(isinstance(v, torch.Generator) for v in vars(mech).values())


def test_add_remove_keeps_nothing_that_depends_on_n() -> None:
    kwargs = dict(norm=1.0, sample_rate=0.4, target_epsilon=1.0, adjacency="add-remove", expected_count=12.0)
    states = []
    for n in (30, 31):
        mech = NoisyMeanMechanism(**kwargs)
        mech.release(torch.randn(n, 3), generator=torch.Generator().manual_seed(0))
        states.append((mech.record(), repr(mech), vars(mech), mech.epsilon(n), mech.noise_std(n)))
    assert states[0] == states[1]
    kept = [*states[0][0].values(), *states[0][2].values()]
    assert not any(isinstance(v, (int, float)) and v in (30, 31) for v in kept)
    assert states[0][0]["epsilon"] <= 1.0 and states[0][0]["noise_std"] > 0


def test_record_is_public_constants() -> None:
    mech = NoisyMeanMechanism(norm=1.0, sample_size=5, target_epsilon=1.0)
    assert "epsilon" not in mech.record()  # q = m / n needs the (public) n of a release
    mech.release(torch.randn(20, 3), generator=torch.Generator().manual_seed(0))
    rec = mech.record()
    assert rec["mechanism"] == "noisy-mean" and rec["adjacency"] == "replace_one" and rec["num_rows"] == 20
    assert rec["epsilon"] == mech.epsilon(20) and rec["noise_std"] == mech.noise_std(20)
    assert mech.changes({**rec, "norm": 2.0}) == ["norm 2.0 -> 1.0"]


@pytest.mark.parametrize("kwargs,message", [
    (dict(norm=0.0, target_epsilon=1.0), "0.0"),
    (dict(norm=-1.0, target_epsilon=1.0), "-1.0"),
    (dict(norm=float("nan"), target_epsilon=1.0), "nan"),
    (dict(sample_size=3, sample_rate=0.5, target_epsilon=1.0), "got 3"),
    (dict(sample_size=0, target_epsilon=1.0), "got 0"),
    (dict(sample_rate=1.5, target_epsilon=1.0), "1.5"),
    (dict(), "got None"),
    (dict(noise_multiplier=1.0, target_epsilon=1.0), "got 1.0"),
    (dict(noise_multiplier=-0.5), "-0.5"),
    (dict(target_epsilon=-2.0), "-2.0"),
    (dict(target_epsilon=1.0, delta=0.0), "0.0"),
    (dict(target_epsilon=1.0, adjacency="swap"), "'swap'"),
    (dict(target_epsilon=1.0, adjacency="add-remove", sample_rate=0.5), "expected_count=None"),
    (dict(target_epsilon=1.0, adjacency="add-remove", sample_size=4, expected_count=4.0), "sample_size=4"),
    (dict(target_epsilon=1.0, sample_rate=0.5, expected_count=-3.0), "-3.0"),
    (dict(target_epsilon=1.0, expected_count=3.0), "expected_count=3.0"),
])
def test_refusals_name_the_bad_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        NoisyMeanMechanism(**kwargs)


def test_release_refusals() -> None:
    mech = NoisyMeanMechanism(sample_size=8, target_epsilon=1.0)
    with pytest.raises(ValueError, match="sample_size=8 exceeds the n=5"):
        mech.release(torch.randn(5, 2), generator=torch.Generator())
    with pytest.raises(ValueError, match=re.escape("(5,)")):
        mech.release(torch.randn(5), generator=torch.Generator())
    with pytest.raises(TypeError, match="int"):
        mech.release(torch.randn(10, 2), generator=0)  # type: ignore[arg-type]


# --- audit ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(sample_size=10), dict(sample_rate=0.5, adjacency="add-remove",
                                                                expected_count=10.0)])
def test_audit_lower_bound_is_below_the_claimed_epsilon(kwargs: dict) -> None:
    mech = NoisyMeanMechanism(target_epsilon=4.0, **kwargs)
    audit = audit_noisy_mean(mech, num_rows=20, releases=3000, seed=0)
    assert audit.claimed_epsilon == pytest.approx(4.0, rel=5e-3)
    assert 0.3 < audit.lower_bound <= audit.claimed_epsilon  # the audit has power, and finds no violation


def test_audit_detects_too_little_noise() -> None:
    """Negative control: releases with a quarter of the calibrated noise exceed the claim of the calibrated ones."""
    honest = NoisyMeanMechanism(target_epsilon=2.0)
    broken = NoisyMeanMechanism(noise_multiplier=honest.calibrated_noise_multiplier(20) / 4)
    audit = audit_noisy_mean(broken, num_rows=20, releases=3000, seed=1)
    assert audit.lower_bound > honest.epsilon(20)
