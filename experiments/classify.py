"""Classification comparisons, the SOFIM paper's protocol: epochs and wall time to preset targets.

Usage::

    python -m experiments.classify --dataset fashion-mnist --model mlp \
        --optimizers sofim,sgdm,adam --epochs 10
    python -m experiments.classify --dataset cifar10 --model resnet20 --optimizers all \
        --epochs 50 --batch-size 128
    # small grids, then full runs:
    python -m experiments.classify --optimizers sgdm,adam --grid --grid-epochs 3

The SOFIM paper (Sen et al., arXiv 2403.02833) reports how fast each method
reaches pre-specified training-loss, test-loss and test-accuracy targets; its
data sets, models and thresholds were not published, so the targets here are
ours (``experiments.harness.TARGETS``, override with ``--target-train-loss``,
``--target-test-loss``, ``--target-test-acc``). Times are training wall time, evaluation and
compilation excluded; the table also divides each time by the baseline's
(``--baseline``, default SGD-momentum).
"""

from __future__ import annotations

from collections.abc import Sequence

from experiments import harness, loop


def main(argv: Sequence[str] | None = None) -> list[loop.RunResult]:
    return harness.run("classification", argv, description=__doc__ + "\n" + harness.__doc__)


if __name__ == "__main__":
    main()
