"""Fallback routing: the parameters that no captured layer covers.

Norm scales, embeddings and layers absent from ``layer_stats`` are handed to a *fallback*
optax transformation, whose state is kept inside the method's state
(:class:`FallbackState`). The fallback is applied once to the flat dict
``{leaf path: gradient}`` of the leaves outside every layer, and once per uncaptured layer to
the dict of its kernel and bias; for element-wise transformations that is the same as one call
on all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import optax

from sofim_optax.layerwise.layers import ParamLayout

__all__ = ["FallbackState", "fallback_init", "fallback_update"]


class FallbackState(NamedTuple):
    """State of the fallback transformation for the parameters no captured layer covers.

    Attributes:
      other: the fallback's state for the leaves that belong to no candidate layer (norm
        scales, embeddings, ...), initialised on the flat dict ``{leaf path: leaf}`` of them.
      layers: one fallback state per candidate layer (in ``ParamLayout.layers`` order), on the
        dict ``{leaf path: leaf}`` of its kernel and bias; used on the steps where that layer
        has no entry in ``layer_stats``. Which layers are captured is only known at update time,
        so a stateful fallback allocates this for every candidate layer.
    """

    other: Any
    layers: tuple[Any, ...]


def _sub(layout: ParamLayout, leaves: Sequence[Any] | None, idx: Sequence[int]) -> dict | None:
    if leaves is None:
        return None
    return {layout.leaf_paths[i]: leaves[i] for i in idx}


def fallback_init(
    fallback: optax.GradientTransformation, layout: ParamLayout, leaves: Sequence[jax.Array]
) -> FallbackState:
    return FallbackState(
        other=fallback.init(_sub(layout, leaves, layout.other_leaves)),
        layers=tuple(fallback.init(_sub(layout, leaves, layer.leaves)) for layer in layout.layers),
    )


def fallback_update(
    fallback: optax.GradientTransformationExtraArgs,
    layout: ParamLayout,
    active: Sequence[int],
    updates: Sequence[jax.Array],
    state: FallbackState,
    params: Sequence[jax.Array] | None,
    **extra: Any,
) -> tuple[dict[int, jax.Array], FallbackState]:
    """Applies ``fallback`` to the uncovered leaves: the non-layer leaves (one call) and each
    candidate layer absent from ``active`` (one call each). States of captured layers are kept.

    Returns ``({leaf index: new update}, new state)``.
    """
    out: dict[int, jax.Array] = {}

    def run(idx, st):
        if not idx:
            return st
        upd, st = fallback.update(
            _sub(layout, updates, idx), st, _sub(layout, params, idx), **extra
        )
        for i in idx:
            out[i] = upd[layout.leaf_paths[i]]
        return st

    other = run(layout.other_leaves, state.other)
    layer_states = tuple(
        st if li in active else run(layer.leaves, st)
        for li, (layer, st) in enumerate(zip(layout.layers, state.layers))
    )
    return out, FallbackState(other, layer_states)
