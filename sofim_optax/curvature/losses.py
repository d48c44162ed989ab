"""Loss functions that tell the capture adapters the model's likelihood.

Each helper is an ordinary loss: it returns the batch **mean** over axis 0 of
the per-example loss, where the per-example loss is **summed** over all the
remaining axes (sequence positions, pixels, outputs). Use them in place of the
matching optax losses inside the ``loss_fn`` given to
``curvature.linen.value_grad_and_stats`` / ``curvature.nnx.value_grad_and_stats``.

When such a capture runs with ``fisher="sampled"``, the helper also registers
its predictions and its likelihood, so that the capture can draw targets from
the model's predictive distribution:

================================ ===================== ===========================
helper                           likelihood            sampled target
================================ ===================== ===========================
``softmax_cross_entropy``        categorical(logits)   ``jax.random.categorical``
``sigmoid_binary_cross_entropy`` Bernoulli(σ(logits))  ``jax.random.bernoulli``
``squared_error``                N(predictions, I)     ``predictions + N(0, I)``
================================ ===================== ===========================

Outside a capture, or with ``fisher="empirical"``, they are plain losses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sofim_optax.curvature._capture import Likelihood, register_predictions
from sofim_optax.hyperparameters import accumulation_dtype

__all__ = ["softmax_cross_entropy", "sigmoid_binary_cross_entropy", "squared_error"]


def _compute_dtype(x: jax.Array) -> jnp.dtype:
    """At least float32, so that bfloat16 models get a float32 loss."""
    return accumulation_dtype(x)


def _sum_but_first(x: jax.Array) -> jax.Array:
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def _batch_mean(per_example: jax.Array) -> jax.Array:
    return jnp.mean(per_example, axis=0)


# --- categorical -------------------------------------------------------------


def _softmax_ce_per_example(logits: jax.Array, labels: jax.Array) -> jax.Array:
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    log_p = jax.nn.log_softmax(logits.astype(_compute_dtype(logits)), axis=-1)
    if labels.shape == logits.shape[:-1] and jnp.issubdtype(labels.dtype, jnp.integer):
        nll = -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]
    elif labels.shape == logits.shape:
        nll = -jnp.sum(labels.astype(log_p.dtype) * log_p, axis=-1)
    else:
        raise ValueError(
            "softmax_cross_entropy: labels must be integer class indices of shape "
            f"{logits.shape[:-1]} or one-hot/probabilities of shape {logits.shape}; got "
            f"{labels.dtype} {labels.shape}."
        )
    return _sum_but_first(nll) if nll.ndim > 1 else nll


def _categorical_sample(key: jax.Array, logits: jax.Array) -> jax.Array:
    return jax.random.categorical(key, logits, axis=-1)


CATEGORICAL = Likelihood("categorical", _categorical_sample, _softmax_ce_per_example)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy, the negative log-likelihood of a categorical model.

    ``loss = mean_n sum_{positions} -log softmax(logits)[label]``.

    Args:
      logits: unnormalised log-probabilities ``(N, ..., C)``; the classes are on
        the last axis and the batch on axis 0.
      labels: integer class indices ``(N, ...)`` or one-hot vectors / class
        probabilities ``(N, ..., C)``.

    Returns:
      The scalar batch-mean loss (at least float32).
    """
    logits = register_predictions(CATEGORICAL, logits)
    return _batch_mean(_softmax_ce_per_example(logits, labels))


# --- Bernoulli ---------------------------------------------------------------


def _elementwise_nll(loss: str, what: str, elementwise):
    """The per-example NLL ``sum_{j} elementwise(z_nj, t_nj)`` of a model whose outputs and
    targets have the same shape (``what`` names the outputs in the error message)."""

    def per_example(outputs: jax.Array, targets: jax.Array) -> jax.Array:
        outputs, targets = jnp.asarray(outputs), jnp.asarray(targets)
        if targets.shape != outputs.shape:
            raise ValueError(
                f"{loss}: targets shape {targets.shape} != {what} shape {outputs.shape}."
            )
        z = outputs.astype(_compute_dtype(outputs))
        nll = elementwise(z, targets.astype(z.dtype))
        return _sum_but_first(nll) if nll.ndim > 1 else nll

    return per_example


_sigmoid_bce_per_example = _elementwise_nll(
    "sigmoid_binary_cross_entropy", "logits", lambda z, t: jax.nn.softplus(z) - z * t
)


def _bernoulli_sample(key: jax.Array, logits: jax.Array) -> jax.Array:
    return jax.random.bernoulli(key, jax.nn.sigmoid(logits)).astype(logits.dtype)


BERNOULLI = Likelihood("bernoulli", _bernoulli_sample, _sigmoid_bce_per_example)


def sigmoid_binary_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Sigmoid binary cross-entropy, the NLL of independent Bernoulli outputs.

    ``loss = mean_n sum_j [softplus(z_nj) - t_nj z_nj]``
    ``= mean_n sum_j -[t log σ(z) + (1 - t) log(1 - σ(z))]``.

    Args:
      logits: ``(N, ...)`` logits ``z``.
      targets: ``(N, ...)`` targets ``t`` in ``[0, 1]``, same shape as ``logits``.

    Returns:
      The scalar batch-mean loss (at least float32).
    """
    logits = register_predictions(BERNOULLI, logits)
    return _batch_mean(_sigmoid_bce_per_example(logits, targets))


# --- Gaussian ----------------------------------------------------------------


_squared_error_per_example = _elementwise_nll(
    "squared_error", "predictions", lambda p, t: 0.5 * jnp.square(p - t)
)


def _gaussian_sample(key: jax.Array, predictions: jax.Array) -> jax.Array:
    return predictions + jax.random.normal(key, predictions.shape, predictions.dtype)


GAUSSIAN = Likelihood("gaussian", _gaussian_sample, _squared_error_per_example)


def squared_error(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    """Half squared error, the NLL (up to a constant) of a unit-variance Gaussian.

    ``loss = mean_n sum_j 0.5 (p_nj - t_nj)^2``.

    Args:
      predictions: ``(N, ...)`` predicted means ``p``.
      targets: ``(N, ...)`` targets ``t``, same shape.

    Returns:
      The scalar batch-mean loss (at least float32).
    """
    predictions = register_predictions(GAUSSIAN, predictions)
    return _batch_mean(_squared_error_per_example(predictions, targets))
