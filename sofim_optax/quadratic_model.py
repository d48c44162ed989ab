r"""The adaptive step: learning rate, momentum and damping from a local quadratic model.

:func:`scale_by_quadratic_model` takes the direction of any optimizer (a curvature method
of this library or a plain optax transformation) and turns it into a step whose length and
momentum minimise the damped local quadratic model of the loss, measured with exact
curvature products, with a Levenberg-Marquardt rule for the damping (Martens & Grosse,
K-FAC, §6-7; the rule kfac-jax's adaptive mode uses). No learning rate, momentum or damping
is tuned.

One step, with ``g`` the gradient, ``u`` the direction of the inner method (``u ≈ C⁻¹g``
for a curvature method), ``δ₋`` the previous step and ``λ`` the damping:

.. math::

   v_1 = -u,\qquad v_2 = \delta_-,\qquad
   A_{ij} = v_i^\top (C + \eta I) v_j,\qquad D_{ij} = v_i^\top v_j,\qquad b_i = g^\top v_i,

   (\alpha, \mu) = \arg\min_w\; M(w) = b^\top w + \tfrac12 w^\top (A + \lambda D) w
   = -(A + \lambda D)^{-1} b,\qquad \delta = \alpha v_1 + \mu v_2,

``C`` the Gauss-Newton matrix of ``obj_fn`` (or its Hessian), ``η`` the L2 coefficient.
The 2×2 system becomes 1×1 at the first step (``δ₋ = 0``) and with ``adapt_momentum=False``. Every
``damping_period`` steps the loss is evaluated at ``θ + δ`` and the reduction ratio

.. math::

   \rho = \frac{h(\theta + \delta) - h(\theta)}{\tfrac12 w^\top A w + b^\top w}

(the actual over the predicted change, the prediction without the damping) adapts ``λ``:
``λ ← λ/ω`` when ``ρ < 1/4``, ``λ ← λω`` when ``ρ > 3/4``, with
``ω = damping_decay ** damping_period``, then clipped to ``[min_damping, max_damping]``.

``λ`` is fed back into the inner method's damping when ``direction`` is a function of the
damping (``direction(λ + η)`` builds the inner transformation at every step, as
``optax.inject_hyperparams`` does): the preconditioner and the model are damped alike, and
a method whose damping acts at preconditioning time (KFAC ``inverse="eigh"``, MBF
``inverse="eigh"``) sees the new value at once, the others at their next refresh.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sofim_optax import distributed
from sofim_optax import hyperparameters as hp
from sofim_optax.curvature import quadratic_forms
from sofim_optax.hyperparameters import Scalar

__all__ = [
    "QuadraticModelState",
    "scale_by_quadratic_model",
    "solve_quadratic_model",
    "adapt_damping",
]

_NAME = "scale_by_quadratic_model"
CURVATURES = ("gauss_newton", "hessian")

Direction = optax.GradientTransformation | Callable[[jax.Array], optax.GradientTransformation]


class QuadraticModelState(NamedTuple):
    """State of :func:`scale_by_quadratic_model`.

    Attributes:
      count: steps taken (``()`` int32).
      damping: ``λ``, the current damping (``()`` float32).
      previous_update: ``δ₋``, the last step taken (the parameters' shapes and dtypes).
      direction_state: the inner transformation's state.
      learning_rate: ``α`` of the last step (``()`` float32; ``0`` for a skipped step).
      momentum: ``μ`` of the last step (``()`` float32).
      reduction_ratio: the last measured ``ρ`` (``()`` float32; ``0`` before the first, and
        ``-100`` for a non-finite loss at the new point).
      rejected: steps not taken (``()`` int32): a non-finite model, a model predicting no
        decrease, or (``reject_increasing_steps``) a measured loss increase.
    """

    count: jax.Array
    damping: jax.Array
    previous_update: Any
    direction_state: Any
    learning_rate: jax.Array
    momentum: jax.Array
    reduction_ratio: jax.Array
    rejected: jax.Array


def solve_quadratic_model(a_damped: jax.Array, b: jax.Array) -> jax.Array:
    r"""``w = -a_damped⁻¹ b`` for a 1×1 or 2×2 model, robust to zero directions.

    A direction whose damped curvature ``a_damped[i, i]`` is not positive (a zero vector:
    ``δ₋`` at the first step, a skipped inner direction) gets the coefficient ``0`` and the
    other one is solved alone; a nearly singular 2×2 system (parallel directions) falls back
    to the first direction alone.

    Args:
      a_damped: ``(k, k)`` symmetric, ``k ∈ {1, 2}``.
      b: ``(k,)``.

    Returns:
      ``(k,)`` coefficients.
    """
    k = b.shape[0]
    diag = jnp.diagonal(a_damped)
    usable = diag > 0
    safe = jnp.where(usable, diag, 1.0)
    alone = jnp.where(usable, -b / safe, 0.0)  # each direction solved on its own
    if k == 1:
        return alone
    a11, a12, a22 = a_damped[0, 0], a_damped[0, 1], a_damped[1, 1]
    det = a11 * a22 - a12 * a12
    both = usable[0] & usable[1] & (det > 1e-4 * a11 * a22)
    safe_det = jnp.where(both, det, 1.0)
    joint = jnp.stack([-(a22 * b[0] - a12 * b[1]), -(a11 * b[1] - a12 * b[0])]) / safe_det
    first_alone = jnp.stack([alone[0], 0.0])
    return jnp.where(both, joint, jnp.where(usable[0], first_alone, alone))


def adapt_damping(
    damping: jax.Array,
    reduction_ratio: jax.Array,
    *,
    omega: jax.Array,
    lower_threshold: Scalar,
    upper_threshold: Scalar,
    min_damping: Scalar,
    max_damping: Scalar,
) -> jax.Array:
    """The Levenberg-Marquardt rule: ``λ/ω`` if ``ρ < lower``, ``λω`` if ``ρ > upper``, else
    ``λ``; clipped to ``[min_damping, max_damping]``. A non-finite ``ρ`` counts as ``-100``
    (a failed step: ``λ`` grows)."""
    rho = jnp.where(jnp.isfinite(reduction_ratio), reduction_ratio, -100.0)
    new = jnp.where(
        rho < lower_threshold,
        damping / omega,
        jnp.where(rho > upper_threshold, damping * omega, damping),
    )
    return jnp.clip(new, min_damping, max_damping)


def _vdot(a: Any, b: Any, dtype: Any) -> jax.Array:
    return sum(
        jnp.vdot(x.astype(dtype), y.astype(dtype))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def _gram(vectors: list[Any], dtype: Any) -> jax.Array:
    k = len(vectors)
    return jnp.stack(
        [jnp.stack([_vdot(vectors[i], vectors[j], dtype) for j in range(k)]) for i in range(k)]
    )


def _inner_products(g: Any, vectors: list[Any], dtype: Any) -> jax.Array:
    return jnp.stack([_vdot(g, v, dtype) for v in vectors])


def _combine(coefficients: jax.Array, vectors: list[Any], like: Any) -> Any:
    def leaf(p, *vs):
        total = sum(c * v.astype(coefficients.dtype) for c, v in zip(coefficients, vs))
        return total.astype(jnp.result_type(p))

    return jax.tree.map(leaf, like, *vectors)


def scale_by_quadratic_model(
    direction: Direction,
    *,
    initial_damping: Scalar = 1.0,
    damping_period: int | jax.Array = 5,
    damping_decay: Scalar = 0.9,
    min_damping: Scalar = 1e-2,
    max_damping: Scalar = 1e8,
    lower_threshold: Scalar = 0.25,
    upper_threshold: Scalar = 0.75,
    adapt_momentum: bool = True,
    curvature: str = "gauss_newton",
    l2_regularization: Scalar = 0.0,
    norm_constraint: Scalar | None = None,
    reject_increasing_steps: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""The adaptive step around ``direction`` (see the module docstring for the math).

    The result's updates are the step ``δ`` itself (already with its sign and length): put
    it last in a chain, with no ``optax.scale(-lr)`` after it. ``update`` needs the loss as
    the extra argument ``obj_fn``::

        tx = sofim_optax.scale_by_quadratic_model(
            lambda damping: sofim_optax.scale_by_kfac(damping=damping))
        updates, state = tx.update(grads, state, params, layer_stats=stats,
                                   obj_fn=lambda p: loss_fn(p, x, y))

    ``obj_fn(params)`` must be the minibatch objective whose gradient is ``grads`` (same
    batch, L2 term included); for the Gauss-Newton curvature it computes its loss with a
    helper of :mod:`sofim_optax.curvature.losses`. Every other extra argument
    (``layer_stats``, ...) goes to the inner transformation, and so does ``obj_fn``.

    Cost per step on top of the inner method: ``k`` forward-mode tangents of the network
    (``k = 2`` with momentum, ``1`` without; each about one forward pass) plus one forward
    and one backward pass through the loss after the predictions
    (:func:`sofim_optax.curvature.quadratic_forms.gauss_newton_quadratic_forms`; the Hessian
    costs one gradient plus ``k`` forward-over-reverse products), and every
    ``damping_period`` steps one more forward pass, the loss at ``θ + δ``. On a dense
    network that is about 1.5 gradients per step with momentum, before amortisation.

    Args:
      direction: the inner method: an ``optax.GradientTransformation`` whose updates are the
        (positive) preconditioned gradient ``u``, such as ``scale_by_kfac(...)`` or
        ``optax.scale_by_adam()``, or a function ``damping -> GradientTransformation`` that
        builds it with the damping ``λ + η`` (fed back every step; it must give the same
        state structure for every damping).
      initial_damping: ``λ₀`` (default ``1.0``), on the curvature's scale (it grows with the
        loss's scale: a loss summed over pixels has a larger curvature than a mean).
      damping_period: steps between adaptations of ``λ`` (default ``5``, kfac-jax's). Each
        adaptation costs one forward pass.
      damping_decay: per-step factor; ``λ`` is multiplied or divided by
        ``ω = damping_decay ** damping_period`` (default ``0.9``: ``ω ≈ 0.59``).
      min_damping: floor of ``λ`` (default ``1e-2``, on the curvature's scale). Near a
        minimum of the minibatch loss its Gauss-Newton curvature vanishes and ``ρ ≈ 1``
        keeps shrinking ``λ``, while the step grows like ``g/λ`` in the directions the
        minibatch does not see; the floor keeps that step bounded (kfac-jax: ``1e-8``).
      max_damping: ceiling of ``λ`` (default ``1e8``).
      lower_threshold: ``ρ`` below which ``λ`` grows (default ``0.25``).
      upper_threshold: ``ρ`` above which ``λ`` shrinks (default ``0.75``).
      adapt_momentum: adapt a momentum ``μ`` on the previous step (default ``True``); ``False``
        solves for ``α`` alone and saves one tangent per step.
      curvature: ``"gauss_newton"`` (default: the Gauss-Newton/Fisher matrix of the losses
        registered by the helpers; positive semi-definite) or ``"hessian"`` (Hessian-vector
        products; no helper needed, but the Hessian may be indefinite: a model that predicts
        no decrease is rejected and raises ``λ``).
      l2_regularization: ``η`` (default ``0``), the coefficient of an ``(η/2)‖θ‖²`` term
        that ``obj_fn`` contains: its curvature ``ηI`` is added to the model and to the
        damping handed to ``direction``.
      norm_constraint: ``c`` (default ``None``, off): the step is scaled down so that
        ``δᵀ(C + ηI)δ ≤ c`` (Martens & Grosse §10's update clipping, in the exact curvature).
      reject_increasing_steps: when the loss at ``θ + δ`` is measured (every
        ``damping_period`` steps) and is higher than at ``θ`` or non-finite, take no step
        (default ``True``); ``λ`` grows either way.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`QuadraticModelState`.

    Raises:
      ValueError: a bad hyperparameter (at construction), or ``obj_fn`` missing or
        registering no predictions with ``curvature="gauss_newton"`` (at trace time).

    References:
      Martens & Grosse, `Optimizing Neural Networks with Kronecker-factored Approximate
      Curvature <https://arxiv.org/abs/1503.05671>`_, ICML 2015 (sections 6-7 and 10).
    """
    hp.check_damping(_NAME, initial_damping, "initial_damping")
    hp.check_positive_int(_NAME, "damping_period", damping_period)
    hp.check_decay(_NAME, "damping_decay", damping_decay)
    hp.check_positive(_NAME, "min_damping", min_damping)
    hp.check_positive(_NAME, "max_damping", max_damping)
    hp.check_choice(_NAME, "curvature", curvature, CURVATURES)
    if norm_constraint is not None:
        hp.check_positive(_NAME, "norm_constraint", norm_constraint)
    hp.check_nonnegative(_NAME, "l2_regularization", l2_regularization)
    if not isinstance(adapt_momentum, bool) or not isinstance(reject_increasing_steps, bool):
        raise TypeError(
            f"{_NAME}: adapt_momentum and reject_increasing_steps must be Python bools (under "
            "optax.inject_hyperparams list them in static_args)."
        )
    forms = (
        quadratic_forms.gauss_newton_quadratic_forms
        if curvature == "gauss_newton"
        else quadratic_forms.hessian_quadratic_forms
    )
    feeds_back = not isinstance(direction, optax.GradientTransformation)
    if feeds_back and not callable(direction):
        raise TypeError(
            f"{_NAME}: direction must be an optax.GradientTransformation or a function "
            f"damping -> GradientTransformation, got {type(direction).__name__}."
        )

    def inner(damping: jax.Array) -> optax.GradientTransformationExtraArgs:
        tx = direction(damping) if feeds_back else direction
        return optax.with_extra_args_support(tx)

    def preconditioner_damping(lam: jax.Array) -> jax.Array:
        return lam + jnp.asarray(l2_regularization, jnp.float32)

    def init(params: Any) -> QuadraticModelState:
        lam = jnp.asarray(initial_damping, jnp.float32)

        def zero():  # (distinct arrays, so that a jitted step may donate the state)
            return jnp.zeros((), jnp.float32)

        return QuadraticModelState(
            count=jnp.zeros((), jnp.int32),
            damping=lam,
            previous_update=jax.tree.map(jnp.zeros_like, params),
            direction_state=inner(preconditioner_damping(lam)).init(params),
            learning_rate=zero(),
            momentum=zero(),
            reduction_ratio=zero(),
            rejected=jnp.zeros((), jnp.int32),
        )

    def update(updates, state, params=None, **extra):
        obj_fn = extra.get("obj_fn")
        if params is None or obj_fn is None:
            raise ValueError(
                f"{_NAME}: update needs params and the loss as obj_fn=lambda p: loss_fn(p, "
                "batch) (the same minibatch objective as the gradient)."
            )
        lam = state.damping
        u, direction_state = inner(preconditioner_damping(lam)).update(
            updates, state.direction_state, params, **extra
        )
        vectors = [jax.tree.map(jnp.negative, u)]
        if adapt_momentum:
            vectors.append(state.previous_update)
        # (the 2×2 model in the parameters' precision, at least float32)
        dtype = hp.accumulation_dtype(*jax.tree.leaves(params))
        loss, curv = forms(obj_fn, params, vectors)
        loss = loss.astype(dtype)
        gram = _gram(vectors, dtype)
        eta = jnp.asarray(l2_regularization, dtype)
        a = curv.astype(dtype) + eta * gram
        b = _inner_products(updates, vectors, dtype)
        w = solve_quadratic_model(a + lam.astype(dtype) * gram, b)
        if norm_constraint is not None:
            curvature_norm = jnp.dot(w, a @ w)
            c = jnp.asarray(norm_constraint, dtype)
            w = w * jnp.minimum(1.0, jnp.sqrt(c / jnp.maximum(curvature_norm, 1e-30)))
        predicted = 0.5 * jnp.dot(w, a @ w) + jnp.dot(b, w)
        # A model that is not finite, predicts an increase, or has no direction of positive
        # damped curvature although the gradient is not zero (an indefinite Hessian, a
        # non-finite gradient) gives no step, and λ grows.
        stalled = (predicted == 0) & jnp.any(b != 0)
        valid = jnp.all(jnp.isfinite(w)) & jnp.isfinite(predicted) & (predicted <= 0) & ~stalled
        w = jnp.where(valid, w, 0.0)
        step = _combine(w, vectors, params)

        period = jnp.asarray(damping_period, jnp.int32)
        adapt = (state.count % period) == 0
        measure = adapt & valid & (predicted < 0)
        new_loss = lax.cond(
            measure,
            lambda: jnp.asarray(obj_fn(optax.apply_updates(params, step))).astype(dtype),
            lambda: loss,
        )
        rho = (new_loss - loss) / jnp.where(measure, predicted, -1.0)
        rho = jnp.where(jnp.isfinite(rho), rho, -100.0)
        omega = jnp.asarray(damping_decay, dtype) ** period.astype(dtype)

        def rule(ratio):
            return adapt_damping(
                lam.astype(dtype),
                ratio,
                omega=omega,
                lower_threshold=lower_threshold,
                upper_threshold=upper_threshold,
                min_damping=min_damping,
                max_damping=max_damping,
            )

        # A measured step follows the rule; an invalid model is a failed step (λ grows);
        # otherwise λ stays until the next measurement.
        lam_new = jnp.where(measure, rule(rho), jnp.where(valid, lam, rule(-jnp.inf)))
        lam_new = lam_new.astype(jnp.float32)

        taken = valid
        if reject_increasing_steps:
            taken = taken & ~(measure & ~(new_loss <= loss))
        step = jax.tree.map(lambda d: jnp.where(taken, d, jnp.zeros_like(d)), step)
        previous = jax.tree.map(
            lambda d, old: jnp.where(taken, d, old), step, state.previous_update
        )
        new_state = QuadraticModelState(
            count=optax.safe_increment(state.count),
            damping=lam_new,
            previous_update=previous,
            direction_state=direction_state,
            learning_rate=jnp.where(taken, w[0], 0.0).astype(jnp.float32),
            momentum=jnp.where(taken, w[1] if adapt_momentum else 0.0, 0.0).astype(jnp.float32),
            reduction_ratio=jnp.where(measure, rho, state.reduction_ratio).astype(jnp.float32),
            rejected=state.rejected + (~taken).astype(jnp.int32),
        )
        return step, new_state

    return optax.GradientTransformationExtraArgs(init, distributed.mesh_agnostic(update))


scale_by_quadratic_model.static_args = ("adapt_momentum", "curvature", "reject_increasing_steps")
