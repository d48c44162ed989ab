"""KFAC (``sofim_optax.kfac``) against dense references and its method-specific semantics
(the common optax checks: ``tests/test_conformance.py``).

Statistics are built by hand from random arrays (``LayerStats``), independently of the
capture adapters.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sofim_optax import layerwise, linalg
from sofim_optax.curvature import LayerStats
from sofim_optax.kfac import kfac, scale_by_kfac

INVERSES = ["eigh", "cholesky", "inv"]


# ----------------------------------------------------------------------------------------
# Independent float64 references.
# ----------------------------------------------------------------------------------------


def ref_factors(inputs, output_grads, has_bias):
    """A and G with explicit loops over examples (and positions), float64."""
    a = np.asarray(inputs, np.float64)
    g = np.asarray(output_grads, np.float64)
    if a.ndim == 2:
        a, g = a[:, None], g[:, None]
    n, t = a.shape[:2]
    if has_bias:
        a = np.concatenate([a, np.ones((n, t, 1))], axis=-1)
    A = np.zeros((a.shape[-1],) * 2)
    G = np.zeros((g.shape[-1],) * 2)
    for i in range(n):
        for j in range(t):
            A += np.outer(a[i, j], a[i, j])
            G += np.outer(g[i, j], g[i, j])
    A /= n * t
    G = t * G / (n * t)  # KFC scaling for conv; t = 1 for dense
    return A, G


def ref_solve(A, G, V, damping, pi_adjusted):
    """(A_d ⊗ G_d)⁻¹ vec_r(V) through an explicit Kronecker product."""
    pi = np.sqrt((np.trace(A) / A.shape[0]) / (np.trace(G) / G.shape[0])) if pi_adjusted else 1.0
    Ad = A + pi * np.sqrt(damping) * np.eye(A.shape[0])
    Gd = G + np.sqrt(damping) / pi * np.eye(G.shape[0])
    return np.linalg.solve(np.kron(Ad, Gd), np.asarray(V, np.float64).reshape(-1)).reshape(V.shape)


def grad_matrix(kernel_grad, bias_grad=None):
    k = np.asarray(kernel_grad, np.float64)
    v = k.reshape(-1, k.shape[-1])
    if bias_grad is not None:
        v = np.concatenate([v, np.asarray(bias_grad, np.float64)[None]], axis=0)
    return v


def _rng(key) -> np.random.Generator:
    return np.random.default_rng(key)


def arr(x, dtype=jnp.float32) -> jax.Array:
    """A device array made on the host (casting on device would compile a kernel)."""
    return jnp.asarray(np.asarray(x).astype(dtype))


# Test data comes from numpy (an eager jax.random call compiles a kernel per shape, which
# would dominate the run time of this file).
def rand_stats(key, n, d_in, d_out, t=None, dtype=jnp.float32, scale_in=1.0, scale_out=1.0):
    rng = _rng(key)
    shape_in = (n, d_in) if t is None else (n, t, d_in)
    shape_out = (n, d_out) if t is None else (n, t, d_out)
    x = scale_in * rng.standard_normal(shape_in) + 0.3
    g = scale_out * rng.standard_normal(shape_out)
    return LayerStats(inputs=arr(x, dtype), output_grads=arr(g, dtype), outputs=None)


def rand_like(key, tree):
    rng = _rng(key)
    return jax.tree.map(lambda l: arr(rng.standard_normal(l.shape), l.dtype), tree)


def mlp_params(dtype=jnp.float32, sizes=((3, 4), (4, 2))):
    rng = _rng(0)
    return {
        f"Dense_{i}": {
            "kernel": arr(rng.standard_normal((a, b)), dtype),
            "bias": arr(np.zeros((b,)), dtype),
        }
        for i, (a, b) in enumerate(sizes)
    }


def zeros(shape, dtype=jnp.float32):
    return arr(np.zeros(shape), dtype)


def ones(shape, dtype=jnp.float32):
    return arr(np.ones(shape), dtype)


def first_updates(txs, grads, params, stats):
    """``init`` + one ``update`` of every transformation in ``txs``, in ONE jitted call.

    (Each XLA compilation costs about a second on a loaded CPU, so tests batch them.)
    """

    @jax.jit
    def run(grads, params, stats):
        return [tx.update(grads, tx.init(params), params, layer_stats=stats) for tx in txs]

    return run(grads, params, stats)


# ----------------------------------------------------------------------------------------
# First step against the dense reference.
# ----------------------------------------------------------------------------------------


LAYER_CASES = {
    # name: (kernel shape, has bias, positions T or None for dense)
    "dense": ((5, 3), True, None),
    "dense_nobias": ((4, 3), False, None),
    "conv": ((2, 2, 3, 4), True, 6),
    "conv1d_nobias": ((3, 2, 5), False, 4),
}


def test_first_step_matches_dense_reference(x64):
    # All layer kinds in one parameter tree, nested one level down; every inverse option with
    # pi_adjusted both ways.
    params, stats = {"block": {}}, {}
    for i, case in enumerate(sorted(LAYER_CASES)):
        kshape, has_bias, t = LAYER_CASES[case]
        d_in, d_out = int(np.prod(kshape[:-1])), kshape[-1]
        layer = {"kernel": zeros(kshape, jnp.float64)}
        if has_bias:
            layer["bias"] = zeros((d_out,), jnp.float64)
        params["block"][case] = layer
        # Input and output scales far apart so that π matters.
        stats[f"block/{case}"] = rand_stats(
            i, 7, d_in, d_out, t, jnp.float64, scale_in=2.0, scale_out=0.05
        )
    grads = rand_like(2, params)
    damping = 1e-3
    configs = [(inverse, pi) for inverse in INVERSES for pi in (True, False)]
    txs = [
        scale_by_kfac(damping=damping, pi_adjusted=pi, inverse=inverse) for inverse, pi in configs
    ]
    results = first_updates(txs, grads, params, stats)

    for (inverse, pi), (updates, _) in zip(configs, results):
        for case, (kshape, has_bias, _) in LAYER_CASES.items():
            st = stats[f"block/{case}"]
            A, G = ref_factors(st.inputs, st.output_grads, has_bias)
            g = grads["block"][case]
            want = ref_solve(A, G, grad_matrix(g["kernel"], g.get("bias")), damping, pi)
            u = updates["block"][case]
            where = f"{case}, inverse={inverse}, pi_adjusted={pi}"
            assert u["kernel"].shape == kshape and u["kernel"].dtype == jnp.float64, where
            np.testing.assert_allclose(
                grad_matrix(u["kernel"], u.get("bias")),
                want,
                rtol=1e-7,
                atol=1e-9 * np.abs(want).max(),
                err_msg=where,
            )


def test_first_step_float32_close_to_reference():
    params = {"conv": {"kernel": zeros((3, 3, 2, 4)), "bias": zeros((4,))}}
    stats = rand_stats(3, 8, 18, 4, t=5)
    grads = rand_like(4, params)
    txs = [scale_by_kfac(damping=1e-2, inverse=inverse) for inverse in INVERSES]
    A, G = ref_factors(stats.inputs, stats.output_grads, True)
    want = ref_solve(A, G, grad_matrix(grads["conv"]["kernel"], grads["conv"]["bias"]), 1e-2, True)
    for inverse, (updates, state) in zip(
        INVERSES, first_updates(txs, grads, params, {"conv": stats})
    ):
        got = grad_matrix(updates["conv"]["kernel"], updates["conv"]["bias"])
        np.testing.assert_allclose(
            got, want, rtol=2e-3, atol=2e-4 * np.abs(want).max(), err_msg=inverse
        )
        assert updates["conv"]["kernel"].dtype == jnp.float32
        assert all(f.dtype == jnp.float32 for f in state.curvature.factors.values())


def test_layer_paths_linen_variables_dict():
    inner = {"Encoder_0": {"Dense_1": {"kernel": zeros((3, 2)), "bias": zeros((2,))}}}
    stats = {"Encoder_0/Dense_1": rand_stats((0), 5, 3, 2)}
    tx = scale_by_kfac(damping=0.1)

    @jax.jit
    def run(grads):
        out = []
        for params in [inner, {"params": inner}]:  # plain dict and Flax linen variables dict
            g = grads if params is inner else {"params": grads}
            out.append(tx.update(g, tx.init(params), params, layer_stats=stats)[0])
        return out

    plain, linen = run(rand_like(1, inner))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(linen["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    layout = layerwise.discover_layers({"params": inner})
    assert layout.layer_paths == ("Encoder_0/Dense_1",)
    assert layout.leaf_paths == ("Encoder_0/Dense_1/bias", "Encoder_0/Dense_1/kernel")


def test_layer_discovery_rules():
    params = {
        "dense": {"kernel": zeros((3, 2)), "bias": zeros((2,))},
        "conv": {"kernel": zeros((3, 3, 2, 5)), "bias": zeros((5,))},
        "odd_bias": {"kernel": zeros((4, 2, 3)), "bias": zeros((2, 3))},  # DenseGeneral-like
        "norm": {"scale": zeros((5,)), "bias": zeros((5,))},
        "vec": {"kernel": zeros((5,))},  # ndim 1: not a layer
        "layers": [{"kernel": zeros((2, 2))}],
    }
    layout = layerwise.discover_layers(params)
    by_path = {layer.path: layer for layer in layout.layers}
    assert sorted(by_path) == ["conv", "dense", "layers/0", "odd_bias"]
    assert (by_path["conv"].d_a, by_path["conv"].d_g) == (19, 5)
    assert (by_path["dense"].d_a, by_path["dense"].d_g) == (4, 2)
    # A bias shaped like the kernel's last two axes: a DenseGeneral with features (2, 3).
    general = by_path["odd_bias"]
    assert general.has_bias and general.kind == "dense" and general.output_axes == 2
    assert (general.d_in, general.d_a, general.d_g) == (4, 5, 6)
    assert not by_path["layers/0"].has_bias
    others = sorted(layout.leaf_paths[i] for i in layout.other_leaves)
    assert others == ["norm/bias", "norm/scale", "vec/kernel"]


def test_kernel_output_axes_decide_the_reading():
    params = {
        "q": {"kernel": zeros((6, 2, 3))},  # a bias-less DenseGeneral(features=(2, 3))
        "out": {"kernel": zeros((2, 3, 6)), "bias": zeros((6,))},  # attention's output projection
        "odd": {"kernel": zeros((4, 5)), "bias": zeros((4,))},  # bias of the wrong size
    }
    by_path = {layer.path: layer for layer in layerwise.discover_layers(params).layers}
    assert (by_path["q"].kind, by_path["q"].d_in, by_path["q"].d_out) == ("conv", 12, 3)
    assert (by_path["out"].kind, by_path["out"].d_a, by_path["out"].d_out) == ("conv", 7, 6)
    assert not by_path["odd"].has_bias
    hinted = layerwise.discover_layers(params, {"q": 2, "out": 1})
    by_path = {layer.path: layer for layer in hinted.layers}
    assert (by_path["q"].kind, by_path["q"].d_in, by_path["q"].d_out) == ("dense", 6, 6)
    assert (by_path["out"].kind, by_path["out"].d_a, by_path["out"].d_out) == ("dense", 7, 6)
    with pytest.raises(ValueError, match=r"names \['nope'\].*Layer paths"):
        layerwise.discover_layers(params, {"nope": 1})
    with pytest.raises(ValueError, match=r"kernel_output_axes\['q'\] = 3.*give 1 to 2"):
        layerwise.discover_layers(params, {"q": 3})
    with pytest.raises(ValueError, match="must be an int"):
        layerwise.discover_layers(params, {"q": True})
    # A misread layer is refused with the entry that fixes it.
    stats = {"q": LayerStats(zeros((4, 1, 6)), zeros((4, 1, 6)))}
    grads = {"q": {"kernel": zeros((6, 2, 3))}}
    tx = scale_by_kfac()
    with pytest.raises(ValueError, match=r"kernel_output_axes=\{'q': 2\}"):
        tx.update(grads, tx.init(grads), layer_stats=stats)
    tx = scale_by_kfac(kernel_output_axes={"q": 2})
    upd, _ = tx.update(grads, tx.init(grads), layer_stats=stats)
    assert upd["q"]["kernel"].shape == (6, 2, 3)


def test_nnx_state_and_optimizer():
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 4, rngs=rngs)
            self.norm = nnx.LayerNorm(4, rngs=rngs)
            self.out = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.out(self.norm(self.lin(x)))

    # Everything under (nnx.)jit: eager model code would compile op by op.
    model = nnx.jit(lambda: Model(nnx.Rngs(0)))()
    x = arr(_rng(1).standard_normal((6, 3)))
    loss_fn = lambda m: jnp.mean(m(x) ** 2)
    grads = nnx.jit(nnx.grad(loss_fn))(model)
    stats = {
        "lin": rand_stats((2), 6, 3, 4),
        "out": rand_stats((3), 6, 4, 2),
    }
    tx = scale_by_kfac(damping=0.1, fallback=None)
    # An nnx.State whose leaves are nnx.Param variables, as nnx.state / nnx.grad return it.
    state_params = nnx.state(model, nnx.Param)
    assert layerwise.discover_layers(state_params).layer_paths == ("lin", "out")
    # ... and the same computation on the plain nested dict.
    plain, g = nnx.to_pure_dict(state_params), nnx.to_pure_dict(grads)

    @jax.jit
    def run(grads, state_params, g, plain):
        upd = tx.update(grads, tx.init(state_params), state_params, layer_stats=stats)[0]
        return upd, tx.update(g, tx.init(plain), plain, layer_stats=stats)[0]

    upd, upd_plain = run(grads, state_params, g, plain)
    upd = nnx.to_pure_dict(upd)
    np.testing.assert_allclose(upd["out"]["kernel"], upd_plain["out"]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(upd["lin"]["bias"], upd_plain["lin"]["bias"], rtol=1e-6)
    np.testing.assert_array_equal(upd["norm"]["scale"], g["norm"]["scale"])  # fallback: identity
    # Through nnx.Optimizer, which forwards extra keyword arguments to tx.update.
    opt = nnx.Optimizer(model, kfac(0.1, damping=0.1), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, opt, stats):
        grads = nnx.grad(loss_fn)(model)
        opt.update(model, grads, layer_stats=stats)

    before = np.asarray(model.out.kernel[...])
    train_step(model, opt, stats)
    assert not np.allclose(before, model.out.kernel[...])


def test_with_linen_capture():
    """The contract with ``curvature.linen.value_grad_and_stats``: keys, shapes, first step."""
    nn = pytest.importorskip("flax.linen")
    linen_capture = pytest.importorskip("sofim_optax.curvature.linen")

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3, 3), strides=2, padding="SAME")(x))
            x = nn.LayerNorm()(x).reshape(x.shape[0], -1)
            return nn.Dense(3, use_bias=False)(x)

    model = CNN()
    x = arr(_rng(0).standard_normal((8, 6, 6, 2)))
    y = jnp.asarray(np.arange(8) % 3)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    loss_fn = lambda v, x, y: jnp.mean(
        optax.softmax_cross_entropy_with_integer_labels(model.apply(v, x), y)
    )
    tx = scale_by_kfac(damping=1e-2, fallback=None)

    @jax.jit
    def step(variables):
        _, grads, stats = linen_capture.value_grad_and_stats(loss_fn, variables, x, y)
        return grads, stats, tx.update(grads, tx.init(variables), variables, layer_stats=stats)[0]

    grads, stats, upd = step(variables)
    assert sorted(stats) == ["Conv_0", "Dense_0", "LayerNorm_0"]
    # The identity fallback (fallback=None) leaves the norm's gradient as it is.
    np.testing.assert_array_equal(
        upd["params"]["LayerNorm_0"]["scale"], grads["params"]["LayerNorm_0"]["scale"]
    )
    for path, has_bias in [("Conv_0", True), ("Dense_0", False)]:
        A, G = ref_factors(stats[path].inputs, stats[path].output_grads, has_bias)
        g, u = grads["params"][path], upd["params"][path]
        want = ref_solve(A, G, grad_matrix(g["kernel"], g.get("bias")), 1e-2, True)
        got = grad_matrix(u["kernel"], u.get("bias"))
        np.testing.assert_allclose(
            got, want, rtol=2e-3, atol=1e-4 * np.abs(want).max(), err_msg=path
        )


def test_every_shape_the_capture_returns_passes_the_checks():
    """The rank checks never refuse what the capture adapters produce: 1-D, 2-D and 3-D
    convolutions, a convolution with an extra leading batch axis, a dense layer on sequences
    (linen), and NNX's Conv and Linear (shapes only, through ``jax.eval_shape``)."""
    nn = pytest.importorskip("flax.linen")
    nnx = pytest.importorskip("flax.nnx")
    linen_capture = pytest.importorskip("sofim_optax.curvature.linen")
    nnx_capture = pytest.importorskip("sofim_optax.curvature.nnx")

    class Mixed(nn.Module):
        @nn.compact
        def __call__(self, x1, x2, x3, x4, seq):
            a = nn.Conv(2, (3,), padding="CAUSAL")(x1).sum()  # 1-D
            b = nn.Conv(2, (2, 2), strides=2)(x2).sum()  # 2-D
            c = nn.Conv(2, (2, 2, 2), padding="VALID")(x3).sum()  # 3-D
            d = nn.Conv(2, (2, 2))(x4).sum()  # (N, B, H, W, C): B folded into the positions
            e = nn.Dense(3)(seq).sum()  # dense on (N, L, d)
            return a + b + c + d + e + nn.Dense(2)(seq[:, 0]).sum()  # dense on (N, d)

    n = 2
    shapes = [(n, 5, 1), (n, 4, 4, 1), (n, 3, 3, 3, 1), (n, 2, 3, 3, 1), (n, 4, 3)]
    xs = [jnp.ones(s) for s in shapes]
    variables = jax.eval_shape(Mixed().init, jax.random.key(0), *xs)
    loss_fn = lambda v, *a: Mixed().apply(v, *a)
    _, grads, stats = jax.eval_shape(
        lambda v: linen_capture.value_grad_and_stats(loss_fn, v, *xs), variables
    )
    assert len(stats) == 6
    layout = layerwise.discover_layers(grads)
    assert len(layerwise.check_layer_stats(layout, stats, "test")) == 6
    ranks = {k: (layout.layers[layout.index(k)].kind, v.inputs.ndim) for k, v in stats.items()}
    assert ranks == {
        **{f"Conv_{i}": ("conv", 3) for i in range(4)},
        "Dense_0": ("dense", 3),
        "Dense_1": ("dense", 2),
    }

    class NnxModel(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 2, (2, 2), rngs=rngs)
            self.lin = nnx.Linear(2, 3, rngs=rngs)

        def __call__(self, x):
            return self.lin(self.conv(x)).sum()  # Linear on (N, H, W, c): (N, T, ·)

    model = nnx.eval_shape(lambda: NnxModel(nnx.Rngs(0)))
    x = jnp.ones((n, 4, 4, 1))
    _, grads, stats = jax.eval_shape(
        lambda: nnx_capture.value_grad_and_stats(lambda m, x: m(x), model, x)
    )
    layout = layerwise.discover_layers(grads)
    assert len(layerwise.check_layer_stats(layout, stats, "test")) == 2


