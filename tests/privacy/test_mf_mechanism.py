"""DP-FTRL as an engine mechanism: the noise stream, the participation schema and the accountants, against
independent facts (the direct noise formula, C^{-1}'s covariance, the analytic Gaussian, opacus' RDP of the
subsampled Gaussian, dp-accounting's PLD)."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
from opacus.accountants.analysis import rdp as opacus_rdp
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, TensorDataset

from plpriv.privacy.matrix_factorization import correlated_noise, gaussian_epsilon, strategy
from plpriv.privacy.mf_mechanism import MatrixFactorizationMechanism
from plpriv.privacy.sparsified_gaussian import ORDERS as SPARSE_ORDERS
from plpriv.privacy.participation import Participation, participation_of
from plpriv.privacy.streaming import NoiseStream
from plpriv.utils import seeding


def seeds(i: int, j: int) -> int:
    return seeding.derive_seed(7, "mf-noise", i, j)


# --------------------------------------------------------------------------- the noise stream
@pytest.mark.parametrize("name,bands", [("bsr", 4), ("optimized_banded", 3), ("tree", None)])
def test_stream_equals_the_direct_formula_also_after_a_cold_start(name: str, bands: int | None) -> None:
    s = strategy(name, 16, bands, **({"normalize": True} if name == "bsr" else {}))
    shapes = [torch.Size([3, 2]), torch.Size([5])]
    stream, cold = NoiseStream(s, seeds), NoiseStream(s, seeds)
    assert stream.recursive == (name != "tree")
    for t in range(16):
        got = stream.noise(t, shapes)
        want = [correlated_noise(s.noise, t, shape, lambda j, i=i: seeds(i, j), dtype=torch.float64)
                for i, shape in enumerate(shapes)]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
        if t >= 9:  # a resumed fit starts with an empty buffer at step 9
            for a, b in zip(cold.noise(t, shapes), got):
                torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    with pytest.raises(RuntimeError, match="horizon"):
        stream.noise(16, shapes)


def test_stream_noise_has_the_covariance_of_C_inverse() -> None:
    """Coordinates are iid across the tensor: 40k samples of the n-vector of step noises; Cov = C^{-1} C^{-T}."""
    s = strategy("optimized_banded", 8, 3)
    stream = NoiseStream(s, seeds)
    z = torch.stack([stream.noise(t, [torch.Size([40_000])])[0] for t in range(8)])  # [n, samples]
    cov = z @ z.T / z.shape[1]
    want = s.noise @ s.noise.T
    assert (cov - want).abs().max() < 0.05  # sampling error of each entry <= ~5 / sqrt(40k) * scale (~0.03)


# --------------------------------------------------------------------------- participation
def _loader(**kwargs: object) -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(10, 2)), batch_size=3, **kwargs)  # type: ignore[arg-type]


def test_participation_schemas() -> None:
    fixed = participation_of(_loader(shuffle=False), 4, 10)
    assert (fixed.schema, fixed.min_separation, fixed.max_participations) == ("fixed-order", 4, 3)
    shuffled = participation_of(_loader(shuffle=True), 4, 10)
    assert (shuffled.min_separation, shuffled.max_participations) == (1, 3)
    data = TensorDataset(torch.zeros(10, 2))
    dist = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, num_replicas=2, rank=0, shuffle=False))
    assert participation_of(dist, 3, 6).schema == "fixed-order"
    with pytest.raises(ValueError, match="replacement"):
        participation_of(DataLoader(data, sampler=RandomSampler(data, replacement=True)), 4, 10)
    padded = DistributedSampler(TensorDataset(torch.zeros(9, 2)), num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="pads"):
        participation_of(DataLoader(data, sampler=padded), 4, 10)


# --------------------------------------------------------------------------- accounting
def _planned(name: str, n: int = 24, per_epoch: int = 6, schema: str = "fixed-order", **kwargs: object
             ) -> MatrixFactorizationMechanism:
    m = MatrixFactorizationMechanism(name, **kwargs)  # type: ignore[arg-type]
    m.plan(n, per_epoch, Participation(schema, per_epoch, n))
    return m


@pytest.mark.parametrize("name", ["identity", "bsr", "optimized_banded"])
def test_banded_unit_columns_cost_sqrt_k(name: str) -> None:
    """k = 4 epochs of a unit-column banded strategy (bands = steps per epoch): the Gaussian with mu = 2 / sigma,
    equal to dp-accounting's PLD of the 4-fold composed Gaussian."""
    m = _planned(name)
    assert m.sens == pytest.approx(2.0, abs=1e-9)
    eps = m.epsilon([(1.5, 0.25, 24)], 1e-5)
    assert eps == pytest.approx(gaussian_epsilon(2.0 / 1.5, 1e-5), rel=1e-9)
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(dp_accounting.GaussianDpEvent(1.5), 4)
    assert eps == pytest.approx(pld.get_epsilon(1e-5), rel=2e-3)
    assert m.epsilon([(1.5, 0.25, 25)], 1e-5) == math.inf  # beyond the horizon: not covered


