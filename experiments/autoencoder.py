"""Deep autoencoder comparisons, the KFAC / KPSVD / K-BFGS / MBF protocol: training and test loss.

Usage::

    python -m experiments.autoencoder --dataset mnist --optimizers kfac,kpsvd,kbfgs,mbf,adam --epochs 20
    python -m experiments.autoencoder --dataset fashion-mnist --model small --train-subset 10000 \
        --optimizers all
    python -m experiments.autoencoder --dataset curves --batch-size 256 --l2 1e-5

Models (``--model paper``): MNIST / Fashion-MNIST 784-1000-500-250-30,
FACES 625-2000-1000-500-30, CURVES 784-400-200-100-50-25-6, each mirrored,
ReLU hidden layers, linear code layer and linear output (the K-BFGS paper's
setup). Loss: sigmoid cross-entropy summed over
pixels and averaged over the batch (MNIST, Fashion-MNIST, CURVES), half the
squared error summed over pixels (FACES), plus ``--l2 τ`` times ½‖θ‖² in the
objective (reported losses are the data term). Batch 1000 by default (K-BFGS);
Koroko et al. used 256 (CURVES), 512 (MNIST), 1024 (FACES). KFAC and the
KPSVD family use the sampled Fisher here (``--set kfac.fisher=empirical``
switches back); K-BFGS and MBF the empirical quantities of the real loss.
Plots show the losses against epochs and against training wall time.
"""

from __future__ import annotations

from collections.abc import Sequence

from experiments import harness, loop


def main(argv: Sequence[str] | None = None) -> list[loop.RunResult]:
    return harness.run("autoencoder", argv, description=__doc__ + "\n" + harness.__doc__)


if __name__ == "__main__":
    main()
