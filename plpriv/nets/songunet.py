"""DDPM++ U-Net ("SongUNet") as configured by EDM for CIFAR-10.

Karras, Aittala, Aila, Laine, "Elucidating the Design Space of Diffusion-Based Generative Models", NeurIPS 2022,
after Song et al., "Score-Based Generative Modeling through SDEs", ICLR 2021 (DDPM++). Written from the published
description (EDM's code is CC BY-NC-SA and is not copied here). Parameter names and shapes follow EDM's layout
(``map_layer0``, ``enc['16x16_block0'].qkv`` ...); EDM state dicts additionally hold ``*.resample_filter`` buffers of
the resampling convs, which must be dropped before ``load_state_dict`` (not tested against a released checkpoint).
Attention uses ``F.scaled_dot_product_attention`` (EDM forces an fp32 softmax; SDPA's fused kernels accumulate the
softmax in fp32 under bf16 autocast as well).

Why not timm/diffusers blocks: EDM's exact layout (GroupNorm with ``min(32, C // 4)`` groups and eps 1e-6, additive
embedding shift, skip scale sqrt(1/2), 1x1 resampling skip projection, xavier-uniform init with per-layer gains,
single-head attention with q/k/v interleaved per channel in the qkv output, [sin, cos] embedding with
``endpoint=True``) matches neither diffusers' ``ResnetBlock2D``/``Attention`` nor timm's blocks, and the parameter
counts (55,733,891 for CIFAR-10) only come out exact with this layout. Every parametrised submodule is a plain
``nn.Conv2d``/``nn.Linear``/``nn.GroupNorm`` so opacus computes per-sample gradients with its fast grad samplers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from plpriv.nets.lora import ConditionalLoRA

__all__ = ["PositionalEmbedding", "Resample", "UNetBlock", "SongUNet", "edm_group_norm"]

# EDM's mapping of sigma to the noise label is c_noise = ln(sigma) / 4; its sampler spans sigma in [0.002, 80].
EDM_NOISE_LABEL_RANGE: tuple[float, float] = (math.log(0.002) / 4, math.log(80.0) / 4)


def edm_group_norm(num_channels: int, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with EDM's group rule: 32 groups, but at least 4 channels per group."""
    return nn.GroupNorm(num_groups=max(1, min(32, num_channels // 4)), num_channels=num_channels, eps=eps)


def _xavier_(layer: nn.Conv2d | nn.Linear, init_weight: float) -> nn.Conv2d | nn.Linear:
    # EDM: w = sqrt(6 / (fan_in + fan_out)) * U(-1, 1) * init_weight, fans include the kernel area; biases zero.
    # torch's xavier_uniform_ uses the same fans, and `gain` scales the bound, i.e. multiplies the weight.
    nn.init.xavier_uniform_(layer.weight, gain=init_weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _conv(cin: int, cout: int, kernel: int, init_weight: float = 1.0) -> nn.Conv2d:
    return _xavier_(nn.Conv2d(cin, cout, kernel, padding=kernel // 2), init_weight)  # type: ignore[return-value]


def _linear(cin: int, cout: int, bias: bool = True, init_weight: float = 1.0) -> nn.Linear:
    return _xavier_(nn.Linear(cin, cout, bias=bias), init_weight)  # type: ignore[return-value]


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class PositionalEmbedding(nn.Module):
    """Sinusoidal noise-level embedding, returned as ``[sin(x f), cos(x f)]``.

    ``f_i = (1 / max_positions) ** (i / (n/2 - 1))`` with ``endpoint=True`` (EDM's DDPM++ setting; ``endpoint=False``
    divides by ``n/2``). EDM builds ``[cos, sin]`` and then swaps the halves in ``SongUNet.forward``; this module returns
    the swapped order directly. Equals diffusers' ``get_timestep_embedding(x, n, flip_sin_to_cos=False,
    downscale_freq_shift=1)`` up to rounding (written here to keep EDM's ``pow`` form of the frequencies).
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = True) -> None:
        super().__init__()
        if num_channels < 4 or num_channels % 2:
            raise ValueError(f"num_channels must be even and >= 4, got {num_channels}")
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1.0 / self.max_positions) ** freqs
        x = torch.outer(x.reshape(-1), freqs.to(x.dtype))
        return torch.cat([x.sin(), x.cos()], dim=1)


class Resample(nn.Module):
    """Up- or downsampling by 2 with a separable FIR filter (EDM's ``resample_filter``), no parameters.

    down: depthwise conv with ``f f^T / sum(f)^2``, stride 2; up: depthwise transposed conv with ``4 f f^T / sum(f)^2``,
    stride 2. For the DDPM++ filter ``[1, 1]`` these are exactly 2x2 average pooling and nearest-neighbour upsampling,
    which are used as fast paths (channels-last friendly, no tiled filter per channel).
    """

    def __init__(self, mode: Literal["up", "down"], resample_filter: Sequence[float] = (1, 1)) -> None:
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"mode must be 'up' or 'down', got {mode!r}")
        taps = [float(v) for v in resample_filter]
        if not taps or sum(taps) == 0.0:
            raise ValueError(f"resample_filter must be a non-empty 1-d filter with non-zero sum, got {resample_filter}")
        self.mode = mode
        self.box = len(taps) == 2 and taps[0] == taps[1]
        f = torch.tensor(taps, dtype=torch.float32)
        self.register_buffer("filter", torch.outer(f, f) / f.sum().square(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.box:
            if self.mode == "down":
                return F.avg_pool2d(x, 2)
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        c = x.shape[1]
        f = self.filter.to(x.dtype)
        pad = (f.shape[-1] - 1) // 2
        if self.mode == "down":
            return F.conv2d(x, f.tile(c, 1, 1, 1), groups=c, stride=2, padding=pad)
        return F.conv_transpose2d(x, (f * 4).tile(c, 1, 1, 1), groups=c, stride=2, padding=pad)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, filter={tuple(self.filter.shape)}"


class UNetBlock(nn.Module):
    """DDPM++ residual block with optional resampling and single-head self-attention (EDM's ``UNetBlock``).

    GroupNorm - SiLU - [resample] - conv3x3, + ``affine(emb)`` as an additive shift (no scale in DDPM++),
    GroupNorm - SiLU - dropout - conv3x3 (init gain 1e-5), + skip ([resample] - conv1x1 when the shape changes),
    times ``skip_scale``. With attention: qkv = conv1x1(GroupNorm(x)), softmax(q^T k / sqrt(C)) attention,
    x = (proj(a) + x) * skip_scale with ``proj`` initialised ~0. ``affine`` is ``None`` in LoRA-only networks.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int = 1,
        dropout: float = 0.0,
        skip_scale: float = math.sqrt(0.5),
        eps: float = 1e-6,
        resample_filter: Sequence[float] = (1, 1),
        init_weight_zero: float = 1e-5,
        init_weight_attn: float = math.sqrt(0.2),
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("a UNetBlock resamples either up or down, got up=True and down=True")
        if attention and out_channels % num_heads:
            raise ValueError(f"out_channels={out_channels} is not divisible by num_heads={num_heads}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_heads = num_heads if attention else 0
        self.skip_scale = skip_scale

        self.norm0 = edm_group_norm(in_channels, eps)
        self.resample = Resample("up" if up else "down", resample_filter) if (up or down) else None
        self.conv0 = _conv(in_channels, out_channels, 3)
        self.affine: nn.Linear | None = _linear(emb_channels, out_channels)
        self.norm1 = edm_group_norm(out_channels, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _conv(out_channels, out_channels, 3, init_weight=init_weight_zero)
        # EDM with resample_proj=True: 1x1 projection whenever channels or resolution change.
        self.skip = _conv(in_channels, out_channels, 1) if (in_channels != out_channels or up or down) else None
        if self.num_heads:
            self.norm2 = edm_group_norm(out_channels, eps)
            self.qkv: nn.Module = _conv(out_channels, out_channels * 3, 1, init_weight=init_weight_attn)
            self.proj: nn.Module = _conv(out_channels, out_channels, 1, init_weight=init_weight_zero)

    def _project(self, layer: nn.Module, x: torch.Tensor, lora_cond: torch.Tensor | None) -> torch.Tensor:
        return layer(x, lora_cond) if isinstance(layer, ConditionalLoRA) else layer(x)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, lora_cond: torch.Tensor | None = None) -> torch.Tensor:
        """``lora_cond`` is what LoRA-wrapped qkv/proj layers mix their bases from (defaults to ``emb``)."""
        orig = x
        h = F.silu(self.norm0(x))
        if self.resample is not None:
            h = self.resample(h)
        h = self.conv0(h)
        if self.affine is not None:
            h = h + self.affine(emb).to(h.dtype)[:, :, None, None]
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        if self.resample is not None:
            orig = self.resample(orig)
        if self.skip is not None:
            orig = self.skip(orig)
        x = (h + orig).mul_(self.skip_scale)  # in place on a fresh sum only (never on a module output)

        if self.num_heads:
            cond = emb if lora_cond is None else lora_cond
            b, c, hh, ww = x.shape
            qkv = self._project(self.qkv, self.norm2(x), cond)
            # EDM layout: output channel (head, channel-in-head, {q,k,v}); tokens are the H*W positions.
            q, k, v = qkv.reshape(b * self.num_heads, c // self.num_heads, 3, hh * ww).unbind(2)
            # a[n, :, i] = sum_j softmax_j(q_i . k_j / sqrt(c_head)) v[n, :, j]   (SDPA scales by 1/sqrt(c_head)).
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            # Back to x's memory format: the plain reshape would be a channels-last view, which opacus' conv grad
            # sampler (unfold via as_strided, opacus 1.6) silently misreads as NCHW.
            a = a.transpose(1, 2).reshape(b, c, hh, ww).contiguous(memory_format=_memory_format(x))
            x = (self._project(self.proj, a, cond) + x).mul_(self.skip_scale)
        return x


class SongUNet(nn.Module):
    """DDPM++ U-Net of EDM (``SongUNet`` with positional embedding, standard encoder/decoder, filter [1, 1]).

    ``SongUNet(32, 3, 3, augment_dim=9)`` is EDM's CIFAR-10 network (55,733,891 parameters; 55,735,299 with
    ``label_dim=10``). Forward: ``net(x, noise_labels, class_labels, augment_labels=None)`` with ``noise_labels`` of
    shape ``(B,)`` (EDM's c_noise = ln(sigma)/4), ``class_labels`` one-hot ``(B, label_dim)`` floats, integer labels
    ``(B,)`` or ``None`` (zeros: unconditional), ``augment_labels`` ``(B, augment_dim)`` or ``None``.

    LoRA conditioning of attention (Choi et al., TMLR 2024), switched on by flags so a YAML recipe can enable it:
    ``use_lora`` wraps every attention qkv/proj 1x1 conv with a LoRA adapter of type ``lora_type``:
    ``"compositional"`` (mixing weights from an MLP ``lora_mlp`` of the 4*model_channels embedding; ``lora_bases``
    bases of rank ``lora_rank``), ``"time"`` (``lora_bases`` hat-interpolated anchors over ``lora_time_range`` of the
    noise label) or ``"class"`` (one adapter per class; needs ``label_dim > 0``, ``lora_bases`` unused).
    ``lora_only`` removes the scale/shift ``affine`` layers of all blocks; ``freeze_base`` leaves only LoRA
    parameters trainable. The base weights are drawn before the LoRA ones, so for a fixed seed the base equals the
    network built with ``use_lora=False``, and at initialisation the outputs agree bit for bit.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.13,
        label_dropout: float = 0.0,
        channel_mult_noise: int = 1,
        resample_filter: Sequence[float] = (1, 1),
        use_lora: bool = False,
        lora_type: Literal["compositional", "time", "class"] = "compositional",
        lora_rank: int = 4,
        lora_bases: int = 18,
        lora_mlp: Sequence[int] = (128, 64),
        lora_only: bool = False,
        freeze_base: bool = False,
        lora_time_range: tuple[float, float] = EDM_NOISE_LABEL_RANGE,
    ) -> None:
        super().__init__()
        for name, value in (("img_resolution", img_resolution), ("in_channels", in_channels),
                            ("out_channels", out_channels), ("model_channels", model_channels),
                            ("num_blocks", num_blocks)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if label_dim < 0 or augment_dim < 0:
            raise ValueError(f"label_dim and augment_dim must be >= 0, got {label_dim} and {augment_dim}")
        channel_mult = [int(m) for m in channel_mult]
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty list of positive integers, got {channel_mult}")
        if img_resolution % (2 ** (len(channel_mult) - 1)):
            raise ValueError(
                f"img_resolution={img_resolution} must be divisible by 2**(len(channel_mult)-1)="
                f"{2 ** (len(channel_mult) - 1)}; use fewer levels in channel_mult or a larger resolution"
            )
        if not 0.0 <= dropout < 1.0 or not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"dropout and label_dropout must be in [0, 1), got {dropout} and {label_dropout}")
        if (lora_only or freeze_base) and not use_lora:
            raise ValueError("lora_only and freeze_base need use_lora=True (otherwise nothing conditions or trains)")

        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        self.emb_channels = emb_channels
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                            eps=1e-6, resample_filter=resample_filter)

        # Mapping: noise embedding (+ class label + augment label) -> 2-layer MLP -> emb (B, emb_channels).
        self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        self.map_label = _linear(label_dim, noise_channels) if label_dim else None
        self.map_augment = _linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = _linear(noise_channels, emb_channels)
        self.map_layer1 = _linear(emb_channels, emb_channels)

        # Encoder ("standard"): every module's output is kept as a skip connection.
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = _conv(cin, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=res in attn_resolutions, **block_kwargs)
        skips = [m.out_channels for m in self.enc.values()]

        # Decoder ("standard"); blocks named in `_concat` take the next skip concatenated to their input.
        self.dec = nn.ModuleDict()
        concat: list[str] = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                name = f"{res}x{res}_block{idx}"
                self.dec[name] = UNetBlock(
                    cin, cout, attention=(idx == num_blocks and res in attn_resolutions), **block_kwargs)
                concat.append(name)
        self._concat = frozenset(concat)
        res = img_resolution
        self.dec[f"{res}x{res}_aux_norm"] = edm_group_norm(cout, eps=1e-6)
        self.dec[f"{res}x{res}_aux_conv"] = _conv(cout, out_channels, 3, init_weight=1e-5)

        self.lora_type: str | None = None  # set by plpriv.nets.lora.apply_lora
        if use_lora:
            from plpriv.nets.lora import apply_lora

            apply_lora(self, lora_type=lora_type, rank=lora_rank, num_bases=lora_bases, mlp=lora_mlp,
                       lora_only=lora_only, freeze_base=freeze_base, time_range=lora_time_range)

    def _class_one_hot(self, class_labels: torch.Tensor | None, batch: int, like: torch.Tensor) -> torch.Tensor:
        if class_labels is None:
            return torch.zeros(batch, self.label_dim, dtype=like.dtype, device=like.device)
        if not class_labels.is_floating_point():
            if class_labels.ndim != 1:
                raise ValueError(f"integer class_labels must have shape (B,), got {tuple(class_labels.shape)}")
            return F.one_hot(class_labels.long(), self.label_dim).to(like.dtype)
        return class_labels.reshape(-1, self.label_dim).to(like.dtype)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch = x.shape[0]
        noise_labels = noise_labels.reshape(-1)
        if noise_labels.numel() == 1 and batch != 1:
            noise_labels = noise_labels.expand(batch)
        emb = self.map_noise(noise_labels)
        labels = None
        if self.map_label is not None:
            labels = self._class_one_hot(class_labels, batch, emb)
            if self.training and self.label_dropout:
                keep = torch.rand(batch, 1, device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        lora_cond: torch.Tensor | None = None  # compositional LoRA (and no LoRA): the embedding itself
        if self.lora_type == "time":
            lora_cond = noise_labels
        elif self.lora_type == "class":
            lora_cond = labels

        skips = []
        for block in self.enc.values():
            x = block(x, emb, lora_cond) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        out = x
        for name, block in self.dec.items():
            if name.endswith("_aux_norm"):
                out = block(x)
            elif name.endswith("_aux_conv"):
                out = block(F.silu(out))
            else:
                if name in self._concat:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb, lora_cond)
        return out
