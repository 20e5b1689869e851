"""EDM preconditioning and training loss (Karras et al., "Elucidating the Design Space of Diffusion-Based
Generative Models", NeurIPS 2022, Section 5 and Table 1).

``EDMPrecond`` turns a raw network ``F(x, c_noise, class_labels, augment_labels)`` (e.g. :class:`plpriv.nets.SongUNet`)
into a denoiser ``D(x; sigma)``; ``EDMLoss`` is the matching denoising score-matching loss. No Lightning imports.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EDMLoss", "EDMPrecond", "edm_coefficients"]


def edm_coefficients(sigma: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(c_skip, c_out, c_in, c_noise)`` of EDM Table 1 for noise level(s) ``sigma``."""
    s2, sd2 = sigma**2, sigma_data**2
    c_skip = sd2 / (s2 + sd2)
    c_out = sigma * sigma_data / (s2 + sd2).sqrt()
    c_in = 1 / (s2 + sd2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def _as_sigma(sigma: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """Any scalar / [B] / [B,1,1,1] noise level -> fp32 tensor ``[B, 1, 1, 1]``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    if sigma.numel() == 1:
        sigma = sigma.reshape(1).expand(batch)
    if sigma.numel() != batch:
        raise ValueError(f"`sigma` must be a scalar or hold one value per image ({batch}), got shape {tuple(sigma.shape)}")
    return sigma.reshape(-1, 1, 1, 1)


class EDMPrecond(nn.Module):
    """EDM preconditioning: ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise, class_labels)`` (EDM eq. 7, Table 1).

    The scalings and the output combination run in fp32 with autocast disabled; only ``F`` itself runs under the
    caller's autocast (bf16/fp16), as in EDM. ``x`` may be fp64 (the sampler's latents); the result is fp32.

    Args:
        model: raw network called as ``model(x, noise_labels, class_labels, augment_labels=None)``. Its
            ``label_dim`` attribute (0 = unconditional) decides how class labels are passed.
        sigma_data: expected standard deviation of the training data.
        sigma_min: smallest supported noise level (a sampler clamps its schedule to it).
        sigma_max: largest supported noise level.

    ``class_labels`` may be integer class indices ``[B]`` (one-hot encoded here) or ``[B, label_dim]`` floats
    (one-hot or soft). ``None`` for a conditional model means the all-zero label (no class information), as in EDM.
    """

    def __init__(
        self, model: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.0, sigma_max: float = float("inf")
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
        if not sigma_data > 0:
            raise ValueError(f"`sigma_data` must be > 0, got {sigma_data!r}")
        if not 0 <= sigma_min < sigma_max:
            raise ValueError(f"need 0 <= sigma_min < sigma_max, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}")
        self.model = model
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.label_dim = int(getattr(model, "label_dim", 0) or 0)

    def round_sigma(self, sigma: Tensor | float) -> Tensor:
        """Noise levels this denoiser represents exactly (continuous in EDM: identity, as a tensor)."""
        return torch.as_tensor(sigma)

    def encode_labels(self, class_labels: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
        """Class labels in the network's format: ``None`` if unconditional, else fp32 ``[B, label_dim]``."""
        if self.label_dim == 0:
            return None
        if class_labels is None:
            return torch.zeros(batch, self.label_dim, device=device)
        class_labels = class_labels.to(device)
        if not class_labels.is_floating_point():
            if class_labels.ndim != 1:
                raise ValueError(f"integer `class_labels` must have shape [B], got {tuple(class_labels.shape)}")
            return nn.functional.one_hot(class_labels.long(), self.label_dim).float()
        return class_labels.float().reshape(-1, self.label_dim)

    def forward(
        self,
        x: Tensor,
        sigma: Tensor | float,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
        **model_kwargs: Any,
    ) -> Tensor:
        device_type = x.device.type
        with torch.autocast(device_type, enabled=False):
            x = x.to(torch.float32)
            sigma = _as_sigma(sigma, x.shape[0], x.device)
            c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
            labels = self.encode_labels(class_labels, x.shape[0], x.device)
            x_in = c_in * x
        kwargs = dict(model_kwargs)
        if augment_labels is not None:
            kwargs["augment_labels"] = augment_labels
        F_x = self.model(x_in, c_noise.flatten(), labels, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return c_skip * x + c_out * F_x.to(torch.float32)


class EDMLoss(nn.Module):
    """EDM training loss (EDM eq. 8, Table 1): ``lambda(sigma) ||D(y + n; sigma) - y||^2`` per element.

    ``ln sigma ~ N(P_mean, P_std^2)``, ``n ~ N(0, sigma^2 I)``, ``lambda = (sigma^2 + sigma_data^2) / (sigma
    sigma_data)^2``. Returns the weighted squared error of every element (shape of ``images``), as EDM does; EDM sums
    it over pixels and averages over the batch. Pass ``generator`` (or explicit ``sigma``/``noise``) for reproducible,
    resumable randomness.
    """

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5) -> None:
        super().__init__()
        if not P_std > 0:
            raise ValueError(f"`P_std` must be > 0, got {P_std!r}")
        if not sigma_data > 0:
            raise ValueError(f"`sigma_data` must be > 0, got {sigma_data!r}")
        self.P_mean, self.P_std, self.sigma_data = float(P_mean), float(P_std), float(sigma_data)

    def sample_sigma(self, batch: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> Tensor:
        """Noise levels ``[B, 1, 1, 1]`` with ``ln sigma ~ N(P_mean, P_std^2)``."""
        rnd = torch.randn(batch, 1, 1, 1, device=device, generator=generator)
        return (rnd * self.P_std + self.P_mean).exp()

    def weight(self, sigma: Tensor) -> Tensor:
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def forward(
        self,
        net: nn.Module,
        images: Tensor,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
        sigma: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        batch = images.shape[0]
        sigma = self.sample_sigma(batch, images.device, generator) if sigma is None else _as_sigma(sigma, batch, images.device)
        if noise is None:
            noise = torch.randn(images.shape, device=images.device, generator=generator, dtype=images.dtype)
        kwargs = {} if augment_labels is None else {"augment_labels": augment_labels}
        denoised = net(images + noise * sigma, sigma, class_labels, **kwargs)
        return self.weight(sigma) * (denoised - images) ** 2

    def extra_repr(self) -> str:
        return f"P_mean={self.P_mean}, P_std={self.P_std}, sigma_data={self.sigma_data}"

