from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plpriv.metrics.hessian import (
    EpsilonDenoiser,
    conditional_hessian_score,
    hessian_scores,
    log_density_hessian_eigs,
)


def _col(sigma: Tensor, x: Tensor) -> Tensor:
    return sigma.reshape((-1,) + (1,) * (x.ndim - 1))


class GaussianDenoiser:
    """Exact denoiser of N(mu, diag(v)): D(x; s) = mu + v/(v+s^2) (x - mu)."""

    def __init__(self, mu: Tensor, v: Tensor) -> None:
        self.mu, self.v = mu, v

    def __call__(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        s2 = _col(sigma, x) ** 2
        return self.mu + self.v / (self.v + s2) * (x - self.mu)


class PointsDenoiser:
    """Exact denoiser of a uniform mixture of points: posterior mean under softmax(-|x - x_i|^2 / 2s^2)."""

    def __init__(self, points: Tensor) -> None:
        self.points = points  # (K, d)

    def __call__(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        logits = -((flat[:, None] - self.points[None]) ** 2).sum(-1) / (2 * sigma[:, None] ** 2)
        return (torch.softmax(logits, dim=-1) @ self.points).reshape(x.shape)


class TinyAttentionDenoiser(nn.Module):
    """A learned-looking denoiser: conv + self-attention (F.scaled_dot_product_attention), non-symmetric Jacobian."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Conv2d(1, 8, 3, padding=1)
        self.qkv = nn.Conv2d(8, 24, 1)
        self.out = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        h = torch.tanh(self.inp(x)) * (1 + _col(sigma, x))
        b, c, hh, ww = h.shape
        q, k, v = self.qkv(h).reshape(b, 3, 1, c, hh * ww).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, hh, ww)
        return x + 0.3 * self.out(F.silu(h + a))


def test_gaussian_exact_spectrum_full_and_lanczos() -> None:
    torch.manual_seed(0)
    d = 16
    mu, v = torch.randn(d, dtype=torch.float64), torch.rand(d, dtype=torch.float64) * 2 + 0.05
    sigma = torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64)
    x = torch.randn(3, d, dtype=torch.float64)
    expected = torch.sort(-1.0 / (v[None] + sigma[:, None] ** 2), dim=-1).values
    den = GaussianDenoiser(mu, v)
    full = log_density_hessian_eigs(den, x, sigma, method="full")
    lan = log_density_hessian_eigs(den, x, sigma, method="lanczos", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(full, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lan, expected, rtol=1e-8, atol=1e-8)
    # k most negative and k largest from one Krylov space
    small, large = log_density_hessian_eigs(den, x, sigma, k=3, largest=True, num_iters=d)
    torch.testing.assert_close(small, expected[:, :3], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(large, expected.flip(-1)[:, :3], rtol=1e-8, atol=1e-8)


def test_scores_on_gaussian_closed_form() -> None:
    # Normalised eigenvalues of N(mu, diag(v)) at level s: -s^2/(v + s^2); the largest belong to the largest v.
    v = torch.tensor([0.01, 0.1, 1.0, 4.0, 9.0, 16.0], dtype=torch.float64)
    den = GaussianDenoiser(torch.zeros(6, dtype=torch.float64), v)
    sigma = 0.5
    _, large = log_density_hessian_eigs(den, torch.randn(2, 6, dtype=torch.float64), sigma, k=3, largest=True)
    scores = hessian_scores(large, sigma, threshold=0.5)
    lam = sigma**2 / (v[-3:] + sigma**2)
    torch.testing.assert_close(scores.sharpness, lam.mean().expand(2))
    assert scores.count_below.tolist() == [0, 0]
    small = log_density_hessian_eigs(den, torch.randn(2, 6, dtype=torch.float64), sigma, k=3)
    assert hessian_scores(small, sigma, threshold=0.5).count_below.tolist() == [2, 2]  # v = 0.01, 0.1 < s^2


def test_single_memorised_point_is_minus_identity_over_sigma_squared() -> None:
    # D = x0 for every x: Hessian -I/s^2. Lanczos breaks down after one step (invariant subspace) and must restart.
    d, sigma = 12, 0.7
    x0 = torch.randn(1, 3, 2, 2)
    den = lambda x, s, c=None: x0.expand_as(x)  # noqa: E731
    x = torch.randn(4, 3, 2, 2)
    for method in ("full", "lanczos"):
        eigs = log_density_hessian_eigs(den, x, sigma, method=method)
        assert eigs.shape == (4, d)
        torch.testing.assert_close(eigs, torch.full((4, d), -1 / sigma**2), rtol=1e-5, atol=1e-5)
    _, large = log_density_hessian_eigs(den, x, sigma, k=5, largest=True)
    scores = hessian_scores(large, sigma, threshold=0.5)
    assert scores.count_below.tolist() == [5] * 4  # even the flattest directions are sharp
    torch.testing.assert_close(scores.sharpness, torch.ones(4))


def test_lanczos_matches_full_and_explicit_jacobian_d64() -> None:
    torch.manual_seed(0)
    net = TinyAttentionDenoiser().eval()
    x = torch.randn(2, 1, 8, 8)  # d = 64
    sigma = torch.tensor([0.5, 1.5])
    # Independent reference: reverse-mode Jacobian per sample, symmetric part, eigvalsh.
    ref = []
    for b in range(2):
        f = lambda z: net(z.reshape(1, 1, 8, 8), sigma[b : b + 1]).reshape(64)  # noqa: E731
        jac = torch.autograd.functional.jacobian(f, x[b].reshape(64)).double()
        ref.append(torch.linalg.eigvalsh((0.5 * (jac + jac.T) - torch.eye(64, dtype=torch.float64)) / sigma[b] ** 2))
    ref = torch.stack(ref).float()
    assert not torch.allclose(jac, jac.T, atol=1e-3)  # the symmetrisation matters for this net
    full = log_density_hessian_eigs(net, x, sigma, method="full")
    lan = log_density_hessian_eigs(net, x, sigma, method="lanczos", generator=torch.Generator().manual_seed(0))
    scale = ref.abs().max()
    torch.testing.assert_close(full, ref, rtol=0, atol=1e-4 * scale)
    torch.testing.assert_close(lan, ref, rtol=0, atol=1e-4 * scale)
    # Few iterations: the extreme eigenvalues converge first.
    small, large = log_density_hessian_eigs(net, x, sigma, k=2, largest=True, num_iters=40)
    torch.testing.assert_close(small[:, 0], ref[:, 0], rtol=0, atol=1e-3 * scale)
    torch.testing.assert_close(large[:, 0], ref[:, -1], rtol=0, atol=1e-3 * scale)


def test_mixture_near_a_component_approaches_minus_one_over_sigma_squared() -> None:
    torch.manual_seed(0)
    points = torch.randn(5, 64, dtype=torch.float64) * 3
    den = PointsDenoiser(points)
    sigma = 0.2
    x = points[:2] + 0.1 * torch.randn(2, 64, dtype=torch.float64)
    eigs = log_density_hessian_eigs(den, x, sigma, k=8, largest=True)
    small, large = eigs
    torch.testing.assert_close(small * sigma**2, -torch.ones_like(small), rtol=0, atol=1e-6)
    torch.testing.assert_close(large * sigma**2, -torch.ones_like(large), rtol=0, atol=1e-6)
    # Between two components the posterior covariance is rank one: one direction is not sharp.
    mid = 0.5 * (points[0] + points[1])[None]
    eigs_mid = log_density_hessian_eigs(den, mid, 2.0, method="full")[0] * 4.0
    assert eigs_mid.min() >= -1 - 1e-9 and eigs_mid[-1] > -0.9


def test_jvp_count_and_cost_options() -> None:
    calls = []
    den0 = GaussianDenoiser(torch.zeros(10), torch.linspace(0.1, 2, 10))

    def den(x: Tensor, s: Tensor, c: Tensor | None = None) -> Tensor:
        calls.append(1)
        return den0(x, s)

    x = torch.randn(3, 10)
    log_density_hessian_eigs(den, x, 0.5, k=2, num_iters=7)
    assert len(calls) == 7 + 1  # 7 JVPs (one per iteration, whole batch) + the forward pass the VJPs reuse
    calls.clear()
    log_density_hessian_eigs(den, x, 0.5, k=2, num_iters=7, symmetrize=False)
    assert len(calls) == 7


def test_argument_errors() -> None:
    den = GaussianDenoiser(torch.zeros(4), torch.ones(4))
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="method"):
        log_density_hessian_eigs(den, x, 1.0, method="arnoldi")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k must be"):
        log_density_hessian_eigs(den, x, 1.0, k=5)
    with pytest.raises(ValueError, match="sigma must be positive"):
        log_density_hessian_eigs(den, x, 0.0)
    with pytest.raises(ValueError, match="num_iters"):
        log_density_hessian_eigs(den, x, 1.0, k=3, num_iters=2)


def test_conditional_detector_closed_form_gaussian_pair() -> None:
    # p(x | c) = N(mu_c, diag(v_c)), p(x) = N(mu_u, diag(v_u)); label 1 selects the conditional model, 0 the other.
    torch.manual_seed(0)
    d = 6
    mu_c, mu_u = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    v_c, v_u = torch.rand(d, dtype=torch.float64) + 0.1, torch.rand(d, dtype=torch.float64) + 0.5
    cond, uncond = GaussianDenoiser(mu_c, v_c), GaussianDenoiser(mu_u, v_u)

    def den(x: Tensor, s: Tensor, labels: Tensor) -> Tensor:
        use_c = labels.reshape(-1, 1).to(x.dtype)
        return use_c * cond(x, s) + (1 - use_c) * uncond(x, s)

    sigma = torch.tensor([0.8, 3.0, 80.0], dtype=torch.float64)
    x = torch.randn(3, d, dtype=torch.float64) * sigma[:, None]
    labels = torch.ones(3)
    got = conditional_hessian_score(den, x, sigma, labels, uncond_labels=torch.zeros(3))
    # Closed form from the Gaussian scores: s(x) = -(x - mu)/(v + s^2), H = -diag(1/(v + s^2)).
    s2 = sigma[:, None] ** 2
    s_delta = -(x - mu_c) / (v_c + s2) + (x - mu_u) / (v_u + s2)
    h_diff = -1 / (v_c + s2) + 1 / (v_u + s2)
    torch.testing.assert_close(got, (h_diff * s_delta).norm(dim=-1), rtol=1e-9, atol=0)
    # Default uncond labels: zeros.
    torch.testing.assert_close(conditional_hessian_score(den, x, sigma, labels), got)


def test_epsilon_denoiser_on_gaussian_eps_model_closed_form() -> None:
    # Optimal VP epsilon-predictor for x0 ~ N(0, diag(v)): eps(x_t) = sqrt(1 - a) x_t / (a v + 1 - a).
    from diffusers import DDPMScheduler

    alphas = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    v = torch.linspace(0.2, 3.0, 8, dtype=torch.float64)
    eps_model = lambda xt, t, c: (1 - alphas[t].double()[:, None]).sqrt() * xt / (  # noqa: E731
        alphas[t].double()[:, None] * v + 1 - alphas[t].double()[:, None])
    den = EpsilonDenoiser(eps_model, alphas)
    sigma = den.sigma_at(300)
    eigs = log_density_hessian_eigs(den, torch.randn(2, 8, dtype=torch.float64), sigma)
    torch.testing.assert_close(eigs, (-1 / (v + sigma**2)).sort().values.expand(2, 8), rtol=1e-6, atol=1e-8)


def test_diffusers_unet_with_attention_lanczos_matches_full() -> None:
    # Forward-mode AD through diffusers' attention (F.scaled_dot_product_attention) needs the math kernel.
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=4, in_channels=1, out_channels=1, block_out_channels=(8, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=4).eval()
    den = EpsilonDenoiser(lambda x, t, c: unet(x, t).sample, DDPMScheduler(num_train_timesteps=1000).alphas_cumprod)
    x, sigma = torch.randn(2, 1, 4, 4), den.sigma_at(500)
    full = log_density_hessian_eigs(den, x, sigma, method="full")
    lan = log_density_hessian_eigs(den, x, sigma, method="lanczos", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lan, full, rtol=0, atol=1e-4 * float(full.abs().max()))
