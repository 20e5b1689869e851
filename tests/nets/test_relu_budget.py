"""ReLU budgets (issue 27): counts by hooks against closed forms, exact budgets, the exact shallow fold, the export.

Independent facts: a ResNet's ReLU count from its layer sizes (CIFAR ResNet-18: 5 x 65,536 + 4 x 32,768 + 4 x 16,384
+ 4 x 8,192 = 557,056, the fact sheet's number), hooks that measure which positions act non-linearly on a negative
probe, and the unfolded conv-BN-conv-BN block evaluated directly.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

from plpriv.nets.relu_budget import (
    MaskedReLU, TinyResNet, allocate_budget, count_macs, dense_relu_counts, linearization_sensitivity,
    pruning_sensitivity, random_mask, relu_counts, relu_counts_by_hooks, relu_layers, to_masked, topk_mask,
)
from plpriv.nets.relu_export import export_relu_budget, load_relu_budget
from plpriv.nets.relu_fold import FoldedConv2d, fold_block, make_shallow


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def _resnet_relus(side: int, widths: tuple[int, ...], stem: int, blocks: int) -> int:
    """Closed form for a BasicBlock ResNet: the stem, then 2 ReLU layers per block at each stage's resolution."""
    total = stem
    for s, width in enumerate(widths):
        side = side if s == 0 else (side + 1) // 2
        total += blocks * 2 * width * side * side
    return total


def test_tiny_resnet_counts_by_hooks_equal_the_analytic_count():
    torch.manual_seed(0)
    net = _randomize_bn(TinyResNet())
    x = torch.randn(4, 1, 8, 8)
    before = net(x)
    to_masked(net, x)
    assert torch.equal(net(x), before)  # masks of ones: the same function
    hooks = relu_counts_by_hooks(net, x)
    assert hooks == relu_counts(net) == dense_relu_counts(net)
    assert sum(hooks.values()) == net.dense_relu_count(8) == 16 * 64 + 2 * 16 * 64 + 2 * 32 * 16 + 2 * 64 * 4 == 4608
    assert len(hooks) == 7


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_resnet18_counts_by_hooks_equal_the_closed_form(source: str):
    net = torchvision.models.resnet18(num_classes=10) if source == "torchvision" else timm.create_model(
        "resnet18", num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    imagenet_stem = _resnet_relus(8, (64, 128, 256, 512), 64 * 16 * 16, 2)  # 32 -> conv /2 -> 16 -> max-pool /2 -> 8
    assert sum(relu_counts_by_hooks(net, x).values()) == imagenet_stem == 47104  # torchvision: a ReLU runs twice
    to_masked(net.eval(), x)
    assert sum(relu_counts_by_hooks(net, x).values()) == sum(relu_counts(net).values()) == imagenet_stem
    assert len(relu_layers(net)) == 17

    cifar = torchvision.models.resnet18(num_classes=100)
    cifar.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    cifar.maxpool = nn.Identity()
    to_masked(cifar, x)
    assert sum(relu_counts_by_hooks(cifar, x).values()) == _resnet_relus(32, (64, 128, 256, 512), 64 * 32 * 32, 2) \
        == 557056


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25, 0.1, 0.01])
@pytest.mark.parametrize("uniform", [True, False])
def test_a_budget_is_met_exactly(fraction: float, uniform: bool):
    torch.manual_seed(1)
    net = to_masked(TinyResNet(), torch.zeros(1, 1, 8, 8))
    layers = relu_layers(net)
    sizes = [m.mask.numel() for m in layers.values()]
    budget = round(fraction * sum(sizes))
    sens = [1.0] * len(sizes) if uniform else list(pruning_sensitivity(net, torch.zeros(1, 1, 8, 8)).values())
    counts = allocate_budget(sizes, sens, budget)
    assert sum(counts) == budget and all(0 <= k <= n for k, n in zip(counts, sizes))
    g = torch.Generator().manual_seed(0)
    for (name, layer), k in zip(layers.items(), counts):
        layer.set_mask(random_mask(layer.mask.shape, k, g))
    assert sum(relu_counts_by_hooks(net, torch.randn(2, 1, 8, 8)).values()) == budget


