"""Fallback routing: the parameters that no captured layer covers.

Norm scales, embeddings and layers absent from ``layer_stats`` are handed to a *fallback*
optax transformation, whose state is kept inside the method's state
(:class:`FallbackState`). The fallback is applied once to the flat dict
``{leaf path: gradient}`` of the leaves outside every layer, and once per uncaptured layer to
the dict of its kernel and bias; for element-wise transformations that is the same as one call
on all of them.

Normalisation layers get statistics of their own from the capture (kind ``"scale_shift"``:
the normalised input ``x̂`` and the output gradient ``g``, both ``(N, T, F)``), from which
:func:`scale_shift_diagonals` forms the exact per-example diagonal of their scale and bias,
``mean_n (Σ_t x̂_{n,t} ⊙ g_{n,t})²`` and ``mean_n (Σ_t g_{n,t})²``. The skeleton hands them to the
fallback as its ``fisher_diagonal`` keyword argument; the default fallback
(:func:`sofim_optax.diagonal_fisher.scale_by_diagonal_fisher`) uses them in place of the
squared minibatch gradient, and other fallbacks may ignore them.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sofim_optax.layerwise.layers import ParamLayout

__all__ = ["FallbackState", "fallback_init", "fallback_update", "scale_shift_diagonals"]


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


def scale_shift_diagonals(
    layout: ParamLayout,
    leaves: Sequence[jax.Array],
    layer_stats: Mapping[str, Any],
    method: str,
) -> dict[str, jax.Array]:
    """``{leaf path: exact per-example diagonal}`` of the scale and bias of every normalisation
    layer in ``layer_stats`` (the entries of kind ``"scale_shift"``; the others are ignored).

    For a layer at path ``P`` with normalised input ``x̂`` and output gradients ``g`` (both
    ``(N, T, F)``, ``g`` the per-example loss's): ``P/scale`` gets ``mean_n (Σ_t x̂ ⊙ g)²`` and
    ``P/bias`` gets ``mean_n (Σ_t g)²``, each reshaped to its leaf; a layer without one of them
    just has no entry for it.

    Raises:
      ValueError: the parameters hold neither ``P/scale`` nor ``P/bias``, or one whose size is
        not ``F`` (the message names the layer).
    """
    paths = set(layout.leaf_paths)
    shapes = {p: jnp.shape(leaf) for p, leaf in zip(layout.leaf_paths, leaves)}
    out: dict[str, jax.Array] = {}
    for key, stats in layer_stats.items():
        if getattr(stats, "layer_kind", None) != "scale_shift":
            continue
        normalised, grads = stats.inputs, stats.output_grads
        per_example = {
            "scale": jnp.sum(normalised * grads, axis=1),
            "bias": jnp.sum(grads, axis=1),
        }
        found = [name for name in per_example if "/".join(filter(None, (key, name))) in paths]
        if not found:
            close = difflib.get_close_matches(f"{key}/scale", sorted(paths), n=3, cutoff=0.5)
            raise ValueError(
                f"{method}: layer_stats has normalisation statistics for {key!r} but params hold "
                f"no `scale` or `bias` at that path.{' Did you mean ' + str(close) + '?' if close else ''}"
            )
        for name in found:
            leaf = "/".join(filter(None, (key, name)))
            rows = per_example[name]
            if math.prod(shapes[leaf]) != rows.shape[-1]:
                raise ValueError(
                    f"{method}: the normalisation statistics of {key!r} have {rows.shape[-1]} "
                    f"features but its {name} has shape {shapes[leaf]}."
                )
            out[leaf] = jnp.mean(jnp.square(rows), axis=0).reshape(shapes[leaf])
    return out
