"""Sensor RAW from RGB ("unprocessing", Brooks et al., CVPR 2019) and a matching simple ISP, on batched tensors.

``unprocess`` turns sRGB ``[N, 3, H, W]`` in ``[0, 1]`` into packed RGGB RAW ``[N, 4, H/2, W/2]`` (planes R, Gr, Gb,
B) with per-image random colour correction, white balance and shot/read noise, plus sensor options (black/white
level, ADC bit depth, binning for an always-on low-resolution mode). ``process`` (white balance, demosaic, CCM,
gamma, tone map) inverts it, for visual checks. Everything is deterministic under a ``torch.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# XYZ -> camera matrices of four cameras, the constants of Brooks et al. 2019's public reference (Sec. 3.3)
XYZ2CAMS = torch.tensor(
    [
        [[1.0234, -0.2969, -0.2266], [-0.5625, 1.6328, -0.0469], [-0.0703, 0.2188, 0.6406]],
        [[0.4913, -0.0541, -0.0202], [-0.6130, 1.3513, 0.2906], [-0.1564, 0.2151, 0.7183]],
        [[0.8380, -0.2630, -0.0639], [-0.2887, 1.0725, 0.2496], [-0.0627, 0.1427, 0.5438]],
        [[0.6596, -0.2079, -0.0562], [-0.4782, 1.3016, 0.1933], [-0.0970, 0.1581, 0.5181]],
    ]
)
# linear sRGB -> XYZ (D65), IEC 61966-2-1
RGB2XYZ = torch.tensor(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)


@dataclass
class RawMetadata:
    """Per-image parameters of one ``unprocess`` call (batch-first tensors), what ``process`` needs to invert it."""

    rgb2cam: Tensor  # [N, 3, 3]
    red_gain: Tensor  # [N]
    blue_gain: Tensor  # [N]
    rgb_gain: Tensor  # [N]
    shot_noise: Tensor  # [N]
    read_noise: Tensor  # [N]

    @property
    def cam2rgb(self) -> Tensor:
        return torch.linalg.inv(self.rgb2cam)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator | None) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def inverse_smoothstep(y: Tensor) -> Tensor:
    y = y.clamp(0.0, 1.0)
    return 0.5 - torch.sin(torch.asin(1.0 - 2.0 * y) / 3.0)  # Brooks et al. 2019, Sec. 3.1: inverse tone map


def smoothstep(x: Tensor) -> Tensor:
    return 3.0 * x**2 - 2.0 * x**3  # Brooks et al. 2019, Sec. 3.1: global tone curve


def gamma_expansion(x: Tensor) -> Tensor:
    return x.clamp_min(1e-8) ** 2.2  # Brooks et al. 2019, Sec. 3.2: inverse gamma


def gamma_compression(x: Tensor) -> Tensor:
    return x.clamp_min(1e-8) ** (1.0 / 2.2)  # Brooks et al. 2019, Sec. 3.2: gamma


def random_ccm(n: int, generator: torch.Generator | None = None) -> Tensor:
    """``[n, 3, 3]`` sRGB -> camera matrices: a random convex combination of ``XYZ2CAMS`` @ ``RGB2XYZ``, rows sum 1."""
    weights = _uniform(n * 4, 1e-8, 1.0, generator).view(n, 4, 1, 1)
    xyz2cam = (weights * XYZ2CAMS).sum(1) / weights.sum(1)  # Brooks et al. 2019, Sec. 3.3: convex combination
    rgb2cam = xyz2cam @ RGB2XYZ
    return rgb2cam / rgb2cam.sum(-1, keepdim=True)  # Brooks et al. 2019, Sec. 3.3: rows normalised to sum 1


def random_gains(n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(rgb_gain, red_gain, blue_gain)``: rgb_gain = 1 / N(0.8, 0.1), red ~ U(1.9, 2.4), blue ~ U(1.5, 1.9)."""
    rgb_gain = 1.0 / (0.8 + 0.1 * torch.randn(n, generator=generator))  # Brooks et al. 2019, Sec. 3.4: brightness
    return rgb_gain, _uniform(n, 1.9, 2.4, generator), _uniform(n, 1.5, 1.9, generator)


