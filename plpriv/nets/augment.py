"""EDM's non-leaking geometric augmentation (Karras et al. 2022, Appendix B.1): a plain ``nn.Module`` that returns
the augmented images and the 9-d augmentation label the network is conditioned on."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NonLeakingAugment"]


class NonLeakingAugment(nn.Module):
    """Geometric augmentation whose parameters are handed to the network (EDM Appendix B.1, "non-leaking").

    The network sees a 9-d label ``[xflip, yflip, tx, ty, log2 scale, cos(rot) - 1, sin(rot), log2(aniso) cos 2phi,
    log2(aniso) sin 2phi]``; at sampling time the label is zero (no augmentation), so augmented images never leak
    into samples. x-flips are always drawn (EDM's ``xflip=1e8``); every other transform is applied with probability
    ``p``. Simpler than EDM's pipeline (bilinear resampling with reflection padding instead of its filtered warps,
    no colour transforms); set the network's ``augment_dim`` to 9.
    """

    label_dim = 9

    def __init__(self, p: float = 0.12, translate_std: float = 0.125, scale_std: float = 0.2, aniso_std: float = 0.2) -> None:
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"augmentation probability `p` must be in [0, 1], got {p!r}")
        self.p, self.translate_std, self.scale_std, self.aniso_std = p, translate_std, scale_std, aniso_std

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        n, device = images.shape[0], images.device
        gate = lambda: (torch.rand(n, device=device) < self.p).float()  # noqa: E731
        xflip = (torch.rand(n, device=device) < 0.5).float()
        yflip = (torch.rand(n, device=device) < 0.5).float() * gate()
        images = torch.where(xflip.view(-1, 1, 1, 1) > 0, images.flip(3), images)
        images = torch.where(yflip.view(-1, 1, 1, 1) > 0, images.flip(2), images)
        t = torch.randn(n, 2, device=device) * self.translate_std * gate()[:, None]
        log_s = torch.randn(n, device=device) * self.scale_std * gate()
        rot = (torch.rand(n, device=device) * 2 - 1) * math.pi * gate()
        log_a = torch.randn(n, device=device) * self.aniso_std * gate()
        phi = torch.rand(n, device=device) * math.pi
        labels = torch.stack(
            [xflip, yflip, t[:, 0], t[:, 1], log_s, rot.cos() - 1, rot.sin(), log_a * (2 * phi).cos(), log_a * (2 * phi).sin()],
            dim=1,
        )
        if self.p > 0:
            # Forward map M = S R A (A: stretch by 2^log_a along phi), translation 2t in normalised coordinates;
            # grid_sample needs output -> input: p_in = M^-1 (p_out - 2t).
            def rotation(a: Tensor) -> Tensor:
                c, s = a.cos(), a.sin()
                return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)

            a = torch.exp2(log_a)
            stretch = torch.diag_embed(torch.stack([a, 1 / a], -1))
            m = torch.exp2(log_s)[:, None, None] * rotation(rot) @ rotation(phi) @ stretch @ rotation(-phi)
            m_inv = torch.linalg.inv(m)
            theta = torch.cat([m_inv, -(m_inv @ (2 * t)[..., None])], dim=2)
            grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
            warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
            moved = (labels[:, 2:].abs().sum(1) > 0).view(-1, 1, 1, 1)
            images = torch.where(moved, warped, images)
        return images, labels.to(images.dtype)
