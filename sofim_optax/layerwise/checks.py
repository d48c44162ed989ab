"""Trace-time checks of ``layer_stats`` against the layers of the parameters.

Every error names the method and the layer, and says how to fix it.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from sofim_optax.layerwise.layers import Layer, ParamLayout

__all__ = ["check_layer_stats", "missing_stats_message"]


def missing_stats_message(method: str, layout: ParamLayout) -> str:
    return (
        f"{method}.update needs per-layer curvature statistics as the keyword argument "
        "`layer_stats` (a dict mapping each layer path to a sofim_optax.curvature.LayerStats). "
        "Produce them together with the loss and gradients in one pass with "
        "`loss, grads, layer_stats = sofim_optax.curvature.linen.value_grad_and_stats(loss_fn, "
        "params, *args)` (Flax linen) or `sofim_optax.curvature.nnx.value_grad_and_stats(loss_fn, "
        "model, *args)` (Flax NNX), then call `tx.update(grads, opt_state, params, "
        f"layer_stats=layer_stats)`. Layers found in params: {list(layout.layer_paths)}."
    )


def check_layer_stats(
    layout: ParamLayout, layer_stats: Mapping[str, Any] | None, method: str
) -> tuple[int, ...]:
    """Validates ``layer_stats`` against the layers of ``layout`` (at trace time).

    Returns the sorted indices (into ``layout.layers``) of the layers present in
    ``layer_stats``; the other candidate layers take the fallback path.

    Raises:
      TypeError: ``layer_stats`` is missing or not a mapping.
      ValueError: a key names no layer of the parameters (close matches are listed), or a
        layer's statistics do not fit its kernel (the message names the layer).
    """
    if layer_stats is None:
        raise TypeError(missing_stats_message(method, layout))
    if not isinstance(layer_stats, Mapping):
        raise TypeError(
            f"{method}: `layer_stats` must be a dict {{layer path: LayerStats}}, got "
            f"{type(layer_stats).__name__}. " + missing_stats_message(method, layout)
        )
    paths = layout.layer_paths
    active = []
    for key, stats in layer_stats.items():
        if key not in paths:
            close = difflib.get_close_matches(str(key), paths, n=3, cutoff=0.5)
            hint = f" Did you mean {close}?" if close else ""
            raise ValueError(
                f"{method}: layer_stats has key {key!r} but params hold no layer (a node with a "
                f"`kernel` of ndim >= 2) at that path.{hint} Available layer paths: {list(paths)}."
            )
        layer = layout.layers[paths.index(key)]
        _check_one(layer, stats, method)
        active.append(paths.index(key))
    return tuple(sorted(active))


def _check_one(layer: Layer, stats: Any, method: str) -> None:
    where = f"{method}: layer {layer.path!r} (kernel {layer.kernel_shape})"
    try:
        inputs, grads = stats.inputs, stats.output_grads
    except AttributeError:
        raise TypeError(
            f"{where}: statistics must be a LayerStats(inputs, output_grads, outputs), got "
            f"{type(stats).__name__}"
        ) from None
    in_shape = tuple(getattr(inputs, "shape", ()))
    g_shape = tuple(getattr(grads, "shape", ()))
    if len(in_shape) not in (2, 3) or len(g_shape) != len(in_shape):
        raise ValueError(
            f"{where}: expected inputs (N, d_in) and output_grads (N, d_out) for a dense layer, or "
            f"inputs (N, T, kh*kw*c_in) and output_grads (N, T, c_out) for a convolution; got "
            f"inputs {in_shape} and output_grads {g_shape}."
        )
    if in_shape[-1] != layer.d_in:
        raise ValueError(
            f"{where}: inputs have last dimension {in_shape[-1]} but the kernel expects "
            f"{layer.d_in} (= prod(kernel.shape[:-1]); patches flattened in the kernel's own "
            f"(kh, kw, c_in) order, without the bias coordinate). Got inputs {in_shape}."
        )
    if g_shape[-1] != layer.d_out:
        raise ValueError(
            f"{where}: output_grads have last dimension {g_shape[-1]} but the kernel has "
            f"d_out = {layer.d_out}. Got output_grads {g_shape}."
        )
    if in_shape[:-1] != g_shape[:-1]:
        raise ValueError(
            f"{where}: inputs {in_shape} and output_grads {g_shape} disagree on the number of "
            "examples N (and positions T): they must come from the same examples."
        )