# ----------------------------------------------------------------------------------------
# EMA, periods, stacking.
# ----------------------------------------------------------------------------------------


def test_ema_and_period_semantics(x64):
    ema, damping = 0.6, 1e-2
    params = {"d": {"kernel": zeros((3, 2), jnp.float64), "bias": zeros((2,), jnp.float64)}}
    tx = scale_by_kfac(damping=damping, ema=ema, stats_period=2, inverse_period=3)
    state = jax.jit(tx.init)(params)
    update = jax.jit(tx.update)
    A_ref = G_ref = None
    k = 0
    A_inv = G_inv = None  # the factors at the last inverse refresh
    prev_vals = None
    for count in range(8):
        stats = rand_stats((10 + count), 5, 3, 2, dtype=jnp.float64)
        grads = rand_like((100 + count), params)
        updates, state = update(grads, state, params, layer_stats={"d": stats})
        assert int(state.count) == count + 1
        if count % 2 == 0:  # statistics refresh, k-th one
            k += 1
            rho = min(1 - 1 / k, ema)
            A_hat, G_hat = ref_factors(stats.inputs, stats.output_grads, True)
            A_ref = A_hat if A_ref is None else rho * A_ref + (1 - rho) * A_hat
            G_ref = G_hat if G_ref is None else rho * G_ref + (1 - rho) * G_hat
            if k == 3:
                assert rho == ema  # min(1 - 1/3, 0.6) = 0.6: the cap is in force
        assert int(state.curvature.stat_updates[0]) == k
        c = state.curvature
        np.testing.assert_allclose(c.factors["d4"][0], A_ref, rtol=1e-12)
        np.testing.assert_allclose(c.factors["d2"][0], G_ref, rtol=1e-12)
        vals = (np.asarray(c.eigvals["d4"][0]), np.asarray(c.eigvals["d2"][0]))
        if count % 3 == 0:  # inverse refresh, after the statistics
            A_inv, G_inv = A_ref.copy(), G_ref.copy()
            np.testing.assert_allclose(vals[0], np.linalg.eigvalsh(A_inv), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(vals[1], np.linalg.eigvalsh(G_inv), rtol=1e-10, atol=1e-12)
            if prev_vals is not None and count in (3, 6):
                # at counts 3 and 6 the factors differ from the previous refresh
                assert not np.allclose(vals[0], prev_vals[0])
        else:
            np.testing.assert_array_equal(vals[0], prev_vals[0])
            np.testing.assert_array_equal(vals[1], prev_vals[1])
        prev_vals = vals
        # The update uses the factors as of the last inverse refresh.
        V = grad_matrix(grads["d"]["kernel"], grads["d"]["bias"])
        got = grad_matrix(updates["d"]["kernel"], updates["d"]["bias"])
        np.testing.assert_allclose(got, ref_solve(A_inv, G_inv, V, damping, True), rtol=1e-8)


def test_stacking_same_shapes_equals_separate():
    params = mlp_params(sizes=((3, 4), (3, 4), (4, 3)))  # Dense_0 and Dense_1 share shapes
    stats = {
        "Dense_0": rand_stats(0, 6, 3, 4),
        "Dense_1": rand_stats(1, 6, 3, 4, scale_out=3.0),
        "Dense_2": rand_stats(2, 6, 4, 3),
    }
    grads = rand_like(3, params)
    inverses = ["eigh", "cholesky"]
    txs = {inverse: scale_by_kfac(damping=1e-2, inverse=inverse) for inverse in inverses}
    state = jax.eval_shape(txs["eigh"].init, params)
    # Factors stacked per size: "d4" holds A of Dense_0, A of Dense_1 (3 inputs + bias), G of
    # Dense_0, G of Dense_1 (4 outputs); "d5" A of Dense_2; "d3" G of Dense_2.
    assert {k: v.shape[0] for k, v in state.curvature.factors.items()} == {
        "d4": 4,
        "d5": 1,
        "d3": 1,
    }

    @jax.jit
    def run(grads, params, stats):
        out = {}
        for inverse, tx in txs.items():
            out[inverse, "stacked"] = tx.update(grads, tx.init(params), params, layer_stats=stats)[
                0
            ]
            for name in params:
                one = {name: params[name]}
                upd = tx.update(
                    {name: grads[name]}, tx.init(one), one, layer_stats={name: stats[name]}
                )
                out[inverse, name] = upd[0][name]
        return out

    out = run(grads, params, stats)
    for inverse in inverses:
        for name in params:
            for leaf in ("kernel", "bias"):
                np.testing.assert_allclose(
                    out[inverse, "stacked"][name][leaf],
                    out[inverse, name][leaf],
                    rtol=1e-5,
                    atol=1e-6,
                    err_msg=f"{inverse} {name} {leaf}",
                )


def test_damping_changes_take_effect_immediately_with_eigh(x64):
    params = mlp_params(jnp.float64, sizes=((3, 2),))
    stats = {"Dense_0": rand_stats((0), 5, 3, 2, dtype=jnp.float64)}
    grads = rand_like((1), params)
    opt = optax.inject_hyperparams(scale_by_kfac)(damping=1e-3, inverse_period=100)
    state = jax.jit(opt.init)(params)
    step = jax.jit(opt.update)
    _, state = step(grads, state, params, layer_stats=stats)  # count 0: refresh
    state.hyperparams["damping"] = arr(0.5, state.hyperparams["damping"].dtype)
    upd, _ = step(grads, state, params, layer_stats=stats)  # count 1: no refresh
    A, G = ref_factors(stats["Dense_0"].inputs, stats["Dense_0"].output_grads, True)
    V = grad_matrix(grads["Dense_0"]["kernel"], grads["Dense_0"]["bias"])
    np.testing.assert_allclose(
        grad_matrix(upd["Dense_0"]["kernel"], upd["Dense_0"]["bias"]),
        ref_solve(A, G, V, 0.5, True),
        rtol=1e-8,
    )


# ----------------------------------------------------------------------------------------
# Fallback and logging.
# ----------------------------------------------------------------------------------------


def _params_with_uncovered():
    return {
        "Dense_0": {"kernel": ones((3, 4)), "bias": zeros((4,))},
        "Dense_1": {"kernel": ones((4, 2)), "bias": zeros((2,))},  # missing from stats
        "BatchNorm_0": {"scale": ones((4,)), "bias": zeros((4,))},
    }


def test_default_fallback_is_the_diagonal_fisher_with_the_same_damping():
    """Uncovered parameters get ``u / (ḡ² + λ)`` at the first step (``ν = ḡ²``), on the scale
    of the preconditioned layers, not the raw gradient."""
    params = _params_with_uncovered()
    grads = rand_like((0), params)
    stats = {"Dense_0": rand_stats((1), 5, 3, 4)}
    upd, _ = jax.jit(scale_by_kfac(damping=0.5).update)(
        grads, scale_by_kfac().init(params), params, layer_stats=stats
    )
    for layer, leaf in [("Dense_1", "kernel"), ("BatchNorm_0", "scale")]:
        g = np.asarray(grads[layer][leaf], np.float64)
        np.testing.assert_allclose(upd[layer][leaf], g / (g * g + 0.5), rtol=1e-5)
    with pytest.raises(ValueError, match='fallback must be "diagonal", None or an optax'):
        scale_by_kfac(fallback="adam")


def test_fallback_identity_and_logging(caplog):
    params = _params_with_uncovered()
    grads = rand_like((0), params)
    stats = {"Dense_0": rand_stats((1), 5, 3, 4)}
    tx = scale_by_kfac(fallback=None)
    state = jax.jit(tx.init)(params)
    with caplog.at_level(logging.INFO, logger="sofim_optax"):
        upd, state = jax.jit(tx.update)(grads, state, params, layer_stats=stats)
        upd, state = jax.jit(tx.update)(grads, state, params, layer_stats=stats)  # a second trace
    for path in [
        ("Dense_1", "kernel"),
        ("Dense_1", "bias"),
        ("BatchNorm_0", "scale"),
        ("BatchNorm_0", "bias"),
    ]:
        np.testing.assert_array_equal(upd[path[0]][path[1]], grads[path[0]][path[1]])
    assert not np.allclose(upd["Dense_0"]["kernel"], grads["Dense_0"]["kernel"])
    lines = [r.getMessage() for r in caplog.records if "scale_by_kfac" in r.getMessage()]
    assert len(lines) == 1, lines  # once per transformation instance
    assert (
        "Dense_0" in lines[0] and "Dense_1/kernel" in lines[0] and "BatchNorm_0/scale" in lines[0]
    )


def test_fallback_optax_transform():
    params = _params_with_uncovered()
    stats = {"Dense_0": rand_stats((1), 5, 3, 4)}
    tx = scale_by_kfac(fallback=optax.scale_by_rms(decay=0.5))
    ref = optax.scale_by_rms(decay=0.5)
    state = jax.jit(tx.init)(params)
    uncovered = lambda t: {k: t[k] for k in ("Dense_1", "BatchNorm_0")}
    ref_state = jax.jit(ref.init)(uncovered(params))

    @jax.jit
    def step(grads, state, ref_state):
        upd, state = tx.update(grads, state, params, layer_stats=stats)
        want, ref_state = ref.update(uncovered(grads), ref_state, uncovered(params))
        return upd, state, want, ref_state

    for i in range(3):
        upd, state, want, ref_state = step(rand_like(10 + i, params), state, ref_state)
        for name in ("Dense_1", "BatchNorm_0"):
            for leaf in want[name]:
                np.testing.assert_allclose(upd[name][leaf], want[name][leaf], rtol=1e-6)
    # The captured layer's fallback state was never touched.
    idx = layerwise.discover_layers(params).layer_paths.index("Dense_0")
    untouched = state.fallback_state.layers[idx]
    for leaf in jax.tree.leaves(untouched):
        np.testing.assert_array_equal(leaf, np.zeros_like(leaf))


# ----------------------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------------------


def test_missing_layer_stats_error():
    params = mlp_params()
    tx = scale_by_kfac()
    state = jax.eval_shape(tx.init, params)
    with pytest.raises(TypeError, match=r"value_grad_and_stats.*Dense_0"):
        jax.eval_shape(tx.update, params, state, params)
    with pytest.raises(TypeError, match="dict"):
        jax.eval_shape(functools.partial(tx.update, layer_stats=[1, 2]), params, state, params)


def test_unknown_layer_key_error():
    params = mlp_params()
    tx = scale_by_kfac()
    stats = {"Dense_O": rand_stats(0, 4, 3, 4)}
    with pytest.raises(
        ValueError, match=r"'Dense_O'.*Did you mean.*Dense_0.*Available layer paths"
    ):
        jax.eval_shape(
            tx.update, params, jax.eval_shape(tx.init, params), params, layer_stats=stats
        )


@pytest.mark.parametrize(
    "inputs_shape, grads_shape, match",
    [
        ((4, 5), (4, 4), "inputs have last dimension 5 but the kernel expects 3"),
        ((4, 3), (4, 2), "output_grads have last dimension 2 but the kernel has d_out = 4"),
        ((4, 3), (5, 4), "number of examples"),
        ((4, 2, 3), (4, 3, 4), "number of examples"),
        ((4, 3), (4, 1, 4), "expected inputs"),
        ((3,), (4,), "expected inputs"),
    ],
)
def test_stats_shape_errors_name_the_layer(inputs_shape, grads_shape, match):
    params = mlp_params()
    tx = scale_by_kfac()
    stats = {
        "Dense_1": rand_stats((0), 4, 4, 2),
        "Dense_0": LayerStats(ones(inputs_shape), ones(grads_shape), None),
    }
    with pytest.raises(ValueError, match=match) as err:
        jax.eval_shape(
            tx.update, params, jax.eval_shape(tx.init, params), params, layer_stats=stats
        )
    assert "'Dense_0'" in str(err.value)


@pytest.mark.parametrize(
    "kernel, inputs_shape, grads_shape",
    [
        ((2, 2, 3, 4), (24, 12), (24, 4)),  # a 2-D conv flattened to (N*T, d)
        ((3, 2, 5), (16, 6), (16, 5)),  # a 1-D conv, likewise
        ((2, 2, 3, 4), (4, 6, 1, 12), (4, 6, 1, 4)),  # one axis too many
    ],
)
def test_conv_statistics_of_the_wrong_rank_are_refused(kernel, inputs_shape, grads_shape):
    """A convolution takes (N, T, ·) only: flattened statistics would rescale G by 1/T."""
    params = {"conv": {"kernel": zeros(kernel), "bias": zeros(kernel[-1:])}}
    d_in, d_out = int(np.prod(kernel[:-1])), kernel[-1]
    stats = {"conv": LayerStats(ones(inputs_shape), ones(grads_shape), None)}
    tx = scale_by_kfac()
    with pytest.raises(ValueError) as err:
        jax.eval_shape(
            functools.partial(tx.update, layer_stats=stats),
            params,
            jax.eval_shape(tx.init, params),
            params,
        )
    msg = str(err.value)
    assert "layer_stats of layer 'conv'" in msg and "a convolution" in msg, msg
    assert f"got inputs {inputs_shape} and output_grads {grads_shape}" in msg, msg
    assert f"expected inputs (N, T, {d_in})" in msg and f"output_grads (N, T, {d_out})" in msg
    if len(inputs_shape) == 2:  # the fix
        assert "value_grad_and_stats" in msg and "reshape(N, -1, a.shape[-1])" in msg, msg
    # Statistics with the example axis kept, (N, T, ·), are accepted.
    good = {"conv": LayerStats(ones((4, 6, d_in)), ones((4, 6, d_out)), None)}
    jax.eval_shape(
        functools.partial(tx.update, layer_stats=good),
        params,
        jax.eval_shape(tx.init, params),
        params,
    )


def test_dense_statistics_take_two_or_three_axes():
    """A dense layer applied to sequences gives (N, T, ·) statistics (as the capture returns
    them for ``Dense`` on ``(N, L, d)``); four axes are refused with the expected shapes."""
    params = mlp_params()
    tx = scale_by_kfac()
    state = jax.eval_shape(tx.init, params)
    for t in (None, 5):
        stats = {"Dense_0": rand_stats(0, 4, 3, 4, t=t), "Dense_1": rand_stats(1, 4, 4, 2)}
        jax.eval_shape(functools.partial(tx.update, layer_stats=stats), params, state, params)
    bad = {"Dense_0": LayerStats(ones((4, 2, 2, 3)), ones((4, 2, 2, 4)), None)}
    with pytest.raises(ValueError) as err:
        jax.eval_shape(functools.partial(tx.update, layer_stats=bad), params, state, params)
    msg = str(err.value)
    assert "layer 'Dense_0'" in msg and "a dense layer" in msg, msg
    assert "expected inputs (N, 3) and output_grads (N, 4)" in msg, msg
    assert "(N, T, 3)" in msg and "got inputs (4, 2, 2, 3)" in msg, msg


def test_constructor_errors():
    with pytest.raises(ValueError, match="inverse"):
        scale_by_kfac(inverse="svd")
    with pytest.raises(ValueError, match="ema"):
        scale_by_kfac(ema=1.0)
    with pytest.raises(ValueError, match="inverse_period"):
        scale_by_kfac(inverse_period=0)
    with pytest.raises(ValueError, match="stats_period"):
        scale_by_kfac(stats_period=-1)


# ----------------------------------------------------------------------------------------
# optax conformance.
# ----------------------------------------------------------------------------------------


def test_zero_damping_and_degenerate_statistics_stay_finite():
    params = mlp_params()
    stats = {
        "Dense_0": LayerStats(zeros((4, 3)), zeros((4, 4)), None),  # all-zero statistics
        "Dense_1": rand_stats((0), 1, 4, 2),  # rank one
    }
    grads = rand_like(1, params)
    # A damping of 0 given as a number is refused; traced (as through inject_hyperparams) it
    # is floored and the step stays finite.
    txs = [scale_by_kfac(damping=jnp.asarray(0.0), inverse=inverse) for inverse in INVERSES]
    for inverse, (u, state) in zip(INVERSES, first_updates(txs, grads, params, stats)):
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves((u, state))), inverse


