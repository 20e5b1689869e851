"""Save figures and image grids as PNG next to the logs and log them to image-capable loggers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from matplotlib.figure import Figure


def run_dir(trainer: pl.Trainer | None, fallback: str | os.PathLike = ".") -> Path:
    """Where a run's artefacts go: the trainer's ``log_dir`` (or ``default_root_dir``), else ``fallback``."""
    if trainer is None:
        return Path(fallback)
    return Path(trainer.log_dir or trainer.default_root_dir)


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
    """Save a matplotlib figure as ``<run dir>/<name>.png`` and log it; writes on rank zero only. Closes the figure.

    Call it on every rank: under DDP ``trainer.log_dir`` is a collective (a broadcast), resolved here before the
    rank check, so a rank-zero-only call without ``directory`` would hang.
    """
    import matplotlib.pyplot as plt

    try:
        path = Path(directory) if directory is not None else run_dir(trainer)
        if trainer is not None and not trainer.is_global_zero:
            return None
        path = path / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.canvas.draw()
        rgba = np.asarray(fig.canvas.buffer_rgba())
        fig.savefig(path, dpi=fig.dpi)
        _log_image(trainer, name, np.ascontiguousarray(rgba[..., :3]), step)
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
) -> Path | None:
    """Save a batch ``[N, C, H, W]`` as one PNG grid (``<run dir>/<name>.png``) and log it; writes on rank zero only.

    Call it on every rank (see :func:`save_and_log_figure`).
    """
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
    path = out_dir / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    hwc = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    _log_image(trainer, name, hwc, step)
    return path


def figure(*args: Any, **kwargs: Any) -> Figure:
    """A matplotlib figure on the non-interactive Agg canvas (no display needed, thread-safe)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(*args, **kwargs)
    FigureCanvasAgg(fig)
    return fig
