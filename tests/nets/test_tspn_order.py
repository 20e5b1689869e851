"""Variable orders of the tensor SPN: Hilbert curve geometry, MI orders against planted trees, and permuted chains
against brute-force sums over all 2^d states."""

from __future__ import annotations

import itertools

import pytest
import torch
from sklearn.metrics import mutual_info_score

from plpriv.nets import TensorSPN
from plpriv.nets.variable_order import (
    chow_liu_edges, chow_liu_order, hilbert_order, mi_chain_order, mutual_information, resolve_order,
)


def all_configs(d: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product([0, 1], repeat=d)), dtype=torch.long)


def planted_tree(n: int, d: int, flip: float, seed: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Samples of a random tree-structured binary distribution (each child copies its parent, flipped w.p. ``flip``),
    its variables relabelled by a random permutation; returns (samples, undirected edges)."""
    gen = torch.Generator().manual_seed(seed)
    parents = [-1] + [int(torch.randint(0, k, (1,), generator=gen)) for k in range(1, d)]
    x = torch.zeros(n, d, dtype=torch.long)
    x[:, 0] = (torch.rand(n, generator=gen) < 0.5).long()
    for k in range(1, d):
        x[:, k] = x[:, parents[k]] ^ (torch.rand(n, generator=gen) < flip).long()
    perm = torch.randperm(d, generator=gen)  # variable k is stored in column perm[k]
    out = torch.empty_like(x)
    out[:, perm] = x
    edges = {frozenset((int(perm[k]), int(perm[parents[k]]))) for k in range(1, d)}
    return out, edges


def test_hilbert_order_of_an_8x8_grid_visits_every_cell_once_with_unit_steps():
    order = hilbert_order(8, 8)
    assert sorted(order) == list(range(64))
    cells = [(v // 8, v % 8) for v in order]
    assert all(abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1 for a, b in zip(cells, cells[1:]))
    assert cells[0] == (0, 0) and cells[-1] in ((0, 7), (7, 0))  # the curve ends on an adjacent corner
    # each quarter of the curve fills one 4x4 quadrant (the recursive structure)
    for q in range(4):
        quad = {(r // 4, c // 4) for r, c in cells[16 * q: 16 * q + 16]}
        assert len(quad) == 1
    ragged = hilbert_order(3, 5)  # non-square grid: every cell once
    assert sorted(ragged) == list(range(15))
    assert resolve_order("hilbert", 64) == order
    with pytest.raises(ValueError, match="grid"):
        resolve_order("hilbert", 10)


def test_mutual_information_matches_sklearn_and_chow_liu_recovers_a_planted_tree():
    x, edges = planted_tree(4000, 9, flip=0.1, seed=0)
    mi = mutual_information(x, pseudo_count=0.0)
    for i, j in [(0, 1), (2, 7), (4, 8)]:
        assert mi[i, j].item() == pytest.approx(mutual_info_score(x[:, i], x[:, j]), abs=1e-9)
    assert {frozenset(e) for e in chow_liu_edges(mi)} == edges
    order = chow_liu_order(x)
    assert sorted(order) == list(range(9))
    pos = {v: k for k, v in enumerate(order)}
    for v in order[1:]:  # depth-first preorder: every variable has a tree neighbour earlier in the chain
        assert any(frozenset((u, v)) in edges and pos[u] < pos[v] for u in range(9))
    chain = mi_chain_order(x)
    assert sorted(chain) == list(range(9))
    assert frozenset(chain[:2]) in edges  # the first greedy step follows the strongest pair of its start


def _permuted_copy(model: TensorSPN, perm: list[int]) -> TensorSPN:
    """The same cores with chain order ``perm``: core k now holds variable perm[k]."""
    other = TensorSPN(model.num_vars, 2, model.ranks[1:-1], init="random", seed=99, order=perm)
    other.load_state_dict({**model.state_dict(), "order": torch.as_tensor(perm)})
    return other


def test_a_permuted_chain_gives_the_identical_likelihood_and_exact_marginals():
    d = 7
    base = TensorSPN(d, 2, 3, init="random", init_scale=1.2, seed=4)
    perm = [3, 0, 6, 1, 5, 2, 4]
    model = _permuted_copy(base, perm)
    x = all_configs(d)
    y = torch.empty_like(x)
    y[:, perm] = x  # variable perm[k] of y carries the state of chain position k
    assert torch.allclose(model.log_prob(y), base.log_prob(x), atol=1e-6)
    p = model.log_prob(x).exp().double()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
    # marginals of the permuted model: brute-force sums over the unobserved variables
    mask = torch.tensor([1, 0, 1, 0, 0, 1, 0], dtype=torch.bool)
    got = model.marginal_log_prob(x, mask).exp().double()
    for i in range(0, len(x), 11):
        agree = (x[:, mask] == x[i, mask]).all(1)
        assert got[i].item() == pytest.approx(p[agree].sum().item(), rel=1e-5)  # float32 sums
    marg = model.marginal_log_prob(x[:, :1].repeat(1, d) * 0, torch.zeros(d, dtype=torch.bool)).exp()
    assert torch.allclose(marg, torch.ones_like(marg), atol=1e-5)  # nothing observed: the marginal is 1
    # per-variable conditional marginals come back in the caller's variable order
    cm = model.conditional_marginals(x[:5], mask).exp().double()
    for i in range(5):
        e = (x[:, mask] == x[i, mask]).all(1)
        for k in (1, 3, 6):
            assert cm[i, k, 1].item() == pytest.approx((p[e & (x[:, k] == 1)].sum() / p[e].sum()).item(), abs=1e-5)
    # MPE and samples are in the caller's variable order too
    states, _ = model.mpe()
    base_states, _ = base.mpe()
    assert torch.equal(states[0, perm], base_states[0])
    s = model.sample(20000, generator=torch.Generator().manual_seed(0))
    freq = s.double().mean(0)
    exact = (p[:, None] * x.double()).sum(0)
    assert torch.allclose(freq, exact, atol=4 * (0.25 / 20000) ** 0.5)  # 4 sigma of a Bernoulli mean


def test_order_is_saved_with_the_weights_and_em_follows_it():
    d = 6
    perm = [5, 3, 1, 0, 2, 4]
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(300, d, generator=gen) < 0.3).long()
    x[:, 2] = x[:, 5]  # a dependence
    y = torch.empty_like(x)
    y[:, perm] = x
    plain, ordered = TensorSPN(d, 2, 2, seed=0), TensorSPN(d, 2, 2, seed=0, order=perm)
    for _ in range(5):  # EM on the permuted model and permuted data = EM on the plain model and plain data
        a, b = plain.em_step(x), ordered.em_step(y)
        assert a == pytest.approx(b, abs=1e-5)
    restored = TensorSPN(d, 2, 2, seed=7)
    restored.load_state_dict(ordered.state_dict())
    assert restored.order.tolist() == perm
    assert torch.allclose(restored.log_prob(y), plain.log_prob(x), atol=1e-5)
    exported = TensorSPN.from_tensorly(ordered.to_tensorly(), order=perm)  # export keeps the cores in chain order
    assert torch.allclose(exported.log_prob(y), plain.log_prob(x), atol=1e-5)
    with pytest.raises(ValueError, match="permutation"):
        TensorSPN(d, 2, 2, order=[0, 1, 2, 3, 4, 4])
    with pytest.raises(ValueError, match="training split"):
        resolve_order("chow_liu", d)
    with pytest.raises(ValueError, match="unknown order"):
        resolve_order("zigzag", d)


def test_em_to_convergence_stops_early_and_keeps_the_best_validation_cores():
    x, _ = planted_tree(600, 8, flip=0.15, seed=2)
    train, val = x[:400], x[400:]
    model = TensorSPN(8, 2, 2, seed=0)
    start = model.log_prob(val).mean().item()
    steps, best = model.fit_em(train, val, tol=1e-3, patience=3, max_steps=300)
    assert 3 <= steps < 300  # converged before the cap
    assert best == pytest.approx(model.log_prob(val).mean().item(), abs=1e-5)  # the kept cores are the best ones
    assert best > start + 0.5
    one = TensorSPN(8, 2, 2, seed=0)
    steps1, best1 = one.fit_em(train, val, tol=1e-3, patience=1, max_steps=1)
    assert steps1 == 1 and best1 <= best + 1e-6
