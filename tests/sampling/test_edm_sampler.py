"""EDM Algorithm 2 against the closed-form probability-flow ODE of Gaussian data.

For data N(mu, v I) the ideal denoiser is D(x; s) = mu + v/(v+s^2) (x - mu) and the PF-ODE dx/dt = (x - D)/t has the
solution x(t) = mu + sqrt((v + t^2)/(v + T^2)) (x(T) - mu).
"""

from __future__ import annotations

import math

import pytest
import torch

from plpriv.sampling import edm_sampler, edm_sigma_steps

MU, V = 0.3, 0.64


class GaussianDenoiser:
    def __init__(self, mu: float = MU, v: float = V) -> None:
        self.mu, self.v, self.calls = mu, v, 0

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        s2 = torch.as_tensor(sigma, dtype=torch.float64) ** 2
        return self.mu + self.v / (self.v + s2) * (x - self.mu)


def exact(x_T: torch.Tensor, T: float, t: float, mu: float = MU, v: float = V) -> torch.Tensor:
    return mu + math.sqrt((v + t**2) / (v + T**2)) * (x_T - mu)


def latents(n: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(seed))


def test_sigma_steps_formula() -> None:
    t = edm_sigma_steps(18, 0.002, 80.0, 7.0)
    assert t.dtype == torch.float64 and len(t) == 19 and t[-1] == 0
    assert t[0].item() == pytest.approx(80.0) and t[17].item() == pytest.approx(0.002)
    i = 5
    ref = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert t[i].item() == pytest.approx(ref, rel=1e-12)
    assert torch.all(t[:-1] > t[1:])


@pytest.mark.parametrize("num_steps", [6, 18])
def test_nfe_is_2n_minus_1(num_steps: int) -> None:
    net = GaussianDenoiser()
    edm_sampler(net, latents(4), num_steps=num_steps)
    assert net.calls == 2 * num_steps - 1


def test_matches_pf_ode_solution_at_high_step_count() -> None:
    z = latents()
    seen = {}
    n = 4096
    out = edm_sampler(GaussianDenoiser(), z, num_steps=n, callback=lambda i, s, x, d: seen.update({i: (s, x)}))
    x_T = z.double() * 80.0
    # State entering the last step (t = sigma_min): Heun-integrated ODE, global error ~33/N^2 here.
    s_last, x_last = seen[n - 1]
    assert s_last.item() == pytest.approx(0.002)
    torch.testing.assert_close(x_last, exact(x_T, 80.0, 0.002), rtol=0, atol=5e-6)
    # Final output vs the ODE solution at t = 0 (the last Euler step to 0 adds only O(sigma_min^2) error).
    torch.testing.assert_close(out, exact(x_T, 80.0, 0.0), rtol=0, atol=2e-5)
    assert out.dtype == torch.float64


def test_heun_second_order_convergence() -> None:
    """Halving the step (in EDM's rho-warped time) must cut the global error ~4x (Heun is 2nd order)."""
    z = latents(64, seed=1)
    x_T = z.double() * 80.0
    target = exact(x_T, 80.0, 0.002)
    errs = []
    for n in (32, 64, 128, 256):
        seen = {}
        edm_sampler(GaussianDenoiser(), z, num_steps=n, callback=lambda i, s, x, d: seen.update({i: x}))
        errs.append((seen[n - 1] - target).abs().max().item())
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    assert all(3.5 < r < 4.5 for r in ratios), (errs, ratios)
    assert errs[-1] < 1e-3


def test_callback_sees_denoiser_input_and_output() -> None:
    net = GaussianDenoiser()
    records = []
    edm_sampler(net, latents(8), num_steps=5, callback=lambda i, s, x, d: records.append((i, s.item(), x, d)))
    assert [r[0] for r in records] == list(range(5))
    for _, s, x, d in records:
        torch.testing.assert_close(d, MU + V / (V + s**2) * (x - MU))


def test_stochastic_sampler_hits_target_distribution() -> None:
    """With churn (EDM's ImageNet-64 settings) the samples are still N(mu, v): check mean and variance."""
    z = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(3)
    out = edm_sampler(GaussianDenoiser(), z, num_steps=256, S_churn=40, S_min=0.05, S_max=50, S_noise=1.0, generator=g)
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.var().item() == pytest.approx(V, rel=0.04)
    # Churn changes the trajectory (a deterministic run would map z to the exact ODE solution).
    assert (out - exact(z.double() * 80, 80, 0)).abs().max() > 1e-2


def test_net_sigma_range_is_respected() -> None:
    class Clamped(GaussianDenoiser):
        sigma_min, sigma_max = 0.01, 10.0

        def __init__(self) -> None:
            super().__init__()
            self.sigmas = []

        def __call__(self, x, sigma, class_labels=None):
            self.sigmas.append(float(sigma))
            return super().__call__(x, sigma, class_labels)

    net = Clamped()
    edm_sampler(net, latents(2), num_steps=8)
    assert max(net.sigmas) == pytest.approx(10.0) and min(net.sigmas) == pytest.approx(0.01)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="num_steps"):
        edm_sampler(GaussianDenoiser(), latents(2), num_steps=0)
    with pytest.raises(ValueError, match="sigma_min"):
        edm_sigma_steps(4, sigma_min=1.0, sigma_max=0.5)
