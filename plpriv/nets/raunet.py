"""Replication-aware U-Net (RAU-Net) of LoyalDiffusion (Li et al., arXiv 2412.01118) and the sigma router that pairs
it with a plain U-Net (timestep-selective application).

RAU-Net = DDPM++ :class:`~plpriv.nets.SongUNet` with an information transfer block (ITB, :mod:`plpriv.nets.itb`) on
every skip connection of the chosen decoder levels (paper: SC3/SC4 of SD 2.1, its two deepest, 1280-channel levels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from plpriv.nets.itb import ITB_KINDS, install_itbs
from plpriv.nets.songunet import SongUNet

__all__ = ["RAUNet", "SigmaRoutedUNet", "noise_label_of_sigma"]


class RAUNet(SongUNet):
    """:class:`SongUNet` (same constructor) plus ITBs on the skips of decoder levels ``rau_levels``.

    Args:
        rau_levels: resolution levels (index into ``channel_mult``: 0 = ``img_resolution``, the last = deepest) whose
            skip connections pass through an ITB; default: the deeper half (``[1]`` for two levels, ``[1, 2]`` for
            EDM's three), as the paper picks the least quality-critical SC3/SC4.
        itb: ``"conv3x3"`` (paper), ``"conv_silu"``, ``"stacked"``, ``"mini_unet"``, ``"maxpool"``, ``"none"``
            (drop the skip). The learnable kinds start as an exact identity (zero residual), so
            ``RAUNet(**cfg).load_state_dict(SongUNet(**cfg).state_dict(), strict=False)`` computes exactly the plain
            network's function; ``"maxpool"``/``"none"`` are parameter-free and change it from the start.

    The ITBs are ``self.itb`` (a ``ModuleDict`` keyed by decoder block): trained, saved and restored with the rest.
    The base weights are drawn before the ITB ones, so for one seed the base equals ``SongUNet(**cfg)``.
    """

    def __init__(self, *args: Any, rau_levels: Sequence[int] | None = None, itb: str = "conv3x3",
                 **kwargs: Any) -> None:
        if itb not in ITB_KINDS:  # before building the (possibly large) base network
            raise ValueError(f"unknown itb {itb!r}; choose one of {list(ITB_KINDS)}")
        super().__init__(*args, **kwargs)
        self.rau_levels = None if rau_levels is None else [int(v) for v in rau_levels]
        self.itb_kind = itb
        install_itbs(self, rau_levels, itb)

    @classmethod
    def from_unet(cls, net: SongUNet, rau_levels: Sequence[int] | None = None, itb: str = "conv3x3") -> SongUNet:
        """A RAU-Net with ``net``'s weights: a deep copy of ``net`` with ITBs attached (``net`` is left plain).

        The copy keeps ``net``'s class (its constructor arguments are not recorded), with ``itb.*`` parameters added:
        the same function, parameters and state-dict keys as ``RAUNet(<net's arguments>, rau_levels, itb)``.
        """
        import copy

        if not isinstance(net, SongUNet):
            raise TypeError(f"RAUNet.from_unet needs a plpriv.nets.SongUNet, got {type(net).__name__}")
        rau = copy.deepcopy(net)
        install_itbs(rau, rau_levels, itb)
        return rau


def noise_label_of_sigma(sigma: float) -> float:
    """EDM's noise label c_noise = ln(sigma) / 4 (Karras et al. 2022, Table 1), in fp32 as EDMPrecond computes it."""
    return float(torch.tensor(sigma, dtype=torch.float32).log() / 4)  # EDM Table 1: c_noise(sigma) = ln(sigma)/4


class SigmaRoutedUNet(nn.Module):
    """Route each example by its noise level: ``sigma >= sigma_threshold`` -> ``rau``, else ``plain``.

    A raw EDM network ``F(x, c_noise, class_labels, augment_labels=None)`` (wrap it in
    :class:`~plpriv.nets.EDMPrecond`). It reads sigma from EDM's noise label ``c_noise = ln(sigma)/4``: both sides of
    the comparison are computed by the same fp32 ops, so ``sigma >= threshold`` holds exactly when the labels compare
    so (up to ties of the fp32 log within one ulp). With gradients on (training), both networks see the whole batch
    and ``torch.where`` picks each example's output (each network gets gradient only from its own examples; the
    batch dimension stays intact for opacus); without gradients, a batch on one side of the threshold (a sampling
    step) runs only that side's network.
    """

    def __init__(self, plain: nn.Module, rau: nn.Module, sigma_threshold: float) -> None:
        super().__init__()
        if not (sigma_threshold > 0 and math.isfinite(sigma_threshold)):
            raise ValueError(f"sigma_threshold must be a positive finite noise level, got {sigma_threshold!r}")
        self.plain = plain
        self.rau = rau
        self.sigma_threshold = float(sigma_threshold)
        self.label_threshold = noise_label_of_sigma(sigma_threshold)
        for name in ("label_dim", "augment_dim", "img_resolution", "in_channels", "out_channels"):
            if hasattr(plain, name):
                setattr(self, name, getattr(plain, name))

    def route(self, noise_labels: Tensor, batch: int) -> Tensor:
        """bool ``[B]``: which examples go to the RAU-Net."""
        labels = noise_labels.reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(batch)
        return labels >= self.label_threshold

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None,
                augment_labels: Tensor | None = None) -> Tensor:
        mask = self.route(noise_labels, x.shape[0])
        kwargs = {} if augment_labels is None else {"augment_labels": augment_labels}
        if not torch.is_grad_enabled():
            if bool(mask.all()):
                return self.rau(x, noise_labels, class_labels, **kwargs)
            if not bool(mask.any()):
                return self.plain(x, noise_labels, class_labels, **kwargs)
        out_rau = self.rau(x, noise_labels, class_labels, **kwargs)
        out_plain = self.plain(x, noise_labels, class_labels, **kwargs)
        return torch.where(mask.view(-1, *([1] * (x.ndim - 1))), out_rau, out_plain)

    def extra_repr(self) -> str:
        return f"sigma_threshold={self.sigma_threshold:g}"
