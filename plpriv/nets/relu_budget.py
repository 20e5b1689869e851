"""ReLU budgets for private inference (SENet: Kundu et al., ICLR 2023): pixel-wise ReLU masks, ReLU and MAC counts,
per-layer ReLU sensitivity, budget allocation across layers and masks that meet a budget exactly. Plain modules.

In 2PC/HE private inference each ReLU is a garbled-circuit comparison, orders of magnitude dearer than a
multiply-accumulate, so a model's ReLU count is its latency. :func:`to_masked` puts a model (torchvision or timm
ResNets, or any net whose ReLUs are ``nn.ReLU`` modules called once) into a form where every ReLU position can be
linearised: residual blocks become :class:`MaskedResBlock` and every ``nn.ReLU`` a :class:`MaskedReLU` (mask of ones,
the same function). The shallow step (fold a block's two convolutions once its inner ReLU is linear) is in
:mod:`plpriv.nets.relu_fold`, the export in :mod:`plpriv.nets.relu_export`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU)  # counted by the hooks besides MaskedReLU


class MaskedReLU(nn.Module):
    """Partial ReLU with a pixel-wise ``[C, H, W]`` mask ``m`` (1: ReLU kept, 0: identity).

    ``y = m * relu(x) + (1 - m) * x``; SENet's code writes ``relu(m * x) + (1 - m) * x``, the same for ``m >= 0``.
    ``trainable=False`` (SENet): ``m`` is a buffer that :meth:`set_mask` replaces (stage 1's top-k updates).
    ``trainable=True``: ``m`` is a parameter, clamped to [0, 1] in the forward, for gradient-based mask learning.
    :meth:`freeze` binarises the mask and refuses further changes (stage 2); the flag is saved in the state dict.
    """

    def __init__(self, shape: Sequence[int], trainable: bool = False) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if len(shape) < 1 or any(s < 1 for s in shape):
            raise ValueError(f"`shape` must be the per-sample activation shape, e.g. (C, H, W), got {shape!r}")
        if trainable:
            self.mask = nn.Parameter(torch.ones(shape))
        else:
            self.register_buffer("mask", torch.ones(shape))
        self.register_buffer("frozen", torch.tensor(False))
        self.trainable = trainable

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != tuple(self.mask.shape):
            raise ValueError(f"MaskedReLU expects inputs [N, {', '.join(map(str, self.mask.shape))}], got "
                             f"{tuple(x.shape)}: build the masks for this input size (to_masked(model, example))")
        m = self.mask.clamp(0, 1) if self.trainable else self.mask
        return m * F.relu(x) + (1 - m) * x  # partial ReLU

    def relu_count(self) -> int:
        """ReLU comparisons per sample: positions with a non-zero mask."""
        return int((self.mask.detach() > 0).sum())

    def set_mask(self, mask: Tensor) -> None:
        if bool(self.frozen):
            raise ValueError("this MaskedReLU is frozen (stage 2): its mask no longer changes")
        if not isinstance(mask, Tensor):
            raise TypeError(f"`mask` must be a Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(self.mask.shape):
            raise ValueError(f"`mask` must have shape {tuple(self.mask.shape)}, got {tuple(mask.shape)}")
        with torch.no_grad():
            self.mask.copy_(mask.to(self.mask))

    def freeze(self) -> None:
        with torch.no_grad():
            self.mask.copy_((self.mask > 0.5).to(self.mask) if self.trainable else self.mask)
        self.mask.requires_grad_(False)
        self.frozen.fill_(True)


class MaskedResBlock(nn.Module):
    """A residual block in one canonical form: ``out_act(branch(x) + shortcut(x))``, where the branch is
    ``conv_i -> norm_i`` for each i with ``acts[i]`` between conv i and conv i+1 (BasicBlock: 2 convs, 1 inner act;
    Bottleneck: 3 and 2). The shortcut runs first, so the last convolution before ``out_act`` is the branch's."""

    def __init__(self, convs: Sequence[nn.Module], norms: Sequence[nn.Module], acts: Sequence[nn.Module],
                 shortcut: nn.Module | None = None, out_act: nn.Module | None = None) -> None:
        super().__init__()
        if len(convs) < 1 or len(norms) != len(convs) or len(acts) != len(convs) - 1:
            raise ValueError(f"a block needs n convs, n norms and n - 1 inner acts, got {len(convs)}, {len(norms)}, "
                             f"{len(acts)}")
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(norms)
        self.acts = nn.ModuleList(acts)
        self.shortcut = shortcut if shortcut is not None else nn.Identity()
        self.out_act = out_act if out_act is not None else nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        identity = self.shortcut(x)
        h = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            h = norm(conv(h))
            if i < len(self.acts):
                h = self.acts[i](h)
        return self.out_act(h + identity)


class TinyResNet(nn.Module):
    """A small CIFAR-style ResNet for 8x8 digits: conv3x3 -> BN -> ReLU stem, ``blocks_per_stage`` torchvision
    BasicBlocks per stage of ``widths`` (strides 1, 2, 2, ...), global average pool, linear head. With the defaults,
    7 ReLU layers and 4,608 ReLUs on 8x8 inputs."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, widths: Sequence[int] = (16, 32, 64),
                 blocks_per_stage: int = 1) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        widths = [int(w) for w in widths]
        if in_chans < 1 or num_classes < 1 or blocks_per_stage < 1 or not widths or min(widths) < 1:
            raise ValueError(f"in_chans, num_classes, blocks_per_stage and widths must be >= 1, got {in_chans}, "
                             f"{num_classes}, {blocks_per_stage}, {widths}")
        self.config = {"in_chans": in_chans, "num_classes": num_classes, "widths": widths,
                       "blocks_per_stage": blocks_per_stage}
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for s, width in enumerate(widths):
            for b in range(blocks_per_stage):
                stride = 2 if s > 0 and b == 0 else 1
                down = None
                if stride != 1 or c_in != width:
                    down = nn.Sequential(nn.Conv2d(c_in, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width))
                blocks.append(BasicBlock(c_in, width, stride=stride, downsample=down))
                c_in = width
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.layers(self.relu(self.bn1(self.conv1(x))))).flatten(1))

    def dense_relu_count(self, image_size: int) -> int:
        """ReLUs per sample of the all-ReLU net, from conv arithmetic alone (no forward)."""
        side = image_size
        total = self.config["widths"][0] * side * side  # stem
        for s, width in enumerate(self.config["widths"]):
            for b in range(self.config["blocks_per_stage"]):
                stride = 2 if s > 0 and b == 0 else 1
                side = (side + 2 - 3) // stride + 1  # conv output size: floor((H + 2p - k) / s) + 1
                total += 2 * width * side * side  # inner ReLU and output ReLU
        return total


def _block_classes() -> dict[str, tuple[type, ...]]:
    from torchvision.models import resnet as tv

    found: dict[str, tuple[type, ...]] = {"tv_basic": (tv.BasicBlock,), "tv_bottleneck": (tv.Bottleneck,)}
    try:
        from timm.models import resnet as tm
    except ImportError:  # timm is optional here
        return {**found, "timm_basic": (), "timm_bottleneck": ()}
    return {**found, "timm_basic": (tm.BasicBlock,), "timm_bottleneck": (tm.Bottleneck,)}


def _relu_of(block: nn.Module, attr: str) -> nn.ReLU:
    act = getattr(block, attr)
    if type(act) is not nn.ReLU:
        raise ValueError(f"{type(block).__name__}.{attr} is {type(act).__name__}: only ReLU blocks can be masked")
    return nn.ReLU()


def _check_timm_extras(block: nn.Module) -> None:
    for attr in ("drop_block", "aa", "se", "drop_path"):
        extra = getattr(block, attr, None)
        if extra is not None and not isinstance(extra, nn.Identity):
            raise ValueError(f"timm {type(block).__name__} with `{attr}` ({type(extra).__name__}) is not supported: "
                             "build the model without it (e.g. timm.create_model(name, drop_path_rate=0))")


def canonical_block(block: nn.Module) -> MaskedResBlock | None:
    """A torchvision or timm BasicBlock/Bottleneck as a :class:`MaskedResBlock` sharing its convs and norms (its
    ReLU module(s), which torchvision calls several times, become one ``nn.ReLU`` per call); None for other modules."""
    kinds = _block_classes()
    if isinstance(block, kinds["tv_basic"]):
        return MaskedResBlock([block.conv1, block.conv2], [block.bn1, block.bn2], [nn.ReLU()], block.downsample,
                              nn.ReLU())
    if isinstance(block, kinds["tv_bottleneck"]):
        return MaskedResBlock([block.conv1, block.conv2, block.conv3], [block.bn1, block.bn2, block.bn3],
                              [nn.ReLU(), nn.ReLU()], block.downsample, nn.ReLU())
    if isinstance(block, kinds["timm_basic"]):
        _check_timm_extras(block)
        return MaskedResBlock([block.conv1, block.conv2], [block.bn1, block.bn2], [_relu_of(block, "act1")],
                              block.downsample, _relu_of(block, "act2"))
    if isinstance(block, kinds["timm_bottleneck"]):
        _check_timm_extras(block)
        return MaskedResBlock([block.conv1, block.conv2, block.conv3], [block.bn1, block.bn2, block.bn3],
                              [_relu_of(block, "act1"), _relu_of(block, "act2")], block.downsample,
                              _relu_of(block, "act3"))
    return None


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (public API: ``get_submodule`` + ``setattr``)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _check_input(example_input: Tensor) -> None:
    if not isinstance(example_input, Tensor):
        raise TypeError(f"`example_input` must be a Tensor batch, got {type(example_input).__name__}")
    if example_input.ndim < 2 or example_input.shape[0] < 1:
        raise ValueError(f"`example_input` must be a batch [N, ...] with N >= 1, got {tuple(example_input.shape)}")


@torch.no_grad()
def _probe(model: nn.Module, example_input: Tensor, hook: Any, types: tuple[type, ...]) -> None:
    """One eval-mode forward of the first sample with ``hook(name, module, inputs, output)`` on modules of ``types``."""
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: hook(n, mod, i, o))
               for n, m in model.named_modules() if isinstance(m, types)]
    was_training = model.training
    model.eval()
    try:
        model(example_input[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def to_masked(model: nn.Module, example_input: Tensor, trainable: bool = False) -> nn.Module:
    """In place: residual blocks -> :class:`MaskedResBlock`, every ``nn.ReLU`` -> :class:`MaskedReLU` shaped by one
    probe forward of ``example_input`` (masks of ones: the model computes the same function). Returns ``model``.

    ReLUs called as functions (``F.relu``) are invisible to module hooks and stay dense; a ``nn.ReLU`` module called
    more than once per forward (outside the recognised blocks) is refused: give each call its own module."""
    _check_input(example_input)
    for name, module in list(model.named_modules()):
        block = canonical_block(module)
        if block is not None:
            if not name:
                raise ValueError("`model` is a single residual block: wrap it in a network (nn.Sequential(block))")
            set_submodule(model, name, block)
    shapes: dict[str, tuple[int, ...]] = {}
    calls: dict[str, int] = {}

    def record(name: str, module: nn.Module, inputs: Any, output: Tensor) -> None:
        if type(module) is nn.ReLU:
            shapes[name] = tuple(output.shape[1:])
            calls[name] = calls.get(name, 0) + 1

    _probe(model, example_input, record, (nn.ReLU,))
    for name, count in calls.items():
        if count != 1:
            raise ValueError(f"ReLU module {name!r} runs {count} times per forward: give each call its own nn.ReLU "
                             "(one mask per call), or use a torchvision/timm ResNet block")
        set_submodule(model, name, MaskedReLU(shapes[name], trainable=trainable))
    if not relu_layers(model):
        raise ValueError(f"{type(model).__name__} has no nn.ReLU module that runs in the forward (F.relu calls are "
                         "not maskable): build it with nn.ReLU modules")
    return model


def relu_layers(model: nn.Module) -> dict[str, MaskedReLU]:
    """The model's :class:`MaskedReLU` layers by name, in definition order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MaskedReLU)}


def relu_counts(model: nn.Module) -> dict[str, int]:
    """Analytic ReLU count per layer (per sample): the non-zero mask entries; no forward."""
    return {n: m.relu_count() for n, m in relu_layers(model).items()}


def dense_relu_counts(model: nn.Module) -> dict[str, int]:
    """ReLU positions per layer when every ReLU is kept (the mask sizes)."""
    return {n: m.mask.numel() for n, m in relu_layers(model).items()}


def relu_counts_by_hooks(model: nn.Module, example_input: Tensor) -> dict[str, int]:
    """Measured ReLU comparisons per sample, per activation module, from forward hooks (independent of the masks'
    bookkeeping): each call's activation is re-run on a strictly negative probe ``z`` of the same shape, and every
    position where ``f(z) != z`` is non-linear. Sums over repeated calls of one module; functional ReLUs are not seen."""
    _check_input(example_input)
    counts: dict[str, int] = {}

    def hook(name: str, module: nn.Module, inputs: Any, output: Tensor) -> None:
        z = -(inputs[0][:1].detach().abs() + 1)  # strictly negative: ReLU(z) = 0 != z, identity(z) = z
        counts[name] = counts.get(name, 0) + int((module.forward(z.clone()) != z).sum())

    _probe(model, example_input, hook, (MaskedReLU, *ACTIVATIONS))
    return counts


def count_macs(model: nn.Module, example_input: Tensor) -> dict[str, int]:
    """Multiply-accumulates per sample of every Conv2d, Linear and folded convolution (``macs_per_sample``), by
    forward hooks; norms and additions are not counted (norms fold into the convolutions at inference)."""
    _check_input(example_input)
    macs: dict[str, int] = {}

    def hook(name: str, module: nn.Module, inputs: Any, output: Tensor) -> None:
        if hasattr(module, "macs_per_sample"):
            value = module.macs_per_sample(tuple(inputs[0].shape[-2:]))
        elif isinstance(module, nn.Conv2d):  # MACs = output elements x (C_in / groups) x k_h x k_w
            value = output[0].numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
        else:  # Linear: MACs = output elements x in_features
            value = output[0].numel() * module.in_features
        macs[name] = macs.get(name, 0) + int(value)

    types = tuple({type(m) for m in model.modules() if hasattr(m, "macs_per_sample")}) + (nn.Conv2d, nn.Linear)
    _probe(model, example_input, hook, types)
    return macs


def relu_conv_pairs(model: nn.Module, example_input: Tensor) -> dict[str, str]:
    """Each ReLU layer -> the convolution that ran last before it (the one producing its input), by hooks."""
    order: list[tuple[str, bool]] = []
    _probe(model, example_input, lambda n, m, i, o: order.append((n, isinstance(m, MaskedReLU))),
           (nn.Conv2d, MaskedReLU))
    pairs, last = {}, None
    for name, is_relu in order:
        if not is_relu:
            last = name
        elif last is None:
            raise ValueError(f"ReLU layer {name!r} runs before any Conv2d: the pruning sensitivity needs a conv "
                             "feeding each ReLU layer; use allocation='linearize' or 'uniform'")
        else:
            pairs[name] = last
    return pairs


def pruning_sensitivity(model: nn.Module, example_input: Tensor, proxy_density: float = 0.1) -> dict[str, float]:
    """SENet-style ReLU sensitivity, "inversely correlated with pruning sensitivity" (formula unverified, see the fact
    sheet): keep the ``proxy_density`` fraction of all conv weights by global magnitude, read each layer's density
    ``d_l`` of the conv feeding ReLU layer l, and return ``s_l = 1 - d_l`` (prunable layers get more ReLUs)."""
    if not 0 < proxy_density < 1:
        raise ValueError(f"`proxy_density` must be in (0, 1), got {proxy_density!r}")
    pairs = relu_conv_pairs(model, example_input)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    magnitudes = torch.cat([m.weight.detach().abs().flatten().float() for m in convs.values()])
    keep = max(1, round(proxy_density * magnitudes.numel()))
    kept = torch.zeros_like(magnitudes, dtype=torch.bool)
    kept[torch.topk(magnitudes, keep).indices] = True  # global magnitude pruning, exactly `keep` weights
    density, start = {}, 0
    for name, conv in convs.items():
        n = conv.weight.numel()
        density[name] = float(kept[start:start + n].float().mean())
        start += n
    return {relu: 1.0 - density[conv] for relu, conv in pairs.items()}  # s_l = 1 - d_l


@torch.no_grad()
def linearization_sensitivity(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                              floor: float = 1e-3) -> dict[str, float]:
    """The direct measure: accuracy drop when ReLU layer l alone is linearised in the all-ReLU model,
    ``s_l = max(acc - acc_l, 0) + floor`` (the floor keeps every layer allocatable). Masks are restored."""
    batches = list(batches)
    if not batches:
        raise ValueError("`batches` is empty: pass a few (inputs, labels) batches")
    layers = relu_layers(model)
    saved = {n: m.mask.detach().clone() for n, m in layers.items()}
    was_training = model.training
    model.eval()

    def accuracy() -> float:
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
        return hits / sum(len(y) for _, y in batches)

    try:
        for m in layers.values():
            m.mask.fill_(1)
        base = accuracy()
        out = {}
        for name, m in layers.items():
            m.mask.fill_(0)
            out[name] = max(base - accuracy(), 0.0) + floor  # s_l = accuracy drop
            m.mask.fill_(1)
    finally:
        for name, m in layers.items():
            m.mask.copy_(saved[name])
        model.train(was_training)
    return out


def allocate_budget(sizes: Sequence[int], sensitivities: Sequence[float], budget: int,
                    fixed_zero: Collection[int] = ()) -> list[int]:
    """Per-layer ReLU counts ``k_l`` with ``sum k_l = budget`` exactly and ``0 <= k_l <= N_l``.

    Keep ratios proportional to sensitivity, capped at 1 (water-filling): ``r_l = min(1, c * s_l)`` with ``c`` such
    that ``sum_l r_l N_l = budget``; then integers by largest remainder (ties: lower index). Layers in ``fixed_zero``
    (indices) get 0. Uniform allocation is all sensitivities equal."""
    n = len(sizes)
    if n == 0 or len(sensitivities) != n:
        raise ValueError(f"`sizes` and `sensitivities` must be non-empty and of equal length, got {n} and "
                         f"{len(sensitivities)}")
    if any(int(s) != s or s < 1 for s in sizes):
        raise ValueError(f"`sizes` must be positive integers (ReLU positions per layer), got {list(sizes)}")
    if any(not math.isfinite(s) or s < 0 for s in sensitivities):
        raise ValueError(f"`sensitivities` must be finite and >= 0, got {list(sensitivities)}")
    if any(not 0 <= i < n for i in fixed_zero):
        raise ValueError(f"`fixed_zero` must hold layer indices in [0, {n}), got {sorted(fixed_zero)}")
    free = [i for i in range(n) if i not in set(fixed_zero)]
    capacity = sum(int(sizes[i]) for i in free)
    if int(budget) != budget or not 0 <= budget <= capacity:
        raise ValueError(f"`budget` must be an integer in [0, {capacity}] (the ReLUs of the allocatable layers), "
                         f"got {budget!r}")
    real = [0.0] * n
    capped: set[int] = set()
    while True:  # water-filling: cap the layers whose ratio reaches 1, spread the rest
        open_ = [i for i in free if i not in capped]
        remaining = budget - sum(sizes[i] for i in capped)
        weight = {i: sensitivities[i] * sizes[i] for i in open_}
        if open_ and sum(weight.values()) == 0:
            weight = {i: float(sizes[i]) for i in open_}  # all zero: uniform over the open layers
        total = sum(weight.values())
        c = remaining / total if total > 0 else 0.0
        newly = {i for i in open_ if c * weight[i] >= sizes[i]}  # r_l = c * s_l >= 1
        if not newly:
            break
        capped |= newly
    for i in free:
        real[i] = float(sizes[i]) if i in capped else c * weight[i]
    counts = [min(int(math.floor(r + 1e-9)), int(sizes[i])) for i, r in enumerate(real)]
    order = sorted(free, key=lambda i: (-(real[i] - math.floor(real[i] + 1e-9)), i))  # largest remainder
    left = budget - sum(counts)
    while left > 0:
        grew = False
        for i in order:
            if left > 0 and counts[i] < sizes[i]:
                counts[i] += 1
                left -= 1
                grew = True
        if not grew:
            raise RuntimeError("allocation could not place the budget")  # unreachable: budget <= capacity
    return counts


def topk_mask(scores: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """A 0/1 mask of ``scores``' shape with exactly ``k`` ones, at the ``k`` largest scores. Ties are broken by a
    random order drawn from ``generator`` or, without one, by position (first wins)."""
    if not isinstance(scores, Tensor):
        raise TypeError(f"`scores` must be a Tensor, got {type(scores).__name__}")
    flat = scores.detach().flatten().double().cpu()
    if torch.isnan(flat).any():
        raise ValueError("`scores` contain NaN")
    if int(k) != k or not 0 <= k <= flat.numel():
        raise ValueError(f"`k` must be an integer in [0, {flat.numel()}], got {k!r}")
    perm = torch.randperm(flat.numel(), generator=generator) if generator is not None else torch.arange(flat.numel())
    order = perm[torch.argsort(flat[perm], descending=True, stable=True)]
    mask = torch.zeros(flat.numel(), dtype=scores.dtype if scores.is_floating_point() else torch.float32)
    mask[order[: int(k)]] = 1
    return mask.view(scores.shape).to(scores.device)


def random_mask(shape: Sequence[int], k: int, generator: torch.Generator | None = None) -> Tensor:
    """SENet's initial mask: random spatial positions repeated over all channels (whole pixels first), completed by
    random channels at the last pixel so that exactly ``k`` entries are 1. ``shape`` is ``[C, H, W]`` (or ``[D]``)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3:
        c, h, w = shape
        pixel_rank = torch.argsort(torch.argsort(torch.rand(h * w, generator=generator))).view(1, h, w)
        scores = (h * w - pixel_rank).double() * 2 + torch.rand(c, h, w, generator=generator).double()
    else:
        scores = torch.rand(shape, generator=generator).double()
    return topk_mask(scores, k).float()


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton's distillation loss: ``T^2 KL(softmax(t / T) || softmax(s / T))``, averaged over the batch."""
    log_p = F.log_softmax(student_logits / temperature, dim=1)
    q = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * temperature**2


def attention_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """Attention transfer (Zagoruyko and Komodakis, 2017): ``a(f) = normalize(mean_c f^2)``; mean squared error of
    ``a(f_s) - a(f_t)``, summed over the feature maps."""
    def attention(f: Tensor) -> Tensor:
        return F.normalize(f.pow(2).mean(1).flatten(1), dim=1)  # a(f) = mean_c f^2 / ||.||_2

    return sum((attention(s) - attention(t)).pow(2).mean() for s, t in zip(student, teacher))
