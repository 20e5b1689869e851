"""Reward models for censored sampling (Yoon et al., NeurIPS 2023, "Censored Sampling of Diffusion Models Using 3
Minutes of Human Feedback"), and their ensembles as guidance for :class:`plpriv.modules.EDM`.

Training follows the authors' ``scripts/reward/reward_train.py``: ``BCEWithLogitsLoss(pos_weight=alpha)`` with label
1 = benign (a small alpha down-weights the abundant benign class), AdamW (lr 3e-4, weight decay 0.05) with the lr
decayed linearly to 0 over the run, batch 128, 1,001 iterations (3,001 for the Union ablation). The time-dependent
reward sees noisy images ``x = x0 + sigma n``; the paper draws t uniformly over its 1,000 DDPM steps, here sigma comes
from EDM's training distribution ``ln sigma ~ N(P_mean, P_std^2)`` so the reward is accurate where the EDM sampler
spends its steps.

Sampling censored (the reward ensemble as ``model.guidance`` of an EDM recipe)::

    plpriv predict -c recipes/censoring/digits7.yaml \\
        --model.init_checkpoint runs/censoring_digits7/checkpoints/last.ckpt -c runs/censoring_reward/guidance.yaml
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from plpriv.nets.reward import ImageReward, NoisyImageReward
from plpriv.sampling.guidance import ForwardGuidance, LogSigmoidEnsemble, ScoreGuidance
from plpriv.utils.seeding import derive_seed

__all__ = ["RewardEnsemble", "RewardForwardGuidance", "RewardGuidance", "RewardModel", "censoring_guidance",
           "weighted_bce"]


def weighted_bce(logits: Tensor, labels: Tensor, pos_weight: float) -> Tensor:
    """The paper's BCE_alpha, ``-alpha y log s(r) - (1 - y) log(1 - s(r))`` averaged over the batch (torch's
    ``BCEWithLogitsLoss(pos_weight=alpha)``, the authors' choice)."""
    weight = torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), pos_weight=weight)


class RewardModel(LightningModule):
    """A reward network ``r`` (logit of benign) trained with the weighted BCE on a few labelled images.

    The batch is ``(images in [-1, 1], labels)`` with 1 = benign, 0 = malign, e.g. from
    :class:`plpriv.data.labelled.LabelledImagesDataModule` (rotation copies included).

    Args:
        time_dependent: train :class:`~plpriv.nets.reward.NoisyImageReward` ``r(x, sigma)`` on EDM-noised images (for
            :class:`~plpriv.sampling.ScoreGuidance`); ``False``: :class:`~plpriv.nets.reward.ImageReward` ``r(x0)`` on
            clean images (for forward/backward guidance on ``D(x; sigma)``).
        in_channels, channels: the network's input channels and its three widths.
        pos_weight: alpha of BCE_alpha (paper, MNIST: 0.02 per ensemble member, 0.005 for the Union model).
        lr, weight_decay: AdamW; the lr decays linearly to 0 over ``trainer.max_steps`` (``anneal_lr``).
        P_mean, P_std, sigma_data: EDM's training noise distribution and data scale (the base model's).
        val_sigma: the noise level of the validation images' noise (``val/acc``, ``val/loss``).
        seed: seeds the training noise by ``(seed, global_step, batch_idx)``.
    """

    def __init__(
        self,
        time_dependent: bool = True,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 32),
        pos_weight: float = 0.02,
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        sigma_data: float = 0.5,
        val_sigma: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not pos_weight > 0:
            raise ValueError(f"`pos_weight` (alpha) must be > 0, got {pos_weight!r}")
        if not lr > 0 or weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={lr!r}, weight_decay={weight_decay!r}")
        self.save_hyperparameters()
        channels = tuple(int(c) for c in channels)
        self.net: nn.Module = (NoisyImageReward(in_channels, channels, sigma_data=sigma_data) if time_dependent
                               else ImageReward(in_channels, channels))
        self.time_dependent = bool(time_dependent)
        self.pos_weight = float(pos_weight)
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.P_mean, self.P_std = float(P_mean), float(P_std)
        self.val_sigma = float(val_sigma)
        self.seed = int(seed)

    def forward(self, x: Tensor, sigma: Tensor | float | None = None) -> Tensor:
        """Logits ``[B]`` (the time-independent net ignores ``sigma``)."""
        return self.net(x, sigma)

    def noised(self, x0: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(x0 + sigma n, sigma)`` with ``ln sigma ~ N(P_mean, P_std^2)`` (EDM's training distribution)."""
        rnd = torch.randn(x0.shape[0], generator=generator).to(x0.device)
        sigma = (rnd * self.P_std + self.P_mean).exp()
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        return x0 + sigma[:, None, None, None] * noise, sigma

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x0, labels = batch[0], batch[1]
        if self.time_dependent:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.global_step, batch_idx))
            x, sigma = self.noised(x0, generator)
            logits = self.net(x, sigma)
        else:
            logits = self.net(x0)
        loss = weighted_bce(logits, labels, self.pos_weight)
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x0, labels = batch[0], batch[1]
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "val", batch_idx))
        x = x0 + self.val_sigma * torch.randn(x0.shape, generator=generator).to(x0.device)
        logits = self.net(x, self.val_sigma) if self.time_dependent else self.net(x)
        self.log("val/loss", weighted_bce(logits, labels, self.pos_weight), batch_size=x0.shape[0])
        self.log("val/acc", ((logits > 0).long() == labels).float().mean(), batch_size=x0.shape[0])

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else None
        if total is None:
            return optimizer
        # The authors' anneal_lr: lr * (1 - step / iterations), reaching 0 at the last iteration.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class RewardEnsemble(LogSigmoidEnsemble):
    """``sum_k log sigmoid(r_k)`` over :class:`RewardModel` checkpoints: ``log_prob`` of a guidance term.

    Frozen, in eval mode. All members must be of one kind (all time-dependent or all time-independent). In a recipe
    use :class:`RewardGuidance` (which builds this ensemble)::

        guidance:
          class_path: plpriv.modules.censoring.RewardGuidance
          init_args: {checkpoints: [reward_0.ckpt, reward_1.ckpt], weight: 1.0}
    """

    def __init__(self, checkpoints: Sequence[str]) -> None:
        if isinstance(checkpoints, str) or not checkpoints:
            raise ValueError(f"`checkpoints` must be a non-empty list of RewardModel checkpoint paths, got "
                             f"{checkpoints!r}")
        models = [RewardModel.load_from_checkpoint(str(p), map_location="cpu") for p in checkpoints]
        kinds = {m.time_dependent for m in models}
        if len(kinds) > 1:
            raise ValueError(f"reward checkpoints mix time-dependent and time-independent models: {list(checkpoints)}")
        super().__init__([m.net.eval().requires_grad_(False) for m in models], time_dependent=kinds.pop())
        self.checkpoints = [str(p) for p in checkpoints]

    def train(self, mode: bool = True) -> RewardEnsemble:  # the members stay in eval mode
        return super().train(False)


