"""Generated samples written to disk: PNG grids per batch and one ``.npz`` (uint8 NHWC images, seeds, labels) per
process at the end, for ``predict`` (no Lightning imports)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from plpriv.utils.figures import save_and_log_images

__all__ = ["SampleWriter"]


class SampleWriter:
    """Collects ``{"images": uint8 [B, C, H, W], "seeds": [B], "labels": [B]?}`` batches; nothing is written
    without a ``directory``."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self.batches: list[dict[str, Tensor]] = []

    def add(self, out: dict[str, Tensor], images: Tensor, name: str, nrow: int | None) -> None:
        """Keep ``out`` for the ``.npz`` and save the ``[-1, 1]`` ``images`` as the PNG grid ``name``."""
        self.batches.append(out)
        save_and_log_images(None, images, name, nrow=nrow, directory=self.directory)

    def flush(self, suffix: str = "") -> tuple[Path, int] | None:
        """Write ``samples{suffix}.npz``; returns (path, count), or None when there is nothing to write."""
        batches, self.batches = self.batches, []
        if not batches or self.directory is None:
            return None
        images = torch.cat([p["images"] for p in batches]).permute(0, 2, 3, 1).numpy()  # NHWC uint8
        arrays = {"images": images, "seeds": torch.cat([p["seeds"] for p in batches]).numpy()}
        if "labels" in batches[0]:
            arrays["labels"] = torch.cat([p["labels"] for p in batches]).numpy()
        path = self.directory / f"samples{suffix}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **arrays)
        return path, len(images)
