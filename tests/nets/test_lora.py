"""LoRA-conditioned attention against the reference counts, dense closed forms and micro-batch gradients."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from plpriv.nets.lora import (
    ClassLoRA,
    CompositionalLoRA,
    ConditionalLoRA,
    TimeLoRA,
    apply_lora,
    hat_weights,
    lora_parameters,
)
from plpriv.nets.songunet import SongUNet, UNetBlock

CIFAR = dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=0, augment_dim=9, model_channels=128,
             channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13)
TINY = dict(img_resolution=8, in_channels=2, out_channels=2, model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4], dropout=0.0)


def n_params(net: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable)


def cifar(**overrides: object) -> SongUNet:
    with torch.device("meta"):  # counting only
        return SongUNet(**{**CIFAR, **overrides})


def perturb_lora(net: torch.nn.Module, std: float = 0.3) -> None:
    """Give the zero-initialised up projections and bias matrices random values."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, ConditionalLoRA):
                m.up.weight.normal_(std=std)
                if m.bias_matrix is not None:
                    m.bias_matrix.weight.normal_(std=std)


def wake_up(net: torch.nn.Module) -> None:
    """Replace EDM's ~1e-5 initial scale of the residual/output convs so effects are visible at the output."""
    with torch.no_grad():
        for name, m in net.named_modules():
            if name.endswith(("conv1", "proj", "proj.base", "aux_conv")) and isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(std=0.1)


# --- parameter counts (reference: counted from the released code) -------------------------------------------------


def test_cifar10_lora_parameter_counts_match_reference() -> None:
    assert n_params(cifar(use_lora=True)) == 57_745_499
    assert n_params(cifar(use_lora=True, label_dim=10)) == 57_746_907
    assert n_params(cifar(use_lora=True, lora_only=True)) == 53_411_675
    net = cifar(use_lora=True, lora_rank=4, lora_bases=18, lora_mlp=[128, 64])
    assert n_params(net) - 55_733_891 == 2_011_608
    layers = [m for m in net.modules() if isinstance(m, CompositionalLoRA)]
    assert len(layers) == 12  # qkv and proj of the 6 attention blocks
    extra = sorted({n_params(m) - n_params(m.base) for m in layers})
    assert extra == [130_770, 204_498]  # proj 256->256, qkv 256->768


def test_freeze_base_leaves_only_lora_trainable() -> None:
    net = cifar(use_lora=True, freeze_base=True)
    assert n_params(net, trainable=True) == 2_011_608
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora_parameters(net)}
    # Gradients then reach only LoRA weights (tiny net, real backward).
    torch.manual_seed(0)
    tiny = SongUNet(**TINY, use_lora=True, freeze_base=True)
    perturb_lora(tiny)
    tiny(torch.randn(2, 2, 8, 8), torch.randn(2), None).square().sum().backward()
    lora_ids = {id(p) for p in lora_parameters(tiny)}
    for p in tiny.parameters():
        assert (p.grad is not None) == (id(p) in lora_ids)


# --- identity at initialisation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora_type", ["compositional", "time", "class"])
def test_songunet_lora_at_init_equals_base_bit_for_bit(lora_type: str) -> None:
    torch.manual_seed(0)
    base = SongUNet(**TINY, label_dim=3).eval()
    torch.manual_seed(0)  # base weights are drawn before the LoRA weights: same seed, same base
    lora = SongUNet(**TINY, label_dim=3, use_lora=True, lora_type=lora_type).eval()
    x, sigma, labels = torch.randn(3, 2, 8, 8), torch.randn(3), torch.tensor([0, 2, 1])
    assert torch.equal(lora(x, sigma, labels), base(x, sigma, labels))
    # Post-hoc wrapping of an existing network (e.g. a pretrained checkpoint) is exact as well.
    wrapped = apply_lora(copy.deepcopy(base), lora_type=lora_type)
    assert torch.equal(wrapped(x, sigma, labels), base(x, sigma, labels))


