"""An optimizer state stored in ``1/n`` per device: flat, padded buffers split over a mesh axis.

:func:`sofim_optax.distributed.state_sharding` shards a curvature stack over its stack axis
only when the number of matrices divides the device count, and JAX refuses uneven shardings:
KFAC's factors on a deep autoencoder are stacks of one or two matrices of odd sizes
(``d_in + 1``), so most of its state stays replicated. :func:`partition_state` stores any
method's state in ``1/n`` per device instead, as ZeRO-style optimizer-state partitioning does:

* every floating-point array of the wrapped transformation's state with at least
  ``min_size`` entries is flattened, the arrays of one dtype are concatenated into one
  buffer, and the buffer is padded with zeros to a multiple of ``n`` (fewer than ``n``
  padding entries per dtype) and split over the mesh axes, ``P(axes)``;
* everything else (step counters, scalar hyperparameters, keys, small arrays) stays as is;
* ``update`` gathers the buffers (one all-gather per dtype), unpacks the wrapped state,
  runs the wrapped ``update`` and packs the new state again (each device keeps its slice).

So the state held between steps costs ``1/n`` per device (plus the unpacked arrays), and
each step pays one all-gather of the state; the results are those of the wrapped
transformation. The wrapped state's structure is recomputed from the gradients with
``jax.eval_shape(inner.init, updates)``, so ``inner.init`` must depend only on the shapes
and dtypes of the parameters (true of every transformation in this library and in optax).
Without a mesh, or with one device on ``axes``, the buffers are simply not split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from sofim_optax import hyperparameters as hp

__all__ = ["PartitionedState", "partition_state"]


class PartitionedState(NamedTuple):
    """``buffers[dtype]``: the packed arrays (split over the mesh); ``rest``: the wrapped
    state with every packed array replaced by ``None``."""

    buffers: dict[str, jax.Array]
    rest: Any


def _axes_and_count(axes: str | Sequence[str] | None) -> tuple[tuple[str, ...], int]:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), 1
    names = (
        tuple(mesh.axis_names)
        if axes is None
        else ((axes,) if isinstance(axes, str) else tuple(axes))
    )
    missing = [a for a in names if a not in mesh.axis_names]
    if missing:
        raise ValueError(
            f"partition_state: {missing} are not axes of the current mesh "
            f"{tuple(mesh.axis_names)}; pass axes= naming some of them."
        )
    return names, math.prod(mesh.shape[a] for a in names)


def _constrain(x: jax.Array, spec: P) -> jax.Array:
    """``x`` laid out as ``spec`` on the current mesh (explicit: ``reshard``; auto: a sharding
    constraint)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return jax.sharding.reshard(x, spec)
    return jax.lax.with_sharding_constraint(x, spec)


@hp.structural("min_size")
def partition_state(
    inner: optax.GradientTransformation,
    *,
    axes: str | Sequence[str] | None = None,
    min_size: int = 1024,
) -> optax.GradientTransformationExtraArgs:
    """``inner`` with its state stored flat and split over ``axes`` of the current mesh.

    Args:
      inner: any optax gradient transformation (extra ``update`` arguments such as
        ``layer_stats=`` or ``obj_fn=`` are passed through).
      axes: the mesh axes the buffers are split over (default ``None``: all of the mesh's axes). The
        mesh is the one in effect (``jax.set_mesh``) when ``init`` and the jitted step are
        traced.
      min_size: floating-point arrays with fewer entries stay unpacked (default 1024; it
        decides the state's layout, so under ``optax.inject_hyperparams`` list it in
        ``static_args``, as ``partition_state.static_args`` does).

    Returns:
      A transformation whose state is a :class:`PartitionedState`.

    References:
      Rajbhandari, Rasley, Ruwase & He, "ZeRO: Memory optimizations toward training trillion
      parameter models", SC 2020 (stage 1: the optimizer state partitioned over data-parallel
      workers). Xu et al., "Automatic cross-replica sharding of weight update in
      data-parallel training", arXiv:2004.13336, 2020.
    """
    hp.check_positive_int("partition_state", "min_size", min_size, static=True)

    def packed(leaf: Any) -> bool:
        return (
            hasattr(leaf, "dtype")
            and jnp.issubdtype(leaf.dtype, jnp.floating)
            and math.prod(leaf.shape) >= min_size
        )

    def pack(state: Any) -> PartitionedState:
        names, n = _axes_and_count(axes)
        leaves, treedef = jax.tree.flatten(state)
        by_dtype: dict[str, list[jax.Array]] = {}
        for leaf in leaves:
            if packed(leaf):
                by_dtype.setdefault(str(leaf.dtype), []).append(jnp.ravel(leaf))
        buffers = {}
        for dtype, parts in sorted(by_dtype.items()):
            flat = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
            pad = -flat.size % n
            flat = jnp.pad(flat, (0, pad)) if pad else flat
            buffers[dtype] = (
                _constrain(flat, P(names if len(names) > 1 else names[0])) if n > 1 else flat
            )
        rest = jax.tree.unflatten(treedef, [None if packed(x) else x for x in leaves])
        return PartitionedState(buffers, rest)

    def unpack(state: PartitionedState, like: Any) -> Any:
        """The wrapped state, with the structure of ``like`` (its shapes and dtypes)."""
        shapes, treedef = jax.tree.flatten(like)
        rest = treedef.flatten_up_to(state.rest)
        full = {dtype: _constrain(b, P()) for dtype, b in state.buffers.items()}
        offset = dict.fromkeys(full, 0)
        leaves = []
        for shape, kept in zip(shapes, rest):
            if not packed(shape):
                leaves.append(kept)
                continue
            dtype, size = str(shape.dtype), int(np.prod(shape.shape))
            start = offset[dtype]
            leaves.append(full[dtype][start : start + size].reshape(shape.shape))
            offset[dtype] = start + size
        return jax.tree.unflatten(treedef, leaves)

    def init(params: optax.Params) -> PartitionedState:
        return pack(inner.init(params))

    def update(updates, state, params=None, **extra):
        like = jax.eval_shape(inner.init, updates if params is None else params)
        inner_state = unpack(state, like)
        if isinstance(inner, optax.GradientTransformationExtraArgs):
            new_updates, new_state = inner.update(updates, inner_state, params, **extra)
        else:
            new_updates, new_state = inner.update(updates, inner_state, params)
        return new_updates, pack(new_state)

    return optax.GradientTransformationExtraArgs(init, update)
