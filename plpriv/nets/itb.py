"""Information transfer blocks (ITBs) on U-Net skip connections (LoyalDiffusion, Li et al., arXiv 2412.01118).

An ITB sits on a skip connection between encoder and decoder and limits how much low-level (memorisable) detail
reaches the decoder. The paper's ITB is a 3x3 conv C -> C; the authors' code also has conv+SiLU, stacked conv+SiLU, a
small encoder-decoder, max-pool+unpool and no skip at all. Here the learnable ones are written as zero-initialised
residuals ``s + f(s)`` (``f(s) = 0`` exactly at initialisation, so a network with ITBs computes exactly what the plain
network computes until the ITBs train; ``s + conv(s)`` is the paper's conv with a Dirac kernel added, the same function
class). ``"maxpool"`` and ``"none"`` have no parameters and change the function from the start.

ITBs are attached to an existing network by forward pre-hooks on the decoder blocks that take a skip (the skip is the
trailing channels of their concatenated input), so a plain network's parameter names are unchanged and its state dict
loads with ``strict=False`` (only ``itb.*`` keys are new). The hooks are bound methods of registered modules, so
``copy.deepcopy`` (an EMA copy) re-binds them to the copy. Each :class:`SkipITB` applies its block to the examples in
its ``mask`` (``None``: all), through ``torch.where``: the other examples' skips are passed on bit for bit, and every
layer always sees the whole batch (opacus per-sample gradients need the batch dimension intact).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ITB_KINDS", "SkipITB", "make_itb", "install_itbs", "install_itbs_diffusers", "itb_modules",
           "set_itb_mask", "sigma_from_timestep_fraction", "default_rau_levels"]

ITBKind = Literal["conv3x3", "conv_silu", "stacked", "mini_unet", "maxpool", "none"]
ITB_KINDS: tuple[str, ...] = ("conv3x3", "conv_silu", "stacked", "mini_unet", "maxpool", "none")


def _check_kind(itb: str) -> None:
    if itb not in ITB_KINDS:
        raise ValueError(f"unknown itb {itb!r}; choose one of {list(ITB_KINDS)}")


def _zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, 3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, 3, padding=1)
    nn.init.xavier_uniform_(conv.weight)  # EDM's init rule for inner convs (gain 1)
    nn.init.zeros_(conv.bias)
    return conv


class _Residual(nn.Module):
    """``s + f(s)`` with the last layer of ``f`` zero-initialised (exactly ``s`` at initialisation)."""

    def __init__(self, kind: str, channels: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "conv3x3":  # paper: one 3x3 conv C -> C
            self.conv = _zero_conv(channels)
        elif kind == "conv_silu":
            self.conv = _zero_conv(channels)
        elif kind == "stacked":  # conv+SiLU, conv
            self.conv_a, self.conv = _conv(channels), _zero_conv(channels)
        elif kind == "mini_unet":  # down (avg-pool 2) - conv+SiLU - conv - up (nearest)
            self.conv_a, self.conv = _conv(channels), _zero_conv(channels)
        else:
            raise ValueError(f"{kind!r} is not a residual ITB")

    def forward(self, s: Tensor) -> Tensor:
        if self.kind == "conv3x3":
            return s + self.conv(s)
        if self.kind == "conv_silu":
            return s + F.silu(self.conv(s))
        if self.kind == "stacked":
            return s + self.conv(F.silu(self.conv_a(s)))
        h = self.conv(F.silu(self.conv_a(F.avg_pool2d(s, 2))))
        return s + F.interpolate(h, size=s.shape[-2:], mode="nearest")

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class _MaxPoolUnpool(nn.Module):
    """Max-pool 2x2 then max-unpool: each 2x2 window keeps only its maximum (no parameters)."""

    def forward(self, s: Tensor) -> Tensor:
        pooled, idx = F.max_pool2d(s, 2, return_indices=True)
        return F.max_unpool2d(pooled, idx, 2, output_size=s.shape[-2:])


class _NoSkip(nn.Module):
    """Drop the skip: the decoder gets zeros in its place (no parameters)."""

    def forward(self, s: Tensor) -> Tensor:
        return torch.zeros_like(s)


def make_itb(itb: str, channels: int) -> nn.Module:
    """One ITB of kind ``itb`` for a skip tensor of ``channels`` channels."""
    _check_kind(itb)
    if itb == "maxpool":
        return _MaxPoolUnpool()
    if itb == "none":
        return _NoSkip()
    return _Residual(itb, channels)


class SkipITB(nn.Module):
    """An ITB on the trailing ``channels`` channels of a decoder block's first input, for the examples in ``mask``."""

    def __init__(self, itb: str, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.block = make_itb(itb, channels)
        self.mask: Tensor | None = None  # set per forward by a router (bool [B]); None: apply to every example

    def transfer(self, skip: Tensor) -> Tensor:
        mask = self.mask
        if mask is None:
            return self.block(skip)
        if mask.numel() != skip.shape[0]:
            raise ValueError(f"ITB mask has {mask.numel()} entries for a batch of {skip.shape[0]}")
        if not torch.is_grad_enabled() and not bool(mask.any()):
            return skip  # sampling step below the threshold: the plain network's tensor, no ITB cost
        return torch.where(mask.to(skip.device).view(-1, 1, 1, 1), self.block(skip), skip)

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        split = x.shape[1] - self.channels
        skip = self.transfer(x[:, split:])
        return (torch.cat([x[:, :split], skip], dim=1), *args[1:])


def default_rau_levels(num_levels: int) -> list[int]:
    """The deeper half of the resolution levels (paper: SC3/SC4 of SD 2.1's four levels)."""
    return list(range(num_levels // 2, num_levels))


def _check_levels(levels: Sequence[int] | None, num_levels: int) -> list[int]:
    levels = default_rau_levels(num_levels) if levels is None else sorted({int(v) for v in levels})
    bad = [v for v in levels if not 0 <= v < num_levels]
    if bad or not levels:
        raise ValueError(f"rau_levels {levels} must be non-empty resolution levels in 0..{num_levels - 1} "
                         "(0 = full resolution, the deepest last)")
    return levels


def install_itbs(net: nn.Module, rau_levels: Sequence[int] | None = None, itb: str = "conv3x3",
                 requires_grad: bool = True) -> nn.ModuleDict:
    """Attach ITBs to every skip connection of a :class:`plpriv.nets.SongUNet` whose decoder level is in
    ``rau_levels`` (0 = full resolution). Registers them as ``net.itb`` and returns it."""
    from plpriv.nets.songunet import SongUNet

    _check_kind(itb)
    if not isinstance(net, SongUNet):
        raise TypeError(f"install_itbs needs a plpriv.nets.SongUNet, got {type(net).__name__}; for a diffusers "
                        "UNet2DModel use install_itbs_diffusers")
    if hasattr(net, "itb"):
        raise ValueError(f"{type(net).__name__} already has ITBs (net.itb)")
    resolutions = sorted({int(name.split("x")[0]) for name in net.enc}, reverse=True)
    num_levels = len(resolutions)
    levels = _check_levels(rau_levels, num_levels)
    skips = [m.out_channels for m in net.enc.values()]
    itbs = nn.ModuleDict()
    for name in net.dec:  # decoder order pops skips from the end (SongUNet.forward)
        if name not in net._concat:
            continue
        channels = skips.pop()
        res = int(name.split("x")[0])
        if resolutions.index(res) not in levels:
            continue
        if itb in ("maxpool", "mini_unet") and res % 2:
            raise ValueError(f"itb={itb!r} pools by 2 but the skip at {res}x{res} is odd: use another rau_levels")
        itbs[name] = SkipITB(itb, channels)
    net.itb = itbs
    for name, skip_itb in itbs.items():
        net.dec[name].register_forward_pre_hook(skip_itb.pre_hook)
    itbs.requires_grad_(requires_grad)
    return itbs


def itb_modules(net: nn.Module) -> list[SkipITB]:
    """All :class:`SkipITB` inside ``net``."""
    return [m for m in net.modules() if isinstance(m, SkipITB)]


def set_itb_mask(net: nn.Module, mask: Tensor | None) -> None:
    """Route: apply every ITB in ``net`` only to the examples in ``mask`` (bool ``[B]``; ``None``: all)."""
    for m in itb_modules(net):
        m.mask = mask


def sigma_from_timestep_fraction(fraction: float, schedule: Literal["linear", "scaled_linear"] = "linear",
                                 num_timesteps: int = 1000) -> float:
    """EDM sigma of DDPM timestep ``t = round(fraction * T)`` (0-indexed, as diffusers' ``alphas_cumprod[t]``).

    VP -> VE (EDM, Karras et al. 2022, Table 1 / Song et al. 2021): ``sigma_t = sqrt((1 - abar_t) / abar_t)``, with
    ``abar_t = prod_{i <= t} (1 - beta_i)``. ``"linear"``: Ho et al. 2020, beta in linspace(1e-4, 0.02, T)
    (t = 500 of 1000 -> sigma 3.44); ``"scaled_linear"``: Stable Diffusion, beta = linspace(sqrt(0.00085),
    sqrt(0.012), T)^2 (t = 500 -> sigma 1.62).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"timestep fraction must be in (0, 1) (the paper's 500 of 1000 is 0.5), got {fraction!r}")
    if schedule == "linear":
        betas = torch.linspace(1e-4, 0.02, num_timesteps, dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, num_timesteps, dtype=torch.float64) ** 2
    else:
        raise ValueError(f"schedule must be 'linear' or 'scaled_linear', got {schedule!r}")
    abar = torch.cumprod(1.0 - betas, 0)[min(round(fraction * num_timesteps), num_timesteps - 1)]
    return float(((1.0 - abar) / abar).sqrt())  # VP -> VE sigma (EDM Table 1)


class _DiffusersUpHook(nn.Module):
    """ITBs on the ``res_hidden_states_tuple`` (second positional argument) of one diffusers up block."""

    def __init__(self, itb: str, channels: Sequence[int]) -> None:
        super().__init__()
        self.skips = nn.ModuleList(SkipITB(itb, c) for c in channels)

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        # UNet2DModel passes the skips positionally, UNet2DConditionModel as `res_hidden_states_tuple=`.
        keyword = "res_hidden_states_tuple" in kwargs
        res = tuple(kwargs["res_hidden_states_tuple"] if keyword else args[1])
        if len(res) != len(self.skips):
            raise ValueError(f"up block got {len(res)} skip tensors, ITBs were built for {len(self.skips)}")
        res = tuple(s.transfer(r) for s, r in zip(self.skips, res))
        if keyword:
            return args, {**kwargs, "res_hidden_states_tuple": res}
        return (args[0], res, *args[2:]), kwargs


def install_itbs_diffusers(unet: nn.Module, rau_levels: Sequence[int] | None = None, itb: str = "conv3x3",
                           requires_grad: bool = True) -> nn.ModuleDict:
    """The same for a diffusers ``UNet2DModel`` or ``UNet2DConditionModel`` (Stable Diffusion; skips reach the up
    blocks positionally or as ``res_hidden_states_tuple=``):
    ITBs on every skip tensor handed to the up blocks of the chosen levels (0 = full resolution). Registered as
    ``unet.itb`` (a ``ModuleDict`` keyed by up-block index, 0 = deepest), identity at initialisation; examples are
    selected by :func:`set_itb_mask` as for a SongUNet (tested on tiny diffusers models)."""
    _check_kind(itb)
    config = getattr(unet, "config", None)
    if config is None or not hasattr(unet, "up_blocks"):
        raise TypeError(f"install_itbs_diffusers needs a diffusers UNet2DModel, got {type(unet).__name__}")
    boc, lpb = list(config.block_out_channels), int(config.layers_per_block)
    n = len(boc)
    levels = _check_levels(rau_levels, n)
    # diffusers' down path keeps conv_in's output, each resnet's output and each downsampler's output.
    flat = [boc[0]]
    for level, c in enumerate(boc):
        flat += [c] * lpb + ([c] if level != n - 1 else [])
    hooks = nn.ModuleDict()
    for i, block in enumerate(unet.up_blocks):
        count = len(block.resnets)
        channels, flat = flat[-count:], flat[:-count]
        level = n - 1 - i
        if level in levels:
            hooks[str(i)] = _DiffusersUpHook(itb, channels)
            block.register_forward_pre_hook(hooks[str(i)].pre_hook, with_kwargs=True)
    unet.itb = hooks
    hooks.requires_grad_(requires_grad)
    return hooks
