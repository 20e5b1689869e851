"""The shallow step ("Making Models Shallow Again", Kundu et al., CVPRW 2023): once a residual block's inner ReLU is
linear, fold ``conv_a -> BN_a -> conv_b -> BN_b`` into one convolution, exactly.

Composition: ``conv_b(conv_a(x))`` is one convolution with kernel size ``k = k_a + s_a (k_b - 1)``, stride
``s = s_a s_b`` and padding ``p = p_a + s_a p_b``. It is exact wherever conv_b's window lies inside the intermediate
map; at the border conv_b zero-pads the *intermediate* map (after conv_a's bias), which no padding of the input
reproduces. :class:`FoldedConv2d` therefore runs the merged convolution on the interior outputs and recomputes the
outer ring of outputs from the two factor convolutions, so the fold is exact everywhere, and counts both parts' MACs.

Honest costs: the fold removes one ReLU layer and one layer of depth, not MACs. A 3x3 -> 3x3 block at stride 1 has
``18 C^2`` MACs per pixel unfolded and ``25 C^2`` folded (5x5), plus the border ring; at stride 2, 7x7.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plpriv.nets.relu_budget import MaskedReLU, MaskedResBlock, set_submodule


def fold_conv_bn(conv: nn.Conv2d, norm: nn.Module) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm folded into the preceding conv: ``W' = W g / sigma``, ``b' = beta + (b - mu) g / sigma``
    with ``sigma = sqrt(var + eps)`` (running statistics). ``norm`` may be ``nn.Identity``."""
    weight = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else weight.new_zeros(weight.shape[0])
    if isinstance(norm, nn.Identity):
        return weight.clone(), bias.clone()
    if not isinstance(norm, nn.BatchNorm2d) or norm.running_mean is None or norm.running_var is None:
        raise ValueError(f"only BatchNorm2d with running statistics folds into a conv, got {type(norm).__name__}: "
                         "GroupNorm/LayerNorm depend on the input (use norm='batch' for the shallow step)")
    sigma = torch.sqrt(norm.running_var.detach() + norm.eps)  # sigma = sqrt(var + eps)
    gamma = norm.weight.detach() if norm.weight is not None else torch.ones_like(sigma)
    beta = norm.bias.detach() if norm.bias is not None else torch.zeros_like(sigma)
    scale = gamma / sigma
    return weight * scale.view(-1, 1, 1, 1), beta + (bias - norm.running_mean.detach()) * scale  # W', b'


def compose_kernels(w_a: Tensor, stride_a: Sequence[int], w_b: Tensor) -> Tensor:
    """Kernel of ``conv_b o conv_a``: ``W[o, i, m] = sum_c sum_j W_b[o, c, j] W_a[c, i, m - s_a j]``, a transposed
    convolution of ``W_b`` by ``W_a`` with stride ``s_a``; size ``k_a + s_a (k_b - 1)`` per dimension."""
    return F.conv_transpose2d(w_b, w_a, stride=tuple(stride_a))


def _spec(conv: nn.Module) -> tuple[tuple[int, int], tuple[int, int]]:
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"only plain Conv2d layers fold, got {type(conv).__name__} (a block folds once)")
    if conv.groups != 1 or tuple(conv.dilation) != (1, 1) or conv.padding_mode != "zeros" or isinstance(
            conv.padding, str):
        raise ValueError(f"{conv} does not fold: it needs groups=1, dilation=1 and numeric zero padding")
    return tuple(conv.stride), tuple(conv.padding)  # type: ignore[return-value]


def _out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1  # conv output size: floor((H + 2p - k) / s) + 1


