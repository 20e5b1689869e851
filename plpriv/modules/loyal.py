"""LoyalDiffusion (Li, Zhang, Chen, Xu, Beerel, arXiv 2412.01118): replication mitigation by a replication-aware
U-Net (RAU-Net) used only at high noise, trained with EDM (Karras et al., NeurIPS 2022)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from plpriv.metrics import FID, ClassifierFeatures, ReplicationScore
from plpriv.modules.edm import EDM, network_weights
from plpriv.nets.edm_precond import EDMPrecond
from plpriv.nets.itb import ITB_KINDS, install_itbs, sigma_from_timestep_fraction
from plpriv.nets.raunet import SigmaRoutedUNet

__all__ = ["LoyalDiffusion", "LoyalStableDiffusion", "generation_metrics", "select_best_threshold"]


def _load_base(net: nn.Module, path: str) -> None:
    """Load a plpriv EDM checkpoint (its EMA weights) or a plain state dict of the raw network into ``net``."""
    weights = network_weights(path)
    result = net.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"`init_checkpoint` {path!r} does not fit the base network: missing "
                         f"{result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}")
    rank_zero_info(f"LoyalDiffusion: base weights from {path} ({len(weights)} tensors)")


@torch.no_grad()
def generation_metrics(
    model: EDM,
    replication: ReplicationScore,
    classifier: nn.Module | None = None,
    num_samples: int = 500,
    seed: int = 0,
    fid_reference: Tensor | None = None,
    duplicated: Sequence[int] | None = None,
    batch_size: int = 250,
) -> tuple[dict[str, float], Tensor]:
    """Replication and quality of ``num_samples`` class-conditional generations (EMA network, latents from ``seed``,
    classes ``arange(N) % num_classes``); returns the metrics and the samples (clamped to ``[-1, 1]``).

    Replication (Somepalli et al. 2023), from ``replication`` (reset first): ``sim_p95`` (95th percentile of the top-1
    similarity to the reference set), ``sim_mean``, ``frac_above`` (top-1 similarity > its threshold) and the
    background ``bg_*`` (reference vs reference); with ``duplicated`` (reference indices), ``frac_dup_replicas``:
    generations above the threshold whose nearest reference image is one of them. Quality, given ``classifier``
    (images in [-1, 1] -> logits): ``class_acc``, how often a generation is classified as its requested class; with
    ``fid_reference`` images too, ``cfid``: FID in the classifier's penultimate features ("classifier-FID").
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples!r}")
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(num_samples, *model.image_shape, generator=g)
    labels = torch.arange(num_samples) % model.num_classes if model.num_classes else None
    x = torch.cat([model.sample(latents=latents[s: s + batch_size],
                                class_labels=None if labels is None else labels[s: s + batch_size]).cpu()
                   for s in range(0, num_samples, batch_size)]).clamp(-1, 1)
    replication.reset()
    replication.update(x)
    sims, nearest = replication.per_sample()
    summary = {k: float(v) for k, v in replication.compute().items()}
    out = {"sim_p95": summary["p95"], "sim_mean": summary["mean"], "frac_above": summary["fraction_above"],
           "bg_p95": summary["background_p95"], "bg_mean": summary["background_mean"],
           "bg_frac_above": summary["background_fraction_above"]}
    if duplicated is not None:
        dup = torch.isin(nearest.cpu(), torch.as_tensor(list(duplicated))) & (sims.cpu() > replication.threshold)
        out["frac_dup_replicas"] = float(dup.float().mean())
    if classifier is not None:
        classifier.eval()
        if labels is not None:
            out["class_acc"] = float((classifier(x).argmax(1) == labels).float().mean())
        if fid_reference is not None:
            fid = FID(ClassifierFeatures(classifier), input_shape=model.image_shape)
            fid.update(fid_reference, real=True)
            fid.update(x, real=False)
            out["cfid"] = float(fid.compute())
    return out, x


