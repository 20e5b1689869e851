"""Small reward networks for censored sampling (Yoon et al., NeurIPS 2023): logits of "benign" (label 1).

The paper's time-dependent reward is guided-diffusion's ``EncoderUNetModel`` (width 128, attention pooling) for
32x32 MNIST; at plpriv's 8x8 digits a three-convolution encoder is enough and trains in seconds on a CPU. The noise
level enters as EDM's network input ``c_noise = ln(sigma) / 4`` (Karras et al. 2022, Table 1) through a sinusoidal
embedding and per-block channel shifts (as DDPM++'s ``emb`` does), and the image is scaled by EDM's
``c_in = 1 / sqrt(sigma^2 + sigma_data^2)`` so the convolutions see unit-variance input at every noise level.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from plpriv.nets.songunet import PositionalEmbedding

__all__ = ["ImageReward", "NoisyImageReward", "c_noise"]


def c_noise(sigma: Tensor) -> Tensor:
    """EDM's noise conditioning input ``c_noise(sigma) = ln(sigma) / 4`` (Table 1)."""
    return sigma.log() / 4


def _as_sigma(sigma: Tensor | float | None, batch: int, default: float, device: torch.device) -> Tensor:
    if sigma is None:
        sigma = default
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device).reshape(-1)
    if sigma.numel() == 1:
        sigma = sigma.expand(batch)
    if sigma.numel() != batch:
        raise ValueError(f"`sigma` must be a scalar or have one value per image ({batch}), got {sigma.numel()} values")
    if not bool((sigma > 0).all()):
        raise ValueError("`sigma` must be > 0 (c_noise = ln(sigma) / 4)")
    return sigma


class _Encoder(nn.Module):
    """conv3x3 -> [GroupNorm, SiLU, (+ emb shift), conv3x3 stride 2] x 2 -> global mean -> Linear: ``[B]`` logits."""

    def __init__(self, in_channels: int, channels: tuple[int, int, int], emb_channels: int) -> None:
        super().__init__()
        c0, c1, c2 = channels
        self.conv_in = nn.Conv2d(in_channels, c0, 3, padding=1)
        self.norm1, self.conv1 = nn.GroupNorm(min(8, c0), c0), nn.Conv2d(c0, c1, 3, stride=2, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(min(8, c1), c1), nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.norm_out = nn.GroupNorm(min(8, c2), c2)
        self.head = nn.Linear(c2, 1)
        self.shift1 = nn.Linear(emb_channels, c0) if emb_channels else None
        self.shift2 = nn.Linear(emb_channels, c1) if emb_channels else None

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h = self.conv_in(x)
        h = nn.functional.silu(self.norm1(h))
        if emb is not None and self.shift1 is not None:
            h = h + self.shift1(emb)[:, :, None, None]
        h = self.conv1(h)
        h = nn.functional.silu(self.norm2(h))
        if emb is not None and self.shift2 is not None:
            h = h + self.shift2(emb)[:, :, None, None]
        h = self.conv2(h)
        h = nn.functional.silu(self.norm_out(h)).mean(dim=(2, 3))
        return self.head(h)[:, 0]


class NoisyImageReward(nn.Module):
    """Time-dependent reward ``r(x, sigma)``: the logit that the clean image behind ``x = x0 + sigma n`` is benign.

    Called without ``sigma`` it uses ``sigma_min`` (the paper's reward defaults to t = 0, which backward guidance
    relies on). Input images are nominally in ``[-1, 1]``; returns float32 logits ``[B]``.
    """

    time_dependent = True

    def __init__(
        self,
        in_channels: int = 1,
        channels: tuple[int, int, int] = (16, 32, 32),
        emb_channels: int = 32,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
    ) -> None:
        super().__init__()
        if emb_channels < 4 or emb_channels % 2:
            raise ValueError(f"`emb_channels` must be even and >= 4, got {emb_channels!r}")
        if len(channels) != 3:
            raise ValueError(f"`channels` must list 3 widths, got {channels!r}")
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.embed = PositionalEmbedding(emb_channels, endpoint=True)
        self.emb_mlp = nn.Sequential(nn.Linear(emb_channels, emb_channels), nn.SiLU(),
                                     nn.Linear(emb_channels, emb_channels), nn.SiLU())
        self.encoder = _Encoder(in_channels, tuple(channels), emb_channels)

    def forward(self, x: Tensor, sigma: Tensor | float | None = None) -> Tensor:
        sigma = _as_sigma(sigma, x.shape[0], self.sigma_min, x.device)
        c_in = 1 / (sigma**2 + self.sigma_data**2).sqrt()  # EDM Table 1: unit-variance network input
        emb = self.emb_mlp(self.embed(c_noise(sigma)))
        return self.encoder(x.float() * c_in[:, None, None, None], emb)


class ImageReward(nn.Module):
    """Time-independent reward ``r(x0)`` on clean images (or denoised estimates) in ``[-1, 1]``: logits ``[B]``.

    For forward (universal) and backward guidance, which evaluate the reward on ``D(x; sigma)``. ``sigma`` is accepted
    and ignored, so it can stand where a time-dependent reward is expected.
    """

    time_dependent = False

    def __init__(self, in_channels: int = 1, channels: tuple[int, int, int] = (16, 32, 32)) -> None:
        super().__init__()
        if len(channels) != 3:
            raise ValueError(f"`channels` must list 3 widths, got {channels!r}")
        self.encoder = _Encoder(in_channels, tuple(channels), 0)

    def forward(self, x: Tensor, sigma: Tensor | float | None = None) -> Tensor:
        return self.encoder(x.float())

