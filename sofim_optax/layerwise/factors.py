"""Second moments of a layer's statistics and the stacks that hold them.

* :func:`input_factor`, :func:`output_factor`, :func:`homogeneous_inputs`: ``A = mean ā āᵀ``
  (bias coordinate 1 appended last) and ``G = mean g gᵀ``, with KFC's scaling for
  convolutions (Grosse & Martens 2016).
* :func:`ema_decay`: the warm-up rule ``ρ_k = min(1 − 1/k, ema)`` of every statistics EMA.
* :class:`FactorLayout`: all factors of the same dimension, whatever their layer and role,
  live in one ``(n, d, d)`` array, so that an eigendecomposition or an inverse is one
  ``vmap``-ed call per distinct dimension.
* :func:`stacked_damped_inverses` / :func:`stacked_damped_inverse`: damped inverses of
  stacks, never NaN.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from sofim_optax import distributed, guards, linalg
from sofim_optax.layerwise.layers import Layer

__all__ = [
    "homogeneous_inputs",
    "input_factor",
    "output_factor",
    "ema_decay",
    "FactorLayout",
    "stack_zeros",
    "stack_eyes",
    "stacked_damped_inverse",
    "stacked_damped_inverses",
    "block_split",
]


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


def stack_zeros(sizes: Mapping[str, int], dims: Mapping[str, int], dtype: Any) -> dict:
    """``{key: zeros (sizes[key], dims[key], dims[key])}``: empty stacks of square blocks."""
    return {k: jnp.zeros((n, dims[k], dims[k]), dtype) for k, n in sizes.items()}


def stack_eyes(sizes: Mapping[str, int], dims: Mapping[str, int], dtype: Any) -> dict:
    """``{key: identities (sizes[key], dims[key], dims[key])}``."""
    return {
        k: jnp.broadcast_to(jnp.eye(dims[k], dtype=dtype), (n, dims[k], dims[k]))
        for k, n in sizes.items()
    }


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

    A factor larger than ``max_dim`` (see :meth:`build`) is kept **block-diagonal**: its
    dimension ``d`` is cut into ``c = ⌈d / max_dim⌉`` consecutive blocks of ``b = ⌈d / c⌉``
    coordinates (the last block zero-padded to ``b``), which take ``c`` consecutive positions
    of the stack ``"d{b}"``. :meth:`get` then returns the ``(c, b, b)`` blocks, and :meth:`set`
    takes them.

    Attributes:
      roles: the role names.
      slots: ``slots[layer][role] = (key, position)`` (of the first block).
      sizes: ``{key: n_d}``.
      dims: ``{key: d}``.
      counts: ``counts[layer][role]``, the number of blocks (1 for a whole factor).
    """

    roles: tuple[str, ...]
    slots: tuple[tuple[tuple[str, int], ...], ...]
    sizes: Mapping[str, int]
    dims: Mapping[str, int]
    counts: tuple[tuple[int, ...], ...] = ()

    @staticmethod
    def key(dim: int) -> str:
        """The key ``"d{dim}"`` of the stack of ``dim × dim`` factors."""
        return f"d{dim}"

    @classmethod
    def build(
        cls,
        layers: Sequence[Layer],
        roles: Sequence[str] = ("A", "G"),
        role_dim: Callable[[Layer, str], int] | None = None,
        max_dim: int | None | Callable[[Layer, str], int | None] = None,
    ) -> FactorLayout:
        """Layout for ``layers``; ``role_dim(layer, role)`` defaults to ``d_a`` for roles
        starting with ``"A"`` and ``d_g`` otherwise; factors larger than ``max_dim`` (default
        ``None``: no limit; or a function ``max_dim(layer, role)``, e.g. ``1`` for a factor
        known to be diagonal) are block-diagonal (see the class docstring)."""
        if role_dim is None:
            role_dim = lambda layer, role: layer.d_a if role.startswith("A") else layer.d_g
        limit = max_dim if callable(max_dim) else (lambda layer, role: max_dim)
        sizes: dict[str, int] = {}
        dims: dict[str, int] = {}
        slots, counts = [], []
        for layer in layers:
            row, row_counts = [], []
            for role in roles:
                c, b = block_split(int(role_dim(layer, role)), limit(layer, role))
                k = cls.key(b)
                row.append((k, sizes.get(k, 0)))
                row_counts.append(c)
                sizes[k] = sizes.get(k, 0) + c
                dims[k] = b
            slots.append(tuple(row))
            counts.append(tuple(row_counts))
        return cls(tuple(roles), tuple(slots), dict(sizes), dict(dims), tuple(counts))

    def count(self, layer: int, role: str) -> int:
        """The number of blocks of a factor (1 when it is whole)."""
        return self.counts[layer][self.roles.index(role)] if self.counts else 1

    def zeros(self, dtype: Any) -> dict[str, jax.Array]:
        return stack_zeros(self.sizes, self.dims, dtype)

    def eyes(self, dtype: Any) -> dict[str, jax.Array]:
        return stack_eyes(self.sizes, self.dims, dtype)

    def vectors(self, dtype: Any, fill: float = 0.0) -> dict[str, jax.Array]:
        """One length-``d`` vector per factor (e.g. eigenvalues), shape ``(n_d, d)``."""
        return {k: jnp.full((n, self.dims[k]), fill, dtype) for k, n in self.sizes.items()}

    def scalars(self, dtype: Any, fill: float = 0.0) -> dict[str, jax.Array]:
        """One scalar per factor (e.g. a shift), shape ``(n_d,)``."""
        return {k: jnp.full((n,), fill, dtype) for k, n in self.sizes.items()}

    def get(self, stacks: Mapping[str, jax.Array], layer: int, role: str) -> jax.Array:
        """The factor's entry: ``stacks[key][position]``, or its ``(c, ...)`` blocks."""
        k, pos = self.slots[layer][self.roles.index(role)]
        c = self.count(layer, role)
        return stacks[k][pos] if c == 1 else stacks[k][pos : pos + c]

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
            c = self.count(layer, role)
            for j in range(c):  # (the blocks of a block-diagonal factor)
                by_key.setdefault(k, {})[pos + j] = v if c == 1 else v[j]
        out = dict(stacks)
        for k, members in by_key.items():
            old = stacks[k]
            out[k] = jnp.stack(
                [
                    members[i].astype(old.dtype) if i in members else old[i]
                    for i in range(old.shape[0])
                ]
            )
        return out

    def per_factor(self, fn: Callable[[int, str], jax.Array]) -> dict[str, jax.Array]:
        """Stacks ``fn(layer, role)`` (e.g. a per-factor shift) into arrays keyed like the stacks
        (every block of a block-diagonal factor gets its factor's value)."""
        out: dict[str, list] = {k: [None] * n for k, n in self.sizes.items()}
        for layer, row in enumerate(self.slots):
            for role, (k, pos) in zip(self.roles, row):
                value = fn(layer, role)
                for j in range(self.count(layer, role)):
                    out[k][pos + j] = value
        return {k: jnp.stack(v) for k, v in out.items()}

    @staticmethod
    def map(fn: Callable[..., Any], *stacks: Mapping[str, Any]) -> dict[str, Any]:
        """``{key: jax.vmap(fn)(*(s[key] for s in stacks))}``: one batched call per dimension
        (``lax.map`` where batched LAPACK calls can deadlock, see ``cpu_runtime.map_stack``),
        split over the devices of the current mesh (:func:`sofim_optax.distributed.map_stacks`).
        For decompositions; cheap per-factor maps use :meth:`traces` or plain ``jnp``."""
        return distributed.map_stacks(fn, *stacks)

    @staticmethod
    def traces(stacks: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """``{key: (n_d,) traces}`` of the stacks."""
        return {k: jnp.trace(s, axis1=-2, axis2=-1) for k, s in stacks.items()}


def block_split(dim: int, max_dim: int | None) -> tuple[int, int]:
    """``(c, b)``: a factor of ``dim`` cut into ``c = ⌈dim / max_dim⌉`` blocks of
    ``b = ⌈dim / c⌉`` (``(1, dim)`` when ``max_dim`` is ``None`` or not exceeded)."""
    if max_dim is None or dim <= max_dim:
        return 1, dim
    c = -(-dim // max_dim)
    return c, -(-dim // c)


def stacked_damped_inverse(
    factors: jax.Array, shifts: jax.Array, method: str = "cholesky"
) -> jax.Array:
    """``(F_i + shift_i I)⁻¹`` for one stack ``(n, d, d)``: :func:`stacked_damped_inverses` of
    a single stack."""
    return stacked_damped_inverses({"d": factors}, {"d": shifts}, method)["d"]


def stacked_damped_inverses(
    factors: Mapping[str, jax.Array], shifts: Mapping[str, jax.Array], method: str = "cholesky"
) -> dict[str, jax.Array]:
    """``{key: (F_i + shift_i I)⁻¹}`` for stacks ``(n, d, d)`` keyed alike, never NaN.

    One batched call per stack, split over the devices of the current mesh
    (:func:`sofim_optax.distributed.map_stacks`). If any result comes out non-finite (a
    Cholesky breakdown when round-off makes a barely damped factor indefinite), every stack is
    recomputed through the eigendecomposition (:func:`sofim_optax.linalg.damped_inverse` with
    ``"eigh"``, eigenvalues clamped at 0), which is finite for finite input. The fallback runs
    under ``lax.cond``, so it costs nothing when not needed.
    """
    shifts = {k: shifts[k].astype(f.dtype) for k, f in factors.items()}
    inv = distributed.map_stacks(lambda f, s: linalg.damped_inverse(f, s, method), factors, shifts)
    if method == "eigh":
        return inv
    safe = lambda: distributed.map_stacks(
        lambda f, s: linalg.damped_inverse(f, s, "eigh"), factors, shifts
    )
    inputs_finite = guards.all_finite(factors)
    return lax.cond(guards.all_finite(inv) | ~inputs_finite, lambda: inv, safe)
