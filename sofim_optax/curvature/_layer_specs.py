"""The layer kinds the capture understands: how to read one layer call's statistics.

A spec knows, for one captured layer call, the shape its inputs must have and how to turn
the call's inputs into the ``LayerStats.inputs`` of the contract (patches for a
convolution). The adapters build specs from the layer's options and refuse the options the
capture cannot handle, naming the layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from sofim_optax.curvature._patches import (
    PRE_PAD_MODES,
    ConvGeometry,
    PaddingLike,
    extract_patches,
    make_geometry,
)


class CaptureError(ValueError):
    """A model or loss that the capture adapters cannot handle correctly."""


@dataclasses.dataclass(frozen=True)
class DenseSpec:
    """A dense layer ``outputs = inputs @ kernel (+ bias)`` over the last axis."""

    layer_kind = "dense"

    def check_inputs(self, path: str, x: Any) -> None:
        """Refuses inputs without a batch axis.

        Args:
          path: the layer's key, for the message.
          x: the layer input (array or abstract value).
        """
        if len(x.shape) < 2:
            raise CaptureError(
                f"Layer '{path}' (dense) was applied to an input of shape {tuple(x.shape)}; "
                "capture needs a leading batch axis (N, ..., d_in)."
            )

    def input_rows(self, x: jax.Array) -> jax.Array:
        """``(N, d_in)`` for 2-D inputs, ``(N, T, d_in)`` with ``T`` the product of
        the middle axes otherwise.

        Args:
          x: the layer input ``(N, ..., d_in)``.

        Returns:
          The statistics view of the input.
        """
        return x if x.ndim == 2 else x.reshape(x.shape[0], -1, x.shape[-1])

    def output_rows(self, y: jax.Array, x: jax.Array) -> jax.Array:
        """Same view for an output-shaped array.

        Args:
          y: an array shaped like the layer output ``(N, ..., d_out)``.
          x: the layer input (unused for dense layers).

        Returns:
          ``(N, d_out)`` or ``(N, T, d_out)``.
        """
        del x
        return y if y.ndim == 2 else y.reshape(y.shape[0], -1, y.shape[-1])


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """A shared-weight convolution with the given geometry (channels last)."""

    geometry: ConvGeometry
    layer_kind = "conv"

    def check_inputs(self, path: str, x: Any) -> None:
        """Refuses inputs without a batch axis.

        Args:
          path: the layer's key, for the message.
          x: the layer input (array or abstract value).
        """
        if len(x.shape) < self.geometry.num_spatial + 2:
            raise CaptureError(
                f"Layer '{path}' (conv) was applied to an unbatched input of shape "
                f"{tuple(x.shape)}; capture needs a leading batch axis (N, *spatial, c_in)."
            )

    def input_rows(self, x: jax.Array) -> jax.Array:
        """Patches ``(N, T, k_1*...*k_d*c_in)`` in the kernel's order.

        Extra leading batch axes ``(N, B, ..., *spatial, c_in)`` are folded into
        the position axis, as Flax folds them into the batch of the convolution.

        Args:
          x: the layer input.

        Returns:
          The patches.
        """
        rank = self.geometry.num_spatial
        n = x.shape[0]
        flat = x.reshape((-1,) + x.shape[x.ndim - rank - 1 :])
        patches = extract_patches(flat, self.geometry)
        return patches.reshape(n, -1, patches.shape[-1])

    def output_rows(self, y: jax.Array, x: jax.Array) -> jax.Array:
        """``(N, T, c_out)`` view of an output-shaped array.

        Args:
          y: an array shaped like the layer output.
          x: the layer input (gives ``N``).

        Returns:
          The position-flattened view.
        """
        return y.reshape(x.shape[0], -1, y.shape[-1])


@dataclasses.dataclass(frozen=True)
class DenseGeneralSpec:
    """A dense map over several axes: ``flax.linen.DenseGeneral`` / ``flax.nnx.LinearGeneral``.

    The layer contracts the input axes ``contracted`` (sorted, non-negative, never the batch
    axis 0) with the kernel's leading axes and puts ``n_features`` feature axes last, after
    the input's other axes. Its statistics flatten the contracted axes into ``d_in`` (in the
    kernel's axis order) and the feature axes into ``d_out``, so that
    ``inputs @ kernel.reshape(d_in, d_out) + bias.reshape(d_out) == outputs``; the
    non-contracted axes after the batch become positions ``T``. They are ``(N, T, ·)``
    always (``T = 1`` when there are none), except for a plain ``(N, d_in) → (N, d_out)`` map,
    which is ``(N, ·)`` as for ``Dense``: a kernel of ``ndim >= 3`` may be read as a
    convolution by the transformations, which take ``(N, T, ·)`` only.

    Attributes:
      contracted: the contracted input axes, normalised and sorted.
      n_features: the number of feature (output) axes.
    """

    contracted: tuple[int, ...]
    n_features: int
    layer_kind = "dense"

    def _flat(self, x: Any) -> bool:
        return len(x.shape) == 2 and self.contracted == (1,) and self.n_features == 1

    def check_inputs(self, path: str, x: Any) -> None:
        """Refuses inputs without a batch axis and maps that contract the batch axis.

        Args:
          path: the layer's key, for the message.
          x: the layer input (array or abstract value).
        """
        if len(x.shape) < 2 or 0 in self.contracted:
            raise CaptureError(
                f"Layer '{path}' (a dense map over axes {self.contracted}) was applied to an "
                f"input of shape {tuple(x.shape)}; capture needs a leading batch axis that the "
                "layer does not contract: (N, ..., contracted axes ...)."
            )

    def input_rows(self, x: jax.Array) -> jax.Array:
        """``(N, T, d_in)``: the contracted axes moved last and flattened.

        Args:
          x: the layer input.

        Returns:
          The statistics view of the input.
        """
        if self._flat(x):
            return x
        kept = [a for a in range(x.ndim) if a not in self.contracted]
        moved = x.transpose(kept + list(self.contracted))
        d_in = math.prod(x.shape[a] for a in self.contracted)
        return moved.reshape(x.shape[0], -1, d_in)

    def output_rows(self, y: jax.Array, x: jax.Array) -> jax.Array:
        """``(N, T, d_out)``: the feature axes (last) flattened.

        Args:
          y: an array shaped like the layer output ``(N, ..., *features)``.
          x: the layer input.

        Returns:
          The statistics view.
        """
        if self._flat(x):
            return y
        d_out = math.prod(y.shape[y.ndim - self.n_features :])
        return y.reshape(y.shape[0], -1, d_out)


@dataclasses.dataclass(frozen=True)
class EinsumSpec:
    """An einsum that is a dense map: ``flax.linen.Einsum`` / ``flax.nnx.Einsum``.

    Read from the equation ``lhs,rhs->out`` (ellipses expanded): the input's letters are the
    *kept* ones (also in ``out``: the batch first, then positions) and the *contracted* ones
    (also in the kernel); the kernel lists the contracted letters first, then the *feature*
    letters (also in ``out``). The statistics move the kept axes first and flatten the
    contracted axes (in the kernel's order) into ``d_in`` and the feature axes (in the
    kernel's order) into ``d_out``, so that ``inputs @ kernel.reshape(d_in, d_out) ==
    outputs`` row by row, as for :class:`DenseGeneralSpec`.

    Attributes:
      input_order: the input axes, kept first then contracted (a transpose of the input).
      output_order: the output axes, kept (in the input's order) first then the features.
      n_features: the number of feature axes.
      plain: a ``(N, d_in) → (N, d_out)`` map with a 2-D kernel (statistics ``(N, ·)``).
    """

    input_order: tuple[int, ...]
    output_order: tuple[int, ...]
    n_features: int
    plain: bool
    layer_kind = "dense"

    def check_inputs(self, path: str, x: Any) -> None:
        """Nothing left to check: :func:`einsum_spec` read the equation against the input."""

    def input_rows(self, x: jax.Array) -> jax.Array:
        """``(N, T, d_in)`` (``(N, d_in)`` for a plain map)."""
        moved = x.transpose(self.input_order)
        d_in = math.prod(moved.shape[self.n_kept :])
        return (
            moved.reshape(x.shape[0], d_in) if self.plain else moved.reshape(x.shape[0], -1, d_in)
        )

    def output_rows(self, y: jax.Array, x: jax.Array) -> jax.Array:
        """``(N, T, d_out)`` (``(N, d_out)`` for a plain map)."""
        moved = y.transpose(self.output_order)
        d_out = math.prod(moved.shape[y.ndim - self.n_features :])
        return (
            moved.reshape(y.shape[0], d_out) if self.plain else moved.reshape(y.shape[0], -1, d_out)
        )

    @property
    def n_kept(self) -> int:
        """The number of kept axes (the batch and the positions)."""
        return len(self.output_order) - self.n_features


@dataclasses.dataclass(frozen=True)
class EmbedSpec:
    """A table lookup ``outputs = embedding[ids]``: ``flax.linen.Embed`` / ``flax.nnx.Embed``.

    A lookup is the dense map ``outputs = onehot(ids) @ embedding`` (no bias), so its
    statistics follow the dense contract with one-hot inputs of width ``vocab_size``: ids
    ``(N,)`` give ``(N, V)`` and ``(N, D)``, ids ``(N, L_1, ...)`` give ``(N, T, V)`` and
    ``(N, T, D)``. The one-hot rows are formed only when ``LayerStats.inputs`` is read; the
    Kronecker-factored methods read :meth:`input_square_mean` instead (the token
    frequencies, the exact diagonal of ``mean āāᵀ``), which costs one scatter-add. Ids are
    expected in ``[0, V)``; one outside gives a zero row (Flax's lookup returns its fill value
    there, which carries no gradient to any row).

    Attributes:
      vocab_size: ``V``, the number of rows of the table.
    """

    vocab_size: int
    layer_kind = "dense"

    def check_inputs(self, path: str, x: Any) -> None:
        """Refuses ids without a batch axis and ids that are not integers.

        Args:
          path: the layer's key, for the message.
          x: the ids (array or abstract value).
        """
        if len(x.shape) < 1:
            raise CaptureError(
                f"Layer '{path}' (embedding lookup) was applied to ids of shape "
                f"{tuple(x.shape)}; capture needs a leading batch axis (N, ...)."
            )
        if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
            raise CaptureError(
                f"Layer '{path}' (embedding lookup) got ids of dtype {jnp.result_type(x)}; "
                "capture needs integer token ids."
            )

    def _ids(self, x: jax.Array) -> jax.Array:
        return x if x.ndim == 1 else x.reshape(x.shape[0], -1)

    def input_rows(self, x: jax.Array) -> jax.Array:
        """One-hot rows ``(N, V)`` or ``(N, T, V)`` of the ids.

        Args:
          x: the ids ``(N, ...)``.

        Returns:
          The one-hot view (``float32``; the capture casts it).
        """
        if self.vocab_size == 1:  # (Flax broadcasts its one row, whatever the id)
            return jnp.ones(self._ids(x).shape + (1,), jnp.float32)
        return jax.nn.one_hot(self._ids(x), self.vocab_size, dtype=jnp.float32)

    def input_square_mean(self, x: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
        """``(V,)``: the mean over examples and positions of the squared one-hot rows, i.e.
        each token's frequency (the diagonal of ``mean āāᵀ``, which is diagonal).

        Args:
          x: the ids ``(N, ...)``.
          dtype: the result's dtype (default ``float32``).

        Returns:
          The frequencies.
        """
        ids = self._ids(x).reshape(-1)
        if self.vocab_size == 1:
            return jnp.ones((1,), dtype)
        ids = jnp.where((ids >= 0) & (ids < self.vocab_size), ids, self.vocab_size)
        counts = jnp.zeros((self.vocab_size,), dtype).at[ids].add(1.0, mode="drop")
        return counts / ids.shape[0]

    def output_rows(self, y: jax.Array, x: jax.Array) -> jax.Array:
        """``(N, D)`` for ids ``(N,)``, ``(N, T, D)`` otherwise.

        Args:
          y: an array shaped like the layer output ``(N, ..., D)``.
          x: the ids.

        Returns:
          The statistics view.
        """
        return y if x.ndim == 1 else y.reshape(y.shape[0], -1, y.shape[-1])


@dataclasses.dataclass(frozen=True)
class ScaleShiftSpec:
    """The learned scale and shift of a normalisation layer (``LayerNorm``, ``RMSNorm``,
    ``GroupNorm``, ``BatchNorm``, ``InstanceNorm``; linen and nnx alike).

    Every one of them ends with ``outputs = x̂ ⊙ scale + bias`` over its feature axes, whatever
    it normalised by before (``x̂`` is the normalised input). The per-example gradients of
    ``scale`` and ``bias`` are then ``Σ_t x̂_t ⊙ g_t`` and ``Σ_t g_t`` over the positions ``t``,
    with ``g`` the per-example output gradient. The capture records ``x̂`` as the statistics'
    ``inputs``, recovered from the output as ``(outputs − bias) / scale`` (entries whose scale
    is below ``1e-6`` in magnitude, where that division loses every digit, get ``x̂ = 0``; the
    consumers floor the result, see :mod:`sofim_optax.diagonal_fisher`).

    Rows: ``inputs``, ``output_grads`` and ``outputs`` are ``(N, T, F)``, the feature axes
    (the trailing ``n_feature_axes`` axes of the layer's input, those the parameters span)
    flattened into ``F`` and the axes between the batch and them into ``T`` (``T = 1`` when
    there are none).

    Attributes:
      n_feature_axes: how many trailing axes the scale and bias span.
    """

    n_feature_axes: int
    layer_kind = "scale_shift"

    def check_inputs(self, path: str, x: Any) -> None:
        """Nothing to refuse: :func:`scale_shift_spec` only builds specs that fit ``x``.

        Args:
          path: the layer's key (unused).
          x: the layer input (unused).
        """
        del path, x

    def input_rows(self, x: jax.Array) -> jax.Array:
        """``(N, T, F)``.

        Args:
          x: the normalised input ``x̂``, shaped like the layer's input.

        Returns:
          The statistics view.
        """
        features = math.prod(x.shape[x.ndim - self.n_feature_axes :])
        return x.reshape(x.shape[0], -1, features)

    def output_rows(self, y: jax.Array, x: jax.Array) -> jax.Array:
        """Same view for an output-shaped array.

        Args:
          y: an array shaped like the layer output.
          x: the layer input (unused).

        Returns:
          ``(N, T, F)``.
        """
        del x
        return self.input_rows(y)


def scale_shift_spec(
    input_shape: tuple[int, ...],
    feature_axes: int | tuple[int, ...],
    parameter_shapes: tuple[tuple, ...],
) -> ScaleShiftSpec | None:
    """The spec of a normalisation layer's scale and shift, or ``None`` when the capture
    leaves them to the minibatch statistics (the caller logs why).

    ``None`` for: no scale and no bias; an input without a batch axis in front of the
    feature axes; feature axes that are not the input's trailing axes, or parameters not
    shaped like them (a broadcast the rows above would misread).

    Args:
      input_shape: the shape of the layer's input.
      feature_axes: the axes the scale and bias span (the layer's ``feature_axes``, or
        ``axis`` for ``BatchNorm``; ``-1`` for ``GroupNorm``).
      parameter_shapes: the shapes of the scale and bias the layer has (one or two).

    Returns:
      The spec, or ``None``.
    """
    if not parameter_shapes:
        return None
    input_ndim = len(input_shape)
    axes = (feature_axes,) if isinstance(feature_axes, int) else tuple(feature_axes)
    if not axes or input_ndim < len(axes) + 1:
        return None
    normalised = sorted(a % input_ndim for a in axes)
    if normalised != list(range(input_ndim - len(axes), input_ndim)):
        return None
    if any(tuple(shape) != tuple(input_shape[-len(axes) :]) for shape in parameter_shapes):
        return None
    return ScaleShiftSpec(len(axes))


def _expand_ellipsis(term: str, ndim: int, fresh: str) -> str:
    if "..." not in term:
        return term
    return term.replace("...", fresh[: ndim - (len(term) - 3)])


def einsum_spec(
    path: str,
    layer_type: str,
    *,
    equation: str,
    input_ndim: int,
    kernel_ndim: int,
    custom_op: bool,
) -> EinsumSpec:
    """Reads an ``Einsum`` layer's equation as a dense map, or refuses it naming the pattern.

    Args:
      path: the layer's key.
      layer_type: the layer's class name.
      equation: the ``einsum_str`` the layer runs (two operands: the input, the kernel).
      input_ndim: the rank of the layer's input.
      kernel_ndim: the rank of its kernel.
      custom_op: whether the layer replaces ``jnp.einsum`` (refused).

    Returns:
      The spec.
    """
    if custom_op:
        raise refuse(path, layer_type, "uses a custom einsum_op")
    equation = equation.replace(" ", "")

    def no(why: str) -> CaptureError:
        return refuse(
            path,
            layer_type,
            f"runs einsum {equation!r}, which is not a dense map on contracted axes: {why}",
        )

    if "->" not in equation or equation.count(",") != 1:
        raise no("it needs the explicit form 'input,kernel->output'")
    operands, out = equation.split("->")
    lhs, rhs = operands.split(",")
    if "..." in rhs:
        raise no("the kernel has an ellipsis")
    fresh = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in equation)
    lhs = _expand_ellipsis(lhs, input_ndim, fresh)
    out = _expand_ellipsis(out, input_ndim, fresh)
    if len(lhs) != input_ndim or len(rhs) != kernel_ndim:
        raise no("its operands do not match the input's and the kernel's ranks")
    if any(len(set(t)) != len(t) for t in (lhs, rhs, out)):
        raise no("a letter repeats within one operand (a diagonal or a trace)")
    shared = set(lhs) & set(rhs)
    if shared & set(out):
        raise no(
            f"axes {sorted(shared & set(out))} are in the input, the kernel and the output "
            "(a separate kernel per slice)"
        )
    if set(lhs) - set(rhs) - set(out):
        raise no(f"input axes {sorted(set(lhs) - set(rhs) - set(out))} are summed away")
    if set(rhs) - set(lhs) - set(out):
        raise no(f"kernel axes {sorted(set(rhs) - set(lhs) - set(out))} are summed away")
    contracted = [c for c in rhs if c in lhs]
    features = [c for c in rhs if c in out]
    kept = [c for c in lhs if c in out]
    if not contracted or not features:
        raise no("it needs at least one contracted and one output axis of the kernel")
    if rhs != "".join(contracted + features):
        raise no(
            f"the kernel must list its contracted axes before its output axes "
            f"({''.join(contracted)} then {''.join(features)}, e.g. "
            f"'{lhs},{''.join(contracted + features)}->{out}')"
        )
    if [c for c in out if c in features] != features:
        raise no("the output axes must keep the kernel's order (so that the bias does too)")
    if not kept or lhs[0] != kept[0]:
        raise no("the input's first axis must be the batch, kept in the output")
    return EinsumSpec(
        input_order=tuple(lhs.index(c) for c in kept + contracted),
        output_order=tuple(out.index(c) for c in kept + features),
        n_features=len(features),
        plain=kernel_ndim == 2 and len(kept) == 1,
    )


LayerSpec = DenseSpec | ConvSpec | DenseGeneralSpec | EinsumSpec | EmbedSpec | ScaleShiftSpec


def refuse(path: str, layer_type: str, what: str) -> CaptureError:
    """The error raised for a layer option that capture does not support.

    Args:
      path: the layer's key.
      layer_type: the layer's class name.
      what: what the layer does, e.g. ``"uses a kernel mask"``.

    Returns:
      The exception to raise.
    """
    return CaptureError(
        f"Layer '{path}' ({layer_type}) {what}; sofim_optax.curvature cannot capture its "
        "statistics. Use a plain layer, or keep this layer out of the captured model."
    )


def dense_spec(path: str, layer_type: str, *, custom_dot_general: bool) -> DenseSpec:
    """Validates a dense layer's options and returns its spec.

    Args:
      path: the layer's key.
      layer_type: the layer's class name.
      custom_dot_general: whether the layer replaces ``lax.dot_general``.

    Returns:
      The dense spec.
    """
    if custom_dot_general:
        raise refuse(path, layer_type, "uses a custom dot_general")
    return DenseSpec()


def conv_spec(
    path: str,
    layer_type: str,
    *,
    kernel_size: int | tuple[int, ...],
    strides: Any,
    padding: PaddingLike,
    input_dilation: Any,
    kernel_dilation: Any,
    feature_group_count: int,
    has_mask: bool,
    custom_conv: bool,
) -> ConvSpec:
    """Validates a convolution's options and returns its spec.

    Args:
      path: the layer's key.
      layer_type: the layer's class name.
      kernel_size: the layer's ``kernel_size``.
      strides: the layer's ``strides``.
      padding: the layer's ``padding``.
      input_dilation: the layer's ``input_dilation``.
      kernel_dilation: the layer's ``kernel_dilation``.
      feature_group_count: the layer's ``feature_group_count``; must be 1.
      has_mask: whether the layer masks its kernel (refused).
      custom_conv: whether the layer replaces ``lax.conv_general_dilated``
        (refused).

    Returns:
      The convolution spec.
    """
    if feature_group_count != 1:
        raise refuse(
            path,
            layer_type,
            f"is a grouped/depthwise convolution (feature_group_count={feature_group_count})",
        )
    if has_mask:
        raise refuse(path, layer_type, "uses a kernel mask")
    if custom_conv:
        raise refuse(path, layer_type, "uses a custom conv_general_dilated")
    if isinstance(padding, str) and padding.upper() not in PRE_PAD_MODES + (
        "SAME",
        "SAME_LOWER",
        "VALID",
    ):
        raise refuse(path, layer_type, f"uses padding={padding!r}")
    try:
        geometry = make_geometry(kernel_size, strides, padding, input_dilation, kernel_dilation)
    except (TypeError, ValueError) as e:
        raise refuse(path, layer_type, f"has options capture cannot read ({e})") from e
    return ConvSpec(geometry)


def dense_general_spec(
    path: str,
    layer_type: str,
    *,
    axis: int | tuple[int, ...],
    n_features: int,
    input_ndim: int,
    batch_dims: tuple[int, ...],
    custom_dot_general: bool,
) -> DenseGeneralSpec:
    """Validates a ``DenseGeneral`` / ``LinearGeneral``'s options and returns its spec.

    Args:
      path: the layer's key.
      layer_type: the layer's class name.
      axis: the layer's contracted ``axis`` (int or tuple, negative allowed).
      n_features: the number of feature axes (``len(features)`` / ``len(out_features)``).
      input_ndim: the rank of the layer's input.
      batch_dims: the layer's ``batch_dims`` / ``batch_axis`` (refused when not empty).
      custom_dot_general: whether the layer replaces ``lax.dot_general`` (refused).

    Returns:
      The spec.
    """
    if batch_dims:
        raise refuse(
            path,
            layer_type,
            f"has batch_dims={tuple(batch_dims)} (a separate kernel per batch slice, not one "
            "dense map)",
        )
    if custom_dot_general:
        raise refuse(path, layer_type, "uses a custom dot_general")
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    contracted = tuple(sorted(a % input_ndim for a in axes))
    return DenseGeneralSpec(contracted, int(n_features))
