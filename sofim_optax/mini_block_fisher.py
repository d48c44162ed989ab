"""Mini-Block Fisher (MBF; Bahamou, Goldfarb & Ren, AISTATS 2023) as optax transformations.

MBF preconditions each layer's gradient by a block-diagonal approximation of the layer's
**empirical Fisher** (EF) in which every block is *small*: one ``k×k`` block per
(input channel, output channel) pair of a convolution, and one block per output unit (its
incoming weights and its bias, optionally cut into chunks) of a dense layer. The many small
blocks are estimated from per-example gradients that are never materialised for the whole
batch, stacked by block size, inverted in one batched call per size and applied as batched
matrix-vector products. Counting, the ``lax.cond`` refreshes, dtypes, statistics checks and
fallback routing come from :mod:`sofim_optax._kronecker` (this module supplies a
:class:`~sofim_optax._kronecker.KroneckerMethod`).

The mini-block structure used here is a *reconstruction* (the paper's body could not be
consulted when this was written; see ``research/sofim_mbf.md`` §2.3): it is the most plausible
reading of "a large number of mini-blocks of modest size" for both layer kinds, with the dense
blocks chunked so that the 1000-wide layers of the deep autoencoder fit in memory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from sofim_optax import _kronecker as kron
from sofim_optax import linalg

__all__ = [
    "MiniBlockFisherCurvature",
    "ScaleByMiniBlockFisherState",
    "DiagonalFisherState",
    "MomentumFirstState",
    "LayerBlocking",
    "BlockLayout",
    "layer_blocking",
    "scale_by_diagonal_fisher",
    "scale_by_mini_block_fisher",
    "mini_block_fisher",
    "mbf",
]

_INVERSES = ("cholesky", "eigh", "inv")

#: Default ``dense_block_size``. Memory arithmetic for the deep autoencoder
#: 784-1000-500-250-30-250-500-1000-784 (P = 2 837 314 weights and biases, all dense): a block
#: of size ``s`` stores ``s`` floats per parameter, and MBF keeps two such stacks (the EMA
#: blocks and their damped inverses), i.e. ``2 · 4 B · s`` per parameter in float32. With
#: chunks of at most 64 (balanced to 61 and 63, plus 31 for the 31-entry columns; padding
#: under 1 %) the state is 1.44 GB (measured with ``jax.eval_shape``); at most 32: 0.75 GB;
#: at most 128: 2.8 GB. Unchunked (``None``, blocks of ``d_in + 1`` up to 1001) it is 18.0 GB,
#: plus the temporaries of an inverse refresh (a stack-sized identity and Cholesky factor per
#: block size), which does not fit a 24 GB machine. Time grows with ``s`` as well: the
#: statistics cost ``N · P · s / 2`` multiply-adds per refresh (upper triangles only) and the
#: preconditioning ``P · s`` per step; 64 keeps both moderate.
DEFAULT_DENSE_BLOCK_SIZE = 64

#: Target number of floats of the per-chunk temporaries of the statistics einsums (about
#: 128 MB in float32) when ``batch_chunk=None``.
_CHUNK_BUDGET = 1 << 25


# --------------------------------------------------------------------------------------
# Mini-block partition of one layer.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerBlocking:
    """How one layer's gradient matrix ``V`` (``d_a × d_out``, bias last row) is cut into blocks.

    ``kind == "dense"`` (kernel ``(d_in, d_out)``): column ``j`` of ``V`` (the incoming weights
    of output unit ``j`` then its bias) is cut into ``n_chunks`` chunks of ``chunk`` entries
    (``n_chunks = ⌈d_a / dense_block_size⌉``, ``chunk = ⌈d_a / n_chunks⌉``, the last chunk of
    each column zero-padded to ``chunk``); blocks are ordered unit-major: block
    ``j·n_chunks + c`` is chunk ``c`` of unit ``j``. One segment ``(chunk, d_out·n_chunks)``.

    ``kind == "conv"`` (kernel ``(k_1, …, k_r, c_in, c_out)``): one block of
    ``spatial = k_1⋯k_r`` entries per (input channel, output channel) pair, ordered
    ``c_in``-major (block ``i·c_out + o``), then, with a bias, one ``1×1`` block per output
    channel. Segments ``(spatial, c_in·c_out)`` and ``(1, c_out)``.

    Attributes:
      kind: ``"dense"`` or ``"conv"``.
      d_in: ``prod(kernel.shape[:-1])``.
      d_out: ``kernel.shape[-1]``.
      has_bias: whether ``V`` has a bias row.
      chunk: dense block size after balancing (``d_a`` unchunked); for conv, ``spatial``.
      n_chunks: dense chunks per output unit (1 for conv).
      c_in: conv input channels (``d_in`` for dense).
    """

    kind: str
    d_in: int
    d_out: int
    has_bias: bool
    chunk: int
    n_chunks: int
    c_in: int

    @property
    def d_a(self) -> int:
        return self.d_in + int(self.has_bias)

    @property
    def padding(self) -> int:
        """Zero entries appended to each dense column (0 for conv)."""
        return self.n_chunks * self.chunk - self.d_a if self.kind == "dense" else 0

    @property
    def segments(self) -> tuple[tuple[int, int], ...]:
        """``((block size, number of blocks), ...)``."""
        if self.kind == "dense":
            return ((self.chunk, self.d_out * self.n_chunks),)
        segs = ((self.chunk, self.c_in * self.d_out),)
        return segs + ((1, self.d_out),) if self.has_bias else segs

    def blockify(self, v: jax.Array) -> list[jax.Array]:
        """``V (d_a, d_out)`` → one ``(count, size)`` array per segment (zero padding)."""
        if self.kind == "dense":
            v = jnp.pad(v, ((0, self.padding), (0, 0)))
            v = v.reshape(self.n_chunks, self.chunk, self.d_out).transpose(2, 0, 1)
            return [v.reshape(self.d_out * self.n_chunks, self.chunk)]
        k = v[: self.d_in].reshape(self.chunk, self.c_in, self.d_out).transpose(1, 2, 0)
        parts = [k.reshape(self.c_in * self.d_out, self.chunk)]
        if self.has_bias:
            parts.append(v[self.d_in :].reshape(self.d_out, 1))
        return parts

    def deblockify(self, parts: Sequence[jax.Array]) -> jax.Array:
        """Inverse of :meth:`blockify`; padded entries are dropped."""
        if self.kind == "dense":
            v = parts[0].reshape(self.d_out, self.n_chunks * self.chunk).T
            return v[: self.d_a]
        k = parts[0].reshape(self.c_in, self.d_out, self.chunk).transpose(2, 0, 1)
        k = k.reshape(self.d_in, self.d_out)
        if self.has_bias:
            k = jnp.concatenate([k, parts[1].reshape(1, self.d_out)], axis=0)
        return k

    def pad_mask(self, dtype: Any) -> list[jax.Array | None]:
        """Per segment, ``(count, size)`` ones at padded entries (``None`` where none)."""
        if self.kind != "dense" or self.padding == 0:
            return [None] * len(self.segments)
        pattern = np.zeros((self.n_chunks, self.chunk), np.float32)
        pattern.reshape(-1)[self.d_a :] = 1.0
        m = jnp.broadcast_to(jnp.asarray(pattern, dtype), (self.d_out, self.n_chunks, self.chunk))
        return [m.reshape(self.d_out * self.n_chunks, self.chunk)]


def layer_blocking(layer: kron.KronLayer, dense_block_size: int | None) -> LayerBlocking:
    """The :class:`LayerBlocking` of a layer: ``ndim(kernel) == 2`` is dense, ``>= 3`` conv."""
    shape = layer.kernel_shape
    if len(shape) == 2:
        d_a = layer.d_a
        size = d_a if dense_block_size is None else min(int(dense_block_size), d_a)
        n_chunks = -(-d_a // size)
        chunk = -(-d_a // n_chunks)
        return LayerBlocking("dense", layer.d_in, layer.d_out, layer.has_bias, chunk, n_chunks, layer.d_in)
    spatial = math.prod(shape[:-2])
    return LayerBlocking("conv", layer.d_in, layer.d_out, layer.has_bias, spatial, 1, shape[-2])


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Where every layer's blocks live in the per-size stacks.

    All blocks of size ``s``, of every layer, are stacked (layers in path order, then segment
    order) into one ``(n_s, s, s)`` array under the key ``"b{s}"``.

    Attributes:
      blockings: one :class:`LayerBlocking` per candidate layer (``ParamLayout.layers`` order).
      entries: ``{key: ((layer, segment, offset, count), ...)}``.
      sizes: ``{key: n_s}``.
      dims: ``{key: s}``.
    """

    blockings: tuple[LayerBlocking, ...]
    entries: Mapping[str, tuple[tuple[int, int, int, int], ...]]
    sizes: Mapping[str, int]
    dims: Mapping[str, int]

    @staticmethod
    def key(size: int) -> str:
        return f"b{size}"

    @classmethod
    def build(cls, param_layout: kron.ParamLayout, dense_block_size: int | None) -> BlockLayout:
        blockings = tuple(layer_blocking(layer, dense_block_size) for layer in param_layout.layers)
        entries: dict[str, list] = {}
        sizes: dict[str, int] = {}
        dims: dict[str, int] = {}
        for li, b in enumerate(blockings):
            for si, (size, count) in enumerate(b.segments):
                k = cls.key(size)
                entries.setdefault(k, []).append((li, si, sizes.get(k, 0), count))
                sizes[k] = sizes.get(k, 0) + count
                dims[k] = size
        return cls(blockings, {k: tuple(v) for k, v in entries.items()}, sizes, dims)

    def zeros(self, dtype: Any) -> dict[str, jax.Array]:
        return {k: jnp.zeros((n, self.dims[k], self.dims[k]), dtype) for k, n in self.sizes.items()}

    def eyes(self, dtype: Any) -> dict[str, jax.Array]:
        return {
            k: jnp.broadcast_to(jnp.eye(self.dims[k], dtype=dtype), (n, self.dims[k], self.dims[k]))
            for k, n in self.sizes.items()
        }

    def assemble(
        self, per_layer: Mapping[int, Sequence[jax.Array]], old: Mapping[str, jax.Array] | None, fill: Any
    ) -> dict[str, jax.Array]:
        """Stacks ``per_layer[layer][segment]`` into per-size arrays.

        Entries of layers absent from ``per_layer`` are taken from ``old`` (same layout) or,
        when ``old`` is ``None``, filled with ``fill(count, size)``.
        """
        out = {}
        for k, ents in self.entries.items():
            pieces = []
            for li, si, off, count in ents:
                if li in per_layer:
                    pieces.append(per_layer[li][si])
                elif old is not None:
                    pieces.append(old[k][off : off + count])
                else:
                    pieces.append(fill(count, self.dims[k]))
            out[k] = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=0)
        return out

    def split(self, stacks: Mapping[str, jax.Array], layers: Sequence[int]) -> dict[int, list[jax.Array]]:
        """Inverse of :meth:`assemble` for the given layers: ``{layer: [segment arrays]}``."""
        out = {li: [None] * len(self.blockings[li].segments) for li in layers}
        for k, ents in self.entries.items():
            for li, si, off, count in ents:
                if li in out:
                    out[li][si] = stacks[k][off : off + count]
        return out


