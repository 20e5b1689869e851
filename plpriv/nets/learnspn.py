"""LearnSPN (Gens & Domingos, "Learning the Structure of Sum-Product Networks", ICML 2013) for binary data.

Written here because neither maintained implementation is installed (SPFlow, deeprob-kit: absent, no internet) and
the algorithm is short. Top-down recursion on (rows, scope):

* one variable: a Bernoulli leaf, p = (count + alpha) / (rows + 2 alpha);
* fewer than ``min_instances`` rows: a product of Bernoulli leaves (fully factorised);
* variables split: pairwise G-tests of independence (G = 2 N I(x_i; x_j), chi^2 with 1 dof at ``p_value``); the
  connected components of the dependence graph, if more than one, become the children of a product node;
* otherwise the rows are clustered (k-means, 2 clusters, scikit-learn) and a sum node mixes the clusters with weights
  proportional to their sizes.

The result is a tree, valid by construction (complete sums, decomposable products), so ``log_prob`` is exact and
normalised and ``sample`` is exact ancestral sampling. ``num_parameters`` counts one weight per sum-node edge and one
probability per Bernoulli leaf.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from scipy.sparse.csgraph import connected_components
from scipy.stats import chi2
from torch import Tensor, nn

from plpriv.nets.variable_order import mutual_information


@dataclass
class _Node:
    kind: str  # "leaf", "prod" or "sum"
    var: int = -1  # leaf only
    p1: float = 0.5  # leaf only: p(x_var = 1)
    children: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # sum only


class LearnSPN(nn.Module):
    """A LearnSPN tree over ``num_vars`` binary variables learnt from ``train`` [N, d] (0/1).

    Args:
        min_instances: below this many rows a node becomes a fully factorised product.
        p_value: significance of the pairwise G-test; variables are dependent when G exceeds chi^2_1(1 - p_value).
        alpha: Laplace smoothing of the Bernoulli leaves.
        seed: seed of the k-means clustering.
    """

    num_states = 2

    def __init__(self, train: Tensor, min_instances: int = 50, p_value: float = 0.015, alpha: float = 0.1,
                 seed: int = 0) -> None:
        super().__init__()
        if not isinstance(train, Tensor) or train.ndim != 2 or train.numel() == 0 or train.min() < 0 or train.max() > 1:
            raise ValueError("`train` must be a non-empty 0/1 tensor [N, d]")
        if min_instances < 2 or not 0 < p_value < 1:
            raise ValueError(f"need min_instances >= 2 and 0 < p_value < 1, got {min_instances!r}, {p_value!r}")
        self.num_vars = train.shape[1]
        self.min_instances, self.alpha, self.seed = min_instances, alpha, seed
        self.g_threshold = float(chi2.ppf(1 - p_value, df=1))
        self.nodes: list[_Node] = []
        x = train.long()
        self.root = self._learn(x, torch.arange(len(x)), list(range(self.num_vars)))
        self._compile()

    # -- structure learning --------------------------------------------------------------------------------------
    def _add(self, node: _Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def _leaf(self, x: Tensor, rows: Tensor, var: int) -> int:
        p1 = (x[rows, var].sum().item() + self.alpha) / (len(rows) + 2 * self.alpha)
        return self._add(_Node("leaf", var=var, p1=p1))

    def _factorised(self, x: Tensor, rows: Tensor, scope: list[int]) -> int:
        return self._add(_Node("prod", children=[self._leaf(x, rows, v) for v in scope]))

    def _learn(self, x: Tensor, rows: Tensor, scope: list[int]) -> int:
        if len(scope) == 1:
            return self._leaf(x, rows, scope[0])
        if len(rows) < self.min_instances:
            return self._factorised(x, rows, scope)
        sub = x[rows][:, scope]
        g = 2 * len(rows) * mutual_information(sub, pseudo_count=1e-3)  # G statistic of each pair
        count, label = connected_components((g > self.g_threshold).numpy(), directed=False)
        if count > 1:  # independent groups of variables: product node
            groups = [[scope[i] for i in range(len(scope)) if label[i] == c] for c in range(count)]
            return self._add(_Node("prod", children=[self._learn(x, rows, grp) for grp in groups]))
        from sklearn.cluster import KMeans

        assign = KMeans(2, n_init=3, random_state=self.seed).fit_predict(sub.double().numpy())
        assign = torch.as_tensor(assign)
        parts = [rows[assign == c] for c in (0, 1)]
        if min(len(p) for p in parts) == 0:  # clustering found no split: stop here
            return self._factorised(x, rows, scope)
        children = [self._learn(x, part, scope) for part in parts]
        return self._add(_Node("sum", children=children, weights=[len(p) / len(rows) for p in parts]))

    def _compile(self) -> None:
        """Leaves as vectors (evaluated in one gather); nodes are stored children-first, so one pass evaluates all."""
        leaves = [i for i, n in enumerate(self.nodes) if n.kind == "leaf"]
        self.leaf_slot = {node: slot for slot, node in enumerate(leaves)}
        self.register_buffer("leaf_var", torch.tensor([self.nodes[i].var for i in leaves], dtype=torch.long))
        p1 = torch.tensor([self.nodes[i].p1 for i in leaves], dtype=torch.float64)
        self.register_buffer("leaf_logp", torch.stack([(1 - p1).log(), p1.log()], dim=1))  # [L, 2]

    # -- inference --------------------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(len(n.weights) if n.kind == "sum" else n.kind == "leaf" for n in self.nodes)

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log p(x), ``[B]``."""
        if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != self.num_vars:
            raise ValueError(f"`x` must be a tensor [B, {self.num_vars}], got {getattr(x, 'shape', type(x))}")
        xl = x.long()
        leaf_vals = self.leaf_logp[torch.arange(len(self.leaf_var))[None], xl[:, self.leaf_var]]  # [B, L]
        vals: list[Tensor | None] = [None] * len(self.nodes)
        for i, node in enumerate(self.nodes):  # children precede their parents
            if node.kind == "leaf":
                vals[i] = leaf_vals[:, self.leaf_slot[i]]
            elif node.kind == "prod":
                vals[i] = torch.stack([vals[c] for c in node.children], -1).sum(-1)
            else:
                logw = torch.tensor(node.weights, dtype=torch.float64).log()
                vals[i] = torch.logsumexp(torch.stack([vals[c] for c in node.children], -1) + logw, -1)
        return vals[self.root].float()

    forward = log_prob

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Exact ancestral samples ``[num_samples, d]``: each sum node picks one child, products keep all."""
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"`num_samples` must be a positive int, got {num_samples!r}")
        active = [torch.zeros(num_samples, dtype=torch.bool) for _ in self.nodes]
        active[self.root][:] = True
        out = torch.zeros(num_samples, self.num_vars, dtype=torch.long)
        for i in range(len(self.nodes) - 1, -1, -1):  # parents before children
            node, on = self.nodes[i], active[i]
            if node.kind == "prod":
                for c in node.children:
                    active[c] |= on
            elif node.kind == "sum":
                pick = torch.multinomial(torch.tensor(node.weights), num_samples, True, generator=generator)
                for j, c in enumerate(node.children):
                    active[c] |= on & (pick == j)
            else:
                draw = torch.rand(num_samples, generator=generator, dtype=torch.float64) < node.p1
                out[:, node.var] = torch.where(on, draw.long(), out[:, node.var])
        return out
