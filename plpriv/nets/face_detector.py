"""A shallow anchor-free face detector on packed RAW: a centre heatmap plus box size and offset (CenterNet style).

Zhou, Wang, Kraehenbuehl, "Objects as Points", 2019: one heatmap channel per class, a peak per object, the box's size
and sub-cell offset regressed at the peak. The network is five 3x3 convs (output stride 4) and a 1x1 head; any of its
convs can be ternarized with :func:`plpriv.nets.ternary.ternarize`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FaceCenterNet(nn.Module):
    """Packed RAW ``[N, in_chans, H, W]`` -> ``[N, 5, H/4, W/4]``: heatmap logit, log width/height (in cells), offset.

    Args:
        in_chans: input planes (4 for packed RGGB).
        widths: channels of the five convs (the 2nd halves the resolution again; the 4th is dilated by 2).
        norm: ``batch`` or ``none``.
    """

    stride = 4

    def __init__(self, in_chans: int = 4, widths: Sequence[int] = (16, 32, 64, 64, 64), norm: str = "batch") -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) != 5 or min(widths) < 1 or in_chans < 1:
            raise ValueError(f"`widths` must be five positive ints and in_chans >= 1, got {widths}, {in_chans}")
        if norm not in ("batch", "none"):
            raise ValueError(f"`norm` must be 'batch' or 'none', got {norm!r}")
        self.config = {"in_chans": in_chans, "widths": widths, "norm": norm}
        specs = [(in_chans, widths[0], 2, 1), (widths[0], widths[1], 2, 1), (widths[1], widths[2], 1, 1),
                 (widths[2], widths[3], 1, 2), (widths[3], widths[4], 1, 1)]  # (in, out, stride, dilation)
        layers: list[nn.Module] = []
        for c_in, c_out, stride, dilation in specs:
            layers.append(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=norm == "none"))
            layers += [nn.BatchNorm2d(c_out)] if norm == "batch" else []
            layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(widths[4], 5, 1)
        with torch.no_grad():
            self.head.bias.zero_()
            self.head.bias[0] = -math.log((1 - 0.1) / 0.1)  # Zhou et al. 2019 (Sec. 4 impl.): heatmap prior 0.1

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _gaussian_sigma(w: Tensor, h: Tensor, stride: int) -> Tensor:
    # a Gaussian whose 2-sigma disc covers about a third of the face (in heatmap cells); never below half a cell
    return (torch.sqrt(w * h) / stride / 6.0).clamp_min(0.5)


def encode_targets(
    targets: Sequence[dict[str, Tensor]], size: tuple[int, int], stride: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Boxes (xyxy, input pixels) -> heatmap ``[N, 1, h, w]``, size/offset targets ``[N, 4, h, w]``, centre mask, count."""
    n, (hh, ww) = len(targets), (size[0] // stride, size[1] // stride)
    heat = torch.zeros(n, 1, hh, ww)
    reg = torch.zeros(n, 4, hh, ww)
    mask = torch.zeros(n, 1, hh, ww)
    ys, xs = torch.arange(hh).view(-1, 1).float(), torch.arange(ww).view(1, -1).float()
    for i, t in enumerate(targets):
        for x0, y0, x1, y1 in t["boxes"].float().cpu().tolist():
            w, h = max(x1 - x0, 1e-3), max(y1 - y0, 1e-3)
            cx, cy = (x0 + x1) / 2 / stride, (y0 + y1) / 2 / stride
            ix, iy = min(int(cx), ww - 1), min(int(cy), hh - 1)
            sigma = float(_gaussian_sigma(torch.tensor(w), torch.tensor(h), stride))
            g = torch.exp(-((xs - ix) ** 2 + (ys - iy) ** 2) / (2 * sigma**2))  # Zhou et al. 2019, Sec. 3: Y_xyc
            heat[i, 0] = torch.maximum(heat[i, 0], g)
            reg[i, :, iy, ix] = torch.tensor([math.log(w / stride), math.log(h / stride), cx - ix, cy - iy])
            mask[i, 0, iy, ix] = 1.0
    return heat, reg, mask, mask.sum().clamp_min(1.0)


def centernet_loss(output: Tensor, targets: Sequence[dict[str, Tensor]], stride: int, input_size: tuple[int, int]) -> dict[str, Tensor]:
    """Penalty-reduced focal loss on the heatmap (alpha 2, beta 4) + L1 on log size and offset at the centres."""
    heat, reg, mask, count = (t.to(output.device) for t in encode_targets(targets, input_size, stride))
    logit = output[:, :1]
    p = torch.sigmoid(logit).clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1.0).float()
    pos_loss = -(F.logsigmoid(logit) * (1 - p) ** 2 * pos).sum()  # Zhou et al. 2019, Eq. 1 (Y = 1)
    neg_loss = -(F.logsigmoid(-logit) * p**2 * (1 - heat) ** 4 * (1 - pos)).sum()  # Zhou et al. 2019, Eq. 1 (else)
    focal = (pos_loss + neg_loss) / count
    l1 = (F.l1_loss(output[:, 1:], reg, reduction="none") * mask).sum() / count  # Zhou et al. 2019, Eqs. 2-3
    return {"loss": focal + l1, "heatmap": focal, "box": l1}


@torch.no_grad()
def decode(output: Tensor, stride: int, top_k: int = 20, min_score: float = 0.01) -> list[dict[str, Tensor]]:
    """Peaks of the heatmap (3x3 max-pool NMS, Zhou et al. 2019 Sec. 4) -> per image boxes (xyxy), scores, labels."""
    heat = torch.sigmoid(output[:, :1])
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    n, _, hh, ww = heat.shape
    scores, idx = peaks.flatten(1).topk(min(top_k, hh * ww), dim=1)
    out = []
    for i in range(n):
        keep = scores[i] >= min_score
        s, k = scores[i][keep], idx[i][keep]
        iy, ix = (k // ww).float(), (k % ww).float()
        r = output[i, 1:].flatten(1)[:, k]
        cx, cy = (ix + r[2]) * stride, (iy + r[3]) * stride
        w, h = r[0].clamp(max=8).exp() * stride, r[1].clamp(max=8).exp() * stride
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
        out.append({"boxes": boxes, "scores": s, "labels": torch.zeros_like(k)})
    return out
