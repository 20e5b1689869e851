"""Tests for plpriv.privacy.audit against independent facts: the reference worked example, binomial tails,
closed forms, the Gaussian mechanism's exact privacy profile (dp_accounting PLD), and mechanisms of known epsilon."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from plpriv.privacy.audit import (
    ASSUMPTIONS,
    AuditResult,
    ScoreSplit,
    audit_counts,
    audit_scores,
    clopper_pearson_lower,
    clopper_pearson_upper,
    estimate,
    gaussian_mu_estimate,
    gdp_mu_interval,
    selection_objective,
    epsilon_lower_bound,
    gdp_delta,
    gdp_epsilon_lower_bound,
    gdp_mu_lower_bound,
    gdp_mu_to_epsilon,
    one_run_audit,
    one_run_epsilon_lower_bound,
    one_run_p_value,
    select_threshold,
)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


# ------------------------------------------------------------------------------------------------ Clopper-Pearson


def test_worked_example_from_reference() -> None:
    # shared/reference/auditing.md: 1000/1000 models, FP=10, FN=500, delta=1e-5, 95% -> 0.0183, 0.531, ~3.24.
    res = audit_counts(10, 500, 1000, 1000, 1e-5, 0.95)
    assert isinstance(res, AuditResult)
    assert res.fpr_upper == pytest.approx(0.0183, abs=5e-5)
    assert res.fnr_upper == pytest.approx(0.531, abs=5e-4)
    assert res.epsilon == pytest.approx(3.24, abs=0.005)
    assert res.direction == "fpr"  # the bound dividing by the small FPR+ wins
    assert res.epsilon == res.epsilon_fpr > res.epsilon_fnr
    assert epsilon_lower_bound(10, 500, 1000, 1000, 1e-5, 0.95) == res.epsilon


@pytest.mark.parametrize(("k", "n"), [(0, 50), (3, 50), (10, 1000), (500, 1000), (999, 1000)])
def test_clopper_pearson_upper_is_exact_binomial_tail(k: int, n: int) -> None:
    # Defining property of the one-sided CP upper bound: P[Bin(n, p_u) <= k] = alpha (checked through binom, not beta).
    alpha = 0.025
    p_u = clopper_pearson_upper(k, n, alpha)
    assert stats.binom.cdf(k, n, p_u) == pytest.approx(alpha, rel=1e-6)
    assert p_u > k / n
    assert clopper_pearson_upper(n, n, alpha) == 1.0


def test_zero_errors_closed_form() -> None:
    # No errors: CP upper bound is 1 - (beta/2)^(1/n), so eps_LB = ln((1 - delta - u) / u).
    n, delta, conf = 1000, 1e-5, 0.95
    u = 1.0 - ((1.0 - conf) / 2.0) ** (1.0 / n)
    res = audit_counts(0, 0, n, n, delta, conf)
    assert res.fpr_upper == pytest.approx(u, rel=1e-9)
    assert res.epsilon == pytest.approx(math.log((1.0 - delta - u) / u), rel=1e-9)
    assert res.epsilon > 5.0


def test_bound_decreases_with_errors_and_is_symmetric() -> None:
    n = 200
    grid = [0, 1, 5, 20, 60, 100, 150, 200]
    eps = np.array([[epsilon_lower_bound(fp, fn, n, n, 1e-5) for fn in grid] for fp in grid])
    assert np.all(eps >= 0.0)
    assert np.all(np.diff(eps, axis=0) <= 0.0) and np.all(np.diff(eps, axis=1) <= 0.0)
    pos = (eps[:-1, :] > 0) & (eps[1:, :] > 0)
    assert np.all(np.diff(eps, axis=0)[pos] < 0.0)  # strictly smaller where informative
    np.testing.assert_allclose(eps, eps.T, rtol=1e-12)  # swapping the roles of IN and OUT
    assert audit_counts(3, 40, 200, 200, 1e-5).direction == "fpr"
    assert audit_counts(40, 3, 200, 200, 1e-5).direction == "fnr"
    assert audit_counts(100, 100, 200, 200, 1e-5).direction == "none"
    assert epsilon_lower_bound(100, 100, 200, 200, 1e-5) == 0.0
    # Same empirical rates, more models -> tighter confidence intervals -> larger bound; higher confidence -> smaller.
    assert epsilon_lower_bound(10, 100, 1000, 1000, 1e-5) > epsilon_lower_bound(1, 10, 100, 100, 1e-5)
    assert epsilon_lower_bound(10, 500, 1000, 1000, 1e-5, 0.99) < epsilon_lower_bound(10, 500, 1000, 1000, 1e-5, 0.9)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(fp=11, fn=0, n_out=10, n_in=10), ValueError, "fp.*11"),
        (dict(fp=-1, fn=0, n_out=10, n_in=10), ValueError, "fp.*-1"),
        (dict(fp=0, fn=12, n_out=10, n_in=10), ValueError, "fn.*12"),
        (dict(fp=0, fn=0, n_out=0, n_in=10), ValueError, "n_out.*0"),
        (dict(fp=0.5, fn=0, n_out=10, n_in=10), TypeError, "fp.*0.5"),
        (dict(fp=0, fn=0, n_out=10, n_in=10, delta=1.0), ValueError, "delta.*1.0"),
        (dict(fp=0, fn=0, n_out=10, n_in=10, delta=-0.1), ValueError, "delta.*-0.1"),
        (dict(fp=0, fn=0, n_out=10, n_in=10, confidence=1.0), ValueError, "confidence.*1.0"),
        (dict(fp=0, fn=0, n_out=10, n_in=10, confidence=0.0), ValueError, "confidence.*0.0"),
    ],
)
def test_input_validation(kwargs: dict, exc: type, match: str) -> None:
    kwargs = {"delta": 1e-5, **kwargs}
    with pytest.raises(exc, match=match):
        epsilon_lower_bound(**kwargs)


def _exact_failure_probability(bound, p_fp: float, p_fn: float, n: int, limit: float) -> float:
    """Exact P[bound(FP, FN) > limit] for FP ~ Bin(n, p_fp), FN ~ Bin(n, p_fn), independent.

    Exhaustive over all (FP, FN) using that the bound is non-increasing in both counts (tested above): for each FP
    the failing FN form a prefix {0, ..., c(FP) - 1}, and c(FP) is non-increasing, so a staircase walk is exact.
    """
    total, c = 0.0, n + 1
    for fp in range(n + 1):
        while c > 0 and bound(fp, c - 1) <= limit:
            c -= 1
        if c == 0:
            break
        total += stats.binom.pmf(fp, n, p_fp) * stats.binom.cdf(c - 1, n, p_fn)
    return total


@pytest.mark.parametrize(("eps", "confidence"), [(0.5, 0.8), (1.0, 0.95), (2.0, 0.95)])
def test_exhaustive_coverage_on_randomized_response(eps: float, confidence: float) -> None:
    # eps-DP randomized response: the output bit is flipped w.p. 1/(1+e^eps); the attack "IN iff bit says IN" has
    # FPR = FNR = 1/(1+e^eps). The bound may exceed the true eps with probability at most 1 - confidence.
    n, delta = 200, 0.0
    p_err = 1.0 / (1.0 + math.exp(eps))
    fail = _exact_failure_probability(
        lambda fp, fn: epsilon_lower_bound(fp, fn, n, n, delta, confidence), p_err, p_err, n, eps
    )
    assert fail <= 1.0 - confidence
    # ... and is informative at the typical outcome.
    typical = epsilon_lower_bound(round(n * p_err), round(n * p_err), n, n, delta, confidence)
    assert 0.5 * eps < typical < eps


# ------------------------------------------------------------------------------------------------ GDP variant


def _pld_gaussian(sigma: float):
    dp_accounting = pytest.importorskip("dp_accounting")
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(dp_accounting.GaussianDpEvent(noise_multiplier=sigma))
    return acc


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 4.0])
def test_gdp_conversion_matches_gaussian_mechanism_pld(sigma: float) -> None:
    # Gaussian mechanism with sensitivity 1 and noise sigma is exactly (1/sigma)-GDP; dp_accounting's PLD gives its
    # (eps, delta) curve independently (discretised, so compare within 1%).
    acc = _pld_gaussian(sigma)
    for delta in (1e-5, 1e-3):
        eps = gdp_mu_to_epsilon(1.0 / sigma, delta)
        assert eps == pytest.approx(acc.get_epsilon(delta), rel=0.01)
        assert gdp_delta(eps, 1.0 / sigma) == pytest.approx(delta, rel=1e-6)
    for e in (0.25, 1.0):
        assert gdp_delta(e, 1.0 / sigma) == pytest.approx(acc.get_delta(e), rel=0.01, abs=1e-9)


def test_gdp_delta_at_zero_is_total_variation() -> None:
    # delta(0) = TV(N(0,1), N(mu,1)) = 2 Phi(mu/2) - 1.
    for mu in (0.1, 1.0, 3.0):
        assert gdp_delta(0.0, mu) == pytest.approx(2 * stats.norm.cdf(mu / 2) - 1, rel=1e-12)
    assert gdp_mu_to_epsilon(0.0, 1e-5) == 0.0
    assert gdp_mu_to_epsilon(0.1, 0.5) == 0.0  # delta above delta(0)


def test_gdp_mu_lower_bound_formula_and_validation() -> None:
    res = audit_counts(10, 500, 1000, 1000, 1e-5)
    mu = stats.norm.ppf(1 - res.fpr_upper) - stats.norm.ppf(res.fnr_upper)
    assert gdp_mu_lower_bound(10, 500, 1000, 1000) == pytest.approx(mu, rel=1e-9) == res.mu_lower
    assert gdp_epsilon_lower_bound(10, 500, 1000, 1000, 1e-5) == pytest.approx(res.epsilon_gdp, rel=1e-9)
    assert audit_counts(10, 500, 1000, 1000, 0.0).epsilon_gdp is None
    assert gdp_mu_lower_bound(500, 500, 1000, 1000) == 0.0
    with pytest.raises(ValueError, match="delta"):
        gdp_epsilon_lower_bound(10, 500, 1000, 1000, 0.0)
    with pytest.raises(ValueError, match="mu.*-1"):
        gdp_mu_to_epsilon(-1.0, 1e-5)


def test_gdp_exhaustive_coverage_and_tightness_on_gaussian_mechanism() -> None:
    # Gaussian mechanism with mu = 1.5: OUT output ~ N(0, 1), IN output ~ N(mu, 1); attack "IN iff output > t".
    mu, t, n, conf = 1.5, 0.75, 200, 0.95
    p_fp, p_fn = stats.norm.sf(t), stats.norm.cdf(t - mu)
    fail = _exact_failure_probability(lambda fp, fn: gdp_mu_lower_bound(fp, fn, n, n, conf), p_fp, p_fn, n, mu)
    assert fail <= 1.0 - conf
    # Many models, typical counts: the GDP bound approaches the true eps (from dp_accounting) from below.
    big, delta = 10**6, 1e-5
    eps_true = _pld_gaussian(1.0 / mu).get_epsilon(delta)
    eps_lb = gdp_epsilon_lower_bound(round(big * p_fp), round(big * p_fn), big, big, delta, conf)
    assert 0.95 * eps_true < eps_lb < eps_true


# ------------------------------------------------------------------------------------------------ thresholds


def _count(scores_in, scores_out, t: float, higher_is_in: bool) -> tuple[int, int]:
    is_in = (lambda s: s > t) if higher_is_in else (lambda s: s < t)
    fp = sum(1 for s in scores_out if is_in(s))
    fn = sum(1 for s in scores_in if not is_in(s))
    return fp, fn


def test_audit_scores_counts_by_hand() -> None:
    s_in, s_out = [0.1, 0.2, 0.9], [0.3, 0.8, 0.05, 0.6]
    res = audit_scores(s_in, s_out, 0.5, 1e-5)
    assert (res.fp, res.fn, res.n_out, res.n_in) == (2, 1, 4, 3)  # OUT 0.3, 0.05 called IN; IN 0.9 called OUT
    assert res.threshold == 0.5 and res.higher_is_in is False
    assert res.epsilon == epsilon_lower_bound(2, 1, 4, 3, 1e-5)
    res_hi = audit_scores(s_in, s_out, 0.5, 1e-5, higher_is_in=True)
    assert (res_hi.fp, res_hi.fn) == (2, 2)  # OUT 0.8, 0.6 called IN; IN 0.1, 0.2 called OUT


@pytest.mark.parametrize("objective", ["epsilon", "gdp", "min_errors"])
def test_select_threshold_matches_brute_force(objective: str) -> None:
    rng = np.random.default_rng(0)
    s_in = rng.normal(-1.0, 1.0, 60).round(1)  # rounding creates ties
    s_out = rng.normal(0.5, 1.0, 70).round(1)
    delta = 1e-5
    if objective == "epsilon":
        value = lambda fp, fn: epsilon_lower_bound(fp, fn, 70, 60, delta)  # noqa: E731
        obj = "epsilon"
    elif objective == "gdp":
        value = lambda fp, fn: gdp_mu_lower_bound(fp, fn, 70, 60)  # noqa: E731
        obj = "gdp"
    else:
        value = lambda fp, fn: -(fp + fn)  # noqa: E731
        obj = lambda fp, fn, n_out, n_in: -(fp + fn)  # noqa: E731
    t = select_threshold(s_in, s_out, delta, objective=obj)
    uniq = sorted(set(s_in.tolist()) | set(s_out.tolist()))
    best = max(value(*_count(s_in, s_out, (a + b) / 2, False)) for a, b in zip(uniq[:-1], uniq[1:]))
    assert value(*_count(s_in, s_out, t, False)) == pytest.approx(best, rel=1e-12)
    # higher_is_in mirrors the convention.
    t_hi = select_threshold(-s_in, -s_out, delta, objective=obj, higher_is_in=True)
    assert t_hi == pytest.approx(-t)


def test_separable_scores_give_zero_error_bound_on_fresh_split() -> None:
    rng = np.random.default_rng(1)
    sel_in, sel_out = rng.uniform(0.0, 1.0, 200), rng.uniform(2.0, 3.0, 200)
    t = select_threshold(sel_in, sel_out, 1e-5)
    assert 1.0 < t < 2.0
    ev_in, ev_out = rng.uniform(0.0, 1.0, 1000), rng.uniform(2.0, 3.0, 1000)
    res = audit_scores(ev_in, ev_out, t, 1e-5)
    u = 1.0 - 0.025 ** (1.0 / 1000)
    assert (res.fp, res.fn) == (0, 0)
    assert res.epsilon == pytest.approx(math.log((1.0 - 1e-5 - u) / u), rel=1e-9)


def test_threshold_validation() -> None:
    with pytest.raises(ValueError, match="scores_in"):
        select_threshold([], [1.0], 1e-5)
    with pytest.raises(ValueError, match="scores_out.*non-finite"):
        select_threshold([1.0], [np.nan], 1e-5)
    with pytest.raises(ValueError, match="equal"):
        select_threshold([1.0, 1.0], [1.0], 1e-5)
    with pytest.raises(ValueError, match="objective"):
        select_threshold([0.0], [1.0], 1e-5, objective="auc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold"):
        audit_scores([0.0], [1.0], float("inf"), 1e-5)


# ------------------------------------------------------------------------------------------------ one-run audit


@pytest.mark.parametrize(("r", "v"), [(100, 60), (1000, 731), (1000, 1000), (5000, 2600), (50, 20)])
def test_one_run_pure_eps_matches_beta_quantile(r: int, v: int) -> None:
    # P[Bin(r, q) >= v] = I_q(v, r - v + 1), so the largest q with tail <= beta is BetaInv(beta; v, r - v + 1).
    conf = 0.95
    q_lb = stats.beta.ppf(1.0 - conf, v, r - v + 1)
    expected = max(0.0, _logit(q_lb))
    assert one_run_epsilon_lower_bound(2 * r, r, v, 0.0, conf) == pytest.approx(expected, rel=1e-8, abs=1e-10)


def test_one_run_p_value_is_binomial_tail_sum() -> None:
    r, v, eps = 30, 21, 0.7
    q = math.exp(eps) / (1 + math.exp(eps))
    tail = sum(math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(v, r + 1))
    assert one_run_p_value(40, r, v, eps) == pytest.approx(tail, rel=1e-10)
    assert one_run_p_value(40, r, 0, eps) == 1.0
    # Approximate DP (Steinke et al. 2023, Sec. 5 / App. D): + 2 m delta max_{1<=i<=v} P[v-i <= Bin(r,q) < v] / i,
    # written out with explicit binomial sums.
    m, delta = 40, 1e-3
    pmf = [math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(r + 1)]
    for v in (21, 27):  # near the mode the max is at i = 1; in the upper tail at i > 1
        alpha = max(sum(pmf[v - i : v]) / i for i in range(1, v + 1))
        expected = sum(pmf[v:]) + 2 * m * delta * alpha
        assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(expected, rel=1e-10)


def test_one_run_delta_correction_holds_on_approximate_dp_mechanism() -> None:
    # Mechanism that is (eps, delta)-DP per canary but not eps-DP: reveal the canary's bit w.p. delta, otherwise
    # eps-randomized response. Guessing all m canaries, W ~ Bin(m, delta + (1 - delta) q) exactly.
    m, eps, delta = 200, 1.0, 2e-3
    q = math.exp(eps) / (1 + math.exp(eps))
    w_tail = stats.binom.sf(np.arange(m + 1) - 1, m, delta + (1 - delta) * q)  # P[W >= v]
    pure = np.array([one_run_p_value(m, m, v, eps, 0.0) for v in range(m + 1)])
    approx = np.array([one_run_p_value(m, m, v, eps, delta) for v in range(m + 1)])
    assert np.any(w_tail > pure * (1 + 1e-9))  # the pure-DP p-value is invalid here ...
    assert np.all(w_tail <= approx * (1 + 1e-9))  # ... the delta-corrected one dominates the true tail
    # delta only weakens the bound.
    bounds = [one_run_epsilon_lower_bound(10_000, 10_000, 7_500, d) for d in (0.0, 1e-7, 1e-6, 1e-5)]
    assert all(a > b for a, b in zip(bounds[:-1], bounds[1:]))


def _rr_one_run(rng: np.random.Generator, m: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    included = rng.random(m) < 0.5
    correct = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
    says_in = np.where(correct, included, ~included)
    scores = np.where(says_in, 0.0, 1.0) + 1e-3 * rng.random(m)  # loss-like: low = member; noise breaks ties
    return scores, included


def test_one_run_randomized_response_is_sound_and_tight() -> None:
    eps, conf, rng = 1.0, 0.95, np.random.default_rng(2)
    m = 10_000
    bounds = np.array([one_run_audit(*_rr_one_run(rng, m, eps), m // 2, m // 2, 0.0, conf).epsilon for _ in range(200)])
    # Exceeding the true eps happens with probability <= 5%; 200 seeds: 20 is > 3 sd above the mean of 10.
    assert np.mean(bounds > eps) <= 20 / 200
    assert 0.9 * eps < np.median(bounds) < eps
    big = [one_run_audit(*_rr_one_run(rng, 100_000, eps), 50_000, 50_000, 0.0, conf).epsilon for _ in range(10)]
    small = [one_run_audit(*_rr_one_run(rng, 1_000, eps), 500, 500, 0.0, conf).epsilon for _ in range(10)]
    assert np.median(small) < np.median(bounds) < np.median(big) < eps
    assert np.median(big) > 0.97 * eps
    # With delta the bound stays valid and close.
    with_delta = one_run_audit(*_rr_one_run(rng, 100_000, eps), 50_000, 50_000, 1e-6, conf).epsilon
    assert 0.9 * eps < with_delta < eps


def test_one_run_mechanism_revealing_everything() -> None:
    rng, m, conf = np.random.default_rng(3), 1000, 0.95
    included = rng.random(m) < 0.5
    n_in = int(included.sum())  # guess IN on exactly the members' scores, OUT on the rest
    res = one_run_audit(np.where(included, 0.0, 1.0), included, n_in, m - n_in, 0.0, conf)
    assert (res.r, res.v, res.accuracy) == (m, m, 1.0)
    assert res.epsilon == pytest.approx(_logit((1.0 - conf) ** (1.0 / m)), rel=1e-8)  # q^m = beta
    assert res.epsilon > 5.0
    # Abstaining on most canaries: fewer guesses, smaller but still large bound.
    res_k = one_run_audit(np.where(included, 0.0, 1.0) + rng.random(m), included, 100, 100, 0.0, conf)
    assert res_k.v == 200 and 3.0 < res_k.epsilon < res.epsilon


def test_one_run_guess_counting_by_hand() -> None:
    scores, included = [0.1, 0.5, 0.9, 0.3], [True, False, False, True]
    res = one_run_audit(scores, included, 1, 1)
    assert (res.m, res.r, res.v) == (4, 2, 2)  # IN guess on 0.1 (member), OUT guess on 0.9 (non-member)
    res_hi = one_run_audit(scores, included, 1, 1, higher_is_in=True)
    assert res_hi.v == 0  # IN guess on 0.9, OUT guess on 0.1: both wrong
    res_all = one_run_audit(scores, np.array([1, 0, 0, 1]), 2, 2)
    assert (res_all.r, res_all.v) == (4, 4)


def test_one_run_validation() -> None:
    with pytest.raises(ValueError, match="k_neg.*3"):
        one_run_audit([0.0, 1.0, 2.0], [True, False, True], 1, 3)
    with pytest.raises(ValueError, match="included.*shape"):
        one_run_audit([0.0, 1.0], [True], 1, 1)
    with pytest.raises(ValueError, match="v.*11"):
        one_run_epsilon_lower_bound(20, 10, 11)
    with pytest.raises(ValueError, match="confidence"):
        one_run_epsilon_lower_bound(20, 10, 5, confidence=1.5)
    with pytest.raises(ValueError, match="epsilon.*-1"):
        one_run_p_value(20, 10, 5, -1.0)


# ------------------------------------------------------------------------ estimators with a reference / eval split


@pytest.mark.parametrize(("k", "n"), [(1, 50), (3, 50), (10, 1000), (500, 1000), (1000, 1000)])
def test_clopper_pearson_lower_is_exact_binomial_tail(k: int, n: int) -> None:
    alpha = 0.025
    p_l = clopper_pearson_lower(k, n, alpha)
    assert stats.binom.sf(k - 1, n, p_l) == pytest.approx(alpha, rel=1e-6)  # P[Bin(n, p_l) >= k] = alpha
    assert p_l < k / n and clopper_pearson_lower(0, n, alpha) == 0.0


def _gaussian_splits(rng, mu: float, n_ref: int, n_eval: int) -> tuple[ScoreSplit, ScoreSplit]:
    """Equal-variance Gaussian scores (lower = IN): the trade-off curve is exactly G_mu at every threshold."""
    ref = ScoreSplit(rng.normal(-mu, 1, n_ref), rng.normal(0, 1, n_ref),
                     [f"ref-in-{i}" for i in range(n_ref)], [f"ref-out-{i}" for i in range(n_ref)])
    ev = ScoreSplit(rng.normal(-mu, 1, n_eval), rng.normal(0, 1, n_eval),
                    [f"ev-in-{i}" for i in range(n_eval)], [f"ev-out-{i}" for i in range(n_eval)])
    return ref, ev


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_gdp_estimator_recovers_mu_of_gaussian_scores(mu: float) -> None:
    """Synthetic scores with known mu: the GDP estimator's interval covers it at (at least) its confidence, its
    lower bound is below it (one-sided 95%), its point estimate is unbiased to a few hundredths, and the eps it
    certifies is the conversion of mu_lower, never above the mechanism's own eps(mu)."""
    rng = np.random.default_rng(int(mu * 10))
    trials, hits, below, points = 120, 0, 0, []
    eps_true = gdp_mu_to_epsilon(mu, 1e-5)
    for _ in range(trials):
        ref, ev = _gaussian_splits(rng, mu, 50, 300)
        r = estimate(ref, ev, 1e-5, 0.95, estimator="gdp")
        hits += r.mu_lower <= mu <= r.mu_upper
        below += r.mu_lower <= mu
        points.append(r.mu_estimate)
        assert r.epsilon == pytest.approx(gdp_mu_to_epsilon(r.mu_lower, 1e-5), rel=1e-9)
        assert r.max_certifiable > r.epsilon
    assert below / trials >= 0.93  # one-sided 95% (binomial slack for 120 trials)
    assert hits / trials >= 0.88  # two-sided >= 90%
    assert abs(np.mean(points) - mu) < 0.06
    assert np.mean(points) - 2 * np.std(points) / math.sqrt(trials) < mu + 0.06
    # with 300 models per side the bound is close to the truth at mu = 2 (near-tight audit) and below eps(mu)
    if mu == 2.0:
        ref, ev = _gaussian_splits(np.random.default_rng(7), mu, 50, 300)
        r = estimate(ref, ev, 1e-5)
        assert 0.75 * eps_true < r.epsilon < eps_true