class RewardGuidance(ScoreGuidance):
    """Classifier guidance with an ensemble of time-dependent :class:`RewardModel` checkpoints, configurable from a
    recipe (``guidance: {class_path: plpriv.modules.censoring.RewardGuidance, init_args: {checkpoints: [...],
    weight: 1.0}}``): ``D' = D + w sigma^2 grad_x sum_k log sigmoid(r_k(x, sigma))``."""

    def __init__(self, checkpoints: Sequence[str], weight: float = 1.0) -> None:
        ensemble = RewardEnsemble(checkpoints)
        if not ensemble.time_dependent:
            raise ValueError("these reward checkpoints are time-independent r(x0): use "
                             "plpriv.modules.censoring.RewardForwardGuidance")
        super().__init__(ensemble, weight)


class RewardForwardGuidance(ForwardGuidance):
    """Universal forward guidance with an ensemble of time-independent :class:`RewardModel` checkpoints:
    ``D' = D + w sigma^2 grad_x sum_k log sigmoid(r_k(D(x; sigma)))`` (through the denoiser)."""

    def __init__(self, checkpoints: Sequence[str], weight: float = 1.0) -> None:
        ensemble = RewardEnsemble(checkpoints)
        if ensemble.time_dependent:
            raise ValueError("these reward checkpoints are time-dependent r(x, sigma): use "
                             "plpriv.modules.censoring.RewardGuidance")
        super().__init__(ensemble, weight)


def censoring_guidance(checkpoints: Sequence[str], weight: float = 1.0) -> ScoreGuidance | ForwardGuidance:
    """The guidance term of an ensemble of reward checkpoints: :class:`RewardGuidance` (score guidance) for
    time-dependent rewards, :class:`RewardForwardGuidance` (universal guidance through the denoiser) otherwise."""
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"`weight` must be a finite number >= 0, got {weight!r}")
    ensemble = RewardEnsemble(checkpoints)
    return ScoreGuidance(ensemble, weight) if ensemble.time_dependent else ForwardGuidance(ensemble, weight)
