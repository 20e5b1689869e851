"""The sparsified Gaussian mechanism and its accountant against independent facts.

Facts used:
* A 1-sparse input x = C e_1 makes one step exactly the Poisson-subsampled Gaussian at rate q gamma (the other
  coordinates carry no information); its epsilon is google dp-accounting's PLD of that event.
* At q = 1 the coordinates are independent: the step is the composition over coordinates j of Poisson-subsampled
  Gaussians at rate gamma with noise multiplier sigma C / |x_j| (dp-accounting composes them).
* At q < 1 a dense input (here 2 coordinates) has no closed form; its output distribution is a Gaussian mixture, so
  the probabilities of grid cells are exact products of normal CDF differences. Releasing only the cell is
  post-processing, so dp-accounting's optimistic PLD of the cells is a lower estimate of that input's epsilon.
* Renyi divergences of the same mixtures at integer orders by Gauss-Hermite quadrature (both directions).
* Monte Carlo for unbiasedness and the MSE.
"""

from __future__ import annotations

import math
from itertools import product

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import pld
from numpy.polynomial.hermite_e import hermegauss
from scipy.stats import norm

from plpriv.privacy.accounting import calibrate_noise_multiplier, epsilon
from plpriv.privacy.sparsified_gaussian import (
    ORDERS,
    SparsifiedGaussianAccountant,
    SparsifiedGaussianLedger,
    SparsifiedGaussianMechanism,
    check_keep_fraction,
    draw_mask,
    draw_masks,
    epsilon_lower_bound,
    kept_count,
    mask_seed,
    pack,
    rdp_bound,
    rdp_lower_bound,
    sparsified_gaussian_epsilon,
    sparsified_gaussian_mse,
    sparsified_gaussian_noise_multiplier,
    sparsified_history_epsilon,
    unpack,
)

DELTA = 1e-5


def pld_epsilon(event: dp_accounting.DpEvent, steps: int, delta: float = DELTA) -> float:
    accountant = pld.PLDAccountant(value_discretization_interval=1e-3)
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


def one_sparse_epsilon(sigma: float, q: float, gamma: float, steps: int) -> float:
    return pld_epsilon(dp_accounting.PoissonSampledDpEvent(q * gamma, dp_accounting.GaussianDpEvent(sigma)), steps)


def dense_full_participation_epsilon(sigma: float, gamma: float, k: int, steps: int) -> float:
    """x uniform on k coordinates (|x_j| = C / sqrt(k)), q = 1: k independent rate-gamma subsampled Gaussians."""
    coordinate = dp_accounting.PoissonSampledDpEvent(gamma, dp_accounting.GaussianDpEvent(sigma * math.sqrt(k)))
    return pld_epsilon(dp_accounting.ComposedDpEvent([coordinate] * k), steps)


def two_coordinate_cells(sigma: float, q: float, gamma: float, width: float = 0.05) -> tuple[dict, dict]:
    """log cell probabilities of N(0, sigma^2 I_2) and of the output for x = C (1, 1) / sqrt(2) (C = 1)."""
    s = 1 / math.sqrt(2)
    edges = np.arange(-9 * sigma, 9 * sigma + s + width, width)
    p0 = np.diff(norm.cdf(edges / sigma))
    p1 = np.diff(norm.cdf((edges - s) / sigma))
    coordinate = [p0, p1]  # a coordinate not kept / kept
    p_without = np.outer(p0, p0)
    p_with = (1 - q) * p_without
    for m in product((0, 1), repeat=2):  # the mask of the participant, given it participates
        w = q * math.prod(gamma if b else 1 - gamma for b in m)
        p_with = p_with + w * np.outer(coordinate[m[0]], coordinate[m[1]])
    keep = (p_without > 1e-300) & (p_with > 1e-300)
    idx = np.flatnonzero(keep)
    lower = dict(zip(idx.tolist(), np.log(p_without.ravel()[idx]).tolist()))
    upper = dict(zip(idx.tolist(), np.log(p_with.ravel()[idx]).tolist()))
    return lower, upper


def dense_two_coordinate_epsilon_lower_estimate(sigma: float, q: float, gamma: float, steps: int) -> float:
    lower, upper = two_coordinate_cells(sigma, q, gamma)
    loss = pld.privacy_loss_distribution.from_two_probability_mass_functions(
        lower, upper, pessimistic_estimate=False, value_discretization_interval=1e-3, symmetric=False)
    return loss.self_compose(steps).get_epsilon_for_delta(DELTA)


