"""Tensor sum-product network (tSPN): a tractable density on a tensor train with nonnegative cores.

Ko, Chen, He, Zhang, Batselier, Wong, "Deep Compression of Sum-Product Networks on Tensor Networks" (arXiv
1811.03963; IEEE TNNLS 31(7), 2020). The unnormalised joint of ``d`` discrete variables is the tensor train

    P~(x_1..x_d) = G_1[x_1] G_2[x_2] ... G_d[x_d],   G_k[x_k] >= 0 an r_{k-1} x r_k matrix, r_0 = r_d = 1   (tSPN eq.)

Every core is a layer of sum nodes over indicator products, so the TT is itself a valid deep SPN. Marginalising
``x_k`` replaces ``G_k[x_k]`` by ``sum_x G_k[x]``; ``Z`` is the product of all summed cores, so normalisation is exact
by construction. All contractions run in log space (log-sum-exp over the bond index) to avoid underflow.

The chain visits the variables in ``order`` (a buffer saved with the weights): core ``k`` holds variable
``order[k]``. Inputs and outputs always use the caller's variable indices; only the cores are in chain order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plpriv.nets.variable_order import check_permutation

if TYPE_CHECKING:
    from tensorly.tt_tensor import TTTensor

Parameterization = Literal["exp", "softplus"]


def _as_ranks(rank: int | Sequence[int], num_vars: int) -> list[int]:
    """``rank`` -> the full bond-dimension list ``[1, r_1, ..., r_{d-1}, 1]``."""
    if isinstance(rank, bool) or not isinstance(rank, (int, Sequence)):
        raise TypeError(f"`rank` must be an int or a sequence of d-1 ints, got {rank!r}")
    inner = [rank] * (num_vars - 1) if isinstance(rank, int) else [int(r) for r in rank]
    if len(inner) != num_vars - 1:
        raise ValueError(f"`rank` needs num_vars - 1 = {num_vars - 1} inner ranks, got {len(inner)}: {rank!r}")
    if any(r < 1 for r in inner):
        raise ValueError(f"every TT rank must be >= 1, got {rank!r}")
    return [1, *inner, 1]


def inverse_softplus(y: Tensor) -> Tensor:
    """softplus^{-1}(y) = y + log(1 - exp(-y)) for y > 0, stable for large y."""
    return y + torch.log(-torch.expm1(-y))


def log_matvec(alpha: Tensor, log_core: Tensor) -> Tensor:
    """``log(exp(alpha) @ exp(log_core))`` batched: alpha ``[B, r]``, log_core ``[B, r, s]`` -> ``[B, s]``."""
    return torch.logsumexp(alpha.unsqueeze(-1) + log_core, dim=-2)


class TensorSPN(nn.Module):
    """Nonnegative tensor train over ``num_vars`` variables with ``num_states`` states each.

    Args:
        num_vars: number of variables ``d`` (>= 2).
        num_states: states per variable ``n`` (2 for binary data).
        rank: TT rank, one int for all bonds or ``d - 1`` ints.
        parameterization: ``exp`` (core = exp(theta), so log core = theta) or ``softplus`` (core = softplus(theta)).
        init: ``mixture`` (default): near-identity bond transitions, so the chain starts as a mixture of ``r``
            factorised distributions with random state probabilities (logits of std ``init_scale``), which EM or
            gradient ascent then couple; ``random``: i.i.d. log cores of std ``init_scale``. From a random start the
            bond index is mixed away along the chain and long-range correlations are hard to learn.
        init_scale: std of the random initial logits (0 = uniform distribution).
        init_mixing: ``mixture`` only: off-diagonal mass of the initial bond transitions.
        seed: seed of the initialisation (``None``: torch's global generator).
        order: the chain order, a permutation of ``range(num_vars)`` (core ``k`` holds variable ``order[k]``);
            ``None`` = identity. Named orders (raster, Hilbert, Chow-Liu, MI chain):
            :func:`plpriv.nets.variable_order.resolve_order`.

    Inputs ``x`` are integer states ``[B, d]`` in ``[0, n)``; ``mask`` ``[B, d]`` (or ``[d]``) is True where a variable
    is observed and False where it is summed out.
    """

    def __init__(
        self,
        num_vars: int,
        num_states: int = 2,
        rank: int | Sequence[int] = 8,
        parameterization: Parameterization = "exp",
        init: Literal["mixture", "random"] = "mixture",
        init_scale: float = 1.0,
        init_mixing: float = 0.01,
        seed: int | None = 0,
        order: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_vars, int) or num_vars < 2:
            raise ValueError(f"`num_vars` must be an int >= 2, got {num_vars!r}")
        if not isinstance(num_states, int) or num_states < 2:
            raise ValueError(f"`num_states` must be an int >= 2, got {num_states!r}")
        if parameterization not in ("exp", "softplus"):
            raise ValueError(f"`parameterization` must be 'exp' or 'softplus', got {parameterization!r}")
        if init not in ("mixture", "random"):
            raise ValueError(f"`init` must be 'mixture' or 'random', got {init!r}")
        if init_scale < 0:
            raise ValueError(f"`init_scale` must be >= 0, got {init_scale!r}")
        if not 0 < init_mixing <= 1:
            raise ValueError(f"`init_mixing` must be in (0, 1], got {init_mixing!r}")
        self.num_vars = num_vars
        self.num_states = num_states
        self.ranks = _as_ranks(rank, num_vars)
        self.parameterization = parameterization
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        cores = []
        for k in range(num_vars):
            shape = (self.ranks[k], num_states, self.ranks[k + 1])
            theta = torch.randn(shape, generator=gen) * init_scale
            if init == "mixture":
                theta = self._mixture_log_core(k, init_scale, init_mixing, gen)
            if parameterization == "softplus":  # softplus^{-1}(exp(theta)): the same initial cores as "exp"
                theta = inverse_softplus(theta.exp())
            cores.append(nn.Parameter(theta))
        self.cores = nn.ParameterList(cores)
        self.register_buffer("order", torch.arange(num_vars))
        if order is not None:
            self.set_order(order)

    def set_order(self, order: Sequence[int] | Tensor) -> None:
        """Set the chain order (a permutation of ``range(num_vars)``); the cores are kept as they are."""
        perm = check_permutation(order.tolist() if isinstance(order, Tensor) else order, self.num_vars)
        self.order.copy_(torch.as_tensor(perm, dtype=torch.long))

    def _to_caller(self, chain: Tensor, dim: int = 1) -> Tensor:
        """A tensor indexed by chain position along ``dim`` -> indexed by variable (inverse of ``order``)."""
        return chain.index_select(dim, torch.argsort(self.order))

    def _mixture_log_core(self, k: int, scale: float, mixing: float, gen: torch.Generator | None) -> Tensor:
        """log G_k[a, x, c] = log T[a, c] + log q_c(x): near-identity transition T, random state probabilities q."""
        r_in, r_out = self.ranks[k], self.ranks[k + 1]
        emit_states = r_out if k < self.num_vars - 1 else r_in
        q = torch.log_softmax(torch.randn(emit_states, self.num_states, generator=gen) * scale, dim=-1)
        if k == self.num_vars - 1:  # last core: emission from the incoming bond state
            return q[:, :, None]
        eye = (torch.arange(r_in)[:, None] % r_out == torch.arange(r_out)[None]).float()
        trans = ((1 - mixing) * eye + mixing / r_out).log()  # [r_in, r_out]
        return trans[:, None, :] + q.T[None]

    # -- cores -------------------------------------------------------------------------------------------------
    def log_cores(self) -> list[Tensor]:
        """log G_k, each ``[r_{k-1}, n, r_k]``; -inf where a core entry is exactly 0."""
        if self.parameterization == "exp":
            return list(self.cores)
        return [F.softplus(theta).log() for theta in self.cores]

    def num_parameters(self) -> int:
        """sum_k n_k r_{k-1} r_k (tSPN parameter count)."""
        return sum(self.num_states * self.ranks[k] * self.ranks[k + 1] for k in range(self.num_vars))

    def _augmented(self) -> list[Tensor]:
        """Per core ``[n + 1, r_{k-1}, r_k]``: states 0..n-1, then the summed core log sum_x G_k[x] (marginal)."""
        out = []
        for lc in self.log_cores():
            lc = lc.permute(1, 0, 2)
            out.append(torch.cat([lc, torch.logsumexp(lc, dim=0, keepdim=True)], dim=0))
        return out

    def _indices(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """Validated ``[B, d]`` int64 slots into the augmented cores (``n`` = marginalised)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"`x` must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 2 or x.shape[1] != self.num_vars:
            raise ValueError(f"`x` must have shape [B, {self.num_vars}], got {tuple(x.shape)}")
        if x.is_floating_point() and not torch.equal(x, x.round()):
            raise ValueError("`x` must hold integer states, got non-integer values")
        idx = x.long()
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.num_states):
            raise ValueError(f"states must be in [0, {self.num_states}), got values in [{idx.min()}, {idx.max()}]")
        if mask is not None:
            if mask.shape not in (x.shape, (self.num_vars,)):
                raise ValueError(
                    f"`mask` must have shape {tuple(x.shape)} or ({self.num_vars},), got {tuple(mask.shape)}"
                )
            idx = torch.where(mask.to(torch.bool).expand_as(idx), idx, torch.full_like(idx, self.num_states))
        return idx[:, self.order]  # chain order

    # -- densities ---------------------------------------------------------------------------------------------
    def _forward_messages(self, idx: Tensor, aug: list[Tensor]) -> list[Tensor]:
        """Left messages alpha_k = log(G_1[x_1] ... G_k[x_k]), each ``[B, r_k]`` (k = 1..d)."""
        alpha = aug[0][idx[:, 0], 0, :]  # r_0 = 1
        msgs = [alpha]
        for k in range(1, self.num_vars):
            alpha = log_matvec(alpha, aug[k][idx[:, k]])
            msgs.append(alpha)
        return msgs

    def _backward_messages(self, idx: Tensor, aug: list[Tensor]) -> list[Tensor]:
        """Right messages beta_k = log(G_k[x_k] ... G_d[x_d]), each ``[B, r_{k-1}]``; ``beta_{d+1} = 0``."""
        d = self.num_vars
        beta = aug[d - 1][idx[:, d - 1], :, 0]
        msgs = [beta]
        for k in range(d - 2, -1, -1):
            beta = log_matvec(beta, aug[k][idx[:, k]].transpose(1, 2))
            msgs.append(beta)
        msgs.reverse()
        return msgs + [idx.new_zeros((idx.shape[0], 1), dtype=beta.dtype)]

    def log_normalizer(self) -> Tensor:
        """log Z = log prod_k sum_x G_k[x] (scalar)."""
        aug = self._augmented()
        idx = torch.full((1, self.num_vars), self.num_states, dtype=torch.long, device=aug[0].device)
        return self._forward_messages(idx, aug)[-1][0, 0]

    def unnormalized_log_prob(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """log P~(x), with masked-out variables summed out; ``[B]``."""
        idx = self._indices(x, mask)
        return self._forward_messages(idx, self._augmented())[-1][:, 0]

    def marginal_log_prob(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Exact log p(x_observed) = log P~(x_obs, sum over the rest) - log Z; ``[B]``."""
        return self.unnormalized_log_prob(x, mask) - self.log_normalizer()

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact normalised log p(x); ``[B]``."""
        return self.marginal_log_prob(x, None)

    forward = log_prob

    def conditional_log_prob(self, x: Tensor, query: Tensor, evidence: Tensor) -> Tensor:
        """log p(x_query | x_evidence) = log p(x_q, x_e) - log p(x_e); ``query``/``evidence`` boolean masks."""
        joint = torch.as_tensor(query, dtype=torch.bool) | torch.as_tensor(evidence, dtype=torch.bool)
        return self.unnormalized_log_prob(x, joint) - self.unnormalized_log_prob(x, evidence)

    def conditional_marginals(self, x: Tensor, evidence: Tensor) -> Tensor:
        """log p(x_k = v | x_evidence) for every variable ``k`` and state ``v``: ``[B, d, n]`` (forward-backward).

        p(x_k = v, e) = alpha_{k-1} G_k[v] beta_{k+1}, with evidence variables fixed and the others summed out.
        For evidence variables the result is the point mass on the observed state.
        """
        idx = self._indices(x, evidence)
        aug = self._augmented()
        fwd, bwd = self._forward_messages(idx, aug), self._backward_messages(idx, aug)
        out = []
        for k in range(self.num_vars):
            left = fwd[k - 1] if k > 0 else idx.new_zeros((idx.shape[0], 1), dtype=aug[0].dtype)
            core = aug[k][: self.num_states]  # [n, r, s]
            # log sum_{j,l} alpha[b,j] G[v,j,l] beta[b,l]
            val = torch.logsumexp(left[:, None, :, None] + core[None] + bwd[k + 1][:, None, None, :], dim=(-2, -1))
            observed = idx[:, k] != self.num_states
            point = F.one_hot(idx[:, k].clamp(max=self.num_states - 1), self.num_states).log()
            val = torch.where(observed[:, None], point.to(val.dtype), val - torch.logsumexp(val, -1, keepdim=True))
            out.append(val)
        return self._to_caller(torch.stack(out, dim=1))

    # -- MPE and sampling --------------------------------------------------------------------------------------
    @torch.no_grad()
    def mpe(self, x: Tensor | None = None, evidence: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Most probable explanation by max-product (Poon & Domingos 2011: every sum node becomes a max node).

        Jointly maximises over the unobserved states and the TT bond indices (Viterbi on the chain of cores), the
        SPN MPE; its value lower-bounds max_x p(x). Returns ``(states [B, d], log p(states))``. Without ``x`` the
        unconditional MPE (batch of one).
        """
        if x is None:
            x = torch.zeros((1, self.num_vars), dtype=torch.long, device=self.cores[0].device)
            evidence = torch.zeros(self.num_vars, dtype=torch.bool, device=x.device)
        idx = self._indices(x, evidence)
        logs = [lc.permute(1, 0, 2) for lc in self.log_cores()]  # [n, r, s]
        b, n = idx.shape[0], self.num_states
        free = idx == n
        # per core and sample: best state for each (j, l), restricted to the observed one where there is evidence
        delta = idx.new_zeros((b, 1), dtype=logs[0].dtype)
        back_state, back_bond = [], []
        for k in range(self.num_vars):
            lc = logs[k].unsqueeze(0).expand(b, -1, -1, -1)  # [B, n, r, s]
            fixed = idx[:, k].clamp(max=n - 1)
            onehot = F.one_hot(fixed, n).to(torch.bool)[:, :, None, None] | free[:, k, None, None, None]
            lc = lc.masked_fill(~onehot, float("-inf"))
            best_val, best_state = lc.max(dim=1)  # [B, r, s]
            total = delta.unsqueeze(-1) + best_val  # [B, r, s]
            delta, best_bond = total.max(dim=1)  # [B, s]
            back_state.append(best_state)
            back_bond.append(best_bond)
        states = idx.new_zeros(idx.shape)
        bond = idx.new_zeros(b)  # r_d = 1
        ar = torch.arange(b, device=idx.device)
        for k in range(self.num_vars - 1, -1, -1):
            prev = back_bond[k][ar, bond]
            states[:, k] = back_state[k][ar, prev, bond]
            bond = prev
        states = self._to_caller(states)
        return states, self.log_prob(states)

    @torch.no_grad()
    def sample(
        self, num_samples: int, x: Tensor | None = None, evidence: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Exact ancestral samples ``[num_samples, d]``, left to right: p(x_k | x_<k, e) from the right messages.

        With ``x``/``evidence`` (one row, or ``num_samples`` rows) the evidence variables are kept and the others drawn
        from p(. | e).
        """
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"`num_samples` must be a positive int, got {num_samples!r}")
        device = self.cores[0].device
        if x is None:
            x = torch.zeros((num_samples, self.num_vars), dtype=torch.long, device=device)
            evidence = torch.zeros(self.num_vars, dtype=torch.bool, device=device)
        if x.shape[0] == 1:
            x = x.expand(num_samples, -1)
            evidence = evidence if evidence is None or evidence.ndim == 1 else evidence.expand(num_samples, -1)
        idx = self._indices(x, evidence)
        if idx.shape[0] != num_samples:
            raise ValueError(f"`x` must have 1 or num_samples = {num_samples} rows, got {idx.shape[0]}")
        aug = self._augmented()
        bwd = self._backward_messages(idx, aug)
        out = idx.clone()
        alpha = idx.new_zeros((num_samples, 1), dtype=aug[0].dtype)
        for k in range(self.num_vars):
            core = aug[k][: self.num_states]  # [n, r, s]
            # log p(x_k = v | x_<k, e) up to a constant: log alpha G_k[v] beta_{k+1}
            logits = torch.logsumexp(alpha[:, None, :, None] + core[None] + bwd[k + 1][:, None, None, :], dim=(-2, -1))
            drawn = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
            out[:, k] = torch.where(idx[:, k] == self.num_states, drawn, out[:, k])
            alpha = log_matvec(alpha, aug[k][out[:, k]])
        return self._to_caller(out)

    # -- EM fitting -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def em_step(self, x: Tensor, pseudo_count: float = 0.01, chunk: int = 2048) -> float:
        """One EM (Baum-Welch) step on complete data ``x``; returns the mean log-likelihood before the step.

        The nonnegative TT is a latent chain over the bond indices a_k: with G_1[x_1, a_1] = p(x_1, a_1) and
        G_k[a_{k-1}, x_k, a_k] = p(x_k, a_k | a_{k-1}) it is normalised (Z = 1), and EM's M-step is
        G_k[a, x, c] = N_k[a, x, c] / sum_{x', c'} N_k[a, x', c'] with expected counts
        N_k[a, x, c] = sum_b [x_bk = x] alpha_{k-1}[b, a] G_k[a, x, c] beta_{k+1}[b, c] / P~(x_b) (forward-backward).
        tensorly has no nonnegative TT fitting, hence this one; the likelihood never decreases (up to
        ``pseudo_count``, a symmetric Dirichlet prior that keeps every entry positive).
        """
        if pseudo_count < 0:
            raise ValueError(f"`pseudo_count` must be >= 0, got {pseudo_count!r}")
        log_z = self.log_normalizer().item()
        # Linear-space cores with one log shift per core (exact: a constant factor per core rescales P~ and Z
        # alike); the scaled forward-backward below (Rabiner 1989, Sec. V-A, scaling) normalises every message, so
        # nothing underflows and every step is a plain matrix product over the batch instead of a log-sum-exp.
        shifts = [lc.amax() for lc in self.log_cores()]
        cores = [(lc - c).exp() for lc, c in zip(self.log_cores(), shifts)]  # [r, n, s]
        counts = [torch.zeros_like(c, dtype=torch.float64) for c in cores]
        total = 0.0
        idx_all = self._indices(x, None)
        tiny = torch.finfo(cores[0].dtype).tiny
        n = self.num_states
        for idx in idx_all.split(chunk):
            b = idx.shape[0]
            onehots = F.one_hot(idx, n).to(cores[0].dtype)  # [B, d, n]
            fwd, log_p = [], sum(c.item() for c in shifts)
            alpha = onehots.new_ones((b, 1))
            for k in range(self.num_vars):  # alpha_k proportional to G_1[x_1] ... G_k[x_k], rows summing to 1
                fwd.append(alpha)
                r, _, s_k = cores[k].shape
                alpha = ((alpha @ cores[k].reshape(r, n * s_k)).reshape(b, n, s_k) * onehots[:, k, :, None]).sum(1)
                norm = alpha.sum(-1, keepdim=True).clamp_min(tiny)
                log_p = log_p + norm[:, 0].log()
                alpha = alpha / norm
            total += log_p.double().sum().item()
            beta = onehots.new_ones((b, 1))
            for k in range(self.num_vars - 1, -1, -1):  # beta_{k+1} proportional to G_{k+1}[x] ... G_d[x]
                r, _, s_k = cores[k].shape
                # beta_k[b, a] = sum_c G_k[a, x_bk, c] beta_{k+1}[b, c]
                new_beta = ((beta @ cores[k].permute(2, 1, 0).reshape(s_k, n * r)).reshape(b, n, r)
                            * onehots[:, k, :, None]).sum(1)
                # posterior of (a_{k-1}, a_k) | x_b = alpha_{k-1}[a] G_k[a, x_bk, c] beta_{k+1}[c] / w_b, so
                # N_k[a, x, c] = G_k[a, x, c] sum_b [x_bk = x] alpha_{k-1}[b, a] beta_{k+1}[b, c] / w_b
                w = (fwd[k] * new_beta).sum(-1, keepdim=True).clamp_min(tiny)
                left = fwd[k] / w
                for v in range(n):
                    counts[k][:, v, :] += (cores[k][:, v, :] * (left.T @ (beta * onehots[:, k, v, None]))).double()
                beta = new_beta / new_beta.sum(-1, keepdim=True).clamp_min(tiny)
        for theta, count in zip(self.cores, counts):
            count = count + pseudo_count
            log_core = (count / count.sum(dim=(1, 2), keepdim=True)).log().to(theta.dtype)
            theta.copy_(log_core if self.parameterization == "exp" else inverse_softplus(log_core.exp()))
        return total / len(idx_all) - log_z

    @torch.no_grad()
    def fit_em(
        self, x: Tensor, val: Tensor, tol: float = 1e-3, patience: int = 5, max_steps: int = 500,
        pseudo_count: float = 0.01, progress: Callable | None = None,
    ) -> tuple[int, float]:
        """EM to convergence: stop once the held-out mean log-likelihood on ``val`` has not risen by more than
        ``tol`` nats over its best for ``patience`` steps in a row (or after ``max_steps``); keep the best cores.

        Returns ``(steps taken, best validation log-likelihood)``.
        """
        if tol < 0 or patience < 1 or max_steps < 1:
            raise ValueError(f"need tol >= 0, patience >= 1, max_steps >= 1, got {tol!r}, {patience!r}, {max_steps!r}")
        best = self.log_prob(val).mean().item()
        best_state = [c.detach().clone() for c in self.cores]
        stale, steps = 0, 0
        for steps in (progress(range(1, max_steps + 1)) if progress else range(1, max_steps + 1)):
            self.em_step(x, pseudo_count)
            score = self.log_prob(val).mean().item()
            if score > best:
                if score > best + tol:
                    stale = -1
                best, best_state = score, [c.detach().clone() for c in self.cores]
            stale += 1
            if stale >= patience:
                break
        for theta, saved in zip(self.cores, best_state):
            theta.copy_(saved)
        return steps, best

    # -- tensorly ----------------------------------------------------------------------------------------------
    def to_tensorly(self, normalize: bool = True) -> TTTensor:
        """The cores G_k as a tensorly ``TTTensor`` (PyTorch backend); ``normalize`` scales them so the sum is 1.

        The TT's mode ``k`` is variable ``order[k]`` (permute the dense tensor by ``argsort(order)`` for the caller's
        variable order).
        """
        from tensorly.tt_tensor import TTTensor

        with torch.no_grad():
            shift = self.log_normalizer() / self.num_vars if normalize else 0.0
            cores = [(lc - shift).exp().detach().clone() for lc in self.log_cores()]
        return TTTensor(cores)

    @classmethod
    def from_tensorly(
        cls, tt: TTTensor | Sequence[Tensor], parameterization: Parameterization = "exp",
        order: Sequence[int] | None = None,
    ) -> TensorSPN:
        """A tSPN whose cores are a nonnegative TT (a ``TTTensor`` or a list of ``[r, n, s]`` cores); mode ``k`` of
        the TT is variable ``order[k]`` (identity by default)."""
        factors = tt.factors if hasattr(tt, "factors") else tt
        cores = [torch.as_tensor(c, dtype=torch.get_default_dtype()) for c in factors]
        if len(cores) < 2 or any(c.ndim != 3 for c in cores):
            raise ValueError(f"expected >= 2 TT cores of shape [r, n, s], got shapes {[tuple(c.shape) for c in cores]}")
        states = {c.shape[1] for c in cores}
        if len(states) != 1:
            raise ValueError(f"all cores must have the same number of states, got {sorted(states)}")
        if any((c < 0).any() for c in cores):
            raise ValueError("a tSPN needs nonnegative TT cores; got negative entries (project or refit them)")
        ranks = [c.shape[0] for c in cores[1:]]
        chained = all(a.shape[2] == b.shape[0] for a, b in zip(cores, cores[1:]))
        if cores[0].shape[0] != 1 or cores[-1].shape[2] != 1 or not chained:
            raise ValueError(f"inconsistent TT ranks: core shapes {[tuple(c.shape) for c in cores]}")
        model = cls(len(cores), states.pop(), ranks, parameterization=parameterization, init="random",
                    init_scale=0.0, order=order)
        tiny = torch.finfo(cores[0].dtype).tiny  # exact zeros become the smallest normal number (log stays finite)
        with torch.no_grad():
            for theta, c in zip(model.cores, cores):
                c = c.clamp_min(tiny)
                theta.copy_(c.log() if parameterization == "exp" else inverse_softplus(c).clamp_min(-80.0))
        return model

    def extra_repr(self) -> str:
        identity = bool(torch.equal(self.order, torch.arange(self.num_vars, device=self.order.device)))
        return (f"num_vars={self.num_vars}, num_states={self.num_states}, max_rank={max(self.ranks)}, "
                f"{self.parameterization}, order={'identity' if identity else 'permuted'}")
