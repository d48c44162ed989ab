"""Small hyperparameter grids for the Fashion-MNIST comparison, and how a winner is picked.

Selection rule: for each optimizer, every point of its grid trains the model
for ``--epochs`` epochs from the same seed; the point with the lowest training
loss in the last epoch (mean over that epoch's minibatches) wins. A diverged
run (non-finite loss) never wins. The test set is not used for selection.

Usage::

    python -m experiments.tune --model mlp --epochs 3 --optimizers sofim,sgdm,adam
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

from experiments import compare, models, training

GRIDS: dict[str, dict[str, list[float]]] = {
    "sofim": {"learning_rate": [0.1, 0.2, 0.5, 1.0, 2.0, 5.0], "rho": [0.1, 0.5, 2.0, 5.0, 10.0]},
    "sgdm": {"learning_rate": [0.01, 0.03, 0.05, 0.1, 0.2]},
    "adam": {"learning_rate": [3e-4, 1e-3, 3e-3]},
    "kfac": {"learning_rate": [0.01, 0.03, 0.1, 0.3], "damping": [1e-3, 1e-2, 1e-1, 1.0]},
}


def grid_points(grid: dict[str, list[float]]) -> list[dict[str, float]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp", choices=sorted(models.MODELS))
    parser.add_argument("--optimizers", default="sofim,sgdm,adam")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--no-verify", action="store_true", help="skip the SHA-256 checks of the data files")
    parser.add_argument("--out", default="runs/tune")
    args = parser.parse_args(argv)

    data = compare.load_data(args.data_dir, args.train_subset, flatten=False, verify=not args.no_verify)
    best: dict[str, dict] = {}
    for name in [n.strip() for n in args.optimizers.split(",") if n.strip()]:
        trials = []
        for point in grid_points(GRIDS[name]):
            result = training.train(
                models.make_model(args.model), name, data, epochs=args.epochs,
                batch_size=args.batch_size, seed=args.seed, hparams=point, progress=False,
            )
            last = result.epochs[-1]
            loss = last.train_loss if math.isfinite(last.train_loss) else math.inf
            trials.append({"hparams": point, "train_loss": loss, "test_accuracy": last.test_accuracy})
            print(f"{name} {point}: train loss {loss:.4f}, test acc {100 * last.test_accuracy:.2f}%", flush=True)
        winner = min(trials, key=lambda t: t["train_loss"])
        best[name] = {"best": winner, "trials": trials}
        print(f"==> {name}: {winner['hparams']}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"tune_{args.model}.json").write_text(json.dumps({"config": vars(args), "results": best}, indent=2))
    return best


if __name__ == "__main__":
    main()
