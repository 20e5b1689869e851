"""A small convolutional classifier that is DP-SGD compatible out of the box (GroupNorm, no BatchNorm)."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn

Norm = Literal["group", "batch", "none"]


def norm_layer(channels: int, kind: Norm = "group", groups: int = 8, **factory_kwargs: Any) -> nn.Module:
    """A 2-d normalisation layer by name; ``group`` uses ``min(groups, channels)`` groups.

    ``factory_kwargs`` (``device``, ``dtype``) are passed through, so it fits timm's ``norm_layer`` argument.
    """
    if kind == "group":
        return nn.GroupNorm(min(groups, channels), channels, **factory_kwargs)
    if kind == "batch":
        return nn.BatchNorm2d(channels, **factory_kwargs)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"`norm` must be 'group', 'batch' or 'none', got {kind!r}")


class SmallCNN(nn.Module):
    """Three conv stages (width, 2*width, 4*width), each conv3x3 - norm - activation - 2x2 max-pool, then an adaptive
    average pool to 2x2 (keeps coarse position, which digits need) and a linear head. Any input size >= 8 works. ``act="tanh"`` follows Papernot et al. 2021 (tempered activations help under DP).
    """

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 10,
        width: int = 16,
        norm: Norm = "group",
        act: Literal["relu", "tanh", "silu"] = "relu",
    ) -> None:
        super().__init__()
        if width < 1 or in_chans < 1 or num_classes < 1:
            raise ValueError(f"in_chans, num_classes and width must be >= 1, got {in_chans}, {num_classes}, {width}")
        acts = {"relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}
        if act not in acts:
            raise ValueError(f"`act` must be one of {sorted(acts)}, got {act!r}")

        def stage(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), norm_layer(c_out, norm), acts[act](), nn.MaxPool2d(2)]

        self.features = nn.Sequential(
            *stage(in_chans, width),
            *stage(width, 2 * width),
            *stage(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.num_features = 4 * width * 4
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
