"""The skeleton of a layer-wise preconditioner: counting, periodic refreshes, fallback.

A method supplies the four functions of a :class:`LayerwiseMethod`; the skeleton
(:func:`layerwise_transformation`) turns them into an ``optax.GradientTransformationExtraArgs``
that finds the layers, validates ``layer_stats``, runs the statistics update and the refresh
under ``lax.cond`` on their periods, preconditions every captured layer's gradient matrix,
routes every other parameter to the fallback, and casts results back to each leaf's dtype.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sofim_optax import distributed, guards
from sofim_optax import hyperparameters as hp
from sofim_optax.layerwise.checks import check_layer_stats
from sofim_optax.layerwise.fallback import fallback_init, fallback_update, scale_shift_diagonals
from sofim_optax.layerwise.layers import ParamLayout, discover_layers, gradient_matrix, split_matrix

__all__ = ["LayerwiseMethod", "layerwise_transformation"]

logger = logging.getLogger("sofim_optax")


@dataclasses.dataclass(frozen=True)
class LayerwiseMethod:
    """The four functions that make a layer-wise method.

    All run at trace time inside the skeleton's ``update``. ``curvature`` is the method's own
    pytree of arrays, whose structure, shapes and dtypes never change (it goes through
    ``lax.cond``); a method typically rebuilds its :class:`FactorLayout` from
    ``param_layout.layers`` in each function (it is static and cheap). ``extra`` are the extra
    keyword arguments of ``update`` other than ``layer_stats`` (e.g. K-BFGS's
    ``previous_batch_stats``).

    Attributes:
      init: ``init(param_layout, dtype) -> curvature``. ``dtype`` is the accumulation dtype
        (float32, or float64 for float64 kernels).
      update_statistics: ``update_statistics(curvature, param_layout, stats, **extra) ->
        curvature`` with ``stats = {layer index: LayerStats}`` for the captured layers (run when
        ``count % stats_period == 0``, under ``lax.cond``).
      refresh: ``refresh(curvature, param_layout, **extra) -> curvature`` (eigendecompositions
        or inverses; run when ``count % inverse_period == 0``, after the statistics), or
        ``None`` for a method that decomposes nothing on a period (K-BFGS keeps its matrices
        by BFGS updates instead).
      precondition: ``precondition(curvature, param_layout, grads, **extra) ->
        (preconditioned, curvature)`` with ``grads = {layer index: V}`` (gradient matrices
        ``(d_a, d_g)`` in the accumulation dtype) and ``preconditioned`` keyed alike; it runs
        every step and returns the curvature too, for updates that belong after the direction
        (K-BFGS's Hessian-action update of ``H_a``); most methods return it unchanged.
      after_discarded_statistics: optional ``curvature -> curvature``, applied to the kept
        (old) curvature when a statistics update was discarded for a non-finite value
        (K-BFGS forgets its stored means of the last minibatch); ``None`` (default): the old
        curvature is kept as it is.
      extra_statistics: the names of the extra ``update`` arguments that hold statistics of
        the captured layers, like ``layer_stats`` (K-BFGS: ``("previous_batch_stats",)``); a
        non-finite value in them discards the statistics update too. Default ``()``.
      kind_sensitive: the method's state differs between a dense map and a convolution of
        the same kernel shape (Mini-Block Fisher's partition); see
        :func:`~sofim_optax.layerwise.check_layer_stats`. Default ``False``.
      fallback_kinds: ``LayerStats.layer_kind`` values the method cannot use (K-BFGS:
        ``("tied_embedding",)``, which has no ``outputs``): statistics of those kinds are
        dropped and their layers take the fallback path, as if they had no entry. Default
        ``()``.
    """

    init: Callable[..., Any]
    update_statistics: Callable[..., Any]
    refresh: Callable[..., Any] | None
    precondition: Callable[..., dict[int, jax.Array]]
    after_discarded_statistics: Callable[[Any], Any] | None = None
    extra_statistics: tuple[str, ...] = ()
    kind_sensitive: bool = False
    fallback_kinds: tuple[str, ...] = ()


def _every(period: Any, count: jax.Array, fn: Callable[[Any], Any], operand: Any) -> Any:
    """``fn(operand)`` when ``count % period == 0`` (under ``lax.cond``), else ``operand``."""
    if isinstance(period, int) and period == 1:
        return fn(operand)
    return lax.cond(count % period == 0, fn, lambda x: x, operand)


def _guarded(
    fn: Callable[[Any], Any],
    counter: str,
    forget: Callable[[Any], Any] | None = None,
    inputs: Any = None,
) -> Callable[[Any], Any]:
    """``(curvature, skipped) -> (fn(curvature), skipped)`` under :func:`guards.guarded`: the
    old curvature (passed through ``forget`` if given) is kept, and counted in
    ``skipped.<counter>``, when ``fn`` produced a non-finite value or ``inputs`` hold one."""

    def run(operand):
        curvature, skipped = operand
        kept = curvature if forget is None else forget(curvature)
        return guards.guarded(fn(curvature), kept, skipped, counter, also=guards.all_finite(inputs))

    return run


def _accumulation_dtype(leaves: Sequence[jax.Array], layout: ParamLayout) -> Any:
    return hp.accumulation_dtype(
        *(jnp.asarray(leaves[layer.kernel_leaf]).dtype for layer in layout.layers)
    )


def _extra_statistics(
    method: LayerwiseMethod, extra: dict[str, Any], layout: ParamLayout, active: Sequence[int]
) -> list:
    """The captured layers' entries of the extra arguments that hold statistics
    (``method.extra_statistics``, e.g. K-BFGS's ``previous_batch_stats``)."""
    paths = [layout.layers[i].path for i in active]
    values = [extra.get(name) for name in method.extra_statistics]
    return [v[p] for v in values if isinstance(v, dict) for p in paths if p in v]


def layerwise_transformation(
    *,
    name: str,
    method: LayerwiseMethod,
    state_cls: Callable[..., Any],
    stats_period: Any,
    inverse_period: Any,
    fallback: optax.GradientTransformation | None,
    kernel_output_axes: Any = None,
    max_factor_dim: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Builds a Kronecker-family ``GradientTransformationExtraArgs`` from a method.

    ``state_cls(count=..., curvature=..., fallback_state=..., skipped=...)`` builds the state
    (a NamedTuple with those four fields). ``update(updates, state, params=None, *,
    layer_stats=None, **extra)``:

    1. finds the layers in ``updates`` and validates ``layer_stats`` (errors name the layer);
    2. ``count % stats_period == 0``: ``method.update_statistics`` (``extra`` forwarded);
    3. ``count % inverse_period == 0``: ``method.refresh``;
    4. ``method.precondition`` on the captured layers' gradient matrices, results cast back to
       each leaf's dtype;
    5. ``fallback`` (identity when ``None``) on every other leaf, ``extra`` forwarded (without
       ``layer_stats``), plus ``fisher_diagonal={leaf path: exact per-example diagonal}`` of
       the normalisation scales and biases that ``layer_stats`` has statistics for
       (:func:`~sofim_optax.layerwise.scale_shift_diagonals`);
    6. ``count ← safe_increment(count)``.

    Every part is guarded (:mod:`sofim_optax.guards`): a statistics update (2, and the
    curvature ``precondition`` returns) or a refresh (3) that produces a non-finite value is
    discarded and counted in ``skipped.statistics`` / ``skipped.refreshes``; a non-finite
    gradient skips the step (zero update, state unchanged) and a non-finite direction zeroes
    the update, both counted in ``skipped.steps``.

    ``kernel_output_axes`` (``{layer path: number of output axes}``, default ``None``) is
    handed to :func:`~sofim_optax.layerwise.discover_layers` at ``init`` and ``update``.

    ``max_factor_dim`` (default ``None``: no limit): a layer with ``d_a`` or ``d_g`` above it
    is not given to the method at all (no state, no statistics) and takes the fallback path,
    so a vocabulary-sized head never allocates a ``d × d`` matrix; its statistics, if passed,
    are ignored. For methods whose factors cannot be made block-diagonal (the KPSVD family,
    K-BFGS); KFAC keeps such factors block-diagonal instead.

    A one-time ``logging`` INFO line (logger ``"sofim_optax"``) names the preconditioned layers
    and the leaves that take the fallback path, at the first trace of this instance.
    """
    hp.check_positive_int(name, "stats_period", stats_period)
    hp.check_positive_int(name, "inverse_period", inverse_period)
    fb = optax.with_extra_args_support(optax.identity() if fallback is None else fallback)
    fb_name = "identity" if fallback is None else "the fallback transformation"
    if max_factor_dim is not None:
        hp.check_positive_int(name, "max_factor_dim", max_factor_dim, static=True)
    logged = [False]
    output_axes = None if kernel_output_axes is None else dict(kernel_output_axes)

    def layers_of(tree):
        """The layout the method sees, and the paths of the layers over the size cap."""
        layout = discover_layers(tree, output_axes)
        if max_factor_dim is None:
            return layout, ()
        over = tuple(
            layer.path for layer in layout.layers if max(layer.d_a, layer.d_g) > max_factor_dim
        )
        return layout.without(over), over

    def init_fn(params):
        leaves = jax.tree_util.tree_leaves(params)
        layout, _ = layers_of(params)
        dtype = _accumulation_dtype(leaves, layout)
        return state_cls(
            count=jnp.zeros([], jnp.int32),
            curvature=method.init(layout, dtype),
            fallback_state=fallback_init(fb, layout, leaves),
            skipped=guards.no_skips(),
        )

    def update_fn(updates, state, params=None, *, layer_stats=None, **extra):
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        layout, over = layers_of(updates)
        if over or method.fallback_kinds:
            # (statistics of the layers over the cap, or of a kind the method cannot use, are
            # not the method's)
            def kept(stats):
                if not isinstance(stats, Mapping):
                    return stats
                return {
                    k: v
                    for k, v in stats.items()
                    if k not in over and getattr(v, "layer_kind", None) not in method.fallback_kinds
                }

            layer_stats = kept(layer_stats)
            extra = {k: kept(v) if k in method.extra_statistics else v for k, v in extra.items()}
        active = check_layer_stats(layout, layer_stats, name, kind_sensitive=method.kind_sensitive)
        diagonals = scale_shift_diagonals(layout, leaves, layer_stats, name)
        if not logged[0]:
            logged[0] = True
            if over:
                logger.info(
                    "%s: layer(s) %s have a factor larger than max_factor_dim=%d; they take the "
                    "fallback path",
                    name,
                    list(over),
                    max_factor_dim,
                )
            described = [layout.layers[i].describe() for i in active]
            rest = sorted(
                [layout.leaf_paths[i] for i in layout.other_leaves]
                + [
                    layout.leaf_paths[j]
                    for li, layer in enumerate(layout.layers)
                    if li not in active
                    for j in layer.leaves
                ]
            )
            exact = (
                f"; of these, {len(diagonals)} normalisation scale(s) and bias(es) come with "
                f"exact per-example statistics (fisher_diagonal): {sorted(diagonals)}"
                if diagonals
                else ""
            )
            logger.info(
                "%s: preconditioning %d layer(s): %s; %d parameter array(s) take the fallback "
                "path (%s): %s%s",
                name,
                len(described),
                described,
                len(rest),
                fb_name,
                rest,
                exact,
            )
        dtype = _accumulation_dtype(leaves, layout)
        count = state.count
        stats = {i: layer_stats[layout.layers[i].path] for i in active}

        curvature, skipped = state.curvature, state.skipped
        if active:  # with no captured layer at all, there is nothing to refresh
            curvature, skipped = _every(
                stats_period,
                count,
                _guarded(
                    lambda c: method.update_statistics(c, layout, stats, **extra),
                    "statistics",
                    method.after_discarded_statistics,
                    inputs=(stats, _extra_statistics(method, extra, layout, active)),
                ),
                (curvature, skipped),
            )
            if method.refresh is not None:
                curvature, skipped = _every(
                    inverse_period,
                    count,
                    _guarded(lambda c: method.refresh(c, layout, **extra), "refreshes"),
                    (curvature, skipped),
                )

        new_leaves = list(leaves)
        if active:
            grads = {i: gradient_matrix(layout.layers[i], leaves, dtype) for i in active}
            directions, after = method.precondition(curvature, layout, grads, **extra)
            if after is not curvature:  # (K-BFGS updates H_a from the direction)
                curvature, skipped = guards.guarded(after, curvature, skipped, "statistics")
            for i in active:
                for leaf, value in split_matrix(layout.layers[i], directions[i], leaves).items():
                    new_leaves[leaf] = value
        param_leaves = None if params is None else jax.tree_util.tree_leaves(params)
        fb_extra = dict(extra)
        if diagonals:
            fb_extra["fisher_diagonal"] = diagonals
        fb_out, fb_state = fallback_update(
            fb, layout, active, leaves, state.fallback_state, param_leaves, **fb_extra
        )
        for leaf, value in fb_out.items():
            new_leaves[leaf] = value
        new_state = state_cls(
            count=optax.safe_increment(count),
            curvature=curvature,
            fallback_state=fb_state,
            skipped=skipped,
        )
        return jax.tree_util.tree_unflatten(treedef, new_leaves), new_state

    return optax.GradientTransformationExtraArgs(
        init_fn, distributed.mesh_agnostic(guards.skip_nonfinite_steps(update_fn))
    )
