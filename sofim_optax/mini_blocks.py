"""The mini-block partition of a layer and the empirical Fisher blocks of one batch.

Used by :mod:`sofim_optax.mini_block_fisher`. A layer's gradient matrix ``V`` (``d_a × d_out``,
bias last row) is cut into many small blocks (:class:`LayerBlocking`): one block per output
unit of a dense layer (its incoming weights and bias, optionally cut into chunks of at most
``dense_block_size`` entries) and one ``k×k`` block per (input channel, output channel) pair
of a convolution. Blocks of every layer are stacked by size (:class:`BlockLayout`), and
:func:`batch_blocks` computes a batch's blocks ``mean_n v_n v_nᵀ`` from ``LayerStats`` without
materialising the per-example gradients of the whole batch. The symmetric blocks are kept
**packed**: the ``s(s+1)/2`` entries of each upper triangle, row by row (``numpy.triu_indices``
order); :func:`unpack` makes the square blocks that a refresh decomposes.

The structure is our reading of the paper's "a large number of mini-blocks of modest size"
for both layer kinds (the paper gives no exact partition for dense layers), with the dense
blocks chunked so that the 1000-wide layers of the deep autoencoder fit in memory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sofim_optax import layerwise

__all__ = [
    "DEFAULT_DENSE_BLOCK_SIZE",
    "LayerBlocking",
    "BlockLayout",
    "layer_blocking",
    "batch_blocks",
    "packed_size",
    "pack",
    "packed_outer",
    "unpack",
]

#: Default ``dense_block_size``. Memory arithmetic for the deep autoencoder
#: 784-1000-500-250-30-250-500-1000-784 (P = 2 837 314 weights and biases, all dense): a block
#: of size ``s`` stores ``s(s+1)/2`` floats of packed EMA statistics and ``s²`` of inverse (or,
#: with ``inverse="eigh"``, eigenvectors plus ``s`` eigenvalues), i.e. about ``4 B · 1.5 s``
#: per parameter in float32. With chunks of at most 32 (the default; balanced to 31 and 32,
#: padding under 1 %) the state is 0.57 GB (measured with ``jax.eval_shape``); at most 64:
#: 1.09 GB; at most 128: about 2.1 GB. Unchunked (``None``, blocks of ``d_in + 1`` up to
#: 1001) it is about 13.5 GB, plus the temporaries of an inverse refresh (a stack-sized
#: identity and Cholesky factor per block size), which does not fit a 24 GB machine. Time
#: grows with ``s`` as well: the statistics cost ``N · P · s / 2`` multiply-adds per refresh
#: (upper triangles only) and the preconditioning ``P · s`` per step, and the preconditioning
#: reads the ``P · s`` floats of the inverses at every step, so that on a CPU it is bound by
#: memory: 32 instead of 64 took the autoencoder's step (statistics every 50, inverses every
#: 100) from 2.55× to 2.03× SGD-m's and the small CNN's from 3.95× to 3.23×
#: (docs/benchmarks.md).
DEFAULT_DENSE_BLOCK_SIZE = 32

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

    ``kind == "rows"`` (an embedding table ``(V, D)``, no bias): row ``v`` of ``V`` (the vector
    of token ``v``) is cut into ``n_chunks`` chunks of ``chunk`` entries
    (``n_chunks = ⌈D / dense_block_size⌉``), the last zero-padded; block ``v·n_chunks + c``
    is chunk ``c`` of row ``v``. One segment ``(chunk, V·n_chunks)``. A token's gradient is the
    sum of the output gradients at its positions, so the rows are the natural blocks (the
    dense rule's per-output-unit blocks would mix tokens that rarely meet).

    ``kind == "conv"`` (kernel ``(k_1, …, k_r, c_in, c_out)``): one block of
    ``spatial = k_1⋯k_r`` entries per (input channel, output channel) pair, ordered
    ``c_in``-major (block ``i·c_out + o``), then, with a bias, one ``1×1`` block per output
    channel. Segments ``(spatial, c_in·c_out)`` and ``(1, c_out)``.

    Attributes:
      kind: ``"dense"``, ``"rows"`` or ``"conv"``.
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
        if self.kind == "rows":
            return self.n_chunks * self.chunk - self.d_out
        return self.n_chunks * self.chunk - self.d_a if self.kind == "dense" else 0

    @property
    def segments(self) -> tuple[tuple[int, int], ...]:
        """``((block size, number of blocks), ...)``."""
        if self.kind == "dense":
            return ((self.chunk, self.d_out * self.n_chunks),)
        if self.kind == "rows":
            return ((self.chunk, self.d_in * self.n_chunks),)
        segs = ((self.chunk, self.c_in * self.d_out),)
        return segs + ((1, self.d_out),) if self.has_bias else segs

    def blockify(self, v: jax.Array) -> list[jax.Array]:
        """``V (d_a, d_out)`` → one ``(count, size)`` array per segment (zero padding)."""
        if self.kind == "dense":
            v = jnp.pad(v, ((0, self.padding), (0, 0)))
            v = v.reshape(self.n_chunks, self.chunk, self.d_out).transpose(2, 0, 1)
            return [v.reshape(self.d_out * self.n_chunks, self.chunk)]
        if self.kind == "rows":
            v = jnp.pad(v, ((0, 0), (0, self.padding)))
            return [v.reshape(self.d_in * self.n_chunks, self.chunk)]
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
        if self.kind == "rows":
            return parts[0].reshape(self.d_in, self.n_chunks * self.chunk)[:, : self.d_out]
        k = parts[0].reshape(self.c_in, self.d_out, self.chunk).transpose(2, 0, 1)
        k = k.reshape(self.d_in, self.d_out)
        if self.has_bias:
            k = jnp.concatenate([k, parts[1].reshape(1, self.d_out)], axis=0)
        return k

    def pad_mask(self, dtype: Any) -> list[jax.Array | None]:
        """Per segment, ``(count, size)`` ones at padded entries (``None`` where none)."""
        if self.kind == "conv" or self.padding == 0:
            return [None] * len(self.segments)
        if self.kind == "rows":
            pattern = np.zeros((self.n_chunks * self.chunk,), np.float32)
            pattern[self.d_out :] = 1.0
            m = jnp.broadcast_to(jnp.asarray(pattern, dtype), (self.d_in, pattern.size))
            return [m.reshape(self.d_in * self.n_chunks, self.chunk)]
        pattern = np.zeros((self.n_chunks, self.chunk), np.float32)
        pattern.reshape(-1)[self.d_a :] = 1.0
        m = jnp.broadcast_to(jnp.asarray(pattern, dtype), (self.d_out, self.n_chunks, self.chunk))
        return [m.reshape(self.d_out * self.n_chunks, self.chunk)]


def layer_blocking(layer: layerwise.Layer, dense_block_size: int | None) -> LayerBlocking:
    """The :class:`LayerBlocking` of a layer, by its :attr:`~sofim_optax.layerwise.Layer.kind`:
    an embedding table has row blocks, a dense layer (2-D kernel, or a general dense map such
    as a ``DenseGeneral``, whose input and output axes are flattened) has dense blocks, any
    other kernel conv blocks."""
    shape = layer.kernel_shape
    if layer.embedding:
        d = layer.d_out
        size = d if dense_block_size is None else min(int(dense_block_size), d)
        n_chunks = -(-d // size)
        return LayerBlocking("rows", layer.d_in, d, False, -(-d // n_chunks), n_chunks, layer.d_in)
    if layer.kind == "dense":
        d_a = layer.d_a
        size = d_a if dense_block_size is None else min(int(dense_block_size), d_a)
        n_chunks = -(-d_a // size)
        chunk = -(-d_a // n_chunks)
        return LayerBlocking(
            "dense", layer.d_in, layer.d_out, layer.has_bias, chunk, n_chunks, layer.d_in
        )
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
    def build(
        cls, param_layout: layerwise.ParamLayout, dense_block_size: int | None
    ) -> BlockLayout:
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

    def packed_zeros(self, dtype: Any) -> dict[str, jax.Array]:
        """``{key: zeros (n_s, s(s+1)/2)}``: empty stacks of packed blocks (:func:`pack`)."""
        return {k: jnp.zeros((n, packed_size(self.dims[k])), dtype) for k, n in self.sizes.items()}

    def eyes(self, dtype: Any) -> dict[str, jax.Array]:
        return layerwise.stack_eyes(self.sizes, self.dims, dtype)

    def vectors(self, dtype: Any) -> dict[str, jax.Array]:
        """``{key: zeros (n_s, s)}``: one vector per block (e.g. eigenvalues)."""
        return {k: jnp.zeros((n, self.dims[k]), dtype) for k, n in self.sizes.items()}

    def assemble(
        self,
        per_layer: Mapping[int, Sequence[jax.Array]],
        old: Mapping[str, jax.Array] | None,
        fill: Any,
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

    def update_in_place(
        self,
        stacks: Mapping[str, jax.Array],
        layers: Sequence[int],
        fn: Callable[[int, int, jax.Array], jax.Array],
    ) -> dict[str, jax.Array]:
        """``stacks`` with segment ``s`` of each layer ``i`` in ``layers`` replaced by
        ``fn(i, s, old_segment)`` (same shape), the rest untouched.

        Written as one ``dynamic_update_slice`` per segment, which XLA performs in place with
        ``fn`` fused into it: unlike :meth:`assemble` it does not copy the whole stack.
        """
        out = dict(stacks)
        for k, ents in self.entries.items():
            for li, si, off, count in ents:
                if li in layers:
                    # Read from `out[k]`, the chain of updates (its other rows are unchanged),
                    # not from `stacks[k]`: keeping the original alive would force a copy.
                    old = lax.slice_in_dim(out[k], off, off + count)
                    out[k] = lax.dynamic_update_slice_in_dim(out[k], fn(li, si, old), off, 0)
        return out

    def split(
        self, stacks: Mapping[str, jax.Array], layers: Sequence[int]
    ) -> dict[int, list[jax.Array]]:
        """Inverse of :meth:`assemble` for the given layers: ``{layer: [segment arrays]}``."""
        out = {li: [None] * len(self.blockings[li].segments) for li in layers}
        for k, ents in self.entries.items():
            for li, si, off, count in ents:
                if li in out:
                    out[li][si] = stacks[k][off : off + count]
        return out


# --------------------------------------------------------------------------------------
# Packed symmetric blocks.
# --------------------------------------------------------------------------------------


def packed_size(size: int) -> int:
    """Entries of a packed ``size × size`` symmetric block: ``size (size + 1) / 2``."""
    return size * (size + 1) // 2


def pack(blocks: jax.Array) -> jax.Array:
    """``(n, s, s)`` symmetric blocks → ``(n, s(s+1)/2)``: each upper triangle, row by row."""
    # Static slices joined, not a gather: XLA's CPU code runs gathers slowly.
    size = blocks.shape[-1]
    return jnp.concatenate([blocks[:, r, r:] for r in range(size)], axis=-1)


def packed_outer(x: jax.Array) -> jax.Array:
    """``x x ᵀ`` packed (:func:`pack`) for every vector of ``x`` (``(..., s)`` →
    ``(..., s(s+1)/2)``), without forming the lower triangle."""
    size = x.shape[-1]
    return jnp.concatenate([x[..., r : r + 1] * x[..., r:] for r in range(size)], axis=-1)


def unpack(packed: jax.Array, size: int) -> jax.Array:
    """Inverse of :func:`pack`: ``(n, s(s+1)/2)`` → the symmetric ``(n, s, s)`` blocks."""
    rows, cols = np.triu_indices(size)
    position = np.zeros((size, size), np.int32)  # (i, k) -> where (min, max) is packed
    position[rows, cols] = np.arange(len(rows))
    position[cols, rows] = np.arange(len(rows))
    return packed[:, position]


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
    blocking: LayerBlocking,
    inputs: jax.Array,
    output_grads: jax.Array,
    dtype: Any,
    batch_chunk: int | None = None,
) -> list[jax.Array]:
    r"""Batch empirical-Fisher blocks ``F̂_b = (1/N) Σ_n v_{n,b} v_{n,b}ᵀ`` of one layer.

    ``v_n = Σ_t ā_{n,t} g_{n,t}ᵀ`` is example ``n``'s gradient matrix (``d_a × d_out``; a
    dense layer on ``(N, d_in)`` statistics has one position), and ``v_{n,b}`` its entries in
    block ``b`` (:meth:`LayerBlocking.blockify`). Returns one ``(count, size (size + 1) / 2)``
    array of packed blocks (:func:`pack`) per segment.

    Dense layers with ``(N, d_in)`` statistics use ``v_{n,(j,c)} = g_{n,j} ā_{n,c}``, so that
    ``F̂_{(j,c)} = (1/N) Σ_n g_{n,j}² ā_{n,c} ā_{n,c}ᵀ``: one matrix product
    ``(g²)ᵀ [ā_{n,c} ā_{n,c}ᵀ]_n`` of ``(d_out × N)`` by ``(N × n_chunks·chunk(chunk+1)/2)``
    (upper triangles only, which is what is kept). Every other
    case forms the per-example gradients of a chunk of examples, blockifies them and contracts
    over the examples. Either way only ``batch_chunk`` examples are held at once (``None``: as
    many as fit in about 2²⁵ floats of temporaries).
    """
    x = layerwise.homogeneous_inputs(inputs, blocking.has_bias, dtype)
    g = jnp.asarray(output_grads).astype(dtype)
    n = x.shape[0]
    if blocking.kind == "dense" and x.ndim == 2:
        c, s = blocking.n_chunks, blocking.chunk
        x = jnp.pad(x, ((0, 0), (0, blocking.padding))).reshape(n, c, s)
        w = g * g
        tri = packed_size(s)  # blocks are symmetric: only the upper triangle
        chunk = _batch_chunks(n, c * tri + blocking.d_out, batch_chunk)

        def fn(w, x):
            outer = packed_outer(x).reshape(x.shape[0], c * tri)
            outer = lax.optimization_barrier(outer)  # a plain matrix product, not a fused loop
            return w.T @ outer

        f = _scan_over_batch(fn, [w, x], chunk, jnp.zeros((blocking.d_out, c * tri), dtype))
        return [(f / n).reshape(blocking.d_out * c, tri)]
    if x.ndim == 2:  # conv-shaped kernel with dense statistics: one position
        x, g = x[:, None], g[:, None]
    per_example = blocking.d_a * blocking.d_out + x.shape[1] * (x.shape[2] + g.shape[2])
    chunk = _batch_chunks(n, per_example, batch_chunk)

    def fn(x, g):
        vn = jnp.einsum("ntk,nto->nko", x, g)
        parts = jax.vmap(blocking.blockify)(vn)
        return [pack(jnp.einsum("nbi,nbj->bij", p, p)) for p in parts]

    init = [jnp.zeros((count, packed_size(size)), dtype) for size, count in blocking.segments]
    return [f / n for f in _scan_over_batch(fn, [x, g], chunk, init)]
