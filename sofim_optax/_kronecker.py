"""Shared plumbing of the Kronecker-factored family (KFAC, KPSVD, Deflation, KFAC-corrected,
Lanczos, K-BFGS).

Every method of the family preconditions the gradient of each captured dense or
convolutional layer by (a function of) Kronecker factors built from that layer's
:class:`~sofim_optax.curvature.stats.LayerStats`, and hands every other parameter to a
fallback transformation. What differs between the methods is only how the factors are
estimated and how they are inverted. This module holds everything else:

* **Layer discovery** (:func:`discover_layers`): a layer is any node of the parameter tree
  holding a ``kernel`` leaf with ``ndim >= 2`` (dense ``(d_in, d_out)``, conv
  ``(kh, kw, c_in, c_out)`` or any spatial rank), together with its sibling ``bias`` of
  ``d_out`` entries when present. Its path is the ``"/"``-joined key path without a leading
  ``"params"`` collection key (Flax variables dicts), without the trailing
  ``"kernel"``/``"bias"``, and without the ``.value`` attribute of NNX variables.
* **Statistics checks** (:func:`check_layer_stats`): errors at trace time, naming the layer.
* **Layer matrices** (:func:`gradient_matrix`, :func:`split_matrix`): the gradient matrix
  ``V = [kernel.reshape(-1, d_out); bias]`` of shape ``(d_a, d_g)`` and back.
* **Second moments** (:func:`input_factor`, :func:`output_factor`,
  :func:`homogeneous_inputs`): ``A = mean ā āᵀ`` (bias coordinate 1 appended last) and
  ``G = mean g gᵀ`` with KFC's scaling for convolutions.
* **Stacked factors** (:class:`FactorLayout`): all factors of the same dimension, whatever
  their layer and role, live in one ``(n, d, d)`` array, so that an eigendecomposition or an
  inverse is one ``vmap``-ed call per distinct dimension.
* **Fallback routing** (:class:`FallbackState`, :func:`fallback_init`,
  :func:`fallback_update`) and the one-time registration log.
* **The transformation skeleton** (:func:`kronecker_transformation`): counting, the
  ``lax.cond`` refreshes of statistics and inverses, dtype handling, fallback. A method only
  supplies four functions (see :class:`KroneckerMethod`).

Row-major ``vec`` convention of the whole package: ``(A ⊗ G) vec_r(X) = vec_r(A X Gᵀ)`` with
``vec_r(X) = X.reshape(-1)``; for a layer with gradient matrix ``V`` (``d_a × d_g``) the
KFAC preconditioned gradient is ``A⁻¹ V G⁻¹``.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sofim_optax import _cpu_runtime, linalg

__all__ = [
    "KronLayer",
    "ParamLayout",
    "FactorLayout",
    "FallbackState",
    "KroneckerMethod",
    "discover_layers",
    "check_layer_stats",
    "gradient_matrix",
    "split_matrix",
    "homogeneous_inputs",
    "input_factor",
    "output_factor",
    "ema_decay",
    "stacked_damped_inverse",
    "fallback_init",
    "fallback_update",
    "kronecker_transformation",
    "momentum_alias",
]

logger = logging.getLogger("sofim_optax")

_KERNEL = "kernel"
_BIAS = "bias"


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
class KronLayer:
    """One Kronecker-factored layer found in the parameter tree.

    Attributes:
      path: the layer's key in ``layer_stats`` (e.g. ``"Encoder_0/Dense_1"``).
      kernel_leaf: index of the kernel among the tree's flattened leaves.
      bias_leaf: index of the bias, or ``None`` for a layer without bias.
      kernel_shape: e.g. ``(d_in, d_out)`` or ``(kh, kw, c_in, c_out)``.
    """

    path: str
    kernel_leaf: int
    bias_leaf: int | None
    kernel_shape: tuple[int, ...]

    @property
    def d_in(self) -> int:
        """``kh·kw·c_in`` (or ``d_in``): the width of the layer's inputs/patches."""
        return math.prod(self.kernel_shape[:-1])

    @property
    def d_out(self) -> int:
        return self.kernel_shape[-1]

    @property
    def has_bias(self) -> bool:
        return self.bias_leaf is not None

    @property
    def d_a(self) -> int:
        """Dimension of the input-side factor: ``d_in`` plus one for the bias."""
        return self.d_in + int(self.has_bias)

    @property
    def d_g(self) -> int:
        """Dimension of the output-side factor: ``d_out``."""
        return self.d_out

    @property
    def leaves(self) -> tuple[int, ...]:
        return (self.kernel_leaf,) if self.bias_leaf is None else (self.kernel_leaf, self.bias_leaf)

    def describe(self) -> str:
        shape = "x".join(map(str, self.kernel_shape))
        bias = " + bias" if self.has_bias else ""
        return f"{self.path} (kernel {shape}{bias}; A {self.d_a}x{self.d_a}, G {self.d_g}x{self.d_g})"


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
    layers: tuple[KronLayer, ...]
    other_leaves: tuple[int, ...]

    @property
    def layer_paths(self) -> tuple[str, ...]:
        return tuple(layer.path for layer in self.layers)

    def index(self, path: str) -> int:
        return self.layer_paths.index(path)


