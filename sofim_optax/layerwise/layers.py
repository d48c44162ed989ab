"""Layers of a parameter tree: discovery, paths and the gradient matrix of a layer.

A *layer* is any node of the parameter tree holding a ``kernel`` leaf with ``ndim >= 2``
(dense ``(d_in, d_out)``, conv ``(kh, kw, c_in, c_out)`` or any spatial rank, or a dense map
over several axes such as a ``DenseGeneral`` kernel ``(*in_features, *out_features)``),
together with its sibling ``bias`` when present. How a kernel's axes split into inputs and
outputs is read by :func:`discover_layers` (its rules are there). Its *path* is the ``"/"``-joined key
path without a leading ``"params"`` collection key (Flax variables dicts), without the
trailing ``"kernel"``/``"bias"``, and without the ``.value`` attribute of NNX variables: the
same string the capture adapters use as the key of ``layer_stats``.

The *gradient matrix* of a layer is ``V = [kernel.reshape(-1, d_out); bias]`` of shape
``(d_a, d_g)`` (:func:`gradient_matrix`, inverted by :func:`split_matrix`). Row-major ``vec``
convention of the whole package: ``(A ⊗ G) vec_r(X) = vec_r(A X Gᵀ)`` with
``vec_r(X) = X.reshape(-1)``, so that a Kronecker-factored preconditioner ``(A ⊗ G)⁻¹``
acts on ``V`` as ``A⁻¹ V G⁻¹``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["Layer", "ParamLayout", "discover_layers", "gradient_matrix", "split_matrix"]

_KERNEL = "kernel"
_BIAS = "bias"
_EMBEDDING = "embedding"


# --------------------------------------------------------------------------------------
# Paths and layer discovery.
# --------------------------------------------------------------------------------------


def _key_name(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return str(key.name)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _leaf_names(path: Sequence[Any]) -> list[str]:
    """Key names of one leaf, without NNX's trailing ``.value`` and a leading ``params``."""
    keys = list(path)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]  # an nnx.Variable (Param, VariableState) wrapping the array
    names = [_key_name(k) for k in keys]
    if len(names) > 1 and names[0] == "params" and isinstance(keys[0], jax.tree_util.DictKey):
        names = names[1:]  # a Flax variables dict {"params": ...}
    return names


@dataclasses.dataclass(frozen=True)
class Layer:
    """One Kronecker-factored layer found in the parameter tree.

    Attributes:
      path: the layer's key in ``layer_stats`` (e.g. ``"Encoder_0/Dense_1"``).
      kernel_leaf: index of the kernel among the tree's flattened leaves.
      bias_leaf: index of the bias, or ``None`` for a layer without bias.
      kernel_shape: e.g. ``(d_in, d_out)``, ``(kh, kw, c_in, c_out)`` or a ``DenseGeneral``'s
        ``(*in_features, *out_features)``.
      output_axes: how many trailing kernel axes are the layer's outputs (default 1; a
        ``DenseGeneral`` with ``features=(heads, head_dim)`` has 2).
      general: the kernel is a dense map over several axes (``DenseGeneral``,
        ``LinearGeneral``, ``Einsum``), not a convolution, although it has ``ndim >= 3``.
      embedding: the "kernel" is an embedding table ``(V, D)`` (a leaf named ``embedding``,
        as in ``flax.linen.Embed`` / ``flax.nnx.Embed``): a dense map from one-hot token
        rows, no bias. Its input factor is exactly diagonal (the token frequencies), which
        the Kronecker-factored methods use (:attr:`kind` is ``"dense"``).
    """

    path: str
    kernel_leaf: int
    bias_leaf: int | None
    kernel_shape: tuple[int, ...]
    output_axes: int = 1
    general: bool = False
    embedding: bool = False

    @property
    def kind(self) -> str:
        """``"dense"`` for a 2-D kernel ``(d_in, d_out)`` or a general dense map
        (:attr:`general`), ``"conv"`` for any other kernel of ``ndim >= 3``.

        The kind fixes the rank of the layer's statistics (:mod:`sofim_optax.layerwise.checks`):
        a dense layer takes ``(N, ·)`` statistics, or ``(N, T, ·)`` when it is applied to
        sequences of ``T`` positions; a convolution (``(k_1, ..., k_d, c_in, c_out)``, what
        ``flax.linen.Conv`` and ``flax.nnx.Conv`` hold) always takes ``(N, T, ·)``, ``T`` its
        output positions, because its per-example gradient is a sum over positions. Any other
        layer with such a kernel is treated as a convolution unless it is :attr:`general`.
        """
        return "dense" if len(self.kernel_shape) == 2 or self.general else "conv"

    @property
    def d_in(self) -> int:
        """``kh·kw·c_in`` (or ``d_in``, or the product of a general map's input axes): the
        width of the layer's inputs/patches."""
        return math.prod(self.kernel_shape[: -self.output_axes])

    @property
    def d_out(self) -> int:
        """The product of the kernel's :attr:`output_axes` trailing axes."""
        return math.prod(self.kernel_shape[-self.output_axes :])

    @property
    def has_bias(self) -> bool:
        return self.bias_leaf is not None

    @property
    def d_a(self) -> int:
        """The input-side factor's dimension, ``d_in`` plus one for the bias."""
        return self.d_in + int(self.has_bias)

    @property
    def d_g(self) -> int:
        """The output-side factor's dimension, ``d_out``."""
        return self.d_out

    @property
    def leaves(self) -> tuple[int, ...]:
        return (self.kernel_leaf,) if self.bias_leaf is None else (self.kernel_leaf, self.bias_leaf)

    def describe(self) -> str:
        shape = "x".join(map(str, self.kernel_shape))
        if self.embedding:
            return (
                f"{self.path} (embedding {shape}; A {self.d_a} diagonal, G {self.d_g}x{self.d_g})"
            )
        bias = " + bias" if self.has_bias else ""
        general = f", a dense map with {self.output_axes} output axes" if self.general else ""
        return (
            f"{self.path} (kernel {shape}{bias}{general}; A {self.d_a}x{self.d_a}, "
            f"G {self.d_g}x{self.d_g})"
        )


