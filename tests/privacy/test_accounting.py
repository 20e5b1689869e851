"""plpriv.privacy.accounting (thin wrappers over opacus' accountants) against google's dp-accounting PLD."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting import pld

from plpriv.privacy.accounting import (
    calibrate_noise_multiplier,
    default_delta,
    epsilon,
    extend_history,
    max_steps_within_budget,
    num_steps,
)


def pld_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    accountant = pld.PLDAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(("q", "sigma", "steps"), [(0.08192, 3.0, 300), (0.02, 1.0, 50), (1 / 6, 1.2, 7)])
def test_prv_epsilon_matches_pld(q: float, sigma: float, steps: int) -> None:
    assert epsilon([(sigma, q, steps)], 1e-5, "prv") == pytest.approx(pld_epsilon(q, sigma, steps, 1e-5), rel=0.02)


def test_heterogeneous_history_composes() -> None:
    """Two phases at different noise: PLD of the composition of both phases."""
    history = extend_history(extend_history([], 1.0, 0.05, 20), 2.0, 0.05, 30)
    assert history == [(1.0, 0.05, 20), (2.0, 0.05, 30)] and num_steps(history) == 50
    accountant = pld.PLDAccountant()
    for sigma, k in ((1.0, 20), (2.0, 30)):
        event = dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, k))
    assert epsilon(history, 1e-5, "prv") == pytest.approx(accountant.get_epsilon(1e-5), rel=0.02)
    assert extend_history(history, 2.0, 0.05, 5)[-1] == (2.0, 0.05, 35)  # merged like opacus' accountants


def test_budget_boundary_and_calibration_agree_with_pld() -> None:
    q, sigma, delta, target = 0.1, 1.5, 1e-5, 2.0
    k = max_steps_within_budget(target, delta, [], sigma, q, "prv")
    assert pld_epsilon(q, sigma, k, delta) <= target * 1.02
    assert pld_epsilon(q, sigma, k + 1, delta) >= target * 0.98
    assert max_steps_within_budget(target, delta, [], sigma, q, "prv", horizon=k // 2) == k // 2
    calibrated = calibrate_noise_multiplier(target, delta, q, 40, "prv")
    assert pld_epsilon(q, calibrated, 40, delta) == pytest.approx(target, rel=0.02)


def test_default_delta_and_argument_checks() -> None:
    assert default_delta(1000) == pytest.approx(1000**-1.1)
    assert epsilon([], 1e-5) == 0.0
    with pytest.raises(ValueError, match="delta"):
        epsilon([(1.0, 0.1, 1)], 1.5)
    with pytest.raises(ValueError, match="accountant"):
        epsilon([(1.0, 0.1, 1)], 1e-5, "moments")
