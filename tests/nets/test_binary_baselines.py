"""Classic binary density baselines and LearnSPN against brute-force sums, closed forms and planted structure."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from plpriv.nets import TensorSPN, distill_to_tspn
from plpriv.nets.binary_baselines import BernoulliMixture, ChowLiuTree, IndependentBernoulli
from plpriv.nets.learnspn import LearnSPN


def all_configs(d: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product([0, 1], repeat=d)), dtype=torch.long)


def mixture_data(n: int, seed: int) -> torch.Tensor:
    """Two planted product distributions over 6 variables (weights 0.3 / 0.7) plus 2 independent coins."""
    gen = torch.Generator().manual_seed(seed)
    mu = torch.tensor([[0.9, 0.9, 0.8, 0.1, 0.2, 0.1], [0.1, 0.2, 0.1, 0.9, 0.8, 0.9]])
    z = (torch.rand(n, generator=gen) < 0.7).long()
    x = (torch.rand(n, 6, generator=gen) < mu[z]).long()
    coins = (torch.rand(n, 2, generator=gen) < torch.tensor([0.3, 0.6])).long()
    return torch.cat([x, coins], 1)


@pytest.mark.parametrize("make", [
    lambda x: IndependentBernoulli(x), lambda x: ChowLiuTree(x), lambda x: BernoulliMixture(x, 3, max_steps=20),
    lambda x: LearnSPN(x, min_instances=30),
])
def test_every_model_is_normalised(make):
    x = mixture_data(800, 0)
    total = make(x).log_prob(all_configs(8)).double().exp().sum().item()
    assert total == pytest.approx(1.0, abs=1e-5)


def test_chow_liu_train_likelihood_is_its_closed_form():
    """Unsmoothed ML tree: mean train LL = -sum_i H(x_i) + sum_edges I(x_i; x_j) (Chow & Liu 1968)."""
    x = mixture_data(2000, 1)
    model = ChowLiuTree(x, alpha=0.0)
    p1 = x.double().mean(0)
    entropy = -(p1 * p1.log() + (1 - p1) * (1 - p1).log()).sum()
    mi_sum = 0.0
    for i in range(8):
        j = int(model.parent[i])
        if j < 0:
            continue
        joint = torch.stack([((x[:, i] == a) & (x[:, j] == b)).double().mean() for a in (0, 1) for b in (0, 1)])
        marg = torch.stack([p1[i] if a else 1 - p1[i] for a in (0, 1) for b in (0, 1)])
        margj = torch.stack([p1[j] if b else 1 - p1[j] for a in (0, 1) for b in (0, 1)])
        mi_sum += (joint * (joint / (marg * margj)).log()).nansum().item()
    assert model.log_prob(x).double().mean().item() == pytest.approx(-entropy.item() + mi_sum, abs=1e-4)
    assert model.num_parameters() == 15


def test_bernoulli_mixture_recovers_the_planted_components():
    x = mixture_data(4000, 2)
    model = BernoulliMixture(x, 2, val=mixture_data(500, 3), max_steps=200, seed=0)
    weights = model.log_pi.exp()
    big = int(weights.argmax())
    assert weights[big].item() == pytest.approx(0.7, abs=0.03)
    assert torch.allclose(model.mu[big, :6].float(), torch.tensor([0.1, 0.2, 0.1, 0.9, 0.8, 0.9]), atol=0.04)
    assert model.steps < 200 and model.num_parameters() == 2 * 9
    assert model.log_prob(x).mean() > IndependentBernoulli(x).log_prob(x).mean() + 0.5


def test_learnspn_splits_independent_variables_and_samples_exactly():
    x = mixture_data(3000, 4)
    spn = LearnSPN(x, min_instances=100, seed=0)
    root = spn.nodes[spn.root]
    assert root.kind == "prod"  # the two coins are independent of the mixture block and of each other
    scopes = sorted(len([n for n in _leaves_under(spn, c)]) for c in root.children)
    assert scopes[:2] == [1, 1]
    p = spn.log_prob(all_configs(8)).double().exp()
    s = spn.sample(20000, generator=torch.Generator().manual_seed(0))
    exact = (p[:, None] * all_configs(8).double()).sum(0)
    assert torch.allclose(s.double().mean(0), exact, atol=4 * math.sqrt(0.25 / 20000))
    assert spn.num_parameters() == sum(len(n.weights) for n in spn.nodes if n.kind == "sum") + len(spn.leaf_var)
    # the LearnSPN beats the independent model on held-out data (it found the mixture)
    test = mixture_data(1000, 5)
    assert spn.log_prob(test).mean() > IndependentBernoulli(x).log_prob(test).mean() + 0.5


def _leaves_under(spn: LearnSPN, i: int) -> list[int]:
    node = spn.nodes[i]
    return [node.var] if node.kind == "leaf" else [v for c in node.children for v in _leaves_under(spn, c)]


def test_learnspn_maps_to_a_tspn_in_any_chain_order():
    x = mixture_data(2000, 6)
    spn = LearnSPN(x, min_instances=100, seed=0)
    order = [7, 0, 3, 1, 4, 2, 5, 6]
    tspn = distill_to_tspn(spn, rank=2, num_samples=4000, em_steps=100, order=order, val=mixture_data(500, 7))
    assert isinstance(tspn, TensorSPN) and tspn.order.tolist() == order
    assert 1 <= tspn.em_steps_taken < 100
    configs = all_configs(8)
    kl = (spn.log_prob(configs).double().exp() * (spn.log_prob(configs) - tspn.log_prob(configs)).double()).sum()
    assert 0 <= kl.item() < 0.02  # a rank-2 chain holds a 2-component mixture times independent coins
    with pytest.raises(ValueError, match="0/1"):
        LearnSPN(x * 2)
