"""Trace-time checks of per-layer statistics against the layers of the parameters.

:func:`check_layer_stats` validates ``layer_stats`` (and any other argument of the same form,
such as K-BFGS's ``previous_batch_stats``): the keys against the layer paths, and each
layer's shapes against its kernel and its kind (dense or convolution). Every error names the
method, the argument and the layer, and says how to fix it.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from typing import Any

from sofim_optax.layerwise.layers import Layer, ParamLayout

__all__ = ["check_layer_stats", "missing_stats_message"]


def missing_stats_message(method: str, layout: ParamLayout) -> str:
    """The message of a missing ``layer_stats``: what to pass and how to compute it."""
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
    layout: ParamLayout,
    layer_stats: Mapping[str, Any] | None,
    method: str,
    argument: str = "layer_stats",
    *,
    kind_sensitive: bool = False,
) -> tuple[int, ...]:
    """Validates per-layer statistics against the layers of ``layout`` (at trace time).

    Every key must name a layer of the parameters, and every layer's statistics must fit its
    kernel and its kind (:attr:`Layer.kind`); the statistics of normalisation layers (kind
    ``"scale_shift"``) are no layer's and are skipped here (the fallback uses them):

    * dense (2-D kernel ``(d_in, d_out)``): ``inputs (N, d_in)`` and ``output_grads
      (N, d_out)``, or ``(N, T, d_in)`` and ``(N, T, d_out)`` for a dense layer applied to
      sequences of ``T`` positions (what the capture returns for a ``Dense`` on
      ``(N, L_1, ..., d_in)``);
    * convolution (kernel of ``ndim >= 3``): ``inputs (N, T, kh·kw·c_in)`` and
      ``output_grads (N, T, c_out)`` only. Statistics flattened to ``(N·T, ·)`` are refused:
      the factors take ``N`` from the leading axis, so flattening would rescale ``G`` by
      ``1/T`` and give a wrong update without any other sign.

    Args:
      layout: the layers of the parameters.
      layer_stats: ``{layer path: LayerStats}``.
      method: the transformation's name, for the messages.
      argument: the name of the checked ``update`` argument, for the messages (default
        ``"layer_stats"``; K-BFGS also checks its ``"previous_batch_stats"``).
      kind_sensitive: the method treats dense layers and convolutions differently even when
        their ``d_in`` and ``d_out`` agree (Mini-Block Fisher's partition): statistics that the
        capture made for a dense map are then refused on a layer read as a convolution, with
        the ``kernel_output_axes`` entry that fixes it. Default ``False``.

    Returns:
      The sorted indices (into ``layout.layers``) of the layers present in the statistics; the
      other candidate layers take the fallback path.

    Raises:
      TypeError: the statistics are missing or not a mapping.
      ValueError: a key names no layer of the parameters (close matches are listed), or a
        layer's statistics do not fit its kernel or its kind (the message names the layer,
        the shapes received and expected, and the fix).
    """
    if layer_stats is None:
        if argument != "layer_stats":
            raise TypeError(
                f"{method}.update needs `{argument}` (a dict mapping each layer path to a "
                f"sofim_optax.curvature.LayerStats). Layers found in params: "
                f"{list(layout.layer_paths)}."
            )
        raise TypeError(missing_stats_message(method, layout))
    if not isinstance(layer_stats, Mapping):
        raise TypeError(
            f"{method}: `{argument}` must be a dict {{layer path: LayerStats}}, got "
            f"{type(layer_stats).__name__}. " + missing_stats_message(method, layout)
        )
    paths = layout.layer_paths
    active = []
    for key, stats in layer_stats.items():
        if getattr(stats, "layer_kind", None) == "scale_shift":
            continue  # (a normalisation's scale and shift: the fallback's, see fallback.py)
        if key not in paths:
            close = difflib.get_close_matches(str(key), paths, n=3, cutoff=0.5)
            hint = f" Did you mean {close}?" if close else ""
            if any(f"{key}/{name}" in layout.leaf_paths for name in ("scale", "bias")):
                hint += (
                    " Statistics of a normalisation layer's scale and bias must be the "
                    "capture's own (LayerStats.layer_kind == 'scale_shift'); statistics rebuilt "
                    "from arrays lose that kind, so leave that entry out or pass it unchanged."
                )
            raise ValueError(
                f"{method}: {argument} has key {key!r} but params hold no layer (a node with a "
                f"`kernel` of ndim >= 2) at that path.{hint} Available layer paths: {list(paths)}."
            )
        layer = layout.layers[paths.index(key)]
        _check_one(layer, stats, method, argument, kind_sensitive)
        active.append(paths.index(key))
    return tuple(sorted(active))


def _expected(layer: Layer) -> str:
    d_in, d_out = layer.d_in, layer.d_out
    if layer.kind == "dense":
        return (
            f"inputs (N, {d_in}) and output_grads (N, {d_out}) (N examples), or inputs "
            f"(N, T, {d_in}) and output_grads (N, T, {d_out}) for a dense layer applied to "
            "sequences of T positions"
        )
    return (
        f"inputs (N, T, {d_in}) (the patches, flattened in the kernel's (k_1, ..., c_in) "
        f"order) and output_grads (N, T, {d_out}), with N the examples and T the output "
        "positions"
    )


def _other_split(layer: Layer, d_in: Any, d_out: Any) -> int | None:
    """The number of output axes that would make the kernel a ``d_in → d_out`` dense map."""
    shape = layer.kernel_shape
    for k in range(1, len(shape)):
        if math.prod(shape[:-k]) == d_in and math.prod(shape[-k:]) == d_out:
            return k
    return None


def _hint(method: str, layer: Layer, axes: int) -> str:
    return (
        f" The kernel reads as a dense map with {axes} output axes (a DenseGeneral / "
        "LinearGeneral / Einsum whose reading the parameter tree cannot tell on its own): "
        f"construct {method} with kernel_output_axes={{{layer.path!r}: {axes}}}."
    )


def _check_one(layer: Layer, stats: Any, method: str, argument: str, kind_sensitive: bool) -> None:
    kind = "dense layer" if layer.kind == "dense" else "convolution"
    where = f"{method}: {argument} of layer {layer.path!r} (kernel {layer.kernel_shape}, a {kind})"
    try:
        inputs, grads = stats.inputs, stats.output_grads
    except AttributeError:
        raise TypeError(
            f"{where}: statistics must be a LayerStats(inputs, output_grads, outputs), got "
            f"{type(stats).__name__}"
        ) from None
    in_shape = tuple(getattr(inputs, "shape", ()))
    g_shape = tuple(getattr(grads, "shape", ()))
    got = f"got inputs {in_shape} and output_grads {g_shape}"
    ranks = (2, 3) if layer.kind == "dense" else (3,)
    if layer.kind == "conv" and len(in_shape) == len(g_shape) == 2:
        raise ValueError(
            f"{where}: expected {_expected(layer)}; {got}. A convolution's statistics keep "
            "the example axis apart from the positions: flattened to (N*T, ·) they would "
            "rescale G by 1/T and give a wrong update. Pass the statistics as "
            "sofim_optax.curvature.linen.value_grad_and_stats / "
            "sofim_optax.curvature.nnx.value_grad_and_stats return them, or reshape each "
            "array of N examples with `a.reshape(N, -1, a.shape[-1])`."
        )
    if (
        len(in_shape) >= 2
        and len(g_shape) >= 2
        and (in_shape[-1], g_shape[-1])
        != (
            layer.d_in,
            layer.d_out,
        )
    ):
        axes = _other_split(layer, in_shape[-1], g_shape[-1])
        if axes is not None:
            raise ValueError(
                f"{where}: expected {_expected(layer)}; {got}." + _hint(method, layer, axes)
            )
    if kind_sensitive and layer.kind == "conv" and getattr(stats, "layer_kind", None) == "dense":
        raise ValueError(
            f"{where}: these statistics were captured from a dense map (a DenseGeneral / "
            f"LinearGeneral over several input axes), which {method} would cut into blocks as "
            "a convolution." + _hint(method, layer, layer.output_axes)
        )
    if len(in_shape) not in ranks or len(g_shape) != len(in_shape):
        raise ValueError(f"{where}: expected {_expected(layer)}; {got}.")
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
