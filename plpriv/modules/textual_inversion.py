"""Textual inversion (Gal et al., ICLR 2023) for plpriv's EDM: learn a conditioning vector with the network frozen.

A class-conditional :class:`plpriv.nets.SongUNet` maps its label input ``y`` (``[B, label_dim]``, one-hot for a
trained class) to the embedding through ``map_label``; any float vector is a valid input (EDMPrecond and SongUNet
accept ``[B, label_dim]`` floats). Textual inversion here learns a new vector ``u`` in that label space (the analogue
of a new token embedding <S*>) by minimising EDM's denoising loss (EDM eq. 8) on the target images, every weight of
the network frozen:

    u* = argmin_u  E_{sigma, n} lambda(sigma) || D(x + sigma n; sigma, u) - x ||^2

Two entry points:

* :func:`invert_images`: one vector PER IMAGE (DPAgg-TI's first stage, Peetathawatchai et al., arXiv 2411.14639).
  The n optimisations run as one batch: the loss is a sum of per-image terms, the network is frozen and in eval mode
  (GroupNorm only: no batch statistics) and Adam is elementwise, so row i of the result equals a separate run on image
  i alone (tested); each image draws its noise from its own generator seeded by ``(seed, i)``, so under replace-one
  adjacency changing image j changes row j only.
* :class:`TextualInversion`: one SHARED vector over a data set, a LightningModule; with plpriv's DPSGD callback it is
  the DP-SGD textual inversion baseline. The vector lives in an ``nn.Embedding(1, label_dim)`` looked up with index
  0 (:class:`ConditioningToken`), so opacus' per-sample gradient hooks (which skip bare ``nn.Parameter``) see it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from plpriv.nets.edm_precond import EDMLoss, EDMPrecond
from plpriv.privacy.contract import PublicBatch
from plpriv.sampling.edm import edm_sampler
from plpriv.utils.seeding import derive_seed

__all__ = ["ConditioningToken", "TextualInversion", "denoising_loss", "initial_vector", "invert_images",
           "load_frozen_edm", "sample_with_vector"]


def load_frozen_edm(checkpoint: str | Path) -> tuple[EDMPrecond, dict[str, Any]]:
    """The EMA denoiser of a plpriv EDM checkpoint, frozen and in eval mode, and its sampler settings.

    Raises ``FileNotFoundError`` naming the path when it is missing, ``ValueError`` for an unconditional model.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"EDM checkpoint {str(path)!r} not found: train one first, e.g. "
                                "`plpriv fit -c recipes/dpagg/digits_withheld.yaml` (runs/.../checkpoints/last.ckpt)")
    from plpriv.modules.edm import EDM

    try:
        edm = EDM.load_from_checkpoint(str(path), map_location="cpu")
    except TypeError as err:  # no network spec among the hyperparameters
        raise ValueError(f"{str(path)!r} does not record its network (hyperparameters {err}): use a checkpoint "
                         "written by `plpriv fit` (LightningCLI stores the net's class_path and init_args)") from err
    if not edm.num_classes:
        raise ValueError(f"{str(path)!r} is an unconditional EDM (label_dim 0): textual inversion needs a class-"
                         "conditional network (a label input to invert into)")
    denoiser = edm.ema.requires_grad_(False).eval()
    return denoiser, dict(edm.sampler_kwargs)


def label_dim_of(denoiser: nn.Module) -> int:
    dim = int(getattr(denoiser, "label_dim", 0) or 0)
    if dim < 1:
        raise ValueError(f"the denoiser ({type(denoiser).__name__}) has no label input (label_dim={dim}): textual "
                         "inversion needs a class-conditional EDMPrecond")
    return dim


def initial_vector(label_dim: int, init: str | Sequence[float] | Tensor = "mean",
                   classes: Sequence[int] | None = None) -> Tensor:
    """The starting vector: ``"mean"`` (uniform mixture of the one-hot labels of ``classes``, default all: the
    centre of the trained labels), ``"zeros"`` (EDM's "no class" label) or an explicit vector ``[label_dim]``."""
    if isinstance(init, str):
        if init == "zeros":
            return torch.zeros(label_dim)
        if init == "mean":
            idx = list(range(label_dim)) if classes is None else [int(c) for c in classes]
            if not idx or any(not 0 <= c < label_dim for c in idx):
                raise ValueError(f"`classes` must be non-empty labels in 0..{label_dim - 1}, got {classes!r}")
            v = torch.zeros(label_dim)
            v[idx] = 1.0 / len(idx)
            return v
        raise ValueError(f"`init` must be 'mean', 'zeros' or a vector of length {label_dim}, got {init!r}")
    v = torch.as_tensor(init, dtype=torch.float32).flatten()
    if v.numel() != label_dim:
        raise ValueError(f"`init` has {v.numel()} entries, the network's label input has {label_dim}")
    return v.clone()


