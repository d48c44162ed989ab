"""Compare optimizers on Fashion-MNIST: a table, a JSON of every epoch, and plots.

Usage (the README's main job)::

    python -m experiments.compare --model mlp --optimizers sofim,kfac,sgdm,adam --epochs 10

Writes into ``--out`` (default ``runs/compare``):

* ``results.json``: the config, the software versions, and every epoch's
  metrics of every run;
* ``curves.png``: training loss and test accuracy against epochs, and training
  loss against wall time;
* ``table.md``: the final metrics, also printed to the terminal.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from experiments import datasets, models, training


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["sofim.rho=0.1", "adam.learning_rate=3e-4"]`` → ``{"sofim": {"rho": 0.1}, ...}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        try:
            key, value = item.split("=", 1)
            name, param = key.split(".", 1)
        except ValueError:
            raise SystemExit(f"--set expects OPTIMIZER.PARAM=VALUE, got {item!r}") from None
        try:
            parsed: Any = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(name, {})[param] = parsed
    return out


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
    }


def format_table(results: list[training.RunResult]) -> str:
    header = "| optimizer | hyperparameters | epochs | train loss | test loss | test acc | train time (s) | step (ms) |"
    rule = "|---|---|---:|---:|---:|---:|---:|---:|"
    rows = [header, rule]
    for r in results:
        last = r.epochs[-1]
        hp = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.hparams.items())
        rows.append(
            f"| {r.label} | {hp} | {last.epoch} | {last.train_loss:.4f} | {last.test_loss:.4f} | "
            f"{100 * last.test_accuracy:.2f}% | {last.wall_time:.1f} | {1e3 * last.mean_step_time:.2f} |"
        )
    return "\n".join(rows)


def plot(results: list[training.RunResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in results:
        epochs = [e.epoch for e in r.epochs]
        axes[0].plot(epochs, [e.train_loss for e in r.epochs], marker="o", label=r.label)
        axes[1].plot(epochs, [100 * e.test_accuracy for e in r.epochs], marker="o", label=r.label)
        axes[2].plot([e.wall_time for e in r.epochs], [e.train_loss for e in r.epochs], marker="o", label=r.label)
    axes[0].set(xlabel="epoch", ylabel="training loss (epoch mean)", yscale="log", title="Training loss")
    axes[1].set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    axes[2].set(xlabel="training wall time (s)", ylabel="training loss (epoch mean)", yscale="log", title="Loss against time")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_data(
    data_dir: str | None, train_subset: int | None, flatten: bool, verify: bool = True
) -> tuple[np.ndarray, ...]:
    """Fashion-MNIST as float32 images in [0, 1] and int32 labels: ``(x_train, y_train, x_test, y_test)``."""
    ds = datasets.to_float_arrays(datasets.load_fashion_mnist(data_dir, verify=verify), flatten=flatten)
    x_train, y_train = ds.x_train, ds.y_train
    if train_subset:
        x_train, y_train = x_train[:train_subset], y_train[:train_subset]
    return x_train, y_train, ds.x_test, ds.y_test


def main(argv: list[str] | None = None) -> list[training.RunResult]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp", choices=sorted(models.MODELS))
    parser.add_argument("--optimizers", default="sofim,kfac,sgdm,adam", help="comma-separated keys of experiments.training.OPTIMIZERS")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files (default: see experiments/datasets.py)")
    parser.add_argument("--train-subset", type=int, default=None, help="use only the first N training examples")
    parser.add_argument("--no-verify", action="store_true", help="skip the SHA-256 checks of the data files")
    parser.add_argument("--set", action="append", default=[], metavar="OPT.PARAM=VALUE", help="override a hyperparameter")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in training.OPTIMIZERS]
    if unknown:
        parser.error(f"unknown optimizers {unknown}; known: {sorted(training.OPTIMIZERS)}")
    overrides = parse_overrides(args.set)
    data = load_data(args.data_dir, args.train_subset, flatten=False, verify=not args.no_verify)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results = []
    for name in names:
        model = models.make_model(args.model)
        result = training.train(
            model,
            name,
            data,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            hparams=overrides.get(name),
            progress=not args.no_progress,
        )
        last = result.epochs[-1]
        print(f"{result.label}: train loss {last.train_loss:.4f}, test acc {100 * last.test_accuracy:.2f}%", file=sys.stderr)
        results.append(result)

    table = format_table(results)
    title = f"Fashion-MNIST, {args.model}, batch {args.batch_size}, seed {args.seed}"
    (out / "table.md").write_text(f"# {title}\n\n{table}\n")
    (out / "results.json").write_text(
        json.dumps(
            {"config": vars(args), "versions": software_versions(), "runs": [r.to_json() for r in results]},
            indent=2,
        )
    )
    plot(results, out / "curves.png", title)
    print(table)
    print(f"\nwrote {out / 'results.json'}, {out / 'table.md'} and {out / 'curves.png'}")
    return results


if __name__ == "__main__":
    main()