def safe_invert_gains(image: Tensor, rgb_gain: Tensor, red_gain: Tensor, blue_gain: Tensor) -> Tensor:
    """Inverse white balance and brightness on ``[N, 3, H, W]``, damped near white so highlights are not darkened."""
    ones = torch.ones_like(red_gain)
    gains = (torch.stack([1.0 / red_gain, ones, 1.0 / blue_gain], 1) / rgb_gain[:, None]).view(-1, 3, 1, 1)
    gray = image.mean(1, keepdim=True)
    mask = (torch.clamp(gray - 0.9, min=0.0) / 0.1) ** 2  # Brooks et al. 2019, Sec. 3.4: highlight mask
    safe = torch.maximum(mask + (1.0 - mask) * gains, gains)  # Brooks et al. 2019, Sec. 3.4: safe gains
    return image * safe


def apply_ccm(image: Tensor, ccm: Tensor) -> Tensor:
    """``out[n, i] = sum_j ccm[n, i, j] * image[n, j]`` on ``[N, 3, H, W]``."""
    return torch.einsum("nij,njhw->nihw", ccm, image)


def mosaic(image: Tensor) -> Tensor:
    """RGGB Bayer sampling of ``[N, 3, H, W]`` (H, W even) into packed planes ``[N, 4, H/2, W/2]`` (R, Gr, Gb, B)."""
    if image.shape[-1] % 2 or image.shape[-2] % 2:
        raise ValueError(f"mosaic needs even height and width, got {tuple(image.shape[-2:])}: crop or resize first")
    r = image[:, 0, 0::2, 0::2]
    gr = image[:, 1, 0::2, 1::2]
    gb = image[:, 1, 1::2, 0::2]
    b = image[:, 2, 1::2, 1::2]
    return torch.stack([r, gr, gb, b], 1)


def random_noise_levels(n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``(shot, read)``: log shot ~ U(log 1e-4, log 0.012); log read = 2.18 log shot + 1.20 + N(0, 0.26)."""
    log_shot = _uniform(n, math.log(1e-4), math.log(0.012), generator)
    log_read = 2.18 * log_shot + 1.20 + 0.26 * torch.randn(n, generator=generator)  # Brooks et al. 2019, Sec. 3.6
    return log_shot.exp(), log_read.exp()


def add_noise(raw: Tensor, shot: Tensor, read: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Heteroscedastic Gaussian noise: raw + N(0, raw * shot + read), per image ``shot``/``read`` of shape [N]."""
    shape = (-1,) + (1,) * (raw.ndim - 1)
    variance = raw.clamp_min(0.0) * shot.view(shape) + read.view(shape)  # Brooks et al. 2019, Sec. 3.6, Eq. 1
    return raw + variance.sqrt() * torch.randn(raw.shape, generator=generator, dtype=raw.dtype)


def quantize_adc(raw: Tensor, black_level: float, white_level: float, bit_depth: int | None) -> Tensor:
    """Map [0, 1] to ADC codes ``black + x (white - black)``, round and clip to ``bit_depth`` bits, and back to [0, 1]."""
    if bit_depth is None:
        return raw
    codes = torch.round(black_level + raw * (white_level - black_level)).clamp(0, 2**bit_depth - 1)
    return (codes - black_level) / (white_level - black_level)  # black-level subtraction and normalisation


def bin_planes(raw: Tensor, factor: int) -> Tensor:
    """``factor x factor`` binning of each colour plane (same-colour pixels averaged): the low-resolution mode."""
    return raw if factor == 1 else F.avg_pool2d(raw, factor)


def unprocess(
    image: Tensor,
    generator: torch.Generator | None = None,
    noise: bool = True,
    black_level: float = 64.0,
    bit_depth: int | None = 10,
    white_level: float | None = None,
    binning: int = 1,
    shot_noise: float | None = None,
    read_noise: float | None = None,
) -> tuple[Tensor, RawMetadata]:
    """sRGB ``[N, 3, H, W]`` in [0, 1] -> packed RAW ``[N, 4, H / (2 binning), W / (2 binning)]`` in [0, 1] and metadata.

    Args:
        image: sRGB batch (a single ``[3, H, W]`` image is also accepted).
        generator: seeds colour matrices, gains and noise.
        noise: add shot/read noise (random levels per image unless ``shot_noise``/``read_noise`` fix them).
        black_level, white_level, bit_depth: the ADC; ``bit_depth=None`` keeps floats. White defaults to 2^bits - 1.
        binning: same-colour binning factor after noise (always-on low-resolution readout).
    """
    if not isinstance(image, Tensor) or image.ndim not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"`image` must be an RGB tensor [N, 3, H, W], got {getattr(image, 'shape', type(image))}")
    if not isinstance(binning, int) or binning < 1:
        raise ValueError(f"`binning` must be an int >= 1, got {binning!r}")
    if bit_depth is not None and not 1 <= bit_depth <= 16:
        raise ValueError(f"`bit_depth` must be in 1..16 or None, got {bit_depth!r}")
    squeeze = image.ndim == 3
    x = (image[None] if squeeze else image).float()
    n = x.shape[0]
    white = float(2**bit_depth - 1) if (white_level is None and bit_depth is not None) else (white_level or 1.0)
    if bit_depth is not None and not 0 <= black_level < white:
        raise ValueError(f"`black_level` must be in [0, white_level={white}), got {black_level!r}")
    rgb2cam = random_ccm(n, generator)
    rgb_gain, red_gain, blue_gain = random_gains(n, generator)
    shot, read = random_noise_levels(n, generator)
    if shot_noise is not None:
        shot = torch.full((n,), float(shot_noise))
    if read_noise is not None:
        read = torch.full((n,), float(read_noise))
    x = gamma_expansion(inverse_smoothstep(x))
    x = apply_ccm(x, rgb2cam)
    x = safe_invert_gains(x, rgb_gain, red_gain, blue_gain).clamp(0.0, 1.0)
    raw = mosaic(x)
    if noise:
        raw = add_noise(raw, shot, read, generator)
    raw = quantize_adc(raw.clamp(0.0, 1.0), black_level, white, bit_depth).clamp(0.0, 1.0)
    if raw.shape[-1] % binning or raw.shape[-2] % binning:
        raise ValueError(f"RAW planes {tuple(raw.shape[-2:])} are not divisible by `binning`={binning}")
    raw = bin_planes(raw, binning)
    meta = RawMetadata(rgb2cam, red_gain, blue_gain, rgb_gain, shot, read)
    return (raw[0] if squeeze else raw), meta


