"""ITBs on a diffusers UNet2DModel / UNet2DConditionModel (install_itbs_diffusers): identity at initialisation,
registered (state dict, parameters, restore), exact per-example routing, every ITB on the forward path."""

from __future__ import annotations

import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from plpriv.nets.itb import SkipITB, install_itbs_diffusers, itb_modules, set_itb_mask  # noqa: E402

TINY = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"))


def _unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(**TINY)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 1, 8, 8, generator=g), torch.tensor([10, 200, 600, 950])


def _perturb(hooks: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hooks.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_identity_at_init_and_registered() -> None:
    plain = _unet()
    wrapped = copy.deepcopy(plain)
    hooks = install_itbs_diffusers(wrapped, rau_levels=[0, 1])
    x, t = _inputs()
    with torch.no_grad():
        assert torch.equal(wrapped(x, t).sample, plain(x, t).sample)
    # diffusers' skips: conv_in 8, down0 resnet 8, down0 downsampler 8, down1 resnet 16; the deepest up block takes
    # the last two (16 popped first), the full-resolution one the first two
    assert [[s.channels for s in h.skips] for h in hooks.values()] == [[8, 16], [8, 8]]
    state = wrapped.state_dict()
    itb_keys = {k for k in state if k.startswith("itb.")}
    assert itb_keys and set(state) - itb_keys == set(plain.state_dict())
    assert {id(p) for p in hooks.parameters()} <= {id(p) for p in wrapped.parameters()}
    assert all(p.requires_grad for p in hooks.parameters())
    result = copy.deepcopy(wrapped).load_state_dict(plain.state_dict(), strict=False)  # plain weights load
    assert set(result.missing_keys) == itb_keys and not result.unexpected_keys


def test_every_itb_is_on_the_forward_path_saved_and_restored() -> None:
    wrapped = _unet()
    install_itbs_diffusers(wrapped, rau_levels=[0, 1])
    x, t = _inputs()
    ref = wrapped(x, t).sample.detach()
    for i, skip in enumerate(itb_modules(wrapped)):  # each ITB alone changes the output
        single = copy.deepcopy(wrapped)
        _perturb(itb_modules(single)[i].block)
        with torch.no_grad():
            assert not torch.allclose(single(x, t).sample, ref), f"ITB {i} ({skip.channels} channels) is unused"
    _perturb(wrapped.itb)
    after = wrapped(x, t).sample
    after.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in wrapped.itb.parameters())
    fresh = _unet()
    install_itbs_diffusers(fresh, rau_levels=[0, 1])
    fresh.load_state_dict(wrapped.state_dict())  # strict: ITB keys included
    with torch.no_grad():
        assert torch.equal(fresh(x, t).sample, after.detach())


@pytest.mark.parametrize("grad", [False, True])
def test_masked_examples_are_bit_identical_to_the_plain_unet(grad: bool) -> None:
    plain = _unet()
    wrapped = copy.deepcopy(plain)
    install_itbs_diffusers(wrapped)  # default: the deeper half (level 1)
    _perturb(wrapped.itb)
    x, t = _inputs()
    above = t >= 500  # as a router sets it: the examples at or above the threshold get the ITBs
    set_itb_mask(wrapped, above)
    with torch.set_grad_enabled(grad):
        out, ref = wrapped(x, t).sample, plain(x, t).sample
    assert torch.equal(out[~above], ref[~above])
    assert not torch.allclose(out[above], ref[above])
    set_itb_mask(wrapped, torch.zeros(4, dtype=torch.bool))
    with torch.no_grad():
        assert torch.equal(wrapped(x, t).sample, plain(x, t).sample)


def test_condition_model_passes_skips_by_keyword() -> None:
    torch.manual_seed(0)
    plain = diffusers.UNet2DConditionModel(**TINY, cross_attention_dim=8, attention_head_dim=2)
    wrapped = copy.deepcopy(plain)
    install_itbs_diffusers(wrapped, rau_levels=[1])
    x, t = _inputs()
    text = torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(wrapped(x, t, text).sample, plain(x, t, text).sample)
        _perturb(wrapped.itb)
        set_itb_mask(wrapped, torch.tensor([False, True, False, True]))
        out, ref = wrapped(x, t, text).sample, plain(x, t, text).sample
    assert torch.equal(out[0], ref[0]) and torch.equal(out[2], ref[2])
    assert not torch.allclose(out[1], ref[1])


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown itb 'conv5'"):
        install_itbs_diffusers(_unet(), itb="conv5")
    with pytest.raises(ValueError, match=r"rau_levels \[2\].*0\.\.1"):
        install_itbs_diffusers(_unet(), rau_levels=[2])
    with pytest.raises(TypeError, match="UNet2DModel"):
        install_itbs_diffusers(torch.nn.Linear(2, 2))
    assert isinstance(SkipITB("conv3x3", 2), torch.nn.Module)
