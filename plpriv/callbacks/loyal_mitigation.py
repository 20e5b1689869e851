"""Timestep-selective replication mitigation (LoyalDiffusion, Li et al., arXiv 2412.01118) for any diffusion
LightningModule that exposes a denoiser ``D(x, sigma, class_labels)``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from plpriv.nets.itb import ITB_KINDS, install_itbs, install_itbs_diffusers, itb_modules, set_itb_mask
from plpriv.nets.itb import sigma_from_timestep_fraction
from plpriv.nets.songunet import SongUNet

__all__ = ["TimestepSelectiveMitigation"]


def _skip_network(denoiser: nn.Module) -> nn.Module | None:
    """The U-Net inside a denoiser: a plpriv SongUNet, or a diffusers UNet2DModel (found by class name)."""
    for m in denoiser.modules():
        if isinstance(m, SongUNet) or type(m).__name__ in ("UNet2DModel", "UNet2DConditionModel"):
            return m
    return None


class TimestepSelectiveMitigation(Callback):
    """Insert ITBs (a RAU-Net, :class:`plpriv.nets.RAUNet`) into a module's U-Net and apply them only where
    ``sigma >= sigma_threshold`` (the paper: t >= 500 of 1000).

    Works through the denoiser protocol: for each of ``denoiser_attrs`` that the module has (default ``denoiser`` and
    ``ema_denoiser``, the online and EMA networks of :class:`plpriv.modules.EDM`) it finds the U-Net inside (a
    :class:`plpriv.nets.SongUNet` or a diffusers ``UNet2DModel``), attaches ITBs as its registered submodule ``itb``
    (identity at initialisation; trainable where the U-Net is, frozen in a frozen EMA copy) and a forward pre-hook on
    the denoiser that reads each call's ``sigma`` (second argument) and routes: the ITBs act on the examples at or
    above the threshold, the others pass through bit for bit. This happens in ``setup``, before
    ``configure_optimizers`` (so the ITBs train and DPSGD's per-sample hooks cover them) and before a checkpoint is
    restored (so their weights come back). Every layer sees the whole batch (masking, never splitting), as opacus
    needs. Unlike :class:`plpriv.modules.LoyalDiffusion` one network is trained: its ITBs only see high-noise
    examples, while its shared weights see all.

    A call of the raw U-Net outside its denoiser (no sigma) applies the ITBs to every example.

    Missing public hook (noted for the EDM module's owner): an EDM EMA copy made *after* ``setup`` would copy the
    ITBs but not this denoiser hook; plpriv's EDM copies in ``__init__``, so both copies are hooked here.

    Args:
        sigma_threshold: routing noise level; or ``timestep_threshold`` (DDPM t / T, mapped through ``schedule`` as
            :func:`plpriv.nets.sigma_from_timestep_fraction`); neither: 0.5 of the linear DDPM schedule (3.44).
        rau_levels, itb: skip levels and ITB kind (as :class:`plpriv.nets.RAUNet`).
        denoiser_attrs: attribute names of the denoisers to equip.
    """

    def __init__(
        self,
        sigma_threshold: float | None = None,
        timestep_threshold: float | None = None,
        schedule: Literal["linear", "scaled_linear"] = "linear",
        rau_levels: Sequence[int] | None = None,
        itb: str = "conv3x3",
        denoiser_attrs: Sequence[str] = ("denoiser", "ema_denoiser"),
    ) -> None:
        super().__init__()
        if itb not in ITB_KINDS:
            raise ValueError(f"unknown itb {itb!r}; choose one of {list(ITB_KINDS)}")
        if sigma_threshold is not None and timestep_threshold is not None:
            raise ValueError("give sigma_threshold or timestep_threshold, not both")
        if sigma_threshold is None:
            sigma_threshold = sigma_from_timestep_fraction(0.5 if timestep_threshold is None else timestep_threshold,
                                                           schedule)
        if not (sigma_threshold > 0 and math.isfinite(sigma_threshold)):
            raise ValueError(f"sigma_threshold must be a positive finite noise level, got {sigma_threshold!r}")
        if isinstance(denoiser_attrs, str) or not denoiser_attrs:
            raise TypeError(f"denoiser_attrs must be a non-empty list of attribute names, got {denoiser_attrs!r}")
        self.sigma_threshold = float(sigma_threshold)
        self.rau_levels = None if rau_levels is None else [int(v) for v in rau_levels]
        self.itb = itb
        self.denoiser_attrs = list(denoiser_attrs)
        self._hooked: set[int] = set()
        self.routed_calls = 0  # denoiser calls routed (for tests / diagnostics)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(sigma_threshold=self.sigma_threshold, itb=self.itb,
                                        rau_levels=self.rau_levels)

    # ------------------------------------------------------------------ set-up
    def _sigma_range(self, pl_module: LightningModule, denoiser: nn.Module) -> tuple[float, float]:
        settings = pl_module.sampler_settings() if callable(getattr(pl_module, "sampler_settings", None)) else {}
        lo = float(settings.get("sigma_min", 0.002))
        hi = float(settings.get("sigma_max", 80.0))
        lo = max(lo, float(getattr(denoiser, "sigma_min", 0.0) or 0.0))
        hi = min(hi, float(getattr(denoiser, "sigma_max", math.inf)))
        return lo, hi

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        found = 0
        for attr in self.denoiser_attrs:
            denoiser = getattr(pl_module, attr, None)
            if not isinstance(denoiser, nn.Module):
                continue
            net = _skip_network(denoiser)
            if net is None:
                raise TypeError(f"TimestepSelectiveMitigation: `{attr}` ({type(denoiser).__name__}) holds no "
                                "plpriv SongUNet or diffusers UNet2DModel to put ITBs on")
            lo, hi = self._sigma_range(pl_module, denoiser)
            if not lo < self.sigma_threshold < hi:
                raise ValueError(
                    f"sigma_threshold={self.sigma_threshold:g} is outside the sampler's noise range ({lo:g}, {hi:g}):"
                    " every step would get the same network; pick a threshold inside it")
            found += 1
            if id(denoiser) in self._hooked:
                continue
            if not hasattr(net, "itb"):
                trainable = any(p.requires_grad for p in net.parameters())
                install = install_itbs if isinstance(net, SongUNet) else install_itbs_diffusers
                install(net, self.rau_levels, self.itb, requires_grad=trainable)
            elif not itb_modules(net):
                raise ValueError(f"`{attr}`'s network already has an `itb` attribute that is not an ITB set")
            denoiser.register_forward_pre_hook(self._make_router(net), with_kwargs=True)
            denoiser.register_forward_hook(lambda module, args, output, net=net: set_itb_mask(net, None))
            self._hooked.add(id(denoiser))
        if not found:
            raise ValueError(f"TimestepSelectiveMitigation: {type(pl_module).__name__} has none of the denoisers "
                             f"{self.denoiser_attrs} (nn.Modules called as D(x, sigma, class_labels))")
        rank_zero_info(f"TimestepSelectiveMitigation: {self.itb} ITBs on levels "
                       f"{self.rau_levels or 'default'} for sigma >= {self.sigma_threshold:g}")

    def _make_router(self, net: nn.Module) -> Any:
        threshold = self.sigma_threshold

        def route(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["x"]
            sigma = args[1] if len(args) > 1 else kwargs["sigma"]
            sigma = torch.as_tensor(sigma, device=x.device).reshape(-1)
            if sigma.numel() == 1:
                sigma = sigma.expand(x.shape[0])
            mask: Tensor = sigma.to(torch.float32) >= threshold  # the paper's t >= tau, in EDM's sigma
            set_itb_mask(net, mask)
            self.routed_calls += 1

        return route

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"sigma_threshold": self.sigma_threshold, "itb": self.itb, "rau_levels": self.rau_levels}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = (state_dict.get("itb"), state_dict.get("rau_levels"), state_dict.get("sigma_threshold"))
        if saved != (self.itb, self.rau_levels, self.sigma_threshold):
            raise ValueError(f"the checkpoint was trained with TimestepSelectiveMitigation(itb, rau_levels, "
                             f"sigma_threshold)={saved}, this run has {(self.itb, self.rau_levels, self.sigma_threshold)}"
                             ": use the checkpoint's settings")
