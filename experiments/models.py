"""Flax (linen) models used by the experiment scripts.

Every model maps a batch of images ``(N, H, W, C)`` (or already flat
``(N, D)`` vectors) to logits. They are built only from ``nn.Dense`` and
``nn.Conv`` (plus activations and pooling), the layers whose statistics the
curvature-based optimizers capture.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
    """A ReLU multilayer perceptron: ``Dense(h) -> relu`` for each hidden width, then ``Dense(num_classes)``."""

    hidden: Sequence[int] = (256, 128)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


class SmallCNN(nn.Module):
    """Two 3×3 convolutions with stride 2 (32 and 64 channels, ReLU), a hidden Dense(128), logits."""

    channels: Sequence[int] = (32, 64)
    hidden: int = 128
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if x.ndim == 2:  # flat 28×28 images
            side = int(round(x.shape[1] ** 0.5))
            x = x.reshape((x.shape[0], side, side, 1))
        for c in self.channels:
            x = nn.relu(nn.Conv(c, (3, 3), strides=(2, 2), padding="SAME")(x))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


class Autoencoder(nn.Module):
    """The deep autoencoder of the KFAC, K-BFGS and KPSVD papers (Hinton & Salakhutdinov 2006 sizes).

    ``encoder`` widths go down to the code (784-1000-500-250-30 for MNIST-like
    data), the decoder mirrors them back to ``output_dim``. ReLU after every
    layer except the code layer (linear) and the output (logits for a
    sigmoid cross-entropy summed over pixels). Layers are named ``Dense_0`` …
    ``Dense_7`` in order, so ``layer_stats`` keys are those names.
    """

    encoder: Sequence[int] = (1000, 500, 250, 30)
    output_dim: int = 784

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = x.reshape((x.shape[0], -1))
        widths = list(self.encoder) + list(reversed(self.encoder[:-1])) + [self.output_dim]
        code_layer = len(self.encoder) - 1
        for i, width in enumerate(widths):
            x = nn.Dense(width)(x)
            if i != code_layer and i != len(widths) - 1:
                x = nn.relu(x)
        return x


MODELS = {"mlp": MLP, "cnn": SmallCNN}


def make_model(name: str, num_classes: int = 10) -> nn.Module:
    """Returns the model registered under ``name`` (one of ``MODELS``)."""
    try:
        return MODELS[name](num_classes=num_classes)
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None