def test_allocation_water_fills_proportionally_with_caps_and_zeros():
    # layer 3 caps at 100; the other 50 split 1:2 -> 16.67, 33.33 -> largest remainder: 17, 33
    assert allocate_budget([100, 100, 100], [1.0, 2.0, 10.0], 150) == [17, 33, 100]
    assert allocate_budget([10, 20, 40], [1, 1, 1], 35) == [5, 10, 20]  # uniform: the same keep ratio
    assert allocate_budget([10, 20, 40], [0, 0, 0], 7) == [1, 2, 4]  # all-zero sensitivity falls back to uniform
    assert allocate_budget([10, 20, 40], [1, 5, 1], 25, fixed_zero={1}) == [5, 0, 20]
    for bad in (dict(budget=71), dict(budget=-1), dict(budget=2.5)):
        with pytest.raises(ValueError, match="budget"):
            allocate_budget([10, 20, 40], [1, 1, 1], **bad)
    with pytest.raises(ValueError, match="sensitivities"):
        allocate_budget([10, 20], [1, float("nan")], 5)


def test_topk_breaks_ties_and_keeps_exactly_k():
    scores = torch.zeros(3, 4, 4)
    for k in (0, 1, 7, 48):
        assert int(topk_mask(scores, k).sum()) == k
        assert int(topk_mask(scores, k, torch.Generator().manual_seed(k)).sum()) == k
    assert topk_mask(torch.zeros(5), 2).tolist() == [1, 1, 0, 0, 0]  # without a generator: first positions win
    assert topk_mask(torch.tensor([0.1, 0.9, 0.5, 0.9]), 2).tolist() == [0, 1, 0, 1]
    spatial = random_mask((4, 3, 3), 8, torch.Generator().manual_seed(0))  # two whole pixels over 4 channels
    assert int(spatial.sum()) == 8 and int((spatial.sum(0) == 4).sum()) == 2
    with pytest.raises(ValueError, match="k"):
        topk_mask(scores, 49)


def test_masked_relu_is_the_partial_relu_and_refuses_bad_input():
    layer = MaskedReLU((2, 1, 2))
    layer.set_mask(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))
    x = -torch.ones(1, 2, 1, 2)
    assert layer(x).tolist() == [[[[0.0, -1.0]], [[-1.0, 0.0]]]]  # m relu(x) + (1 - m) x
    assert layer.relu_count() == 2
    with pytest.raises(ValueError, match="expects inputs"):
        layer(torch.zeros(1, 2, 2, 2))
    layer.freeze()
    with pytest.raises(ValueError, match="frozen"):
        layer.set_mask(torch.ones(2, 1, 2))
    with pytest.raises(ValueError, match="runs 2 times"):
        relu = nn.ReLU()
        to_masked(nn.Sequential(nn.Conv2d(1, 1, 1), relu, nn.Conv2d(1, 1, 1), relu), torch.zeros(1, 1, 2, 2))


