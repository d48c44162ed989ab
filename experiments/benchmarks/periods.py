"""What the default periods cost in training loss: each method at its defaults against the
same method with every curvature refresh on every step.

The library's defaults amortise the expensive parts of a step: statistics every
``stats_period`` updates, inverses or decompositions every ``inverse_period``, and (the KPSVD
family) a few warm-started solver iterations per statistics update. This script trains the
classification MLP (784-256-128-10) on Fashion-MNIST with each method twice, from the same
initial parameters over the same batches:

* **defaults**: the harness's hyperparameters for the task (its learning rate and damping),
  with the library's periods, solver budget and block size (:data:`AMORTISATION`, read from
  the factory's signature) and any ``--set`` overrides (to try candidate defaults);
* **every step**: the same with ``stats_period=1, inverse_period=1`` and, for the KPSVD
  family, the solver run to convergence (``max_iters=100``).

and prints the final training loss of both (the mean minibatch loss of the last epoch) and
how much the defaults lose, in per cent (the target: at most 1%). ``--task autoencoder``
trains an autoencoder instead (``--model small``: 784-256-128-64-16 mirrored). Usage::

    python -m experiments.benchmarks.periods --optimizers kfac,kpsvd,mbf --epochs 2 \\
        --train-subset 20000
    python -m experiments.benchmarks.periods --task autoencoder --model small \\
        --optimizers kfac,mbf --epochs 2 --train-subset 20000
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any

from experiments import harness, loop, registry
from experiments.benchmarks import floor

#: Methods with periods (those of the floor benchmark, without the adaptive ones), in its order.
METHODS = tuple(n for n in floor.METHODS if n in floor.PERIODIC and not n.endswith("_adaptive"))
#: The amortisation settings whose library defaults the "defaults" run restores (the harness's
#: task hyperparameters may set their own, e.g. its autoencoder periods).
AMORTISATION = ("stats_period", "inverse_period", "max_iters", "dense_block_size")
#: What "every step" sets, for the settings a method has: both periods at 1 and an iterative
#: solver run to convergence.
EVERY_STEP = {"stats_period": 1, "inverse_period": 1, "max_iters": 100}


def library_defaults(name: str) -> dict[str, Any]:
    """The library's defaults of ``name``'s amortisation settings, from its signature."""
    parameters = inspect.signature(registry.OPTIMIZERS[name].resolve()).parameters
    return {k: parameters[k].default for k in AMORTISATION if k in parameters}


def every_step(name: str) -> dict[str, Any]:
    """The hyperparameters that refresh everything on every step, for ``name``."""
    return {k: v for k, v in EVERY_STEP.items() if k in library_defaults(name)}


def final_loss(result: loop.RunResult) -> float:
    return float(result.epochs[-1].train_loss)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = sys.argv[1:] if argv is None else list(argv)
    task_parser = argparse.ArgumentParser(add_help=False)
    task_parser.add_argument(
        "--task", default="classification", choices=("classification", "autoencoder")
    )
    known, argv = task_parser.parse_known_args(argv)
    kind = known.task
    parser = harness.build_parser(kind, __doc__)
    parser.add_argument("--task", default=kind, help="classification (default) or autoencoder")
    parser.set_defaults(optimizers=",".join(METHODS), epochs=2, out=f"runs/periods_{kind}")
    args = parser.parse_args(argv)
    names = harness.resolve_optimizers(args.optimizers, parser)
    overrides = harness.parse_overrides(args.set)
    data = harness.load_task_data(kind, args)
    rows = []
    for name in names:
        losses = {}
        # (--set: candidate defaults, in both runs)
        chosen = {**library_defaults(name), **overrides.get(name, {})}
        for variant, hparams in (
            ("defaults", chosen),
            ("every step", {**chosen, **every_step(name)}),
        ):
            print(f"{name} {variant} {hparams}", file=sys.stderr, flush=True)
            result = harness.train_on_task(kind, args, data, name, hparams, epochs=args.epochs)
            losses[variant] = final_loss(result)
        loss_pct = 100.0 * (losses["defaults"] / losses["every step"] - 1.0)
        rows.append({"method": name, **losses, "defaults lose (%)": loss_pct})
        print(
            f"{name}: defaults {losses['defaults']:.4f}, every step {losses['every step']:.4f}, "
            f"{loss_pct:+.2f}%",
            file=sys.stderr,
            flush=True,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "periods.json").write_text(json.dumps({"config": vars(args), "rows": rows}, indent=1))
    print(f"{kind}, {args.model}, {args.epochs} epochs, batch {args.batch_size}")
    print("| method | defaults | every step | defaults lose |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {registry.OPTIMIZERS[r['method']].label} | {r['defaults']:.4f} | "
            f"{r['every step']:.4f} | {r['defaults lose (%)']:+.2f}% |"
        )
    return rows


if __name__ == "__main__":
    main()