@pytest.mark.slow
def test_full_cifar10_lora_at_init_equals_base_bit_for_bit() -> None:
    torch.manual_seed(0)
    base = SongUNet(**CIFAR).eval()
    lora = apply_lora(copy.deepcopy(base))
    x, sigma, aug = torch.randn(1, 3, 32, 32), torch.tensor([0.3]), torch.randn(1, 9)
    with torch.no_grad():
        assert torch.equal(lora(x, sigma, None, aug), base(x, sigma, None, aug))


# --- the LoRA update itself ----------------------------------------------------------------------------------------


def dense_reference(layer: ConditionalLoRA, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample W(c) = W + sum_i w_i B_i A_i and b(c) = b + sum_i w_i Bias_i, one basis at a time."""
    r = layer.rank
    a_all = layer.down.weight.reshape(layer.down.weight.shape[0], -1)  # (r*m, C_in)
    b_all = layer.up.weight.reshape(layer.up.weight.shape[0], -1)  # (C_out, r*m)
    base_w = layer.base.weight.reshape(layer.base.weight.shape[0], -1)
    weights, biases = [], []
    for n in range(w.shape[0]):
        wn, bn = base_w.clone(), layer.base.bias.clone()
        for i in range(layer.num_bases):
            wn += w[n, i] * b_all[:, i * r:(i + 1) * r] @ a_all[i * r:(i + 1) * r]
            if layer.bias_matrix is not None:
                bn += w[n, i] * layer.bias_matrix.weight[:, i * r:(i + 1) * r].sum(dim=1)
        weights.append(wn)
        biases.append(bn)
    return torch.stack(weights), torch.stack(biases)


def test_compositional_conv_matches_dense_per_sample_weights() -> None:
    torch.manual_seed(0)
    layer = CompositionalLoRA(torch.nn.Conv2d(6, 10, 1), emb_dim=20, rank=2, num_bases=3, mlp=[8, 4])
    perturb_lora(layer)
    x, e = torch.randn(4, 6, 3, 5), torch.randn(4, 20)
    w_eff, b_eff = dense_reference(layer, layer.mixer(e))
    expected = torch.einsum("noi,nihw->nohw", w_eff, x) + b_eff[:, :, None, None]
    torch.testing.assert_close(layer(x, e), expected, rtol=1e-4, atol=1e-5)


def test_compositional_linear_matches_dense_per_sample_weights() -> None:
    torch.manual_seed(1)
    layer = CompositionalLoRA(torch.nn.Linear(6, 7), emb_dim=5, rank=3, num_bases=4, mlp=[8])
    perturb_lora(layer)
    x, e = torch.randn(2, 9, 6), torch.randn(2, 5)  # (B, tokens, C) as in diffusers attention
    w_eff, b_eff = dense_reference(layer, layer.mixer(e))
    expected = torch.einsum("noi,nti->nto", w_eff, x) + b_eff[:, None, :]
    torch.testing.assert_close(layer(x, e), expected, rtol=1e-4, atol=1e-5)


def test_compositional_init_and_mlp_structure_follow_reference() -> None:
    torch.manual_seed(0)
    layer = CompositionalLoRA(torch.nn.Conv2d(256, 768, 1), emb_dim=512, rank=4, num_bases=18)
    assert torch.count_nonzero(layer.up.weight) == 0 and torch.count_nonzero(layer.bias_matrix.weight) == 0
    assert layer.down.weight.std().item() == pytest.approx(1 / 4, rel=0.02)  # N(0, (1/r)^2), 18k draws
    kinds = [type(m).__name__ for m in layer.mixer]
    assert kinds == ["Linear", "GroupNorm", "SiLU", "Linear", "GroupNorm", "SiLU", "Linear"]
    assert [m.out_features for m in layer.mixer if isinstance(m, torch.nn.Linear)] == [128, 64, 18]


def test_lora_only_network_is_conditioned_through_lora_alone() -> None:
    # Without affine layers the embedding reaches the output only through the LoRA mixing weights: at init the
    # output cannot depend on the noise label, once `up` is non-zero it must.
    torch.manual_seed(0)
    net = SongUNet(**TINY, use_lora=True, lora_only=True).eval()
    wake_up(net)
    assert all(b.affine is None for b in net.modules() if isinstance(b, UNetBlock))
    x = torch.randn(2, 2, 8, 8)
    s1, s2 = torch.tensor([-1.0, 0.5]), torch.tensor([0.7, -0.3])
    assert torch.equal(net(x, s1, None), net(x, s2, None))
    perturb_lora(net)
    diff = (net(x, s1, None) - net(x, s2, None)).abs().amax(dim=(1, 2, 3))
    assert (diff > 1e-4).all()


# --- TimeLoRA / ClassLoRA -----------------------------------------------------------------------------------------


def test_hat_weights_are_piecewise_linear_interpolation() -> None:
    t_min, t_max, m = -1.5, 1.1, 11
    t = torch.tensor([-3.0, -1.5, -1.2, -0.31, 0.0, 0.4, 1.0999, 1.1, 2.0])
    w = hat_weights(t, m, t_min, t_max).double().numpy()
    anchors = np.linspace(t_min, t_max, m)
    # Closed form: w_j(t) = piecewise-linear interpolation of the unit vector e_j over the anchors (clamped ends).
    expected = np.stack([np.interp(t.double().numpy(), anchors, np.eye(m)[j]) for j in range(m)], axis=1)
    np.testing.assert_allclose(w, expected, atol=1e-6)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)
    assert ((w > 0).sum(axis=1) <= 2).all()
    np.testing.assert_allclose(hat_weights(torch.tensor(anchors), m, t_min, t_max).numpy(), np.eye(m), atol=1e-6)


def test_time_lora_mixes_neighbouring_anchor_adapters() -> None:
    torch.manual_seed(0)
    layer = TimeLoRA(torch.nn.Conv2d(4, 5, 1), t_min=0.0, t_max=10.0, rank=2, num_bases=6)
    perturb_lora(layer)
    x = torch.randn(1, 4, 2, 2)
    base = layer.base(x)
    d2, d4 = layer(x, torch.tensor([2.0])) - base, layer(x, torch.tensor([4.0])) - base
    # t = 3 lies halfway between anchors 2 and 4: the update is the average of theirs (linearity in w).
    torch.testing.assert_close(layer(x, torch.tensor([3.0])) - base, (d2 + d4) / 2, rtol=1e-4, atol=1e-5)
    w_eff, b_eff = dense_reference(layer, hat_weights(torch.tensor([3.0]), 6, 0.0, 10.0))
    expected = torch.einsum("noi,nihw->nohw", w_eff, x) + b_eff[:, :, None, None]
    torch.testing.assert_close(layer(x, torch.tensor([3.0])), expected, rtol=1e-4, atol=1e-5)


def test_class_lora_selects_the_adapter_of_each_class() -> None:
    torch.manual_seed(0)
    layer = ClassLoRA(torch.nn.Linear(6, 4), num_classes=3, rank=2)
    x = torch.randn(3, 6)
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        layer.up.weight[:, 2:4].normal_()  # only class 1's adapter (channels r*1 .. r*2) becomes non-zero
    y, base = layer(x, labels), layer.base(x)
    assert torch.equal(y[0], base[0]) and torch.equal(y[2], base[2])
    r = slice(2, 4)
    torch.testing.assert_close(y[1], base[1] + layer.up.weight[:, r] @ (layer.down.weight[r] @ x[1]))
    one_hot = torch.nn.functional.one_hot(labels, 3).float()
    assert torch.equal(layer(x, one_hot), y)  # one-hot floats (SongUNet's label format) select the same adapter


def test_songunet_class_lora_uses_class_labels() -> None:
    torch.manual_seed(0)
    net = SongUNet(**TINY, label_dim=3, use_lora=True, lora_type="class", lora_only=True).eval()
    wake_up(net)
    perturb_lora(net)
    x, sigma = torch.randn(1, 2, 8, 8).repeat(3, 1, 1, 1), torch.zeros(3)
    y = net(x, sigma, torch.tensor([0, 1, 2]))
    assert (y[0] - y[1]).abs().max() > 1e-4 and (y[1] - y[2]).abs().max() > 1e-4
    # With every adapter's up projection zeroed except class 2's, classes 0 and 1 coincide (lora_only: no affine).
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, ClassLoRA):
                m.up.weight[:, : 2 * m.rank] = 0
    y = net(x, sigma, torch.tensor([0, 1, 2]))
    assert torch.equal(y[0], y[1]) and (y[1] - y[2]).abs().max() > 1e-4


# --- diffusers UNet2DModel ----------------------------------------------------------------------------------------


def small_unet(**kwargs: object) -> UNet2DModel:
    return UNet2DModel(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8,
                       **kwargs).eval()


def test_diffusers_unet_wrapped_equals_base_and_sees_embedding() -> None:
    torch.manual_seed(0)
    base = small_unet(num_class_embeds=4)
    net = apply_lora(copy.deepcopy(base), rank=2, num_bases=3, mlp=[16])
    layers = [m for m in net.modules() if isinstance(m, CompositionalLoRA)]
    n_attn = sum(1 for m in base.modules() if hasattr(m, "to_q") and hasattr(m, "to_out"))
    assert n_attn >= 2 and len(layers) == 4 * n_attn  # to_q, to_k, to_v, to_out[0]
    x, t, c = torch.randn(2, 2, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 3])
    assert torch.equal(net(x, t, class_labels=c).sample, base(x, t, class_labels=c).sample)
    # The captured embedding is the one UNet2DModel builds: time_embedding(time_proj(t)) + class_embedding(c).
    with torch.no_grad():
        emb = base.time_embedding(base.time_proj(t)) + base.class_embedding(c)
    torch.testing.assert_close(net._plpriv_lora_context.emb, emb)
    perturb_lora(net)
    y = net(x, t, class_labels=c).sample
    assert (y - base(x, t, class_labels=c).sample).abs().max() > 1e-4
    # Another class changes the LoRA update (the only difference between net and base): conditioning is real.
    delta_c = y - base(x, t, class_labels=c).sample
    c2 = torch.tensor([0, 2])
    delta_c2 = net(x, t, class_labels=c2).sample - base(x, t, class_labels=c2).sample
    assert (delta_c - delta_c2).abs().max() > 1e-5


def test_diffusers_hooks_survive_deepcopy() -> None:
    # EMA copies are made with deepcopy: the copy's hooks must feed the copy's wrappers.
    torch.manual_seed(0)
    net = apply_lora(small_unet(), lora_type="time", rank=2, num_bases=5)
    perturb_lora(net)
    ema = copy.deepcopy(net)
    x = torch.randn(2, 2, 8, 8)
    assert torch.equal(ema(x, 250).sample, net(x, 250).sample)
    assert ema._plpriv_lora_context is not net._plpriv_lora_context
    assert torch.equal(ema._plpriv_lora_context.timesteps, torch.tensor([250, 250]))
    assert net._plpriv_lora_context.timesteps is not None and not any(
        m.context is net._plpriv_lora_context for m in ema.modules() if isinstance(m, ConditionalLoRA))


def test_diffusers_class_lora_and_errors() -> None:
    torch.manual_seed(0)
    base = small_unet(num_class_embeds=3)
    net = apply_lora(copy.deepcopy(base), lora_type="class", rank=2)
    assert all(m.num_bases == 3 for m in net.modules() if isinstance(m, ClassLoRA))
    x = torch.randn(2, 2, 8, 8)
    assert torch.equal(net(x, 3, class_labels=torch.tensor([0, 2])).sample,
                       base(x, 3, class_labels=torch.tensor([0, 2])).sample)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(net)
    with pytest.raises(ValueError, match="lora_only"):
        apply_lora(small_unet(), lora_only=True)
    with pytest.raises(TypeError):
        apply_lora(torch.nn.Linear(3, 3))


def test_argument_errors() -> None:
    with pytest.raises(TypeError, match="1x1"):
        CompositionalLoRA(torch.nn.Conv2d(3, 3, 3), emb_dim=4)
    with pytest.raises(ValueError, match="label_dim"):
        SongUNet(**TINY, use_lora=True, lora_type="class")
    with pytest.raises(ValueError, match="lora_type"):
        SongUNet(**TINY, use_lora=True, lora_type="spatial")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(SongUNet(**TINY, use_lora=True))
    layer = CompositionalLoRA(torch.nn.Linear(3, 3), emb_dim=4, rank=1, num_bases=2, mlp=[4])
    with pytest.raises(RuntimeError, match="no condition"):
        layer(torch.randn(2, 3))
    with pytest.raises(ValueError, match="batch"):
        layer(torch.randn(2, 3), torch.randn(3, 4))


def test_base_checkpoint_loads_into_lora_network() -> None:
    torch.manual_seed(0)
    base = SongUNet(**TINY)
    torch.manual_seed(1)
    lora = SongUNet(**TINY, use_lora=True)
    result = lora.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    lora_names = {n for n, p in lora.named_parameters() if any(p is q for q in lora_parameters(lora))}
    assert set(result.missing_keys) == lora_names
    x, s = torch.randn(2, 2, 8, 8), torch.randn(2)
    assert torch.equal(lora.eval()(x, s, None), base.eval()(x, s, None))


# --- DP-SGD: opacus per-sample gradients ---------------------------------------------------------------------------


def tiny_net_and_micro_batch_grads(scale: float = 1.0) -> tuple[SongUNet, tuple[torch.Tensor, ...], list[dict]]:
    """A tiny LoRA SongUNet, a batch of 3 and its per-example gradients from 3 separate backward passes."""
    torch.manual_seed(0)
    net = SongUNet(**TINY, label_dim=3, use_lora=True, lora_mlp=[8])
    for m in net.modules():
        if isinstance(m, ConditionalLoRA):
            m.scale = scale
    wake_up(net)
    perturb_lora(net, std=0.1)
    x, s, c = torch.randn(3, 2, 8, 8), torch.randn(3), torch.tensor([0, 1, 2])
    reference = []
    for i in range(3):
        net.zero_grad()
        net(x[i:i + 1], s[i:i + 1], c[i:i + 1]).square().sum().backward()
        reference.append({n: p.grad.clone() for n, p in net.named_parameters()})
    return net, (x, s, c), reference


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_opacus_per_sample_gradients_match_micro_batches(mode: str) -> None:
    from opacus import GradSampleModule

    net, (x, s, c), reference = tiny_net_and_micro_batch_grads(scale=0.5 if mode == "functorch" else 1.0)
    gsm = GradSampleModule(copy.deepcopy(net), loss_reduction="sum", force_functorch=mode == "functorch")
    gsm(x, s, c).square().sum().backward()
    checked = 0
    for name, p in gsm._module.named_parameters():
        for i in range(3):
            ref = reference[i][name]
            torch.testing.assert_close(p.grad_sample[i], ref, rtol=1e-3, atol=1e-5 * (1 + ref.abs().max().item()))
        checked += 1
    assert checked == len(reference[0])


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_opacus_ghost_clipping_norms_match_micro_batches() -> None:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    net, (x, s, c), reference = tiny_net_and_micro_batch_grads()
    gsm = GradSampleModuleFastGradientClipping(copy.deepcopy(net), loss_reduction="sum", use_ghost_clipping=True)
    gsm(x, s, c).square().sum().backward()
    expected = torch.stack([torch.cat([g.flatten() for g in ref.values()]).norm() for ref in reference])
    torch.testing.assert_close(gsm.get_norm_sample(), expected, rtol=1e-3, atol=0.0)


@pytest.mark.parametrize("shape", [(4, 6, 3, 5), (2, 9, 6)])
def test_scaled_update_matches_dense_per_sample_weights(shape: tuple[int, ...]) -> None:
    # y = W x + b + s [sum_i w_i B_i A_i x + sum_i w_i Bias_i]: the dense reference with mixing weights s * w.
    torch.manual_seed(2)
    base = torch.nn.Conv2d(6, 10, 1) if len(shape) == 4 else torch.nn.Linear(6, 10)
    layer = CompositionalLoRA(base, emb_dim=5, rank=2, num_bases=3, mlp=[8], scale=0.25)
    perturb_lora(layer)
    x, e = torch.randn(shape), torch.randn(shape[0], 5)
    w_eff, b_eff = dense_reference(layer, 0.25 * layer.mixer(e))
    if len(shape) == 4:
        expected = torch.einsum("noi,nihw->nohw", w_eff, x) + b_eff[:, :, None, None]
    else:
        expected = torch.einsum("noi,nti->nto", w_eff, x) + b_eff[:, None, :]
    torch.testing.assert_close(layer(x, e), expected, rtol=1e-4, atol=1e-5)
