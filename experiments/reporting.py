"""What a run writes: the JSON of every epoch, plots against epochs and wall time, markdown tables.

* :func:`write_run_json`: one file per optimizer run, rewritten after every
  epoch, with the config, the seed, the software versions and every epoch's
  metrics (so an interrupted run leaves what it measured).
* :func:`plot_curves`: one figure, top row against epochs, bottom row against
  training wall time; columns are the task's metrics.
* :func:`format_final_table` and :func:`format_target_table`: the final
  metrics, and the epochs and seconds each run needed to reach preset targets.
  The "tuned" column says where the hyperparameters come from: ``defaults``
  (the registry's defaults, tuned for this task kind, see docs/benchmarks.md), ``grid``
  (picked by ``--grid``), ``no`` (untuned defaults or a user's ``--set``).

Targets: a loss target is reached at the first epoch whose value is ``<=`` it,
an accuracy target at the first epoch whose value is ``>=`` it. The time is the
cumulated training wall time at the end of that epoch (evaluation and
compilation excluded). A run that never gets there shows "—".
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from experiments.loop import RunResult

__all__ = [
    "METRICS",
    "software_versions",
    "time_to_target",
    "write_json",
    "write_run_json",
    "format_final_table",
    "format_target_table",
    "plot_curves",
]

# metric name -> (axis label, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "train_loss": ("training loss (epoch mean)", False),
    "test_loss": ("test loss", False),
    "test_accuracy": ("test accuracy", True),
}


def task_metrics(task_kind: str) -> list[str]:
    return (
        ["train_loss", "test_loss", "test_accuracy"]
        if task_kind == "classification"
        else ["train_loss", "test_loss"]
    )


def software_versions() -> dict[str, str]:
    import flax
    import optax

    import sofim_optax

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "flax": flax.__version__,
        "sofim_optax": sofim_optax.__version__,
        "numpy": np.__version__,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        # The peers from other packages (experiments/peers.py), where installed.
        **{dist: v for dist in _PEER_DISTRIBUTIONS if (v := _installed_version(dist))},
    }


_PEER_DISTRIBUTIONS = ("psgd-jax", "precondition-opt")


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_json(path: Path, payload: Any) -> None:
    """Writes JSON atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, default=_json_default)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def write_run_json(
    path: Path, result: RunResult, config: Mapping[str, Any], versions: Mapping[str, str]
) -> None:
    write_json(
        path,
        {
            "config": dict(config),
            "seed": result.seed,
            "versions": dict(versions),
            "run": result.to_json(),
        },
    )


def time_to_target(result: RunResult, metric: str, target: float) -> tuple[int, float] | None:
    """``(epoch, wall seconds)`` of the first epoch meeting ``target``, or ``None``."""
    higher = METRICS[metric][1]
    for e in result.epochs:
        value = getattr(e, metric)
        if value is None or not np.isfinite(value):
            continue
        if (value >= target) if higher else (value <= target):
            return e.epoch, e.wall_time
    return None


def _fmt_hparams(hparams: Mapping[str, Any]) -> str:
    def fmt(k: str, v: Any) -> str:
        if k == "kernel_output_axes":  # the model's structure, not a tuned value
            return f"{k}=({len(v)} layers)"
        return f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"

    return ", ".join(fmt(k, v) for k, v in hparams.items())


def format_final_table(results: Sequence[RunResult]) -> str:
    classification = any(r.task == "classification" for r in results)
    header = "| optimizer | hyperparameters | tuned | epochs | train loss | test loss |"
    rule = "|---|---|:---:|---:|---:|---:|"
    if classification:
        header += " test acc |"
        rule += "---:|"
    header += " train time (s) | step (ms) |"
    rule += "---:|---:|"
    rows = [header, rule]
    for r in results:
        if not r.epochs:
            continue
        last = r.epochs[-1]
        row = (
            f"| {r.label} | {_fmt_hparams(r.hparams)} | {r.tuned} | {last.epoch} | "
            f"{last.train_loss:.4f} | {last.test_loss:.4f} |"
        )
        if classification:
            acc = "—" if last.test_accuracy is None else f"{100 * last.test_accuracy:.2f}%"
            row += f" {acc} |"
        row += f" {last.wall_time:.1f} | {1e3 * last.mean_step_time:.2f} |"
        rows.append(row)
    return "\n".join(rows)


