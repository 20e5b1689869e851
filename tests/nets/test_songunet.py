"""SongUNet (EDM's DDPM++) against facts from the EDM reference and closed forms of its layers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding

from plpriv.nets.songunet import PositionalEmbedding, Resample, SongUNet, UNetBlock

CIFAR = dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=0, augment_dim=9, model_channels=128,
             channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13)
TINY = dict(img_resolution=8, in_channels=2, out_channels=2, model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4], dropout=0.0)


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def cifar(**overrides: object) -> SongUNet:
    with torch.device("meta"):  # counting only: no weight init cost for 55.7M parameters
        return SongUNet(**{**CIFAR, **overrides})


def test_cifar10_parameter_counts_match_edm() -> None:
    # Reference: counted by running EDM's public code with augment_dim=9.
    assert n_params(cifar()) == 55_733_891
    assert n_params(cifar(label_dim=10)) == 55_735_299


def test_cifar10_attention_layout_matches_edm() -> None:
    # Reference: 6 single-head attention layers (4 encoder blocks at 16x16, the 8x8 bottleneck, one 16x16 decoder
    # block), each a 1x1 conv qkv 256->768 and proj 256->256; embedding 512-d.
    net = cifar()
    attn = {name: m for name, m in net.named_modules() if isinstance(m, UNetBlock) and m.num_heads}
    assert sorted(attn) == sorted([f"enc.16x16_block{i}" for i in range(4)] + ["dec.8x8_in0", "dec.16x16_block4"])
    for block in attn.values():
        assert block.num_heads == 1
        assert tuple(block.qkv.weight.shape) == (768, 256, 1, 1)
        assert tuple(block.proj.weight.shape) == (256, 256, 1, 1)
    assert net.emb_channels == 512 and net.map_layer1.out_features == 512
    assert net.map_augment.bias is None and net.map_augment.in_features == 9
    assert all(m.eps == 1e-6 for m in net.modules() if isinstance(m, torch.nn.GroupNorm))


def test_positional_embedding_matches_diffusers_sin_cos_endpoint() -> None:
    # EDM: endpoint=True frequencies (1/10000)^(i/(n/2-1)), halves swapped to [sin, cos]; diffusers' DDPM embedding
    # with downscale_freq_shift=1 and no flip is that same formula.
    t = torch.tensor([-1.5, -0.2, 0.0, 0.7, 1.1])
    ours = PositionalEmbedding(128, endpoint=True)(t)
    ref = get_timestep_embedding(t, 128, flip_sin_to_cos=False, downscale_freq_shift=1, max_period=10000)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours[:, 0], torch.sin(t)) and torch.equal(ours[:, 64], torch.cos(t))  # frequency 1 first


def test_resample_box_filter_is_average_pool_and_nearest_upsample() -> None:
    x = torch.randn(2, 3, 6, 6)
    down = Resample("down", (1, 1))(x)
    mean2x2 = x.reshape(2, 3, 3, 2, 3, 2).mean(dim=(3, 5))
    torch.testing.assert_close(down, mean2x2)
    up = Resample("up", (1, 1))(x)
    assert torch.equal(up, x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    # The generic FIR path (EDM's depthwise conv with f f^T / sum(f)^2) gives the same for [1, 1].
    for mode in ("down", "up"):
        r = Resample(mode, (1, 1))
        fast = r(x)
        r.box = False
        torch.testing.assert_close(r(x), fast)


def test_attention_block_matches_edm_formula() -> None:
    torch.manual_seed(0)
    block = UNetBlock(8, 8, emb_channels=12, attention=True, dropout=0.0).eval()
    torch.nn.init.normal_(block.proj.weight)  # proj starts ~0; make attention visible
    torch.nn.init.normal_(block.conv1.weight, std=0.2)
    x, emb = torch.randn(3, 8, 4, 4), torch.randn(3, 12)
    s = math.sqrt(0.5)
    # Residual part: GN-SiLU-conv3x3 + affine shift, GN-SiLU-conv3x3, plus identity skip, times sqrt(1/2).
    h = F.conv2d(F.silu(block.norm0(x)), block.conv0.weight, block.conv0.bias, padding=1)
    h = h + (emb @ block.affine.weight.T + block.affine.bias)[:, :, None, None]
    h = F.conv2d(F.silu(block.norm1(h)), block.conv1.weight, block.conv1.bias, padding=1)
    x1 = (h + x) * s
    # Attention with EDM's qkv channel layout (channel, {q,k,v}) and softmax over keys of q.k / sqrt(C).
    qkv = F.conv2d(block.norm2(x1), block.qkv.weight, block.qkv.bias).reshape(3, 8, 3, 16)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    w = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(8)).softmax(dim=2)
    a = torch.einsum("nqk,nck->ncq", w, v).reshape(3, 8, 4, 4)
    expected = (F.conv2d(a, block.proj.weight, block.proj.bias) + x1) * s
    torch.testing.assert_close(block(x, emb), expected, rtol=1e-5, atol=1e-5)


def test_init_follows_edm_xavier_scheme() -> None:
    torch.manual_seed(0)
    net = SongUNet(**{**CIFAR, "model_channels": 32})
    blk = net.enc["16x16_block0"]

    def bound(layer: torch.nn.Module) -> float:  # xavier-uniform bound with fans including the kernel area
        w = layer.weight
        rf = w[0, 0].numel() if w.ndim == 4 else 1
        return math.sqrt(6 / ((w.shape[0] + w.shape[1]) * rf))

    for layer, gain in ((blk.conv0, 1.0), (blk.conv1, 1e-5), (blk.qkv, math.sqrt(0.2)), (blk.proj, 1e-5),
                        (net.map_layer0, 1.0), (net.dec["32x32_aux_conv"], 1e-5)):
        w = layer.weight.detach()
        assert w.abs().max() <= gain * bound(layer)
        # U(-b, b) has std b / sqrt(3); thousands of draws pin it to a few per cent.
        assert w.std().item() == pytest.approx(gain * bound(layer) / math.sqrt(3), rel=0.1)
        assert layer.bias is None or torch.count_nonzero(layer.bias) == 0


def test_small_forward_shapes_and_label_formats() -> None:
    torch.manual_seed(0)
    net = SongUNet(**TINY, label_dim=5).eval()
    torch.nn.init.normal_(net.dec["8x8_aux_conv"].weight)  # output conv starts ~0
    x, sigma = torch.randn(4, 2, 8, 8), torch.randn(4)
    labels = torch.tensor([0, 3, 4, 1])
    y = net(x, sigma, labels)
    assert y.shape == x.shape and torch.isfinite(y).all()
    one_hot = torch.zeros(4, 5)
    one_hot[torch.arange(4), labels] = 1.0
    assert torch.equal(net(x, sigma, one_hot), y)
    assert torch.equal(net(x, sigma, None), net(x, sigma, torch.zeros(4, 5)))
    assert not torch.equal(net(x, sigma, None), y)  # labels reach the output


def test_small_cpu_config_runs_channels_last() -> None:
    torch.manual_seed(0)
    net = SongUNet(img_resolution=16, in_channels=1, out_channels=1, label_dim=10, model_channels=32,
                   channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0).eval()
    x = torch.randn(2, 1, 16, 16)
    y = net(x, torch.zeros(2), torch.tensor([1, 2]))
    y_cl = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), torch.zeros(2),
                                                     torch.tensor([1, 2]))
    torch.testing.assert_close(y_cl, y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [dict(img_resolution=30), dict(channel_mult=[]), dict(model_channels=0), dict(dropout=1.0),
     dict(lora_only=True), dict(freeze_base=True)],
)
def test_bad_arguments_raise_value_error(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SongUNet(**{**CIFAR, "model_channels": 16, "num_blocks": 1, **kwargs})


def test_full_cifar10_forward_batch_one() -> None:
    torch.manual_seed(0)
    net = SongUNet(**CIFAR, use_lora=False).eval()
    with torch.no_grad():
        y = net(torch.randn(1, 3, 32, 32), torch.tensor([0.25]), None, torch.zeros(1, 9))
    assert y.shape == (1, 3, 32, 32) and torch.isfinite(y).all()