def test_cholesky_breakdown_falls_back_to_eigh():
    rng = _rng(0)
    v = rng.standard_normal((6, 2))
    # Rank two, huge, and indefinite by 0.1 (what round-off does to a barely damped factor).
    bad = v @ v.T * 1e8 - 0.1 * np.eye(6)
    factors = arr(np.stack([bad, np.eye(6)]))
    shifts = arr([1e-3, 1e-3])
    run = jax.jit(layerwise.stacked_damped_inverse, static_argnums=2)
    plain = jax.jit(jax.vmap(lambda f, s: linalg.damped_inverse(f, s, "cholesky")))(factors, shifts)
    assert not np.all(np.isfinite(np.asarray(plain)))  # the breakdown is real
    for method in ("cholesky", "inv"):
        out = np.asarray(run(factors, shifts, method))
        assert np.all(np.isfinite(out)), method
        np.testing.assert_allclose(out[1], np.eye(6) / 1.001, rtol=1e-5, err_msg=method)


# ----------------------------------------------------------------------------------------
# A tiny convergence check.
# ----------------------------------------------------------------------------------------


def _softmax_regression():
    n, d, c = 256, 8, 4
    rng = _rng(0)
    # Badly scaled, off-centre features (first-order methods suffer; KFAC's A factor undoes
    # both) and noisy labels drawn from a softmax model, so the optimum loss is far from 0.
    z = rng.standard_normal((n, d))
    x = arr(z * np.logspace(-1.5, 1, d) + 1.0)
    logits = z @ (0.7 * rng.standard_normal((d, c)))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = jnp.asarray([rng.choice(c, p=row) for row in p])
    params = {"Dense_0": {"kernel": zeros((d, c)), "bias": zeros((c,))}}

    def loss_and_stats(p):
        logits = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
        # per-example gradients of the per-example loss w.r.t. the logits (empirical Fisher)
        per_example = jax.nn.softmax(logits) - jax.nn.one_hot(y, c)
        return loss, {"Dense_0": LayerStats(x, per_example, logits)}

    return params, loss_and_stats