def quadrature_rdp(sigma: float, q: float, gamma: float, k: int, alpha: int, n: int = 40) -> tuple[float, float]:
    """(add, remove) Renyi divergences of one step for x uniform on k coordinates (C = 1)."""
    z, w = hermegauss(n)
    w = w / w.sum()
    s = 1 / (sigma * math.sqrt(k))
    ratio = 1 - gamma + gamma * np.exp(s * z - s * s / 2)  # per-coordinate likelihood ratio under P0
    grids = np.meshgrid(*([ratio] * k), indexing="ij")
    weights = np.prod(np.meshgrid(*([w] * k), indexing="ij"), axis=0)
    mix = 1 - q + q * np.prod(grids, axis=0)
    return (math.log(np.sum(weights * mix ** (1 - alpha))) / (alpha - 1),
            math.log(np.sum(weights * mix**alpha)) / (alpha - 1))


# --------------------------------------------------------------------------------------------------- accountant
@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_keep_fraction_one_is_dp_sgd_epsilon(accountant: str) -> None:
    history = [(1.1, 0.01, 300), (0.9, 0.02, 50)]
    assert sparsified_history_epsilon(history, DELTA, 1.0, accountant) == epsilon(history, DELTA, accountant)
    assert rdp_bound(1.1, 0.01, 1.0) == pytest.approx(rdp_lower_bound(1.1, 0.01, 1.0), rel=1e-12)


def test_epsilon_falls_with_keep_fraction_and_k_subset_gets_no_amplification() -> None:
    sigma, q, steps = 1.0, 0.05, 400
    values = [sparsified_gaussian_epsilon(sigma, q, g, steps, DELTA) for g in (1.0, 0.8, 0.5, 0.2, 0.1, 0.03, 0.01)]
    assert all(b <= a for a, b in zip(values, values[1:])), values
    assert values[4] < 0.4 * values[0]
    dpsgd = sparsified_gaussian_epsilon(sigma, q, 1.0, steps, DELTA)
    assert sparsified_gaussian_epsilon(sigma, q, 0.1, steps, DELTA, mask="k_subset") == dpsgd


@pytest.mark.parametrize(("sigma", "q", "gamma", "steps"),
                         [(1.0, 0.05, 0.1, 200), (0.8, 0.2, 0.3, 30), (1.2, 1.0, 0.1, 20), (0.7, 0.5, 0.5, 10)])
def test_epsilon_is_at_least_the_one_sparse_inputs(sigma: float, q: float, gamma: float, steps: int) -> None:
    """The derived worst case on the ball: a 1-sparse input is exactly SGM(q gamma); no input is accounted below."""
    reported = sparsified_gaussian_epsilon(sigma, q, gamma, steps, DELTA)
    exact = one_sparse_epsilon(sigma, q, gamma, steps)
    assert reported >= exact * 0.999
    assert epsilon_lower_bound([(sigma, q, steps)], gamma, DELTA) == pytest.approx(exact, rel=0.03)
    assert np.all(rdp_bound(sigma, q, gamma) >= rdp_lower_bound(sigma, q, gamma) * (1 - 1e-12))
    if q == 1.0:  # [B]: at full participation the bound is the 1-sparse input's RDP, order by order
        assert rdp_bound(sigma, q, gamma) == pytest.approx(rdp_lower_bound(sigma, q, gamma), rel=1e-12)


@pytest.mark.parametrize("k", [2, 4, 16])
def test_dense_inputs_at_full_participation_are_accounted(k: int) -> None:
    sigma, gamma, steps = 1.0, 0.2, 20
    assert sparsified_gaussian_epsilon(sigma, 1.0, gamma, steps, DELTA) >= dense_full_participation_epsilon(
        sigma, gamma, k, steps)


@pytest.mark.parametrize(("sigma", "q", "gamma", "steps"), [(0.8, 0.5, 0.5, 4), (1.0, 0.3, 0.2, 8)])
def test_dense_input_with_subsampled_participants_is_accounted(sigma: float, q: float, gamma: float,
                                                              steps: int) -> None:
    lower_estimate = dense_two_coordinate_epsilon_lower_estimate(sigma, q, gamma, steps)
    assert lower_estimate > 0.1  # the check is not vacuous
    assert sparsified_gaussian_epsilon(sigma, q, gamma, steps, DELTA) >= lower_estimate


