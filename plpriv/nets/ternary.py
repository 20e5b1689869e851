"""Ternary-weight layers (TWN, TTQ), low-bit activation quantizers (PACT) and ``ternarize(model)``.

PyTorch has no ternary layer (``torch.ao`` quantizes to int8 and up), so the layers are written here: drop-ins for
``nn.Conv2d`` / ``nn.Linear`` (same constructor arguments plus ``mode``/``per_channel``) that keep a float latent
weight and use its ternary version ``{-a_n, 0, +a_p}`` per output channel in the forward pass, with straight-through
gradients. ``quantized_weight()`` returns exactly the tensor the forward pass multiplies with.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Mode = Literal["twn", "ttq"]


def twn_codes(weight: Tensor, per_channel: bool = True) -> tuple[Tensor, Tensor]:
    """TWN (Li et al. 2016): codes in {-1, 0, 1} (same shape as ``weight``) and the scale alpha per output channel."""
    w = weight.detach().flatten(1) if per_channel else weight.detach().reshape(1, -1)
    delta = 0.7 * w.abs().mean(1, keepdim=True)  # Li et al. 2016, Eq. 9: Delta = 0.7 E|W|
    mask = (w.abs() > delta).to(w.dtype)
    alpha = (w.abs() * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # Li et al. 2016, Eq. 6: alpha = mean |W_i|, |W_i| > Delta
    codes = (torch.sign(w) * mask).view_as(weight)
    if not per_channel:
        alpha = alpha.expand(weight.shape[0]).contiguous()
    return codes, alpha


def ternary_from_codes(codes: Tensor, scale_pos: Tensor, scale_neg: Tensor) -> Tensor:
    """W_t = a_p 1[c = 1] - a_n 1[c = -1], scales per output channel (TWN: a_p = a_n = alpha)."""
    shape = (-1,) + (1,) * (codes.ndim - 1)
    return scale_pos.view(shape) * (codes > 0).to(scale_pos.dtype) - scale_neg.view(shape) * (codes < 0).to(scale_neg.dtype)


class _TWNFunction(torch.autograd.Function):
    """Forward: the TWN ternary weight; backward: straight through (dL/dW := dL/dW_t), Li et al. 2016."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, per_channel: bool) -> Tensor:  # type: ignore[override]
        codes, alpha = twn_codes(weight, per_channel)
        return ternary_from_codes(codes, alpha, alpha)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def ttq_codes(weight: Tensor, threshold: float = 0.05, per_channel: bool = True) -> Tensor:
    """TTQ (Zhu et al. 2017) codes: 1[w > Delta] - 1[w < -Delta], Delta = t max|w| (per channel or per layer)."""
    w = weight.detach().flatten(1) if per_channel else weight.detach().reshape(1, -1)
    delta = threshold * w.abs().amax(1, keepdim=True)  # Zhu et al. 2017, Eq. 1: Delta = t max|w|
    return ((w > delta).to(w.dtype) - (w < -delta).to(w.dtype)).view_as(weight)


class _TTQFunction(torch.autograd.Function):
    """Forward: W_p 1[w > D] - W_n 1[w < -D]; backward: Zhu et al. 2017, Eqs. 7-8 (scaled STE to w, sums to W_p, W_n)."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, w_p: Tensor, w_n: Tensor, threshold: float, per_channel: bool) -> Tensor:  # type: ignore[override]
        codes = ttq_codes(weight, threshold, per_channel)
        ctx.save_for_backward(codes, w_p, w_n)
        return ternary_from_codes(codes, w_p, w_n)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:  # type: ignore[override]
        codes, w_p, w_n = ctx.saved_tensors
        shape = (-1,) + (1,) * (codes.ndim - 1)
        pos, neg = (codes > 0).to(grad.dtype), (codes < 0).to(grad.dtype)
        g = grad.flatten(1)
        grad_p = (g * pos.flatten(1)).sum(1)  # Zhu et al. 2017, Eq. 7: dL/dW_p = sum over I_p
        grad_n = -(g * neg.flatten(1)).sum(1)  # Zhu et al. 2017, Eq. 7: dL/dW_n = sum over I_n (with sign)
        scale = w_p.view(shape) * pos + w_n.view(shape) * neg + (1.0 - pos - neg)  # Zhu et al. 2017, Eq. 8
        if w_p.numel() == 1:
            grad_p, grad_n = grad_p.sum().view(1), grad_n.sum().view(1)
        return grad * scale, grad_p, grad_n, None, None


class _TernaryMixin:
    """Shared state of the ternary layers: the latent ``weight`` plus ``mode``, ``per_channel`` and TTQ scales."""

    weight: Tensor

    def _init_ternary(self, mode: Mode, per_channel: bool, threshold: float) -> None:
        if mode not in ("twn", "ttq"):
            raise ValueError(f"`mode` must be 'twn' or 'ttq', got {mode!r}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"`threshold` (TTQ's t) must be in (0, 1), got {threshold!r}")
        self.mode, self.per_channel, self.threshold = mode, per_channel, threshold
        if mode == "ttq":
            n = self.weight.shape[0] if per_channel else 1
            _, alpha = twn_codes(self.weight, per_channel)  # start the learned scales at TWN's alpha
            self.w_p = nn.Parameter(alpha[:n].clone())  # type: ignore[attr-defined]
            self.w_n = nn.Parameter(alpha[:n].clone())  # type: ignore[attr-defined]
        # after unpack_ternary: the stored ternary weight, used as is (no latent weight to ternarize)
        self.register_buffer("frozen_weight", None)  # type: ignore[attr-defined]

    def reset_ttq_scales(self) -> None:
        """Set TTQ's W_p, W_n to TWN's alpha of the current latent weight (after loading float weights)."""
        if self.mode == "ttq":
            _, alpha = twn_codes(self.weight, self.per_channel)
            with torch.no_grad():
                self.w_p.copy_(alpha[: self.w_p.numel()])
                self.w_n.copy_(alpha[: self.w_n.numel()])

    def quantized_weight(self) -> Tensor:
        """The ternary weight the forward pass uses: values {-a_n, 0, +a_p} per output channel."""
        if self.frozen_weight is not None:  # type: ignore[attr-defined]
            return self.frozen_weight  # type: ignore[attr-defined]
        if self.mode == "ttq":
            return _TTQFunction.apply(self.weight, self.w_p, self.w_n, self.threshold, self.per_channel)
        return _TWNFunction.apply(self.weight, self.per_channel)

    def ternary_state(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(codes int8 in {-1, 0, 1}, scale_pos [C_out], scale_neg [C_out])`` of the current ternary weight."""
        w = self.quantized_weight().detach()
        codes = torch.sign(w).to(torch.int8)
        flat = w.flatten(1)
        pos = torch.where(flat > 0, flat, torch.zeros_like(flat)).amax(1)
        neg = torch.where(flat < 0, -flat, torch.zeros_like(flat)).amax(1)
        return codes, pos, neg

    def load_ternary(self, codes: Tensor, scale_pos: Tensor, scale_neg: Tensor) -> None:
        """Freeze the layer to a stored ternary weight (what ``plpriv.export.unpack_ternary`` calls)."""
        self.frozen_weight = ternary_from_codes(codes.to(scale_pos.dtype), scale_pos, scale_neg)  # type: ignore[attr-defined]


