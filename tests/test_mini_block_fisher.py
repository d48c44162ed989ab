"""Mini-Block Fisher (``sofim_optax.mini_block_fisher``) against dense references (the common
optax checks: ``tests/test_conformance.py``).

The references build every mini-block from per-example gradients obtained with
``jax.vmap(jax.grad(...))`` (or explicit loops over examples and positions), in float64,
and solve each damped block with ``numpy.linalg.solve``; they share no code with the
implementation's blockify/einsum path.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sofim_optax import layerwise, mini_blocks
from sofim_optax.curvature import LayerStats
from sofim_optax.diagonal_fisher import scale_by_diagonal_fisher
from sofim_optax.mini_block_fisher import (
    mbf,
    mini_block_fisher,
    scale_by_mini_block_fisher,
)
from sofim_optax.mini_blocks import BlockLayout, batch_blocks, layer_blocking


def _rng(key) -> np.random.Generator:
    return np.random.default_rng(key)


def arr(x, dtype=jnp.float32) -> jax.Array:
    return jnp.asarray(np.asarray(x).astype(dtype))


def rand_like(key, tree):
    rng = _rng(key)
    return jax.tree.map(lambda l: arr(rng.standard_normal(l.shape), l.dtype), tree)


def zeros(shape, dtype=jnp.float32):
    return arr(np.zeros(shape), dtype)


def ones(shape, dtype=jnp.float32):
    return arr(np.ones(shape), dtype)


def rand_stats(key, n, d_in, d_out, t=None, dtype=jnp.float32):
    rng = _rng(key)
    shape_in = (n, d_in) if t is None else (n, t, d_in)
    shape_out = (n, d_out) if t is None else (n, t, d_out)
    return LayerStats(
        arr(rng.standard_normal(shape_in) + 0.3, dtype),
        arr(rng.standard_normal(shape_out), dtype),
        None,
    )


def mlp_params(dtype=jnp.float32, sizes=((3, 4), (4, 2))):
    rng = _rng(0)
    return {
        f"Dense_{i}": {
            "kernel": arr(rng.standard_normal((a, b)), dtype),
            "bias": arr(np.zeros((b,)), dtype),
        }
        for i, (a, b) in enumerate(sizes)
    }


def stats_for(params, key, n=6):
    return {
        name: rand_stats(
            key * 100 + i, n, params[name]["kernel"].shape[0], params[name]["kernel"].shape[1]
        )
        for i, name in enumerate(sorted(params))
    }


def tree_norm(tree) -> float:
    return float(
        np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
    )


# ----------------------------------------------------------------------------------------
# Independent references.
# ----------------------------------------------------------------------------------------


def dense_chunks(d_a, block_size):
    """Index ranges of the dense chunks: ⌈d_a/B⌉ chunks of equal size, the last one shorter."""
    size = d_a if block_size is None else min(block_size, d_a)
    n_c = -(-d_a // size)
    s = -(-d_a // n_c)
    return [np.arange(c * s, min((c + 1) * s, d_a)) for c in range(n_c)]


def ref_dense(per_example_v, u, damping, block_size):
    """per_example_v (N, d_a, d_out), u (d_a, d_out): block-wise (F_b + λI)⁻¹ u_b."""
    v = np.asarray(per_example_v, np.float64)
    out = np.zeros(u.shape)
    for j in range(u.shape[1]):
        for idx in dense_chunks(u.shape[0], block_size):
            vb = v[:, idx, j]
            F = vb.T @ vb / v.shape[0]
            out[idx, j] = np.linalg.solve(F + damping * np.eye(len(idx)), u[idx, j])
    return out


def ref_conv(per_example_kernel, per_example_bias, u_kernel, u_bias, damping):
    """Per (c_in, c_out) pair a kh·kw block; per bias entry a 1×1 block."""
    gk = np.asarray(per_example_kernel, np.float64)
    n = gk.shape[0]
    out_k = np.zeros(u_kernel.shape)
    for i in range(u_kernel.shape[-2]):
        for o in range(u_kernel.shape[-1]):
            vb = gk[..., i, o].reshape(n, -1)
            F = vb.T @ vb / n
            out_k[..., i, o] = np.linalg.solve(
                F + damping * np.eye(F.shape[0]), u_kernel[..., i, o].ravel()
            ).reshape(u_kernel.shape[:-2])
    gb = np.asarray(per_example_bias, np.float64)
    out_b = u_bias / (np.mean(gb**2, axis=0) + damping)
    return out_k, out_b


def stack_v(kernel, bias=None):
    """``[kernel; bias]`` of a dense layer, or per example for stacked ``(N, d_in, d_out)`` kernels."""
    k = np.asarray(kernel, np.float64)
    v = k if k.ndim == 3 else k.reshape(-1, k.shape[-1])
    if bias is not None:
        b = np.asarray(bias, np.float64)
        v = np.concatenate([v, b[..., None, :]], axis=-2)
    return v


def _model():
    nn = pytest.importorskip("flax.linen")
    f64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(3, (2, 2), padding="VALID", **f64)(x))  # (N, 3, 3, 3)
            x = nn.LayerNorm(**f64)(x).reshape(x.shape[0], -1)  # 27
            x = nn.relu(nn.Dense(4, **f64)(x))
            return nn.Dense(3, **f64)(x)

    return Net()


def test_first_step_matches_per_example_reference(x64):
    linen_capture = pytest.importorskip("sofim_optax.curvature.linen")
    model = _model()
    n = 7
    rng = _rng(0)
    x = arr(rng.standard_normal((n, 4, 4, 2)), jnp.float64)
    y = jnp.asarray(np.arange(n) % 3)
    variables = jax.jit(model.init)(jax.random.key(0), x)

    def loss_fn(v, x, y):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model.apply(v, x), y))

    damping = 0.05
    # (dense_block_size, batch_chunk, inverse): Dense_0 has d_a = 28, Dense_1 d_a = 5.
    configs = [
        (None, None, "cholesky"),
        (5, None, "cholesky"),
        (5, 2, "cholesky"),
        (3, 3, "eigh"),
        (8, 4, "inv"),
    ]
    txs = [
        scale_by_mini_block_fisher(damping=damping, dense_block_size=b, batch_chunk=c, inverse=i)
        for b, c, i in configs
    ]

    @jax.jit
    def run(variables):
        _, grads, stats = linen_capture.value_grad_and_stats(loss_fn, variables, x, y)
        per_example = jax.vmap(
            jax.grad(lambda v, xi, yi: loss_fn(v, xi[None], yi[None])), in_axes=(None, 0, 0)
        )(variables, x, y)
        outs = [tx.update(grads, tx.init(variables), variables, layer_stats=stats)[0] for tx in txs]
        return grads, stats, per_example, outs

    grads, stats, per_example, outs = run(variables)
    assert sorted(stats) == ["Conv_0", "Dense_0", "Dense_1", "LayerNorm_0"]
    assert stats["LayerNorm_0"].layer_kind == "scale_shift"
    g, pe = grads["params"], per_example["params"]
    for (block, chunk, inverse), upd in zip(configs, outs):
        u = upd["params"]
        where = f"dense_block_size={block}, batch_chunk={chunk}, inverse={inverse}"
        for name in ("Dense_0", "Dense_1"):
            want = ref_dense(
                stack_v(pe[name]["kernel"], pe[name]["bias"]),
                stack_v(g[name]["kernel"], g[name]["bias"]),
                damping,
                block,
            )
            got = stack_v(u[name]["kernel"], u[name]["bias"])
            assert u[name]["kernel"].dtype == jnp.float64
            np.testing.assert_allclose(
                got, want, rtol=1e-8, atol=1e-10 * np.abs(want).max(), err_msg=f"{name} {where}"
            )
        want_k, want_b = ref_conv(
            pe["Conv_0"]["kernel"],
            pe["Conv_0"]["bias"],
            np.asarray(g["Conv_0"]["kernel"]),
            np.asarray(g["Conv_0"]["bias"]),
            damping,
        )
        np.testing.assert_allclose(
            u["Conv_0"]["kernel"],
            want_k,
            rtol=1e-8,
            atol=1e-10 * np.abs(want_k).max(),
            err_msg=where,
        )
        np.testing.assert_allclose(u["Conv_0"]["bias"], want_b, rtol=1e-8, err_msg=where)
        # Diagonal fallback for the norm parameters, with their exact per-example diagonal
        # (the first EMA is the statistic itself): g / (mean_n g_n² + λ).
        for leaf in ("scale", "bias"):
            gl = np.asarray(g["LayerNorm_0"][leaf])
            diagonal = np.mean(np.square(pe["LayerNorm_0"][leaf]), axis=0)
            assert np.all(diagonal > 1.5 * gl**2)  # (not the minibatch square it used to be)
            np.testing.assert_allclose(
                u["LayerNorm_0"][leaf], gl / (diagonal + damping), rtol=1e-10, err_msg=where
            )


@pytest.mark.slow  # (one of the suite's slowest, 5-11 s; make test-slow)
def test_steps_without_a_statistics_update_do_not_cut_patches(x64):
    # The captured statistics are deferred: with stats_period > 1 the convolution's patches
    # (N, T, k·c_in) may only be formed inside the statistics update's lax.cond branch, never
    # in the step's top-level program, which runs on every step.
    from sofim_optax.curvature import linen as linen_capture

    model = _model()
    x = jnp.ones((5, 4, 4, 2), jnp.float64)
    y = jnp.zeros((5,), jnp.int32)
    params = model.init(jax.random.key(0), x)

    def loss_fn(p):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y))

    def top_level_shapes(materialised):
        tx = scale_by_mini_block_fisher(stats_period=3, inverse_period=10)
        state = tx.init(params)

        def step(p, s):
            _, grads, stats = linen_capture.value_grad_and_stats(loss_fn, p)
            if materialised:  # plain statistics: their fields are formed where they are built
                stats = {
                    k: LayerStats(*v) for k, v in stats.items() if v.layer_kind != "scale_shift"
                }
            return tx.update(grads, s, p, layer_stats=stats)

        patches = linen_capture.value_grad_and_stats(loss_fn, params)[2]["Conv_0"].inputs.shape
        eqns = jax.make_jaxpr(step)(params, state).jaxpr.eqns
        return patches, {tuple(v.aval.shape) for e in eqns for v in e.outvars}

    patches, plain = top_level_shapes(True)
    assert patches == (5, 9, 8) and patches in plain  # the check can see them
    patches, deferred = top_level_shapes(False)
    assert patches not in deferred


def test_dense_with_positions_and_conv_with_one_position(x64):
    # A Dense applied over positions (stats (N, T, d)) and a 1-D conv with one output position
    # (stats (N, 1, d); a convolution's statistics always keep the position axis).
    params = {
        "seq": {"kernel": zeros((3, 4), jnp.float64), "bias": zeros((4,), jnp.float64)},
        "conv1d": {"kernel": zeros((2, 3, 2), jnp.float64)},
    }
    stats = {
        "seq": rand_stats(0, 5, 3, 4, t=3, dtype=jnp.float64),
        "conv1d": rand_stats(1, 5, 6, 2, t=1, dtype=jnp.float64),
    }
    grads = rand_like(2, params)
    damping = 0.1
    tx = scale_by_mini_block_fisher(damping=damping, dense_block_size=3, batch_chunk=2)
    upd = jax.jit(lambda g: tx.update(g, tx.init(params), params, layer_stats=stats)[0])(grads)
    a = np.asarray(stats["seq"].inputs, np.float64)
    a = np.concatenate([a, np.ones(a.shape[:-1] + (1,))], axis=-1)
    gs = np.asarray(stats["seq"].output_grads, np.float64)
    per_example = np.stack(
        [sum(np.outer(a[i, t], gs[i, t]) for t in range(a.shape[1])) for i in range(a.shape[0])]
    )
    want = ref_dense(per_example, stack_v(grads["seq"]["kernel"], grads["seq"]["bias"]), damping, 3)
    np.testing.assert_allclose(stack_v(upd["seq"]["kernel"], upd["seq"]["bias"]), want, rtol=1e-9)
    x, go = np.asarray(stats["conv1d"].inputs)[:, 0], np.asarray(stats["conv1d"].output_grads)[:, 0]
    pk = np.einsum("nk,no->nko", x, go).reshape(5, 2, 3, 2)  # per-example kernel gradients
    out = np.zeros((2, 3, 2))
    gk = np.asarray(grads["conv1d"]["kernel"])
    for i in range(3):
        for o in range(2):
            F = pk[:, :, i, o].T @ pk[:, :, i, o] / 5
            out[:, i, o] = np.linalg.solve(F + damping * np.eye(2), gk[:, i, o])
    np.testing.assert_allclose(upd["conv1d"]["kernel"], out, rtol=1e-9)


# ----------------------------------------------------------------------------------------
# Blockify / deblockify and padding.
# ----------------------------------------------------------------------------------------


BLOCKING_CASES = [
    # (kernel shape, has bias, dense_block_size)
    ((5, 3), True, None),
    ((5, 3), True, 4),  # d_a 6: 2 chunks of 3, no padding
    ((7, 2), True, 3),  # d_a 8: 3 chunks of 3, one padded entry per column
    ((7, 2), False, 2),  # d_a 7: 4 chunks of 2, one padded entry
    ((784, 10), True, 64),  # d_a 785: 13 chunks of 61, 8 padded entries
    ((1000, 3), True, 64),  # d_a 1001: 16 chunks of 63, 7 padded entries
    ((1, 4), True, 64),
    ((3, 3, 2, 4), True, 64),
    ((3, 3, 2, 4), False, 64),
    ((2, 5, 3), True, 64),  # 1-D conv
    ((1, 1, 3, 2), True, 64),  # 1x1 conv: 1x1 blocks for kernel and bias
]


@pytest.mark.parametrize("kshape, has_bias, block", BLOCKING_CASES)
def test_blockify_deblockify_identity_and_padding(kshape, has_bias, block):
    layer = layerwise.Layer("l", 0, 1 if has_bias else None, kshape)
    b = layer_blocking(layer, block)
    v = (_rng(0).standard_normal((layer.d_a, layer.d_out)) + 1.0).astype(np.float32)  # no zeros
    parts = jax.jit(b.blockify)(v)
    assert [p.shape for p in parts] == [(count, size) for size, count in b.segments]
    assert sum(int(np.prod(p.shape)) for p in parts) == v.size + b.padding * layer.d_out
    np.testing.assert_array_equal(jax.jit(b.deblockify)(parts), v)
    masks = b.pad_mask(jnp.float32)
    for p, m in zip(parts, masks):
        p = np.asarray(p)
        if m is None:
            assert np.all(p != 0)  # every entry is a real one
        else:
            m = np.asarray(m).astype(bool)
            assert m.sum() == b.padding * layer.d_out
            np.testing.assert_array_equal(p[m], 0.0)
            assert np.all(p[~m] != 0)
    if b.kind == "dense":
        assert b.chunk <= (layer.d_a if block is None else block)
        assert b.padding < b.n_chunks  # balanced chunks: less than one entry per chunk
        # Block j·n_chunks + c holds the entries of chunk c of column j.
        idx = dense_chunks(layer.d_a, block)
        for j in (0, layer.d_out - 1):
            for c, rows in enumerate(idx):
                np.testing.assert_array_equal(
                    np.asarray(parts[0])[j * b.n_chunks + c, : len(rows)], v[rows, j]
                )
    else:
        kernel = v[: layer.d_in].reshape(kshape)
        np.testing.assert_array_equal(
            np.asarray(parts[0])[1 * layer.d_out + 2 % layer.d_out],
            kernel[..., 1, 2 % layer.d_out].ravel(),
        )


def test_padding_does_not_leak(x64):
    # d_a = 8 with B = 3: one padded coordinate per column. The padded rows/columns of the
    # EF blocks are exactly zero and the inverse does not couple them to real coordinates.
    layer = layerwise.Layer("l", 0, 1, (7, 2))
    b = layer_blocking(layer, 3)
    st = rand_stats(0, 6, 7, 2, dtype=jnp.float64)
    packed = batch_blocks(b, st.inputs, st.output_grads, jnp.float64, batch_chunk=4)[0]
    f = np.asarray(mini_blocks.unpack(packed, b.chunk))
    last = f[b.n_chunks - 1 :: b.n_chunks]  # last chunk of every column
    np.testing.assert_array_equal(last[:, -1, :], 0.0)
    np.testing.assert_array_equal(last[:, :, -1], 0.0)
    params = {"l": {"kernel": zeros((7, 2), jnp.float64), "bias": zeros((2,), jnp.float64)}}
    tx = scale_by_mini_block_fisher(
        damping=jnp.asarray(0.0), dense_block_size=3
    )  # no damping: pads are singular
    upd, state = jax.jit(lambda g: tx.update(g, tx.init(params), params, layer_stats={"l": st}))(
        rand_like(1, params)
    )
    inv = np.asarray(state.curvature.inverses["b3"])[b.n_chunks - 1 :: b.n_chunks]
    np.testing.assert_array_equal(inv[:, -1, :-1], 0.0)
    np.testing.assert_array_equal(inv[:, :-1, -1], 0.0)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(upd))


def test_block_layout_stacks_by_size():
    params = {
        "conv_a": {"kernel": zeros((3, 3, 2, 4)), "bias": zeros((4,))},
        "conv_b": {"kernel": zeros((3, 3, 4, 4)), "bias": zeros((4,))},
        "dense": {"kernel": zeros((8, 3)), "bias": zeros((3,))},
    }
    layout = BlockLayout.build(layerwise.discover_layers(params), 9)
    # b9: 8 + 16 conv pairs, then the dense column (d_a 9, one chunk) of 3 units; b1: 4 + 4 biases.
    assert dict(layout.sizes) == {"b9": 8 + 16 + 3, "b1": 8}
    state = jax.eval_shape(scale_by_mini_block_fisher(dense_block_size=9).init, params)
    # Packed upper triangles: 9·10/2 = 45 entries per 9×9 block, 1 per 1×1 block.
    assert {k: v.shape for k, v in state.curvature.blocks.items()} == {
        "b9": (27, 45),
        "b1": (8, 1),
    }


def test_pack_and_unpack_are_inverse(x64):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 5, 5))
    sym = a + np.swapaxes(a, 1, 2)
    packed = mini_blocks.pack(jnp.asarray(sym))
    assert packed.shape == (4, mini_blocks.packed_size(5)) == (4, 15)
    rows, cols = np.triu_indices(5)
    np.testing.assert_array_equal(np.asarray(packed), sym[:, rows, cols])
    np.testing.assert_array_equal(np.asarray(mini_blocks.unpack(packed, 5)), sym)


def test_packed_outer_is_the_packed_outer_product(x64):
    x = np.random.default_rng(1).standard_normal((3, 2, 6))
    rows, cols = np.triu_indices(6)
    expected = np.einsum("...i,...j->...ij", x, x)[..., rows, cols]
    np.testing.assert_array_equal(np.asarray(mini_blocks.packed_outer(jnp.asarray(x))), expected)


def test_update_in_place_touches_only_the_listed_layers(x64):
    params = {
        "a": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros((2,))},
        "b": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros((2,))},
    }
    layout = BlockLayout.build(layerwise.discover_layers(params), 4)
    stacks = {k: jnp.arange(n * 10.0).reshape(n, 10) for k, n in layout.sizes.items()}
    out = layout.update_in_place(stacks, [1], lambda i, s, old: -old - i)
    before, after = layout.split(stacks, [0, 1]), layout.split(out, [0, 1])
    for old, new in zip(before[0], after[0]):
        np.testing.assert_array_equal(new, old)
    for old, new in zip(before[1], after[1]):
        np.testing.assert_array_equal(new, -old - 1)


# ----------------------------------------------------------------------------------------
# EMA and periods.
# ----------------------------------------------------------------------------------------


def per_example_dense(stats):
    """``v_n = ā_n g_nᵀ`` for dense statistics, shape ``(N, d_in + 1, d_out)``."""
    a = np.asarray(stats.inputs, np.float64)
    a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
    g = np.asarray(stats.output_grads, np.float64)
    per_example = np.einsum("na,nj->naj", a, g)
    return per_example


def test_ema_and_period_semantics(x64):
    ema, damping, block = 0.6, 1e-2, 2
    params = {"d": {"kernel": zeros((3, 2), jnp.float64), "bias": zeros((2,), jnp.float64)}}
    tx = scale_by_mini_block_fisher(
        damping=damping, ema=ema, stats_period=2, inverse_period=3, dense_block_size=block
    )
    state = jax.jit(tx.init)(params)
    update = jax.jit(tx.update)
    F_ref, F_inv, k = None, None, 0  # per (unit, chunk) EMA blocks, and as of the last refresh
    chunks = dense_chunks(4, block)
    for count in range(7):
        stats = rand_stats(10 + count, 5, 3, 2, dtype=jnp.float64)
        grads = rand_like(100 + count, params)
        upd, state = update(grads, state, params, layer_stats={"d": stats})
        if count % 2 == 0:
            k += 1
            rho = min(1 - 1 / k, ema)
            pe = per_example_dense(stats)
            hat = {
                (j, c): pe[:, idx, j].T @ pe[:, idx, j] / 5
                for j in range(2)
                for c, idx in enumerate(chunks)
            }
            F_ref = (
                hat
                if F_ref is None
                else {key: rho * F_ref[key] + (1 - rho) * hat[key] for key in hat}
            )
        assert int(state.curvature.stat_updates[0]) == k
        blocks = np.asarray(mini_blocks.unpack(state.curvature.blocks["b2"], block))
        for (j, c), f in F_ref.items():
            np.testing.assert_allclose(blocks[j * len(chunks) + c], f, rtol=1e-12)
        if count % 3 == 0:
            F_inv = dict(F_ref)
        V = stack_v(grads["d"]["kernel"], grads["d"]["bias"])
        want = np.zeros_like(V)
        for (j, c), f in F_inv.items():
            idx = chunks[c]
            want[idx, j] = np.linalg.solve(f + damping * np.eye(len(idx)), V[idx, j])
        np.testing.assert_allclose(
            stack_v(upd["d"]["kernel"], upd["d"]["bias"]), want, rtol=1e-9, err_msg=str(count)
        )


# ----------------------------------------------------------------------------------------
# A damping changed at run time (optax.inject_hyperparams).
# ----------------------------------------------------------------------------------------

# A dense layer whose chunks are padded (d_a 8, B 3: one padded entry per column) and a conv
# layer (2×2 kernel, 2 → 3 channels, 4 positions); inverses refreshed at counts 0 and 3.
_PERIOD, _BLOCK = 3, 3


def _damping_case():
    f64 = jnp.float64
    params = {
        "dense": {"kernel": zeros((7, 2), f64), "bias": zeros((2,), f64)},
        "conv": {"kernel": zeros((2, 2, 2, 3), f64), "bias": zeros((3,), f64)},
    }
    steps = [
        (
            {
                "dense": rand_stats(20 + t, 5, 7, 2, dtype=f64),
                "conv": rand_stats(40 + t, 5, 8, 3, t=4, dtype=f64),
            },
            rand_like(60 + t, params),
        )
        for t in range(_PERIOD + 1)
    ]
    return params, steps


def _reference(stats_list, grads, damping):
    """Per-block ``(F_b + λI)⁻¹ u_b`` with ``F_b`` the plain mean of the batch blocks of
    ``stats_list`` (what the EMA is after ``k ≤ 1/(1 − ema)`` updates), from per-example
    gradients of all their examples together."""
    pe_dense = np.concatenate([per_example_dense(s["dense"]) for s in stats_list])
    dense = ref_dense(
        pe_dense, stack_v(grads["dense"]["kernel"], grads["dense"]["bias"]), damping, _BLOCK
    )
    x = np.concatenate([np.asarray(s["conv"].inputs, np.float64) for s in stats_list])
    g = np.concatenate([np.asarray(s["conv"].output_grads, np.float64) for s in stats_list])
    pk = np.einsum("ntk,nto->nko", x, g).reshape((x.shape[0],) + grads["conv"]["kernel"].shape)
    conv_k, conv_b = ref_conv(
        pk,
        g.sum(axis=1),
        np.asarray(grads["conv"]["kernel"]),
        np.asarray(grads["conv"]["bias"]),
        damping,
    )
    return {"dense": dense, "conv_kernel": conv_k, "conv_bias": conv_b}


def _assert_matches(upd, want, err_msg):
    got = {
        "dense": stack_v(upd["dense"]["kernel"], upd["dense"]["bias"]),
        "conv_kernel": np.asarray(upd["conv"]["kernel"]),
        "conv_bias": np.asarray(upd["conv"]["bias"]),
    }
    for key, w in want.items():
        np.testing.assert_allclose(
            got[key], w, rtol=1e-9, atol=1e-12 * np.abs(w).max(), err_msg=f"{err_msg} {key}"
        )


def _injected(inverse, damping):
    f = scale_by_mini_block_fisher
    return optax.inject_hyperparams(f, static_args=f.static_args)(
        damping=damping,
        ema=0.9,
        stats_period=1,
        inverse_period=_PERIOD,
        dense_block_size=_BLOCK,
        inverse=inverse,
    )


def _flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def test_eigh_applies_a_damping_change_at_once(x64):
    """``inverse="eigh"``: a damping changed between two refreshes acts at the next step and
    equals the per-block solve with the new damping of the blocks of the last refresh, and
    the Cholesky path refreshed with that damping."""
    params, steps = _damping_case()
    lam0, lam1 = 1e-2, 0.3
    tx = _injected("eigh", lam0)
    update = jax.jit(lambda g, s, st: tx.update(g, s, params, layer_stats=st))
    state = tx.init(params)
    assert state.inner_state.curvature.inverses == {}
    for stats, grads in steps[:2]:
        _, state = update(grads, state, stats)
    stats, grads = steps[2]  # count 2: statistics update, no refresh
    same, _ = update(grads, state, stats)
    _assert_matches(same, _reference([steps[0][0]], grads, lam0), "old damping")
    state.hyperparams["damping"] = jnp.asarray(lam1, state.hyperparams["damping"].dtype)
    got, state = update(grads, state, stats)
    _assert_matches(got, _reference([steps[0][0]], grads, lam1), "new damping")
    assert not np.allclose(_flat(got), _flat(same))

    chol = scale_by_mini_block_fisher(
        damping=lam1, ema=0.9, stats_period=1, inverse_period=_PERIOD, dense_block_size=_BLOCK
    )
    chol_update = jax.jit(lambda g, s, st: chol.update(g, s, params, layer_stats=st))
    chol_state = chol.init(params)
    for stats, grads in steps[:3]:
        want, chol_state = chol_update(grads, chol_state, stats)
    np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-9, atol=1e-12)
    # At the next refresh (count 3) both use the blocks averaged over the four batches.
    stats, grads = steps[3]
    got, _ = update(grads, state, stats)
    want, _ = chol_update(grads, chol_state, stats)
    np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-9, atol=1e-12)
    _assert_matches(got, _reference([s for s, _ in steps], grads, lam1), "after refresh")


@pytest.mark.parametrize("inverse", ["cholesky", "inv"])
def test_explicit_inverses_apply_a_damping_change_at_the_next_refresh(x64, inverse):
    """``"cholesky"``/``"inv"`` (documented): the damping is baked into the inverses, so a
    change leaves the update unchanged until the next inverse refresh, then takes effect."""
    params, steps = _damping_case()
    lam0, lam1 = 1e-2, 0.3
    tx = _injected(inverse, lam0)
    update = jax.jit(lambda g, s, st: tx.update(g, s, params, layer_stats=st))
    state = tx.init(params)
    assert state.inner_state.curvature.eigvals == {} == state.inner_state.curvature.eigvecs
    for stats, grads in steps[:2]:
        _, state = update(grads, state, stats)
    state.hyperparams["damping"] = jnp.asarray(lam1, state.hyperparams["damping"].dtype)
    stats, grads = steps[2]  # no refresh: still the inverses of count 0, with λ0
    got, state = update(grads, state, stats)
    _assert_matches(got, _reference([steps[0][0]], grads, lam0), "before the refresh")
    stats, grads = steps[3]  # refresh: the blocks averaged over the four batches, with λ1
    got, _ = update(grads, state, stats)
    _assert_matches(got, _reference([s for s, _ in steps], grads, lam1), "at the refresh")


# ----------------------------------------------------------------------------------------
# Fallback and errors.
# ----------------------------------------------------------------------------------------


def _params_with_uncovered():
    return {
        "Dense_0": {"kernel": ones((3, 4)), "bias": zeros((4,))},
        "Dense_1": {"kernel": ones((4, 2)), "bias": zeros((2,))},  # missing from stats
        "BatchNorm_0": {"scale": ones((4,)), "bias": zeros((4,))},
    }


def test_fallbacks_and_logging(caplog):
    params = _params_with_uncovered()
    grads = rand_like(0, params)
    stats = {"Dense_0": rand_stats(1, 5, 3, 4)}
    txs = [
        scale_by_mini_block_fisher(damping=0.1),
        scale_by_mini_block_fisher(fallback=None),
        scale_by_mini_block_fisher(fallback=optax.scale(3.0)),
    ]

    @jax.jit
    def run(grads):
        return [tx.update(grads, tx.init(params), params, layer_stats=stats)[0] for tx in txs]

    with caplog.at_level(logging.INFO, logger="sofim_optax"):
        diag, ident, scaled = run(grads)
    for name, leaf in [("Dense_1", "kernel"), ("Dense_1", "bias"), ("BatchNorm_0", "scale")]:
        gl = np.asarray(grads[name][leaf])
        np.testing.assert_allclose(diag[name][leaf], gl / (gl**2 + 0.1), rtol=1e-6)
        np.testing.assert_array_equal(ident[name][leaf], gl)
        np.testing.assert_allclose(scaled[name][leaf], 3 * gl, rtol=1e-6)
    assert not np.allclose(ident["Dense_0"]["kernel"], grads["Dense_0"]["kernel"])
    lines = [
        r.getMessage() for r in caplog.records if "scale_by_mini_block_fisher" in r.getMessage()
    ]
    assert len(lines) == 3 and "Dense_1/kernel" in lines[0] and "BatchNorm_0/scale" in lines[0]


def test_diagonal_fisher_uses_raw_gradients_and_periods():
    params = {"a": ones((3,)), "b": {"c": ones((2,))}}
    tx = scale_by_diagonal_fisher(damping=0.5, ema=0.5, stats_period=2)
    state = jax.jit(tx.init)(params)
    step = jax.jit(tx.update)
    nu = None
    k = 0
    for count in range(4):
        g = rand_like(count, params)
        m = rand_like(10 + count, params)  # e.g. a momentum
        out, state = step(m, state, gradients={"x": ones((1,)), **g})  # extra leaves are ignored
        if count % 2 == 0:
            k += 1
            rho = min(1 - 1 / k, 0.5)
            sq = jax.tree.map(lambda x: np.asarray(x) ** 2, g)
            nu = sq if nu is None else jax.tree.map(lambda a, b: rho * a + (1 - rho) * b, nu, sq)
        jax.tree.map(
            lambda o, mm, n: np.testing.assert_allclose(o, np.asarray(mm) / (n + 0.5), rtol=1e-6),
            out,
            m,
            nu,
        )


def test_missing_and_unknown_layer_stats_errors():
    params = mlp_params()
    tx = scale_by_mini_block_fisher()
    state = jax.eval_shape(tx.init, params)
    with pytest.raises(TypeError, match=r"value_grad_and_stats.*Dense_0"):
        jax.eval_shape(tx.update, params, state, params)
    with pytest.raises(ValueError, match=r"'Dense_O'.*Did you mean.*Dense_0"):
        jax.eval_shape(
            functools.partial(tx.update, layer_stats={"Dense_O": rand_stats(0, 4, 3, 4)}),
            params,
            state,
            params,
        )
    bad = {
        "Dense_0": LayerStats(ones((4, 5)), ones((4, 4)), None),
        "Dense_1": rand_stats(0, 4, 4, 2),
    }
    with pytest.raises(ValueError, match="'Dense_0'.*inputs have last dimension 5"):
        jax.eval_shape(functools.partial(tx.update, layer_stats=bad), params, state, params)


def test_constructor_errors():
    for kwargs, match in [
        (dict(inverse="svd"), "inverse"),
        (dict(ema=1.0), "ema"),
        (dict(damping=-1.0), "damping"),
        (dict(dense_block_size=0), "dense_block_size"),
        (dict(batch_chunk=0), "batch_chunk"),
        (dict(fallback="adam"), "fallback"),
        (dict(inverse_period=0), "inverse_period"),
        (dict(stats_period=-1), "stats_period"),
    ]:
        with pytest.raises(ValueError, match=match):
            scale_by_mini_block_fisher(**kwargs)
    # A shape-fixing argument that is not a Python int is a type error naming static_args.
    for value in (2.5, jnp.asarray(8)):
        with pytest.raises(TypeError, match="dense_block_size must be a Python int.*static_args"):
            scale_by_mini_block_fisher(dense_block_size=value)


# ----------------------------------------------------------------------------------------
# The alias's momentum and degenerate statistics (the rest of the optax conformance:
# tests/test_conformance.py).
# ----------------------------------------------------------------------------------------


def test_alias_with_gradient_momentum_is_momentum_before_the_preconditioner():
    """The composition with gradient momentum (without: tests/test_conformance.py)."""
    params = mlp_params()
    stats = stats_for(params, 1)
    grads_list = [rand_like(i, params) for i in range(3)]
    assert mbf is mini_block_fisher
    opt = mbf(0.1, gradient_momentum=0.5, damping=1e-2, weight_decay=1e-2, dense_block_size=2)
    inner = scale_by_mini_block_fisher(damping=1e-2, dense_block_size=2)
    tr = optax.trace(0.5)

    @jax.jit
    def run(grads_list):
        s, t, i = opt.init(params), tr.init(params), inner.init(params)
        out = []
        for grads in grads_list:
            u, s = opt.update(grads, s, params, layer_stats=stats)
            # By hand: momentum on the raw gradient, then the preconditioner (whose diagonal
            # fallback sees the raw gradient), decoupled weight decay, learning rate.
            m, t = tr.update(grads, t, params)
            p, i = inner.update(m, i, params, layer_stats=stats, gradients=grads)
            w = jax.tree.map(lambda a, q: -0.1 * (a + 1e-2 * q), p, params)
            out.append((u, w))
        return out

    for u, w in run(grads_list):
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(w)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_degenerate_statistics_stay_finite():
    params = mlp_params()
    # Zero damping with all-zero and rank-one statistics: finite (Cholesky breakdown -> eigh).
    degenerate = {
        "Dense_0": LayerStats(zeros((4, 3)), zeros((4, 4)), None),
        "Dense_1": rand_stats(0, 1, 4, 2),
    }
    tx = scale_by_mini_block_fisher(damping=jnp.asarray(0.0))  # traced: floored
    u, s = jax.jit(lambda g: tx.update(g, tx.init(params), params, layer_stats=degenerate))(
        rand_like(1, params)
    )
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves((u, s)))


# ----------------------------------------------------------------------------------------
# A tiny convergence check.
# ----------------------------------------------------------------------------------------


def test_mbf_beats_tuned_sgd_on_softmax_regression():
    n, d, c = 256, 8, 4
    rng = _rng(0)
    z = rng.standard_normal((n, d))
    x = arr(z * np.logspace(-1.5, 1, d) + 1.0)  # badly scaled, off-centre features
    logits = z @ (0.7 * rng.standard_normal((d, c)))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = jnp.asarray([rng.choice(c, p=row) for row in p])
    params = {"Dense_0": {"kernel": zeros((d, c)), "bias": zeros((c,))}}

    def loss_and_stats(q):
        out = x @ q["Dense_0"]["kernel"] + q["Dense_0"]["bias"]
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, y))
        per_example = jax.nn.softmax(out) - jax.nn.one_hot(y, c)
        return loss, {"Dense_0": LayerStats(x, per_example, out)}

    def final_loss(opt, steps=40):
        def step(carry, _):
            q, s = carry
            (loss, stats), grads = jax.value_and_grad(loss_and_stats, has_aux=True)(q)
            u, s = opt.update(grads, s, q, layer_stats=stats)
            return (optax.apply_updates(q, u), s), loss

        (q, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
        return loss_and_stats(q)[0]

    opts = [mbf(0.1, gradient_momentum=0.9, damping=1e-2, inverse_period=5)] + [
        optax.sgd(lr, momentum=0.9) for lr in (0.01, 0.03, 0.1, 0.3)
    ]
    losses = [float(v) for v in jax.jit(lambda: [final_loss(o) for o in opts])()]
    mbf_loss, sgd = losses[0], [v if np.isfinite(v) else np.inf for v in losses[1:]]
    assert mbf_loss < 0.7 * np.log(4.0), losses
    assert mbf_loss < min(sgd) - 0.03, losses
