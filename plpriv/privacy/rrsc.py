r"""RRSC: local-DP mean estimation in b bits with a randomly rotated simplex (no Lightning imports).

Isik, Chen, Özgür, Weissman, No, "Exact Optimality of Communication-Privacy-Utility Tradeoffs in Distributed Mean
Estimation" (NeurIPS 2023, arXiv 2306.04924; code github.com/BerivanIsik/rrsc, MIT). Equation names follow the fact
sheet ``shared/reference/rrsc.md`` ("Mechanism", steps 1-5).

Setting: n users, user i holds x_i with ||x_i|| <= 1, sends b bits under pure epsilon-LDP; the server knows each
user's *shared* random seed (the rotation), never the user's *private* randomness (the sampled index). The server
averages unbiased decodes.

RRSC (:class:`RRSC`), M = 2^b <= d codewords
    [1] base simplex          c_j = (M e_j - 1_M) / sqrt(M (M-1)) in R^M (first M coordinates of R^d)
    [2] shared rotation       U = Q of the QR of a d x M Gaussian (seeded per user), u_j = U c_j
    [3] k-closest encoding    T_k = the k largest <x, u_j>;  P(J=j) = e^eps / Z on T_k, 1 / Z off it,
                              Z = k e^eps + M - k                                               (b bits)
    [4] decoder               x_hat = B u_J,  B = Z / ((e^eps - 1) E[sum_{j in T_k} <a, c_j>]),  a ~ Unif(S^{d-1})
                              (Monte Carlo, :func:`bias_factors`); k in {1..min(49, M-1)} minimising B
    [5] aggregate             mean of the x_hat
    privacy: every P(J=j|x) lies in [1/Z, e^eps/Z] for a fixed U, so the ratio is <= e^eps (pure eps-LDP given U).
    MSE: ||x_hat|| = B, E x_hat = x (rotational symmetry), so E||x_hat - x||^2 = B^2 - ||x||^2 and the mean of n
    users has MSE (n B^2 - sum ||x_i||^2) / n^2 = (B^2 - 1)/n for unit inputs (:func:`rrsc_mse_bound`).

Inputs inside the ball [proposal, not in the paper or the repo]: k-closest encoding depends only on x/||x||, so for
||x|| < 1 RRSC alone would decode x/||x|| in expectation (biased). Every randomizer here first rounds x to the sphere
without bias, ``s x/||x||`` with P(s = +1) = (1 + ||x||)/2 (:func:`round_to_sphere`; exact identity on unit inputs),
which keeps E x_hat = x and makes the MSE formula above hold for any ||x|| <= 1; privacy is unaffected (the
output probabilities stay in [1/Z, e^eps/Z] whatever the rounded input).

Baselines (as in the authors' repo, main.py): :class:`PrivUnitG` (Asi, Feldman, Talwar 2022) and :class:`SQKR`
(Chen, Kairouz, Özgür 2020). MMRC is not implemented.

Differences from the authors' code (facts checked in rrsc.py, sqkr.py, privunitG.py, utilities/estimate_params.py):
* the rotation's QR is sign-corrected (Q diag(sign R_ii)) so U is exactly Haar on the Stiefel manifold; the repo's
  ``np.linalg.qr`` keeps LAPACK's signs (the sheet does not say);
* B's Monte Carlo samples only the first M coordinates of a (g / sqrt(||g||^2 + chi2_{d-M})), as the sheet proposes,
  instead of the repo's 10^6 x d array; the repo fixes 10^6 samples, here it is an argument (default 2 x 10^5);
* the repo's main.py calls ``lossy_DP_top1``, which rrsc.py does not define (it defines ``lossy_DP_rrsc``): the sheet's
  "repo quirk", confirmed;
* PrivUnitG's "below gamma" branch draws by inverse CDF instead of 25 rejection tries (same law, no failure case).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from opacus.accountants import IAccountant
from scipy.stats import norm

__all__ = [
    "RRSC",
    "SQKR",
    "LocalDPAccountant",
    "PrivUnitG",
    "bias_factors",
    "choose_k",
    "rrsc_mse_bound",
    "round_to_sphere",
    "simplex",
]

Seeds = Sequence[int] | torch.Tensor
K_MAX = 49  # the repo's range of k: 1..min(49, M-1)
_CHUNK_ELEMENTS = 1 << 23  # floats per batched rotation chunk (64 MiB in float64)


def _seed_list(seeds: Seeds) -> list[int]:
    return [int(s) for s in (seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds)]


def simplex(M: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[1] The base simplex, column j = c_j = (M e_j - 1_M) / sqrt(M (M-1)), shape [M, M]."""
    if M < 2:
        raise ValueError(f"a simplex needs M >= 2 codewords, got {M}")
    return (M * torch.eye(M, dtype=dtype) - 1.0) / math.sqrt(M * (M - 1))


