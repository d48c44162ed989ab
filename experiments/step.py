"""The one train step builder of the experiments.

:func:`make_train_step` turns a loss and an optax transformation into a train step that
computes what the optimizer's ``update`` needs besides the gradient. The needs are declared
by the optimizer's registry entry (:attr:`experiments.registry.OptimizerSpec.needs`), so a
caller writes ``make_train_step(loss_fn, tx, needs=OPTIMIZERS[name].needs)``:

* ``layer_stats``: per-layer statistics from
  :func:`sofim_optax.curvature.linen.value_grad_and_stats`, in the same forward and
  backward pass as the gradient; the empirical Fisher, or the sampled Fisher
  (``fisher="sampled"``) drawn with the step's ``rng``;
* ``previous_batch_stats`` (K-BFGS): the statistics of the previous minibatch at the
  current parameters, a second pass in the same step; its sampled targets use
  ``fold_in(rng, 1)``. On the first step (no ``previous_inputs``) there is no second pass and
  the current batch's ``layer_stats`` are passed instead, which K-BFGS requires and ignores
  at its first step (as :mod:`sofim_optax.curvature.two_pass` does);
* ``obj_fn`` (AdaHessian, Nyström-SGD): ``obj_fn(params)``, the objective of the current
  batch at other parameters;
* ``value_fn`` (optax's L-BFGS line search): ``value``, ``grad`` and ``value_fn``.

The step is a pure function; jit it (and donate what you like) at the call site.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import optax

from sofim_optax.curvature import linen as curvature_linen

__all__ = ["NEEDS", "FISHERS", "StepOutput", "make_train_step"]

NEEDS = ("layer_stats", "previous_batch_stats", "obj_fn", "value_fn")
FISHERS = ("empirical", "sampled")
_STATS_NEEDS = frozenset({"layer_stats", "previous_batch_stats"})


class StepOutput(NamedTuple):
    """What one train step returns: the new parameters and state, the objective and ``aux``."""

    params: Any
    opt_state: Any
    loss: Any
    aux: Any


def make_train_step(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    *,
    needs: Sequence[str] = (),
    fisher: str = "empirical",
    fisher_batch_size: int | None = None,
    has_aux: bool = False,
) -> Callable[..., StepOutput]:
    """A train step ``step(params, opt_state, inputs, previous_inputs=None, rng=None)``.

    Args:
      loss_fn: ``loss_fn(params, *inputs)``, the objective to minimise, or
        ``(objective, aux)`` with ``has_aux``. ``inputs`` are whatever follows the
        parameters: a batch ``(x, y)``, or model state and a batch.
      tx: the optimizer.
      needs: the extra arguments of ``tx.update``, a subset of :data:`NEEDS`
        (``OptimizerSpec.needs``).
      fisher: ``"empirical"`` or ``"sampled"`` (the latter uses the step's ``rng``).
      fisher_batch_size: statistics on the first ``M`` examples of the batch only.
      has_aux: ``loss_fn`` returns ``(objective, aux)``.

    Returns:
      ``step(params, opt_state, inputs, previous_inputs=None, rng=None) ->``
      :class:`StepOutput` ``(params, opt_state, loss, aux)`` with ``loss`` the objective
      at the step's parameters and ``aux`` ``None`` unless ``has_aux``. ``previous_inputs``
      (the previous minibatch's ``inputs``, ``None`` on the first step) is read only for
      ``previous_batch_stats``.
    """
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"unknown needs {sorted(unknown)}; known: {NEEDS}")
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}, got {fisher!r}")
    needs = frozenset(needs)

    def capture(params, inputs, rng):
        return curvature_linen.value_grad_and_stats(
            loss_fn,
            params,
            *inputs,
            has_aux=has_aux,
            fisher=fisher,
            rng=rng if fisher == "sampled" else None,
            fisher_batch_size=fisher_batch_size,
        )

    def objective(params, inputs):
        out = loss_fn(params, *inputs)
        return out[0] if has_aux else out

    def step(params, opt_state, inputs, previous_inputs=None, rng=None) -> StepOutput:
        inputs = tuple(inputs)
        extra: dict[str, Any] = {}
        if needs & _STATS_NEEDS:
            value, grads, stats = capture(params, inputs, rng)
            if "layer_stats" in needs:
                extra["layer_stats"] = stats
        else:
            value, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, *inputs)
        if "previous_batch_stats" in needs:
            if previous_inputs is None:  # the first step: required, ignored by K-BFGS
                extra["previous_batch_stats"] = stats
            else:
                previous_rng = None if rng is None else jax.random.fold_in(rng, 1)
                extra["previous_batch_stats"] = capture(
                    params, tuple(previous_inputs), previous_rng
                )[2]
        loss, aux = value if has_aux else (value, None)
        if needs & {"obj_fn", "value_fn"}:

            def obj_fn(other_params):
                return objective(other_params, inputs)

            if "obj_fn" in needs:
                extra["obj_fn"] = obj_fn
            if "value_fn" in needs:
                extra.update(value=loss, grad=grads, value_fn=obj_fn)
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return StepOutput(optax.apply_updates(params, updates), opt_state, loss, aux)

    return step
