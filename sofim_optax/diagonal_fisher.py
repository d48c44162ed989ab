"""A diagonal empirical-Fisher preconditioner: the fallback of Mini-Block Fisher."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sofim_optax import distributed, guards, layerwise, linalg
from sofim_optax import hyperparameters as hp
from sofim_optax.hyperparameters import Scalar

__all__ = ["DiagonalFisherState", "scale_by_diagonal_fisher", "resolve_fallback"]


class DiagonalFisherState(NamedTuple):
    """State of :func:`scale_by_diagonal_fisher`.

    Attributes:
      count: ``()`` int32, number of updates so far.
      nu: the EMA of squared minibatch gradients, shaped like the parameters.
      skipped: :class:`sofim_optax.guards.SkipCounts`, how many steps, statistics updates
        and refreshes were skipped because they were non-finite (the state kept its last good
        values).
    """

    count: jax.Array
    nu: Any
    skipped: guards.SkipCounts


def scale_by_diagonal_fisher(
    *, damping: Scalar = 1e-3, ema: Scalar = 0.9, stats_period: int | jax.Array = 1
) -> optax.GradientTransformationExtraArgs:
    r"""Diagonal (1×1-block) preconditioner from squared minibatch gradients.

    .. math::

        \nu \leftarrow \rho\,\nu + (1-\rho)\,\bar g \odot \bar g,\qquad
        \Delta = v \oslash (\nu + \lambda),\qquad \rho = \min(1 - 1/k,\ \text{ema}),

    where ``ḡ`` is the minibatch gradient (the keyword argument ``gradients=`` of ``update``,
    a tree containing the same leaf paths; by default the incoming ``updates``), ``v`` the
    incoming ``updates`` (in :func:`sofim_optax.mini_block_fisher`, the momentum), ``k`` the number of
    statistics updates so far (one every ``stats_period`` steps, at ``count = 0`` first). The
    reciprocal is recomputed every step (it is element-wise and costs nothing).

    This is the layer-wise methods' default for the parameters that no captured layer covers
    (norm scales and biases, tied embeddings, parameters of uncaptured layers). The exact EF
    diagonal is ``mean_n g_{n,i}²``. Where per-example gradients exist, the layer-wise skeleton
    passes it as ``fisher_diagonal={leaf path: mean_n g_n²}`` (for the scale and bias of every
    normalisation layer the capture saw), and ``ḡ ⊙ ḡ`` above becomes
    ``max(mean_n g_n², ḡ ⊙ ḡ)`` on those leaves. For the empirical Fisher the maximum is the
    exact diagonal itself (Jensen: ``mean_n g_n² ≥ ḡ²``); it only matters for scale entries
    that are (nearly) zero, whose per-example gradient the capture cannot read from the
    layer's output and reports as 0. Elsewhere ``ḡ²`` is the exact diagonal's lower bound,
    smaller by up to the batch size when the gradient noise dominates, so on those parameters
    the damping usually dominates and the step is close to ``v / λ``.

    Args:
      damping: ``λ`` (default ``1e-3``), ``> 0``; a traced value is floored at
        ``linalg.DAMPING_FLOOR``.
      ema: upper bound of the EMA decay of ``ν`` (default ``0.9``).
      stats_period: update ``ν`` every this many steps (default ``1``).
    """
    hp.check_damping("scale_by_diagonal_fisher", damping)
    hp.check_decay("scale_by_diagonal_fisher", "ema", ema)
    hp.check_positive_int("scale_by_diagonal_fisher", "stats_period", stats_period)

    def init_fn(params):
        nu = jax.tree.map(
            lambda p: jnp.zeros(jnp.shape(p), hp.accumulation_dtype(jnp.asarray(p))), params
        )
        return DiagonalFisherState(count=jnp.zeros([], jnp.int32), nu=nu, skipped=guards.no_skips())

    def update_fn(updates, state, params=None, *, gradients=None, fisher_diagonal=None, **extra):
        del params, extra
        raw = updates
        if gradients is not None:
            by_path = dict(
                zip(layerwise.discover_layers(gradients).leaf_paths, jax.tree.leaves(gradients))
            )
            flat = layerwise.discover_layers(updates).leaf_paths
            try:
                raw = jax.tree.unflatten(jax.tree.structure(updates), [by_path[p] for p in flat])
            except KeyError as err:
                raise ValueError(
                    f"scale_by_diagonal_fisher: `gradients` has no leaf at path {err.args[0]!r}"
                ) from None
        count = state.count
        exact = dict(fisher_diagonal or {})
        leaf_paths = layerwise.discover_layers(updates).leaf_paths

        def new_nu(nu):
            def one(n, g, path):
                decay = layerwise.ema_decay(count // stats_period + 1, ema, n.dtype)
                square = jnp.square(jnp.asarray(g).astype(n.dtype))
                if path in exact:  # (floored at ḡ², which it equals or exceeds where exact)
                    square = jnp.maximum(square, jnp.asarray(exact[path]).astype(n.dtype))
                return decay * n + (1 - decay) * square

            flat, tree = jax.tree.flatten(nu)
            return jax.tree.unflatten(
                tree, [one(n, g, p) for n, g, p in zip(flat, jax.tree.leaves(raw), leaf_paths)]
            )

        def guarded_nu(operand):
            nu, skipped = operand
            return guards.guarded(new_nu(nu), nu, skipped, "statistics")

        operand = (state.nu, state.skipped)
        if isinstance(stats_period, int) and stats_period == 1:
            nu, skipped = guarded_nu(operand)
        else:
            nu, skipped = lax.cond(count % stats_period == 0, guarded_nu, lambda o: o, operand)

        def apply(u, n):
            lam = jnp.maximum(jnp.asarray(damping).astype(n.dtype), linalg.DAMPING_FLOOR)
            return (jnp.asarray(u).astype(n.dtype) / (n + lam)).astype(jnp.asarray(u).dtype)

        out = jax.tree.map(apply, updates, nu)
        return out, DiagonalFisherState(count=optax.safe_increment(count), nu=nu, skipped=skipped)

    return optax.GradientTransformationExtraArgs(
        init_fn, distributed.mesh_agnostic(guards.skip_nonfinite_steps(update_fn))
    )


def resolve_fallback(
    where: str,
    fallback: optax.GradientTransformation | str | None,
    *,
    damping: Scalar,
    ema: Scalar,
) -> optax.GradientTransformation | None:
    """The ``fallback`` argument of the layer-wise methods: ``"diagonal"`` becomes
    :func:`scale_by_diagonal_fisher` with the method's own ``damping`` and ``ema``, its
    squared gradients averaged at **every** step whatever the method's ``stats_period``;
    ``None`` (identity) and a transformation pass through.

    Why every step: the diagonal costs one element-wise product, so amortising it saves
    nothing, and a stale diagonal is dangerous. With statistics every 10 steps and the
    default small damping, a parameter whose gradient grows after the last update takes a step
    of about ``g / g_old²``: on a small conv model with a LayerNorm, KPSVD at its defaults went
    from loss 1.4 to 64 in twelve steps that way (1.1 with the diagonal refreshed every step).

    Why ``"diagonal"`` is their default: the uncaptured parameters (norm scales, embeddings,
    layers without statistics) then take a step on the same scale as the preconditioned
    layers', a Fisher-preconditioned one with the same damping (kfac-jax treats parameters it
    does not recognise the same way). The identity is a plain gradient step: it grows with the
    loss's scale while the preconditioned layers' step shrinks, so a loss scaled by 1e3
    diverged through the identity fallback alone.
    """
    if isinstance(fallback, str):
        if fallback != "diagonal":
            raise ValueError(
                f'{where}: fallback must be "diagonal", None or an optax transformation, '
                f"got {fallback!r}"
            )
        return scale_by_diagonal_fisher(damping=damping, ema=ema)
    return fallback
