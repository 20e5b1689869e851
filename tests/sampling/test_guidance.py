"""Guidance against closed forms on a Gaussian toy, where the exact denoiser and the guided target are known.

Data x0 ~ N(mu, s^2) per coordinate; the exact denoiser is D(x; sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2).
Tilting by exp(a x0) gives the target N(mu + a s^2, s^2); its exact noisy log-likelihood has gradient
a s^2 / (s^2 + sigma^2) (x0 | x_sigma is Gaussian), and so does a x0 differentiated through D (forward guidance).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plpriv.sampling import (
    BackwardGuidance,
    Denoiser,
    ForwardGuidance,
    GuidedDenoiser,
    LogSigmoidEnsemble,
    ScoreGuidance,
    edm_sampler,
)

MU, S, A = 0.3, 0.5, 2.0  # data mean and std, tilt
N = 20_000


class GaussianDenoiser(nn.Module):
    """The exact denoiser of N(MU, S^2) data."""

    sigma_min, sigma_max = 0.002, 80.0

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype)
        return (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)


def noisy_tilt(x: Tensor, sigma: Tensor) -> Tensor:
    """log E[exp(A x0) | x_sigma] up to a constant: its gradient is A s^2 / (s^2 + sigma^2) per coordinate."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype)
    return (A * S**2 / (S**2 + sigma**2) * x).flatten(1).sum(1)


def sample(denoiser: nn.Module, seed: int = 0, **kwargs) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(N, 1, 1, 1, generator=g, dtype=torch.float64)
    return edm_sampler(denoiser, latents, num_steps=32, generator=g, **kwargs).flatten()


def assert_normal(x: Tensor, mean: float, std: float) -> None:
    # 5 standard errors of the sample mean / std (N = 20,000): deterministic seeds, loose enough for any machine.
    se_mean, se_std = std / N**0.5, std / (2 * N) ** 0.5
    assert abs(float(x.mean()) - mean) < 5 * se_mean + 2e-3, (float(x.mean()), mean)
    assert abs(float(x.std()) - std) < 5 * se_std + 2e-3, (float(x.std()), std)


def test_gaussian_denoiser_satisfies_the_protocol_and_unguided_sampling_recovers_the_data() -> None:
    assert isinstance(GaussianDenoiser(), Denoiser)
    assert_normal(sample(GaussianDenoiser()), MU, S)


@pytest.mark.parametrize("weight", [0.5, 1.0])
def test_score_guidance_samples_the_tilted_gaussian(weight: float) -> None:
    guided = GuidedDenoiser(GaussianDenoiser(), ScoreGuidance(noisy_tilt, weight=weight))
    assert_normal(sample(guided), MU + weight * A * S**2, S)


def test_forward_guidance_through_the_denoiser_samples_the_tilted_gaussian() -> None:
    guided = GuidedDenoiser(GaussianDenoiser(), ForwardGuidance(lambda x0: A * x0.flatten(1).sum(1)))
    assert_normal(sample(guided), MU + A * S**2, S)


@pytest.mark.parametrize("guidance", [None, "score"])
def test_recurrence_keeps_the_marginal_of_an_exact_denoiser(guidance: str | None) -> None:
    # Re-noising x_{i+1} ~ p_{sigma_{i+1}} back to sigma_i by the forward kernel gives p_{sigma_i} again: the target
    # is unchanged, while the draws are (the recurrence noise is fresh).
    net: nn.Module = GaussianDenoiser()
    mean = MU
    if guidance == "score":
        net, mean = GuidedDenoiser(net, ScoreGuidance(noisy_tilt)), MU + A * S**2
    x1, x3 = sample(net, recurrence=1), sample(net, recurrence=3)
    assert_normal(x3, mean, S)
    assert float((x1 - x3).abs().max()) > 0.1


def test_recurrence_refuses_non_positive_counts() -> None:
    with pytest.raises(ValueError, match="recurrence"):
        edm_sampler(GaussianDenoiser(), torch.randn(2, 1, 1, 1), recurrence=0)


