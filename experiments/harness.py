"""The shared command line of ``experiments.classify``, ``.autoencoder`` and ``.compare``.

One invocation trains one model on one data set with each optimizer of
``--optimizers`` (``all`` = every registered optimizer installed here) and
writes into ``--out``:

* ``<optimizer>.json``: config, seed, software versions and every epoch's
  metrics of that run, rewritten after each epoch;
* ``<optimizer>.ckpt``: the checkpoint of the last finished epoch; running the
  same command again resumes from it (``--no-resume`` starts over);
* ``results.json``: all runs together; ``curves.png``: the metrics against
  epochs (top) and training wall time (bottom); ``table.md``: final metrics
  and the epochs / seconds to the targets (also printed).

Grids (``--grid``): every optimizer's small grid (``OptimizerSpec.grid``,
learning rate and damping) is searched first. **Selection rule**: each grid
point trains from the same seed, on the same batches, for ``--grid-epochs``
epochs (default: ``--epochs``); the winner is the point with the lowest
training loss in its last epoch (mean over that epoch's minibatches); a run
with a non-finite loss never wins; ties go to the earlier point. The test set
is never used for selection. The winner is then trained for ``--epochs``
(reusing the grid run when the epochs are equal) and reported; every trial
is in ``grid.json``. ``--set OPT.PARAM=VALUE`` values are fixed across the grid.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments import datasets, loop, models, registry, reporting, tasks
from experiments.registry import grid_points

__all__ = ["TARGETS", "build_parser", "run", "parse_overrides", "select_best", "train_on_task"]

logger = logging.getLogger(__name__)

# Preset targets, ours: the SOFIM paper does not publish its thresholds.
# Classification: train loss, test loss, test accuracy; autoencoder: train and test loss
# (per-example sums over pixels, as the K-BFGS paper reports them).
TARGETS: dict[tuple[str, str], dict[str, float | None]] = {
    ("classification", "fashion-mnist"): {
        "train_loss": 0.30,
        "test_loss": 0.36,
        "test_accuracy": 0.87,
    },
    ("classification", "mnist"): {"train_loss": 0.05, "test_loss": 0.08, "test_accuracy": 0.975},
    ("classification", "cifar10"): {"train_loss": 0.5, "test_loss": 0.7, "test_accuracy": 0.75},
    ("classification", "cifar100"): {"train_loss": 1.5, "test_loss": 2.0, "test_accuracy": 0.5},
    ("classification", "svhn"): {"train_loss": 0.3, "test_loss": 0.35, "test_accuracy": 0.9},
    ("autoencoder", "fashion-mnist"): {"train_loss": 250.0, "test_loss": 252.0},
    ("autoencoder", "mnist"): {
        "train_loss": 70.0,
        "test_loss": 70.0,
    },  # K-BFGS demo: ~60 after 10 epochs
    ("autoencoder", "curves"): {"train_loss": None, "test_loss": None},
    ("autoencoder", "faces"): {"train_loss": None, "test_loss": None},
}

CLASSIFY_DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "svhn")
AUTOENCODER_DATASETS = ("fashion-mnist", "mnist", "curves", "faces")


def parse_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["sofim.damping=0.1", "adam.learning_rate=3e-4"]`` → ``{"sofim": {"damping": 0.1}, ...}``."""
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


def select_best(trials: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The selection rule: lowest final training loss, non-finite never wins, ties to the earlier trial."""

    def key(i_t):
        i, t = i_t
        loss = t["train_loss"]
        return (
            0 if loss is not None and math.isfinite(loss) else 1,
            loss if loss is not None and math.isfinite(loss) else 0.0,
            i,
        )

    return min(enumerate(trials), key=key)[1]


def script_parser(description: str | None) -> argparse.ArgumentParser:
    """An argument parser that prints a script's docstring (its usage) as it is written."""
    return argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def build_parser(kind: str, description: str | None = None) -> argparse.ArgumentParser:
    parser = script_parser(description)
    if kind == "classification":
        parser.add_argument("--dataset", default="fashion-mnist", choices=CLASSIFY_DATASETS)
        parser.add_argument("--model", default="mlp", choices=sorted(models.CLASSIFIERS))
        parser.add_argument(
            "--optimizers",
            default="sofim,sgdm,adam",
            help="comma-separated keys of registry.OPTIMIZERS, or 'all'",
        )
        parser.add_argument("--epochs", type=int, default=10)
        parser.add_argument("--batch-size", type=int, default=128)
    else:
        parser.add_argument("--dataset", default="fashion-mnist", choices=AUTOENCODER_DATASETS)
        parser.add_argument(
            "--model",
            default="paper",
            choices=sorted(models.AUTOENCODERS),
            help="'paper': the papers' autoencoder for the data set; 'small': 784-256-128-64-16 mirrored",
        )
        parser.add_argument(
            "--optimizers",
            default="kfac,adam",
            help="comma-separated keys of registry.OPTIMIZERS, or 'all'",
        )
        parser.add_argument("--epochs", type=int, default=10)
        parser.add_argument("--batch-size", type=int, default=1000)
        parser.add_argument(
            "--l2", type=float, default=0.0, help="coefficient τ of τ/2‖θ‖² (K-BFGS paper: 1e-5)"
        )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder with the data files (default: see experiments/datasets/idx.py)",
    )
    parser.add_argument(
        "--train-subset", type=int, default=None, help="use only the first N training examples"
    )
    parser.add_argument(
        "--test-subset", type=int, default=None, help="use only the first N test examples"
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the checksum checks of the data files"
    )
    parser.add_argument(
        "--no-download", action="store_true", help="never download missing data files"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="OPT.PARAM=VALUE",
        help="override a hyperparameter",
    )
    parser.add_argument(
        "--grid",
        action="store_true",
        help="search each optimizer's small grid first (selection rule above)",
    )
    parser.add_argument("--grid-epochs", type=int, default=None)
    parser.add_argument("--target-train-loss", type=float, default=None)
    parser.add_argument("--target-test-loss", type=float, default=None)
    if kind == "classification":
        parser.add_argument(
            "--target-test-acc", type=float, default=None, help="a fraction, e.g. 0.87"
        )
    parser.add_argument(
        "--baseline", default=None, help="optimizer whose times the target table divides by"
    )
    parser.add_argument(
        "--out", default=f"runs/{'classify' if kind == 'classification' else 'autoencoder'}"
    )
    parser.add_argument(
        "--no-resume", action="store_true", help="ignore existing checkpoints in --out"
    )
    parser.add_argument("--no-progress", action="store_true")
    add_devices_argument(parser)
    return parser