def demosaic(raw: Tensor, mode: str = "bilinear") -> Tensor:
    """Packed ``[N, 4, h, w]`` -> ``[N, 3, 2h, 2w]``: each plane upsampled 2x (the two greens averaged)."""
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"`mode` must be 'bilinear' or 'nearest', got {mode!r}")
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    up = F.interpolate(raw, scale_factor=2, mode=mode, **kwargs)
    return torch.stack([up[:, 0], 0.5 * (up[:, 1] + up[:, 2]), up[:, 3]], 1)


def process(raw: Tensor, meta: RawMetadata, demosaic_mode: str = "bilinear") -> Tensor:
    """The simple ISP: white balance and brightness, demosaic, camera -> sRGB, gamma, tone map; sRGB in [0, 1]."""
    squeeze = raw.ndim == 3
    x = raw[None] if squeeze else raw
    gains = torch.stack([meta.red_gain, torch.ones_like(meta.red_gain), torch.ones_like(meta.red_gain), meta.blue_gain], 1)
    x = (x * (gains * meta.rgb_gain[:, None]).view(-1, 4, 1, 1)).clamp(0.0, 1.0)  # white balance + brightness
    x = apply_ccm(demosaic(x, demosaic_mode), meta.cam2rgb).clamp(0.0, 1.0)
    x = smoothstep(gamma_compression(x)).clamp(0.0, 1.0)
    return x[0] if squeeze else x


def raw_preview(raw: Tensor) -> Tensor:
    """A quick grey view of packed RAW ``[N, 4, h, w]`` -> ``[N, 3, h, w]`` in [0, 1] (mean plane, auto exposure, gamma)."""
    grey = raw.mean(1, keepdim=True)
    grey = grey / grey.flatten(1).quantile(0.99, dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)
    return gamma_compression(grey.clamp(0.0, 1.0)).expand(-1, 3, -1, -1)
