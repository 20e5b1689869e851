"""EDM diffusion training (Karras et al., NeurIPS 2022) for any EDM-style network, e.g. plpriv.nets.SongUNet with or
without LoRA-conditioned attention (Choi et al., TMLR 2024)."""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.utils.data import DataLoader

from plpriv.metrics.fid import FID
from plpriv.nets.augment import NonLeakingAugment
from plpriv.nets.edm_precond import EDMLoss, EDMPrecond
from plpriv.privacy.contract import PublicBatch
from plpriv.sampling.edm import StepCallback, edm_sampler
from plpriv.sampling.guidance import Guidance, GuidedDenoiser
from plpriv.utils.figures import run_dir, save_and_log_images
from plpriv.utils.samples import SampleWriter
from plpriv.utils.seeding import derive_seed

__all__ = ["EDM", "NonLeakingAugment"]

_SAMPLER_KEYS = frozenset(
    p for p in inspect.signature(edm_sampler).parameters if p not in ("net", "latents", "class_labels", "generator", "callback")
)


def network_weights(path: str) -> dict[str, torch.Tensor]:
    """The raw network's weights from a plpriv EDM checkpoint (its EMA weights first) or a plain state dict."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"`init_checkpoint` {path!r} holds no state dict")
    for prefix in ("ema.model.", "net.model.", "model.", ""):
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if weights:
            return weights
    raise ValueError(f"`init_checkpoint` {path!r} holds an empty state dict")


def _eval_during_forward(module: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook: remember every submodule's mode, then run the forward in eval mode."""
    module.modes_before_forward = [m.training for m in module.modules()]
    module.eval()


