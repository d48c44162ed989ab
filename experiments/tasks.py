"""What a training run learns and measures (:class:`Task`) and on which arrays (:class:`Data`)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sofim_optax

__all__ = ["Task", "Data", "batch_of", "cross_entropy_loss"]


@dataclasses.dataclass(frozen=True)
class Task:
    """What is learnt and measured.

    Attributes:
      kind: ``"classification"`` (softmax cross-entropy of integer labels,
        batch mean; metrics: training loss, test loss, test accuracy) or
        ``"autoencoder"`` (reconstruct the flattened input; metrics: training
        and test loss).
      reconstruction: autoencoder loss, ``"bernoulli"`` (sigmoid cross-entropy
        of the logits against the pixel intensities in [0, 1], summed over
        pixels, averaged over the batch: MNIST, CURVES, Fashion-MNIST) or
        ``"gaussian"`` (half the squared error summed over pixels, averaged
        over the batch: FACES), as in the K-BFGS paper.
      l2: coefficient ``τ`` of an added ``τ/2 ‖θ‖²`` on all parameters (K-BFGS
        paper: 1e-5). Reported losses are the data term only.
    """

    kind: str = "classification"
    reconstruction: str = "bernoulli"
    l2: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("classification", "autoencoder"):
            raise ValueError(
                f"task kind must be 'classification' or 'autoencoder', got {self.kind!r}"
            )
        if self.reconstruction not in ("bernoulli", "gaussian"):
            raise ValueError(
                f"reconstruction must be 'bernoulli' or 'gaussian', got {self.reconstruction!r}"
            )

    def data_loss(self, outputs: jax.Array, batch: tuple) -> jax.Array:
        """Batch-mean loss; uses :mod:`sofim_optax.curvature.losses` so a sampled Fisher can be drawn."""
        losses = sofim_optax.curvature.losses
        if self.kind == "classification":
            return losses.softmax_cross_entropy(outputs, batch[1])
        target = batch[0].reshape(batch[0].shape[0], -1)
        if self.reconstruction == "bernoulli":
            return losses.sigmoid_binary_cross_entropy(outputs, target)
        return losses.squared_error(outputs, target)

    def eval_sums(self, outputs: jax.Array, batch: tuple) -> tuple[jax.Array, jax.Array]:
        """(sum of per-example losses, number of correct predictions or 0)."""
        if self.kind == "classification":
            labels = batch[1]
            per = optax.softmax_cross_entropy_with_integer_labels(
                outputs.astype(jnp.float32), labels
            )
            return jnp.sum(per), jnp.sum(jnp.argmax(outputs, -1) == labels)
        target = batch[0].reshape(batch[0].shape[0], -1)
        z = outputs.astype(jnp.float32)
        if self.reconstruction == "bernoulli":
            per = jnp.sum(jax.nn.softplus(z) - z * target, axis=-1)
        else:
            per = 0.5 * jnp.sum((z - target) ** 2, axis=-1)
        return jnp.sum(per), jnp.zeros((), jnp.int32)


class Data(NamedTuple):
    """Arrays of one experiment. ``y_*`` are integer labels, or ``None`` for an autoencoder."""

    x_train: np.ndarray
    y_train: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray | None


def batch_of(x: np.ndarray, y: np.ndarray | None, idx: Any) -> tuple:
    """The minibatch ``idx`` of ``x`` (and of ``y`` when there are labels) as a tuple."""
    return (x[idx],) if y is None else (x[idx], y[idx])


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of integer labels."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
