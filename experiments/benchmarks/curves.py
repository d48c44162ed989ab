"""Loss curves of the benchmarks: trailing means, the loss at a wall time, table cells, JSON."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["mean_last", "smoothed", "loss_at_time", "fmt", "jsonable"]


def mean_last(losses: Sequence[float], k: int) -> float:
    """Mean of the last ``k`` values (non-finite values make it ``inf``)."""
    tail = np.asarray(losses[-k:], dtype=np.float64)
    return float(np.mean(tail)) if np.all(np.isfinite(tail)) else math.inf


def smoothed(losses: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over ``window`` steps (shorter at the start); non-finite stays non-finite."""
    a = np.asarray(losses, dtype=np.float64)
    c = np.cumsum(np.concatenate([[0.0], a]))
    idx = np.arange(1, len(a) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def loss_at_time(losses: Sequence[float], step_time: float, t: float, window: int) -> float:
    """The trailing-``window`` mean loss interpolated at wall time ``t``, the curve's time axis
    being ``steps × step_time`` (``nan`` past the run's end)."""
    sm = smoothed(losses, window)
    times = np.arange(1, len(sm) + 1) * step_time
    if t > times[-1] + 1e-9:
        return math.nan
    return float(np.interp(t, times, sm))


def fmt(x: float | None, digits: int = 2) -> str:
    """A table cell: ``n/a`` for a missing value, ``diverged`` for a non-finite or huge one."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if not np.isfinite(x) or abs(x) > 1e6:
        return "diverged"
    return f"{x:.{digits}f}"


def jsonable(x: Any) -> Any:
    """``x`` with numpy scalars as Python numbers, non-finite floats as ``None``, ``params`` left out."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items() if k != "params"}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