def test_single_epoch_tree_equals_its_closed_form() -> None:
    """One epoch, one participation: sens^2 = ceil(log2(n + 1)) (dp-accounting's SingleEpochTreeAggregation)."""
    m = _planned("tree", n=24, per_epoch=24)
    assert m.sens ** 2 == pytest.approx(math.ceil(math.log2(25)))
    assert m.epsilon([(3.0, 1.0, 24)], 1e-6) == pytest.approx(gaussian_epsilon(m.sens / 3.0, 1e-6), rel=1e-9)


def test_tree_restart_per_epoch_costs_epochs_times_depth() -> None:
    """4 epochs of 6 steps, one tree per epoch: sens^2 = 4 (floor(log2 6) + 1) = 12, below the single tree's bound."""
    restart, single = _planned("tree-restart"), _planned("tree")
    assert restart.sens ** 2 == pytest.approx(12.0)
    assert restart.sens < single.sens  # type: ignore[operator]
    stream = NoiseStream(restart.strategy, seeds)  # type: ignore[arg-type]
    assert not stream.recursive and len(stream.noise(23, [torch.Size([2])])) == 1


def test_sparsified_accountant_against_the_naive_bound_and_opacus() -> None:
    """Banded, k participations: epsilon = k-fold sampled Gaussian at rate gamma (the 1-sparse worst case; opacus'
    RDP formula), below the naive dense bound that ignores the masks; the tree gets the naive bound only."""
    sigma, delta, k = 1.2, 1e-5, 4
    dense = _planned("optimized_banded").epsilon([(sigma, 0.25, 24)], delta)
    sparse_mech = _planned("optimized_banded", keep_fraction=0.1)
    assert sparse_mech.banded_participations == k
    sparse = sparse_mech.epsilon([(sigma, 0.25, 24)], delta)
    orders = [float(a) for a in SPARSE_ORDERS]  # the integer orders of the sparsified bound
    rdp = opacus_rdp.compute_rdp(q=0.1, noise_multiplier=sigma, steps=k, orders=orders)
    sgm, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    assert sparse == pytest.approx(min(dense, sgm), rel=1e-6)
    assert sparse < 0.5 * dense
    tree = _planned("tree", keep_fraction=0.1)
    assert tree.banded_participations is None
    assert tree.epsilon([(sigma, 0.25, 24)], delta) == _planned("tree").epsilon([(sigma, 0.25, 24)], delta)
    shuffled = _planned("optimized_banded", schema="reshuffled", keep_fraction=0.1)
    assert shuffled.banded_participations is None  # min-separation 1: the masks' argument does not apply


@pytest.mark.parametrize("keep", [1.0, 0.3])
def test_calibration_round_trip(keep: float) -> None:
    m = _planned("bsr", keep_fraction=keep)
    sigma = m.calibrate(2.0, 1e-5, 0.25, 24)
    assert m.epsilon([(sigma, 0.25, 24)], 1e-5) <= 2.0
    assert m.epsilon([(sigma * 0.99, 0.25, 24)], 1e-5) > 2.0


def test_refusals() -> None:
    with pytest.raises(ValueError, match="poisson_sampling=False"):
        MatrixFactorizationMechanism().check_run(True, "zero_out", False)
    with pytest.raises(ValueError, match="zero_out"):
        MatrixFactorizationMechanism().check_run(False, "add_remove", False)
    with pytest.raises(ValueError, match="secure_mode"):
        MatrixFactorizationMechanism().check_run(False, "zero_out", True)
    with pytest.raises(ValueError, match="strategy"):
        MatrixFactorizationMechanism("banded")
    with pytest.raises(ValueError, match="bands"):
        MatrixFactorizationMechanism("tree", bands=3)
    m = MatrixFactorizationMechanism("bsr")
    m.resume({"horizon": 12, "participation": "fixed-order"})
    with pytest.raises(ValueError, match="planned for 12 steps"):
        m.plan(24, 6, Participation("fixed-order", 6, 24))
    with pytest.raises(ValueError, match="participation"):
        m.plan(12, 6, Participation("reshuffled", 6, 12))
