"""The main job: a quick Fashion-MNIST comparison of every optimizer installed here, with plots.

Usage (the README's main job)::

    python -m experiments.compare                      # every installed method, both protocols
    python -m experiments.compare --optimizers sofim,kfac,sgdm,adam --tasks classify --epochs 10

Two protocols, each run through the same harness as ``experiments.classify``
and ``experiments.autoencoder`` (see ``experiments/harness.py`` for what is
written, resuming, grids and targets):

* ``classify`` (the SOFIM paper's protocol): the MLP on the first
  ``--train-subset`` Fashion-MNIST training images (default 20000; ``0`` for
  all 60000) and the full test set, batch 128, ``--epochs`` epochs (default 5),
  epochs and wall time to the training-loss, test-loss and test-accuracy
  targets. Output in ``<out>/classify/``.
* ``autoencoder`` (the KFAC / KPSVD / K-BFGS / MBF protocol, reduced to fit
  a CPU): the 784-256-128-64-16 autoencoder on the first ``--ae-train-subset``
  training images, batch ``--ae-batch-size``, ``--ae-epochs`` epochs,
  training and test loss against epochs and wall time. Output in
  ``<out>/autoencoder/``.

``<out>/summary.md`` gathers both tables. The defaults keep the quick job
to minutes per method on a laptop CPU; the Kronecker methods cost several
times SGD's step. For the full run::

    python -m experiments.compare --train-subset 0 --epochs 10 \
        --ae-train-subset 0 --ae-epochs 30

The defaults of methods marked "tuned: no" in the tables are untuned values taken from the
papers or their authors' code (``experiments/registry.py`` says which, per method).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from experiments import harness, loop, tasks


def software_versions() -> dict[str, str]:
    from experiments import reporting

    return reporting.software_versions()


def load_data(
    data_dir: str | None, train_subset: int | None, flatten: bool, verify: bool = True
) -> tasks.Data:
    """Fashion-MNIST as float32 images in [0, 1] and int32 labels: ``(x_train, y_train, x_test, y_test)``."""
    from experiments import datasets

    ds = datasets.load_arrays("fashion-mnist", data_dir=data_dir, verify=verify, flatten=flatten)
    x_train, y_train = ds.x_train, ds.y_train
    if train_subset:
        x_train, y_train = x_train[:train_subset], y_train[:train_subset]
    return tasks.Data(x_train, y_train, ds.x_test, ds.y_test)


def main(argv: Sequence[str] | None = None) -> dict[str, list[loop.RunResult]]:
    parser = harness.script_parser(__doc__)
    parser.add_argument(
        "--optimizers",
        default="all",
        help="comma-separated keys of registry.OPTIMIZERS, or 'all' (installed ones)",
    )
    parser.add_argument("--tasks", default="classify,autoencoder")
    parser.add_argument("--model", default="mlp", help="classifier for the classify protocol")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the classify protocol")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--train-subset",
        type=int,
        default=20000,
        help="classify protocol: first N training images (0: all 60000)",
    )
    parser.add_argument("--ae-model", default="small")
    parser.add_argument("--ae-epochs", type=int, default=10)
    parser.add_argument("--ae-batch-size", type=int, default=500)
    parser.add_argument("--ae-train-subset", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--no-verify", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="OPT.PARAM=VALUE")
    parser.add_argument(
        "--grid",
        action="store_true",
        help="search the small grids first (see experiments/harness.py)",
    )
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    harness.add_devices_argument(parser)
    args = parser.parse_args(argv)

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - {"classify", "autoencoder"})
    if unknown:
        parser.error(f"unknown tasks {unknown}; choose from classify, autoencoder")
    common: list[str] = ["--optimizers", args.optimizers, "--seed", str(args.seed), "--no-download"]
    if args.data_dir:
        common += ["--data-dir", args.data_dir]
    for flag in ("no_verify", "grid", "no_resume", "no_progress"):
        if getattr(args, flag):
            common.append("--" + flag.replace("_", "-"))
    for item in args.set:
        common += ["--set", item]
    common += ["--devices", "all" if args.devices is None else str(args.devices)]
    out = Path(args.out)
    results: dict[str, list[loop.RunResult]] = {}
    if "classify" in tasks:
        argv_c = common + [
            "--dataset",
            "fashion-mnist",
            "--model",
            args.model,
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
            "--out",
            str(out / "classify"),
        ]
        if args.train_subset:
            argv_c += ["--train-subset", str(args.train_subset)]
            # The quick job's targets (the full-data ones are in experiments.harness.TARGETS).
            argv_c += [
                "--target-train-loss",
                "0.40",
                "--target-test-loss",
                "0.45",
                "--target-test-acc",
                "0.84",
            ]
        results["classify"] = harness.run("classification", argv_c, description=__doc__)
    if "autoencoder" in tasks:
        argv_a = common + [
            "--dataset",
            "fashion-mnist",
            "--model",
            args.ae_model,
            "--epochs",
            str(args.ae_epochs),
            "--batch-size",
            str(args.ae_batch_size),
            "--out",
            str(out / "autoencoder"),
        ]
        if args.ae_train_subset:
            argv_a += ["--train-subset", str(args.ae_train_subset)]
        results["autoencoder"] = harness.run("autoencoder", argv_a, description=__doc__)
    parts = [
        "# Quick Fashion-MNIST comparison\n\n"
        f"Command: `python -m experiments.compare {' '.join(argv or sys.argv[1:])}`\n"
    ]
    for task in tasks:
        table = (out / task / "table.md").read_text()
        parts.append(table.replace("# ", f"## {task}: ", 1).replace("\n## ", "\n### "))
        parts.append(f"![{task}]({task}/curves.png)\n")
    (out / "summary.md").write_text("\n".join(parts))
    print(f"wrote {out / 'summary.md'}")
    return results


if __name__ == "__main__":
    main()