@pytest.mark.parametrize(("sigma", "q", "gamma"), [(1.0, 0.2, 0.1), (0.7, 0.5, 0.5), (0.7, 0.9, 0.3)])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_rdp_bound_covers_both_directions_of_dense_inputs(sigma: float, q: float, gamma: float, k: int) -> None:
    bound = dict(zip(ORDERS.astype(int).tolist(), rdp_bound(sigma, q, gamma).tolist()))
    for alpha in (2, 3, 5, 8):
        add, remove = quadrature_rdp(sigma, q, gamma, k, alpha, n=60 if k < 3 else 30)
        assert max(add, remove) <= bound[alpha] * (1 + 1e-6) + 1e-9, (alpha, add, remove, bound[alpha])


def test_calibration_inverts_epsilon() -> None:
    q, gamma, steps, target = 0.05, 0.1, 300, 2.0
    sigma = sparsified_gaussian_noise_multiplier(target, DELTA, q, gamma, steps)
    assert sparsified_gaussian_epsilon(sigma, q, gamma, steps, DELTA) <= target
    assert sparsified_gaussian_epsilon(sigma * 0.97, q, gamma, steps, DELTA) > target * 0.98
    assert sigma < calibrate_noise_multiplier(target, DELTA, q, steps)  # less noise than DP-SGD needs
    assert sparsified_gaussian_noise_multiplier(target, DELTA, q, 1.0, steps) == calibrate_noise_multiplier(
        target, DELTA, q, steps)


def test_accountant_interface_and_state() -> None:
    acc = SparsifiedGaussianAccountant(keep_fraction=0.1)
    for _ in range(5):
        acc.step(noise_multiplier=1.0, sample_rate=0.1)
    acc.step(noise_multiplier=0.8, sample_rate=0.1)
    assert acc.history == [(1.0, 0.1, 5), (0.8, 0.1, 1)] and len(acc) == 6
    assert acc.get_epsilon(DELTA) == sparsified_history_epsilon(acc.history, DELTA, 0.1)
    again = SparsifiedGaussianAccountant(keep_fraction=0.1)
    again.load_state_dict(acc.state_dict())
    assert again.history == acc.history and again.get_epsilon(DELTA) == acc.get_epsilon(DELTA)
    with pytest.raises(ValueError, match="keep_fraction=0.1"):
        SparsifiedGaussianAccountant(keep_fraction=0.5).load_state_dict(acc.state_dict())
    ledger = SparsifiedGaussianLedger(0.1)
    ledger.record(1.0, 0.1, 6)
    assert ledger.epsilon(DELTA) == sparsified_gaussian_epsilon(1.0, 0.1, 0.1, 6, DELTA)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.5", None])
def test_bad_keep_fraction_names_the_value(bad: object) -> None:
    with pytest.raises(ValueError, match=re_escape(repr(bad))):
        check_keep_fraction(bad)
    with pytest.raises(ValueError, match="keep_fraction"):
        SparsifiedGaussianMechanism(1.0, 1.0, bad)  # type: ignore[arg-type]


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


# --------------------------------------------------------------------------------------------------- masks
def test_masks_are_functions_of_seed_step_and_key_only() -> None:
    seed = 2**100 + 12345  # a 128-bit secret
    a = draw_mask(5000, 0.1, mask_seed(seed, 3, 17))
    b = draw_mask(5000, 0.1, mask_seed(seed, 3, 17))  # another rank, another process: the same
    assert torch.equal(a, b) and a.dtype == torch.bool
    assert not torch.equal(a, draw_mask(5000, 0.1, mask_seed(seed, 4, 17)))  # fresh every step
    assert not torch.equal(a, draw_mask(5000, 0.1, mask_seed(seed, 3, 18)))  # and every participant
    assert not torch.equal(a, draw_mask(5000, 0.1, mask_seed(seed + 1, 3, 17)))
    assert abs(float(a.float().mean()) - 0.1) < 0.015
    k = draw_mask(5000, 0.1, mask_seed(seed, 3, 17), "k_subset")
    assert int(k.sum()) == kept_count(5000, 0.1) == 500
    x = torch.randn(4, 5000)
    masks = draw_masks(5000, 0.1, [mask_seed(seed, 0, i) for i in range(4)])
    packed = pack(x, masks)
    assert packed.numel() == int(masks.sum()) and torch.equal(unpack(packed, masks), x * masks)


