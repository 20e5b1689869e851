"""Replication score: top-1 cosine similarity of generated samples to the training set.

Following Somepalli et al. ("Diffusion Art or Digital Forgery?", CVPR 2023) a generation is a replica when its most
similar training image, in a copy-detection feature space (SSCD, Pizzi et al., CVPR 2022), has cosine similarity
above a threshold (0.5 for SSCD). The training set's own top-1 similarities (each image to its nearest *other*
training image) give the background level a threshold should be read against.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

__all__ = ["ReplicationScore", "SSCDFeatures", "top1_cosine_similarity"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def top1_cosine_similarity(
    queries: Tensor, references: Tensor, batch_size: int = 1024, exclude: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Highest cosine similarity (and its index) of each query row among the reference rows.

    Rows must already be L2-normalised. Works in (batch_size x batch_size) blocks, so memory stays
    O(batch_size^2) however large the reference set is. ``exclude`` (one reference index per query) leaves out that
    reference, e.g. a training image's own row when computing the background distribution.
    """
    best = torch.full((queries.shape[0],), -float("inf"), dtype=queries.dtype, device=queries.device)
    best_idx = torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device)
    for qs in range(0, queries.shape[0], batch_size):
        q = queries[qs : qs + batch_size]
        b, bi = best[qs : qs + batch_size], best_idx[qs : qs + batch_size]
        for rs in range(0, references.shape[0], batch_size):
            sims = q @ references[rs : rs + batch_size].to(q.device).T
            if exclude is not None:
                ex = exclude[qs : qs + batch_size].to(q.device)
                own = (ex >= rs) & (ex < rs + sims.shape[1])
                sims[own.nonzero().squeeze(1), ex[own] - rs] = -float("inf")
            val, idx = sims.max(dim=1)
            better = val > b
            b[better], bi[better] = val[better], idx[better] + rs
    return best, best_idx


class SSCDFeatures(nn.Module):
    """SSCD copy-detection descriptor (Pizzi et al., CVPR 2022) from its TorchScript release, e.g.
    ``sscd_disc_mixup.torchscript.pt``. Preprocessing as the release's ``skew_320``: resize to 320x320, ImageNet
    normalisation; grey images are repeated to 3 channels. Inputs are images in ``input_range``."""

    def __init__(self, weights_path: str, input_range: tuple[float, float] = (-1.0, 1.0)) -> None:
        super().__init__()
        with warnings.catch_warnings():  # SSCD ships as TorchScript only; torch >= 2.10 flags jit.load as deprecated
            warnings.simplefilter("ignore", FutureWarning)
            self.model = torch.jit.load(weights_path, map_location="cpu")
        self.input_range = input_range
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        lo, hi = self.input_range
        x = ((images.float() - lo) / (hi - lo)).clamp(0, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(320, 320), mode="bilinear", align_corners=False, antialias=True)
        return self.model((x - self.mean) / self.std)


