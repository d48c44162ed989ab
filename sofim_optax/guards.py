"""Guards that keep a non-finite value out of the optimizer state.

A long training run meets a bad batch sooner or later: a gradient that overflows, a
log-likelihood of an impossible target, a statistic computed from a corrupted example. Every
method of this library guards each part of its state where it is computed, so that one bad
batch costs at most one step and the state stays what it was before that batch:

* **the step**: a non-finite gradient (any leaf) gives a zero update and leaves the whole
  state unchanged except ``skipped.steps``; a finite gradient whose preconditioned direction is
  non-finite (an overflow in the solve) also gives a zero update and counts in
  ``skipped.steps`` (the state updates of that step that were finite are kept);
* **the statistics** (factor EMAs, mini-blocks, Hessian-diagonal moments, K-BFGS's matrices):
  an update in which any new value is non-finite is not applied; the last good statistics are
  kept and ``skipped.statistics`` counts it;
* **the refresh** (eigendecompositions, inverses, sketches, solver iterates): a refresh that
  produces a non-finite value is discarded, the last good decomposition is kept and
  ``skipped.refreshes`` counts it.

This works with or without ``optax.apply_if_finite``, which looks at the incoming gradient
only (and, when it rejects a step, keeps our state as it was, counters included). The counters
never reset; a counter that keeps growing means a persistent fault (for instance a damping far
too small for the curvature's scale) rather than a bad batch.

The statistics and refresh guards add one reduction over the values they produce (and a
select), on the steps where those run; the step guard adds one reduction over the gradient and
one over the direction, and runs the update under ``lax.cond``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "SkipCounts",
    "no_skips",
    "all_finite",
    "keep_if_finite",
    "count_if",
    "skip_nonfinite_steps",
]


class SkipCounts(NamedTuple):
    """How often each guarded part of a method's update was skipped (``()`` int32 each).

    Attributes:
      steps: steps whose gradient or preconditioned direction was non-finite; their update was
        zero and the state was left unchanged (for a non-finite gradient) or kept its guarded
        parts (for a non-finite direction).
      statistics: statistics updates not applied because a new value was non-finite (the last
        good statistics were kept).
      refreshes: refreshes (decompositions, inverses, sketches) discarded because they
        produced a non-finite value (the last good ones were kept).
    """

    steps: jax.Array
    statistics: jax.Array
    refreshes: jax.Array


def no_skips() -> SkipCounts:
    """All counters at zero."""
    zero = jnp.zeros([], jnp.int32)
    return SkipCounts(steps=zero, statistics=zero, refreshes=zero)


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def all_finite(tree: Any) -> jax.Array:
    """``()`` bool: every floating-point entry of every leaf of ``tree`` is finite."""
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if _is_float(x)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def keep_if_finite(new: Any, old: Any) -> tuple[Any, jax.Array]:
    """``(new if every changed floating value of new is finite else old, that test)``.

    ``new`` and ``old`` have the same structure; a leaf of ``new`` that is the very object of
    ``old`` (a field the update did not touch) is neither tested nor selected, so guarding a
    statistics update does not read the decompositions it leaves alone.
    """
    new_leaves, treedef = jax.tree.flatten(new)
    old_leaves = treedef.flatten_up_to(old)
    changed = [i for i, (n, o) in enumerate(zip(new_leaves, old_leaves)) if n is not o]
    ok = all_finite([new_leaves[i] for i in changed])
    out = list(new_leaves)
    for i in changed:
        out[i] = jnp.where(ok, new_leaves[i], old_leaves[i])
    return jax.tree.unflatten(treedef, out), ok


def count_if(skipped: SkipCounts, field: str, happened: jax.Array) -> SkipCounts:
    """``skipped`` with ``field`` increased by one where ``happened`` (saturating)."""
    value = getattr(skipped, field)
    bumped = jnp.where(happened & (value < jnp.iinfo(jnp.int32).max), value + 1, value)
    return skipped._replace(**{field: bumped})


def skip_nonfinite_steps(
    update_fn: Callable[..., tuple[Any, Any]],
) -> Callable[..., tuple[Any, Any]]:
    """Wraps an ``update(updates, state, params=None, **extra)`` whose state has a
    ``skipped: SkipCounts`` field with the step guard.

    A non-finite gradient: zero update, the state unchanged but for ``skipped.steps + 1``
    (``update_fn`` runs under ``lax.cond`` and is not executed). A finite gradient whose
    direction is non-finite: zero update, ``update_fn``'s new state, ``skipped.steps + 1``.
    """

    def update(updates, state, params=None, **extra):
        def zeros_like_updates():
            return jax.tree.map(jnp.zeros_like, updates)

        def step(_):
            directions, new_state = update_fn(updates, state, params, **extra)
            ok = all_finite(directions)
            directions = jax.tree.map(
                lambda d: jnp.where(ok, d, jnp.zeros_like(d)) if _is_float(d) else d, directions
            )
            return directions, new_state._replace(skipped=count_if(new_state.skipped, "steps", ~ok))

        def skip(_):
            return zeros_like_updates(), state._replace(
                skipped=count_if(state.skipped, "steps", jnp.asarray(True))
            )

        return lax.cond(all_finite(updates), step, skip, None)

    return update
