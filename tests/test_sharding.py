"""Every method under the user's sharded ``jax.jit`` on 8 simulated CPU devices.

``tests/conftest.py`` starts the suite with ``--xla_force_host_platform_device_count=8``.
A data-parallel step (the batch sharded over a ``("data",)`` mesh, ``jax.set_mesh`` around
it) must give the single-device parameters over three steps that include a refresh: with the
state replicated, and with the state sharded by ``sofim_optax.distributed.state_sharding`` and
the Dense kernel sharded FSDP-style. The refresh must really be split: each device's branch of
the distributed refresh decomposes its own share of the matrices, and nothing is decomposed
outside it.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_conformance import MODEL, REGISTRY, loss_fn

import sofim_optax
from sofim_optax import distributed
from sofim_optax.curvature import linen as capture

DEVICES = 8
BATCH = 16
STEPS = 3
# Every scale_by_* (each method once), K-BFGS(L) (its memory) and one adaptive alias (the
# quadratic model's products through obj_fn).
METHODS = sorted(
    [
        n
        for n, c in REGISTRY.items()
        if not c.is_alias and not c.adaptive and c.direction is None  # (partition_state: below)
    ]
    + ["kbfgs_l", "kfac_adaptive"]
)

pytestmark = pytest.mark.skipif(
    jax.device_count() < DEVICES, reason="needs 8 (simulated) devices; see tests/conftest.py"
)


def _batches():
    rng = np.random.default_rng(1)
    return [(rng.standard_normal((BATCH, 3, 3, 1)), np.arange(BATCH) % 3) for _ in range(STEPS)]


def _init():
    # float64 parameters and data (under jax.enable_x64): the raw preconditioned steps of this
    # tiny, lightly damped problem amplify round-off, so in float32 merely reordering the
    # batch moves the KPSVD family's and MBF's parameters by ~1e-3 of their size; in float64 a
    # mismatch is the sharded program's, not round-off.
    params = MODEL.init(jax.random.key(0), _batches()[0][0])
    return jax.tree.map(lambda x: x.astype(jnp.float64), params)


def _step(opt, case):
    """One train step as a user writes it: gradients and statistics, then the update."""

    def step(params, state, batch, previous):
        _, grads, stats = capture.value_grad_and_stats(loss_fn, params, *batch)
        extra = {
            "layer_stats": stats,
            "previous_batch_stats": capture.value_grad_and_stats(loss_fn, params, *previous)[2],
            "obj_fn": lambda p: loss_fn(p, *batch),
        }
        updates, state = opt.update(grads, state, params, **{k: extra[k] for k in case.needs})
        return optax.apply_updates(params, updates), state

    return step


def _make(name):
    case = REGISTRY[name]
    return case.make(), case


@functools.lru_cache(maxsize=None)
def _single_device(name):
    opt, case = _make(name)
    batches = _batches()
    with jax.enable_x64(True):
        params = _init()
        step = jax.jit(_step(opt, case))
        state = opt.init(params)
        for t in range(STEPS):
            params, state = step(params, state, batches[t], batches[t - 1])
        return jax.device_get(params)


def _mesh():
    return jax.make_mesh((DEVICES,), ("data",))  # Explicit axes, jax.make_mesh's default


def _sharded_run(name, *, shard_state, fsdp):
    opt, case = _make(name)
    if shard_state == "partitioned":
        opt = sofim_optax.partition_state(opt, min_size=4)
    mesh = _mesh()
    batches = _batches()
    with jax.set_mesh(mesh), jax.enable_x64(True):
        rows = NamedSharding(mesh, P("data"))
        data = [jax.device_put(b, rows) for b in batches]
        params = _init()
        if fsdp:  # the Dense kernel (8, 3) split over its input axis
            params = jax.tree_util.tree_map_with_path(
                lambda path, x: jax.device_put(
                    x,
                    NamedSharding(
                        mesh, P("data") if "Dense_0" in str(path) and x.ndim == 2 else P()
                    ),
                ),
                params,
            )
        state = opt.init(params)
        if shard_state is True:
            state = jax.device_put(state, distributed.state_sharding(state, mesh))
        traces = []

        def counted(*args):
            traces.append(1)
            return _step(opt, case)(*args)

        step = jax.jit(counted)
        params, state = step(params, state, data[0], data[-1])
        with jax.transfer_guard("disallow"):  # no host round-trip inside a step
            for t in range(1, STEPS):
                params, state = step(params, state, data[t], data[t - 1])
    return jax.device_get(params), len(traces)


def _assert_same(params, reference, name):
    with jax.enable_x64(True):
        initial = jax.device_get(_init())
    moved = max(
        float(np.abs(np.asarray(r) - np.asarray(i)).max())
        for r, i in zip(jax.tree.leaves(reference), jax.tree.leaves(initial))
    )
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * moved, err_msg=name)


_MODES = {
    "replicated": (False, False),
    "sharded_state_fsdp": (True, True),
    "partitioned_state": ("partitioned", False),
}


def _step_cases():
    # K-BFGS(L)'s replicated and sharded rows (its slowest, ~8 s each) run with the slow
    # suite; its partitioned row, and every mode of K-BFGS, stay in the fast one.
    for mode, (shard_state, fsdp) in _MODES.items():
        for name in METHODS:
            slow = name == "kbfgs_l" and mode != "partitioned_state"
            yield pytest.param(
                name,
                shard_state,
                fsdp,
                id=f"{mode}-{name}",
                marks=[pytest.mark.slow] if slow else [],
            )


@pytest.mark.parametrize("name, shard_state, fsdp", list(_step_cases()))
def test_data_parallel_step_equals_single_device(name, shard_state, fsdp):
    """Replicated state and parameters, or the state sharded and the Dense kernel FSDP-split."""
    params, traces = _sharded_run(name, shard_state=shard_state, fsdp=fsdp)
    _assert_same(params, _single_device(name), name)
    assert traces == 1, f"{name} retraced"


def test_state_sharding_splits_the_curvature_stacks():
    mesh = _mesh()
    opt = sofim_optax.scale_by_mini_block_fisher(damping=0.1, dense_block_size=2)
    params = {"Dense_0": {"kernel": jnp.zeros((8, 16)), "bias": jnp.zeros((16,))}}
    shapes = jax.eval_shape(opt.init, params)
    shardings = distributed.state_sharding(shapes, mesh)
    split = [
        (leaf.shape, s.spec)
        for leaf, s in zip(jax.tree.leaves(shapes.curvature), jax.tree.leaves(shardings.curvature))
        if s.spec == P("data")
    ]
    assert split, "no curvature stack was sharded"
    assert all(shape[0] % DEVICES == 0 for shape, _ in split)
    assert jax.tree.leaves(shardings.count)[0].spec == P()


def test_partition_state_holds_one_eighth_per_device():
    """KFAC's factors here are stacks of one odd-sized matrix (state_sharding cannot split
    them); the partitioned state holds 1/8 of every packed array per device, padded."""
    mesh = _mesh()
    params = {"Dense_0": {"kernel": jnp.zeros((6, 5)), "bias": jnp.zeros((5,))}}
    opt = sofim_optax.partition_state(sofim_optax.scale_by_kfac(damping=0.1), min_size=4)
    with jax.set_mesh(mesh):
        state = opt.init(params)
    plain = jax.eval_shape(sofim_optax.scale_by_kfac(damping=0.1).init, params)
    packed = sum(x.size for x in jax.tree.leaves(plain) if x.size >= 4 and x.dtype.kind == "f")
    (buffer,) = state.buffers.values()
    assert buffer.size == packed + (-packed % DEVICES)
    assert {s.data.size for s in buffer.addressable_shards} == {buffer.size // DEVICES}
    assert all(x.size < 4 or x.dtype.kind != "f" for x in jax.tree.leaves(state.rest))
    (layout,) = distributed.state_sharding(state, mesh).buffers.values()
    assert layout.spec == P("data")  # state_sharding keeps the buffers split


def test_partition_state_names_unknown_axes():
    opt = sofim_optax.partition_state(optax.scale_by_adam(), axes="model")
    with jax.set_mesh(_mesh()), pytest.raises(ValueError, match="not axes of the current mesh"):
        opt.init({"w": jnp.zeros((64, 64))})


# ----------------------------------------------------------------------------------------
# The refresh is really split.
# ----------------------------------------------------------------------------------------


def _decomposed(jaxpr) -> int:
    """The number of matrices ``eigh`` decomposes in a jaxpr (through scans and calls)."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "eigh":
            shape = eqn.invars[0].aval.shape
            count += int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        for sub in _subjaxprs(eqn):
            inner = _decomposed(sub)
            if eqn.primitive.name == "scan":
                inner *= eqn.params["length"]
            count += inner
    return count


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(v, "jaxpr") and hasattr(v, "consts"):  # ClosedJaxpr
                yield v.jaxpr
            elif hasattr(v, "eqns"):
                yield v


