"""LoRA conditioning of attention projections (Choi, Park, Park, Cho, No, Ryu, TMLR 2024, arXiv 2405.03958).

U-Nets condition their conv blocks on time/class but leave attention unconditioned. Here each attention projection
(qkv and proj) gets a condition-dependent low-rank update

    y = W x + b + s * [ up(w_rep * down(x)) + w_rep @ Bias ],   w = mixing_weights(condition) in R^m,

i.e. ``dW(c) = sum_i w_i(c) B_i A_i`` with ``m`` rank-``r`` bases (``w_rep`` repeats each ``w_i`` ``r`` times) plus a
condition-dependent bias ``sum_i w_i(c) Bias_i``. ``up`` and ``Bias`` start at zero, so a wrapped network equals its
base bit for bit at initialisation. Variants differ only in ``mixing_weights``:

* :class:`CompositionalLoRA` (unified, as released for EDM): ``w = MLP(e)`` of the block embedding ``e``;
* :class:`TimeLoRA`: fixed hat (linear) interpolation between ``m`` equally spaced anchor times;
* :class:`ClassLoRA`: one adapter per class, ``w = one_hot(class)``.

All parametrised pieces are plain ``nn.Conv2d``/``nn.Linear``/``nn.GroupNorm`` (the bias matrix is the weight of a
bias-free ``nn.Linear(r*m, C_out)``), so opacus' per-sample grad samplers apply. Written from the paper and the
facts in the reference; the parameter count per layer matches the released EDM variant exactly (qkv 256->768:
204,498; proj 256->256: 130,770 with r=4, m=18, MLP [128, 64]).

:func:`apply_lora` wraps ``plpriv.nets.SongUNet`` (the condition is passed explicitly through the blocks) and
diffusers' ``UNet2DModel`` (whose attention processors never see the time embedding: hooks capture it into a shared
:class:`LoRAContext` that the wrapped ``to_q/to_k/to_v/to_out[0]`` read).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LoRAContext",
    "ConditionalLoRA",
    "CompositionalLoRA",
    "TimeLoRA",
    "ClassLoRA",
    "hat_weights",
    "apply_lora",
    "lora_parameters",
    "freeze_non_lora",
]

LoRAType = Literal["compositional", "time", "class"]


def _groups(num_channels: int) -> int:
    # EDM's GroupNorm rule (32 groups, >= 4 channels each), as in plpriv.nets.songunet.edm_group_norm.
    return max(1, min(32, num_channels // 4))


def hat_weights(t: torch.Tensor, num_bases: int, t_min: float, t_max: float) -> torch.Tensor:
    """Hat-function interpolation weights, shape ``(B, num_bases)``.

    Anchors ``a_j = t_min + j * d`` with ``d = (t_max - t_min) / (num_bases - 1)``; ``w_j(t) = max(0, 1 - |t - a_j| / d)``
    after clamping ``t`` to ``[t_min, t_max]``. Between two anchors exactly two weights are non-zero, they are linear in
    ``t`` and sum to 1 (piecewise-linear interpolation of per-anchor LoRAs, TimeLoRA of Choi et al.).
    """
    if num_bases < 2:
        raise ValueError(f"hat interpolation needs num_bases >= 2 anchors, got {num_bases}")
    if not t_max > t_min:
        raise ValueError(f"need t_max > t_min, got t_min={t_min}, t_max={t_max}")
    t = t.reshape(-1).to(torch.float32).clamp(t_min, t_max)
    anchors = torch.linspace(t_min, t_max, num_bases, dtype=torch.float32, device=t.device)
    delta = (t_max - t_min) / (num_bases - 1)
    return (1.0 - (t[:, None] - anchors[None, :]).abs() / delta).clamp_min(0.0)


@dataclass
class LoRAContext:
    """Conditioning captured by hooks for wrapped layers that are called without an explicit condition.

    Fields: ``emb`` (the network's time/class embedding, for :class:`CompositionalLoRA`), ``timesteps`` (``(B,)``,
    for :class:`TimeLoRA`), ``class_labels`` (for :class:`ClassLoRA`). Reset at the start of every forward.
    """

    emb: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None
    class_labels: torch.Tensor | None = None

    def reset(self) -> None:
        self.emb = self.timesteps = self.class_labels = None


class ConditionalLoRA(nn.Module):
    """Wrap a ``nn.Linear`` or 1x1 ``nn.Conv2d`` with an ``m``-basis, rank-``r`` condition-mixed LoRA update.

    ``down``: ``C_in -> r*m``, no bias, init ``N(0, (1/r)^2)``; ``up``: ``r*m -> C_out``, no bias, init 0;
    ``bias_matrix``: ``nn.Linear(r*m, C_out, bias=False)`` init 0 (weight = Bias^T). ``forward(x, cond=None)``:
    ``cond`` is what :meth:`mixing_weights` consumes; when ``None`` it is read from ``self.context`` (set by
    :func:`apply_lora` for hook-driven models). Linear inputs are ``(B, ..., C_in)``, conv inputs ``(B, C_in, H, W)``.
    """

    cond_key: ClassVar[str] = "emb"

    def __init__(
        self, base: nn.Linear | nn.Conv2d, rank: int, num_bases: int, bias: bool = True, scale: float = 1.0
    ) -> None:
        super().__init__()
        if isinstance(base, nn.Conv2d):
            if base.kernel_size != (1, 1) or base.stride != (1, 1) or base.groups != 1 or base.padding not in (
                (0, 0), "valid", "same"
            ):
                raise TypeError(f"only 1x1, stride-1, ungrouped, unpadded Conv2d layers can be wrapped, got {base}")
            c_in, c_out, self.is_conv = base.in_channels, base.out_channels, True
        elif isinstance(base, nn.Linear):
            c_in, c_out, self.is_conv = base.in_features, base.out_features, False
        else:
            raise TypeError(f"base must be nn.Linear or a 1x1 nn.Conv2d, got {type(base).__name__}")
        if rank < 1 or num_bases < 1:
            raise ValueError(f"rank and num_bases must be >= 1, got rank={rank}, num_bases={num_bases}")
        self.base = base
        self.rank = rank
        self.num_bases = num_bases
        self.scale = float(scale)
        hidden = rank * num_bases
        if self.is_conv:
            self.down: nn.Module = nn.Conv2d(c_in, hidden, 1, bias=False)
            self.up: nn.Module = nn.Conv2d(hidden, c_out, 1, bias=False)
        else:
            self.down = nn.Linear(c_in, hidden, bias=False)
            self.up = nn.Linear(hidden, c_out, bias=False)
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)
        self.bias_matrix = nn.Linear(hidden, c_out, bias=False) if bias else None
        if self.bias_matrix is not None:
            nn.init.zeros_(self.bias_matrix.weight)
        self.context: LoRAContext | None = None
        # Checkpoints of the unwrapped network (keys `weight`, `bias`) load into `base.` (LoRA keys then missing).
        self._register_load_state_dict_pre_hook(_remap_base_keys, with_module=True)

    # Mirror the wrapped layer so code that reads `layer.weight` (e.g. dtype checks in diffusers) keeps working.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def mixing_weights(self, cond: torch.Tensor) -> torch.Tensor:
        """Map the condition to ``(B, num_bases)`` mixing weights."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        y = self.base(x)
        if cond is None:
            cond = getattr(self.context, self.cond_key) if self.context is not None else None
            if cond is None:
                raise RuntimeError(
                    f"{type(self).__name__} got no condition: pass it as forward(x, cond) or call the wrapped model's "
                    f"forward so the hooks installed by apply_lora capture `{self.cond_key}`"
                )
        w = self.mixing_weights(cond).to(x.dtype)
        if w.ndim != 2 or w.shape[1] != self.num_bases or w.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"mixing weights have shape {tuple(w.shape)}, expected ({x.shape[0]}, {self.num_bases}); the condition "
                f"batch must match the input batch {x.shape[0]}"
            )
        w_rep = w.repeat_interleave(self.rank, dim=1)  # (B, r*m): basis i owns channels [i*r, (i+1)*r)
        if self.scale != 1.0:  # s [up(h w) + Bias w] = up(h (s w)) + Bias (s w): scale the small (B, r*m) tensor
            w_rep = w_rep * self.scale
        # One full-size temporary: the fresh sum y + up(.) takes the bias term in place (never a module output).
        if self.is_conv:
            out = y + self.up(self.down(x) * w_rep[:, :, None, None])
            if self.bias_matrix is not None:
                out = out.add_(self.bias_matrix(w_rep)[:, :, None, None])
        else:
            view = (w_rep.shape[0],) + (1,) * (x.ndim - 2) + (w_rep.shape[1],)
            out = y + self.up(self.down(x) * w_rep.reshape(view))
            if self.bias_matrix is not None:
                b = self.bias_matrix(w_rep)
                out = out.add_(b.reshape((b.shape[0],) + (1,) * (x.ndim - 2) + (b.shape[1],)))
        return out

    def delta_weight(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample dense update ``(dW (B, C_out, C_in), db (B, C_out))`` = ``(s sum_i w_i B_i A_i, s w_rep @ Bias)``."""
        w_rep = self.mixing_weights(cond).repeat_interleave(self.rank, dim=1)
        a = self.down.weight.reshape(self.down.weight.shape[0], -1)  # (r*m, C_in)
        b = self.up.weight.reshape(self.up.weight.shape[0], -1)  # (C_out, r*m)
        dw = torch.einsum("or,br,ri->boi", b, w_rep, a) * self.scale
        db = (w_rep @ self.bias_matrix.weight.t() if self.bias_matrix is not None
              else w_rep.new_zeros(w_rep.shape[0], b.shape[0])) * self.scale
        return dw, db

    def extra_repr(self) -> str:
        return f"rank={self.rank}, num_bases={self.num_bases}, scale={self.scale}"


def _remap_base_keys(module: ConditionalLoRA, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    for name in ("weight", "bias"):
        if prefix + name in state_dict and prefix + "base." + name not in state_dict:
            state_dict[prefix + "base." + name] = state_dict.pop(prefix + name)


class CompositionalLoRA(ConditionalLoRA):
    """Unified compositional LoRA: ``w = MLP(e)``, no softmax.

    MLP: ``Linear(emb_dim, mlp[0]) - GroupNorm - SiLU - ... - Linear(mlp[-1], num_bases)`` (GroupNorm with EDM's
    group rule on the ``(B, C)`` hidden features; default torch init of the Linear layers).
    """

    cond_key: ClassVar[str] = "emb"

    def __init__(
        self,
        base: nn.Linear | nn.Conv2d,
        emb_dim: int,
        rank: int = 4,
        num_bases: int = 18,
        mlp: Sequence[int] = (128, 64),
        bias: bool = True,
        scale: float = 1.0,
    ) -> None:
        super().__init__(base, rank, num_bases, bias=bias, scale=scale)
        if emb_dim < 1 or any(int(h) < 1 for h in mlp):
            raise ValueError(f"emb_dim and mlp widths must be positive, got emb_dim={emb_dim}, mlp={list(mlp)}")
        layers: list[nn.Module] = []
        width = emb_dim
        for h in mlp:
            layers += [nn.Linear(width, int(h)), nn.GroupNorm(_groups(int(h)), int(h)), nn.SiLU()]
            width = int(h)
        layers.append(nn.Linear(width, num_bases))
        self.mixer = nn.Sequential(*layers)
        self.emb_dim = emb_dim

    def mixing_weights(self, cond: torch.Tensor) -> torch.Tensor:
        if cond.ndim != 2 or cond.shape[1] != self.emb_dim:
            raise ValueError(f"CompositionalLoRA expects an embedding of shape (B, {self.emb_dim}), "
                             f"got {tuple(cond.shape)}")
        return self.mixer(cond)


class TimeLoRA(ConditionalLoRA):
    """TimeLoRA: ``num_bases`` anchors equally spaced over ``[t_min, t_max]``, hat-interpolated (:func:`hat_weights`).

    The condition is the scalar time per sample, shape ``(B,)`` (for SongUNet the noise label ln(sigma)/4, for
    diffusers the timestep). Paper default for IDDPM: 11 bases. ``bias`` (the bias matrix) is off by default, as in
    the paper's TimeLoRA.
    """

    cond_key: ClassVar[str] = "timesteps"

    def __init__(
        self,
        base: nn.Linear | nn.Conv2d,
        t_min: float,
        t_max: float,
        rank: int = 4,
        num_bases: int = 11,
        bias: bool = False,
        scale: float = 1.0,
    ) -> None:
        if num_bases < 2 or not t_max > t_min:
            raise ValueError(f"TimeLoRA needs num_bases >= 2 and t_max > t_min, got num_bases={num_bases}, "
                             f"t_min={t_min}, t_max={t_max}")
        super().__init__(base, rank, num_bases, bias=bias, scale=scale)
        self.t_min = float(t_min)
        self.t_max = float(t_max)

    def mixing_weights(self, cond: torch.Tensor) -> torch.Tensor:
        return hat_weights(cond, self.num_bases, self.t_min, self.t_max)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", t_range=({self.t_min:g}, {self.t_max:g})"


class ClassLoRA(ConditionalLoRA):
    """ClassLoRA: one rank-``r`` adapter per class, ``w = one_hot(label)``.

    The condition is integer labels ``(B,)`` or one-hot/soft float labels ``(B, num_classes)`` (an all-zero row, e.g.
    a dropped label, selects no adapter). ``bias`` (the bias matrix) is off by default, as in the paper's ClassLoRA.
    """

    cond_key: ClassVar[str] = "class_labels"

    def __init__(
        self, base: nn.Linear | nn.Conv2d, num_classes: int, rank: int = 4, bias: bool = False, scale: float = 1.0
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"ClassLoRA needs num_classes >= 1, got {num_classes}")
        super().__init__(base, rank, num_classes, bias=bias, scale=scale)

    def mixing_weights(self, cond: torch.Tensor) -> torch.Tensor:
        if cond.is_floating_point():
            return cond.reshape(-1, self.num_bases)
        if cond.ndim != 1:
            raise ValueError(f"integer class labels must have shape (B,), got {tuple(cond.shape)}")
        return F.one_hot(cond.long(), self.num_bases).to(torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Applying LoRA to networks.


def _make_lora(
    base: nn.Module, lora_type: str, *, rank: int, num_bases: int, mlp: Sequence[int], emb_dim: int | None,
    time_range: tuple[float, float] | None, num_classes: int | None, scale: float,
) -> ConditionalLoRA:
    if lora_type == "compositional":
        assert emb_dim is not None
        return CompositionalLoRA(base, emb_dim, rank=rank, num_bases=num_bases, mlp=mlp, scale=scale)  # type: ignore[arg-type]
    if lora_type == "time":
        assert time_range is not None
        return TimeLoRA(base, time_range[0], time_range[1], rank=rank, num_bases=num_bases, scale=scale)  # type: ignore[arg-type]
    assert num_classes is not None
    return ClassLoRA(base, num_classes, rank=rank, scale=scale)  # type: ignore[arg-type]


def lora_parameters(net: nn.Module) -> Iterator[nn.Parameter]:
    """The LoRA parameters of ``net`` (down, up, bias matrix, mixer of every wrapper; not the wrapped base)."""
    for module in net.modules():
        if isinstance(module, ConditionalLoRA):
            for name, p in module.named_parameters():
                if not name.startswith("base."):
                    yield p


def freeze_non_lora(net: nn.Module) -> nn.Module:
    """Leave only LoRA parameters trainable (``requires_grad``); returns ``net``."""
    for p in net.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(net):
        p.requires_grad_(True)
    return net


def apply_lora(
    net: nn.Module,
    *,
    lora_type: LoRAType = "compositional",
    rank: int = 4,
    num_bases: int = 18,
    mlp: Sequence[int] = (128, 64),
    lora_only: bool = False,
    freeze_base: bool = False,
    time_range: tuple[float, float] | None = None,
    num_classes: int | None = None,
    scale: float = 1.0,
) -> nn.Module:
    """Wrap every attention projection of ``net`` with LoRA, in place; returns ``net``.

    ``net`` is a ``plpriv.nets.SongUNet`` (qkv and proj of every attention block; ``lora_only`` removes all
    ``affine`` scale/shift layers; the condition flows through the blocks) or a diffusers ``UNet2DModel``
    (``to_q``, ``to_k``, ``to_v``, ``to_out[0]`` of every attention; a forward pre-hook on the model and forward
    hooks on ``time_embedding``/``class_embedding`` capture the summed embedding, the timesteps and the class labels).

    ``lora_type``: ``"compositional"`` (``num_bases`` bases mixed by an MLP ``mlp`` of the embedding),
    ``"time"`` (``num_bases`` hat-interpolated anchors over ``time_range``; SongUNet default: EDM's noise-label range
    ``[ln(0.002)/4, ln(80)/4]``, diffusers default ``[0, 999]``), ``"class"`` (one adapter per class; ``num_classes``
    defaults to the model's label count, ``num_bases`` unused). ``freeze_base`` leaves only LoRA params trainable.
    """
    if lora_type not in ("compositional", "time", "class"):
        raise ValueError(f"lora_type must be 'compositional', 'time' or 'class', got {lora_type!r}")
    kwargs = dict(rank=rank, num_bases=num_bases, mlp=tuple(int(h) for h in mlp), scale=scale)

    from plpriv.nets.songunet import EDM_NOISE_LABEL_RANGE, SongUNet, UNetBlock

    if isinstance(net, SongUNet):
        if net.lora_type is not None:
            raise ValueError(f"this SongUNet already has LoRA ({net.lora_type!r}); apply_lora once per network")
        if lora_type == "class":
            num_classes = num_classes if num_classes is not None else net.label_dim
            if num_classes != net.label_dim or net.label_dim < 1:
                raise ValueError(f"ClassLoRA on SongUNet needs label_dim >= 1 and num_classes == label_dim, got "
                                 f"label_dim={net.label_dim}, num_classes={num_classes}")
        for block in net.modules():
            if isinstance(block, UNetBlock):
                if block.num_heads:
                    for attr in ("qkv", "proj"):
                        setattr(block, attr, _make_lora(
                            getattr(block, attr), lora_type, emb_dim=net.emb_channels,
                            time_range=time_range or EDM_NOISE_LABEL_RANGE, num_classes=num_classes, **kwargs))
                if lora_only:
                    block.affine = None
        net.lora_type = lora_type
    else:
        try:
            from diffusers import UNet2DModel
        except ImportError as err:  # pragma: no cover - diffusers is a dependency
            raise TypeError(f"apply_lora supports SongUNet and diffusers UNet2DModel, got {type(net).__name__}") from err
        if not isinstance(net, UNet2DModel):
            raise TypeError(f"apply_lora supports plpriv SongUNet and diffusers UNet2DModel, got {type(net).__name__}")
        _apply_lora_diffusers(net, lora_type, lora_only=lora_only, time_range=time_range, num_classes=num_classes,
                              **kwargs)
    if freeze_base:
        freeze_non_lora(net)
    return net


class _CaptureInputs:
    """Forward pre-hook (with kwargs) on a diffusers UNet: reset the context, record timesteps and class labels."""

    def __init__(self, ctx: LoRAContext) -> None:
        self.ctx = ctx

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.ctx.reset()
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        labels = args[2] if len(args) > 2 else kwargs.get("class_labels")
        if t is not None:  # broadcast like UNet2DModel.forward does
            t = torch.as_tensor(t, device=sample.device).reshape(-1)
            self.ctx.timesteps = t.expand(sample.shape[0]) if t.numel() == 1 else t
        self.ctx.class_labels = labels


class _CaptureEmbedding:
    """Forward hook on ``time_embedding`` (``add=False``) or ``class_embedding`` (``add=True``)."""

    def __init__(self, ctx: LoRAContext, add: bool) -> None:
        self.ctx = ctx
        self.add = add

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        if self.add and self.ctx.emb is not None:
            self.ctx.emb = self.ctx.emb + output.to(self.ctx.emb.dtype)
        else:
            self.ctx.emb = output


def _apply_lora_diffusers(
    unet: nn.Module, lora_type: str, *, lora_only: bool, time_range: tuple[float, float] | None,
    num_classes: int | None, **kwargs: Any,
) -> None:
    if lora_only:
        raise ValueError("lora_only is supported for SongUNet only: diffusers' ResnetBlock2D adds the raw embedding "
                         "when its time_emb_proj is removed")
    if getattr(unet, "_plpriv_lora_context", None) is not None:
        raise ValueError("this UNet2DModel already has LoRA; apply_lora once per network")
    emb_dim = unet.time_embedding.linear_2.out_features
    if lora_type == "time" and time_range is None:
        time_range = (0.0, float((unet.config.get("num_train_timesteps") or 1000) - 1))
    if lora_type == "class":
        num_classes = num_classes if num_classes is not None else unet.config.get("num_class_embeds")
        if not num_classes:
            raise ValueError("ClassLoRA on a UNet2DModel needs num_classes (or a model with num_class_embeds)")
    ctx = LoRAContext()
    wrapped = 0
    for module in list(unet.modules()):
        if all(hasattr(module, a) for a in ("to_q", "to_k", "to_v", "to_out")):
            for attr in ("to_q", "to_k", "to_v"):
                layer = getattr(module, attr)
                if isinstance(layer, nn.Linear):
                    setattr(module, attr, _make_lora(layer, lora_type, emb_dim=emb_dim, time_range=time_range,
                                                     num_classes=num_classes, **kwargs))
                    wrapped += 1
            if isinstance(module.to_out[0], nn.Linear):
                module.to_out[0] = _make_lora(module.to_out[0], lora_type, emb_dim=emb_dim, time_range=time_range,
                                              num_classes=num_classes, **kwargs)
                wrapped += 1
    if wrapped == 0:
        raise ValueError("found no attention projections (to_q/to_k/to_v/to_out[0]) to wrap in this UNet2DModel")
    for module in unet.modules():
        if isinstance(module, ConditionalLoRA):
            module.context = ctx
    unet._plpriv_lora_context = ctx  # plain attribute: deepcopy keeps it shared with the wrappers and hooks
    unet.register_forward_pre_hook(_CaptureInputs(ctx), with_kwargs=True)
    unet.time_embedding.register_forward_hook(_CaptureEmbedding(ctx, add=False))
    if getattr(unet, "class_embedding", None) is not None:
        unet.class_embedding.register_forward_hook(_CaptureEmbedding(ctx, add=True))
