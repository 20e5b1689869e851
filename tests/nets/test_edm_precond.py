"""EDMPrecond / EDMLoss against EDM's closed forms (Table 1) and diffusers' EDMEulerScheduler."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from plpriv.nets import EDMLoss, EDMPrecond

SIGMAS = [0.002, 0.05, 0.5, 1.0, 3.7, 80.0]


class Recorder(nn.Module):
    """Raw network F that records its inputs and returns a fixed tensor."""

    def __init__(self, out: torch.Tensor, label_dim: int = 0) -> None:
        super().__init__()
        self.out, self.label_dim, self.calls = out, label_dim, []

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        self.calls.append((x.clone(), noise_labels.clone(), class_labels, augment_labels))
        return self.out


@pytest.mark.parametrize("sigma_data", [0.5, 0.8])
def test_coefficients_match_closed_forms(sigma_data: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(SIGMAS), 2, 4, 4, generator=g)
    f = torch.randn(len(SIGMAS), 2, 4, 4, generator=g)
    rec = Recorder(f)
    out = EDMPrecond(rec, sigma_data=sigma_data)(x, torch.tensor(SIGMAS))
    x_in, c_noise, labels, _ = rec.calls[0]
    assert labels is None
    for b, s in enumerate(SIGMAS):
        c_skip = sigma_data**2 / (s**2 + sigma_data**2)
        c_out = s * sigma_data / math.sqrt(s**2 + sigma_data**2)
        c_in = 1 / math.sqrt(s**2 + sigma_data**2)
        torch.testing.assert_close(x_in[b], c_in * x[b])
        assert c_noise[b].item() == pytest.approx(math.log(s) / 4, rel=1e-6)
        torch.testing.assert_close(out[b], c_skip * x[b] + c_out * f[b])


def test_matches_diffusers_edm_euler_scheduler() -> None:
    from diffusers import EDMEulerScheduler

    sched = EDMEulerScheduler(sigma_data=0.5, prediction_type="epsilon")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 8, 8, generator=g)
    f = torch.randn(1, 3, 8, 8, generator=g)
    for s in SIGMAS:
        rec = Recorder(f)
        out = EDMPrecond(rec, sigma_data=0.5)(x, s)
        sigma = torch.tensor(s)
        x_in, c_noise, _, _ = rec.calls[0]
        torch.testing.assert_close(x_in, sched.precondition_inputs(x, sigma))
        torch.testing.assert_close(c_noise, sched.precondition_noise(sigma).reshape(1))
        torch.testing.assert_close(out, sched.precondition_outputs(x, f, sigma))


def test_fp32_math_under_autocast_and_fp64_input() -> None:
    rec = Recorder(torch.ones(2, 1, 2, 2, dtype=torch.bfloat16))
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = EDMPrecond(rec)(x, torch.tensor([0.3, 2.0], dtype=torch.float64))
    assert out.dtype == torch.float32
    assert rec.calls[0][0].dtype == torch.float32 and rec.calls[0][1].dtype == torch.float32
    s = torch.tensor([0.3, 2.0]).reshape(-1, 1, 1, 1)
    expected = 0.25 / (s**2 + 0.25) * x.float() + s * 0.5 / (s**2 + 0.25).sqrt()
    torch.testing.assert_close(out, expected)


def test_class_labels_one_hot_and_zero_default() -> None:
    rec = Recorder(torch.zeros(3, 1, 2, 2), label_dim=4)
    net = EDMPrecond(rec)
    net(torch.zeros(3, 1, 2, 2), 1.0, torch.tensor([0, 3, 1]))
    torch.testing.assert_close(rec.calls[0][2], torch.eye(4)[[0, 3, 1]])
    net(torch.zeros(3, 1, 2, 2), 1.0, None)
    torch.testing.assert_close(rec.calls[1][2], torch.zeros(3, 4))
    aug = torch.randn(3, 9)
    net(torch.zeros(3, 1, 2, 2), 1.0, None, augment_labels=aug)
    assert rec.calls[2][3] is aug


def test_bad_arguments_raise() -> None:
    rec = Recorder(torch.zeros(1))
    with pytest.raises(ValueError, match="sigma_data"):
        EDMPrecond(rec, sigma_data=0)
    with pytest.raises(ValueError, match="sigma_min"):
        EDMPrecond(rec, sigma_min=2, sigma_max=1)
    with pytest.raises(ValueError, match="sigma"):
        EDMPrecond(rec)(torch.zeros(3, 1, 2, 2), torch.ones(2))
    with pytest.raises(ValueError, match="P_std"):
        EDMLoss(P_std=0)


def test_loss_weighting_and_sigma_distribution() -> None:
    y = torch.randn(5, 1, 3, 3, generator=torch.Generator().manual_seed(2))
    n = torch.randn(5, 1, 3, 3, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.01, 0.1, 0.5, 2.0, 30.0])

    def denoiser(x, s, labels):  # D(x) = x / 2 -> loss closed form
        return x / 2

    loss = EDMLoss(sigma_data=0.5)(denoiser, y, sigma=sigma, noise=n)
    s = sigma.reshape(-1, 1, 1, 1)
    lam = (s**2 + 0.25) / (s * 0.5) ** 2
    torch.testing.assert_close(loss, lam * ((y + n * s) / 2 - y) ** 2)

    ln_sigma = EDMLoss(P_mean=-1.2, P_std=1.2).sample_sigma(20000, generator=torch.Generator().manual_seed(4)).log()
    assert ln_sigma.mean().item() == pytest.approx(-1.2, abs=0.04)
    assert ln_sigma.std().item() == pytest.approx(1.2, abs=0.04)


def test_loss_at_init_of_zero_network_is_lambda_weighted_skip_error() -> None:
    """With F = 0, D = c_skip (y + n): EDM's weighting makes the expected loss exactly 1 per element when
    Var(y) = sigma_data^2 (the unit-variance training target of EDM Section 5)."""
    torch.manual_seed(5)
    y = torch.randn(4000, 1, 2, 2) * 0.5
    net = EDMPrecond(Recorder(torch.zeros(4000, 1, 2, 2)))
    loss = EDMLoss()(net, y)
    assert loss.mean().item() == pytest.approx(1.0, rel=0.03)