@dataclasses.dataclass(frozen=True)
class ParamLayout:
    """Static description of a parameter (or gradient) tree, computed at trace time.

    Attributes:
      leaf_paths: the ``"/"``-joined path of every flattened leaf (normalised as described
        in the module docstring, ``kernel``/``bias`` included).
      layers: the candidate layers, sorted by path.
      other_leaves: indices of the leaves that belong to no layer.
    """

    leaf_paths: tuple[str, ...]
    layers: tuple[Layer, ...]
    other_leaves: tuple[int, ...]

    @property
    def layer_paths(self) -> tuple[str, ...]:
        return tuple(layer.path for layer in self.layers)

    def index(self, path: str) -> int:
        return self.layer_paths.index(path)

    def without(self, paths: Sequence[str]) -> ParamLayout:
        """This layout with the layers at ``paths`` removed: their leaves join
        :attr:`other_leaves` (the fallback's)."""
        dropped = [layer for layer in self.layers if layer.path in paths]
        freed = {leaf for layer in dropped for leaf in layer.leaves}
        return ParamLayout(
            self.leaf_paths,
            tuple(layer for layer in self.layers if layer.path not in paths),
            tuple(sorted(set(self.other_leaves) | freed)),
        )


def discover_layers(tree: Any, kernel_output_axes: Mapping[str, int] | None = None) -> ParamLayout:
    """Finds the Kronecker-factorable layers of a parameter tree.

    A layer is a node with a ``kernel`` array of ``ndim >= 2``. Its axes are read as follows
    (the parameter tree alone cannot always tell a convolution from a dense map over several
    axes, so the rules look at the bias and at ``kernel_output_axes``):

    1. a path listed in ``kernel_output_axes`` is a general dense map with that many trailing
       output axes (``DenseGeneral``'s ``len(features)``);
    2. a ``kernel`` of ``ndim >= 3`` whose sibling ``bias`` has the shape of the kernel's last
       ``k >= 2`` axes is a general dense map with ``k`` output axes (a ``DenseGeneral`` /
       ``LinearGeneral`` with ``features=(heads, head_dim)`` and a bias, as in the query, key
       and value projections of Flax's attention);
    3. otherwise a 2-D kernel is dense and a kernel of ``ndim >= 3`` a convolution
       ``(k_1, ..., k_r, c_in, c_out)``, one output axis. A ``DenseGeneral`` over several
       input axes with one output axis (the output projection of attention, ``(heads,
       head_dim, d_model)``) reads the same way: the same ``d_in`` and ``d_out``, so the
       Kronecker-factored methods treat it exactly as a dense map; only Mini-Block Fisher's
       block partition differs, and it asks for rule 1.

    A node with a 2-D ``embedding`` leaf ``(V, D)`` and no ``kernel`` (``Embed``) is a layer
    too (:attr:`Layer.embedding`): the dense map ``onehot(ids) @ embedding`` without bias.

    The sibling ``bias`` is folded in when it holds exactly ``d_out`` entries in the shape of
    the output axes (or flat); any other bias is left to the fallback. Works on plain nested
    dicts, Flax linen variables dicts ``{"params": ...}``, ``FrozenDict`` and ``nnx.State``
    (leaves may be wrapped in ``nnx.Param``/``VariableState``).

    Args:
      tree: the parameters (or gradients).
      kernel_output_axes: ``{layer path: number of output axes}`` for general dense maps the
        rules above cannot recognise (a bias-less ``DenseGeneral`` with several output axes).
        Default ``None``.

    Returns:
      The layout.

    Raises:
      ValueError: ``kernel_output_axes`` names no layer, or gives a count that leaves no
        input axis.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    names = [_leaf_names(path) for path, _ in flat]
    leaf_paths = tuple("/".join(n) for n in names)
    by_path = {p: i for i, p in enumerate(leaf_paths)}
    hints = dict(kernel_output_axes or {})
    layers = []
    used: set[int] = set()
    for i, ((_, leaf), n) in enumerate(zip(flat, names)):
        shape = tuple(getattr(leaf, "shape", ()))
        if n and n[-1] == _EMBEDDING and len(shape) == 2:
            parent = "/".join(n[:-1])
            if (f"{parent}/{_KERNEL}" if parent else _KERNEL) not in by_path:
                layers.append(Layer(parent, i, None, shape, embedding=True))
                used.add(i)
            continue
        if not n or n[-1] != _KERNEL or len(shape) < 2:
            continue
        parent = "/".join(n[:-1])
        bias_i = by_path.get(f"{parent}/{_BIAS}" if parent else _BIAS)
        bshape = () if bias_i is None else tuple(getattr(flat[bias_i][1], "shape", ()))
        if parent in hints:
            out_axes = hints.pop(parent)
            if isinstance(out_axes, bool) or not isinstance(out_axes, int):
                raise ValueError(
                    f"kernel_output_axes[{parent!r}] must be an int, got {out_axes!r}."
                )
            if not 1 <= out_axes < len(shape):
                raise ValueError(
                    f"kernel_output_axes[{parent!r}] = {out_axes}, but its kernel {shape} needs "
                    f"at least one input axis: give 1 to {len(shape) - 1}."
                )
            general = True
        elif len(shape) >= 3 and len(bshape) >= 2 and shape[-len(bshape) :] == bshape:
            out_axes, general = len(bshape), True
        else:
            out_axes, general = 1, False
        d_out = math.prod(shape[-out_axes:])
        if bias_i is not None and not (
            math.prod(bshape) == d_out and bshape in (shape[-out_axes:], (d_out,))
        ):
            bias_i = None
        layers.append(Layer(parent, i, bias_i, shape, out_axes, general))
        used.update(layers[-1].leaves)
    if hints:
        raise ValueError(
            f"kernel_output_axes names {sorted(hints)}, but params hold no layer (a node with a "
            f"`kernel` of ndim >= 2) at that path. Layer paths: {sorted(l.path for l in layers)}."
        )
    layers.sort(key=lambda layer: layer.path)
    other = tuple(i for i in range(len(flat)) if i not in used)
    return ParamLayout(leaf_paths, tuple(layers), other)


def gradient_matrix(layer: Layer, leaves: Sequence[jax.Array], dtype: Any) -> jax.Array:
    """``V = [kernel.reshape(-1, d_out); bias]`` in ``dtype``, shape ``(d_a, d_g)``."""
    v = jnp.asarray(leaves[layer.kernel_leaf]).astype(dtype).reshape(layer.d_in, layer.d_out)
    if layer.has_bias:
        b = jnp.asarray(leaves[layer.bias_leaf]).astype(dtype).reshape(1, layer.d_out)
        v = jnp.concatenate([v, b], axis=0)
    return v


def split_matrix(layer: Layer, x: jax.Array, like: Sequence[jax.Array]) -> dict[int, jax.Array]:
    """Inverse of :func:`gradient_matrix`: ``{leaf index: array}`` shaped and typed like ``like``."""
    k = like[layer.kernel_leaf]
    out = {layer.kernel_leaf: x[: layer.d_in].reshape(k.shape).astype(k.dtype)}
    if layer.has_bias:
        b = like[layer.bias_leaf]
        out[layer.bias_leaf] = x[layer.d_in].reshape(b.shape).astype(b.dtype)
    return out
