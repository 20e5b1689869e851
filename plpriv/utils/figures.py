"""Save figures and image grids as PNG into the run's log directory and log them to image-capable loggers.

A trainer without a logger has no log directory: nothing is written then (not into the current directory).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from matplotlib.figure import Figure


def run_dir(trainer: pl.Trainer | None) -> Path | None:
    """Where a run's artefacts go: the trainer's ``log_dir``; None without a trainer or without a logger.

    Under DDP ``trainer.log_dir`` is a collective (a broadcast): call it on every rank, before a rank-zero branch.
    """
    if trainer is None or not trainer.loggers:
        return None
    return Path(trainer.log_dir)


def _log_image(trainer: pl.Trainer | None, name: str, image: np.ndarray, step: int | None) -> None:
    """Log an ``[H, W, 3]`` uint8 image to every logger that takes images (TensorBoard, W&B, MLflow)."""
    if trainer is None:
        return
    step = trainer.global_step if step is None else step
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):  # TensorBoard
            experiment.add_image(name, image, global_step=step, dataformats="HWC")
        elif hasattr(logger, "log_image"):  # WandbLogger, NeptuneLogger
            logger.log_image(key=name, images=[image], step=step)


def save_and_log_figure(
    trainer: pl.Trainer | None, fig: Figure, name: str, step: int | None = None, directory: str | os.PathLike | None = None
) -> Path | None:
    """Save a matplotlib figure as ``<run dir>/<name>.png`` (nowhere without a run dir) and log it; writes on rank zero
    only; returns the path written, if any. Closes the figure.

    Call it on every rank: under DDP ``trainer.log_dir`` is a collective (a broadcast), resolved here before the
    rank check, so a rank-zero-only call without ``directory`` would hang.
    """
    import matplotlib.pyplot as plt

    try:
        path = Path(directory) if directory is not None else run_dir(trainer)
        if trainer is not None and not trainer.is_global_zero:
            return None
        fig.canvas.draw()
        rgba = np.asarray(fig.canvas.buffer_rgba())
        _log_image(trainer, name, np.ascontiguousarray(rgba[..., :3]), step)
        if path is None:
            return None
        path = path / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=fig.dpi)
        return path
    finally:
        plt.close(fig)


def save_and_log_images(
    trainer: pl.Trainer | None,
    images: torch.Tensor,
    name: str,
    nrow: int | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    step: int | None = None,
    directory: str | os.PathLike | None = None,
    tag: str | None = None,
    min_size: int = 512,
) -> Path | None:
    """Save a batch ``[N, C, H, W]`` as one PNG grid (``<run dir>/<name>.png``, nowhere without a run dir) and log it
    under ``tag`` (default ``name``); writes on rank zero only and returns the path written, if any.

    The grid is upscaled by an integer factor (nearest neighbour) to at least ``min_size`` pixels on its longer side,
    so that 16x16 samples are viewable; 0 keeps the native size. Call it on every rank (see
    :func:`save_and_log_figure`).
    """
    if min_size < 0:
        raise ValueError(f"`min_size` must be >= 0, got {min_size}")
    from torchvision.utils import make_grid, save_image

    if images.ndim != 4:
        raise ValueError(f"`images` must be [N, C, H, W], got shape {tuple(images.shape)}")
    out_dir = Path(directory) if directory is not None else run_dir(trainer)
    if trainer is not None and not trainer.is_global_zero:
        return None
    nrow = nrow or max(1, int(np.ceil(np.sqrt(len(images)))))
    lo, hi = value_range
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    grid = make_grid(x, nrow=nrow, padding=2, pad_value=1.0)
    scale = max(1, math.ceil(min_size / max(grid.shape[1:])))
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    hwc = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    _log_image(trainer, tag or name, hwc, step)
    if out_dir is None:
        return None
    path = out_dir / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return path


def figure(*args: Any, **kwargs: Any) -> Figure:
    """A matplotlib figure on the non-interactive Agg canvas (no display needed, thread-safe)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(*args, **kwargs)
    FigureCanvasAgg(fig)
    return fig
