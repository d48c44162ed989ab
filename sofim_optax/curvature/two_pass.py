"""Two-pass statistics for methods that compare one minibatch at two parameter values (K-BFGS).

K-BFGS (Goldfarb, Ren & Bahamou 2020) builds its ``(s, y)`` pairs from the *same* minibatch
at the old and the new parameters. In optax form (see :func:`sofim_optax.scale_by_kbfgs`)
each update takes

* ``layer_stats``: statistics of the current minibatch at the current parameters (the pass
  that also gives the loss and the gradient), and
* ``previous_batch_stats``: statistics of the *previous* minibatch at the current parameters
  (an extra forward and backward pass, the authors' second pass, done one step later).

:func:`two_pass_value_grad_and_stats` runs both passes; :func:`make_two_pass_train_step` makes
a whole train step of a functional (``flax.linen``-style) model from a loss and an optax
optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optax

from sofim_optax.curvature import linen as _linen

__all__ = ["two_pass_value_grad_and_stats", "make_two_pass_train_step"]


def two_pass_value_grad_and_stats(
    loss_fn: Callable[..., Any],
    params: Any,
    batch: Sequence[Any],
    previous_batch: Sequence[Any] | None,
    *,
    capture: Callable[..., Any] = _linen.value_grad_and_stats,
    **capture_kwargs: Any,
) -> tuple[Any, Any, Any, Any]:
    """Loss, gradient and statistics of ``batch``, plus the statistics of ``previous_batch``,
    both at ``params``.

    ``value, grads, layer_stats = capture(loss_fn, params, *batch, **capture_kwargs)`` and, when
    ``previous_batch`` is not ``None``, ``_, _, previous_batch_stats = capture(loss_fn, params,
    *previous_batch, **capture_kwargs)`` (a second forward and backward pass; its gradient is
    not used and XLA drops the parameter-gradient part when nothing reads it). On the first
    step (``previous_batch=None``) there is no previous minibatch and no second pass:
    ``previous_batch_stats`` is ``layer_stats`` itself, which K-BFGS requires on every update
    and ignores at its first step.

    Args:
      loss_fn: ``loss_fn(params, *batch)`` returning the (batch-mean) loss, or ``(loss, aux)``
        with ``has_aux=True`` in ``capture_kwargs``. Leave L2 regularisation to the optimizer
        (e.g. ``kbfgs(weight_decay=...)``): it does not change the statistics.
      params: what ``capture`` differentiates (Flax linen variables or params; an NNX model
        with ``capture=sofim_optax.curvature.nnx.value_grad_and_stats``).
      batch: tuple of the arguments of ``loss_fn`` after ``params`` for this minibatch.
      previous_batch: the same for the previous minibatch, or ``None`` on the first step
        (then no second pass is made).
      capture: the capture adapter (default: ``curvature.linen.value_grad_and_stats``).
      **capture_kwargs: forwarded to ``capture`` (``has_aux``, ``loss_reduction``, ...).

    Returns:
      ``(value, grads, layer_stats, previous_batch_stats)``; ``previous_batch_stats`` is
      ``layer_stats`` when ``previous_batch`` is ``None``.
    """
    value, grads, layer_stats = capture(loss_fn, params, *batch, **capture_kwargs)
    previous_stats = layer_stats  # the first step: K-BFGS ignores them
    if previous_batch is not None:
        _, _, previous_stats = capture(loss_fn, params, *previous_batch, **capture_kwargs)
    return value, grads, layer_stats, previous_stats


def make_two_pass_train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformationExtraArgs,
    *,
    capture: Callable[..., Any] = _linen.value_grad_and_stats,
    **capture_kwargs: Any,
) -> Callable[..., tuple[Any, Any, Any]]:
    """A train step ``step(params, opt_state, batch, previous_batch) -> (params, opt_state, value)``.

    The step runs :func:`two_pass_value_grad_and_stats`, then
    ``optimizer.update(grads, opt_state, params, layer_stats=..., previous_batch_stats=...)``
    and ``optax.apply_updates``. Jit it yourself; the first call (``previous_batch=None``: one
    pass, and ``previous_batch_stats=layer_stats``, ignored by K-BFGS at its first step) and
    the later ones trace separately (two compilations).

    Example (Flax linen; ``x``, ``y`` one minibatch)::

        import jax, optax, sofim_optax
        from sofim_optax.curvature.two_pass import make_two_pass_train_step

        def loss_fn(variables, x, y):
            logits = model.apply(variables, x)
            return optax.sigmoid_binary_cross_entropy(logits, y).sum(-1).mean()

        opt = sofim_optax.kbfgs(learning_rate=0.3, damping=0.3, weight_decay=1e-5)
        step = jax.jit(make_two_pass_train_step(loss_fn, opt))
        opt_state, previous = opt.init(variables), None
        for x, y in batches:
            variables, opt_state, loss = step(variables, opt_state, (x, y), previous)
            previous = (x, y)   # evaluated again, at the new parameters, by the next step

    For ``flax.nnx`` call :func:`two_pass_value_grad_and_stats` with
    ``capture=sofim_optax.curvature.nnx.value_grad_and_stats`` inside your ``nnx.jit`` step and
    pass both statistics to ``nnx.Optimizer.update(model, grads, layer_stats=...,
    previous_batch_stats=...)``.

    Args:
      loss_fn: ``loss_fn(params, *batch)``, the batch-mean loss (or ``(loss, aux)`` with
        ``has_aux=True``).
      optimizer: an optax transformation taking ``layer_stats`` and ``previous_batch_stats``
        (e.g. :func:`sofim_optax.kbfgs`, :func:`sofim_optax.kbfgs_l`).
      capture: the capture adapter (default ``curvature.linen.value_grad_and_stats``).
      **capture_kwargs: forwarded to ``capture``.

    Returns:
      ``step(params, opt_state, batch, previous_batch)`` returning ``(params, opt_state,
      value)``, ``value`` as returned by the capture (the loss, or ``(loss, aux)``).
    """

    def step(params, opt_state, batch, previous_batch=None):
        value, grads, stats, previous_stats = two_pass_value_grad_and_stats(
            loss_fn,
            params,
            tuple(batch),
            None if previous_batch is None else tuple(previous_batch),
            capture=capture,
            **capture_kwargs,
        )
        updates, opt_state = optimizer.update(
            grads, opt_state, params, layer_stats=stats, previous_batch_stats=previous_stats
        )
        return optax.apply_updates(params, updates), opt_state, value

    return step
