"""Curvature refreshes split over the devices of a mesh, and the optimizer state's sharding.

Under the user's ``jax.jit`` with the batch sharded over a mesh axis, XLA's sharding
propagation already makes every gradient and every curvature statistic a mean over the
global batch: the captured per-example rows stay sharded along the batch, and each factor
``AᵀA / N`` becomes a local product plus one all-reduce. What propagation cannot split is a
refresh: the stacked eigendecompositions and inverses of KFAC, the KPSVD family and Mini-Block
Fisher are LAPACK/cuSOLVER calls that XLA runs whole on every device. This module splits
them.

**Distributed refreshes.** Every method decomposes its stacks through :func:`map_stacks`.
When a mesh is in effect at trace time (``with jax.set_mesh(mesh):`` around the jitted
step, or around its first call) and has more than one device on the refresh axes (default:
all of the mesh's axes; :func:`refresh_axes` chooses), the matrices of all stacks are dealt
to the ``n`` devices by a static plan (:func:`plan`): a stack of at least ``n`` matrices is cut
into ``n`` contiguous chunks, a smaller one into single matrices, and the pieces go, largest
``d³`` first, to the least-loaded device. Inside a ``jax.shard_map`` each device runs only its
own pieces (a ``lax.switch`` on its axis index), packs the results into one flat buffer per
dtype, and a single collective per dtype gives every device every result: an ``all_gather``,
or, when one device's share is so large that gathering every device's padded buffer would
move more than twice the results, a ``psum`` of full-size buffers in which each device
filled only its own range (exact, the rest being zeros). So a refresh
costs a device about ``1/n`` of the decompositions (exactly ``max`` device load of the plan)
plus that collective; nothing is padded with dummy matrices, and stacks whose
size does not divide ``n`` simply give some devices one piece more. Results equal the
single-device ones (the same LAPACK calls on the same matrices). Without a mesh, or on one
device, :func:`map_stacks` is :func:`sofim_optax.cpu_runtime.map_stack` per stack.

**State sharding.** :func:`state_sharding` gives a ``NamedSharding`` for every array of an
optimizer state (or of ``jax.eval_shape(tx.init, params)``): the curvature stacks — arrays
of rank ≥ 2 inside a field named ``curvature`` — are sharded over their leading (stack) axis
when its size divides the number of devices, and everything else is replicated. Use it as
``jax.device_put(state, state_sharding(state, mesh))`` and as the jit's in/out shardings.
A sharded state holds ``1/n`` of those stacks per device; the price is an all-gather of the
preconditioner's stacks on every step (each device preconditions every layer of its
replicated gradients) and of the factors at a refresh.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sofim_optax import cpu_runtime

__all__ = [
    "REFRESH_SCOPE",
    "refresh_axes",
    "current_refresh_axes",
    "plan",
    "map_stacks",
    "state_sharding",
    "mesh_agnostic",
    "keep_shardings",
    "map_directions",
]

#: The ``jax.named_scope`` of every refresh :func:`map_stacks` traces.
REFRESH_SCOPE = "sofim_optax_refresh"

_override = threading.local()
# True while a method's update runs in mesh_agnostic's auto_axes region.
_AUTO_FROM_EXPLICIT: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "sofim_optax_auto_from_explicit", default=False
)


@contextlib.contextmanager
def refresh_axes(axes: str | Sequence[str] | None) -> Iterator[None]:
    """Within the block, refreshes traced under a mesh split over ``axes`` (a mesh axis name or
    a tuple of them); ``()`` keeps them whole on every device; ``None`` restores the default
    (all of the current mesh's axes). It acts at trace time: wrap the first call of the jitted
    step (or its ``.lower``). JAX caches traces per Python function, not per this setting: a
    step function already traced under the same mesh keeps the split it was traced with, so
    give a different setting its own function (e.g. ``jax.jit(lambda *a: step(*a))``)."""
    previous = getattr(_override, "axes", None)
    _override.axes = None if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    try:
        yield
    finally:
        _override.axes = previous


def current_refresh_axes() -> tuple[tuple[str, ...], int]:
    """``(axes, n)``: the mesh axes a refresh traced now is split over and their device count
    (``((), 1)`` without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), 1
    axes = getattr(_override, "axes", None)
    if axes is None:
        axes = tuple(mesh.axis_names)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
        raise ValueError(
            f"sofim_optax.distributed.refresh_axes: {unknown} are not axes of the current mesh "
            f"{tuple(mesh.axis_names)}; name some of them, or () to keep refreshes whole."
        )
    n = math.prod(mesh.shape[a] for a in axes)
    return axes, n


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which matrices of which stacks each device decomposes.

    Attributes:
      pieces: ``pieces[device] = ((key, start, stop), ...)``, contiguous ranges of stacks.
      loads: ``loads[device]``, the sum of ``d³`` over its matrices.
    """

    pieces: tuple[tuple[tuple[str, int, int], ...], ...]
    loads: tuple[float, ...]


def plan(sizes: Mapping[str, int], dims: Mapping[str, int], n: int) -> Plan:
    """Deals stacks ``{key: number of matrices}`` of ``dims[key] × dims[key]`` matrices to ``n``
    devices: a stack of ``≥ n`` matrices in ``n`` contiguous chunks, a smaller one matrix by
    matrix, each piece (largest ``d³`` first) to the least-loaded device (ties: lowest index)."""
    pieces = []
    for key, size in sizes.items():
        bounds = np.linspace(0, size, n + 1).round().astype(int) if size >= n else range(size + 1)
        for start, stop in zip(bounds[:-1], bounds[1:]):
            if stop > start:
                pieces.append(
                    (float(stop - start) * float(dims[key]) ** 3, key, int(start), int(stop))
                )
    pieces.sort(key=lambda p: (-p[0], p[1], p[2]))
    loads = [0.0] * n
    owned: list[list[tuple[str, int, int]]] = [[] for _ in range(n)]
    for cost, key, start, stop in pieces:
        device = min(range(n), key=lambda d: (loads[d], d))
        loads[device] += cost
        owned[device].append((key, start, stop))
    return Plan(tuple(tuple(sorted(o)) for o in owned), tuple(loads))


def map_stacks(fn: Callable[..., Any], *stacks: Mapping[str, jax.Array]) -> dict[str, Any]:
    """``{key: jax.vmap(fn)(*(s[key] for s in stacks))}``, split over the mesh's devices.

    ``fn`` maps one matrix (and its companions of the other stacks, e.g. a shift) to a pytree
    of arrays, and must be a pure per-matrix function (an eigendecomposition, a damped
    inverse). See the module docstring for when and how the work is split; the result is
    the same either way. The work is traced under ``jax.named_scope(REFRESH_SCOPE)`` (and
    each device's share under ``REFRESH_SCOPE + "_split"``), so that profiles and the
    benchmarks can find it.
    """
    with jax.named_scope(REFRESH_SCOPE):
        return _map_stacks(fn, *stacks)


def _map_stacks(fn: Callable[..., Any], *stacks: Mapping[str, jax.Array]) -> dict[str, Any]:
    keys = list(stacks[0])
    axes, n = current_refresh_axes()
    if n <= 1 or not keys:
        return {k: cpu_runtime.map_stack(fn, *(s[k] for s in stacks)) for k in keys}
    sizes = {k: int(stacks[0][k].shape[0]) for k in keys}
    dims = {k: int(stacks[0][k].shape[-1]) if stacks[0][k].ndim > 1 else 1 for k in keys}
    work = plan(sizes, dims, n)
    one = {  # the output structure of fn on one matrix of each stack
        k: jax.eval_shape(fn, *(jax.ShapeDtypeStruct(s[k].shape[1:], s[k].dtype) for s in stacks))
        for k in keys
    }
    treedefs = {k: jax.tree.structure(one[k]) for k in keys}
    leaves = {k: jax.tree.leaves(one[k]) for k in keys}
    dtypes = sorted({str(leaf.dtype) for k in keys for leaf in leaves[k]})
    # where each result lies in its device's buffers: offsets[device][(key, start, leaf)]
    offsets, lengths = [], []
    for pieces in work.pieces:
        at, used = {}, dict.fromkeys(dtypes, 0)
        for key, start, stop in pieces:
            for j, leaf in enumerate(leaves[key]):
                at[(key, start, j)] = used[str(leaf.dtype)]
                used[str(leaf.dtype)] += (stop - start) * math.prod(leaf.shape)
        offsets.append(at)
        lengths.append(used)
    # Each dtype's results come back by one collective: an all-gather of every device's
    # buffer (padded to the longest), or, when the plan is so uneven that the gathered copies
    # would hold more than twice the results (one large matrix), a sum of full-size buffers
    # in which each device fills only its own range (exact: the other entries are zeros).
    total = {dt: sum(u[dt] for u in lengths) for dt in dtypes}
    base = [{dt: sum(u[dt] for u in lengths[:d]) for dt in dtypes} for d in range(n)]
    summed = {dt for dt in dtypes if n * max(u[dt] for u in lengths) > 2 * total[dt]}
    width = {
        dt: max(1, total[dt] if dt in summed else max(u[dt] for u in lengths)) for dt in dtypes
    }

    def branch(device):
        def run(*operands):
            by_key = {
                k: [operands[i * len(keys) + j] for i in range(len(stacks))]
                for j, k in enumerate(keys)
            }
            parts = {dt: [] for dt in dtypes}
            for key, start, stop in work.pieces[device]:
                out = cpu_runtime.map_stack(fn, *(s[start:stop] for s in by_key[key]))
                for leaf in jax.tree.leaves(out):
                    parts[str(leaf.dtype)].append(leaf.reshape(-1))
            out = []
            for dt, p in parts.items():
                if not p:
                    out.append(jnp.zeros((width[dt],), dt))
                    continue
                before = base[device][dt] if dt in summed else 0
                flat = jnp.concatenate(p)
                out.append(jnp.pad(flat, (before, width[dt] - before - flat.size)))
            return tuple(out)

        return run

    def local(*operands):
        with jax.named_scope(REFRESH_SCOPE + "_split"):
            mine = lax.switch(lax.axis_index(axes), [branch(d) for d in range(n)], *operands)
        return tuple(
            lax.psum(buffer, axes) if dt in summed else lax.all_gather(buffer, axes)
            for dt, buffer in zip(dtypes, mine)
        )

    operands = [s[k] for s in stacks for k in keys]
    gathered = jax.shard_map(
        local,
        in_specs=tuple(P() for _ in operands),
        out_specs=tuple(P() for _ in dtypes),
        axis_names=frozenset(axes),
        check_vma=False,
    )(*operands)
    buffers = dict(zip(dtypes, gathered))
    owner = {
        (key, start): (device, stop)
        for device, pieces in enumerate(work.pieces)
        for key, start, stop in pieces
    }
    result = {}
    for k in keys:
        starts = sorted(start for key, start in owner if key == k)
        out_leaves = []
        for j, leaf in enumerate(leaves[k]):
            dt, shape = str(leaf.dtype), leaf.shape
            chunks = []
            for start in starts:
                device, stop = owner[(k, start)]
                o = offsets[device][(k, start, j)]
                count = (stop - start) * math.prod(shape)
                if dt in summed:
                    o += base[device][dt]
                    piece = buffers[dt][o : o + count]
                else:
                    piece = buffers[dt][device, o : o + count]
                chunks.append(piece.reshape((stop - start, *shape)))
            out_leaves.append(jnp.concatenate(chunks) if len(chunks) > 1 else chunks[0])
        result[k] = jax.tree.unflatten(treedefs[k], out_leaves)
    return result


def state_sharding(
    state: Any, mesh: jax.sharding.Mesh, *, axes: str | Sequence[str] | None = None
) -> Any:
    """A ``NamedSharding`` for every array of an optimizer ``state`` (arrays or
    ``jax.ShapeDtypeStruct`` s, e.g. ``jax.eval_shape(tx.init, params)``).

    Arrays of rank ≥ 2 inside a field named ``curvature`` (the stacks of factors,
    decompositions and mini-blocks of every layer-wise method) are sharded over their
    leading axis across ``axes`` (default: all of ``mesh``'s axes) when its size divides the
    number of devices on them, and so are the flat buffers of a
    :class:`~sofim_optax.PartitionedState` (as :func:`~sofim_optax.partition_state` lays them
    out); every other array is replicated.
    """
    names = (
        tuple(mesh.axis_names)
        if axes is None
        else ((axes,) if isinstance(axes, str) else tuple(axes))
    )
    n = math.prod(mesh.shape[a] for a in names)
    replicated = NamedSharding(mesh, P())
    stacked = NamedSharding(mesh, P(names if len(names) > 1 else names[0]))

    def of(path, leaf) -> NamedSharding:
        fields = [getattr(entry, "name", None) for entry in path]
        shape = getattr(leaf, "shape", ())
        if "curvature" in fields and len(shape) >= 2 and shape[0] % n == 0:
            return stacked
        if "buffers" in fields and len(shape) == 1 and shape[0] % n == 0:
            return stacked  # a partition_state buffer, as partition_state lays it out
        return replicated

    return jax.tree_util.tree_map_with_path(of, state)


def _explicit_axes() -> tuple[str, ...]:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    explicit = jax.sharding.AxisType.Explicit
    return tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == explicit)


def keep_shardings(new: Any, old: Any) -> Any:
    """``new`` with each array resharded to the sharding of its counterpart in ``old`` (same
    tree structure) under a mesh with ``Explicit`` axes; ``new`` itself otherwise.

    Under explicit sharding the two branches of a ``lax.cond`` must give the same sharded
    types, so a guard that returns either the new state or the old one keeps the old one's
    layout (the layout the user chose, e.g. with :func:`state_sharding`)."""
    if not _explicit_axes():
        return new

    def like(x, y):
        if not isinstance(x, jax.Array) or not isinstance(y, jax.Array):
            return x
        want = jax.typeof(y).sharding.spec
        return x if jax.typeof(x).sharding.spec == want else jax.sharding.reshard(x, want)

    return jax.tree.map(like, new, old)


def mesh_agnostic(update_fn: Callable[..., tuple[Any, Any]]) -> Callable[..., tuple[Any, Any]]:
    """Wraps an optax ``update(updates, state, params=None, **extra)`` so that it also runs
    under a mesh with ``Explicit`` axes (``jax.make_mesh``'s default).

    Under explicit sharding every contraction over a sharded axis must name its result's
    sharding; the methods' statistics contract the batch axis everywhere. Under such a mesh the
    update therefore runs inside ``jax.sharding.auto_axes`` (XLA propagates shardings, as under
    an ``Auto`` mesh) and returns the updates and the state with the shardings they came in
    with. A callable extra argument (``obj_fn``, the user's loss) runs back in explicit mode
    (``jax.sharding.explicit_axes``), its parameters in the shardings of ``params``, since the
    user's model was written for explicit types (its closed-over batch carries them). Without
    explicit axes it is ``update_fn`` itself.
    """

    def update(updates, state, params=None, **extra):
        axes = _explicit_axes()
        if not axes:
            return update_fn(updates, state, params, **extra)
        arrays = {k: v for k, v in extra.items() if not callable(v)}
        shardings = jax.tree.map(lambda x: jax.typeof(x).sharding.spec, (updates, state))
        like = params if params is not None else updates
        param_specs = jax.tree.map(lambda x: jax.typeof(x).sharding.spec, like)
        others = {k: _explicit_call(v, axes, param_specs) for k, v in extra.items() if callable(v)}

        def run(u, s, p, e):
            token = _AUTO_FROM_EXPLICIT.set(True)
            try:
                return update_fn(u, s, p, **e, **others)
            finally:
                _AUTO_FROM_EXPLICIT.reset(token)

        return jax.sharding.auto_axes(run, axes=axes, out_sharding=shardings)(
            updates, state, params, arrays
        )

    return update


def map_directions(fn: Callable[[Any], Any], directions: Any) -> Any:
    """``jax.vmap(fn)(directions)`` (a pytree with a leading direction axis), or ``lax.map``
    over that axis under a mesh with ``Explicit`` axes, where JAX cannot batch some of the
    reshapes a user's model applies to explicitly sharded activations. Used for the few
    curvature-vector products through ``obj_fn`` (AdaHessian's probes, Nyström-SGD's sketch,
    the quadratic model's directions)."""
    if _explicit_axes() or _AUTO_FROM_EXPLICIT.get():
        return lax.map(fn, directions)
    return jax.vmap(fn)(directions)


def _explicit_call(fn: Callable[..., Any], axes: tuple[str, ...], specs: Any) -> Callable:
    """``fn(p)`` called from an ``auto_axes`` region: ``p`` (the parameters' structure) enters
    explicit mode in ``specs``; any other call goes to ``fn`` unchanged.

    Under a prediction probe (the quadratic model's Gauss-Newton products) the probe's
    perturbations go in as arguments and the registered predictions come out as results, so
    that no traced value crosses the explicit region's boundary by closure."""
    from sofim_optax.curvature import _capture  # the probe (imports this module)

    structure = jax.tree.structure(specs)

    def call(*args, **kwargs):
        if len(args) != 1 or kwargs or jax.tree.structure(args[0]) != structure:
            return fn(*args, **kwargs)
        outer = _capture._PROBE.get()
        if outer is None:
            return jax.sharding.explicit_axes(fn, axes=axes, in_sharding=(specs,))(args[0])
        likelihoods = []

        def probed(p, perturbations):
            with _capture.probe_predictions(perturbations) as probe:
                loss = fn(p)
            likelihoods[:] = probe.likelihoods
            return loss, probe.predictions

        eps = outer.perturbations
        eps_specs = None if eps is None else [P()] * len(eps)
        loss, predictions = jax.sharding.explicit_axes(
            probed, axes=axes, in_sharding=(specs, eps_specs)
        )(args[0], eps)
        outer.likelihoods.extend(likelihoods)
        outer.predictions.extend(predictions)
        return loss

    return call