def test_linearization_sensitivity_restores_the_masks():
    torch.manual_seed(0)
    net = to_masked(_randomize_bn(TinyResNet()), torch.zeros(1, 1, 8, 8))
    first = next(iter(relu_layers(net).values()))
    first.set_mask(torch.zeros_like(first.mask))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    sens = linearization_sensitivity(net, [(x, y)])
    assert set(sens) == set(relu_layers(net)) and min(sens.values()) >= 1e-3
    assert int(first.mask.sum()) == 0 and not net.training  # the caller's mask and mode are back


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("stride,side", [(1, 8), (1, 3), (2, 8), (2, 5), (1, 1)])
def test_merged_block_equals_the_linear_block(dtype: torch.dtype, stride: int, side: int):
    down = None if stride == 1 else nn.Sequential(nn.Conv2d(8, 16, 1, stride, bias=False), nn.BatchNorm2d(16))
    net = nn.Sequential(torchvision.models.resnet.BasicBlock(8 if down else 16, 16, stride, down))
    x = torch.randn(3, 8 if down else 16, side, side, dtype=dtype)
    to_masked(_randomize_bn(net, seed=stride + side).to(dtype), x)
    block = net[0]
    block.acts[0].set_mask(torch.zeros_like(block.acts[0].mask))  # the linear block: inner ReLU removed
    linear = block(x)
    merged = fold_block(block)
    assert isinstance(merged.convs[0], FoldedConv2d) and len(merged.acts) == 0
    assert merged.convs[0].weight.shape[-1] == 3 + 2 * stride  # k = k_a + s_a (k_b - 1)
    assert (merged(x) - linear).abs().max().item() < 1e-5


def test_fold_counts_relus_and_macs_honestly():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    net = to_masked(_randomize_bn(TinyResNet()), x)
    inner = net.get_submodule("layers.0.acts.0")
    inner.set_mask(torch.zeros_like(inner.mask))
    relus, macs, out = relu_counts_by_hooks(net, x), count_macs(net, x), net(x)
    make_shallow(net, ["layers.0"])
    relus2, macs2 = relu_counts_by_hooks(net, x), count_macs(net, x)
    assert (net(x) - out).abs().max().item() < 1e-5
    assert sum(relus2.values()) == sum(relus.values()) and len(relus2) == len(relus) - 1  # one ReLU layer less
    folded = macs2["layers.0.convs.0"]
    # merged 5x5 kernel on the 6x6 interior; conv_a on the 48 intermediate positions (a 2-wide ring) that the 28
    # border outputs read; conv_b's 3x3 on those 28 outputs
    assert folded == 36 * 16 * 16 * 25 + 48 * 16 * 16 * 9 + 28 * 16 * 16 * 9
    assert folded > macs["layers.0.convs.0"] + macs["layers.0.convs.1"]  # exact folds cost MACs, not save them
    with pytest.raises(ValueError, match="keeps"):
        fold_block(net.get_submodule("layers.1"))


def test_fold_refuses_group_norm():
    block = nn.Sequential(torchvision.models.resnet.BasicBlock(4, 4, norm_layer=lambda c: nn.GroupNorm(2, c)))
    to_masked(block, torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="BatchNorm2d"):
        fold_block(block[0], force=True)


def test_export_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    arch = {"class_path": "plpriv.nets.relu_budget.TinyResNet", "init_args": {"widths": [8, 16, 16]}}
    x = torch.randn(5, 1, 8, 8)
    net = to_masked(_randomize_bn(TinyResNet(widths=[8, 16, 16])), x)
    g = torch.Generator().manual_seed(0)
    for layer in relu_layers(net).values():
        layer.set_mask(random_mask(layer.mask.shape, layer.mask.numel() // 3, g))
    net.get_submodule("layers.1.acts.0").set_mask(torch.zeros(16, 4, 4))
    report = export_relu_budget(net, tmp_path / "m.pt", arch, [1, 8, 8])
    assert report["folded"] == ["layers.1"]
    masked, merged = load_relu_budget(tmp_path / "m.pt"), load_relu_budget(tmp_path / "m.pt", "merged")
    assert torch.equal(masked(x), net(x))
    assert torch.equal(merged(x), make_shallow(net, ["layers.1"])(x))
    assert (merged(x) - masked(x)).abs().max().item() < 1e-5
    assert report["masked"]["relus"] == report["merged"]["relus"] == sum(relu_counts(masked).values())
    assert report["merged"]["relu_counts"] == relu_counts_by_hooks(merged, x)
    with pytest.raises(ValueError, match="arch"):
        export_relu_budget(net, tmp_path / "n.pt", {"init_args": {}}, [1, 8, 8])