def denoising_loss(loss_fn: EDMLoss, denoiser: nn.Module, images: Tensor, labels: Tensor,
                   generator: torch.Generator | None = None) -> Tensor:
    """EDM's loss (eq. 8) per image ``[B]``: summed over pixels, as EDM's training sums before averaging."""
    loss = loss_fn(denoiser, images, labels, generator=generator)
    return loss.sum(dim=tuple(range(1, loss.ndim)))


def invert_images(
    denoiser: nn.Module,
    images: Tensor,
    steps: int = 200,
    lr: float = 0.05,
    noise_draws: int = 8,
    init: str | Sequence[float] | Tensor = "mean",
    init_classes: Sequence[int] | None = None,
    seed: int = 0,
    chunk_size: int = 64,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """One textual-inversion vector per image: ``[n, C, H, W]`` -> ``[n, label_dim]`` (frozen ``denoiser``).

    Each image i runs ``steps`` Adam steps (``lr``) on its own vector; every step averages the loss over
    ``noise_draws`` (sigma, noise) pairs drawn from image i's generator, seeded by ``derive_seed(seed, i)``. Images are
    processed ``chunk_size`` at a time (memory); row i does not depend on the other images. ``progress(k)`` is called
    after each chunk with the number of images done.
    """
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"`images` must be [n, C, H, W] with n >= 1, got shape {tuple(images.shape)}")
    for name, value in (("steps", steps), ("noise_draws", noise_draws), ("chunk_size", chunk_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
    if not lr > 0:
        raise ValueError(f"`lr` must be > 0, got {lr!r}")
    dim = label_dim_of(denoiser)
    start = initial_vector(dim, init, init_classes)
    loss_fn = EDMLoss(P_mean, P_std, float(getattr(denoiser, "sigma_data", 0.5)))
    was_training = denoiser.training
    requires = [p.requires_grad for p in denoiser.parameters()]
    denoiser.eval().requires_grad_(False)
    out = []
    try:
        for lo in range(0, images.shape[0], chunk_size):
            chunk = images[lo: lo + chunk_size].float()
            out.append(_invert_chunk(denoiser, chunk, start, loss_fn, steps, lr, noise_draws,
                                     [derive_seed(seed, i) for i in range(lo, lo + chunk.shape[0])]))
            if progress is not None:
                progress(lo + chunk.shape[0])
    finally:
        denoiser.train(was_training)
        for p, r in zip(denoiser.parameters(), requires):
            p.requires_grad_(r)
    return torch.cat(out)


@torch.enable_grad()
def _invert_chunk(denoiser: nn.Module, images: Tensor, start: Tensor, loss_fn: EDMLoss, steps: int, lr: float,
                  draws: int, seeds: list[int]) -> Tensor:
    n = images.shape[0]
    gens = [torch.Generator(device=images.device).manual_seed(s) for s in seeds]
    u = nn.Parameter(start.to(images.device).expand(n, -1).clone())
    opt = torch.optim.Adam([u], lr=lr)
    x = images.repeat_interleave(draws, dim=0)  # [n * draws, C, H, W]: image i's draws are rows i*draws...
    for _ in range(steps):
        # each image's (sigma, noise) from its own stream: independent of the other images
        rnd = torch.cat([torch.randn(draws, device=images.device, generator=g) for g in gens])
        noise = torch.cat([torch.randn((draws, *images.shape[1:]), device=images.device, generator=g) for g in gens])
        sigma = (rnd * loss_fn.P_std + loss_fn.P_mean).exp()
        labels = u.repeat_interleave(draws, dim=0)
        per_draw = loss_fn(denoiser, x, labels, sigma=sigma, noise=noise)
        # sum over images of each image's mean over its draws: d/du_i only sees image i
        loss = per_draw.sum(dim=(1, 2, 3)).reshape(n, draws).mean(1).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return u.detach().clone()


@torch.no_grad()
def sample_with_vector(denoiser: nn.Module, vector: Tensor, num_samples: int, generator: torch.Generator | None = None,
                       batch_size: int = 256, **sampler_kwargs: Any) -> Tensor:
    """``num_samples`` images ``[N, C, H, W]`` from EDM's Heun sampler conditioned on ``vector`` (``[label_dim]``)."""
    dim = label_dim_of(denoiser)
    vector = torch.as_tensor(vector, dtype=torch.float32).flatten()
    if vector.numel() != dim:
        raise ValueError(f"`vector` has {vector.numel()} entries, the network's label input has {dim}")
    shape = _image_shape(denoiser)
    out = []
    for lo in range(0, num_samples, batch_size):
        m = min(batch_size, num_samples - lo)
        latents = torch.randn((m, *shape), generator=generator)
        out.append(edm_sampler(denoiser, latents, vector.expand(m, -1), generator=generator, **sampler_kwargs).float())
    return torch.cat(out)


def _image_shape(denoiser: nn.Module) -> tuple[int, int, int]:
    model = denoiser
    while isinstance(getattr(model, "denoiser", None), nn.Module):  # a wrapper, e.g. plpriv.sampling.GuidedDenoiser
        model = model.denoiser
    model = getattr(model, "model", model)
    try:
        return int(model.in_channels), int(model.img_resolution), int(model.img_resolution)
    except AttributeError as err:
        raise ValueError(f"cannot read the image shape from {type(model).__name__} (needs in_channels and "
                         "img_resolution)") from err


class ConditioningToken(nn.Module):
    """A learned conditioning vector as the row of a one-row ``nn.Embedding`` (index 0 for every example), so that
    opacus' hooks compute its per-sample gradients (opacus puts hooks on layers, not on bare parameters)."""

    def __init__(self, label_dim: int, init: Tensor | None = None) -> None:
        super().__init__()
        self.embedding = nn.Embedding(1, label_dim)
        with torch.no_grad():
            self.embedding.weight.copy_(torch.zeros(label_dim) if init is None else init.reshape(1, label_dim))

    @property
    def vector(self) -> Tensor:
        return self.embedding.weight[0]

    def forward(self, batch: int, device: torch.device | None = None) -> Tensor:
        """The vector repeated for ``batch`` examples, ``[batch, label_dim]`` (a lookup: per-sample grads exist)."""
        return self.embedding(torch.zeros(batch, dtype=torch.long, device=device or self.vector.device))


class TextualInversion(LightningModule):
    """One shared conditioning vector learned by textual inversion on a data set, the EDM network frozen.

    Non-private it is textual inversion over the whole private set; with :class:`plpriv.callbacks.DPSGD` it is the
    DP-SGD TI baseline of DPAgg-TI (only the vector is private-trained; the frozen network has no hooks). Batches
    are image tensors or ``(images, labels)`` (labels ignored). The loss is EDM's (eq. 8), summed over pixels and
    averaged over the batch, its randomness seeded by ``(seed, global_step, batch_idx)``.

    Args:
        checkpoint: a plpriv EDM checkpoint (its EMA denoiser is used), or ``None`` with ``denoiser``.
        denoiser: a class-conditional :class:`~plpriv.nets.EDMPrecond` (frozen here).
        init, init_classes: the starting vector (:func:`initial_vector`).
        lr: Adam's learning rate. P_mean, P_std: EDM's noise distribution. seed: the loss's randomness.
    """

    def __init__(self, checkpoint: str | None = None, denoiser: nn.Module | None = None,
                 init: str | Sequence[float] | Tensor = "mean", init_classes: Sequence[int] | None = None,
                 lr: float = 0.05,
                 P_mean: float = -1.2, P_std: float = 1.2, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["denoiser"])
        if (checkpoint is None) == (denoiser is None):
            raise ValueError("give exactly one of `checkpoint` (a plpriv EDM checkpoint) and `denoiser`")
        self.sampler_kwargs: dict[str, Any] = {}
        if checkpoint is not None:
            denoiser, self.sampler_kwargs = load_frozen_edm(checkpoint)
        self.denoiser = denoiser.requires_grad_(False).eval()
        self.label_dim = label_dim_of(denoiser)
        self.token = ConditioningToken(self.label_dim, initial_vector(self.label_dim, init, init_classes))
        if not lr > 0:
            raise ValueError(f"`lr` must be > 0, got {lr!r}")
        self.lr, self.seed = float(lr), int(seed)
        self.loss_fn = EDMLoss(P_mean, P_std, float(getattr(denoiser, "sigma_data", 0.5)))
        self._public_batch: PublicBatch | None = None

    @property
    def vector(self) -> Tensor:
        """The learned conditioning vector ``[label_dim]`` (detached)."""
        return self.token.vector.detach().clone()

    def train(self, mode: bool = True) -> TextualInversion:
        super().train(mode)
        self.denoiser.eval()  # frozen: always eval (no dropout)
        return self

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.token.parameters(), lr=self.lr)

    def configure_private_training(self, batch: PublicBatch | None) -> None:
        """The public-batch contract (:mod:`plpriv.privacy.contract`): under DP no training statistic is logged."""
        self._public_batch = batch

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        gen = torch.Generator(device=images.device).manual_seed(derive_seed(self.seed, self.global_step, batch_idx))
        loss = denoising_loss(self.loss_fn, self.denoiser, images, self.token(images.shape[0], images.device), gen)
        if self._public_batch is None:
            self.log("train/loss", loss.mean(), prog_bar=True, batch_size=images.shape[0])
        return loss.mean()

    def sample(self, num_samples: int, generator: torch.Generator | None = None, **sampler_kwargs: Any) -> Tensor:
        """Samples conditioned on the learned vector (the checkpoint's sampler settings, then ``sampler_kwargs``)."""
        return sample_with_vector(self.denoiser, self.vector, num_samples, generator,
                                  **{**self.sampler_kwargs, **sampler_kwargs})
