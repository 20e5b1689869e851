"""Classic density baselines for binary data: independent Bernoulli, Chow-Liu tree, Bernoulli mixture (EM).

All are fitted in closed form or by EM on the training split and expose ``log_prob(x) -> [B]`` and
``num_parameters()`` (free parameters: probabilities that are not fixed by normalisation, plus mixture weights).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from plpriv.nets.variable_order import chow_liu_edges, mutual_information


def _binary(x: Tensor, num_vars: int | None = None) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 2 or (num_vars is not None and x.shape[1] != num_vars):
        raise ValueError(f"`x` must be a tensor [B, {num_vars or 'd'}], got {getattr(x, 'shape', type(x))}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"`x` must hold 0/1 states, got values in [{x.min()}, {x.max()}]")
    return x.double()


class IndependentBernoulli(nn.Module):
    """p(x) = prod_i p_i^{x_i} (1 - p_i)^{1 - x_i}, p_i = (count_i + alpha) / (N + 2 alpha) (Laplace smoothing)."""

    def __init__(self, train: Tensor, alpha: float = 1.0) -> None:
        super().__init__()
        x = _binary(train)
        self.num_vars = x.shape[1]
        self.register_buffer("p", (x.sum(0) + alpha) / (len(x) + 2 * alpha))

    def num_parameters(self) -> int:
        return self.num_vars

    def log_prob(self, x: Tensor) -> Tensor:
        x = _binary(x, self.num_vars)
        return (x * self.p.log() + (1 - x) * (1 - self.p).log()).sum(-1).float()


class ChowLiuTree(nn.Module):
    """Chow & Liu (1968): the tree-structured distribution of maximum likelihood, p(x) = p(x_root) prod p(x_c | x_pa),
    the tree the maximum spanning tree of the empirical pairwise mutual information (smoothed counts ``alpha``)."""

    def __init__(self, train: Tensor, alpha: float = 1.0) -> None:
        super().__init__()
        x = _binary(train)
        self.num_vars = d = x.shape[1]
        edges = chow_liu_edges(mutual_information(x))
        parent = torch.full((d,), -1, dtype=torch.long)
        for a, b in edges:
            parent[b] = a
        self.register_buffer("parent", parent)
        # cond[i, a, b] = p(x_i = b | x_parent = a); the root (parent -1) uses its marginal for both a
        cond = torch.empty(d, 2, 2, dtype=torch.float64)
        for i in range(d):
            if parent[i] < 0:
                p1 = (x[:, i].sum() + alpha) / (len(x) + 2 * alpha)
                cond[i] = torch.stack([1 - p1, p1])
                continue
            xp = x[:, parent[i]]
            for a in (0, 1):
                rows = xp == a
                p1 = (x[rows, i].sum() + alpha) / (rows.sum() + 2 * alpha)
                cond[i, a] = torch.stack([1 - p1, p1])
        self.register_buffer("log_cond", cond.log())

    def num_parameters(self) -> int:
        return 1 + 2 * (self.num_vars - 1)

    def log_prob(self, x: Tensor) -> Tensor:
        xi = _binary(x, self.num_vars).long()
        pa = xi[:, self.parent.clamp_min(0)] * (self.parent >= 0)  # root: parent state 0 (both rows equal)
        ar = torch.arange(self.num_vars)
        return self.log_cond[ar, pa, xi].sum(-1).float()


class BernoulliMixture(nn.Module):
    """p(x) = sum_k pi_k prod_i Bern(x_i; mu_ki), fitted by EM (Dempster et al. 1977) with a Beta(alpha + 1, alpha + 1)
    MAP M-step; EM stops once the validation log-likelihood has not improved by ``tol`` for ``patience`` steps."""

    def __init__(
        self, train: Tensor, components: int, val: Tensor | None = None, max_steps: int = 200, tol: float = 1e-3,
        patience: int = 5, alpha: float = 0.1, seed: int = 0,
    ) -> None:
        super().__init__()
        x = _binary(train)
        self.num_vars, self.components = x.shape[1], components
        gen = torch.Generator().manual_seed(seed)
        resp = torch.rand(len(x), components, generator=gen, dtype=torch.float64)
        resp = resp / resp.sum(-1, keepdim=True)  # random soft assignment, then M-step
        self.register_buffer("log_pi", torch.zeros(components, dtype=torch.float64))
        self.register_buffer("mu", torch.zeros(components, self.num_vars, dtype=torch.float64))
        best, best_state, stale = -math.inf, None, 0
        self.steps = 0
        for self.steps in range(1, max_steps + 1):
            nk = resp.sum(0)
            self.log_pi.copy_((nk / nk.sum()).log())
            self.mu.copy_((resp.T @ x + alpha) / (nk[:, None] + 2 * alpha))
            joint = self._joint(x)  # E-step: responsibilities p(k | x)
            resp = torch.softmax(joint, -1)
            score = (self.log_prob(val) if val is not None else torch.logsumexp(joint, -1)).double().mean().item()
            if score > best + tol:
                stale = 0
            else:
                stale += 1
            if score > best:
                best, best_state = score, (self.log_pi.clone(), self.mu.clone())
            if stale >= patience:
                break
        self.log_pi.copy_(best_state[0])
        self.mu.copy_(best_state[1])

    def _joint(self, x: Tensor) -> Tensor:
        """log pi_k + log prod_i Bern(x_i; mu_ki): ``[B, K]``."""
        return self.log_pi + x @ self.mu.log().T + (1 - x) @ (1 - self.mu).log().T

    def num_parameters(self) -> int:
        return self.components * (self.num_vars + 1)

    def log_prob(self, x: Tensor) -> Tensor:
        return torch.logsumexp(self._joint(_binary(x, self.num_vars)), -1).float()
