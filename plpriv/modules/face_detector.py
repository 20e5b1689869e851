"""Always-on face detection on sensor RAW with ternary weights (Lee et al., "Fully Quantized Always-on Face Detector
Considering Mobile Image Sensors", ICCV 2023 workshops, arXiv 2311.01001).

A shallow anchor-free detector (:class:`plpriv.nets.FaceCenterNet`) on packed RAW, float, ternary (TWN/TTQ, first and
last layer float) or fully quantized (every conv ternary, PACT activations); mAP@0.5 by torchmetrics in validation and
test; boxes drawn on the first validation images saved as PNG (``<run dir>/val_boxes/epoch<N>.png``) and logged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision

from plpriv.nets.face_detector import FaceCenterNet, centernet_loss, decode
from plpriv.nets.ternary import ternarize

Quantization = Literal["float", "ternary", "full"]
Batch = tuple[Tensor, list[dict[str, Tensor]]]


class TernaryFaceDetector(LightningModule):
    """Logs ``train/loss``, ``val/loss``, ``val/map50``, ``test/map50``.

    Args:
        in_chans: input planes (4: packed RGGB RAW; 3: RGB).
        widths: the five conv widths of :class:`plpriv.nets.FaceCenterNet`.
        quantization: ``float``, ``ternary`` (inner convs ternary) or ``full`` (all convs ternary + ``act_bits`` PACT).
        ternary_mode: ``twn`` or ``ttq``.
        act_bits: activation bits for ``full`` (2-8).
        init_checkpoint: optional float (or any) checkpoint of this module whose weights initialise the net before
            ternarization (ternary nets are usually fine-tuned from a float one).
        top_k, min_score: detections kept per image.
        num_log_images: validation images drawn with boxes per epoch (0: none).
        optimizer, lr_scheduler: callables from YAML.
    """

    def __init__(
        self,
        in_chans: int = 4,
        widths: Sequence[int] = (16, 32, 64, 64, 64),
        quantization: Quantization = "float",
        ternary_mode: Literal["twn", "ttq"] = "twn",
        act_bits: int = 4,
        init_checkpoint: str | None = None,
        top_k: int = 20,
        min_score: float = 0.01,
        num_log_images: int = 8,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if quantization not in ("float", "ternary", "full"):
            raise ValueError(f"`quantization` must be 'float', 'ternary' or 'full', got {quantization!r}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.net = FaceCenterNet(in_chans=in_chans, widths=widths)
        if init_checkpoint is not None:
            state = torch.load(init_checkpoint, map_location="cpu", weights_only=False)
            state = state.get("state_dict", state)
            net_state = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
            self.net.load_state_dict(net_state, strict=False)
        if quantization != "float":
            ternarize(self.net, mode=ternary_mode, fully_quantized=quantization == "full",
                      act_bits=act_bits if quantization == "full" else None)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.val_map = MeanAveragePrecision(iou_thresholds=[0.5], box_format="xyxy")
        self.test_map = MeanAveragePrecision(iou_thresholds=[0.5], box_format="xyxy")
        self._val_images: tuple[Tensor, list[dict[str, Tensor]], list[dict[str, Tensor]]] | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def detect(self, x: Tensor) -> list[dict[str, Tensor]]:
        """Boxes (xyxy, input pixels), scores and labels per image."""
        return decode(self(x), self.net.stride, self.hparams.top_k, self.hparams.min_score)

    def _check(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.hparams.in_chans or x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"TernaryFaceDetector expects [N, {self.hparams.in_chans}, H, W] with H, W divisible by 4, "
                             f"got {tuple(x.shape)}: set `in_chans` to the data's channels (4 for RAW)")

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        x, targets = batch
        self._check(x)
        losses = centernet_loss(self(x), targets, self.net.stride, tuple(x.shape[-2:]))
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=len(x))
        self.log("train/heatmap_loss", losses["heatmap"], batch_size=len(x))
        return losses["loss"]

    def _evaluate(self, batch: Batch, metric: MeanAveragePrecision) -> tuple[Tensor, list[dict[str, Tensor]]]:
        x, targets = batch
        out = self(x)
        preds = decode(out, self.net.stride, self.hparams.top_k, self.hparams.min_score)
        metric.update(preds, targets)
        return centernet_loss(out, targets, self.net.stride, tuple(x.shape[-2:]))["loss"], preds

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        loss, preds = self._evaluate(batch, self.val_map)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch[0]), sync_dist=True)
        if batch_idx == 0 and self.hparams.num_log_images:
            k = self.hparams.num_log_images
            cpu = lambda ds: [{kk: v.cpu() for kk, v in d.items()} for d in ds[:k]]  # noqa: E731
            self._val_images = (batch[0][:k].detach().cpu(), cpu(preds), cpu(batch[1]))

    def on_validation_epoch_end(self) -> None:
        self.log("val/map50", self.val_map.compute()["map_50"], prog_bar=True)
        self.val_map.reset()
        if self._val_images and not self.trainer.sanity_checking:
            images, preds, targets = self._val_images
            save_detections(self.trainer, images, preds, targets, f"val_boxes/epoch{self.current_epoch:03d}")
        self._val_images = None

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_map)

    def on_test_epoch_end(self) -> None:
        self.log("test/map50", self.test_map.compute()["map_50"])
        self.test_map.reset()

    def predict_step(self, batch: Any, batch_idx: int) -> list[dict[str, Tensor]]:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.detect(x)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}


def draw_detections(images: Tensor, preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]] | None = None,
                    score_threshold: float = 0.3) -> Tensor:
    """``[N, 3 | 4, H, W]`` (RGB or packed RAW) -> ``[N, 3, H, W]`` in [0, 1]: ground truth green, detections red."""
    from torchvision.utils import draw_bounding_boxes

    from plpriv.data.raw import raw_preview

    view = raw_preview(images) if images.shape[1] == 4 else images.clamp(0, 1)
    out = []
    for i, im in enumerate(view):
        canvas = (im * 255).round().to(torch.uint8)
        if targets is not None and len(targets[i]["boxes"]):
            canvas = draw_bounding_boxes(canvas, targets[i]["boxes"], colors="lime")
        keep = preds[i]["scores"] >= score_threshold
        if keep.any():
            canvas = draw_bounding_boxes(canvas, preds[i]["boxes"][keep], colors="red")
        out.append(canvas.float() / 255)
    return torch.stack(out)


def save_detections(trainer: Any, images: Tensor, preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]],
                    name: str, score_threshold: float = 0.3) -> None:
    """Draw and save/log as ``<run dir>/<name>.png`` (nothing without a logger), with a legend for the box colours."""
    from matplotlib.patches import Patch
    from torchvision.utils import make_grid

    from plpriv.utils.figures import figure, save_and_log_figure

    grid = make_grid(draw_detections(images, preds, targets, score_threshold), nrow=min(8, len(images)), padding=2)
    height, width = grid.shape[1:]
    fig = figure(figsize=(10, 10 * height / width + 0.6), dpi=100)
    ax = fig.add_axes((0, 0, 1, 10 * height / width / (10 * height / width + 0.6)))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.axis("off")
    fig.legend(handles=[Patch(edgecolor="lime", facecolor="none", label="ground truth"),
                        Patch(edgecolor="red", facecolor="none", label=f"detection (score >= {score_threshold:g})")],
               loc="upper center", ncol=2, frameon=False)
    save_and_log_figure(trainer, fig, name)