def _run(opt, params, loss_and_stats, steps):
    def step(carry, _):
        p, s = carry
        (loss, stats), grads = jax.value_and_grad(loss_and_stats, has_aux=True)(p)
        u, s = opt.update(grads, s, p, layer_stats=stats)
        return (optax.apply_updates(p, u), s), loss

    @jax.jit
    def run(p):
        (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), None, length=steps)
        return loss_and_stats(p)[0]

    return float(run(params))


def test_kfac_beats_tuned_sgd_on_softmax_regression():
    params, loss_and_stats = _softmax_regression()
    start = float(np.log(4.0))  # zero weights: uniform prediction over 4 classes
    steps = 40
    kfac_loss = _run(
        kfac(0.3, momentum=0.9, damping=1e-3, inverse_period=5), params, loss_and_stats, steps
    )
    sgd_losses = []
    for lr in (0.01, 0.03, 0.1, 0.3):
        loss = _run(optax.sgd(lr, momentum=0.9), params, loss_and_stats, steps)
        sgd_losses.append(loss if np.isfinite(loss) else np.inf)
    # The optimum is about 0.88 (a long KFAC run); KFAC gets to about 0.93, SGD to 1.02 at best.
    assert kfac_loss < 0.7 * start, (kfac_loss, start)
    assert kfac_loss < min(sgd_losses) - 0.05, (kfac_loss, sgd_losses)