def _restore_modes_after_forward(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    """Forward hook (also on error): give every submodule back the mode it had before the forward."""
    modes = module.__dict__.pop("modes_before_forward", None)
    if modes is not None:
        for m, mode in zip(module.modules(), modes):
            m.training = mode


class EDM(LightningModule):
    """EDM diffusion model: preconditioning, loss, Adam with lr ramp-up, EMA, Heun sampling, validation and FID.

    Training follows EDM's CIFAR-10 recipe: loss summed over pixels and averaged over the batch, lr ramped linearly
    over ``lr_rampup_img`` images, EMA with half-life ``ema_halflife_img`` images (ramped to
    ``ema_rampup_ratio * images seen``), gradients passed through ``nan_to_num``. All training randomness (sigma, noise,
    augmentation, dropout) is drawn from a generator seeded by ``(seed, global_step, rank, batch_idx)`` (and the call
    count when ``training_step`` runs several times per batch), so a run resumed from a checkpoint continues exactly
    as an uninterrupted one (given the datamodule's per-epoch seeded shuffling). The EMA network is a registered,
    frozen copy (``self.ema``): it is saved in checkpoints, updated under ``no_grad`` after each optimizer step (never
    a forward pass, so DP-SGD callbacks that wrap the optimizer are unaffected), and used for validation, sampling and
    prediction.

    Under DP-SGD (:mod:`plpriv.privacy.contract`: :meth:`configure_private_training` with a :class:`PublicBatch`) the
    sampled batch size is private: the lr ramp, the EMA and ``images_seen`` count the public expected batch B per
    optimizer step, ``nan_to_num`` also cleans the per-sample gradients (``p.grad_sample``) before clipping, and no
    statistic of the training batch is logged (``train/*``).

    Denoiser protocol (callbacks find it by duck typing, never by importing this class):
        ``denoise(x, sigma, class_labels=None, use_ema=True) -> D(x; sigma)`` (fp32, eval mode, differentiable in
        ``x``); ``ema_denoiser`` / ``denoiser``: the EMA (frozen, always eval) / online
        :class:`~plpriv.nets.EDMPrecond` (``net(x, sigma, class_labels)``); ``sample(num_samples, class_labels=None,
        ...) -> [N, C, H, W]`` in ``[-1, 1]``; ``num_classes`` (0 = unconditional), ``image_shape``, ``sigma_data``.
        ``class_labels`` are integer classes ``[B]`` or one-hot ``[B, num_classes]``.

    Args:
        net: raw network ``F(x, c_noise, class_labels, augment_labels=None)``, e.g. :class:`plpriv.nets.SongUNet`; its
            ``label_dim`` makes the model class-conditional, ``img_resolution``/``in_channels`` give the image shape.
        sigma_data, P_mean, P_std: EDM preconditioning and noise distribution (Table 1).
        optimizer: ``params -> Optimizer``; default Adam(lr 1e-3, betas (0.9, 0.999), eps 1e-8) as in EDM.
        lr_rampup_img: images over which the lr ramps linearly from 0 (EDM: 10 Mimg).
        ema_halflife_img: EMA half-life in images (EDM: 0.5 Mimg); ema_rampup_ratio: ``None`` disables the ramp.
        augment_p: probability of each non-leaking augmentation (EDM CIFAR-10: 0.12; 0 = off). Needs ``net``
            with ``augment_dim = 9``.
        grad_nan_to_num: replace NaN/inf gradients as EDM does (under DP-SGD the per-sample gradients too).
        seed: root of all training/validation/sampling randomness.
        sampler_kwargs: overrides of :func:`plpriv.sampling.edm_sampler` settings (``num_steps``, ``S_churn``, ...).
        image_shape: ``(C, H, W)`` when ``net`` lacks ``in_channels``/``img_resolution``.
        val_sigmas: noise levels at which validation loss is logged (``val/loss@sigma=<s>``).
        num_val_samples: samples drawn with the EMA net after every validation epoch for the grid
            ``<log dir>/val_samples/epoch<NNNN>.png`` (one per validation, upscaled to >= 512 px for viewing).
        fid_feature: feature network for FID (an ``nn.Module``, e.g. :class:`plpriv.metrics.ClassifierFeatures`), or
            ``"inception"`` (needs torch-fidelity), or ``None`` (no FID). A feature net with ``logits`` also gives
            ``val/sample_acc``: how often a class-conditional sample is classified as its requested class.
        fid_num_samples: generated images per FID evaluation (EDM: 50,000).
        fid_real_split: images giving the real statistics: ``"val"`` (collected during the first validation) or
            ``"train"`` (the datamodule's training set, as EDM does, computed once at the first validation).
        sample_batch_size: batch size of sampling in validation.
        predict_num_samples, predict_batch_size, predict_class: ``trainer.predict`` draws this many samples (seeds
            ``0..N-1``; class ``seed % num_classes`` unless ``predict_class`` is set).
        predict_dir: where prediction writes PNG grids and ``samples.npz`` (default ``<log dir>/samples``; under the
            CLI the log dir of predict is ``<run dir>/predict``). Without it and without a logger nothing is written.
        init_checkpoint: start from these weights (fine-tuning, e.g. the LoRA paper's recipe from a pretrained EDM
            net): a plpriv EDM checkpoint (its EMA weights) or a plain state dict of the raw network. Missing LoRA
            parameters keep their initialisation (LoRA starts as the identity); other missing keys are an error.
        guidance: guidance terms used by every sample (validation grids, FID, ``predict``): reward guidance,
            universal forward/backward guidance (:mod:`plpriv.sampling.guidance`, e.g. censored sampling); with
            ``sampler_kwargs: {recurrence: R}`` for self-recurrence. Not saved in checkpoints.
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_data: float = 0.5,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_rampup_img: float = 10_000_000,
        ema_halflife_img: float = 500_000,
        ema_rampup_ratio: float | None = 0.05,
        augment_p: float = 0.0,
        grad_nan_to_num: bool = True,
        seed: int = 0,
        sampler_kwargs: dict[str, Any] | None = None,
        image_shape: tuple[int, int, int] | None = None,
        val_sigmas: Sequence[float] = (0.02, 0.1, 0.5, 2.0, 10.0),
        num_val_samples: int = 64,
        fid_feature: nn.Module | str | None = None,
        fid_num_samples: int = 0,
        fid_real_split: Literal["val", "train"] = "val",
        sample_batch_size: int = 256,
        predict_num_samples: int = 100,
        predict_batch_size: int = 100,
        predict_class: int | None = None,
        predict_dir: str | None = None,
        init_checkpoint: str | None = None,
        guidance: Guidance | Sequence[Guidance] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"`net` must be an nn.Module (e.g. plpriv.nets.SongUNet), got {type(net).__name__}")
        for name, value in (("lr_rampup_img", lr_rampup_img), ("ema_halflife_img", ema_halflife_img)):
            if value < 0:
                raise ValueError(f"`{name}` must be >= 0, got {value!r}")
        if ema_rampup_ratio is not None and ema_rampup_ratio <= 0:
            raise ValueError(f"`ema_rampup_ratio` must be > 0 or None, got {ema_rampup_ratio!r}")
        for name, value in (("num_val_samples", num_val_samples), ("fid_num_samples", fid_num_samples),
                            ("predict_num_samples", predict_num_samples)):
            if value < 0:
                raise ValueError(f"`{name}` must be >= 0, got {value!r}")
        if sample_batch_size < 1 or predict_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {sample_batch_size!r} and {predict_batch_size!r}")
        bad = set(sampler_kwargs or {}) - _SAMPLER_KEYS
        if bad:
            raise ValueError(f"unknown `sampler_kwargs` {sorted(bad)}; allowed: {sorted(_SAMPLER_KEYS)}")
        with warnings.catch_warnings():  # modules passed from Python are dropped below
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters()
        # Under the CLI the hyperparameters are the config (net/optimizer as class_path dicts), which lets
        # `EDM.load_from_checkpoint` rebuild the model; objects passed from Python are not stored (no pickled modules).
        for key in ("net", "optimizer", "fid_feature", "guidance"):
            if not isinstance(self.hparams.get(key), (dict, str, type(None))):
                self._hparams.pop(key, None)
                self._hparams_initial.pop(key, None)

        if fid_real_split not in ("val", "train"):
            raise ValueError(f"`fid_real_split` must be 'val' or 'train', got {fid_real_split!r}")
        self.net = EDMPrecond(net, sigma_data=sigma_data)
        if init_checkpoint is not None:
            self._load_init_weights(init_checkpoint)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        # The EMA copy always *runs* in eval mode (no dropout) while its mode flags follow this module's, so
        # Lightning sees one train-mode tree at fit start and restores modes consistently around validation.
        self.ema.register_forward_pre_hook(_eval_during_forward)
        self.ema.register_forward_hook(_restore_modes_after_forward, always_call=True)
        self.loss_fn = EDMLoss(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data)
        self.num_classes = self.net.label_dim
        self.sigma_data = float(sigma_data)
        if image_shape is None:
            if not all(hasattr(net, a) for a in ("in_channels", "img_resolution")):
                raise ValueError(f"{type(net).__name__} has no `in_channels`/`img_resolution`: pass `image_shape=(C, H, W)`")
            image_shape = (int(net.in_channels), int(net.img_resolution), int(net.img_resolution))
        self.image_shape = tuple(int(v) for v in image_shape)

        self.augment: NonLeakingAugment | None = None
        if augment_p > 0:
            augment_dim = int(getattr(net, "augment_dim", 0) or 0)
            if augment_dim != NonLeakingAugment.label_dim:
                raise ValueError(
                    f"`augment_p`={augment_p} needs a network with augment_dim={NonLeakingAugment.label_dim}, "
                    f"got augment_dim={augment_dim}"
                )
            self.augment = NonLeakingAugment(p=augment_p)

        self.optimizer_factory = optimizer
        self.lr_rampup_img = float(lr_rampup_img)
        self.ema_halflife_img = float(ema_halflife_img)
        self.ema_rampup_ratio = ema_rampup_ratio
        self.grad_nan_to_num = grad_nan_to_num
        self.seed = int(seed)
        self.sampler_kwargs = dict(sampler_kwargs or {})
        if guidance is not None:
            GuidedDenoiser(self.net, guidance)  # checks the terms now, not at the first sample
        # Not a submodule: reward networks stay out of this model's checkpoints (moved to the device when sampling).
        self.guidance = guidance
        self.val_sigmas = [float(s) for s in val_sigmas]
        self.num_val_samples = num_val_samples
        self.fid_num_samples = fid_num_samples
        self.fid_real_split = fid_real_split
        self.sample_batch_size = sample_batch_size
        self.predict_num_samples = predict_num_samples
        self.predict_batch_size = predict_batch_size
        self.predict_class = predict_class
        self.predict_dir = predict_dir
        if predict_class is not None and not 0 <= predict_class < max(self.num_classes, 1):
            raise ValueError(f"`predict_class` {predict_class!r} is not a class of this model ({self.num_classes} classes)")

        self.fid: FID | None = None
        self._class_scorer: Callable[[Tensor], Tensor] | None = None
        if fid_feature is not None:
            if isinstance(fid_feature, str):
                if fid_feature != "inception":
                    raise ValueError(f"`fid_feature` must be an nn.Module, 'inception' or None, got {fid_feature!r}")
                fid_feature = None  # FID's default: Inception-v3 2048-d pool features
            self.fid = FID(fid_feature, reset_real_features=False, input_shape=self.image_shape)
            if fid_feature is not None and callable(getattr(fid_feature, "logits", None)):
                self._class_scorer = fid_feature.logits
        # Images the network has been trained on (EDM's cur_nimg): drives the EMA ramp; saved in checkpoints.
        self.register_buffer("images_seen", torch.zeros((), dtype=torch.int64))
        self._global_batch: float = 0
        self._public_batch: PublicBatch | None = None  # set under DP-SGD: schedules then count B, never len(batch)
        self._rng_key: tuple[int, int] | None = None  # (global_step, batch_idx) of the last training_rng call
        self._rng_calls = 0  # training_rng calls for that key (virtual steps call training_step per chunk)
        self._fid_real_ready = False
        self._writer = SampleWriter()
        self._checkpoint_epoch: int | None = None  # `plpriv validate --ckpt_path`: names the grid by its epoch

    def _load_init_weights(self, path: str) -> None:
        weights = network_weights(path)
        result = self.net.model.load_state_dict(weights, strict=False)
        from plpriv.nets.lora import lora_parameters

        lora_ids = {id(p) for p in lora_parameters(self.net.model)}
        lora_names = {n for n, p in self.net.model.named_parameters() if id(p) in lora_ids}
        missing = [k for k in result.missing_keys if k not in lora_names]
        if missing or result.unexpected_keys:
            raise ValueError(f"`init_checkpoint` {path!r} does not fit the network: missing {missing[:8]}, "
                             f"unexpected {result.unexpected_keys[:8]}")
        rank_zero_info(f"EDM: initialised from {path} ({len(weights)} tensors, {len(result.missing_keys)} LoRA "
                       "tensors left at their initialisation)")

    # ------------------------------------------------------------------------------------------------ protocol ---
    @property
    def denoiser(self) -> EDMPrecond:
        """The online (trained) denoiser ``D(x, sigma, class_labels)``."""
        return self.net

    @property
    def ema_denoiser(self) -> EDMPrecond:
        """The EMA denoiser ``D(x, sigma, class_labels)`` (frozen; every forward runs in eval mode)."""
        return self.ema

    @contextmanager
    def _eval_mode(self, module: nn.Module) -> Iterator[None]:
        was_training = module.training
        module.eval()
        try:
            yield
        finally:
            module.train(was_training)

    def denoise(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None, use_ema: bool = True) -> Tensor:
        """``D(x; sigma)`` with the EMA (default) or online network, in eval mode (no dropout).

        Differentiable in ``x`` (the EMA weights are frozen, so only ``x`` can carry a graph); wrap in
        ``torch.no_grad()`` when no derivative is needed.
        """
        net = self.ema if use_ema else self.net
        with self._eval_mode(net):
            return net(x, sigma, class_labels)

    def sampler_settings(self, **overrides: Any) -> dict[str, Any]:
        """EDM sampler settings: defaults of :func:`edm_sampler`, then ``sampler_kwargs``, then ``overrides``."""
        return {**self.sampler_kwargs, **overrides}

    @torch.no_grad()
    def sample(
        self,
        num_samples: int | None = None,
        class_labels: Tensor | None = None,
        latents: Tensor | None = None,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
        callback: StepCallback | None = None,
        guidance: Guidance | Sequence[Guidance] | None = None,
        **sampler_overrides: Any,
    ) -> Tensor:
        """Draw samples ``[N, C, H, W]`` (fp32, nominally ``[-1, 1]``, not clamped) with EDM's Heun sampler.

        ``class_labels``: integer classes ``[N]`` (default for a conditional model: ``arange(N) % num_classes``).
        ``latents``: standard normal ``[N, C, H, W]`` (default: drawn from ``generator``).
        ``guidance``: guidance terms (:mod:`plpriv.sampling.guidance`) for this call; default: the model's ``guidance``.
        """
        if latents is None:
            if num_samples is None:
                raise ValueError("give `num_samples` or `latents`")
            latents = torch.randn(num_samples, *self.image_shape, generator=generator, device=self.device)
        n = latents.shape[0]
        if self.num_classes and class_labels is None:
            class_labels = torch.arange(n, device=latents.device) % self.num_classes
        net = self.ema if use_ema else self.net
        guidance = self.guidance if guidance is None else guidance
        denoiser = GuidedDenoiser(net, guidance).to(self.device) if guidance is not None else net
        with self._eval_mode(net):
            x = edm_sampler(denoiser, latents.to(self.device), class_labels, generator=generator, callback=callback,
                            **self.sampler_settings(**sampler_overrides))
        return x.to(torch.float32)

    # ---------------------------------------------------------------------------------------------- training ---
    def configure_optimizers(self) -> Any:
        params = [p for p in self.net.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the network has no trainable parameters (freeze_base without LoRA?)")
        optimizer = self.optimizer_factory(params)
        if self.lr_rampup_img <= 0:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_private_training(self, batch: PublicBatch | None) -> None:
        """The public-batch contract (:class:`plpriv.privacy.contract.PrivateTrainingAware`): under DP the lr ramp,
        the EMA and ``images_seen`` use B = ``batch.expected_batch_size`` per optimizer step and training-batch
        statistics are not logged; ``None`` (the fit ended) restores the non-private behaviour."""
        if batch is not None:
            if not isinstance(batch, PublicBatch):
                raise ValueError(f"`batch` must be a PublicBatch or None, got {type(batch).__name__}")
            if not (math.isfinite(batch.expected_batch_size) and batch.expected_batch_size > 0):
                raise ValueError(f"`expected_batch_size` must be finite and > 0, got {batch.expected_batch_size!r}")
            if self.fid is not None and self.fid_real_split == "train":
                raise ValueError("fid_real_split='train' publishes FID against the private training set (unnoised): "
                                 "use fid_real_split='val' under DP")
            self._global_batch = float(batch.expected_batch_size)  # the lr ramp reads it before the first step
        self._public_batch = batch

    def log_training_metric(self, name: str, value: Tensor, **kwargs: Any) -> None:
        """``self.log`` for a statistic of the training batch; nothing under DP (unnoised private data)."""
        if self._public_batch is None:
            self.log(name, value, **kwargs)

    def _lr_factor(self, step: int) -> float:
        # EDM: lr * min(cur_nimg / lr_rampup_img, 1) with cur_nimg = step * global batch (0 at the first step);
        # under DP the global batch is the public B (see prepare_training_batch).
        return min(step * self._global_batch / max(self.lr_rampup_img, 1e-8), 1.0)

    def _rank(self) -> int:
        return self.trainer.global_rank if self._trainer is not None else 0

    def _world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    @contextmanager
    def seeded(self, *parts: int) -> Iterator[None]:
        """Run a block with the global RNG (dropout, sigma, noise) seeded by ``(seed, *parts)``; restore it afterwards.

        Streams used here: ``(0, global_step, rank, batch_idx[, call])`` training (:meth:`training_rng`), ``(1,
        batch_idx, rank)`` validation loss; a subclass drawing its own randomness should use another first part.
        """
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type if devices else "cuda"):
            torch.manual_seed(derive_seed(self.seed, *parts))
            yield

    def training_rng(self, batch_idx: int) -> contextlib.AbstractContextManager[None]:
        """The training step's random stream (sigma, noise, augmentation, dropout), seeded by ``(seed, 0,
        global_step, rank, batch_idx)``: a resumed run draws what an uninterrupted one would. Further calls for the
        same ``(global_step, batch_idx)`` (virtual steps: one ``training_step`` per chunk of a logical batch) add
        their call count ``1, 2, ...`` to the seed, so every chunk draws fresh sigma, noise and dropout."""
        step = self.global_step
        if self._rng_key != (step, batch_idx):
            self._rng_key, self._rng_calls = (step, batch_idx), 0
        call, self._rng_calls = self._rng_calls, self._rng_calls + 1
        return self.seeded(0, step, self._rank(), batch_idx, *((call,) if call else ()))  # call 0: the seed as before

    def conditioning_labels(self, y: Tensor | None) -> Tensor | None:
        """The class labels handed to the network: ``y`` for a class-conditional model, else ``None``."""
        return y if self.num_classes and y is not None else None

    @staticmethod
    def unpack_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
        """``(images, labels or None)`` from a batch that is an image tensor or an ``(images, labels, ...)`` tuple."""
        if isinstance(batch, (list, tuple)):
            return batch[0], (batch[1] if len(batch) > 1 else None)
        return batch, None

    def prepare_training_batch(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        """Start a training step: unpack ``batch``, check the image shape, record the global batch size (images per
        optimizer step over all ranks, read by the lr ramp and the EMA step; under DP the public B, whatever the
        sampled size and the number of chunks); returns ``(images, conditioning labels)``."""
        images, labels = self.unpack_batch(batch)
        if tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"{type(self).__name__} expects images {self.image_shape}, got "
                             f"{tuple(images.shape[1:])}: match the data's image_size/channels to the network's "
                             "img_resolution/in_channels")
        if self._public_batch is not None:
            self._global_batch = float(self._public_batch.expected_batch_size)
        else:
            self._global_batch = images.shape[0] * self._world_size() * self.trainer.accumulate_grad_batches
        return images, self.conditioning_labels(labels)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = self.prepare_training_batch(batch)
        with self.training_rng(batch_idx):
            augment_labels = None
            if self.augment is not None:
                images, augment_labels = self.augment(images)
            loss = self.loss_fn(self.net, images, labels, augment_labels)
        self.log_training_metric("train/loss", loss.mean(), prog_bar=True, batch_size=images.shape[0])
        return loss.sum(dim=tuple(range(1, loss.ndim))).mean()  # EDM: sum over pixels, mean over images

    def on_after_backward(self) -> None:
        # Virtual steps clip each chunk's per-sample gradients right after its backward: clean them here first.
        if self.grad_nan_to_num:
            self._clean_grad_samples()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.grad_nan_to_num:
            for p in self.net.parameters():
                if p.grad is not None:
                    torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)
            self._clean_grad_samples()

    def _clean_grad_samples(self) -> None:
        """``nan_to_num`` on opacus' per-sample gradients (DP-SGD builds the update from them, not ``p.grad``);
        before clipping, so every example's contribution stays bounded by the clipping norm."""
        for p in self.net.parameters():
            samples = getattr(p, "grad_sample", None)
            for g in samples if isinstance(samples, list) else [samples]:
                if isinstance(g, Tensor):
                    torch.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5, out=g)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    @torch.no_grad()
    def update_ema(self, batch_images: int | None = None) -> float:
        """One EMA step after an optimizer step (EDM): ``beta = 0.5 ** (batch / half_life)``; returns beta.

        ``batch_images``: images in this optimizer step over all ranks (default: what
        :meth:`prepare_training_batch` recorded), for loops that step the network outside ``training_step``.
        """
        if batch_images is not None:
            if isinstance(batch_images, bool) or not isinstance(batch_images, int) or batch_images < 0:
                raise ValueError(f"`batch_images` must be an int >= 0, got {batch_images!r}")
            self._global_batch = batch_images
        half_life = self.ema_halflife_img
        if self.ema_rampup_ratio is not None:
            half_life = min(half_life, float(self.images_seen) * self.ema_rampup_ratio)
        beta = 0.5 ** (self._global_batch / max(half_life, 1e-8))
        for p_ema, p_net in zip(self.ema.parameters(), self.net.parameters()):
            p_ema.copy_(p_net.detach().lerp(p_ema, beta))
        for b_ema, b_net in zip(self.ema.buffers(), self.net.buffers()):
            b_ema.copy_(b_net)
        self.images_seen += round(self._global_batch)  # under DP B (whole for DPSGD: the loader's batch_size)
        return beta

    # -------------------------------------------------------------------------------------------- validation ---
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = self.unpack_batch(batch)
        labels = self.conditioning_labels(labels)
        n = images.shape[0]
        with self.seeded(1, batch_idx, self._rank()):
            loss = self.loss_fn(self.ema, images, labels)
            self.log("val/loss", loss.mean(), prog_bar=True, batch_size=n, sync_dist=True)
            for s in self.val_sigmas:
                loss_s = self.loss_fn(self.ema, images, labels, sigma=torch.full((n,), s, device=images.device))
                self.log(f"val/loss@sigma={s:g}", loss_s.mean(), batch_size=n, sync_dist=True)
        if (self.fid is not None and self.fid_real_split == "val" and not self._fid_real_ready
                and not self.trainer.sanity_checking):
            self.fid.update(images, real=True)

    def _fid_real_from_train(self) -> None:
        """Real FID statistics over the training set, each rank a strided share (metric states are summed)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        dataset = getattr(datamodule, "train_dataset", None)
        if dataset is None:
            raise ValueError("fid_real_split='train' needs a datamodule with a `train_dataset`")
        indices = list(range(self._rank(), len(dataset), self._world_size()))
        loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=self.sample_batch_size)
        for batch in loader:
            images, _ = self.unpack_batch(batch)
            self.fid.update(images.to(self.device), real=True)  # type: ignore[union-attr]

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        # `trainer.log_dir` is a collective (broadcast) under DDP: every rank asks, before any rank-zero branch.
        log_dir = run_dir(self.trainer)
        if self.fid is not None and not self._fid_real_ready:
            if self.fid_real_split == "train":
                self._fid_real_from_train()
            self._fid_real_ready = True
        n_grid = self.num_val_samples if self.trainer.is_global_zero else 0
        n_fid = math.ceil(self.fid_num_samples / self._world_size()) if self.fid is not None else 0
        n_total = max(n_grid, n_fid, self.num_val_samples if self._class_scorer is not None else 0)
        if n_total == 0:
            return
        generator = torch.Generator(self.device).manual_seed(derive_seed(self.seed, 2, self._rank()))
        grid, correct, counted = [], 0, 0
        with self.trainer.precision_plugin.forward_context():
            for start in range(0, n_total, self.sample_batch_size):
                count = min(self.sample_batch_size, n_total - start)
                labels = (torch.arange(start, start + count, device=self.device) % self.num_classes
                          if self.num_classes else None)
                x = self.sample(count, labels, generator=generator).clamp(-1, 1)
                if start < n_grid:
                    grid.append(x[: n_grid - start].cpu())
                if start < n_fid and self.fid is not None:
                    self.fid.update(x[: n_fid - start], real=False)
                if self._class_scorer is not None and labels is not None:
                    correct += int((self._class_scorer(x).argmax(1) == labels).sum())
                    counted += count
        if grid and log_dir is not None:  # kept per validation; logged under one tag (a slider in TensorBoard)
            fitting = self.trainer.state.fn == "fit" or self._checkpoint_epoch is None
            epoch = self.current_epoch if fitting else self._checkpoint_epoch
            save_and_log_images(self.trainer, torch.cat(grid), f"val_samples/epoch{epoch:04d}",
                                nrow=self.num_classes or None, directory=log_dir, tag="val_samples")
        if n_fid and self.fid is not None:
            self.log("val/fid", self.fid.compute(), sync_dist=False)
            self.fid.reset()  # keeps the real statistics (reset_real_features=False)
        if counted:
            acc = torch.tensor(correct / counted, device=self.device)
            self.log("val/sample_acc", acc, sync_dist=True)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._checkpoint_epoch = checkpoint.get("epoch")

    # ---------------------------------------------------------------------------------------------- predict ----
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "predict" and datamodule is not None and not is_overridden(
            "predict_dataloader", datamodule, LightningDataModule
        ):
            # With a datamodule attached (always, under the CLI) Lightning asks only the datamodule for predict data;
            # one without predict data gets this module's seed loader.
            datamodule.predict_dataloader = self.predict_dataloader

    def predict_dataloader(self) -> DataLoader:
        """Seeds ``0..predict_num_samples-1`` (used when the datamodule defines no ``predict_dataloader``)."""
        return DataLoader(torch.arange(self.predict_num_samples), batch_size=self.predict_batch_size, shuffle=False)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Sample one image per seed in ``batch`` (int64 ``[B]``; an ``(images, labels)`` batch samples its labels)."""
        if isinstance(batch, Tensor) and not batch.is_floating_point():
            seeds = batch.long()
            labels = None
            if self.num_classes:
                labels = (torch.full_like(seeds, self.predict_class) if self.predict_class is not None
                          else seeds % self.num_classes)
        else:
            images, labels = self.unpack_batch(batch)
            start = batch_idx * images.shape[0]
            seeds = torch.arange(start, start + images.shape[0], device=images.device)
            labels = self.conditioning_labels(labels)
        # One generator per seed (as EDM's generate.py does): an image depends on its seed only, not on batching.
        latents = torch.stack([
            torch.randn(self.image_shape, generator=torch.Generator().manual_seed(derive_seed(self.seed, 3, int(s))))
            for s in seeds.tolist()
        ]).to(self.device)
        # Churn/recurrence noise: reproducible from the seed of the batch's first image (depends on the batching).
        noise = torch.Generator(self.device).manual_seed(derive_seed(self.seed, 4, int(seeds[0])))
        x = self.sample(latents=latents, class_labels=labels, generator=noise)
        uint8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        out = {"images": uint8.cpu(), "seeds": seeds.cpu()}
        if labels is not None:
            out["labels"] = labels.cpu()
        self._writer.add(out, x.clamp(-1, 1).cpu(), f"grid_{self._rank():02d}_{batch_idx:04d}",
                         self.num_classes or None)
        return out

    def on_predict_epoch_start(self) -> None:
        # ``predict_dir``, else ``<log dir>/samples`` (`trainer.log_dir` is a collective under DDP: resolved once)
        log_dir = run_dir(self.trainer)
        self._writer = SampleWriter(Path(self.predict_dir) if self.predict_dir
                                    else log_dir / "samples" if log_dir is not None else None)
        if self._writer.directory is None:
            rank_zero_warn("EDM: no logger and no `predict_dir`: samples are returned by predict but not written")

    def on_predict_epoch_end(self) -> None:
        written = self._writer.flush(f"_rank{self._rank()}" if self._world_size() > 1 else "")
        if written is not None:
            rank_zero_info(f"EDM: wrote {written[1]} samples to {written[0]} and PNG grids beside it")
