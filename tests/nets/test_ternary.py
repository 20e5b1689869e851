"""Ternary layers (TWN, TTQ), straight-through gradients, PACT activation quantizers and ternarize()."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from plpriv.nets import ActivationQuantizer, FaceCenterNet, TernaryConv2d, TernaryLinear, ternarize


def test_twn_weight_by_hand():
    layer = TernaryLinear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, -0.5, 1.0, 0.05]]))
    # Delta = 0.7 * mean|w| = 0.7 * 0.4125 = 0.28875; alpha = mean(0.5, 1.0) = 0.75
    torch.testing.assert_close(layer.quantized_weight(), torch.tensor([[0.0, -0.75, 0.75, 0.0]]))


def test_twn_conv_takes_three_values_per_channel_and_is_a_drop_in():
    torch.manual_seed(0)
    layer = TernaryConv2d(3, 8, 3, stride=2, padding=1)
    ref = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 9, 9)
    assert layer(x).shape == ref(x).shape == (2, 8, 5, 5)
    w = layer.quantized_weight().detach()
    for c in range(8):
        values = w[c].unique()
        assert len(values) == 3 and values[1] == 0 and values[0] == -values[2]
    torch.testing.assert_close(layer(x), F.conv2d(x, w, layer.bias, stride=2, padding=1))  # forward uses it


def test_per_layer_scale_is_shared():
    layer = TernaryConv2d(3, 4, 3, per_channel=False)
    w = layer.quantized_weight().detach()
    assert len(w.abs().unique()) == 2  # {0, alpha} over the whole layer


def test_straight_through_gradient():
    torch.manual_seed(0)
    layer = TernaryConv2d(2, 4, 3, padding=1, bias=False)
    x = torch.randn(3, 2, 6, 6)
    layer(x).square().sum().backward()
    w_t = layer.quantized_weight().detach().requires_grad_(True)
    F.conv2d(x, w_t, padding=1).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, w_t.grad)  # dL/dW := dL/dW_t


def test_ttq_values_threshold_and_gradients():
    layer = TernaryLinear(5, 1, bias=False, mode="ttq")
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -0.8, 0.04, -0.03, 0.5]]))  # Delta = 0.05 * 1.0
        layer.w_p.fill_(2.0)
        layer.w_n.fill_(3.0)
    torch.testing.assert_close(layer.quantized_weight(), torch.tensor([[2.0, -3.0, 0.0, 0.0, 2.0]]))
    x = torch.ones(1, 5)
    layer(x).sum().backward()  # dL/dW_t = 1 everywhere
    assert layer.w_p.grad.item() == pytest.approx(2.0)  # two positive weights
    assert layer.w_n.grad.item() == pytest.approx(-1.0)  # one negative weight, W_t = -W_n there
    torch.testing.assert_close(layer.weight.grad, torch.tensor([[2.0, 3.0, 1.0, 1.0, 2.0]]))  # scaled STE


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pact_levels_and_clip_gradient(bits):
    q = ActivationQuantizer(bits, init_alpha=2.0)
    x = torch.linspace(-1, 3, 1001, requires_grad=True)
    y = q(x)
    assert len(y.detach().unique()) <= 2**bits and y.min().item() == 0 and y.max().item() == pytest.approx(2.0)
    step = 2.0 / (2**bits - 1)
    torch.testing.assert_close(y / step, (y / step).round(), atol=1e-4, rtol=0)
    y.sum().backward()
    assert q.alpha.grad.item() == pytest.approx(float((x > 2.0).sum()), abs=1.0)  # d clip / d alpha = 1 above alpha
    assert x.grad[(x > 0.1) & (x < 1.9)].eq(1).all() and x.grad[x < 0].eq(0).all()
    with pytest.raises(ValueError, match="bits"):
        ActivationQuantizer(1)


def test_ternarize_keeps_first_and_last_float_unless_fully_quantized():
    net = ternarize(FaceCenterNet(widths=(4, 4, 4, 4, 4)))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [isinstance(m, TernaryConv2d) for m in convs] == [False, True, True, True, True, False]
    full = ternarize(FaceCenterNet(widths=(4, 4, 4, 4, 4)), fully_quantized=True, act_bits=3)
    assert all(isinstance(m, TernaryConv2d) for m in full.modules() if isinstance(m, nn.Conv2d))
    assert not any(isinstance(m, nn.ReLU) for m in full.modules())
    assert {m.bits for m in full.modules() if isinstance(m, ActivationQuantizer)} == {3}
    with pytest.raises(ValueError, match="mode"):
        TernaryConv2d(1, 1, 1, mode="binary")


def test_ternarize_keeps_the_float_weights_as_latents():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    middle = net[2].weight.detach().clone()
    ternarize(net)
    assert isinstance(net[2], TernaryLinear) and torch.equal(net[2].weight.detach(), middle)