def format_target_table(
    results: Sequence[RunResult], targets: Mapping[str, float], baseline: str | None = None
) -> str:
    """Epochs and training seconds to each target; with ``baseline``, each time over the baseline's."""
    names = [m for m in targets if targets[m] is not None]
    if not names:
        return "(no targets set)"
    base = next((r for r in results if r.optimizer == baseline), None)
    header = "| optimizer |" + "".join(
        f" {METRICS[m][0].split(' (')[0]} {'≥' if METRICS[m][1] else '≤'} {targets[m]:g}: epochs / s |"
        for m in names
    )
    rule = "|---|" + "---:|" * len(names)
    rows = [header, rule]
    for r in results:
        cells = []
        for m in names:
            hit = time_to_target(r, m, targets[m])
            if hit is None:
                cells.append("—")
                continue
            cell = f"{hit[0]} / {hit[1]:.1f}"
            base_hit = time_to_target(base, m, targets[m]) if base is not None else None
            if base_hit is not None and base is not r and base_hit[1] > 0:
                cell += f" ({hit[1] / base_hit[1]:.2f}× {base.label})"
            cells.append(cell)
        rows.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_curves(
    results: Sequence[RunResult],
    path: Path,
    title: str,
    colors: Mapping[str, str | None] | None = None,
    targets: Mapping[str, float | None] | None = None,
) -> None:
    """Top row: metrics against epochs; bottom row: against training wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = results[0].task if results else "classification"
    metrics = task_metrics(kind)
    legend_width = 2.2  # inches to the right of the axes for the legend
    width = 5 * len(metrics) + legend_width
    fig, axes = plt.subplots(2, len(metrics), figsize=(width, 8), squeeze=False)
    for r in results:
        if not r.epochs:
            continue
        color = (colors or {}).get(r.optimizer)
        epochs = [e.epoch for e in r.epochs]
        walls = [e.wall_time for e in r.epochs]
        for j, m in enumerate(metrics):
            values = [np.nan if getattr(e, m) is None else getattr(e, m) for e in r.epochs]
            if m == "test_accuracy":
                values = [100 * v for v in values]
            axes[0, j].plot(epochs, values, marker="o", ms=3, label=r.label, color=color)
            axes[1, j].plot(walls, values, marker="o", ms=3, label=r.label, color=color)
    for j, m in enumerate(metrics):
        label, higher = METRICS[m]
        ylabel = "test accuracy (%)" if m == "test_accuracy" else label
        scale = "linear" if higher else "log"
        axes[0, j].set(xlabel="epoch", ylabel=ylabel, yscale=scale)
        # Log time axis: per-step costs differ by up to ~100x between methods.
        axes[1, j].set(
            xlabel="training wall time (s, log scale)", ylabel=ylabel, yscale=scale, xscale="log"
        )
        target = (targets or {}).get(m)
        if target is not None:
            for ax in axes[:, j]:
                ax.axhline(
                    100 * target if m == "test_accuracy" else target, color="gray", ls="--", lw=0.8
                )
        for ax in axes[:, j]:
            ax.grid(True, alpha=0.3, which="both")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="center right", fontsize="small"
    )  # outside the axes: 15 methods hide curves
    fig.suptitle(title)
    save_figure(fig, path, rect=(0, 0, 1 - legend_width / width, 1))


def save_figure(fig: Any, path: Path, rect: tuple[float, ...] | None = None) -> None:
    """Lays out ``fig`` (within ``rect``), writes it to ``path`` at 110 dpi and closes it."""
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=rect)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