def test_gaussian_mu_estimate_covers_mu() -> None:
    rng = np.random.default_rng(3)
    hits = 0
    for _ in range(200):
        mu_hat, lo, hi = gaussian_mu_estimate(rng.normal(-3.0, 1.5, 400), rng.normal(0.0, 1.5, 400), 0.95)  # mu = 3 / 1.5
        hits += lo <= 2.0 <= hi
    assert hits / 200 >= 0.92
    mu_hat, lo, hi = gaussian_mu_estimate([2.0, 4.0], [0.0, 2.0], higher_is_in=True)
    assert mu_hat == pytest.approx(2.0 / math.sqrt(2.0)) and lo < mu_hat < hi
    with pytest.raises(ValueError, match="zero variance"):
        gaussian_mu_estimate([1.0, 1.0], [1.0, 1.0])


def test_threshold_is_chosen_on_reference_and_bound_computed_on_evaluation() -> None:
    """The selection split never evaluates: overlapping model ids are refused, and the reported counts are those
    of the *reference* threshold on the evaluation models, not the best threshold on the evaluation models."""
    rng = np.random.default_rng(11)
    ref, ev = _gaussian_splits(rng, 1.5, 40, 200)
    with pytest.raises(ValueError, match="disjoint"):
        estimate(ref, ref, 1e-5)
    leaky = ScoreSplit(ev.scores_in, ev.scores_out, ev.ids_in[:-1] + (ref.ids_in[0],), ev.ids_out)
    with pytest.raises(ValueError, match="1 model"):
        estimate(ref, leaky, 1e-5)
    with pytest.raises(ValueError, match="twice"):
        ScoreSplit([0.0, 1.0], [2.0], ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="one id per model"):
        ScoreSplit([0.0, 1.0], [2.0], ["a"], ["b"])
    with pytest.raises(TypeError, match="ScoreSplit"):
        estimate((ref.scores_in, ref.scores_out), ev, 1e-5)  # type: ignore[arg-type]
    for est in ("gdp", "clopper_pearson"):
        r = estimate(ref, ev, 1e-5, estimator=est)
        objective = selection_objective(est, 1e-5)
        assert r.threshold == select_threshold(ref.scores_in, ref.scores_out, 1e-5, objective=objective)
        counted = audit_scores(ev.scores_in, ev.scores_out, r.threshold, 1e-5)
        assert (r.evaluation.fp, r.evaluation.fn) == (counted.fp, counted.fn)
        optimistic = select_threshold(ev.scores_in, ev.scores_out, 1e-5, objective=objective)
        best = audit_scores(ev.scores_in, ev.scores_out, optimistic, 1e-5)
        bound = best.epsilon_gdp if est == "gdp" else best.epsilon
        assert r.epsilon <= bound + 1e-12  # the max over evaluation thresholds is the optimistic number
        assert r.assumption == ASSUMPTIONS[est]
    assert "Gaussian" in ASSUMPTIONS["gdp"] and "any (eps, delta)-DP" in ASSUMPTIONS["clopper_pearson"]