def add_devices_argument(parser: argparse.ArgumentParser) -> None:
    """``--devices N`` (or ``all``): data-parallel training over N local devices."""
    parser.add_argument(
        "--devices",
        default="1",
        type=lambda text: None if text == "all" else int(text),
        help="train data-parallel over N local devices, or 'all' (default 1; on CPU, "
        "XLA_FLAGS=--xla_force_host_platform_device_count=N simulates N)",
    )


def resolve_optimizers(spec: str, parser: argparse.ArgumentParser) -> list[str]:
    if spec.strip() == "all":
        names = registry.available_optimizers()
        missing = sorted(set(registry.OPTIMIZERS) - set(names))
        if missing:
            print(f"not installed here, skipped: {', '.join(missing)}", file=sys.stderr)
        return names
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in registry.OPTIMIZERS]
    if unknown:
        parser.error(f"unknown optimizers {unknown}; known: {sorted(registry.OPTIMIZERS)}")
    unavailable = [n for n in names if n not in registry.available_optimizers([n])]
    if unavailable:
        parser.error(
            f"optimizers {unavailable} are registered but not installed here "
            f"(their modules have not landed); available: {registry.available_optimizers()}"
        )
    return names


def load_task_data(kind: str, args: argparse.Namespace) -> tasks.Data:
    ds = datasets.load_arrays(
        args.dataset,
        data_dir=args.data_dir,
        verify=not args.no_verify,
        download=not args.no_download,
        flatten=kind == "autoencoder",
    )
    x_train, y_train, x_test, y_test = ds
    if args.train_subset:
        x_train = x_train[: args.train_subset]
        y_train = None if y_train is None else y_train[: args.train_subset]
    if args.test_subset:
        x_test = x_test[: args.test_subset]
        y_test = None if y_test is None else y_test[: args.test_subset]
    if kind == "autoencoder":
        y_train = y_test = None
    elif y_train is None:
        raise SystemExit(f"{args.dataset} has no labels; it is an autoencoder data set")
    return tasks.Data(x_train, y_train, x_test, y_test)


def _make_model(kind: str, args: argparse.Namespace, data: tasks.Data):
    if kind == "classification":
        num_classes = int(max(data.y_train.max(), data.y_test.max())) + 1
        num_classes = max(num_classes, datasets.NUM_CLASSES.get(args.dataset, num_classes))
        return models.make_model(args.model, num_classes=num_classes)
    return models.make_autoencoder(args.model, args.dataset, input_dim=int(data.x_train.shape[1]))


def _make_task(kind: str, args: argparse.Namespace) -> tasks.Task:
    if kind == "classification":
        return tasks.Task("classification")
    return tasks.Task(
        "autoencoder",
        reconstruction=datasets.RECONSTRUCTION.get(args.dataset, "bernoulli"),
        l2=args.l2,
    )


def train_on_task(
    kind: str,
    args: argparse.Namespace,
    data: tasks.Data,
    name: str,
    hparams: Mapping[str, Any],
    *,
    epochs: int,
    checkpoint: Path | None = None,
    on_epoch_end: Any = None,
) -> loop.RunResult:
    """One training run of optimizer ``name`` with ``hparams`` on the task the parsed
    ``args`` (of :func:`build_parser`) describe: its model, loss, batch size, seed and
    progress bar; ``checkpoint`` resumes unless ``--no-resume``."""
    return loop.train(
        _make_model(kind, args, data),
        name,
        data,
        epochs=epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        hparams=hparams,
        progress=not args.no_progress,
        task=_make_task(kind, args),
        model_name=args.model,
        checkpoint=checkpoint,
        resume=not args.no_resume,
        on_epoch_end=on_epoch_end,
        devices=getattr(args, "devices", 1),
    )


