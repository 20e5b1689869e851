"""TensorSPN and RandomSPN against brute-force sums over all 2^d configurations, tensorly and planted distributions."""

from __future__ import annotations

import itertools

import pytest
import tensorly as tl
import torch
from tensorly.backend import backend_context

from plpriv.nets import RandomSPN, TensorSPN, distill_to_tspn, fit_density


def all_configs(d: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product([0, 1], repeat=d)), dtype=torch.long)


def dense(cores: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor of a TT, contracted by tensorly (independent of TensorSPN's own contraction)."""
    with backend_context("pytorch"):
        return tl.tt_to_tensor([c.detach().double() for c in cores])


def random_tt(d: int, rank: int, seed: int) -> list[torch.Tensor]:
    """A planted nonnegative TT with some near-deterministic structure (cores rand**3)."""
    gen = torch.Generator().manual_seed(seed)
    ranks = [1] + [rank] * (d - 1) + [1]
    return [torch.rand(ranks[k], 2, ranks[k + 1], generator=gen, dtype=torch.float64) ** 3 for k in range(d)]


@pytest.mark.parametrize("parameterization", ["exp", "softplus"])
def test_all_configurations_sum_to_one(parameterization):
    model = TensorSPN(10, 2, [2, 3, 4, 5, 4, 3, 2, 2, 3], parameterization, init="random", init_scale=1.5, seed=1)
    total = model.log_prob(all_configs(10)).exp().sum().item()
    assert abs(total - 1.0) < 1e-5


def test_log_prob_equals_tensorly_contraction_of_the_cores():
    model = TensorSPN(8, 2, 3, init="random", init_scale=1.0, seed=2)
    full = dense([lc.exp() for lc in model.log_cores()])
    expected = (full / full.sum()).reshape(-1)  # itertools order = C order of the full tensor
    assert torch.allclose(model.log_prob(all_configs(8)).exp().double(), expected, atol=1e-6)


def test_marginals_and_conditionals_equal_brute_force_sums():
    d = 8
    model = TensorSPN(d, 2, 3, init="random", init_scale=1.2, seed=3)
    x = all_configs(d)
    p = model.log_prob(x).exp().double()
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(len(x), d, generator=gen) < 0.5  # a different observed set in every row
    got = model.marginal_log_prob(x, masks).exp().double()
    for i in range(0, len(x), 17):
        keep = masks[i]
        agree = (x[:, keep] == x[i, keep]).all(dim=1)
        assert abs(got[i].item() - p[agree].sum().item()) < 1e-6
    # conditional p(x_q | x_e) and the per-variable conditional marginals
    evidence = torch.tensor([1, 0, 0, 1, 0, 1, 0, 0], dtype=torch.bool)
    query = torch.tensor([0, 1, 0, 0, 0, 0, 1, 0], dtype=torch.bool)
    cond = model.conditional_log_prob(x[:40], query, evidence).exp().double()
    marg = model.conditional_marginals(x[:40], evidence).exp().double()
    for i in range(40):
        e = (x[:, evidence] == x[i, evidence]).all(dim=1)
        qe = e & (x[:, query] == x[i, query]).all(dim=1)
        assert abs(cond[i].item() - (p[qe].sum() / p[e].sum()).item()) < 1e-5
        for k in (1, 2, 7):
            brute = p[e & (x[:, k] == 1)].sum() / p[e].sum()
            assert abs(marg[i, k, 1].item() - brute.item()) < 1e-5
        assert marg[i, 0, x[i, 0]].item() == pytest.approx(1.0)  # evidence variable: point mass


def test_samples_follow_the_exact_and_the_conditional_distribution():
    d = 6
    model = TensorSPN(d, 2, 3, init="random", init_scale=1.2, seed=4)
    p = model.log_prob(all_configs(d)).exp().double()
    weights = 2 ** torch.arange(d - 1, -1, -1)
    s = model.sample(40000, generator=torch.Generator().manual_seed(0))
    empirical = torch.bincount((s * weights).sum(1), minlength=2**d).double() / len(s)
    assert 0.5 * (empirical - p).abs().sum().item() < 0.03  # total variation
    evidence = torch.tensor([1, 0, 0, 0, 0, 1], dtype=torch.bool)
    x = torch.tensor([[1, 0, 0, 0, 0, 0]])
    s = model.sample(20000, x, evidence, generator=torch.Generator().manual_seed(1))
    assert (s[:, 0] == 1).all() and (s[:, 5] == 0).all()
    match = (all_configs(d)[:, 0] == 1) & (all_configs(d)[:, 5] == 0)
    cond = p * match / (p * match).sum()
    empirical = torch.bincount((s * weights).sum(1), minlength=2**d).double() / len(s)
    assert 0.5 * (empirical - cond).abs().sum().item() < 0.03


def test_mpe_is_the_max_product_over_states_and_bond_indices():
    d, r = 6, 2
    model = TensorSPN(d, 2, r, init="random", init_scale=1.5, seed=5)
    cores = [lc.exp().detach().double() for lc in model.log_cores()]
    # brute force: max over all x and all bond indices of prod_k G_k[a_{k-1}, x_k, a_k]
    best, best_x = -1.0, None
    for xs in itertools.product([0, 1], repeat=d):
        for bonds in itertools.product(range(r), repeat=d - 1):
            a = (0, *bonds, 0)
            value = torch.prod(torch.stack([cores[k][a[k], xs[k], a[k + 1]] for k in range(d)])).item()
            if value > best:
                best, best_x = value, xs
    states, _ = model.mpe()
    assert tuple(states[0].tolist()) == best_x
    # with evidence the observed variables are kept; rank 1 (fully factorised): the MPE is the exact argmax
    factorised = TensorSPN(d, 2, 1, init="random", init_scale=1.5, seed=6)
    x = torch.tensor([[1, 0, 0, 0, 0, 0]])
    evidence = torch.tensor([1, 0, 0, 0, 0, 0], dtype=torch.bool)
    states, log_p = factorised.mpe(x, evidence)
    lp = factorised.log_prob(all_configs(d))
    allowed = all_configs(d)[:, 0] == 1
    assert states[0, 0] == 1 and log_p.item() == pytest.approx(lp[allowed].max().item(), abs=1e-6)


def test_tensorly_round_trip_and_planted_tt_import():
    model = TensorSPN(7, 2, 3, init="random", init_scale=1.0, seed=7)
    tt = model.to_tensorly()
    full = dense(tt.factors)
    assert full.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(full.reshape(-1), model.log_prob(all_configs(7)).exp().double(), atol=1e-6)
    planted = random_tt(7, 3, seed=0)
    target = dense(planted)
    imported = TensorSPN.from_tensorly(planted)
    expected = (target / target.sum()).reshape(-1)
    assert torch.allclose(imported.log_prob(all_configs(7)).exp().double(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="nonnegative"):
        TensorSPN.from_tensorly([-c for c in planted])


def test_cores_stay_nonnegative_under_aggressive_training():
    x = torch.randint(0, 2, (64, 8), generator=torch.Generator().manual_seed(0))
    for parameterization in ("exp", "softplus"):
        model = TensorSPN(8, 2, 3, parameterization, seed=8)
        opt = torch.optim.SGD(model.parameters(), lr=5.0)
        for _ in range(30):
            opt.zero_grad()
            (-model.log_prob(x).mean()).backward()
            opt.step()
        assert all((c >= 0).all() for c in model.to_tensorly().factors)
        assert abs(model.log_prob(all_configs(8)).exp().sum().item() - 1.0) < 1e-4


def test_recovers_a_planted_low_rank_tt_distribution():
    """A rank-2 tSPN fitted to samples of a planted rank-2 TT reaches the planted model's held-out log-likelihood."""
    d = 8
    planted = dense(random_tt(d, 2, seed=1)).reshape(-1)
    p = planted / planted.sum()
    gen = torch.Generator().manual_seed(2)
    x = all_configs(d)[torch.multinomial(p, 10000, replacement=True, generator=gen)]
    train, test = x[:8000], x[8000:]
    true_ll = p.log()[(test * 2 ** torch.arange(d - 1, -1, -1)).sum(1)].mean().item()
    model = TensorSPN(d, 2, 2, init="random", init_scale=0.5, seed=3)
    initial_ll = model.log_prob(test).mean().item()
    fit_density(model, train, epochs=8, batch_size=400, lr=0.1)
    ll = model.log_prob(test).detach().mean().item()
    assert true_ll - initial_ll > 0.3  # the planted distribution is far from the initial model
    assert abs(ll - true_ll) < 0.03, (ll, true_ll)
    em = TensorSPN(d, 2, 2, init="random", init_scale=0.5, seed=4)  # EM from a random start
    history = [em.em_step(train, pseudo_count=1e-6) for _ in range(40)]
    assert all(b >= a - 1e-6 for a, b in zip(history, history[1:]))  # EM never lowers the likelihood
    assert abs(em.log_prob(test).mean().item() - true_ll) < 0.03


def test_bad_inputs_are_named():
    model = TensorSPN(4, 2, 2)
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        model.log_prob(torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="states must be in"):
        model.log_prob(torch.full((2, 4), 2))
    with pytest.raises(ValueError, match="inner ranks"):
        TensorSPN(4, 2, [2, 2])
    with pytest.raises(TypeError, match="rank"):
        TensorSPN(4, 2, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bogus"):
        TensorSPN(4, 2, 2, init="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_vars"):
        RandomSPN(4, depth=3)


def test_random_spn_is_valid_marginalises_exactly_and_samples_exactly():
    d = 10
    spn = RandomSPN(d, 2, depth=2, repetitions=3, num_sums=3, num_leaves=3, seed=0)
    with torch.no_grad():
        spn.leaf_logits.mul_(3)
    x = all_configs(d)
    p = spn.log_prob(x).exp().double()
    assert abs(p.sum().item() - 1.0) < 1e-5
    mask = torch.zeros(d, dtype=torch.bool)
    mask[[0, 4, 9]] = True
    got = spn.log_prob(x[:50], mask).exp().double()
    for i in range(50):
        assert abs(got[i].item() - p[(x[:, mask] == x[i, mask]).all(1)].sum().item()) < 1e-6
    s = spn.sample(40000, generator=torch.Generator().manual_seed(0))
    empirical = torch.bincount((s * 2 ** torch.arange(d - 1, -1, -1)).sum(1), minlength=2**d).double() / len(s)
    assert 0.5 * (empirical - p).abs().sum().item() < 0.08  # TV over 1024 cells, 40k samples
    # parameter count: leaves R*d*I*n, sum layer R*1*S*I^2 (one internal level at depth 2), root R*S^2
    assert spn.num_parameters() == 3 * d * 3 * 2 + 3 * 2 * 3 * 9 + 3 * 9


def test_distilled_tspn_matches_the_spn():
    """SPN -> tSPN: a rank-8 TT fitted to a small SPN's outputs is close to it in KL over all 2^8 configurations."""
    d = 8
    spn = RandomSPN(d, 2, depth=2, repetitions=2, num_sums=2, num_leaves=2, seed=1)
    with torch.no_grad():
        spn.leaf_logits.mul_(3)
    p = spn.log_prob(all_configs(d)).exp().double()
    tspn = distill_to_tspn(spn, rank=8, num_samples=8000, em_steps=30, epochs=2, seed=0)
    q = tspn.log_prob(all_configs(d)).exp().double()
    kl = (p * (p.log() - q.log())).sum().item()
    uniform_kl = (p * (p.log() + d * torch.log(torch.tensor(2.0)))).sum().item()
    assert uniform_kl > 1.0 and kl < 0.03, (kl, uniform_kl)
