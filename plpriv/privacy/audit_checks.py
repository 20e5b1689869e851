"""Input checks of the audit estimators (eager; the message names the bad value and the fix)."""

from __future__ import annotations

import numbers
from typing import Any, Sequence, Union

import numpy as np

__all__ = ["ArrayLike", "check_confidence", "check_delta", "check_int", "check_scores"]

ArrayLike = Union[Sequence[float], np.ndarray, Any]  # anything np.asarray accepts (lists, arrays, CPU tensors)


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {value!r} ({type(value).__name__}).")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"`{name}` must be in {bound}, got {value}.")
    return value


def check_delta(delta: float, *, positive: bool = False) -> float:
    delta = float(delta)
    if not (0.0 <= delta < 1.0) or (positive and delta == 0.0):
        need = "(0, 1)" if positive else "[0, 1)"
        hint = " (a Gaussian trade-off curve is not pure DP, so delta = 0 gives eps = inf)" if positive else ""
        raise ValueError(f"`delta` must be in {need}{hint}, got {delta}.")
    return delta


def check_confidence(confidence: float) -> float:
    confidence = float(confidence)
    if not (0.0 < confidence < 1.0):
        raise ValueError(f"`confidence` must be in (0, 1), e.g. 0.95, got {confidence}.")
    return confidence


def check_scores(name: str, scores: ArrayLike) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"`{name}` must be a non-empty 1-D array of scores, got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` contains non-finite values ({int((~np.isfinite(arr)).sum())} of {arr.size}).")
    return arr
