"""RAU-Net (LoyalDiffusion): ITBs registered, saved and restored; identity at initialisation; variants; errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from plpriv.nets import RAUNet, SongUNet, install_itbs, sigma_from_timestep_fraction
from plpriv.nets.itb import ITB_KINDS, SkipITB, make_itb

CFG = dict(img_resolution=8, in_channels=1, out_channels=1, label_dim=10, model_channels=8, channel_mult=[1, 2],
           num_blocks=1, attn_resolutions=[4], dropout=0.0)
LEARNABLE = [k for k in ITB_KINDS if k not in ("maxpool", "none")]


def _inputs(n: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randn(n, generator=g), torch.arange(n) % 10


def _perturb_itbs(net: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.itb.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("itb", LEARNABLE)
def test_plain_state_dict_gives_bit_identical_outputs(itb: str) -> None:
    torch.manual_seed(0)
    plain = SongUNet(**CFG)
    torch.manual_seed(123)  # another seed: only the loaded state dict makes the bases equal
    rau = RAUNet(**CFG, itb=itb)
    result = rau.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.startswith("itb.") for k in result.missing_keys)
    x, c, y = _inputs()
    assert torch.equal(rau(x, c, y), plain(x, c, y))


@pytest.mark.parametrize("itb", LEARNABLE)
def test_itbs_are_registered_trained_saved_and_restored(itb: str) -> None:
    rau = RAUNet(**CFG, itb=itb)
    itb_params = {id(p) for p in rau.itb.parameters()}
    assert itb_params and itb_params <= {id(p) for p in rau.parameters()}
    assert all(p.requires_grad for p in rau.itb.parameters())
    x, c, y = _inputs()
    before = rau(x, c, y)
    _perturb_itbs(rau)
    after = rau(x, c, y)
    assert not torch.allclose(before, after)  # the ITBs sit on the forward path
    fresh = RAUNet(**CFG, itb=itb)
    fresh.load_state_dict(rau.state_dict())  # strict: same keys, ITBs included
    assert torch.equal(fresh(x, c, y), after)
    rau(x, c, y).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rau.itb.parameters())


def test_deepcopy_rebinds_the_hooks_to_the_copy() -> None:
    """An EMA copy uses its own ITBs: changing the copy's ITBs leaves the original's function alone."""
    rau = RAUNet(**CFG)
    x, c, y = _inputs()
    ref = rau(x, c, y)
    twin = copy.deepcopy(rau)
    _perturb_itbs(twin)
    assert torch.equal(rau(x, c, y), ref)
    assert not torch.allclose(twin(x, c, y), ref)


def test_default_levels_are_the_deeper_half() -> None:
    cfg = dict(CFG, img_resolution=16, channel_mult=[1, 1, 1, 1], attn_resolutions=[])
    rau = RAUNet(**cfg)  # levels 16, 8, 4, 2: the paper's SC3/SC4 analogue is levels 2 and 3 (4x4, 2x2)
    assert sorted({k.split("_")[0] for k in rau.itb}) == ["2x2", "4x4"]
    assert len(rau.itb) == 2 * (1 + 1)  # num_blocks + 1 skips per decoder level
    assert list(RAUNet(**CFG, rau_levels=[0]).itb) == ["8x8_block0", "8x8_block1"]


def test_maxpool_and_none_variants() -> None:
    s = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = make_itb("maxpool", 1)(s)
    # each 2x2 window keeps only its maximum (its bottom-right entry here), the rest is zero
    expected = torch.zeros(1, 1, 4, 4)
    for i in (1, 3):
        for j in (1, 3):
            expected[0, 0, i, j] = s[0, 0, i, j]
    assert torch.equal(out, expected)
    assert torch.equal(make_itb("none", 1)(s), torch.zeros_like(s))
    assert not list(make_itb("maxpool", 1).parameters()) and not list(make_itb("none", 1).parameters())


def test_mask_passes_other_examples_bit_for_bit() -> None:
    itb = SkipITB("conv3x3", 2)
    with torch.no_grad():
        itb.block.conv.weight.normal_()
    s = torch.randn(3, 2, 4, 4)
    itb.mask = torch.tensor([True, False, True])
    out = itb.transfer(s)
    assert torch.equal(out[1], s[1])
    assert not torch.allclose(out[0], s[0]) and not torch.allclose(out[2], s[2])


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown itb 'conv5x5'.*conv3x3"):
        RAUNet(**CFG, itb="conv5x5")
    with pytest.raises(ValueError, match=r"rau_levels \[2\].*0\.\.1"):
        RAUNet(**CFG, rau_levels=[2])
    with pytest.raises(TypeError, match="SongUNet"):
        install_itbs(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="already has ITBs"):
        install_itbs(RAUNet(**CFG))
    with pytest.raises(ValueError, match="fraction must be in"):
        sigma_from_timestep_fraction(1.5)


def test_timestep_fraction_matches_edm_continuous_vp_sigma() -> None:
    """EDM Table 1, VP: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), beta_d = 19.9, beta_min = 0.1 (the
    continuous limit of DDPM's linear schedule); the discrete t = 500 of 1000 lies within 2 % of sigma(0.5)."""
    vp = math.sqrt(math.exp(19.9 * 0.25 / 2 + 0.1 * 0.5) - 1)
    assert sigma_from_timestep_fraction(0.5) == pytest.approx(vp, rel=0.02)
    assert sigma_from_timestep_fraction(0.5, "scaled_linear") < sigma_from_timestep_fraction(0.5)