def discover_layers(tree: Any) -> ParamLayout:
    """Finds the Kronecker-factorable layers of a parameter tree.

    A layer is a node with a ``kernel`` array of ``ndim >= 2``; its sibling ``bias`` is folded
    in when it holds exactly ``d_out = kernel.shape[-1]`` entries (any other bias, e.g. of a
    multi-axis ``DenseGeneral``, is left to the fallback). Works on plain nested dicts, Flax
    linen variables dicts ``{"params": ...}``, ``FrozenDict`` and ``nnx.State`` (leaves may
    be wrapped in ``nnx.Param``/``VariableState``).
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    names = [_leaf_names(path) for path, _ in flat]
    leaf_paths = tuple("/".join(n) for n in names)
    by_path = {p: i for i, p in enumerate(leaf_paths)}
    layers = []
    used: set[int] = set()
    for i, ((_, leaf), n) in enumerate(zip(flat, names)):
        shape = tuple(getattr(leaf, "shape", ()))
        if not n or n[-1] != _KERNEL or len(shape) < 2:
            continue
        parent = "/".join(n[:-1])
        bias_i = by_path.get(f"{parent}/{_BIAS}" if parent else _BIAS)
        if bias_i is not None:
            bshape = tuple(getattr(flat[bias_i][1], "shape", ()))
            if math.prod(bshape) != shape[-1] or (bshape and bshape[-1] != shape[-1]):
                bias_i = None
        layers.append(KronLayer(parent, i, bias_i, shape))
        used.update(layers[-1].leaves)
    layers.sort(key=lambda layer: layer.path)
    other = tuple(i for i in range(len(flat)) if i not in used)
    return ParamLayout(leaf_paths, tuple(layers), other)


# --------------------------------------------------------------------------------------
# Statistics checks and second moments.
# --------------------------------------------------------------------------------------


def _missing_stats_message(method: str, layout: ParamLayout) -> str:
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
        raise TypeError(_missing_stats_message(method, layout))
    if not isinstance(layer_stats, Mapping):
        raise TypeError(
            f"{method}: `layer_stats` must be a dict {{layer path: LayerStats}}, got "
            f"{type(layer_stats).__name__}. " + _missing_stats_message(method, layout)
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


def _check_one(layer: KronLayer, stats: Any, method: str) -> None:
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


def homogeneous_inputs(inputs: jax.Array, has_bias: bool, dtype: Any = jnp.float32) -> jax.Array:
    """``ā``: the inputs in ``dtype``, with a last coordinate of value 1 when ``has_bias``."""
    x = jnp.asarray(inputs).astype(dtype)
    if has_bias:
        x = jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), dtype)], axis=-1)
    return x


def input_factor(inputs: jax.Array, has_bias: bool, dtype: Any = jnp.float32) -> jax.Array:
    r"""Batch input factor ``Â = mean ā āᵀ``, shape ``(d_a, d_a)``.

    Dense ``(N, d_in)``: the mean over the ``N`` examples. Convolution ``(N, T, kh·kw·c_in)``:
    the mean over examples **and** the ``T`` output positions (KFC, Grosse & Martens 2016).
    """
    x = jnp.asarray(inputs).astype(dtype)
    x = x.reshape(-1, x.shape[-1])
    m = x.shape[0]
    xx = (x.T @ x) / m
    if not has_bias:
        return xx
    # [[xᵀx, xᵀ1], [1ᵀx, m]] / m, without materialising the (m, d_in + 1) array ā.
    mean = jnp.mean(x, axis=0)
    top = jnp.concatenate([xx, mean[:, None]], axis=1)
    bottom = jnp.concatenate([mean, jnp.ones((1,), dtype)])[None, :]
    return jnp.concatenate([top, bottom], axis=0)


def output_factor(output_grads: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    r"""Batch output factor ``Ĝ``, shape ``(d_out, d_out)``.

    Dense ``(N, d_out)``: ``Ĝ = mean_n g_n g_nᵀ``. Convolution ``(N, T, c_out)``:
    ``Ĝ = T · mean_{n,t} g_{n,t} g_{n,t}ᵀ = (1/N) Σ_{n,t} g_{n,t} g_{n,t}ᵀ`` (KFC's scaling,
    Grosse & Martens 2016: the per-example gradient of a conv kernel is a sum over positions,
    so with ``Â`` a mean over positions, ``Â ⊗ Ĝ`` has the Fisher's scale).
    """
    g = jnp.asarray(output_grads).astype(dtype)
    n = g.shape[0]
    g = g.reshape(-1, g.shape[-1])
    return (g.T @ g) / n


def ema_decay(k: jax.Array, ema: jax.Array | float, dtype: Any = jnp.float32) -> jax.Array:
    """``ρ = min(1 − 1/k, ema)`` for the ``k``-th statistics update (``k >= 1``).

    The first update (``k = 1``) gets ``ρ = 0``, i.e. the batch statistics themselves, and the
    ``k``-th one with ``k <= 1/(1-ema)`` the plain mean of the ``k`` batches seen so far.
    """
    k = jnp.maximum(jnp.asarray(k).astype(dtype), 1.0)
    return jnp.minimum(1.0 - 1.0 / k, jnp.asarray(ema).astype(dtype))


def gradient_matrix(layer: KronLayer, leaves: Sequence[jax.Array], dtype: Any) -> jax.Array:
    """``V = [kernel.reshape(-1, d_out); bias]`` in ``dtype``, shape ``(d_a, d_g)``."""
    v = jnp.asarray(leaves[layer.kernel_leaf]).astype(dtype).reshape(layer.d_in, layer.d_out)
    if layer.has_bias:
        b = jnp.asarray(leaves[layer.bias_leaf]).astype(dtype).reshape(1, layer.d_out)
        v = jnp.concatenate([v, b], axis=0)
    return v


def split_matrix(layer: KronLayer, x: jax.Array, like: Sequence[jax.Array]) -> dict[int, jax.Array]:
    """Inverse of :func:`gradient_matrix`: ``{leaf index: array}`` shaped and typed like ``like``."""
    k = like[layer.kernel_leaf]
    out = {layer.kernel_leaf: x[: layer.d_in].reshape(k.shape).astype(k.dtype)}
    if layer.has_bias:
        b = like[layer.bias_leaf]
        out[layer.bias_leaf] = x[layer.d_in].reshape(b.shape).astype(b.dtype)
    return out


# --------------------------------------------------------------------------------------
# Stacked factors.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FactorLayout:
    """Where each factor of each layer lives in the per-dimension stacks.

    Every layer has one factor per *role* (KFAC: ``("A", "G")``; a rank-two Kronecker sum:
    ``("A1", "G1", "A2", "G2")``). All factors of dimension ``d`` — whatever their layer or
    role — are stacked, in layer order then role order, into one array of shape
    ``(n_d, d, d)`` stored under the key :meth:`key` ``(d) = "d{d}"``. A dict of such stacks is
    an ordinary pytree of arrays (so it checkpoints, and ``jax.tree.map`` works over it), and
    any per-factor computation is one ``jax.vmap``-ed call per distinct dimension
    (:meth:`map`).

    Attributes:
      roles: the role names.
      slots: ``slots[layer][role] = (key, position)``.
      sizes: ``{key: n_d}``.
      dims: ``{key: d}``.
    """

    roles: tuple[str, ...]
    slots: tuple[tuple[tuple[str, int], ...], ...]
    sizes: Mapping[str, int]
    dims: Mapping[str, int]

    @staticmethod
    def key(dim: int) -> str:
        return f"d{dim}"

    @classmethod
    def build(
        cls,
        layers: Sequence[KronLayer],
        roles: Sequence[str] = ("A", "G"),
        role_dim: Callable[[KronLayer, str], int] | None = None,
    ) -> FactorLayout:
        """Layout for ``layers``; ``role_dim(layer, role)`` defaults to ``d_a`` for roles
        starting with ``"A"`` and ``d_g`` otherwise."""
        if role_dim is None:
            role_dim = lambda layer, role: layer.d_a if role.startswith("A") else layer.d_g
        sizes: dict[str, int] = {}
        dims: dict[str, int] = {}
        slots = []
        for layer in layers:
            row = []
            for role in roles:
                d = int(role_dim(layer, role))
                k = cls.key(d)
                row.append((k, sizes.get(k, 0)))
                sizes[k] = sizes.get(k, 0) + 1
                dims[k] = d
            slots.append(tuple(row))
        return cls(tuple(roles), tuple(slots), dict(sizes), dict(dims))

    def zeros(self, dtype: Any) -> dict[str, jax.Array]:
        return {k: jnp.zeros((n, self.dims[k], self.dims[k]), dtype) for k, n in self.sizes.items()}

    def eyes(self, dtype: Any) -> dict[str, jax.Array]:
        return {
            k: jnp.broadcast_to(jnp.eye(self.dims[k], dtype=dtype), (n, self.dims[k], self.dims[k]))
            for k, n in self.sizes.items()
        }

    def vectors(self, dtype: Any, fill: float = 0.0) -> dict[str, jax.Array]:
        """One length-``d`` vector per factor (e.g. eigenvalues), shape ``(n_d, d)``."""
        return {k: jnp.full((n, self.dims[k]), fill, dtype) for k, n in self.sizes.items()}

    def scalars(self, dtype: Any, fill: float = 0.0) -> dict[str, jax.Array]:
        """One scalar per factor (e.g. a shift), shape ``(n_d,)``."""
        return {k: jnp.full((n,), fill, dtype) for k, n in self.sizes.items()}

    def get(self, stacks: Mapping[str, jax.Array], layer: int, role: str) -> jax.Array:
        k, pos = self.slots[layer][self.roles.index(role)]
        return stacks[k][pos]

    def set(
        self, stacks: Mapping[str, jax.Array], values: Mapping[tuple[int, str], jax.Array]
    ) -> dict[str, jax.Array]:
        """Returns new stacks with ``values[(layer, role)]`` written into their slots.

        The stacks are rebuilt with one ``jnp.stack`` per key (unchanged members are taken from
        the old stack), which XLA turns into in-place updates.
        """
        by_key: dict[str, dict[int, jax.Array]] = {}
        for (layer, role), v in values.items():
            k, pos = self.slots[layer][self.roles.index(role)]
            by_key.setdefault(k, {})[pos] = v
        out = dict(stacks)
        for k, members in by_key.items():
            old = stacks[k]
            out[k] = jnp.stack(
                [members[i].astype(old.dtype) if i in members else old[i] for i in range(old.shape[0])]
            )
        return out

    def per_factor(self, fn: Callable[[int, str], jax.Array]) -> dict[str, jax.Array]:
        """Stacks ``fn(layer, role)`` (e.g. a per-factor shift) into arrays keyed like the stacks."""
        out: dict[str, list] = {k: [None] * n for k, n in self.sizes.items()}
        for layer, row in enumerate(self.slots):
            for role, (k, pos) in zip(self.roles, row):
                out[k][pos] = fn(layer, role)
        return {k: jnp.stack(v) for k, v in out.items()}

    @staticmethod
    def map(fn: Callable[..., Any], *stacks: Mapping[str, Any]) -> dict[str, Any]:
        """``{key: jax.vmap(fn)(*(s[key] for s in stacks))}``: one batched call per dimension
        (``lax.map`` where batched LAPACK calls can deadlock, see ``_cpu_runtime.map_stack``)."""
        return {k: _cpu_runtime.map_stack(fn, *(s[k] for s in stacks)) for k in stacks[0]}


def stacked_damped_inverse(
    factors: jax.Array, shifts: jax.Array, method: str = "cholesky"
) -> jax.Array:
    """``(F_i + shift_i I)⁻¹`` for a stack ``(n, d, d)``, in one ``vmap``-ed call, never NaN.

    If any entry of the batch comes out non-finite (a Cholesky breakdown when round-off makes a
    barely damped factor indefinite), the whole stack is recomputed through the
    eigendecomposition (:func:`sofim_optax.linalg.damped_inverse` with ``"eigh"``, eigenvalues
    clamped at 0), which is finite for finite input. The fallback runs under ``lax.cond``, so it
    costs nothing when not needed.
    """
    inv = _cpu_runtime.map_stack(lambda f, s: linalg.damped_inverse(f, s, method), factors, shifts)
    if method == "eigh":
        return inv
    safe = lambda: _cpu_runtime.map_stack(lambda f, s: linalg.damped_inverse(f, s, "eigh"), factors, shifts)
    inputs_finite = jnp.all(jnp.isfinite(factors))
    return lax.cond(jnp.all(jnp.isfinite(inv)) | ~inputs_finite, lambda: inv, safe)


# --------------------------------------------------------------------------------------
# Fallback.
# --------------------------------------------------------------------------------------


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
        upd, st = fallback.update(_sub(layout, updates, idx), st, _sub(layout, params, idx), **extra)
        for i in idx:
            out[i] = upd[layout.leaf_paths[i]]
        return st

    other = run(layout.other_leaves, state.other)
    layer_states = tuple(
        st if li in active else run(layer.leaves, st)
        for li, (layer, st) in enumerate(zip(layout.layers, state.layers))
    )
    return out, FallbackState(other, layer_states)


# --------------------------------------------------------------------------------------
# The transformation skeleton.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KroneckerMethod:
    """The four functions that make a Kronecker-family method.

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
        or inverses; run when ``count % inverse_period == 0``, after the statistics).
      precondition: ``precondition(curvature, param_layout, grads, **extra) ->
        (preconditioned, curvature)`` with ``grads = {layer index: V}`` (gradient matrices
        ``(d_a, d_g)`` in the accumulation dtype) and ``preconditioned`` keyed alike; it runs
        every step and may update the curvature (e.g. to remember the last direction).
    """

    init: Callable[..., Any]
    update_statistics: Callable[..., Any]
    refresh: Callable[..., Any]
    precondition: Callable[..., dict[int, jax.Array]]


def _check_period(name: str, value: Any) -> None:
    if isinstance(value, bool) or (isinstance(value, int) and value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _every(period: Any, count: jax.Array, fn: Callable[[Any], Any], operand: Any) -> Any:
    """``fn(operand)`` when ``count % period == 0`` (under ``lax.cond``), else ``operand``."""
    if isinstance(period, int) and period == 1:
        return fn(operand)
    return lax.cond(count % period == 0, fn, lambda x: x, operand)


def _accumulation_dtype(leaves: Sequence[jax.Array], layout: ParamLayout) -> Any:
    dtypes = [jnp.asarray(leaves[layer.kernel_leaf]).dtype for layer in layout.layers]
    return jnp.promote_types(jnp.result_type(jnp.float32, *dtypes), jnp.float32)


def kronecker_transformation(
    *,
    name: str,
    method: KroneckerMethod,
    state_cls: Callable[..., Any],
    stats_period: Any,
    inverse_period: Any,
    fallback: optax.GradientTransformation | None,
) -> optax.GradientTransformationExtraArgs:
    """Builds a Kronecker-family ``GradientTransformationExtraArgs`` from a method.

    ``state_cls(count=..., curvature=..., fallback_state=...)`` builds the state (a NamedTuple
    with those three fields). ``update(updates, state, params=None, *, layer_stats=None,
    **extra)``:

    1. finds the layers in ``updates`` and validates ``layer_stats`` (errors name the layer);
    2. ``count % stats_period == 0``: ``method.update_statistics`` (``extra`` forwarded);
    3. ``count % inverse_period == 0``: ``method.refresh``;
    4. ``method.precondition`` on the captured layers' gradient matrices, results cast back to
       each leaf's dtype;
    5. ``fallback`` (identity when ``None``) on every other leaf, ``extra`` forwarded (without
       ``layer_stats``);
    6. ``count ← safe_increment(count)``.

    A one-time ``logging`` INFO line (logger ``"sofim_optax"``) names the preconditioned layers
    and the leaves that take the fallback path, at the first trace of this instance.
    """
    _check_period("stats_period", stats_period)
    _check_period("inverse_period", inverse_period)
    fb = optax.with_extra_args_support(optax.identity() if fallback is None else fallback)
    fb_name = "identity" if fallback is None else "the fallback transformation"
    logged = [False]

    def init_fn(params):
        leaves = jax.tree_util.tree_leaves(params)
        layout = discover_layers(params)
        dtype = _accumulation_dtype(leaves, layout)
        return state_cls(
            count=jnp.zeros([], jnp.int32),
            curvature=method.init(layout, dtype),
            fallback_state=fallback_init(fb, layout, leaves),
        )

    def update_fn(updates, state, params=None, *, layer_stats=None, **extra):
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        layout = discover_layers(updates)
        active = check_layer_stats(layout, layer_stats, name)
        if not logged[0]:
            logged[0] = True
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
            logger.info(
                "%s: preconditioning %d layer(s): %s; %d parameter array(s) take the fallback "
                "path (%s): %s",
                name, len(described), described, len(rest), fb_name, rest,
            )
        dtype = _accumulation_dtype(leaves, layout)
        count = state.count
        stats = {i: layer_stats[layout.layers[i].path] for i in active}

        curvature = state.curvature
        if active:  # with no captured layer at all, there is nothing to refresh
            curvature = _every(
                stats_period,
                count,
                lambda c: method.update_statistics(c, layout, stats, **extra),
                curvature,
            )
            curvature = _every(
                inverse_period, count, lambda c: method.refresh(c, layout, **extra), curvature
            )

        new_leaves = list(leaves)
        if active:
            grads = {i: gradient_matrix(layout.layers[i], leaves, dtype) for i in active}
            directions, curvature = method.precondition(curvature, layout, grads, **extra)
            for i in active:
                for leaf, value in split_matrix(layout.layers[i], directions[i], leaves).items():
                    new_leaves[leaf] = value
        param_leaves = None if params is None else jax.tree_util.tree_leaves(params)
        fb_out, fb_state = fallback_update(
            fb, layout, active, leaves, state.fallback_state, param_leaves, **extra
        )
        for leaf, value in fb_out.items():
            new_leaves[leaf] = value
        new_state = state_cls(
            count=optax.safe_increment(count), curvature=curvature, fallback_state=fb_state
        )
        return jax.tree_util.tree_unflatten(treedef, new_leaves), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def momentum_alias(
    scale: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    momentum: Any,
    weight_decay: Any,
    nesterov: bool,
    weight_decay_mask: Any,
) -> optax.GradientTransformationExtraArgs:
    """The aliases of KFAC and the KPSVD family: ``chain(scale, add_decayed_weights(weight_decay,
    weight_decay_mask), trace(momentum, nesterov), scale_by_learning_rate(learning_rate))``, the
    momentum term left out when ``momentum is None``."""
    parts = [scale, optax.add_decayed_weights(weight_decay, weight_decay_mask)]
    if momentum is not None:
        parts.append(optax.trace(decay=momentum, nesterov=nesterov))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