def _block_diagonal(F, max_dim):
    """The dense matrix of F's diagonal blocks, cut as ``max_factor_dim`` cuts it."""
    d = F.shape[0]
    if max_dim is None or d <= max_dim:
        return F
    count = -(-d // max_dim)
    size = -(-d // count)
    out = np.zeros_like(F)
    for j in range(count):
        s = slice(j * size, (j + 1) * size)
        out[s, s] = F[s, s]
    return out


@pytest.mark.parametrize("inverse", ["eigh", "cholesky"])
@pytest.mark.parametrize("max_factor_dim", [100, 4, 3, 1])
def test_max_factor_dim_keeps_big_factors_block_diagonal(x64, inverse, max_factor_dim, caplog):
    rng = _rng(5)
    n, t, d_in, d_out, damping = 9, 3, 7, 10, 0.1
    stats = {
        "l": LayerStats(
            arr(rng.standard_normal((n, t, d_in)), jnp.float64),
            arr(rng.standard_normal((n, t, d_out)), jnp.float64),
        )
    }
    grads = {
        "l": {
            "kernel": arr(rng.standard_normal((d_in, d_out)), jnp.float64),
            "bias": arr(rng.standard_normal(d_out), jnp.float64),
        }
    }
    tx = scale_by_kfac(damping=damping, max_factor_dim=max_factor_dim, inverse=inverse)
    with caplog.at_level(logging.INFO, logger="sofim_optax"):
        state = tx.init(grads)
    upd, state = tx.update(grads, state, layer_stats=stats)
    A, G = ref_factors(stats["l"].inputs, stats["l"].output_grads, True)
    A, G = (
        _block_diagonal(np.asarray(A), max_factor_dim),
        _block_diagonal(np.asarray(G), max_factor_dim),
    )
    want = ref_solve(A, G, grad_matrix(grads["l"]["kernel"], grads["l"]["bias"]), damping, True)
    got = grad_matrix(upd["l"]["kernel"], upd["l"]["bias"])
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())
    # Only the blocks are stored: A (8) and G (10) in blocks of at most max_factor_dim.
    sizes = {k: v.shape for k, v in state.curvature.factors.items()}
    expected = {
        100: {"d8": (1, 8, 8), "d10": (1, 10, 10)},
        4: {"d4": (5, 4, 4)},
        3: {"d3": (7, 3, 3)},
        1: {"d1": (18, 1, 1)},
    }[max_factor_dim]
    assert sizes == expected
    split = [r.getMessage() for r in caplog.records if "block-diagonal" in r.getMessage()]
    assert len(split) == (0 if max_factor_dim == 100 else 2), split
    if max_factor_dim == 3:
        assert "factor G of layer 'l' has dimension 10 > max_factor_dim=3" in split[1]
        assert "4 blocks of 3" in split[1]


def test_max_factor_dim_is_checked_and_static():
    with pytest.raises(ValueError, match="max_factor_dim"):
        scale_by_kfac(max_factor_dim=0)
    assert "max_factor_dim" in kfac.static_args
    # Its default is not a number, so inject_hyperparams leaves it alone.
    tx = optax.inject_hyperparams(kfac)(learning_rate=0.5, damping=0.1)
    params = {"l": {"kernel": jnp.zeros((3, 2))}}
    stats = {"l": LayerStats(jnp.ones((4, 3)), jnp.ones((4, 2)))}
    jax.jit(lambda s: tx.update(params, s, params, layer_stats=stats))(tx.init(params))
