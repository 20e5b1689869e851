"""Reward networks: EDM's c_noise, shapes, sigma handling, differentiability in x."""

from __future__ import annotations

import math

import pytest
import torch

from plpriv.nets.reward import ImageReward, NoisyImageReward, c_noise


def test_c_noise_is_edm_table_1() -> None:
    sigma = torch.tensor([0.002, 0.5, 80.0])
    torch.testing.assert_close(c_noise(sigma), torch.tensor([math.log(0.002), math.log(0.5), math.log(80.0)]) / 4)


def test_noisy_reward_depends_on_sigma_and_accepts_scalar_or_vector() -> None:
    torch.manual_seed(0)
    net = NoisyImageReward(in_channels=1)
    x = torch.randn(3, 1, 8, 8)
    out = net(x, 0.5)
    assert out.shape == (3,) and out.dtype == torch.float32
    torch.testing.assert_close(out, net(x, torch.full((3,), 0.5)))
    assert not torch.allclose(net(x, 0.05), net(x, 5.0))
    torch.testing.assert_close(net(x), net(x, net.sigma_min))  # no sigma: sigma_min (the paper's t = 0)
    with pytest.raises(ValueError, match="one value per image"):
        net(x, torch.ones(2))
    with pytest.raises(ValueError, match="> 0"):
        net(x, 0.0)


def test_image_reward_ignores_sigma_and_images_are_independent() -> None:
    torch.manual_seed(0)
    net = ImageReward(in_channels=3).eval()
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(net(x), net(x, 3.0))
    torch.testing.assert_close(net(x)[1:2], net(x[1:2]))  # GroupNorm: no batch coupling


def test_gradient_reaches_the_input() -> None:
    torch.manual_seed(0)
    net = NoisyImageReward()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)  # the sampler integrates in fp64
    (grad,) = torch.autograd.grad(net(x, 1.0).sum(), x)
    assert grad.shape == x.shape and grad.abs().sum() > 0