def select_best_threshold(rows: Sequence[dict[str, float]], accuracy_tolerance: float = 0.02,
                          replication_key: str = "sim_p95") -> dict[str, float]:
    """The best replication / quality trade-off of a threshold sweep (rows with ``sim_p95``, ``frac_above`` and,
    optionally, ``class_acc``).

    Rule: keep the rows whose class accuracy is within ``accuracy_tolerance`` (absolute) of the sweep's best accuracy
    ("comparable quality", as the paper compares at comparable FID); among them take the lowest ``replication_key``
    (default ``sim_p95``, the paper's headline replication score; ``frac_above`` reads better once more than 5 % of
    the generations are replicas and the 95th percentile saturates near 1), ties broken by the lower ``sim_p95``,
    then ``frac_above``, then the lower threshold. Without ``class_acc`` every row is kept.
    """
    if not rows:
        raise ValueError("select_best_threshold needs at least one row")
    if accuracy_tolerance < 0:
        raise ValueError(f"accuracy_tolerance must be >= 0, got {accuracy_tolerance!r}")
    if any(replication_key not in r for r in rows):
        raise ValueError(f"replication_key {replication_key!r} is not in every row (keys: {sorted(rows[0])})")
    kept = list(rows)
    if all("class_acc" in r for r in rows):
        top = max(r["class_acc"] for r in rows)
        kept = [r for r in rows if r["class_acc"] >= top - accuracy_tolerance]
    return min(kept, key=lambda r: (r[replication_key], r["sim_p95"], r["frac_above"], r.get("sigma_threshold", 0.0)))


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

    @classmethod
    def sweep_thresholds(
        cls,
        make_net: Callable[[], nn.Module],
        sigma_thresholds: Sequence[float],
        train_dataloaders: Any,
        replication: ReplicationScore,
        classifier: nn.Module | None = None,
        max_steps: int = 300,
        num_samples: int = 500,
        fid_reference: Tensor | None = None,
        duplicated: Sequence[int] | None = None,
        accuracy_tolerance: float = 0.02,
        replication_key: str = "sim_p95",
        seed: int = 0,
        trainer_kwargs: dict[str, Any] | None = None,
        **model_kwargs: Any,
    ) -> dict[str, Any]:
        """Train one LoyalDiffusion per sigma threshold (same base weights, data, seed and ``max_steps``) and measure
        replication and quality of its generations (:func:`generation_metrics`); pick the best trade-off by
        :func:`select_best_threshold` (the lowest ``replication_key``, default the 95th-percentile similarity, among
        the thresholds whose class accuracy is within ``accuracy_tolerance`` of the best one).

        ``make_net()`` builds the base network; it is called under ``torch.manual_seed(seed)`` for every threshold.
        ``model_kwargs`` go to the constructor (``rau_levels``, ``itb``, ``optimizer``, ...), ``trainer_kwargs`` to
        the Trainer (default: no logger, no checkpoints, no validation). Returns ``{"rows": [one dict per threshold:
        sigma_threshold, train_s, steps and the metrics], "best": the chosen row, "rule": the rule in words,
        "samples": [each row's generations]}``.
        """
        thresholds = [float(t) for t in sigma_thresholds]
        if not thresholds:
            raise ValueError("sigma_thresholds must name at least one noise level")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps!r}")
        settings = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
        settings.update(trainer_kwargs or {})
        rows: list[dict[str, float]] = []
        samples: list[Tensor] = []
        for threshold in thresholds:
            torch.manual_seed(seed)  # the same base weights for every threshold
            model = cls(make_net(), sigma_threshold=threshold, seed=seed, **model_kwargs)  # checks the threshold
            trainer = Trainer(max_steps=max_steps, **settings)
            start = time.perf_counter()
            trainer.fit(model, train_dataloaders=train_dataloaders)
            train_s = time.perf_counter() - start
            metrics, x = generation_metrics(model, replication, classifier, num_samples, seed + 1000, fid_reference,
                                            duplicated)
            rows.append({"sigma_threshold": threshold, "train_s": train_s, "steps": trainer.global_step, **metrics})
            samples.append(x)
            rank_zero_info(f"LoyalDiffusion sweep: sigma_threshold {threshold:g}: " +
                           ", ".join(f"{k} {v:.4g}" for k, v in rows[-1].items() if k != "sigma_threshold"))
        rule = (f"lowest {replication_key} among thresholds with class_acc >= best - {accuracy_tolerance:g} "
                "(ties: lower sim_p95, frac_above, threshold)")
        best = select_best_threshold(rows, accuracy_tolerance, replication_key)
        return {"rows": rows, "best": best, "rule": rule,
                "samples": samples}

    def draw_sigma(self, batch: int, high: bool) -> Tensor:
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
        images, y = self.prepare_training_batch(batch)
        n = images.shape[0]
        sigma_data = self.net.sigma_data
        with self.training_rng(batch_idx):  # EDM's training stream: exact resume
            augment_labels = None
            if self.augment is not None:
                images, augment_labels = self.augment(images)
            sigma_low, sigma_high = self.draw_sigma(n, high=False), self.draw_sigma(n, high=True)
            plain, rau = EDMPrecond(self.plain_net, sigma_data), EDMPrecond(self.rau_net, sigma_data)
            loss_plain = self.loss_fn(plain, images, y, augment_labels, sigma=sigma_low)
            loss_rau = self.loss_fn(rau, images, y, augment_labels, sigma=sigma_high)
        self.log_training_metric("train/loss_plain", loss_plain.mean(), batch_size=n)  # nothing under DP
        self.log_training_metric("train/loss_rau", loss_rau.mean(), batch_size=n)
        self.log_training_metric("train/loss", (loss_plain.mean() + loss_rau.mean()) / 2, prog_bar=True, batch_size=n)
        dims = tuple(range(1, loss_plain.ndim))
        return (loss_plain.sum(dim=dims) + loss_rau.sum(dim=dims)).mean()  # two EDM losses (sum pixels, mean images)


_SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class LoyalStableDiffusion(LightningModule):
    """LoyalDiffusion's own setting: fine-tune a Stable Diffusion (diffusers format) UNet pair on an image folder.

    The plain ``UNet2DConditionModel`` is trained on DDPM timesteps ``t < timestep_threshold``, the RAU-Net (its copy
    with ITBs on the up blocks of ``rau_levels``; SD 2.1's SC3/SC4 are levels 2 and 3) on ``t >= timestep_threshold``;
    the VAE and text encoder are frozen. Captions: ``prompt_template`` filled with the folder's class name. The
    paper: SD 2.1, 512 px, batch 1, lr 5e-6 with 5000 warm-up steps, 100k steps per stage, fp16. Needs ``diffusers``
    and ``transformers`` and the weights at ``pretrained_path`` (a diffusers directory with unet/, vae/,
    text_encoder/, tokenizer/, scheduler/, e.g. a local copy of stabilityai/stable-diffusion-2-1). Not run in plpriv's
    tests (no weights, no diffusers there): only its argument checks are.
    """

    def __init__(
        self,
        pretrained_path: str,
        timestep_threshold: int = 500,
        rau_levels: Sequence[int] = (2, 3),
        itb: str = "conv3x3",
        lr: float = 5e-6,
        warmup_steps: int = 5000,
        prompt_template: str = "a photo of {}",
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if itb not in ITB_KINDS:
            raise ValueError(f"unknown itb {itb!r}; choose one of {list(ITB_KINDS)}")
        from pathlib import Path

        root = Path(pretrained_path)
        missing = [p for p in _SD_PARTS if not (root / p).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"LoyalStableDiffusion: no Stable Diffusion weights at pretrained_path={pretrained_path!r} (missing "
                f"{missing}); it needs a diffusers directory with {list(_SD_PARTS)}, e.g. "
                "`huggingface-cli download stabilityai/stable-diffusion-2-1 --local-dir <path>` on a machine with "
                "internet, then --model.init_args.pretrained_path <path>")
        try:
            from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
            from transformers import AutoTokenizer, CLIPTextModel
        except ImportError as err:
            raise ImportError("LoyalStableDiffusion needs `diffusers` and `transformers`: "
                              "python -m pip install diffusers transformers") from err
        from plpriv.nets.itb import install_itbs_diffusers

        self.save_hyperparameters()
        self.scheduler = DDPMScheduler.from_pretrained(root / "scheduler")
        if not 0 < timestep_threshold < self.scheduler.config.num_train_timesteps:
            raise ValueError(f"timestep_threshold must be in (0, {self.scheduler.config.num_train_timesteps}), "
                             f"got {timestep_threshold}")
        self.tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder").requires_grad_(False)
        self.vae = AutoencoderKL.from_pretrained(root / "vae").requires_grad_(False)
        self.unet = UNet2DConditionModel.from_pretrained(root / "unet")
        self.rau_unet = copy.deepcopy(self.unet)  # same base weights
        install_itbs_diffusers(self.rau_unet, rau_levels, itb)
        self.timestep_threshold = int(timestep_threshold)
        self.lr, self.warmup_steps = float(lr), int(warmup_steps)
        self.prompt_template = prompt_template
        self.class_names = list(class_names) if class_names is not None else None

    def _prompts(self, labels: Tensor) -> list[str]:
        names = self.class_names or getattr(getattr(self.trainer, "datamodule", None), "class_names", None)
        return [self.prompt_template.format(names[int(i)] if names else int(i)) for i in labels]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = batch[0], batch[1]
        with torch.no_grad():
            latents = self.vae.encode(images).latent_dist.sample() * self.vae.config.scaling_factor
            ids = self.tokenizer(self._prompts(labels), padding="max_length", truncation=True, return_tensors="pt",
                                 max_length=self.tokenizer.model_max_length).input_ids.to(self.device)
            text = self.text_encoder(ids)[0]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), device=self.device)
        noise = torch.randn_like(latents)
        noisy = self.scheduler.add_noise(latents, noise, t)
        target = (self.scheduler.get_velocity(latents, noise, t)
                  if self.scheduler.config.prediction_type == "v_prediction" else noise)
        high = t >= self.timestep_threshold  # the paper: RAU-Net for t >= tau, plain U-Net below
        pred = torch.zeros_like(target)
        for net, sel in ((self.rau_unet, high), (self.unet, ~high)):
            if bool(sel.any()):  # batch 1 in the paper: one network per step
                pred[sel] = net(noisy[sel], t[sel], text[sel]).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in (*self.unet.parameters(), *self.rau_unet.parameters()) if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr)
        warmup = lambda step: min((step + 1) / max(self.warmup_steps, 1), 1.0)  # noqa: E731  linear warm-up
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, warmup), "interval": "step"}}