def test_bernoulli_masks_have_iid_coordinates() -> None:
    # Geometric skipping must give i.i.d. Bernoulli(gamma) coordinates: per-coordinate rate gamma (the first and the
    # last too), neighbours independent (joint rate gamma^2), kept count Binomial(d, gamma); 20,000 masks, 5 sigma.
    gamma, dim, n = 0.1, 40, 20_000
    masks = draw_masks(dim, gamma, list(range(n))).double()
    rate_se = (gamma * (1 - gamma) / n) ** 0.5
    assert (masks.mean(0) - gamma).abs().max() < 5 * rate_se
    joint = (masks[:, :-1] * masks[:, 1:]).mean(0)
    assert (joint - gamma**2).abs().max() < 5 * (gamma**2 / n) ** 0.5
    counts = masks.sum(1)
    assert abs(float(counts.mean()) - dim * gamma) < 5 * (dim * gamma * (1 - gamma) / n) ** 0.5
    assert abs(float(counts.var()) / (dim * gamma * (1 - gamma)) - 1) < 5 * (2 / n) ** 0.5
    assert bool(draw_mask(7, 1.0, 3).all())  # keep everything
    assert int(draw_masks(100_000, 1e-4, list(range(50))).sum()) in range(500 - 5 * 23, 500 + 5 * 23)


# --------------------------------------------------------------------------------------------------- estimator
@pytest.mark.parametrize("mask", ["bernoulli", "k_subset"])
def test_estimator_is_unbiased_and_mse_matches_closed_form(mask: str) -> None:
    torch.manual_seed(0)
    n, d, clip, sigma, gamma, trials = 6, 40, 1.0, 0.5, 0.25, 2500  # k = 10 = gamma d exactly
    x = torch.randn(n, d, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * torch.linspace(0.3, 1.0, n, dtype=torch.float64)[:, None]  # inside ball
    mu = x.mean(0)
    mech = SparsifiedGaussianMechanism(clip, sigma, gamma, mask)
    g = torch.Generator().manual_seed(1)
    estimates = torch.stack([mech.release(x, [mask_seed(9, t, i) for i in range(n)], g).estimate
                             for t in range(trials)])
    errors = ((estimates - mu) ** 2).sum(1)
    closed = sparsified_gaussian_mse(float((x**2).sum()), n, d, clip, sigma, gamma)
    assert float(errors.mean()) == pytest.approx(closed, rel=4 * float(errors.std()) / math.sqrt(trials) / closed)
    bias = estimates.mean(0) - mu  # per coordinate within 4 standard errors
    assert bool((bias.abs() <= 4 * estimates.std(0) / math.sqrt(trials)).all())
    release = mech.release(x, list(range(n)), g)
    assert release.bytes_sent == int(release.masks.sum()) * 8


def test_mse_tends_to_the_gaussian_mechanisms_at_equal_epsilon() -> None:
    """The abstract's "MSEs that fast converge to those of the uncompressed Gaussian mechanism", in the limit the
    closed form shows: at a fixed epsilon sigma shrinks to ~gamma sigma_0 as the noise grows (small epsilon / many
    releases) and the sparsification term (1-gamma)/(n gamma) is small against d sigma_0^2 / n^2 (n << gamma d
    sigma_0^2). Full participation (q = 1), where the accountant is exact."""
    n, d, gamma, steps = 10, 10**5, 0.1, 100
    ratios = []
    for target in (8.0, 2.0, 0.5):
        sigma0 = sparsified_gaussian_noise_multiplier(target, DELTA, 1.0, 1.0, steps, accountant="rdp")
        sigma = sparsified_gaussian_noise_multiplier(target, DELTA, 1.0, gamma, steps, accountant="rdp")
        ratios.append(sparsified_gaussian_mse(n, n, d, 1.0, sigma, gamma)
                      / sparsified_gaussian_mse(n, n, d, 1.0, sigma0, 1.0))
    assert ratios[0] > ratios[1] > ratios[2] and ratios[2] < 1.3, ratios