class ReplicationScore(Metric):
    """Top-1 cosine similarity of each generated sample to a reference (training) set, in a feature space.

    Args:
        reference: the training images, a tensor (N, ...) or an iterable of batches (tensors, or tuples/lists whose
            first element is the image batch, e.g. a DataLoader of ``(x, y)``). Features are extracted once, lazily,
            and kept (N x feature_dim floats; 512 for SSCD).
        feature: ``"pixels"`` (flattened images), ``"sscd"`` (needs ``sscd_path``), or any module/callable mapping an
            image batch to features (B, ...).
        sscd_path: path to an SSCD TorchScript file (see :class:`SSCDFeatures`).
        threshold: a sample replicates when its top-1 similarity exceeds this (0.5 is the SSCD convention).
        center: subtract the reference mean feature before the cosine (useful for pixels, where a shared
            background makes every pair similar).
        batch_size: block size for feature extraction and similarity search.
        background_queries: how many reference images (random, fixed seed) are compared with the rest of the set
            for the background distribution; ``None`` uses all of them (O(N^2)).
        input_range: value range of the images (for SSCD's preprocessing).

    ``compute()`` returns ``mean``, ``p95`` and ``fraction_above`` of the generated samples' top-1 similarities and
    the same three for the background (``background_*``). :meth:`per_sample` gives each sample's similarity and the
    index of its nearest reference image.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    similarity: list[Tensor]
    index: list[Tensor]

    def __init__(
        self,
        reference: Tensor | Iterable[Any],
        feature: Literal["pixels", "sscd"] | nn.Module | Callable[[Tensor], Tensor] = "pixels",
        *,
        sscd_path: str | None = None,
        threshold: float = 0.5,
        center: bool = False,
        batch_size: int = 1024,
        background_queries: int | None = 1000,
        input_range: tuple[float, float] = (-1.0, 1.0),
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(feature, str):
            if feature == "pixels":
                extractor: Callable[[Tensor], Tensor] | None = None
            elif feature == "sscd":
                if sscd_path is None:
                    raise ValueError("feature='sscd' needs sscd_path (e.g. sscd_disc_mixup.torchscript.pt)")
                extractor = SSCDFeatures(sscd_path, input_range)
            else:
                raise ValueError(f"feature must be 'pixels', 'sscd' or a module/callable, got {feature!r}")
        elif callable(feature):
            extractor = feature
        else:
            raise TypeError(f"feature must be 'pixels', 'sscd' or a module/callable, got {type(feature).__name__}")
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if background_queries is not None and background_queries < 1:
            raise ValueError(f"background_queries must be >= 1 or None, got {background_queries}")
        self.reference = reference
        self.extractor = extractor  # a module here is moved by .to() with the metric
        self.threshold = threshold
        self.center = center
        self.batch_size = batch_size
        self.background_queries = background_queries
        self.seed = seed
        self._ref_features: Tensor | None = None
        self._ref_mean: Tensor | None = None
        self._background: Tensor | None = None
        self.add_state("similarity", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    @torch.no_grad()
    def _features(self, images: Tensor) -> Tensor:
        out = []
        for s in range(0, images.shape[0], self.batch_size):
            chunk = images[s : s + self.batch_size].to(self.device)
            if self.extractor is None:
                out.append(chunk.float().flatten(1))
            else:
                if isinstance(self.extractor, nn.Module):
                    self.extractor.eval()
                out.append(self.extractor(chunk).float().flatten(1))
        return torch.cat(out)

    def _normalize(self, feats: Tensor) -> Tensor:
        if self.center:
            feats = feats - self._ref_mean.to(feats.device)
        return F.normalize(feats, dim=1)

    def reference_features(self) -> Tensor:
        """L2-normalised reference features (N, f), extracted on first use."""
        if self._ref_features is None:
            batches = [self.reference] if isinstance(self.reference, Tensor) else self.reference
            raw = []
            for batch in batches:
                if isinstance(batch, (tuple, list)):
                    batch = batch[0]
                if not isinstance(batch, Tensor):
                    raise TypeError(f"reference batches must be tensors or (x, ...) tuples, got {type(batch).__name__}")
                raw.append(self._features(batch))
            feats = torch.cat(raw)
            self._ref_mean = feats.mean(0)
            self._ref_features = self._normalize(feats)
        return self._ref_features

    def update(self, samples: Tensor) -> None:
        """Score a batch of generated samples (same layout and range as the reference images)."""
        ref = self.reference_features()
        queries = self._normalize(self._features(samples))
        sim, idx = top1_cosine_similarity(queries, ref.to(queries.device), self.batch_size)
        self.similarity.append(sim)
        self.index.append(idx)

    def per_sample(self) -> tuple[Tensor, Tensor]:
        """(similarity, nearest reference index) of every sample seen so far, in update order."""
        return dim_zero_cat(self.similarity), dim_zero_cat(self.index)

    def background(self) -> Tensor:
        """Top-1 similarity of (a random subset of) reference images to the *other* reference images."""
        if self._background is None:
            ref = self.reference_features()
            n = ref.shape[0]
            if self.background_queries is None or self.background_queries >= n:
                pick = torch.arange(n)
            else:
                pick = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[: self.background_queries]
            pick = pick.to(ref.device)
            self._background = top1_cosine_similarity(ref[pick], ref, self.batch_size, exclude=pick)[0]
        return self._background

    def _summary(self, sims: Tensor, prefix: str) -> dict[str, Tensor]:
        return {
            f"{prefix}mean": sims.mean(),
            f"{prefix}p95": torch.quantile(sims.double(), 0.95).to(sims.dtype),
            f"{prefix}fraction_above": (sims > self.threshold).float().mean(),
        }

    def compute(self) -> dict[str, Tensor]:
        sims, _ = self.per_sample()
        return {**self._summary(sims, ""), **self._summary(self.background().to(sims.device), "background_")}
