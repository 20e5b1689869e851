"""Hessian spectra of the learned log density, a memorization signal.

Jeon, Kim, No, "Understanding (and Mitigating) Memorization in Generative Models via Sharpness of Probability
Landscapes" (arXiv 2412.04140, ICML 2025): memorised samples sit on sharp, isolated peaks of log p, where the Hessian
has large negative eigenvalues in (nearly) every direction; generalising samples have many eigenvalues near 0.

For an EDM-style denoiser D(x; s) the score is (D(x; s) - x) / s^2 (Tweedie), hence

    H(x; s) = grad^2 log p_s(x) = (dD/dx - I) / s^2.

For an exact denoiser dD/dx = Cov[x0 | x] / s^2 is positive semi-definite, so the *normalised* eigenvalues
s^2 * lambda lie in [-1, inf): -1 in a direction where the denoiser ignores x (a memorised point: D = x0), about 0
along directions of the data manifold. The scores below work on these normalised eigenvalues.

The denoiser protocol is ``denoiser(x, sigma, class_labels) -> D(x; sigma)`` with ``sigma`` a tensor of shape (B,);
it must treat the samples of a batch independently (eval mode: no batch norm in training mode, no dropout), so one
batched Jacobian-vector product gives every sample's own product.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "EpsilonDenoiser",
    "HessianScores",
    "conditional_hessian_score",
    "hessian_scores",
    "log_density_hessian_eigs",
]

Denoiser = Callable[..., Tensor]


class EpsilonDenoiser:
    """Denoiser ``D(x, sigma, cond)`` from a variance-preserving epsilon-prediction model (DDPM; e.g. a diffusers
    ``UNet2DModel``), so that its Hessian spectra can be taken like an EDM model's.

    VP forward process x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (a_t: ``alphas_cumprod``) is EDM's x = x0 + sigma eps
    scaled by sqrt(a_t), with sigma_t = sqrt((1 - a_t) / a_t) (Karras et al. 2022, Table 1, VP column), hence
    D(x; sigma) = x - sigma * eps(sqrt(a_t) x, t). ``t`` is the discrete step whose sigma_t is nearest to the
    requested one (in log); ask for sigma_t values to be exact (``sigma_at(t)``).

    Args:
        eps_model: ``eps_model(x_t, t, cond) -> eps``, e.g. ``lambda x, t, c: unet(x, t, class_labels=c).sample``.
        alphas_cumprod: (T,), e.g. ``DDPMScheduler(...).alphas_cumprod``.
    """

    def __init__(self, eps_model: Callable[[Tensor, Tensor, Any], Tensor], alphas_cumprod: Tensor) -> None:
        self.eps_model = eps_model
        self.alphas_cumprod = alphas_cumprod.double()
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    def sigma_at(self, t: int) -> float:
        return float(self.sigmas[t])

    def __call__(self, x: Tensor, sigma: Tensor | float, cond: Any = None) -> Tensor:
        sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0]).cpu()
        t = (self.sigmas.log()[None] - sig.log()[:, None]).abs().argmin(1)
        view = (-1,) + (1,) * (x.ndim - 1)
        scale = self.alphas_cumprod[t].sqrt().to(x).reshape(view)
        eps = self.eps_model(x * scale, t.to(x.device), cond)
        return x - self.sigmas[t].to(x).reshape(view) * eps.to(x.dtype)


def _sigma_vector(sigma: float | Tensor, batch: int, x: Tensor) -> Tensor:
    sigma_t = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
    if sigma_t.numel() not in (1, batch):
        raise ValueError(f"sigma must be a scalar or have one value per sample ({batch}), got shape {tuple(sigma_t.shape)}")
    if not bool((sigma_t > 0).all()):
        raise ValueError(f"sigma must be positive, got {sigma_t.tolist()}")
    return sigma_t.expand(batch).contiguous()


def _randn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _orthogonalize(w: Tensor, basis: Tensor) -> Tensor:
    """Remove from each w[b] (B, d) its components along the rows of basis[b] (B, j, d): classical Gram-Schmidt run
    twice ("twice is enough", Giraud et al. 2005), which keeps the Lanczos basis orthogonal to working precision."""
    for _ in range(2):
        w = w - torch.einsum("bj,bjd->bd", torch.einsum("bjd,bd->bj", basis, w), basis)
    return w


def _lanczos_ritz_values(
    matvec: Callable[[Tensor], Tensor], batch: int, dim: int, num_iters: int, like: Tensor,
    generator: torch.Generator | None,
) -> Tensor:
    """Ritz values (B, num_iters), ascending, of B independent symmetric operators given only by ``matvec``.

    Batched Lanczos with full reorthogonalisation. When a sample's Krylov space becomes invariant (beta ~ 0, e.g. the
    operator is a multiple of I) it restarts from a random vector orthogonal to the basis with beta = 0, so repeated
    eigenvalues are found with their multiplicity. One matvec per iteration.

    Why our own loop and not scipy.sparse.linalg.eigsh on a LinearOperator: eigsh handles one operator at a time and
    needs a host round trip per product; here all B samples share each batched network call, which is what makes the
    score cheap per sample on an accelerator. torch.lobpcg needs a dense or sparse matrix, not a matvec.
    """
    basis = torch.zeros(batch, num_iters, dim, dtype=like.dtype, device=like.device)
    alpha = torch.zeros(batch, num_iters, dtype=torch.float64, device=like.device)
    beta = torch.zeros(batch, max(num_iters - 1, 0), dtype=torch.float64, device=like.device)
    tol = torch.finfo(like.dtype).eps ** 0.5
    q = _randn((batch, dim), like, generator)
    basis[:, 0] = q / q.norm(dim=-1, keepdim=True)
    for j in range(num_iters):
        q = basis[:, j]
        w = matvec(q)
        scale = w.norm(dim=-1).clamp_min(torch.finfo(like.dtype).tiny)
        alpha[:, j] = (w * q).sum(-1).double()
        if j == num_iters - 1:
            break
        # Full reorthogonalisation subsumes the three-term recurrence (w - alpha q_j - beta q_{j-1}).
        w = _orthogonalize(w, basis[:, : j + 1])
        b = w.norm(dim=-1)
        broke = b <= tol * scale
        if bool(broke.any()):
            r = _orthogonalize(_randn((batch, dim), like, generator), basis[:, : j + 1])
            r = r / r.norm(dim=-1, keepdim=True)
            w = torch.where(broke[:, None], r, w / b.clamp_min(torch.finfo(like.dtype).tiny)[:, None])
            b = torch.where(broke, torch.zeros_like(b), b)
        else:
            w = w / b[:, None]
        beta[:, j] = b.double()
        basis[:, j + 1] = w
    tri = torch.diag_embed(alpha) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    return torch.linalg.eigvalsh(tri)


def log_density_hessian_eigs(
    denoiser: Denoiser,
    x: Tensor,
    sigma: float | Tensor,
    k: int | None = None,
    method: Literal["lanczos", "full"] = "lanczos",
    class_labels: Tensor | None = None,
    *,
    largest: bool = False,
    num_iters: int | None = None,
    symmetrize: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Eigenvalues of the Hessian of log p_sigma at each sample of ``x``: eig((dD/dx - I) / sigma^2).

    Args:
        denoiser: ``denoiser(x, sigma, class_labels) -> D(x; sigma)``, batch-independent (see the module docstring);
            e.g. plpriv's EDM denoiser with EMA weights or a wrapped diffusers U-Net. Put it in eval mode.
        x: points (B, ...) at which to evaluate the spectrum.
        sigma: noise level, scalar or (B,).
        k: how many eigenvalues to return at each end (the most negative; the largest with ``largest=True``);
            ``None`` returns all d = x[0].numel().
        method: ``"full"`` builds each sample's Jacobian with d batched JVPs and calls ``eigvalsh`` (exact, for small
            d and verification); ``"lanczos"`` uses only Jacobian-vector products.
        class_labels: passed through to the denoiser.
        largest: also return the k largest eigenvalues (descending); Lanczos gets both ends from one Krylov space.
        num_iters: Lanczos iterations m (default ``min(d, max(2k, k + 20))``; m = d is exact up to round-off).
            Extreme eigenvalues converge first; with m < d the inner ones of the k returned are Ritz values that
            interlace the true spectrum (pulled towards its middle), which is fine for scores, not for exact values.
        symmetrize: a learned denoiser's Jacobian is not exactly symmetric (the true Hessian is). ``True`` (default)
            uses the symmetric part (J + J^T)/2, whose eigenvalues are real and whose quadratic form is the
            curvature v^T J v of the learned score: one JVP and one VJP (reused reverse graph) per iteration.
            ``False`` assumes J symmetric and halves the cost (one JVP per iteration). ``"full"`` always uses the
            symmetric part.
        generator: random source for the Lanczos start (and restart) vectors.

    Returns:
        ``(B, k)`` ascending (most negative first), or with ``largest=True`` a pair ``(smallest, largest)``.

    Cost per call (all B samples share each batched network call): ``"lanczos"`` m JVPs (+ m VJPs and one forward
    pass when ``symmetrize``); ``"full"`` d JVPs.
    """
    if method not in ("lanczos", "full"):
        raise ValueError(f"method must be 'lanczos' or 'full', got {method!r}")
    if x.ndim < 2:
        raise ValueError(f"x must be batched (B, ...), got shape {tuple(x.shape)}")
    batch, dim = x.shape[0], x[0].numel()
    if k is None:
        k = dim
    if not 1 <= k <= dim:
        raise ValueError(f"k must be in [1, {dim}] (the input dimension), got {k}")
    sig = _sigma_vector(sigma, batch, x)
    x = x.detach()

    def fn(z: Tensor) -> Tensor:
        return denoiser(z, sig, class_labels)

    def jvp(v: Tensor) -> Tensor:
        out = torch.func.jvp(fn, (x,), (v.reshape(x.shape),))[1]
        return out.reshape(batch, dim).to(x.dtype)

    # JVPs through F.scaled_dot_product_attention need the math kernel (flash / memory-efficient lack forward AD).
    # no_grad: no graph through the parameters; torch.func.vjp still differentiates w.r.t. x (it ignores outer no_grad).
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        if method == "full":
            eye = torch.eye(dim, dtype=x.dtype, device=x.device)
            jac = torch.stack([jvp(eye[i].expand(batch, dim)) for i in range(dim)], dim=-1)  # (B, d, d), columns J e_i
            mu = torch.linalg.eigvalsh((0.5 * (jac + jac.transpose(1, 2))).double())
        else:
            m = min(dim, max(2 * k, k + 20)) if num_iters is None else num_iters
            if not k <= m <= dim:
                raise ValueError(f"num_iters must be in [k={k}, d={dim}], got {m}")
            if symmetrize:
                vjp_fn = torch.func.vjp(fn, x)[1]

                def matvec(v: Tensor) -> Tensor:
                    jtv = vjp_fn(v.reshape(x.shape).to(x.dtype))[0].reshape(batch, dim)
                    return 0.5 * (jvp(v) + jtv.to(x.dtype))
            else:
                matvec = jvp

            mu = _lanczos_ritz_values(matvec, batch, dim, m, x, generator)
    # mu: eigenvalues of (the symmetric part of) dD/dx, ascending; H = (J - I) / sigma^2 keeps the order.
    eigs = ((mu - 1.0) / sig.double()[:, None] ** 2).to(x.dtype)
    smallest = eigs[:, :k]
    if largest:
        return smallest, eigs.flip(-1)[:, :k]
    return smallest