def test_selection_objectives_rank_by_their_own_bound() -> None:
    gdp, cp = selection_objective("gdp", 1e-5), selection_objective("clopper_pearson", 1e-5)
    # (FP, FN) on 100 / 100: a low-FPR point wins on CP, a balanced point on GDP's mu
    tail, balanced = (0, 60), (12, 12)
    assert epsilon_lower_bound(*tail, 100, 100, 1e-5) > epsilon_lower_bound(*balanced, 100, 100, 1e-5)
    assert gdp_mu_lower_bound(*balanced, 100, 100) > gdp_mu_lower_bound(*tail, 100, 100)
    assert cp(*tail, 100, 100) > cp(*balanced, 100, 100) and gdp(*balanced, 100, 100) > gdp(*tail, 100, 100)
    with pytest.raises(ValueError, match="estimator"):
        selection_objective("auc", 1e-5)


def test_gdp_mu_interval_formula() -> None:
    lo, point, hi = gdp_mu_interval(10, 40, 200, 200, 0.95)
    u_fp, u_fn = clopper_pearson_upper(10, 200, 0.025), clopper_pearson_upper(40, 200, 0.025)
    l_fp, l_fn = clopper_pearson_lower(10, 200, 0.025), clopper_pearson_lower(40, 200, 0.025)
    assert lo == pytest.approx(stats.norm.isf(u_fp) - stats.norm.ppf(u_fn), rel=1e-12)
    assert hi == pytest.approx(stats.norm.isf(l_fp) - stats.norm.ppf(l_fn), rel=1e-12)
    assert point == pytest.approx(stats.norm.isf(10.5 / 201) - stats.norm.ppf(40.5 / 201), rel=1e-12)
    assert lo < point < hi and gdp_mu_interval(0, 0, 50, 50)[2] == math.inf
