"""Frechet distance on images in ``[-1, 1]`` with a pluggable feature network (torchmetrics' FID underneath).

Inception-v3 (torchmetrics' default, needs ``torch-fidelity`` and its weights) is the standard; where it is not
available, or the data are far from ImageNet (8x8 digits), a classifier trained on the same data gives the features:
:class:`ClassifierFeatures` takes the input of the classifier's last ``nn.Linear`` (penultimate activations).
The feature network is kept out of ``state_dict``/``parameters()``, so it never enters a checkpoint or an optimizer.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

__all__ = ["FID", "ClassifierFeatures", "inception_available", "load_lightning_module"]


def inception_available() -> bool:
    """True when torchmetrics can build its Inception-v3 feature extractor (``torch-fidelity`` importable)."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return False
    return True


def load_lightning_module(checkpoint_path: str, class_path: str | None = None) -> nn.Module:
    """Load a LightningModule from a checkpoint without knowing its class up front.

    The class comes from ``class_path`` or from the ``_class_path`` hyperparameter LightningCLI stores; it is
    imported (the user named this checkpoint in a config, i.e. trusts it) and ``load_from_checkpoint`` restores it.
    """
    if class_path is None:
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        class_path = (ckpt.get("hyper_parameters") or {}).get("_class_path")
        if class_path is None:
            raise ValueError(
                f"checkpoint {checkpoint_path!r} does not record its LightningModule class (no `_class_path` "
                "hyperparameter: it was not trained through the plpriv CLI); pass `class_path`, "
                "e.g. 'plpriv.modules.ImageClassifier'"
            )
    module_name, _, name = class_path.rpartition(".")
    if not module_name:
        raise ValueError(f"`class_path` must be a dotted path like 'package.module.Class', got {class_path!r}")
    cls = getattr(importlib.import_module(module_name), name)
    model = cls.load_from_checkpoint(checkpoint_path, map_location="cpu")
    return model.eval()


class _Hidden(nn.Module):
    """Calls a module that is NOT registered as a child: no parameters, no state_dict entries, always eval mode.

    Device/dtype moves (``.to``, ``.cuda``) still reach it through ``_apply``.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "inner", module.eval().requires_grad_(False))

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> _Hidden:
        self.inner._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True) -> _Hidden:  # the wrapped network stays in eval mode
        return super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["inner"], name)


class ClassifierFeatures(nn.Module):
    """Penultimate features (the input of the last ``nn.Linear``) and logits of a trained classifier.

    Args:
        classifier: a classifier ``nn.Module`` mapping images in ``[-1, 1]`` to logits, or
        checkpoint_path: a Lightning checkpoint of one (see :func:`load_lightning_module`; ``class_path`` optional).
        layer: name of the ``nn.Linear`` whose input is the feature (default: the last one registered).

    ``forward(x)`` returns ``[N, num_features]``; :meth:`logits` returns the classifier output (for the accuracy of
    class-conditional samples). Frozen and always in eval mode.
    """

    def __init__(
        self,
        classifier: nn.Module | None = None,
        checkpoint_path: str | None = None,
        class_path: str | None = None,
        layer: str | None = None,
    ) -> None:
        super().__init__()
        if (classifier is None) == (checkpoint_path is None):
            raise ValueError("give exactly one of `classifier` and `checkpoint_path`")
        if classifier is None:
            classifier = load_lightning_module(str(checkpoint_path), class_path)
        linears = {name: m for name, m in classifier.named_modules() if isinstance(m, nn.Linear)}
        if not linears:
            raise ValueError(f"{type(classifier).__name__} has no nn.Linear layer to take penultimate features from")
        if layer is None:
            layer = list(linears)[-1]
        if layer not in linears:
            raise ValueError(f"`layer` {layer!r} is not an nn.Linear of the classifier; choose one of {list(linears)}")
        self.layer = layer
        self.num_features = linears[layer].in_features
        self.net = _Hidden(classifier)
        self._captured: Tensor | None = None
        linears[layer].register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        self._captured = args[0]

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        return self.net(x.float())

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        self._captured = None
        self.net(x.float())
        feats, self._captured = self._captured, None
        if feats is None:
            raise RuntimeError(f"layer {self.layer!r} was not called in the classifier's forward")
        return feats.flatten(1).float()


class FID(FrechetInceptionDistance):
    """FID between real and generated images, both given as float ``[N, C, H, W]`` in ``[-1, 1]``.

    Args:
        feature: ``None``/``2048``/``768``/``192``/``64``: Inception-v3 features (needs ``torch-fidelity``; images are
            converted to uint8 RGB, grayscale repeated); or any ``nn.Module`` mapping ``[-1, 1]`` images to
            ``[N, d]`` features (e.g. :class:`ClassifierFeatures`).
        reset_real_features: also clear the real statistics on ``reset()`` (``False`` keeps them across epochs).
        input_shape: ``(C, H, W)`` of the images, used to probe a custom network's feature size.

    The feature network is not part of ``state_dict()`` (checkpoints stay small).
    """

    def __init__(
        self,
        feature: int | nn.Module | None = None,
        reset_real_features: bool = True,
        input_shape: tuple[int, int, int] = (3, 32, 32),
        **kwargs: Any,
    ) -> None:
        if feature is None:
            feature = 2048
        if isinstance(feature, int) and not inception_available():
            raise ValueError(
                "Inception features need the `torch-fidelity` package (and its weights); install it or pass "
                "`feature=` a feature network, e.g. plpriv.metrics.ClassifierFeatures(checkpoint_path=...)"
            )
        if not isinstance(feature, (int, nn.Module)):
            raise TypeError(f"`feature` must be an int or an nn.Module, got {type(feature).__name__}")
        self._uses_inception = isinstance(feature, int)
        if isinstance(feature, nn.Module):
            feature = feature.eval().requires_grad_(False)
        super().__init__(
            feature=feature,
            reset_real_features=reset_real_features,
            normalize=True,
            input_img_size=tuple(input_shape),  # type: ignore[arg-type]
            **kwargs,
        )
        # Keep the feature network out of parameters()/state_dict() of this metric and of any module holding it.
        self.inception = _Hidden(self.inception)

    def update(self, imgs: Tensor, real: bool) -> None:  # type: ignore[override]
        if imgs.ndim != 4:
            raise ValueError(f"FID expects images [N, C, H, W] in [-1, 1], got shape {tuple(imgs.shape)}")
        imgs = imgs.detach().float().clamp(-1, 1)
        if self._uses_inception:
            # torchmetrics wants uint8 RGB for Inception (normalize=True takes [0, 1] floats and rounds them itself).
            if imgs.shape[1] == 1:
                imgs = imgs.expand(-1, 3, -1, -1)
            imgs = (imgs + 1) / 2
        super().update(imgs, real)