class HessianScores(NamedTuple):
    """Per-sample detection scores from normalised eigenvalues sigma^2 * lambda (in [-1, inf) for exact denoisers)."""

    sharpness: Tensor
    """-mean of the given normalised eigenvalues. Given the k *largest* (flattest) ones: ~1 when no direction is flat
    (a sharp, isolated peak: memorised), ~0 when some directions follow the data manifold (generalising)."""
    count_below: Tensor
    """How many of the given normalised eigenvalues are < -threshold (sharp directions)."""


def hessian_scores(eigs: Tensor, sigma: float | Tensor, threshold: float = 0.5) -> HessianScores:
    """Summary scores for detection from eigenvalues (B, n) of :func:`log_density_hessian_eigs`.

    Which eigenvalues to pass: off the data manifold even a generalising sample has eigenvalues near -1/sigma^2 (the
    denoiser removes noise there), so the k most negative ones separate memorised samples only weakly; the k largest
    do: a memorised sample has no flat direction at all (Jeon et al.: negative "in (nearly) all directions").
    ``threshold`` is on the normalised scale (0.5: the denoiser halves perturbations in that direction).
    Higher scores = sharper = more likely memorised.
    """
    if eigs.ndim != 2:
        raise ValueError(f"eigs must have shape (B, n), got {tuple(eigs.shape)}")
    if not 0 < threshold:
        raise ValueError(f"threshold must be positive (normalised eigenvalues are >= -1), got {threshold}")
    sig = torch.as_tensor(sigma, dtype=eigs.dtype, device=eigs.device).reshape(-1, 1)
    lam = eigs * sig**2
    return HessianScores(sharpness=-lam.mean(-1), count_below=(lam < -threshold).sum(-1))