# --------------------------------------------------------------------------------------
# Empirical Fisher blocks of one batch.
# --------------------------------------------------------------------------------------


def _batch_chunks(n: int, per_example: int, batch_chunk: int | None) -> int:
    if batch_chunk is None:
        batch_chunk = max(1, _CHUNK_BUDGET // max(1, per_example))
    return max(1, min(int(batch_chunk), n))


def _scan_over_batch(fn, arrays: Sequence[jax.Array], chunk: int, init: Any) -> Any:
    """``Σ_chunks fn(*chunk_arrays)``, the batch zero-padded to a multiple of ``chunk``.

    Zero examples contribute nothing to the sums computed here (every term is a product
    with an output gradient), so the padding is exact.
    """
    n = arrays[0].shape[0]
    n_chunks = -(-n // chunk)
    if n_chunks == 1:
        return fn(*arrays)
    pad = n_chunks * chunk - n
    padded = [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in arrays]
    stacked = [a.reshape((n_chunks, chunk) + a.shape[1:]) for a in padded]

    def body(acc, xs):
        return jax.tree.map(jnp.add, acc, fn(*xs)), None

    out, _ = lax.scan(body, init, stacked)
    return out


def batch_blocks(
    blocking: LayerBlocking, inputs: jax.Array, output_grads: jax.Array, dtype: Any, batch_chunk: int | None = None
) -> list[jax.Array]:
    r"""Batch empirical-Fisher blocks ``F̂_b = (1/N) Σ_n v_{n,b} v_{n,b}ᵀ`` of one layer.

    ``v_n = Σ_t ā_{n,t} g_{n,t}ᵀ`` is example ``n``'s gradient matrix (``d_a × d_out``; a
    dense layer on ``(N, d_in)`` statistics has one position), and ``v_{n,b}`` its entries in
    block ``b`` (:meth:`LayerBlocking.blockify`). Returns one ``(count, size, size)`` array per
    segment.

    Dense layers with ``(N, d_in)`` statistics use ``v_{n,(j,c)} = g_{n,j} ā_{n,c}``, so that
    ``F̂_{(j,c)} = (1/N) Σ_n g_{n,j}² ā_{n,c} ā_{n,c}ᵀ``: one matrix product
    ``(g²)ᵀ [ā_{n,c} ā_{n,c}ᵀ]_n`` of ``(d_out × N)`` by ``(N × n_chunks·chunk(chunk+1)/2)``
    (upper triangles only, then mirrored). Every other
    case forms the per-example gradients of a chunk of examples, blockifies them and contracts
    over the examples. Either way only ``batch_chunk`` examples are held at once (``None``: as
    many as fit in about 2²⁵ floats of temporaries).
    """
    x = kron.homogeneous_inputs(inputs, blocking.has_bias, dtype)
    g = jnp.asarray(output_grads).astype(dtype)
    n = x.shape[0]
    if blocking.kind == "dense" and x.ndim == 2:
        c, s = blocking.n_chunks, blocking.chunk
        x = jnp.pad(x, ((0, 0), (0, blocking.padding))).reshape(n, c, s)
        w = g * g
        rows, cols = np.triu_indices(s)  # blocks are symmetric: only the upper triangle
        tri = len(rows)
        chunk = _batch_chunks(n, c * tri + blocking.d_out, batch_chunk)

        full_index = np.zeros((s, s), np.int32)  # (i, k) -> position of (min, max) in the triangle
        full_index[rows, cols] = np.arange(tri)
        full_index[cols, rows] = np.arange(tri)

        def fn(w, x):
            outer = (x[:, :, rows] * x[:, :, cols]).reshape(x.shape[0], c * tri)
            outer = lax.optimization_barrier(outer)  # a plain matrix product, not a fused loop
            return w.T @ outer

        f = _scan_over_batch(fn, [w, x], chunk, jnp.zeros((blocking.d_out, c * tri), dtype))
        f = (f / n).reshape(blocking.d_out * c, tri)
        return [f[:, full_index]]
    if x.ndim == 2:  # conv-shaped kernel with dense statistics: one position
        x, g = x[:, None], g[:, None]
    per_example = blocking.d_a * blocking.d_out + x.shape[1] * (x.shape[2] + g.shape[2])
    chunk = _batch_chunks(n, per_example, batch_chunk)

    def fn(x, g):
        vn = jnp.einsum("ntk,nto->nko", x, g)
        parts = jax.vmap(blocking.blockify)(vn)
        return [jnp.einsum("nbi,nbj->bij", p, p) for p in parts]

    init = [jnp.zeros((count, size, size), dtype) for size, count in blocking.segments]
    return [f / n for f in _scan_over_batch(fn, [x, g], chunk, init)]


# --------------------------------------------------------------------------------------
# State.
# --------------------------------------------------------------------------------------


class MiniBlockFisherCurvature(NamedTuple):
    """MBF's curvature state; every field is an array or a dict of arrays.

    Blocks are stacked **per block size** (:class:`BlockLayout`): all ``s × s`` blocks of all
    layers live in one ``(n_s, s, s)`` array under the key ``"b{s}"`` (e.g. ``"b9"`` for the
    3×3 kernels of every convolution, ``"b1"`` for conv biases, ``"b63"`` for dense chunks).

    Attributes:
      stat_updates: ``(n_layers,)`` int32, statistics updates received per layer.
      blocks: ``{"b{s}": (n_s, s, s)}``, the EMA empirical-Fisher blocks (undamped), in the
        accumulation dtype (float32, or float64 for float64 kernels).
      inverses: ``{"b{s}": (n_s, s, s)}``, ``(F_b + λI)⁻¹`` as of the last refresh.
    """

    stat_updates: jax.Array
    blocks: dict[str, jax.Array]
    inverses: dict[str, jax.Array]


class ScaleByMiniBlockFisherState(NamedTuple):
    """State of :func:`scale_by_mini_block_fisher`.

    Attributes:
      count: ``()`` int32, number of updates so far.
      curvature: :class:`MiniBlockFisherCurvature`.
      fallback_state: :class:`sofim_optax._kronecker.FallbackState` of the transformation
        that handles the parameters no captured layer covers (by default
        :func:`scale_by_diagonal_fisher`).
    """

    count: jax.Array
    curvature: MiniBlockFisherCurvature
    fallback_state: kron.FallbackState


class DiagonalFisherState(NamedTuple):
    """State of :func:`scale_by_diagonal_fisher`: ``count`` and the EMA ``nu`` of squared gradients."""

    count: jax.Array
    nu: Any


class MomentumFirstState(NamedTuple):
    """State of :func:`mini_block_fisher`'s first stage: momentum, then the preconditioner."""

    momentum: Any
    inner: Any


# --------------------------------------------------------------------------------------
# The method.
# --------------------------------------------------------------------------------------


def _mbf_method(damping, ema, dense_block_size, inverse, batch_chunk) -> kron.KroneckerMethod:
    def layout_of(param_layout):
        return BlockLayout.build(param_layout, dense_block_size)

    def init(param_layout, dtype):
        bl = layout_of(param_layout)
        return MiniBlockFisherCurvature(
            stat_updates=jnp.zeros((len(param_layout.layers),), jnp.int32),
            blocks=bl.zeros(dtype),
            inverses=bl.eyes(dtype),
        )

    def update_statistics(curv, param_layout, stats, **extra):
        del extra
        bl = layout_of(param_layout)
        k = curv.stat_updates
        new = {}
        for i, st in stats.items():
            blocking = bl.blockings[i]
            old = bl.split(curv.blocks, [i])[i]
            dtype = old[0].dtype
            rho = kron.ema_decay(k[i] + 1, ema, dtype)
            fresh = batch_blocks(blocking, st.inputs, st.output_grads, dtype, batch_chunk)
            new[i] = [rho * o + (1 - rho) * f for o, f in zip(old, fresh)]
        active = jnp.asarray(sorted(stats), jnp.int32)
        return curv._replace(
            stat_updates=k.at[active].set(optax.safe_increment(k[active])),
            blocks=bl.assemble(new, curv.blocks, None),
        )

    def refresh(curv, param_layout, **extra):
        del extra
        bl = layout_of(param_layout)
        dtype = next(iter(curv.blocks.values())).dtype if curv.blocks else jnp.float32
        masks = {i: b.pad_mask(dtype) for i, b in enumerate(bl.blockings) if b.padding}
        pads = bl.assemble(
            {i: [jnp.zeros((c, s), dtype) if m is None else m for m, (s, c) in zip(ms, bl.blockings[i].segments)]
             for i, ms in masks.items()},
            None,
            lambda count, size: jnp.zeros((count, size), dtype),
        ) if masks else None
        lam = jnp.maximum(jnp.asarray(damping).astype(dtype), linalg.DAMPING_FLOOR)

        def inv(k, f):
            if pads is not None and any(e[0] in masks for e in bl.entries[k]):
                # decouple padded coordinates: identity on their diagonal
                f = f + pads[k][:, :, None] * jnp.eye(f.shape[-1], dtype=f.dtype)
            shifts = jnp.full((f.shape[0],), lam, f.dtype)
            return kron.stacked_damped_inverse(f, shifts, inverse)

        return curv._replace(inverses={k: inv(k, f) for k, f in curv.blocks.items()})

    def precondition(curv, param_layout, grads, **extra):
        del extra
        bl = layout_of(param_layout)
        dtype = next(iter(grads.values())).dtype
        parts = {i: bl.blockings[i].blockify(v) for i, v in grads.items()}
        vecs = bl.assemble(parts, None, lambda count, size: jnp.zeros((count, size), dtype))
        out_stacks = {k: jnp.einsum("bij,bj->bi", curv.inverses[k], v) for k, v in vecs.items()}
        split = bl.split(out_stacks, list(grads))
        return {i: bl.blockings[i].deblockify(split[i]) for i in grads}, curv

    return kron.KroneckerMethod(init, update_statistics, refresh, precondition)


# --------------------------------------------------------------------------------------
# Diagonal fallback.
# --------------------------------------------------------------------------------------


def scale_by_diagonal_fisher(
    damping: Any = 1e-3, ema: Any = 0.9, stats_period: Any = 1
) -> optax.GradientTransformationExtraArgs:
    r"""Diagonal (1×1-block) preconditioner from squared minibatch gradients.

    .. math::

        \nu \leftarrow \rho\,\nu + (1-\rho)\,\bar g \odot \bar g,\qquad
        \Delta = v \oslash (\nu + \lambda),\qquad \rho = \min(1 - 1/k,\ \text{ema}),

    where ``ḡ`` is the minibatch gradient (the keyword argument ``gradients=`` of ``update``,
    a tree containing the same leaf paths; by default the incoming ``updates``), ``v`` the
    incoming ``updates`` (in :func:`mini_block_fisher`, the momentum), ``k`` the number of
    statistics updates so far (one every ``stats_period`` steps, at ``count = 0`` first). The
    reciprocal is recomputed every step (it is element-wise and costs nothing).

    This is MBF's default for the parameters that no captured layer covers (norm scales,
    embeddings, parameters of uncaptured layers). The exact EF diagonal would be
    ``mean_n g_{n,i}²``, but per-example gradients exist only for captured layers; ``ḡ²`` is
    its lower bound (Jensen), smaller by up to the batch size when the gradient noise
    dominates, so on these parameters the damping usually dominates and the step is close to
    ``v / λ``.
    """

    def init_fn(params):
        nu = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.promote_types(jnp.asarray(p).dtype, jnp.float32)), params)
        return DiagonalFisherState(count=jnp.zeros([], jnp.int32), nu=nu)

    def update_fn(updates, state, params=None, *, gradients=None, **extra):
        del params, extra
        raw = updates
        if gradients is not None:
            by_path = dict(zip(kron.discover_layers(gradients).leaf_paths, jax.tree.leaves(gradients)))
            flat = kron.discover_layers(updates).leaf_paths
            try:
                raw = jax.tree.unflatten(jax.tree.structure(updates), [by_path[p] for p in flat])
            except KeyError as err:
                raise ValueError(
                    f"scale_by_diagonal_fisher: `gradients` has no leaf at path {err.args[0]!r}"
                ) from None
        count = state.count

        def new_nu(nu):
            def one(n, g):
                rho = kron.ema_decay(count // stats_period + 1, ema, n.dtype)
                return rho * n + (1 - rho) * jnp.square(jnp.asarray(g).astype(n.dtype))

            return jax.tree.map(one, nu, raw)

        if isinstance(stats_period, int) and stats_period == 1:
            nu = new_nu(state.nu)
        else:
            nu = lax.cond(count % stats_period == 0, new_nu, lambda n: n, state.nu)
        def apply(u, n):
            lam = jnp.maximum(jnp.asarray(damping).astype(n.dtype), linalg.DAMPING_FLOOR)
            return (jnp.asarray(u).astype(n.dtype) / (n + lam)).astype(jnp.asarray(u).dtype)

        out = jax.tree.map(apply, updates, nu)
        return out, DiagonalFisherState(count=optax.safe_increment(count), nu=nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------
# Public transformations.
# --------------------------------------------------------------------------------------


def scale_by_mini_block_fisher(
    damping: Any = 1e-2,
    ema: Any = 0.9,
    stats_period: Any = 1,
    inverse_period: Any = 20,
    dense_block_size: int | str | None = "auto",
    inverse: str = "cholesky",
    batch_chunk: int | None = None,
    fallback: Any = "diagonal",
) -> optax.GradientTransformationExtraArgs:
    r"""Precondition each captured layer's gradient by its damped mini-block empirical Fisher.

    For a captured layer with gradient matrix ``V = [∇kernel.reshape(-1, d_out); ∇bias]``
    (``d_a × d_out``) the parameters are partitioned into **mini-blocks** ``b``:

    * convolution, kernel ``(k_1, …, k_r, c_in, c_out)``: one block of the ``k = k_1⋯k_r``
      kernel weights of each (input channel, output channel) pair, ``c_in·c_out`` blocks of
      ``k × k`` (9×9 for 3×3 kernels), plus one ``1×1`` block per bias entry;
    * dense, kernel ``(d_in, d_out)``: for each output unit ``j`` the column ``V[:, j]`` (its
      ``d_in`` incoming weights followed by its bias), cut into ``⌈d_a/B⌉`` chunks of equal size
      ``≤ B = dense_block_size`` (the last one zero-padded; ``B = None``: one block of ``d_a``
      per unit).

    With ``v_n = Σ_t ā_{n,t} g_{n,t}ᵀ`` the gradient matrix of example ``n``'s loss (``ā`` the
    input or conv patch with a 1 appended for the bias, ``g`` = ``LayerStats.output_grads``,
    the per-example-loss gradient of the layer output, ``t`` over conv positions), each
    block's **empirical Fisher** and its EMA are

    .. math::

        \hat F_b = \frac1N \sum_n v_{n,b} v_{n,b}^\top,\qquad
        F_b \leftarrow \rho F_b + (1-\rho) \hat F_b,\qquad \rho = \min(1 - 1/k,\ \text{ema}),

    (``k`` counting the layer's statistics updates; for a dense block
    ``F̂_{(j,c)} = mean_n g_{n,j}² ā_{n,c} ā_{n,c}ᵀ``), computed by einsums over chunks of the
    batch without materialising all per-example gradients at once
    (:func:`batch_blocks`). The update returned (no learning rate, no sign) is

    .. math::

        \Delta_b = (F_b + \lambda I)^{-1} u_b

    for the incoming vector ``u`` (the gradient, or in :func:`mini_block_fisher` its momentum).
    Every parameter not covered by a captured layer goes to ``fallback``, by default
    :func:`scale_by_diagonal_fisher` (``1×1`` blocks ``u_i / (ν_i + λ)``, ``ν`` an EMA of the
    squared minibatch gradient, because per-example gradients are not captured for them).

    Blocks of the same size (across layers) are stacked (:class:`MiniBlockFisherCurvature`);
    the damped inverses are refreshed in one batched call per size
    (:func:`sofim_optax._kronecker.stacked_damped_inverse`: a ``vmap``-ed Cholesky by default,
    ``lax.map``-ped one block at a time on CPU with jaxlib < 0.11 to avoid a LAPACK deadlock;
    a breakdown falls back to the eigendecomposition, so nothing turns NaN), the sizes one
    after another, and applied as one batched matrix-vector product per size.

    Schedule: on update ``count`` (0-based) the statistics are refreshed when ``count %
    stats_period == 0``, then the inverses when ``count % inverse_period == 0`` (both at
    ``count = 0``), under ``lax.cond``.

    Departures and choices (the paper's body could not be checked, see
    ``research/sofim_mbf.md`` §2.3): the conv blocks (one per channel pair) and dense blocks
    (one per output unit with its bias) are the notes' most plausible reading; chunking the
    dense blocks is ours, so that the 784-1000-… autoencoder fits in memory (see
    :data:`DEFAULT_DENSE_BLOCK_SIZE` for the arithmetic); conv biases get exact 1×1 EF blocks
    (their per-example gradient is ``Σ_t g_{n,t}``); other parameters use squared minibatch
    gradients; damping is Tikhonov ``λI`` on every block.

    Args:
      damping: ``λ`` (default ``1e-2``), added to every block; floored at
        ``linalg.DAMPING_FLOOR``. On Fashion-MNIST with ``SmallCNN`` (mean cross-entropy,
        batch 128) ``1e-3`` diverged at learning rates 0.003 and 0.01 and ``1e-2`` trained
        (``experiments/benchmark_mbf.py``). On the EF's scale: a loss summed over many outputs (the
        autoencoder's 784 pixels) has a much larger EF than a mean cross-entropy and wants a
        larger ``λ``. Baked into the inverses: a change takes effect at the next refresh.
      ema: upper bound of the EMA decay of the blocks (default ``0.9``, the authors' group's
        value in their TNT code).
      stats_period: refresh the statistics every this many updates (default ``1``; pass
        ``layer_stats`` on every update anyway, its keys select the preconditioned layers).
      inverse_period: refresh the inverses every this many updates (default ``20``).
      dense_block_size: maximum dense block size ``B``; ``"auto"`` (default) is
        :data:`DEFAULT_DENSE_BLOCK_SIZE` ``= 64`` (a string default, so that
        ``optax.inject_hyperparams`` does not turn this structural integer into an array);
        ``None`` for whole columns (``d_in + 1`` entries: ``d_in + 1`` floats per parameter,
        twice). An explicit int under ``inject_hyperparams`` must be listed in its
        ``static_args`` (as must ``batch_chunk``).
      inverse: ``"cholesky"`` (default), ``"eigh"`` or ``"inv"``, the batched inverse.
      batch_chunk: examples per chunk of the statistics einsums (default ``None``: as many as
        keep the temporaries near 2²⁵ floats).
      fallback: transformation for the parameters no captured layer covers: ``"diagonal"``
        (default) for :func:`scale_by_diagonal_fisher` with the same ``damping``, ``ema`` and
        ``stats_period``; ``None`` for the identity; or any optax transformation.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state, params=None,
      *, layer_stats, gradients=None)`` requires ``layer_stats`` (``dict[str, LayerStats]``,
      e.g. from ``sofim_optax.curvature.linen.value_grad_and_stats``); ``gradients`` (the raw
      minibatch gradient, when ``updates`` is something else such as a momentum) feeds the
      diagonal fallback. Errors about the statistics are raised at trace time and name the
      layer. Updates come back in each leaf's dtype; statistics and inverses are float32
      (float64 for float64 kernels).

    References:
      Bahamou, Goldfarb & Ren, `A Mini-Block Fisher Method for Deep Neural Networks
      <https://arxiv.org/abs/2202.04124>`_, AISTATS 2023.
    """
    if inverse not in _INVERSES:
        raise ValueError(f"scale_by_mini_block_fisher: inverse must be one of {_INVERSES}, got {inverse!r}")
    if isinstance(ema, (int, float)) and not 0.0 <= ema < 1.0:
        raise ValueError(f"scale_by_mini_block_fisher: ema must be in [0, 1), got {ema!r}")
    if isinstance(damping, (int, float)) and damping < 0:
        raise ValueError(f"scale_by_mini_block_fisher: damping must be >= 0, got {damping!r}")
    for arg, value in (("dense_block_size", dense_block_size), ("batch_chunk", batch_chunk)):
        if isinstance(value, (jax.Array, np.ndarray)):
            raise ValueError(
                f"scale_by_mini_block_fisher: {arg} fixes the shapes of the state and must be a Python int "
                f"(or None), got an array. Under optax.inject_hyperparams, list it in static_args, e.g. "
                f"optax.inject_hyperparams(mbf, static_args=({arg!r},))(...)."
            )
    if isinstance(dense_block_size, str):
        if dense_block_size != "auto":
            raise ValueError(
                f'scale_by_mini_block_fisher: dense_block_size must be a positive int, None or "auto", got {dense_block_size!r}'
            )
        dense_block_size = DEFAULT_DENSE_BLOCK_SIZE
    if dense_block_size is not None and (
        isinstance(dense_block_size, bool) or not isinstance(dense_block_size, (int, np.integer)) or dense_block_size < 1
    ):
        raise ValueError(
            f"scale_by_mini_block_fisher: dense_block_size must be a positive int or None, got {dense_block_size!r}"
        )
    if batch_chunk is not None and (not isinstance(batch_chunk, (int, np.integer)) or batch_chunk < 1):
        raise ValueError(f"scale_by_mini_block_fisher: batch_chunk must be a positive int or None, got {batch_chunk!r}")
    if isinstance(fallback, str):
        if fallback != "diagonal":
            raise ValueError(f'scale_by_mini_block_fisher: fallback must be "diagonal", None or a transformation, got {fallback!r}')
        fallback = scale_by_diagonal_fisher(damping=damping, ema=ema, stats_period=stats_period)
    return kron.kronecker_transformation(
        name="scale_by_mini_block_fisher",
        method=_mbf_method(damping, ema, dense_block_size, inverse, batch_chunk),
        state_cls=ScaleByMiniBlockFisherState,
        stats_period=stats_period,
        inverse_period=inverse_period,
        fallback=fallback,
    )


def _momentum_first(
    inner: optax.GradientTransformationExtraArgs, momentum: Any, nesterov: bool
) -> optax.GradientTransformationExtraArgs:
    """``m ← g + μ m`` (``optax.trace``), then ``inner`` on ``m`` with ``gradients=g``."""
    tr = optax.trace(decay=momentum, nesterov=nesterov)

    def init_fn(params):
        return MomentumFirstState(momentum=tr.init(params), inner=inner.init(params))

    def update_fn(updates, state, params=None, **extra):
        m, ts = tr.update(updates, state.momentum, params)
        out, inner_state = inner.update(m, state.inner, params, gradients=updates, **extra)
        return out, MomentumFirstState(momentum=ts, inner=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def mini_block_fisher(
    learning_rate: optax.ScalarOrSchedule,
    momentum: Any = 0.9,
    damping: Any = 1e-2,
    weight_decay: Any = 0.0,
    ema: Any = 0.9,
    stats_period: Any = 1,
    inverse_period: Any = 20,
    dense_block_size: int | str | None = "auto",
    inverse: str = "cholesky",
    batch_chunk: int | None = None,
    fallback: Any = "diagonal",
    nesterov: bool = False,
    weight_decay_mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Mini-Block Fisher with momentum on the gradient, then preconditioning (the authors' order).

    .. math::

        m_t &= g_t + \mu\, m_{t-1}\\
        \Delta_t &= (F_b + \lambda I)^{-1} m_{t,b}
            \quad\text{per mini-block } b\ (\texttt{scale\_by\_mini\_block\_fisher})\\
        w_{t+1} &= w_t - \eta_t\,(\Delta_t + \text{weight\_decay}\cdot w_t)

    i.e. ``trace(momentum)`` → :func:`scale_by_mini_block_fisher` (which also receives the raw
    gradient as ``gradients=``, for its diagonal fallback's statistics) →
    ``add_decayed_weights(weight_decay)`` → ``scale_by_learning_rate``. Momentum before the
    preconditioner with dampening 0, and weight decay decoupled and scaled by the learning
    rate, follow the public code of the authors' group (TNT, Ren & Goldfarb 2021); MBF's own
    values are not known (``research/sofim_mbf.md`` §2.4).

    Args:
      learning_rate: ``η``, a float or an optax schedule.
      momentum: ``μ`` (default ``0.9``); ``None`` for no momentum.
      damping, ema, stats_period, inverse_period, dense_block_size, inverse, batch_chunk,
        fallback: see :func:`scale_by_mini_block_fisher`.
      weight_decay: decoupled weight decay (default ``0.0``).
      nesterov: Nesterov momentum (default ``False``).
      weight_decay_mask: optional mask for ``add_decayed_weights``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; pass ``layer_stats=`` to its ``update``.

    References:
      Bahamou, Goldfarb & Ren, `A Mini-Block Fisher Method for Deep Neural Networks
      <https://arxiv.org/abs/2202.04124>`_, AISTATS 2023.
    """
    inner = scale_by_mini_block_fisher(
        damping=damping,
        ema=ema,
        stats_period=stats_period,
        inverse_period=inverse_period,
        dense_block_size=dense_block_size,
        inverse=inverse,
        batch_chunk=batch_chunk,
        fallback=fallback,
    )
    first = inner if momentum is None else _momentum_first(inner, momentum, nesterov)
    return optax.chain(
        first,
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )


#: Short alias of :func:`mini_block_fisher`.
mbf = mini_block_fisher