class FoldedConv2d(nn.Module):
    """``BN_b(conv_b(BN_a(conv_a(x))))`` with no nonlinearity in between, computed as one merged convolution on the
    interior and from the factors on the border ring: exact (see the module docstring). Inference only: all tensors
    are buffers (training them apart would break the merge); build it with :func:`fold_block`."""

    def __init__(self, w_a: Tensor, b_a: Tensor, stride_a: Sequence[int], pad_a: Sequence[int], w_b: Tensor,
                 b_b: Tensor, stride_b: Sequence[int], pad_b: Sequence[int]) -> None:
        super().__init__()
        if w_b.shape[1] != w_a.shape[0]:
            raise ValueError(f"conv_b takes {w_b.shape[1]} channels but conv_a gives {w_a.shape[0]}")
        self.stride_a, self.pad_a = tuple(stride_a), tuple(pad_a)
        self.stride_b, self.pad_b = tuple(stride_b), tuple(pad_b)
        self.stride = tuple(a * b for a, b in zip(self.stride_a, self.stride_b))  # s = s_a s_b
        self.padding = tuple(pa + sa * pb for pa, sa, pb in zip(self.pad_a, self.stride_a, self.pad_b))  # p
        self.register_buffer("w_a", w_a.detach().clone())
        self.register_buffer("b_a", b_a.detach().clone())
        self.register_buffer("w_b", w_b.detach().clone())
        self.register_buffer("b_b", b_b.detach().clone())
        self.register_buffer("weight", compose_kernels(self.w_a, self.stride_a, self.w_b))
        self.register_buffer("bias", self.b_b + torch.einsum("ocij,c->o", self.w_b, self.b_a))  # interior bias
        self._plans: dict[tuple[int, int], dict[str, object]] = {}

    def _plan(self, hw: tuple[int, int]) -> dict[str, object]:
        """Index sets for one input size: interior rectangle, border outputs, intermediate positions they read."""
        if hw in self._plans:
            return self._plans[hw]
        ka, kb = self.w_a.shape[-2:], self.w_b.shape[-2:]
        mid = [_out(hw[d], ka[d], self.stride_a[d], self.pad_a[d]) for d in range(2)]
        out = [_out(mid[d], kb[d], self.stride_b[d], self.pad_b[d]) for d in range(2)]
        if min(mid) < 1 or min(out) < 1:
            raise ValueError(f"input {hw} is too small for this block")
        inner = []  # per dimension: outputs whose conv_b window lies inside the intermediate map
        for d in range(2):
            rows = [q for q in range(out[d]) if self.stride_b[d] * q - self.pad_b[d] >= 0
                    and self.stride_b[d] * q - self.pad_b[d] + kb[d] <= mid[d]]
            inner.append((rows[0], rows[-1]) if rows else None)
        border, need = [], torch.zeros(mid, dtype=torch.bool)
        for q in range(out[0]):
            for r in range(out[1]):
                if inner[0] is not None and inner[1] is not None and inner[0][0] <= q <= inner[0][1] \
                        and inner[1][0] <= r <= inner[1][1]:
                    continue
                border.append(q * out[1] + r)
                u0, v0 = self.stride_b[0] * q - self.pad_b[0], self.stride_b[1] * r - self.pad_b[1]
                need[max(u0, 0):max(u0 + kb[0], 0), max(v0, 0):max(v0 + kb[1], 0)] = True
        need_idx = need.flatten().nonzero().flatten()
        pw = mid[1] + 2 * self.pad_b[1]
        padded_idx = (need_idx // mid[1] + self.pad_b[0]) * pw + need_idx % mid[1] + self.pad_b[1]
        interior_idx = torch.tensor([], dtype=torch.long)
        if inner[0] is not None and inner[1] is not None:
            rows = torch.arange(inner[0][0], inner[0][1] + 1)
            cols = torch.arange(inner[1][0], inner[1][1] + 1)
            interior_idx = (rows.view(-1, 1) * out[1] + cols.view(1, -1)).flatten()
        plan = {"mid": mid, "out": out, "inner": inner, "border": torch.tensor(border, dtype=torch.long),
                "need": need_idx, "padded": padded_idx, "interior": interior_idx}
        self._plans[hw] = plan
        return plan

    def forward(self, x: Tensor) -> Tensor:
        plan = self._plan(tuple(x.shape[-2:]))
        mid, out, inner = plan["mid"], plan["out"], plan["inner"]
        n, c_out = x.shape[0], self.w_b.shape[0]
        y = x.new_zeros(n, c_out, out[0] * out[1])
        if plan["interior"].numel():  # merged conv on the interior rectangle only
            (q0, q1), (r0, r1) = inner
            k, s = self.weight.shape[-2:], self.stride
            xp = F.pad(x, (self.padding[1], self.padding[1], self.padding[0], self.padding[0]))
            xs = xp[..., s[0] * q0: s[0] * q1 + k[0], s[1] * r0: s[1] * r1 + k[1]]
            y_in = F.conv2d(xs, self.weight, self.bias, stride=s)
            y = y.index_copy(2, plan["interior"].to(x.device), y_in.flatten(2))
        if plan["border"].numel():  # border ring from the factors: conv_a where needed, zero-padded, then conv_b
            cols = F.unfold(x, self.w_a.shape[-2:], padding=self.pad_a, stride=self.stride_a)
            cols = cols.index_select(2, plan["need"].to(x.device))
            u = self.w_a.flatten(1) @ cols + self.b_a.view(-1, 1)  # u = W_a x + b_a at the needed positions
            ph, pw = mid[0] + 2 * self.pad_b[0], mid[1] + 2 * self.pad_b[1]
            u_pad = x.new_zeros(n, u.shape[1], ph * pw).index_copy(2, plan["padded"].to(x.device), u)
            ucols = F.unfold(u_pad.view(n, -1, ph, pw), self.w_b.shape[-2:], stride=self.stride_b)
            ucols = ucols.index_select(2, plan["border"].to(x.device))
            y = y.index_copy(2, plan["border"].to(x.device), self.w_b.flatten(1) @ ucols + self.b_b.view(-1, 1))
        return y.view(n, c_out, out[0], out[1])

    def macs_per_sample(self, hw: tuple[int, int]) -> int:
        """MACs of what :meth:`forward` computes: merged kernel on the interior, conv_a on the intermediate
        positions the border reads, conv_b (full kernel, zero taps included) on the border outputs."""
        plan = self._plan(tuple(hw))
        c_mid, c_in = self.w_a.shape[:2]
        c_out = self.w_b.shape[0]
        merged = plan["interior"].numel() * c_out * c_in * math.prod(self.weight.shape[-2:])
        factor_a = plan["need"].numel() * c_mid * c_in * math.prod(self.w_a.shape[-2:])
        factor_b = plan["border"].numel() * c_out * c_mid * math.prod(self.w_b.shape[-2:])
        return int(merged + factor_a + factor_b)


def _is_linear(act: nn.Module) -> bool:
    return isinstance(act, nn.Identity) or (isinstance(act, MaskedReLU) and act.relu_count() == 0)


def fold_block(block: MaskedResBlock, index: int = 0, force: bool = False) -> MaskedResBlock:
    """A new block with branch convs ``index`` and ``index + 1`` (and their BatchNorms, eval statistics) folded into
    one :class:`FoldedConv2d`; the ReLU between them is removed. Exact when that ReLU is already linear (mask all
    zeros); otherwise refused, unless ``force`` (which linearises it: the function changes)."""
    if not isinstance(block, MaskedResBlock):
        raise TypeError(f"`block` must be a MaskedResBlock (plpriv.nets.relu_budget.to_masked), got "
                        f"{type(block).__name__}")
    if not 0 <= index < len(block.acts):
        raise ValueError(f"`index` must be in [0, {len(block.acts)}) (the block's inner ReLUs), got {index!r}")
    if not force and not _is_linear(block.acts[index]):
        raise ValueError(f"inner ReLU {index} keeps {block.acts[index].relu_count()} ReLUs: linearise it first "
                         "(allocate it 0 ReLUs, e.g. shallow_blocks) or pass force=True to drop them")
    conv_a, conv_b = block.convs[index], block.convs[index + 1]
    stride_a, pad_a = _spec(conv_a)
    stride_b, pad_b = _spec(conv_b)
    w_a, b_a = fold_conv_bn(conv_a, block.norms[index])
    w_b, b_b = fold_conv_bn(conv_b, block.norms[index + 1])
    folded = FoldedConv2d(w_a, b_a, stride_a, pad_a, w_b, b_b, stride_b, pad_b)
    convs = [*block.convs[:index], folded, *block.convs[index + 2:]]
    norms = [*block.norms[:index], nn.Identity(), *block.norms[index + 2:]]
    acts = [*block.acts[:index], *block.acts[index + 1:]]
    return MaskedResBlock(convs, norms, acts, block.shortcut, block.out_act).train(block.training)


def make_shallow(model: nn.Module, blocks: Sequence[str], force: bool = False) -> nn.Module:
    """In place: fold the first inner ReLU of each named :class:`MaskedResBlock` (see :func:`fold_block`)."""
    for name in blocks:
        try:
            block = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"no submodule {name!r} in {type(model).__name__}: pass names of MaskedResBlocks") from err
        set_submodule(model, name, fold_block(block, 0, force=force))
    return model


def linear_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks whose first inner ReLU is linear (foldable exactly)."""
    return [n for n, m in model.named_modules() if isinstance(m, MaskedResBlock) and len(m.acts)
            and _is_linear(m.acts[0]) and isinstance(m.convs[0], nn.Conv2d) and isinstance(m.convs[1], nn.Conv2d)]