def conditional_hessian_score(
    denoiser: Denoiser,
    x: Tensor,
    sigma: float | Tensor,
    class_labels: Tensor,
    uncond_labels: Tensor | None = None,
) -> Tensor:
    """Detector for conditional models (Jeon et al., Sec. on Stable Diffusion): ``||(H_c - H_uncond) s_delta||``.

    With s_delta = s(x, c) - s(x, uncond) and H = (dD/dx - I)/sigma^2, the identity cancels:
    (H_c - H_u) s_delta = (J_c - J_u) s_delta / sigma^2. Evaluate it at the first sampling step (x = noise * sigma_max,
    sigma = sigma_max) and average over a few generations per condition (the paper uses 4).

    ``uncond_labels`` defaults to zeros (EDM's "no class" one-hot; for text models pass the empty-prompt embedding).
    Cost: 2 forward passes + 2 JVPs per sample (batched). Returns (B,).
    """
    if uncond_labels is None:
        uncond_labels = torch.zeros_like(class_labels)
    batch = x.shape[0]
    sig = _sigma_vector(sigma, batch, x)
    x = x.detach()
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        d_c = denoiser(x, sig, class_labels)
        d_u = denoiser(x, sig, uncond_labels)
        view = (-1,) + (1,) * (x.ndim - 1)
        s_delta = ((d_c - d_u) / sig.reshape(view) ** 2).to(x.dtype)
        jc = torch.func.jvp(lambda z: denoiser(z, sig, class_labels), (x,), (s_delta,))[1]
        ju = torch.func.jvp(lambda z: denoiser(z, sig, uncond_labels), (x,), (s_delta,))[1]
        return ((jc - ju) / sig.reshape(view) ** 2).reshape(batch, -1).norm(dim=-1)