class TernaryConv2d(_TernaryMixin, nn.Conv2d):
    """``nn.Conv2d`` with ternary weights; extra args: ``mode`` ("twn" | "ttq"), ``per_channel``, ``threshold`` (TTQ t)."""

    def __init__(self, *args: Any, mode: Mode = "twn", per_channel: bool = True, threshold: float = 0.05, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_ternary(mode, per_channel, threshold)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class TernaryLinear(_TernaryMixin, nn.Linear):
    """``nn.Linear`` with ternary weights; extra args as :class:`TernaryConv2d`."""

    def __init__(self, *args: Any, mode: Mode = "twn", per_channel: bool = True, threshold: float = 0.05, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_ternary(mode, per_channel, threshold)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


class ActivationQuantizer(nn.Module):
    """PACT (Choi et al. 2018): y = clip(x, 0, alpha) with a learned clip alpha, then ``bits``-bit uniform levels
    (2^bits - 1 steps of alpha / (2^bits - 1)) with a straight-through round. Replaces a ReLU."""

    def __init__(self, bits: int = 4, init_alpha: float = 6.0) -> None:
        super().__init__()
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"`bits` must be an int in 2..8, got {bits!r}")
        if init_alpha <= 0:
            raise ValueError(f"`init_alpha` must be > 0, got {init_alpha!r}")
        self.bits = bits
        self.alpha = nn.Parameter(torch.tensor(float(init_alpha)))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.minimum(F.relu(x), self.alpha)  # Choi et al. 2018, Eq. 1: PACT clip (gradient to alpha where x >= alpha)
        levels = 2**self.bits - 1
        return _RoundSTE.apply(y * (levels / self.alpha)) * (self.alpha / levels)  # Choi et al. 2018, Eq. 2

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def _quantizable(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def ternarize(
    model: nn.Module,
    mode: Mode = "twn",
    per_channel: bool = True,
    threshold: float = 0.05,
    fully_quantized: bool = False,
    act_bits: int | None = None,
) -> nn.Module:
    """Replace the model's ``nn.Conv2d``/``nn.Linear`` by ternary layers in place (float weights kept as latents).

    The first and the last layer stay float unless ``fully_quantized``; then every ReLU also becomes a PACT
    quantizer with ``act_bits`` bits (default 4). ``act_bits`` alone quantizes activations without touching the
    first/last layers. Returns the model.
    """
    names = _quantizable(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d or nn.Linear to ternarize")
    keep = set() if fully_quantized else {names[0], names[-1]}
    for name in names:
        if name in keep:
            continue
        old = model.get_submodule(name)
        if isinstance(old, nn.Conv2d):
            new: nn.Module = TernaryConv2d(
                old.in_channels, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
                dilation=old.dilation, groups=old.groups, bias=old.bias is not None, padding_mode=old.padding_mode,
                mode=mode, per_channel=per_channel, threshold=threshold,
            )
        else:
            new = TernaryLinear(old.in_features, old.out_features, bias=old.bias is not None, mode=mode,
                                per_channel=per_channel, threshold=threshold)
        new.load_state_dict(old.state_dict(), strict=False)
        new.reset_ttq_scales()  # type: ignore[attr-defined]
        _set(model, name, new.to(old.weight.device))
    bits = act_bits if act_bits is not None else (4 if fully_quantized else None)
    if bits is not None:
        for name, m in list(model.named_modules()):
            if isinstance(m, nn.ReLU):
                _set(model, name, ActivationQuantizer(bits))
    return model


def ternary_layers(model: nn.Module) -> dict[str, TernaryConv2d | TernaryLinear]:
    """The model's ternary layers by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (TernaryConv2d, TernaryLinear))}
