"""A conventional valid SPN to compare tSPNs with and to compress: a random tensorised SPN (RAT-SPN).

Peharz, Vergari, Stelzner, Molina, Trapp, Shao, Kersting, Ghahramani, "Random Sum-Product Networks: A Simple and
Effective Approach to Probabilistic Deep Learning" (UAI 2019). Each of ``R`` repetitions splits a random permutation
of the variables recursively into ``2^D`` leaf regions; every leaf region holds ``I`` factorised categorical
distributions; each internal region multiplies its two children's nodes pairwise (I x I product nodes, decomposable:
disjoint scopes) and mixes them with ``S`` sum nodes (complete: all children share the scope); the root mixes the
top products of all repetitions. Valid by construction, so p is normalised exactly and marginals are exact
(a marginalised leaf evaluates to 1). Parameters are learnt by maximum likelihood (gradient ascent in log space).

Also here: ``distill_to_tspn``, the mapping SPN -> tSPN (fit a tensor train to the SPN's outputs on its own samples).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plpriv.nets.tspn import TensorSPN


class RandomSPN(nn.Module):
    """RAT-SPN over ``num_vars`` categorical variables (Peharz et al. 2019).

    Args:
        num_vars: number of variables ``d``; needs ``d >= 2^depth``.
        num_states: states per variable.
        depth: region-graph depth ``D`` (``2^D`` leaf regions per repetition).
        repetitions: ``R`` random region graphs mixed at the root.
        num_sums: ``S`` sum nodes per internal region.
        num_leaves: ``I`` factorised leaf distributions per leaf region.
        seed: seeds the random partitions and the initial weights.
    """

    def __init__(
        self, num_vars: int, num_states: int = 2, depth: int = 3, repetitions: int = 10, num_sums: int = 10,
        num_leaves: int = 10, seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value, low in (("num_states", num_states, 2), ("depth", depth, 1), ("repetitions", repetitions, 1),
                                 ("num_sums", num_sums, 1), ("num_leaves", num_leaves, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}")
        if not isinstance(num_vars, int) or num_vars < 2**depth:
            raise ValueError(f"`num_vars` must be an int >= 2^depth = {2**depth}, got {num_vars!r}")
        self.num_vars, self.num_states, self.depth = num_vars, num_states, depth
        self.repetitions, self.num_sums, self.num_leaves = repetitions, num_sums, num_leaves
        gen = torch.Generator().manual_seed(seed)
        regions = 2**depth
        # region[r, v]: leaf region of variable v in repetition r (balanced split of a random permutation)
        assign = torch.empty(repetitions, num_vars, dtype=torch.long)
        for r in range(repetitions):
            perm = torch.randperm(num_vars, generator=gen)
            assign[r, perm] = torch.arange(num_vars) * regions // num_vars
        self.register_buffer("region", assign)
        self.register_buffer("region_onehot", F.one_hot(assign, regions).float())  # [R, d, 2^D]
        # leaf logits [R, d, I, n]: categorical of variable v in leaf distribution i of its region
        self.leaf_logits = nn.Parameter(torch.randn(repetitions, num_vars, num_leaves, num_states, generator=gen))
        self.sum_logits = nn.ParameterList()
        channels = num_leaves
        for level in range(1, depth):  # internal sum layers; level `depth` is the root
            count = regions // 2**level
            weights = 0.1 * torch.randn(repetitions, count, num_sums, channels**2, generator=gen)
            self.sum_logits.append(nn.Parameter(weights))
            channels = num_sums
        self.top_channels = channels
        self.root_logits = nn.Parameter(0.1 * torch.randn(repetitions * channels**2, generator=gen))

    def num_parameters(self) -> int:
        """Entries of all weight tensors (leaf categoricals, sum-node weights, root weights)."""
        return sum(p.numel() for p in self.parameters())

    def _leaf_log_probs(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """log of each leaf distribution on its region: ``[B, R, 2^D, I]``."""
        if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != self.num_vars:
            raise ValueError(f"`x` must be a tensor [B, {self.num_vars}], got {getattr(x, 'shape', type(x))}")
        idx = x.long()
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.num_states):
            raise ValueError(f"states must be in [0, {self.num_states}), got [{idx.min()}, {idx.max()}]")
        logp = torch.log_softmax(self.leaf_logits, dim=-1)  # [R, d, I, n]
        b = idx.shape[0]
        gathered = logp.unsqueeze(0).expand(b, -1, -1, -1, -1)
        sel = idx[:, None, :, None, None].expand(-1, self.repetitions, -1, self.num_leaves, 1)
        per_var = gathered.gather(-1, sel).squeeze(-1)  # [B, R, d, I]
        if mask is not None:  # a marginalised indicator leaf sums to 1: log 1 = 0
            per_var = per_var * mask.to(per_var.dtype).expand(b, -1)[:, None, :, None]
        return torch.einsum("brdi,rdk->brki", per_var, self.region_onehot)

    def log_prob(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Exact log p(x) (or the marginal of the variables where ``mask`` is True); ``[B]``."""
        h = self._leaf_log_probs(x, mask)  # [B, R, K, C]
        for level in range(1, self.depth + 1):
            b, r, k, c = h.shape
            # product nodes: pairwise sums of the two children's log values (disjoint scopes)
            prod = (h[:, :, 0::2, :, None] + h[:, :, 1::2, None, :]).reshape(b, r, k // 2, c * c)
            if level == self.depth:
                w = torch.log_softmax(self.root_logits, 0)
                return torch.logsumexp(prod.reshape(b, -1) + w, dim=-1)
            w = torch.log_softmax(self.sum_logits[level - 1], dim=-1)  # [R, K/2, S, C^2]
            h = torch.logsumexp(prod.unsqueeze(3) + w.unsqueeze(0), dim=-1)  # [B, R, K/2, S]
        raise AssertionError("unreachable")

    forward = log_prob

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Exact ancestral samples ``[num_samples, d]``: pick one child of every sum node top-down, then the leaves."""
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"`num_samples` must be a positive int, got {num_samples!r}")
        c = self.top_channels
        choice = torch.multinomial(torch.softmax(self.root_logits, 0), num_samples, True, generator=generator)
        rep = choice // (c * c)
        prod = choice % (c * c)
        idx = torch.stack([prod // c, prod % c], dim=1)  # chosen node of each region at level depth - 1
        for level in range(self.depth - 1, 0, -1):
            cin = self.num_leaves if level == 1 else self.num_sums
            w = torch.softmax(self.sum_logits[level - 1], dim=-1)[rep]  # [B, K, S, C^2]
            w = w.gather(2, idx[:, :, None, None].expand(-1, -1, 1, w.shape[-1])).squeeze(2)  # [B, K, C^2]
            picked = torch.multinomial(w.reshape(-1, w.shape[-1]), 1, generator=generator).reshape(num_samples, -1)
            idx = torch.stack([picked // cin, picked % cin], dim=2).reshape(num_samples, -1)  # children 2k, 2k+1
        leaf = idx.gather(1, self.region[rep])  # [B, d]: leaf distribution of each variable's region
        probs = torch.softmax(self.leaf_logits, -1)[rep[:, None], torch.arange(self.num_vars)[None], leaf]  # [B, d, n]
        return torch.multinomial(probs.reshape(-1, self.num_states), 1, generator=generator).reshape(num_samples, -1)


def fit_density(
    model: nn.Module, data: Tensor, epochs: int = 50, batch_size: int = 100, lr: float = 0.05,
    val: Tensor | None = None, seed: int = 0, progress: Callable | None = None,
) -> float:
    """Maximum likelihood by Adam on mini-batches (``model.log_prob``); keeps the weights of the best validation
    log-likelihood (the starting weights included) when ``val`` is given. Returns the best mean validation (or the
    best per-epoch training) log-likelihood."""
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"`epochs` and `batch_size` must be >= 1, got {epochs!r}, {batch_size!r}")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    best, best_state = -math.inf, None
    if val is not None:  # the starting point (e.g. after EM) is a candidate too
        with torch.no_grad():
            best = model.log_prob(val).mean().item()
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    epochs_iter = progress(range(epochs)) if progress else range(epochs)
    for _ in epochs_iter:
        for batch in torch.randperm(len(data), generator=gen).split(batch_size):
            loss = -model.log_prob(data[batch]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            score = model.log_prob(val if val is not None else data).mean().item()
        if score > best:
            best, best_state = score, {k: v.detach().clone() for k, v in model.state_dict().items()}
        if progress and hasattr(epochs_iter, "set_postfix"):
            epochs_iter.set_postfix(ll=f"{score:.3f}")
    if best_state is not None and val is not None:
        model.load_state_dict(best_state)
    return best


class SourceSPN(Protocol):
    """What :func:`distill_to_tspn` needs from a source SPN (RandomSPN, LearnSPN)."""

    num_vars: int
    num_states: int

    def log_prob(self, x: Tensor) -> Tensor: ...

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor: ...


def distill_to_tspn(
    spn: SourceSPN, rank: int, num_samples: int = 20000, em_steps: int = 30, epochs: int = 0, batch_size: int = 200,
    lr: float = 0.01, output_weight: float = 1.0, data: Tensor | None = None, seed: int = 0,
    progress: Callable | None = None, order: Sequence[int] | None = None, val: Tensor | None = None,
    tol: float = 1e-3, patience: int = 5,
) -> TensorSPN:
    """Map an SPN onto a rank-``rank`` tSPN by fitting the TT to the SPN's own samples and outputs.

    1. ``em_steps`` EM steps (:meth:`TensorSPN.em_step`) on ``num_samples`` exact SPN samples: maximum likelihood on
       samples of p_SPN minimises a Monte-Carlo estimate of KL(p_SPN || q).
    2. ``epochs`` of Adam on -log q(x) + ``output_weight`` (log q(x) - log p_SPN(x))^2 over the same samples (match
       the SPN's outputs; q is normalised, so both terms are minimised by q = p_SPN).

    ``order`` is the tSPN's chain order. With ``val`` (held-out real rows) step 1 is EM to convergence
    (:meth:`TensorSPN.fit_em`, at most ``em_steps``, tolerance ``tol`` with ``patience``) and the steps taken are
    stored as ``tspn.em_steps_taken``. ``data`` (optional) adds the real training rows to the samples. Ko et al.
    (2020) map a valid SPN onto a nonnegative TT; this fitting procedure is plpriv's own, written here because
    tensorly has no nonnegative TT decomposition (its tensor_train / TT-cross give signed cores).
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"`rank` must be a positive int, got {rank!r}")
    if em_steps < 0 or epochs < 0 or em_steps + epochs == 0:
        raise ValueError(f"need em_steps >= 0, epochs >= 0 and at least one step, got {em_steps!r}, {epochs!r}")
    gen = torch.Generator().manual_seed(seed)
    x = spn.sample(num_samples, generator=gen)
    if data is not None:
        x = torch.cat([x, data.long()])
    tspn = TensorSPN(spn.num_vars, spn.num_states, rank, seed=seed, order=order)
    tspn.em_steps_taken = em_steps
    if val is not None and em_steps > 0:
        tspn.em_steps_taken, _ = tspn.fit_em(x, val, tol, patience, em_steps)
    target, opt = None, None
    for step in progress(range(em_steps + epochs)) if progress else range(em_steps + epochs):
        if step < em_steps and val is not None:
            continue
        if step < em_steps:
            tspn.em_step(x)
            continue
        if opt is None:
            with torch.no_grad():
                target = torch.cat([spn.log_prob(chunk) for chunk in x.split(4096)])
            opt = torch.optim.Adam(tspn.parameters(), lr=lr)
        for batch in torch.randperm(len(x), generator=gen).split(batch_size):
            logq = tspn.log_prob(x[batch])
            loss = -logq.mean() + output_weight * (logq - target[batch]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return tspn