def haar_frame(dim: int, M: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[2] U [dim, M]: the first M columns of a Haar random orthogonal matrix, from ``seed`` (a torch.Generator)."""
    return _haar_frames(dim, M, [seed], dtype)[0]


def _haar_frames(dim: int, M: int, seeds: list[int], dtype: torch.dtype) -> torch.Tensor:
    """[2] for a batch of seeds: [len(seeds), dim, M]; QR sign-corrected so the law is exactly Haar."""
    g = torch.Generator()
    A = torch.empty(len(seeds), dim, M, dtype=dtype)
    for i, s in enumerate(seeds):
        g.manual_seed(s)
        A[i] = torch.randn(dim, M, generator=g, dtype=dtype)
    Q, R = torch.linalg.qr(A)
    sign = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    return Q * torch.where(sign == 0, torch.ones_like(sign), sign).unsqueeze(-2)


def round_to_sphere(x: torch.Tensor, generator: torch.Generator | None = None, tol: float = 1e-6) -> torch.Tensor:
    """Unbiased rounding of rows of ``x`` (norm <= 1) to the unit sphere: s x/||x||, P(s=+1) = (1 + ||x||)/2
    [proposal]; rows within ``tol`` of unit norm are only renormalised, a zero row becomes +-e_1."""
    r = x.norm(dim=-1, keepdim=True)
    if bool((r > 1 + tol).any()):
        raise ValueError(f"inputs must lie in the unit ball (max norm {float(r.max()):.6g}); clip them first")
    u = torch.rand(r.shape, generator=generator, dtype=x.dtype)
    s = torch.where((u < (1 + r) / 2) | (r >= 1 - tol), 1.0, -1.0).to(x.dtype)
    e1 = torch.zeros_like(x)
    e1[..., 0] = 1.0
    direction = torch.where(r > 0, x / r.clamp_min(torch.finfo(x.dtype).tiny), e1)
    return s * direction


def bias_factors(dim: int, M: int, epsilon: float, k_max: int | None = None, samples: int = 200_000,
                 seed: int = 0) -> np.ndarray:
    """[4] B(k) = (k e^eps + M - k) / ((e^eps - 1) E[sum_{j in T_k} <a, c_j>]) for k = 1..k_max (default
    min(49, M-1)), a uniform on S^{dim-1}, by Monte Carlo with ``samples`` draws from ``numpy`` seeded by ``seed``.

    Only a's first M coordinates matter: a_{1:M} = g / sqrt(||g||^2 + chi2_{dim-M}), g ~ N(0, I_M) [sheet's
    proposal]; <a, c_j> = (M a_j - sum a) / sqrt(M (M-1)), so T_k = the k largest a_j."""
    if not 2 <= M <= dim:
        raise ValueError(f"need 2 <= M <= dim, got M={M}, dim={dim}")
    k_max = min(K_MAX, M - 1) if k_max is None else k_max
    rng = np.random.default_rng(seed)
    total = torch.zeros(k_max, dtype=torch.float64)
    done = 0
    chunk = max(1, _CHUNK_ELEMENTS // (4 * M))
    while done < samples:
        t = min(chunk, samples - done)
        g = rng.standard_normal((t, M))
        rest = rng.chisquare(dim - M, t) if dim > M else np.zeros(t)
        a = torch.from_numpy(g / np.sqrt((g * g).sum(1) + rest)[:, None])
        top = torch.topk(a, k_max, dim=1).values.cumsum(1)  # sum of the k largest a_j, k = 1..k_max
        ks = torch.arange(1, k_max + 1, dtype=torch.float64)
        total += ((M * top - ks * a.sum(1, keepdim=True)) / math.sqrt(M * (M - 1))).sum(0)
        done += t
    expectation = (total / samples).numpy()  # E[sum_{T_k} <a, c_j>]
    ks = np.arange(1, k_max + 1)
    e = math.exp(epsilon)
    return (ks * e + M - ks) / ((e - 1) * expectation)


def choose_k(dim: int, M: int, epsilon: float, samples: int = 200_000, seed: int = 0) -> tuple[int, float]:
    """[4] The k in {1..min(49, M-1)} that minimises B, and that B (as the repo's ``estimate_k_and_bias``)."""
    B = bias_factors(dim, M, epsilon, samples=samples, seed=seed)
    k = int(np.argmin(B)) + 1
    return k, float(B[k - 1])


def rrsc_mse_bound(B: float, n: int, norms_sq: torch.Tensor | np.ndarray | Sequence[float] | float) -> float:
    """MSE of the mean of n unbiased decodes of norm B: (n B^2 - sum ||x_i||^2) / n^2 ((B^2 - 1)/n on unit inputs).
    ``norms_sq`` is the list of ||x_i||^2, or their sum as a float."""
    total = float(norms_sq) if isinstance(norms_sq, (int, float)) else float(np.sum(np.asarray(norms_sq)))
    return (n * B * B - total) / (n * n)


class RRSC:
    """Randomly rotated simplex coding with k-closest encoding: ``bits`` bits per user, pure ``epsilon``-LDP.

    ``seeds`` (one int per user) seed the shared rotations: the server knows them. ``generator`` is the user's
    private randomness (sphere rounding, the sampled index): the server must not know it, else the guarantee is void.
    """

    def __init__(self, dim: int, epsilon: float, bits: int, k: int | None = None, samples: int = 200_000,
                 seed: int = 0, dtype: torch.dtype = torch.float64) -> None:
        self.dim, self.epsilon, self.bits = int(dim), float(epsilon), int(bits)
        self.M = 2 ** self.bits
        if self.bits < 1 or self.M > self.dim:
            raise ValueError(f"need 1 <= bits and M = 2^bits <= dim, got bits={bits}, dim={dim}")
        if epsilon <= 0:
            raise ValueError("epsilon must be positive")
        k_max = min(K_MAX, self.M - 1)
        if k is not None and not 1 <= k <= self.M - 1:
            raise ValueError(f"k must lie in 1..M-1 = {self.M - 1}")
        B = bias_factors(self.dim, self.M, self.epsilon, max(k_max, k or 1), samples, seed)
        self.k = int(np.argmin(B[:k_max])) + 1 if k is None else int(k)
        self.B = float(B[self.k - 1])
        self.dtype = dtype
        e = math.exp(self.epsilon)
        self.Z = self.k * e + self.M - self.k  # [3]
        self.p_in, self.p_out = e / self.Z, 1.0 / self.Z

    @property
    def bits_per_user(self) -> int:
        return self.bits

    def mse(self, n: int, norms_sq: Any = None) -> float:
        """Predicted MSE of :meth:`estimate_mean` over n users ((B^2 - 1)/n for unit inputs)."""
        return rrsc_mse_bound(self.B, n, float(n) if norms_sq is None else norms_sq)

    def codebook(self, seed: int) -> torch.Tensor:
        """[2] The rotated codewords u_j = U c_j of the user seeded by ``seed``, rows, shape [M, dim]."""
        return (haar_frame(self.dim, self.M, seed, self.dtype) @ simplex(self.M, self.dtype)).T

    def _chunks(self, n: int) -> Iterator[slice]:
        step = max(1, _CHUNK_ELEMENTS // (self.dim * self.M))
        for start in range(0, n, step):
            yield slice(start, min(n, start + step))

    def _probabilities(self, x: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        """[3] P(J = j | x, U) for unit rows x [c, d] and frames U [c, d, M]."""
        y = torch.einsum("cdm,cd->cm", U, x)  # <x, u_j> = (M y_j - sum y)/sqrt(M(M-1)) is increasing in y_j
        top = torch.topk(y, self.k, dim=1).indices
        p = torch.full_like(y, self.p_out)
        return p.scatter_(1, top, self.p_in)

    def probabilities(self, x: torch.Tensor, seeds: Seeds) -> torch.Tensor:
        """[3] The encoder's output distribution for unit-norm rows of x [n, d], each with its rotation: [n, M]."""
        x, seeds = self._check(x, seeds)
        out = [self._probabilities(x[s], _haar_frames(self.dim, self.M, seeds[s], self.dtype))
               for s in self._chunks(len(seeds))]
        return torch.cat(out) if out else torch.empty(0, self.M, dtype=self.dtype)

    def _check(self, x: torch.Tensor, seeds: Seeds) -> tuple[torch.Tensor, list[int]]:
        x = torch.as_tensor(x, dtype=self.dtype)
        seeds = _seed_list(seeds)
        if x.ndim != 2 or x.shape[1] != self.dim or x.shape[0] != len(seeds):
            raise ValueError(f"x must be [n, {self.dim}] with one seed per row, got {tuple(x.shape)}, {len(seeds)}")
        return x, seeds

    def _encode(self, x: torch.Tensor, seeds: list[int], generator: torch.Generator | None,
                decode: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = round_to_sphere(x, generator)
        J = torch.empty(len(seeds), dtype=torch.long)
        xhat = torch.empty(len(seeds), self.dim, dtype=self.dtype) if decode else None
        for s in self._chunks(len(seeds)):
            U = _haar_frames(self.dim, self.M, seeds[s], self.dtype)
            J[s] = torch.multinomial(self._probabilities(x[s], U), 1, generator=generator).squeeze(1)
            if xhat is not None:
                xhat[s] = self._decode(J[s], U)
        return J, xhat

    def _decode(self, J: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        """[4] B u_J = B (M U[:, J] - U 1_M) / sqrt(M (M-1))."""
        uJ = U.gather(2, J.view(-1, 1, 1).expand(-1, self.dim, 1)).squeeze(2)
        return self.B * (self.M * uJ - U.sum(2)) / math.sqrt(self.M * (self.M - 1))

    def encode(self, x: torch.Tensor, seeds: Seeds, generator: torch.Generator | None = None) -> torch.Tensor:
        """[3] Rows of x [n, d] (norm <= 1) -> the sent indices J [n] in [0, M) (``bits`` bits each)."""
        x, seeds = self._check(x, seeds)
        return self._encode(x, seeds, generator, decode=False)[0]

    def decode(self, indices: torch.Tensor, seeds: Seeds) -> torch.Tensor:
        """[4] The server's unbiased decodes B u_J [n, d], regenerating each user's rotation from its seed."""
        seeds = _seed_list(seeds)
        indices = torch.as_tensor(indices, dtype=torch.long)
        if indices.shape != (len(seeds),) or bool(((indices < 0) | (indices >= self.M)).any()):
            raise ValueError(f"need one index in [0, {self.M}) per seed")
        out = torch.empty(len(seeds), self.dim, dtype=self.dtype)
        for s in self._chunks(len(seeds)):
            out[s] = self._decode(indices[s], _haar_frames(self.dim, self.M, seeds[s], self.dtype))
        return out

    def privatize(self, x: torch.Tensor, seeds: Seeds, generator: torch.Generator | None = None) -> torch.Tensor:
        """[3]-[4] Every user's sent index, decoded by the server (each rotation built once): [n, d]."""
        x, seeds = self._check(x, seeds)
        return self._encode(x, seeds, generator, decode=True)[1]  # type: ignore[return-value]

    def estimate_mean(self, x: torch.Tensor, seeds: Seeds, generator: torch.Generator | None = None) -> torch.Tensor:
        """[5] Encode and decode every user (each rotation built once) and average: the estimate of mean(x), [d]."""
        return self.privatize(x, seeds, generator).mean(0)


class PrivUnitG:
    """PrivUnitG (Asi, Feldman, Talwar 2022, arXiv 2205.02466), parameters as the repo's privunitG.py.

    With probability p the component along x is drawn from N(0,1) conditioned on > gamma, else on < gamma; the rest
    is N(0, I) orthogonal to x; all scaled by sigma: sigma (g - <g,x> x + t x). gamma fixes the privacy,
    p(1-q)/(q(1-p)) = e^eps with q = P(N(0,1) > gamma); p in {0.01..0.99} minimises sigma = 1/E[t] (unbiased).

    Communication: the output is a real vector of ``dim`` floats (64 dim bits in float64); :attr:`bits_per_user` is
    64, the label of the repo's table ("64 bits"), kept for comparison, not a count of what is sent.
    """

    bits_per_user = 64

    def __init__(self, dim: int, epsilon: float) -> None:
        self.dim, self.epsilon = int(dim), float(epsilon)
        best = min((self._gamma_sigma(p, self.epsilon) + (p,) for p in np.arange(0.01, 1.0, 0.01)),
                   key=lambda t: t[1])
        self.gamma, self.sigma, self.p = (float(v) for v in best)

    @staticmethod
    def _gamma_sigma(p: float, epsilon: float) -> tuple[float, float]:
        q = 1.0 / (1.0 + math.exp(epsilon) * (1.0 - p) / p)  # p(1-q)/(q(1-p)) = e^eps
        gamma = float(norm.isf(q))
        mu = norm.pdf(gamma) * (p / norm.sf(gamma) - (1.0 - p) / norm.cdf(gamma))  # E[t]
        return gamma, float(1.0 / mu)

    def mse(self, n: int) -> float:
        """Closed form for n unit inputs: (sigma^2 ((d-1) + E[t^2]) - 1) / n (fact sheet's check)."""
        g, phi = self.gamma, norm.pdf(self.gamma)
        et2 = self.p * (1 + g * phi / norm.sf(g)) + (1 - self.p) * (1 - g * phi / norm.cdf(g))
        return (self.sigma ** 2 * ((self.dim - 1) + et2) - 1) / n

    def privatize(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Rows of x [n, d] (norm <= 1) -> unbiased private reals [n, d]."""
        x = round_to_sphere(torch.as_tensor(x, dtype=torch.float64), generator)
        n = x.shape[0]
        g = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        upper = torch.rand(n, generator=generator, dtype=torch.float64) < self.p
        u = torch.rand(n, generator=generator, dtype=torch.float64).clamp_min(1e-300)
        gamma = torch.tensor(self.gamma, dtype=torch.float64)
        t_hi = -torch.special.ndtri(torch.exp(torch.special.log_ndtr(-gamma) + u.log()))  # t | t > gamma
        t_lo = torch.special.ndtri(u * torch.special.ndtr(gamma))  # t | t < gamma (the repo: 25 rejection tries)
        t = torch.where(upper, t_hi, t_lo)
        along = (g * x).sum(1, keepdim=True)
        return self.sigma * (g - along * x + t.unsqueeze(1) * x)

    def estimate_mean(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.privatize(x, generator).mean(0)


class SQKR:
    """SQKR (Chen, Kairouz, Özgür 2020), as the repo's sqkr.py: Kashin representation in a random tight frame,
    randomized 1-bit quantization, k sampled coordinates (shared randomness), and 2^k-RR on the k-bit string.

    Frame: N = 2^(ceil(log2 d) + 1), U [N, d] with orthonormal columns (seeded by ``seed``, shared by all users).
    Kashin: a with U^T a = x and |a_i| <= K/sqrt(N), K = 1/((1-eta) sqrt(delta)), eta = 0.4, delta = 0.8,
    int(ln N) truncation rounds. Quantize: q_i = +-K/sqrt(N), unbiased. Sample k = ``bits`` coordinates with
    replacement (from the user's seed). k-RR: keep the k signs with probability (e^eps - 1)/(e^eps + 2^k - 1), else
    send k uniform bits. Decode: U^T (N (e^eps + 2^k - 1)/(e^eps - 1) (K/sqrt(N))/k sum_l s_l e_{i_l}).
    Sends ``bits`` bits; pure eps-LDP given the shared frame and sampled coordinates.
    """

    def __init__(self, dim: int, epsilon: float, bits: int, seed: int = 0, eta: float = 0.4,
                 delta: float = 0.8, dtype: torch.dtype = torch.float64) -> None:
        self.dim, self.epsilon, self.bits, self.eta, self.delta = int(dim), float(epsilon), int(bits), eta, delta
        self.N = 2 ** (math.ceil(math.log2(self.dim)) + 1)
        self.frame = haar_frame(self.N, self.dim, seed, dtype)  # [N, d], U^T U = I_d
        self.level = 1.0 / ((1 - eta) * math.sqrt(delta)) / math.sqrt(self.N)  # K / sqrt(N)
        e = math.exp(self.epsilon)
        self.keep = (e - 1) / (e + 2 ** self.bits - 1)
        self.dtype = dtype

    @property
    def bits_per_user(self) -> int:
        return self.bits

    def kashin(self, x: torch.Tensor) -> torch.Tensor:
        """Kashin coefficients a [n, N] of rows of x (U^T a = x) by the repo's truncation iteration."""
        U, y = self.frame, x.clone()
        a = torch.zeros(x.shape[0], self.N, dtype=x.dtype)
        m = self.eta / math.sqrt(self.delta * self.N)
        for _ in range(int(math.log(self.N))):
            b = (y @ U.T).clamp(-m, m)
            y = y - b @ U
            a = a + b
            m *= self.eta
        return a + y @ U.T

    def sampled(self, seeds: Seeds) -> torch.Tensor:
        """The k coordinates [n, k] each user sends (shared randomness, from its seed)."""
        g = torch.Generator()
        out = torch.empty(len(_seed_list(seeds)), self.bits, dtype=torch.long)
        for i, s in enumerate(_seed_list(seeds)):
            g.manual_seed(s)
            out[i] = torch.randint(self.N, (self.bits,), generator=g)
        return out

    def encode(self, x: torch.Tensor, seeds: Seeds, generator: torch.Generator | None = None) -> torch.Tensor:
        """Rows of x [n, d] (norm <= 1) -> the sent bits [n, k] (bool)."""
        x = torch.as_tensor(x, dtype=self.dtype)
        if float(x.norm(dim=1).max()) > 1 + 1e-6:
            raise ValueError("inputs must lie in the unit ball")
        a = self.kashin(x).clamp(-self.level, self.level)
        plus = torch.rand(a.shape, generator=generator, dtype=self.dtype) < (a + self.level) / (2 * self.level)
        signs = plus.gather(1, self.sampled(seeds))  # quantize all N, then sample (duplicates share a value)
        n = signs.shape[0]
        replace = torch.rand(n, 1, generator=generator, dtype=self.dtype) >= self.keep  # 2^k-RR
        noise = torch.rand(n, self.bits, generator=generator, dtype=self.dtype) < 0.5
        return torch.where(replace, noise, signs)

    def decode(self, bits: torch.Tensor, seeds: Seeds) -> torch.Tensor:
        """Unbiased per-user decodes [n, d]."""
        signs = 2.0 * torch.as_tensor(bits).to(self.dtype) - 1.0
        v = torch.zeros(signs.shape[0], self.N, dtype=self.dtype)
        v.scatter_add_(1, self.sampled(seeds), signs)
        e = math.exp(self.epsilon)
        scale = self.N * (e + 2 ** self.bits - 1) / (e - 1) * self.level / self.bits
        return (scale * v) @ self.frame

    def estimate_mean(self, x: torch.Tensor, seeds: Seeds, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decode(self.encode(x, seeds, generator), seeds).mean(0)


class LocalDPAccountant(IAccountant):
    """Pure epsilon-LDP accountant of a local randomizer (RRSC), opacus' ``IAccountant`` interface.

    Each :meth:`step` records one participation of a user (worst case: every step, no amplification by sampling,
    since the server sees who sends); ``history`` is opacus' ``[(noise_multiplier, sample_rate, steps)]`` with
    consecutive equal entries merged (the noise multiplier and rate are recorded, not used). :meth:`get_epsilon`
    is basic composition of pure DP: k participations -> k epsilon, valid for every delta >= 0.

    Trust model: this is *per-user local DP under shared randomness* — each user's sent message is epsilon-DP with
    respect to its own input given the shared seed (the rotation), against anyone including the server; it assumes
    only that the user's private randomness is secret. It is not a central DP guarantee of the aggregate (a central
    accountant of the sum would give a different, typically much smaller, epsilon under other assumptions).
    """

    def __init__(self, epsilon: float) -> None:
        if epsilon <= 0:
            raise ValueError("epsilon must be positive")
        self.epsilon = float(epsilon)
        self.history: list[tuple[float, float, int]] = []

    def step(self, *, noise_multiplier: float = 0.0, sample_rate: float = 1.0) -> None:
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            s, q, k = self.history[-1]
            self.history[-1] = (s, q, k + 1)
        else:
            self.history.append((noise_multiplier, sample_rate, 1))

    def __len__(self) -> int:
        return int(sum(k for _, _, k in self.history))

    def get_epsilon(self, delta: float = 0.0, *args: Any, **kwargs: Any) -> float:
        return self.epsilon * len(self)

    @classmethod
    def mechanism(cls) -> str:
        return "rrsc"