class Reward(nn.Module):
    """A time-dependent logit r(x, sigma) = w . x / (1 + sigma) + b."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(4, generator=g))
        self.b = nn.Parameter(torch.randn((), generator=g))

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        return (x.flatten(1) @ self.w) / (1 + torch.as_tensor(sigma, dtype=x.dtype)) + self.b


def test_log_sigmoid_ensemble_is_the_sum_of_members_and_one_member_is_the_single_model() -> None:
    x, sigma = torch.randn(5, 1, 2, 2), torch.tensor(0.7)
    members = [Reward(k) for k in range(3)]
    expected = sum(F.logsigmoid(m(x, sigma)) for m in members)
    torch.testing.assert_close(LogSigmoidEnsemble(members)(x, sigma), expected)
    torch.testing.assert_close(LogSigmoidEnsemble(members[:1])(x, sigma), F.logsigmoid(members[0](x, sigma)))


def test_ensemble_of_k_copies_equals_one_model_with_k_times_the_weight() -> None:
    x = torch.randn(6, 1, 2, 2, dtype=torch.float64)
    sigma = torch.tensor(1.3, dtype=torch.float64)
    base = GaussianDenoiser()
    m = Reward(0).double()
    five = GuidedDenoiser(base, ScoreGuidance(LogSigmoidEnsemble([m] * 5), weight=1.0))
    single = GuidedDenoiser(base, ScoreGuidance(LogSigmoidEnsemble([m]), weight=5.0))
    torch.testing.assert_close(five(x, sigma), single(x, sigma))
    # and the correction is w sigma^2 grad log sigmoid(r): here grad = (1 - sigmoid(r)) w / (1 + sigma)
    r = m(x, sigma).detach()
    grad = ((1 - torch.sigmoid(r))[:, None] * m.w.detach()[None] / (1 + sigma)).reshape(x.shape)
    torch.testing.assert_close(single(x, sigma) - base(x, sigma), 5.0 * sigma**2 * grad)


def test_backward_guidance_with_sgd_follows_the_closed_form_on_a_quadratic() -> None:
    # -log p = |x0 - m|^2 / 2: K steps of gradient descent give m + (1 - lr)^K (x0 - m).
    m, lr, steps = 0.25, 0.2, 7
    x0 = torch.randn(8, 1, 2, 2, dtype=torch.float64)
    g = BackwardGuidance(lambda z: -0.5 * ((z - m) ** 2).flatten(1).sum(1), steps=steps, lr=lr, clamp=None,
                         optimizer="sgd")
    torch.testing.assert_close(g.optimise(x0), m + (1 - lr) ** steps * (x0 - m))


def test_backward_guidance_stops_per_sample_at_the_cutoff_and_clamps() -> None:
    x0 = torch.tensor([[0.25], [3.0]], dtype=torch.float64).reshape(2, 1, 1, 1)  # first already at the optimum
    g = BackwardGuidance(lambda z: -0.5 * ((z - 0.25) ** 2).flatten(1).sum(1), steps=3, lr=0.5, loss_cutoff=1e-3,
                         clamp=(-1.0, 1.0), optimizer="sgd")
    out = g.optimise(x0).flatten()
    assert float(out[0]) == 0.25  # below the cutoff from the start: untouched
    # 3.0 -> 1.625 -> clamp 1.0 -> 0.625 -> 0.4375
    assert float(out[1]) == pytest.approx(0.4375)


def test_guided_denoiser_is_a_denoiser_and_leaves_the_network_without_gradients() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 4))

    class Wrapped(nn.Module):
        sigma_min, sigma_max = 0.01, 10.0

        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
            return self.net(x.float()).reshape(x.shape)

    guided = GuidedDenoiser(Wrapped(), [ForwardGuidance(lambda z: z.flatten(1).sum(1)), ScoreGuidance(noisy_tilt)])
    assert (guided.sigma_min, guided.sigma_max) == (0.01, 10.0)
    out = edm_sampler(guided, torch.randn(3, 1, 2, 2), num_steps=4)
    assert out.shape == (3, 1, 2, 2) and torch.isfinite(out).all()
    assert all(p.grad is None for p in net.parameters())


def test_bad_guidance_input_is_refused_with_the_value() -> None:
    with pytest.raises(ValueError, match="weight"):
        ScoreGuidance(noisy_tilt, weight=-1.0)
    with pytest.raises(TypeError, match="callable"):
        ForwardGuidance("not a function")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        BackwardGuidance(lambda z: z.sum(), steps=-1)
    with pytest.raises(TypeError, match="guidance terms"):
        GuidedDenoiser(GaussianDenoiser(), [lambda x: x])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="empty"):
        LogSigmoidEnsemble([])
    bad = GuidedDenoiser(GaussianDenoiser(), ScoreGuidance(lambda x, s: x))  # one value per pixel, not per image
    with pytest.raises(ValueError, match="one value per image"):
        bad(torch.randn(2, 1, 2, 2), torch.tensor(1.0))
