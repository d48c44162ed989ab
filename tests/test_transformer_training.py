"""End to end: a tiny vision transformer (``experiments.models.ViT``: patch embedding,
attention, LayerNorm, MLP, class token) trains with every curvature method at its registry
defaults, through the experiments' own training loop; every weight layer, attention's
projections included, is preconditioned."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from experiments import loop, models

METHODS = [
    "kfac",
    "kpsvd",
    "kpsvd_deflation",
    "kfac_corrected",
    "kpsvd_lanczos",
    "mbf",
    "kbfgs",
    "kbfgs_l",
    "sofim",
]


def _data(n=128, seed=0):
    """Ten noisy prototype images: a task a small transformer learns in a few steps."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    protos = rng.standard_normal((10, 28, 28, 1)).astype(np.float32)
    x = (protos[y] + 0.5 * rng.standard_normal((n, 28, 28, 1))).astype(np.float32)
    k = n * 3 // 4
    return x[:k], y[:k], x[k:], y[k:]


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_a_tiny_vision_transformer_trains(name, caplog):
    model = models.ViT(width=16, depth=1, heads=2)
    with caplog.at_level(logging.INFO, logger="sofim_optax"):
        result = loop.train(model, name, _data(), epochs=3, batch_size=32, seed=0, progress=False)
    losses = [e.train_loss for e in result.epochs]
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < 0.85 * losses[0], f"{name}: {losses}"
    if name != "sofim":  # (SOFIM takes no statistics: it treats every parameter alike)
        line = next(r.getMessage() for r in caplog.records if "preconditioning" in r.getMessage())
        # The patch embedding, 4 attention projections, 2 MLP layers and the head.
        assert "preconditioning 8 layer(s)" in line, line