def run(
    kind: str, argv: Sequence[str] | None = None, description: str | None = None
) -> list[loop.RunResult]:
    parser = build_parser(kind, description)
    args = parser.parse_args(argv)
    return run_args(kind, args, parser)


def run_args(
    kind: str, args: argparse.Namespace, parser: argparse.ArgumentParser
) -> list[loop.RunResult]:
    names = resolve_optimizers(args.optimizers, parser)
    overrides = parse_overrides(args.set)
    bad = sorted(set(overrides) - set(registry.OPTIMIZERS))
    if bad:
        parser.error(f"--set names unknown optimizers {bad}")
    data = load_task_data(kind, args)
    targets = dict(TARGETS.get((kind, args.dataset), {}))
    for metric, attr in (
        ("train_loss", "target_train_loss"),
        ("test_loss", "target_test_loss"),
        ("test_accuracy", "target_test_acc"),
    ):
        if getattr(args, attr, None) is not None:
            targets[metric] = getattr(args, attr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    versions = reporting.software_versions()
    config = {k: v for k, v in vars(args).items()}
    config["task"] = kind
    config["targets"] = targets

    def train_one(name: str, hparams: Mapping[str, Any], epochs: int, stem: Path) -> loop.RunResult:
        def on_epoch_end(result: loop.RunResult) -> None:
            reporting.write_run_json(stem.with_suffix(".json"), result, config, versions)

        return train_on_task(
            kind,
            args,
            data,
            name,
            hparams,
            epochs=epochs,
            checkpoint=stem.with_suffix(".ckpt"),
            on_epoch_end=on_epoch_end,
        )

    results: list[loop.RunResult] = []
    grid_log: dict[str, Any] = {}
    for name in names:
        fixed = overrides.get(name, {})
        if args.grid and registry.OPTIMIZERS[name].grid:
            grid_epochs = args.grid_epochs or args.epochs
            trials, runs = [], []
            for i, point in enumerate(grid_points(registry.OPTIMIZERS[name].grid)):
                hp = {**point, **fixed}
                res = train_one(name, hp, grid_epochs, out / "grid" / f"{name}-{i}")
                last = res.epochs[-1]
                trials.append(
                    {
                        "hparams": hp,
                        "train_loss": last.train_loss,
                        "test_loss": last.test_loss,
                        "test_accuracy": last.test_accuracy,
                        "epochs": last.epoch,
                    }
                )
                runs.append(res)
                print(
                    f"grid {name} {hp}: train loss {last.train_loss:.4g}",
                    file=sys.stderr,
                    flush=True,
                )
            best = select_best(trials)
            grid_log[name] = {"best": best, "trials": trials}
            if grid_epochs == args.epochs:
                result = runs[trials.index(best)]
            else:
                result = train_one(name, best["hparams"], args.epochs, out / name)
            result.tuned = "grid"
            reporting.write_run_json(out / f"{name}.json", result, config, versions)
        else:
            result = train_one(name, fixed, args.epochs, out / name)
        if result.epochs:
            last = result.epochs[-1]
            acc = (
                "" if last.test_accuracy is None else f", test acc {100 * last.test_accuracy:.2f}%"
            )
            print(
                f"{result.label}: train loss {last.train_loss:.4f}, test loss {last.test_loss:.4f}{acc}",
                file=sys.stderr,
            )
        results.append(result)

    if grid_log:
        reporting.write_json(
            out / "grid.json",
            {"config": config, "selection_rule": SELECTION_RULE, "results": grid_log},
        )
    title = f"{args.dataset}, {args.model} ({kind}), batch {args.batch_size}, seed {args.seed}"
    baseline = args.baseline or ("sgdm" if kind == "classification" else "adam")
    final = reporting.format_final_table(results)
    target_table = reporting.format_target_table(results, targets, baseline=baseline)
    text = f"# {title}\n\n## Final metrics\n\n{final}\n\n## Time to target\n\n{target_table}\n"
    (out / "table.md").write_text(text)
    reporting.write_json(
        out / "results.json",
        {"config": config, "versions": versions, "runs": [r.to_json() for r in results]},
    )
    colors = {n: registry.OPTIMIZERS[n].color for n in names}
    reporting.plot_curves(results, out / "curves.png", title, colors=colors, targets=targets)
    print(text)
    print(f"wrote {out / 'results.json'}, {out / 'table.md'} and {out / 'curves.png'}")
    return results


SELECTION_RULE = (
    "each grid point trains from the same seed on the same batches for grid_epochs epochs; "
    "the winner has the lowest training loss in its last epoch (mean over the epoch's "
    "minibatches); non-finite runs never win; ties go to the earlier point; "
    "the test set is not used"
)
