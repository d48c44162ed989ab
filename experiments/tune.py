"""Small hyperparameter grids on Fashion-MNIST, and how a winner is picked.

The grids are the registry's (``OptimizerSpec.grid`` in
``experiments/registry.py``); ``python -m experiments.classify --grid`` and
``python -m experiments.autoencoder --grid`` search them with the same rule and
then run the winners. This script only searches (classification).

Selection rule (``experiments.harness.select_best``): for each optimizer,
every point of its grid trains the model for ``--epochs`` epochs from the same
seed; the point with the lowest training loss in the last epoch (mean over that
epoch's minibatches) wins. A diverged run (non-finite loss) never wins; ties
go to the earlier point. The test set is not used for selection.

Usage::

    python -m experiments.tune --model mlp --epochs 3 --optimizers sofim,sgdm,adam
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from experiments import compare, harness, loop, models, registry

GRIDS: dict[str, dict[str, list]] = {
    name: dict(spec.grid) for name, spec in registry.OPTIMIZERS.items() if spec.grid
}
grid_points = registry.grid_points


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = harness.script_parser(__doc__)
    parser.add_argument("--model", default="mlp", choices=sorted(models.CLASSIFIERS))
    parser.add_argument("--optimizers", default="sofim,sgdm,adam")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the SHA-256 checks of the data files"
    )
    parser.add_argument("--out", default="runs/tune")
    args = parser.parse_args(argv)

    data = compare.load_data(
        args.data_dir, args.train_subset, flatten=False, verify=not args.no_verify
    )
    best: dict[str, dict] = {}
    for name in [n.strip() for n in args.optimizers.split(",") if n.strip()]:
        trials = []
        for point in grid_points(GRIDS[name]):
            result = loop.train(
                models.make_model(args.model),
                name,
                data,
                epochs=args.epochs,
                batch_size=args.batch_size,
                seed=args.seed,
                hparams=point,
                progress=False,
            )
            last = result.epochs[-1]
            loss = last.train_loss if math.isfinite(last.train_loss) else math.inf
            trials.append(
                {"hparams": point, "train_loss": loss, "test_accuracy": last.test_accuracy}
            )
            print(
                f"{name} {point}: train loss {loss:.4f}, test acc {100 * last.test_accuracy:.2f}%",
                flush=True,
            )
        winner = harness.select_best(trials)
        best[name] = {"best": winner, "trials": trials}
        print(f"==> {name}: {winner['hparams']}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"tune_{args.model}.json").write_text(
        json.dumps(
            {"config": vars(args), "selection_rule": harness.SELECTION_RULE, "results": best},
            indent=2,
        )
    )
    return best


if __name__ == "__main__":
    main()