def _find(jaxpr, primitive):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            yield eqn
        for sub in _subjaxprs(eqn):
            yield from _find(sub, primitive)


def _deflation(**kwargs):
    kwargs.pop("inverse")  # (its refresh is a generalised eigenproblem per layer)
    return sofim_optax.scale_by_kpsvd_deflation(stats_period=1, **kwargs)


@pytest.mark.parametrize(
    "factory", [sofim_optax.scale_by_kfac, sofim_optax.scale_by_mini_block_fisher, _deflation]
)
def test_each_device_decomposes_its_share(factory):
    """In the traced program every ``eigh`` lies in one device's branch of the distributed
    refresh; together the branches decompose each matrix once, and the busiest device does at
    most its fair share plus one piece."""
    opt = factory(damping=0.1, inverse="eigh")
    params = {
        f"Dense_{i}": {"kernel": jnp.zeros((d, 6)), "bias": jnp.zeros(6)}
        for i, d in enumerate((5, 6, 6, 6))
    }
    x = jnp.ones((BATCH, 5))

    def loss(p, x):
        for i in range(4):
            x = jnp.tanh(x @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"])
        return jnp.mean(x**2)

    def step(p, s, x):
        g = jax.grad(loss)(p, x)
        stats = {
            k: sofim_optax.LayerStats(
                jnp.cos(jnp.arange(BATCH * p[k]["kernel"].shape[0])).reshape(BATCH, -1),
                jnp.sin(jnp.arange(BATCH * 6.0)).reshape(BATCH, 6),
            )
            for k in p
        }
        return opt.update(g, s, p, layer_stats=stats)

    state = opt.init(params)
    single = jax.make_jaxpr(step)(params, state, x).jaxpr
    total = _decomposed(single)
    with jax.set_mesh(_mesh()):
        jaxpr = jax.make_jaxpr(step)(params, state, x).jaxpr
    (shard,) = list(_find(jaxpr, "shard_map"))
    assert _decomposed(jaxpr) == _decomposed(shard.params["jaxpr"])  # nothing outside
    (switch,) = list(_find(shard.params["jaxpr"], "cond"))
    per_device = [_decomposed(b.jaxpr) for b in switch.params["branches"]]
    assert len(per_device) == DEVICES
    assert sum(per_device) == total
    assert max(per_device) <= -(-total // DEVICES) + 1, per_device

    # The same in the compiled per-device (SPMD) program: with refreshes kept whole every
    # device runs every decomposition; split, each runs only its own branch's. (A new
    # function for the whole refresh: JAX reuses the split trace of `step` made above.)
    with jax.set_mesh(_mesh()):
        with distributed.refresh_axes(()):
            unsplit = jax.jit(lambda *a: step(*a)).lower(params, state, x).compile()
            whole = _hlo_decompositions(unsplit.as_text())
        split = _hlo_decompositions(jax.jit(step).lower(params, state, x).compile().as_text())
    assert whole == [total] * DEVICES
    assert split == per_device


def _hlo_decompositions(text: str) -> list[int]:
    """Matrices each device's program hands to LAPACK's ``syevd`` (eigh), from compiled HLO:
    while bodies times their known trip count (other loops must hold none), the busiest branch of an ordinary
    conditional, and branch ``d`` of a ``DEVICES``-way conditional (the distributed refresh)
    for device ``d``."""
    computations, current = {}, None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            current = header.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None and line.startswith("  "):
            computations[current].append(line)

    def count(name, device):
        total = 0
        for line in computations[name]:
            if 'custom_call_target="lapack_' in line and "syevd" in line:
                dims = re.search(r"= \(\w+\[([\d,]*)\]", line).group(1).split(",")
                total += int(np.prod([int(d) for d in dims[:-2]])) if len(dims) > 2 else 1
            loop = re.search(r"while\(.*body=%([\w.\-]+)", line)
            if loop:
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                inner = count(loop.group(1), device)
                # (a solver's loop of unknown length must decompose nothing)
                assert trips is not None or inner == 0, line
                total += int(trips.group(1)) * inner if inner else 0
            branches = re.search(r"branch_computations=\{([^}]*)\}", line)
            if branches:
                names = [b.strip().lstrip("%") for b in branches.group(1).split(",")]
                if len(names) == DEVICES:
                    total += count(names[device], device)
                else:
                    total += max(count(b, device) for b in names)
            called = re.search(r"\bcalls=%([\w.\-]+)|to_apply=%([\w.\-]+)", line)
            if called and " call(" in line:
                total += count(called.group(1) or called.group(2), device)
        return total

    return [count(entry, d) for d in range(DEVICES)]


def test_plan_balances_and_covers_every_matrix():
    sizes, dims = (
        {"d785": 1, "d1000": 2, "d30": 3, "d10": 100},
        {"d785": 785, "d1000": 1000, "d30": 30, "d10": 10},
    )
    work = distributed.plan(sizes, dims, 4)
    covered = {k: np.zeros(n, int) for k, n in sizes.items()}
    for pieces in work.pieces:
        for key, start, stop in pieces:
            covered[key][start:stop] += 1
    assert all((c == 1).all() for c in covered.values())
    assert sum(work.loads) == sum(n * dims[k] ** 3.0 for k, n in sizes.items())
    # no device can do less than the largest single matrix, or than a quarter of the total
    assert max(work.loads) <= 1.2 * max(1000.0**3, sum(work.loads) / 4)
    assert max(work.loads) == 1000.0**3  # the two 1000s on their own devices


def test_refresh_axes_names_an_unknown_axis():
    with jax.set_mesh(_mesh()), distributed.refresh_axes("model"):
        with pytest.raises(ValueError, match="not axes of the current mesh"):
            distributed.current_refresh_axes()
    with jax.set_mesh(_mesh()), distributed.refresh_axes(()):
        assert distributed.current_refresh_axes() == ((), 1)


@pytest.mark.parametrize("big", [3, 12], ids=["balanced_all_gather", "one_large_psum"])
def test_split_refresh_returns_the_single_device_results(big):
    """Both ways back (an all-gather, or a sum of disjoint ranges when one matrix dominates)
    return exactly what the single-device refresh computes."""
    rng = np.random.default_rng(0)

    def spd(k, d):
        m = rng.standard_normal((k, d, d)).astype(np.float32)
        return jnp.asarray(m @ m.transpose(0, 2, 1) + d * np.eye(d, dtype=np.float32))

    stacks = {"big": spd(1, big), "small": spd(8, 2)}
    want = jax.jit(lambda s: distributed.map_stacks(jnp.linalg.eigh, s))(stacks)
    with jax.set_mesh(_mesh()):
        lowered = jax.jit(lambda s: distributed.map_stacks(jnp.linalg.eigh, s)).lower(stacks)
        got = lowered.compile()(stacks)
    hlo = lowered.compile().as_text()
    assert ("all-reduce" in hlo) == (big == 12) and ("all-gather" in hlo) == (big == 3)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want
    )
