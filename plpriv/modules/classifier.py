"""Image classification: plpriv's small CNN or any timm model, with torchmetrics accuracy."""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from plpriv.nets.small_cnn import SmallCNN, norm_layer
from plpriv.privacy.contract import PublicBatch


def build_backbone(
    backbone: str,
    num_classes: int,
    in_chans: int,
    norm: Literal["group", "batch", "none"],
    pretrained: bool,
    backbone_kwargs: dict[str, Any],
) -> nn.Module:
    """``"small_cnn"`` -> :class:`plpriv.nets.SmallCNN`; any other name -> ``timm.create_model``.

    ``norm="group"`` passes a GroupNorm ``norm_layer`` to timm models that take one (ResNets, ConvNeXt, ...), so the
    model has no BatchNorm and works under DP-SGD. ``backbone_kwargs={"cifar_stem": True}`` (timm ResNets) replaces
    the ImageNet stem (7x7 stride-2 conv + max-pool, /4) by a 3x3 stride-1 conv and no pooling, the CIFAR ResNet of
    He et al. 2016: on 16x16 or 32x32 images the ImageNet stem leaves the last stages at 1x1.
    """
    kwargs = dict(backbone_kwargs)
    cifar = kwargs.pop("cifar_stem", False)
    if not isinstance(cifar, bool):
        raise TypeError(f"`cifar_stem` must be a bool, got {type(cifar).__name__}")
    if backbone == "small_cnn":
        if cifar:
            raise ValueError("`cifar_stem` applies to timm ResNets, not small_cnn")
        return SmallCNN(in_chans=in_chans, num_classes=num_classes, norm=norm, **kwargs)
    import timm

    if not timm.is_model(backbone):
        raise ValueError(f"unknown backbone {backbone!r}: use 'small_cnn' or a timm model name (timm.list_models())")
    if norm != "batch":
        kwargs.setdefault("norm_layer", partial(norm_layer, kind=norm))
    try:
        net = timm.create_model(backbone, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as err:
        raise ValueError(
            f"timm model {backbone!r} does not accept {sorted(kwargs)} ({err}); use norm='batch' and let "
            "DP-SGD's fix_modules swap BatchNorm, or pick a model whose constructor takes `norm_layer`"
        ) from err
    return with_cifar_stem(net) if cifar else net


def with_cifar_stem(net: nn.Module) -> nn.Module:
    """Give a timm ResNet (single-conv stem) the CIFAR stem in place: conv1 -> 3x3 stride 1, maxpool -> Identity."""
    conv1 = getattr(net, "conv1", None)
    if not isinstance(conv1, nn.Conv2d) or not isinstance(getattr(net, "maxpool", None), nn.MaxPool2d):
        raise ValueError(f"`cifar_stem` needs a timm ResNet with the default stem (a Conv2d `conv1` and a MaxPool2d "
                         f"`maxpool`), not {type(net).__name__}")
    net.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # timm's ResNet init
    net.maxpool = nn.Identity()
    for entry in getattr(net, "feature_info", []):  # strides shrink: stem /2 -> /1, stages /4 more
        entry["reduction"] = 1 if entry["module"] == "act1" else entry["reduction"] // 4
    return net


class ImageClassifier(LightningModule):
    """Cross-entropy classifier; logs ``train/loss`` (not under DP-SGD: a statistic of the private batch),
    ``val/loss``, ``val/acc``, ``test/acc``.

    Args:
        backbone: ``"small_cnn"`` or a timm model name (``resnet18``, ``convnext_atto``, ...).
        num_classes: number of classes.
        in_chans: input channels.
        norm: normalisation layers: ``group`` (DP-compatible), ``batch`` or ``none``.
        pretrained: load timm's pretrained weights (needs network access or a local HF cache).
        backbone_kwargs: extra constructor arguments of the backbone; ``cifar_stem: true`` gives a timm ResNet the
            CIFAR stem (3x3 stride-1 conv, no max-pool; for small images, as the unlearning papers' ResNet-18).
        optimizer: callable ``params -> Optimizer`` (from YAML: ``class_path: torch.optim.SGD`` + ``init_args``).
        lr_scheduler: optional callable ``optimizer -> LRScheduler``, stepped every epoch.
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(
        self,
        backbone: str = "small_cnn",
        num_classes: int = 10,
        in_chans: int = 1,
        norm: Literal["group", "batch", "none"] = "group",
        pretrained: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be >= 2, got {num_classes!r}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.net = build_backbone(backbone, num_classes, in_chans, norm, pretrained, backbone_kwargs or {})
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.label_smoothing = label_smoothing
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self._public_batch: PublicBatch | None = None  # set under DP-SGD (plpriv.privacy.contract)

    def configure_private_training(self, batch: PublicBatch | None) -> None:
        """The public-batch contract (:class:`plpriv.privacy.contract.PrivateTrainingAware`): under DP (``batch`` not
        ``None``) no statistic of the training batch is logged."""
        if batch is not None and not isinstance(batch, PublicBatch):
            raise ValueError(f"`batch` must be a PublicBatch or None, got {type(batch).__name__}")
        self._public_batch = batch

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _check_batch(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.hparams.in_chans:
            raise ValueError(
                f"ImageClassifier expects images [N, {self.hparams.in_chans}, H, W], got {tuple(x.shape)}: "
                "set `in_chans` to the data's `channels`"
            )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        self._check_batch(x)
        loss = F.cross_entropy(self(x), y, label_smoothing=self.label_smoothing)
        if self._public_batch is None:  # under DP the batch's loss (and size) is private
            self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True, batch_size=len(y), sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True, batch_size=len(y))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc, batch_size=len(y))

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).argmax(dim=1)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}
