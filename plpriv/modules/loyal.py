"""LoyalDiffusion (Li, Zhang, Chen, Xu, Beerel, arXiv 2412.01118): replication mitigation by a replication-aware
U-Net (RAU-Net) used only at high noise, trained with EDM (Karras et al., NeurIPS 2022)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from plpriv.modules.edm import EDM
from plpriv.nets.edm_precond import EDMPrecond
from plpriv.nets.itb import ITB_KINDS, install_itbs, sigma_from_timestep_fraction
from plpriv.nets.raunet import SigmaRoutedUNet

__all__ = ["LoyalDiffusion"]


def _load_base(net: nn.Module, path: str) -> None:
    """Load a plpriv EDM checkpoint (its EMA weights) or a plain state dict of the raw network into ``net``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"`init_checkpoint` {path!r} holds no state dict")
    for prefix in ("ema.model.", "net.model.", "model.", ""):
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if weights:
            break
    result = net.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"`init_checkpoint` {path!r} does not fit the base network: missing "
                         f"{result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}")
    rank_zero_info(f"LoyalDiffusion: base weights from {path} ({len(weights)} tensors)")


class LoyalDiffusion(EDM):
    """A plain U-Net and a RAU-Net from the same base weights, each trained and used only on its noise range.

    ``sigma >= sigma_threshold`` (high noise: global structure) -> RAU-Net, below (detail) -> the plain U-Net, for
    every training example (each network's loss covers its own examples; both see the whole batch, see
    :class:`~plpriv.nets.SigmaRoutedUNet`) and every sampling step. The paper fine-tunes a standard U-Net on
    t < 500 and a RAU-Net on t >= 500 of 1000 DDPM steps; here both train at once in one EDM run (EMA, lr ramp,
    exact resume as :class:`EDM`). A training step costs two network evaluations; sampling one per step.

    Args:
        net: the base network, a :class:`plpriv.nets.SongUNet` (with ``init_checkpoint``: its architecture).
        sigma_threshold: the routing noise level, inside the sampler's ``[sigma_min, sigma_max]`` (default
            [0.002, 80]).
        timestep_threshold: the threshold as a DDPM timestep fraction ``t / T`` (paper: 0.5), mapped to sigma by
            :func:`plpriv.nets.sigma_from_timestep_fraction` through ``schedule`` (VP -> VE:
            ``sigma_t = sqrt((1 - abar_t) / abar_t)``; linear DDPM: 0.5 -> 3.44, SD's scaled_linear: 0.5 -> 1.62).
            Give one of the two; neither: 0.5.
        rau_levels, itb: the RAU-Net's skip levels and ITB kind (:class:`plpriv.nets.RAUNet`).
        init_checkpoint: base weights for both networks (an EDM checkpoint or a state dict of the raw network).
        sigma_sampling: ``"per_network"`` (the paper's two fine-tunes, each on its own range): every image is
            noised twice per step, once with ln sigma ~ EDM's N(P_mean, P_std^2) restricted to sigma < threshold for
            the plain U-Net and once restricted to sigma >= threshold for the RAU-Net, so each network trains on a full
            batch of its own range; ``"shared"``: one EDM sigma per image, routed to one network (the network on the
            rare side of the threshold then sees few examples).
        **kwargs: :class:`EDM`'s arguments.
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_threshold: float | None = None,
        timestep_threshold: float | None = None,
        schedule: Literal["linear", "scaled_linear"] = "linear",
        rau_levels: Sequence[int] | None = None,
        itb: str = "conv3x3",
        init_checkpoint: str | None = None,
        sigma_sampling: Literal["per_network", "shared"] = "per_network",
        **kwargs: Any,
    ) -> None:
        if sigma_sampling not in ("per_network", "shared"):
            raise ValueError(f"sigma_sampling must be 'per_network' or 'shared', got {sigma_sampling!r}")
        if itb not in ITB_KINDS:
            raise ValueError(f"unknown itb {itb!r}; choose one of {list(ITB_KINDS)}")
        if sigma_threshold is not None and timestep_threshold is not None:
            raise ValueError(f"give sigma_threshold ({sigma_threshold}) or timestep_threshold "
                             f"({timestep_threshold}), not both")
        if sigma_threshold is None:
            sigma_threshold = sigma_from_timestep_fraction(0.5 if timestep_threshold is None else timestep_threshold,
                                                           schedule)
        sampler = dict(kwargs.get("sampler_kwargs") or {})
        lo, hi = float(sampler.get("sigma_min", 0.002)), float(sampler.get("sigma_max", 80.0))
        if not lo < sigma_threshold < hi:
            raise ValueError(
                f"sigma_threshold={sigma_threshold:g} is outside the sampler's noise range ({lo:g}, {hi:g}): every "
                "step would go to one network; pick a threshold inside it (or train a SongUNet / RAUNet alone)")
        if init_checkpoint is not None:
            _load_base(net, init_checkpoint)
        rau = copy.deepcopy(net)  # same base weights; the copy gets the ITBs (identity at initialisation)
        install_itbs(rau, rau_levels, itb)
        super().__init__(SigmaRoutedUNet(net, rau, sigma_threshold), **kwargs)
        self.sigma_threshold = float(sigma_threshold)
        self.sigma_sampling = sigma_sampling

    @property
    def plain_net(self) -> nn.Module:
        """The online plain U-Net (used below the threshold)."""
        return self.net.model.plain

    @property
    def rau_net(self) -> nn.Module:
        """The online RAU-Net (used at and above the threshold)."""
        return self.net.model.rau

    def _truncated_sigma(self, batch: int, high: bool) -> Tensor:
        """EDM's ln sigma ~ N(P_mean, P_std^2) (EDM Table 1) conditioned on one side of the threshold (inverse CDF)."""
        mean, std = self.loss_fn.P_mean, self.loss_fn.P_std
        cut = torch.special.ndtr(torch.tensor((torch.tensor(self.sigma_threshold).log().item() - mean) / std))
        u = torch.rand(batch, 1, 1, 1, device=self.device)
        u = cut + u * (1 - cut) if high else u * cut  # uniform on the side's share of the CDF
        u = u.clamp(1e-7, 1 - 1e-7)
        return (mean + std * torch.special.ndtri(u)).exp()  # ln sigma = P_mean + P_std * Phi^-1(u)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.sigma_sampling == "shared":
            return super().training_step(batch, batch_idx)
        images, labels = self._unpack(batch)
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"LoyalDiffusion expects images {self.image_shape}, got {tuple(images.shape[1:])}")
        self._global_batch = images.shape[0] * self._world_size() * self.trainer.accumulate_grad_batches
        n = images.shape[0]
        sigma_data = self.net.sigma_data
        with self._seeded(0, self.global_step, self._rank(), batch_idx):
            augment_labels = None
            if self.augment is not None:
                images, augment_labels = self.augment(images)
            y = self._labels(labels)
            sigma_low, sigma_high = self._truncated_sigma(n, high=False), self._truncated_sigma(n, high=True)
            loss_plain = self.loss_fn(EDMPrecond(self.plain_net, sigma_data), images, y, augment_labels, sigma=sigma_low)
            loss_rau = self.loss_fn(EDMPrecond(self.rau_net, sigma_data), images, y, augment_labels, sigma=sigma_high)
        self.log("train/loss_plain", loss_plain.mean(), batch_size=n)
        self.log("train/loss_rau", loss_rau.mean(), batch_size=n)
        self.log("train/loss", (loss_plain.mean() + loss_rau.mean()) / 2, prog_bar=True, batch_size=n)
        dims = tuple(range(1, loss_plain.ndim))
        return (loss_plain.sum(dim=dims) + loss_rau.sum(dim=dims)).mean()  # two EDM losses (sum pixels, mean images)
