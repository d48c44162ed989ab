"""Exact curvature quadratic forms ``uᵢᵀ C uⱼ`` of a loss, never forming ``C``.

For a handful of directions ``u₁ … u_k`` (parameter-shaped pytrees) these functions
return the ``k × k`` matrix ``Aᵢⱼ = uᵢᵀ C uⱼ`` and the loss, from forward-mode products
through the user's own loss function ``obj_fn(params) -> scalar``:

* :func:`gauss_newton_quadratic_forms`: ``C = G``, the generalised Gauss-Newton matrix
  ``G = Jᵀ H_z J``, where ``J`` is the Jacobian of the predictions registered by the loss
  helpers of :mod:`sofim_optax.curvature.losses` with respect to the parameters and
  ``H_z`` is the Hessian of ``obj_fn`` with respect to those predictions. For the three
  helpers (categorical, Bernoulli, unit Gaussian: canonical links) ``G`` is also the
  model's Fisher information, and it is positive semi-definite. ``H_z`` is taken from
  ``obj_fn`` itself, so a scale or a sum of several helpers in the loss is accounted
  for exactly. Terms of ``obj_fn`` that do not depend on the predictions (an L2 penalty)
  have no curvature here; the quadratic model adds an L2 term's curvature separately.
* :func:`hessian_quadratic_forms`: ``C = ∇²obj_fn``, the full Hessian, from
  forward-over-reverse Hessian-vector products. It needs no helper, but it may be
  indefinite.

How the Gauss-Newton forms are computed. Each helper returns ``z + ε`` for a zero
perturbation ``ε`` of its predictions ``z`` (see
``sofim_optax.curvature._capture.register_predictions``). The map
``θ ↦ (z(θ), ∇_ε obj_fn(θ, ε)|_{ε=0})`` is linearised at ``θ`` once
(:func:`jax.linearize`), and its linear part is applied to the ``k`` directions at once
(``jax.vmap``). Its tangents along ``u`` are ``J u`` and ``H_z J u`` (the loss depends on
``θ`` through ``z`` only, as far as ``∇_ε`` can see), so ``Aᵢⱼ = Σ_helpers ⟨J uᵢ, H_z J
uⱼ⟩``. Cost: one forward pass and one backward pass through the loss *after* the
predictions, plus ``k`` forward-mode tangents of the network (each about one forward pass);
no backward pass through the network.

The Hessian forms cost one gradient plus ``k`` forward-over-reverse tangents (each about
two forward passes and one backward pass).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sofim_optax import distributed
from sofim_optax.curvature import _capture

__all__ = ["gauss_newton_quadratic_forms", "hessian_quadratic_forms", "stack_directions"]

_NO_HELPER = (
    "obj_fn registered no predictions, so its Gauss-Newton curvature is unknown. Compute "
    "the loss with a helper of sofim_optax.curvature.losses (softmax_cross_entropy for "
    "classes, sigmoid_binary_cross_entropy for independent binary outputs, squared_error "
    "for regression) in place of the optax loss, or use curvature='hessian' (Hessian-vector "
    "products; the Hessian may be indefinite)."
)


def stack_directions(directions: Sequence[Any], params: Any) -> Any:
    """The directions stacked on a new leading axis, each leaf in its parameter's dtype."""
    return jax.tree.map(
        lambda p, *us: jnp.stack([jnp.asarray(u).astype(jnp.result_type(p)) for u in us]),
        params,
        *directions,
    )


def _inner_products(left: Any, right: Any) -> jax.Array:
    """``Σ_leaves einsum('i…,j…->ij')`` of two stacks, accumulated in at least float32."""
    total = None
    for a, b in zip(jax.tree.leaves(left), jax.tree.leaves(right)):
        dtype = jnp.promote_types(jnp.result_type(a), jnp.float32)
        a = a.reshape(a.shape[0], -1).astype(dtype)
        b = b.reshape(b.shape[0], -1).astype(dtype)
        part = a @ b.T
        total = part if total is None else total + part.astype(total.dtype)
    if total is None:
        raise ValueError("quadratic forms of empty directions")
    return total


def _symmetric(a: jax.Array) -> jax.Array:
    return 0.5 * (a + a.T)


def _registered_shapes(obj_fn: Callable[[Any], jax.Array], params: Any) -> list[Any]:
    """The shapes and dtypes of the predictions ``obj_fn`` registers (a shape-only trace)."""
    found: list[Any] = []

    def run(p: Any) -> jax.Array:
        with _capture.probe_predictions(None) as probe:
            loss = obj_fn(p)
        found.extend(
            jax.ShapeDtypeStruct(jnp.shape(z), jnp.result_type(z)) for z in probe.predictions
        )
        return loss

    jax.eval_shape(run, params)
    return found


def gauss_newton_quadratic_forms(
    obj_fn: Callable[[Any], jax.Array], params: Any, directions: Sequence[Any]
) -> tuple[jax.Array, jax.Array]:
    """``(obj_fn(params), A)`` with ``Aᵢⱼ = uᵢᵀ G uⱼ``, ``G`` the Gauss-Newton matrix.

    Args:
      obj_fn: ``obj_fn(params) -> scalar`` loss, computed with the helpers of
        :mod:`sofim_optax.curvature.losses` (each called once, at the top level of
        ``obj_fn``, on the whole batch).
      params: where the curvature is taken.
      directions: ``k ≥ 1`` pytrees shaped like ``params``.

    Returns:
      The loss (at least float32) and the symmetric ``(k, k)`` matrix ``A`` (at least
      float32).

    Raises:
      ValueError: ``obj_fn`` registers no predictions (the message names the helpers).
    """
    zeros = [jnp.zeros(z.shape, z.dtype) for z in _registered_shapes(obj_fn, params)]
    if not zeros:
        raise ValueError(_NO_HELPER)

    def probed(p: Any, eps: list[jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
        with _capture.probe_predictions(eps) as probe:
            loss = obj_fn(p)
        return loss, probe.predictions

    def predictions_and_output_gradient(p: Any):
        (loss, predictions), output_gradient = jax.value_and_grad(probed, 1, has_aux=True)(p, zeros)
        return (predictions, output_gradient), loss

    _, linear, loss = jax.linearize(predictions_and_output_gradient, params, has_aux=True)
    jz, h_jz = distributed.map_directions(linear, stack_directions(directions, params))
    return jnp.asarray(loss).astype(jnp.promote_types(jnp.result_type(loss), jnp.float32)), (
        _symmetric(_inner_products(jz, h_jz))
    )


def hessian_quadratic_forms(
    obj_fn: Callable[[Any], jax.Array], params: Any, directions: Sequence[Any]
) -> tuple[jax.Array, jax.Array]:
    """``(obj_fn(params), A)`` with ``Aᵢⱼ = uᵢᵀ ∇²obj_fn uⱼ`` (possibly indefinite).

    Args:
      obj_fn: ``obj_fn(params) -> scalar``, any twice-differentiable loss.
      params: where the Hessian is taken.
      directions: ``k ≥ 1`` pytrees shaped like ``params``.

    Returns:
      The loss and the symmetric ``(k, k)`` matrix ``A`` (both at least float32).
    """

    def gradient(p: Any):
        loss, g = jax.value_and_grad(obj_fn)(p)
        return g, loss

    _, linear, loss = jax.linearize(gradient, params, has_aux=True)
    stacked = stack_directions(directions, params)
    return jnp.asarray(loss).astype(jnp.promote_types(jnp.result_type(loss), jnp.float32)), (
        _symmetric(_inner_products(stacked, distributed.map_directions(linear, stacked)))
    )
