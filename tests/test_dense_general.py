"""Dense maps over several axes (``DenseGeneral``, ``LinearGeneral``, attention's projections):
their statistics, their reading by the layer-wise methods, and the first preconditioned step
of KFAC and Mini-Block Fisher.

References are independent of the library: per-example gradients come from
``jax.vmap(jax.grad(...))`` of the loss on one example, the KFAC step from ``numpy.kron`` and
``numpy.linalg.solve``, the mini-blocks from the per-example gradients directly; everything
in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sofim_optax
from sofim_optax.curvature import CaptureError
from sofim_optax.curvature import linen as capture_linen
from sofim_optax.curvature import nnx as capture_nnx

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")

F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)

# (input shape per example, DenseGeneral options): the contracted axes, the feature axes
# and the positions in every arrangement the capture flattens.
CASES = {
    "two_feature_axes": ((5, 4), dict(features=(2, 3))),
    "two_input_axes": ((5, 2, 3), dict(features=4, axis=(-2, -1))),
    "middle_axis": ((4, 5), dict(features=(2, 3), axis=1)),  # (N, d, L): contracts d
    "no_positions": ((4,), dict(features=(2, 3))),
    "no_bias": ((3, 4), dict(features=(3, 2), use_bias=False)),
    "plain": ((4,), dict(features=3)),
}


def _per_example_kernel_grads(stats):
    """``Σ_t x_{n,t} g_{n,t}ᵀ``: what the statistics say each example's kernel gradient is."""
    x, g = np.asarray(stats.inputs), np.asarray(stats.output_grads)
    if x.ndim == 2:
        x, g = x[:, None], g[:, None]
    return np.einsum("ntk,nto->nko", x, g), g.sum(axis=1)


def _linen_case(name, n=6, seed=0):
    shape, options = CASES[name]

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.DenseGeneral(**options, **F64, name="gen")(x)
            return nn.Dense(3, **F64, name="head")(h.reshape(h.shape[0], -1))

    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n,) + shape))
    y = jnp.asarray(np.arange(n) % 3)
    model = Net()
    params = model.init(jax.random.key(seed), x)

    def loss_fn(p, x, y):
        logits = model.apply(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return model, params, loss_fn, x, y


@pytest.mark.parametrize("name", sorted(CASES))
def test_linen_statistics_against_per_example_gradients(x64, name):
    model, params, loss_fn, x, y = _linen_case(name)
    _, grads, stats = jax.jit(lambda p: capture_linen.value_grad_and_stats(loss_fn, p, x, y))(
        params
    )
    assert sorted(stats) == ["gen", "head"]
    st = stats["gen"]
    kernel = params["params"]["gen"]["kernel"]
    bias = params["params"]["gen"].get("bias")
    d_in, d_out = st.inputs.shape[-1], st.outputs.shape[-1]
    assert d_in * d_out == kernel.size
    assert st.inputs.ndim == (2 if name == "plain" else 3)  # (N, T, ·) but for a plain map
    # The forward map: inputs @ kernel + bias == outputs.
    want = np.asarray(st.inputs) @ np.asarray(kernel).reshape(d_in, d_out)
    if bias is not None:
        want = want + np.asarray(bias).reshape(d_out)
    np.testing.assert_allclose(st.outputs, want, rtol=1e-12, atol=1e-12)
    # Per-example gradients of the kernel and bias.
    per_example = jax.vmap(
        jax.grad(lambda p, xi, yi: loss_fn(p, xi[None], yi[None])), in_axes=(None, 0, 0)
    )(params, x, y)["params"]["gen"]
    got_kernel, got_bias = _per_example_kernel_grads(st)
    np.testing.assert_allclose(
        got_kernel,
        np.asarray(per_example["kernel"]).reshape(-1, d_in, d_out),
        rtol=1e-9,
        atol=1e-12,
    )
    if bias is not None:
        np.testing.assert_allclose(
            got_bias, np.asarray(per_example["bias"]).reshape(-1, d_out), rtol=1e-9, atol=1e-12
        )
    np.testing.assert_allclose(grads["params"]["gen"]["kernel"], per_example["kernel"].mean(0))


def _nnx_model(name, seed=0):
    shape, options = CASES[name]
    options = dict(options)
    features = options.pop("features")
    axis = options.pop("axis", -1)
    axes = (axis,) if isinstance(axis, int) else axis
    in_features = tuple(shape[a if a < 0 else a - 1] for a in axes)
    out = np.prod(features)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.gen = nnx.LinearGeneral(
                in_features, features, axis=axis, **options, **F64, rngs=rngs
            )
            hidden = int(out) * int(np.prod(shape) // np.prod(in_features))
            self.head = nnx.Linear(hidden, 3, **F64, rngs=rngs)

        def __call__(self, x):
            h = self.gen(x)
            return self.head(h.reshape(h.shape[0], -1))

    return Net(nnx.Rngs(seed))


@pytest.mark.parametrize("name", sorted(CASES))
def test_nnx_statistics_against_per_example_gradients(x64, name):
    shape, _ = CASES[name]
    model = _nnx_model(name)
    n = 5
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((n,) + shape))
    y = jnp.asarray(np.arange(n) % 3)

    def loss_fn(m, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    _, grads, stats = capture_nnx.value_grad_and_stats(loss_fn, model, x, y)
    assert sorted(stats) == ["gen", "head"]
    st = stats["gen"]
    graphdef, params = nnx.split(model, nnx.Param)

    def one(p, xi, yi):
        return loss_fn(nnx.merge(graphdef, p), xi[None], yi[None])

    per_example = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, y)["gen"]
    d_in, d_out = st.inputs.shape[-1], st.outputs.shape[-1]
    got_kernel, got_bias = _per_example_kernel_grads(st)
    np.testing.assert_allclose(
        got_kernel,
        np.asarray(per_example["kernel"][...]).reshape(-1, d_in, d_out),
        rtol=1e-9,
        atol=1e-12,
    )
    if "bias" in per_example:
        np.testing.assert_allclose(
            got_bias, np.asarray(per_example["bias"][...]).reshape(-1, d_out), rtol=1e-9, atol=1e-12
        )
    np.testing.assert_allclose(
        grads["gen"]["kernel"][...], np.asarray(per_example["kernel"][...]).mean(0), rtol=1e-9
    )


@pytest.mark.slow  # (one of the suite's slowest, 5-11 s; make test-slow)
def test_attention_projections_are_captured_in_linen_and_nnx():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="att")(x)
            return nn.Dense(3, name="head")(x.mean(axis=1))

    x = jnp.ones((4, 5, 6))
    y = jnp.arange(4) % 3
    model = Block()
    params = model.init(jax.random.key(0), x)

    def loss_fn(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

    _, _, stats = capture_linen.value_grad_and_stats(loss_fn, params, x, y)
    projections = ["att/key", "att/out", "att/query", "att/value"]
    assert sorted(stats) == projections + ["head"]
    assert stats["att/query"].inputs.shape == (4, 5, 6)
    assert stats["att/query"].outputs.shape == (4, 5, 8)  # (heads, head_dim) flattened
    assert stats["att/out"].inputs.shape == (4, 5, 8)
    axes = capture_linen.kernel_output_axes(loss_fn, params, x, y)
    assert axes == {"att/query": 2, "att/key": 2, "att/value": 2, "att/out": 1}

    class NnxBlock(nnx.Module):
        def __init__(self, rngs):
            self.att = nnx.MultiHeadAttention(
                num_heads=2, in_features=6, qkv_features=8, decode=False, rngs=rngs
            )
            self.head = nnx.Linear(6, 3, rngs=rngs)

        def __call__(self, x):
            return self.head((x + self.att(x)).mean(axis=1))

    def nnx_loss(m, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    block = NnxBlock(nnx.Rngs(0))
    _, _, stats = capture_nnx.value_grad_and_stats(nnx_loss, block, x, y)
    assert sorted(stats) == projections + ["head"]
    assert capture_nnx.kernel_output_axes(nnx_loss, block, x, y) == axes


def test_refused_options_name_the_layer():
    x = jnp.ones((4, 3, 5))

    def run(layer):
        params = layer.init(jax.random.key(0), x)
        return capture_linen.value_grad_and_stats(lambda p: layer.apply(p, x).sum(), params)

    with pytest.raises(CaptureError, match=r"Layer '' \(DenseGeneral\) has batch_dims"):
        run(nn.DenseGeneral(2, batch_dims=(0,)))
    with pytest.raises(CaptureError, match="does not contract"):
        run(nn.DenseGeneral(2, axis=(0, -1)))


def _kfac_reference(x, g, v, damping):
    """KFAC's step from the statistics, by a dense solve with the Kronecker product."""
    x = np.asarray(x).reshape(x.shape[0], -1, x.shape[-1])
    g = np.asarray(g).reshape(g.shape[0], -1, g.shape[-1])
    n = x.shape[0]
    a = np.concatenate([x, np.ones(x.shape[:-1] + (1,))], axis=-1).reshape(-1, x.shape[-1] + 1)
    A = a.T @ a / a.shape[0]
    G = g.reshape(-1, g.shape[-1]).T @ g.reshape(-1, g.shape[-1]) / n
    pi = np.sqrt((np.trace(A) / A.shape[0]) / (np.trace(G) / G.shape[0]))
    Ad = A + pi * np.sqrt(damping) * np.eye(A.shape[0])
    Gd = G + np.sqrt(damping) / pi * np.eye(G.shape[0])
    # (A ⊗ G) vec_r(X) = vec_r(A X Gᵀ): solve the (d_a·d_g)² system for vec_r(Δ).
    return np.linalg.solve(np.kron(Ad, Gd), v.reshape(-1)).reshape(v.shape)


def _mbf_reference(per_example_v, v, damping, block_size):
    """Per output unit, chunks of at most ``block_size`` rows of ``V``: ``(F_b + λI)⁻¹ v_b``."""
    n_chunks = -(-v.shape[0] // block_size)
    size = -(-v.shape[0] // n_chunks)
    out = np.zeros_like(v)
    for j in range(v.shape[1]):
        for c in range(n_chunks):
            idx = np.arange(c * size, min((c + 1) * size, v.shape[0]))
            vb = per_example_v[:, idx, j]
            F = vb.T @ vb / vb.shape[0]
            out[idx, j] = np.linalg.solve(F + damping * np.eye(len(idx)), v[idx, j])
    return out


def _stack(kernel, bias, d_in, d_out):
    k = np.asarray(kernel).reshape(-1, d_in, d_out)
    b = np.asarray(bias).reshape(-1, 1, d_out)
    return np.concatenate([k, b], axis=1)


@pytest.mark.parametrize("name", ["two_feature_axes", "two_input_axes", "middle_axis"])
def test_first_steps_of_kfac_and_mbf_against_dense_references(x64, name):
    model, params, loss_fn, x, y = _linen_case(name, n=7, seed=3)
    axes = capture_linen.kernel_output_axes(loss_fn, params, x, y)
    damping, block = 0.05, 5
    txs = {
        "kfac": sofim_optax.scale_by_kfac(damping=damping, kernel_output_axes=axes),
        "mbf": sofim_optax.scale_by_mini_block_fisher(
            damping=damping, dense_block_size=block, kernel_output_axes=axes
        ),
    }

    @jax.jit
    def run(params):
        _, grads, stats = capture_linen.value_grad_and_stats(loss_fn, params, x, y)
        per_example = jax.vmap(
            jax.grad(lambda p, xi, yi: loss_fn(p, xi[None], yi[None])), in_axes=(None, 0, 0)
        )(params, x, y)
        outs = {
            k: tx.update(grads, tx.init(params), params, layer_stats=stats)[0]
            for k, tx in txs.items()
        }
        return grads, stats, per_example, outs

    grads, stats, per_example, outs = run(params)
    st = stats["gen"]
    d_in, d_out = st.inputs.shape[-1], st.outputs.shape[-1]
    g = grads["params"]["gen"]
    v = _stack(g["kernel"], g["bias"], d_in, d_out)[0]
    for key, want in (
        ("kfac", _kfac_reference(st.inputs, st.output_grads, v, damping)),
        (
            "mbf",
            _mbf_reference(
                _stack(
                    per_example["params"]["gen"]["kernel"],
                    per_example["params"]["gen"]["bias"],
                    d_in,
                    d_out,
                ),
                v,
                damping,
                block,
            ),
        ),
    ):
        u = outs[key]["params"]["gen"]
        assert u["kernel"].shape == g["kernel"].shape and u["kernel"].dtype == jnp.float64
        got = _stack(u["kernel"], u["bias"], d_in, d_out)[0]
        np.testing.assert_allclose(
            got, want, rtol=1e-8, atol=1e-11 * np.abs(want).max(), err_msg=key
        )


@pytest.mark.slow  # (one of the suite's slowest, 5-11 s; make test-slow)
def test_mbf_refuses_a_misread_output_projection_with_the_fix(x64):
    model, params, loss_fn, x, y = _linen_case("two_input_axes")
    _, grads, stats = capture_linen.value_grad_and_stats(loss_fn, params, x, y)
    tx = sofim_optax.scale_by_mini_block_fisher()
    with pytest.raises(ValueError, match=r"kernel_output_axes=\{'gen': 1\}"):
        tx.update(grads, tx.init(params), params, layer_stats=stats)
    # KFAC reads it as a convolution with the same d_in and d_out: the same step.
    plain, hinted = (
        sofim_optax.scale_by_kfac(),
        sofim_optax.scale_by_kfac(kernel_output_axes={"gen": 1}),
    )
    a = plain.update(grads, plain.init(params), params, layer_stats=stats)[0]
    b = hinted.update(grads, hinted.init(params), params, layer_stats=stats)[0]
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-6), a, b)


@pytest.mark.slow  # (one of the suite's slowest, 5-11 s; make test-slow)
@pytest.mark.parametrize("name", ["two_feature_axes", "two_input_axes", "middle_axis"])
def test_first_nnx_steps_of_kfac_and_mbf_against_dense_references(x64, name):
    """The same for ``nnx.LinearGeneral``: KFAC's and MBF's first steps on the layer equal
    the dense solves of its explicit Kronecker and mini-block Fisher blocks."""
    model = _nnx_model(name, seed=3)
    shape, _ = CASES[name]
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((7,) + shape))
    y = jnp.asarray(np.arange(7) % 3)

    def loss_fn(m, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    axes = capture_nnx.kernel_output_axes(loss_fn, model, x, y)
    damping, block = 0.05, 5
    _, grads, stats = capture_nnx.value_grad_and_stats(loss_fn, model, x, y)
    graphdef, state = nnx.split(model, nnx.Param)
    params, grads = nnx.to_pure_dict(state), nnx.to_pure_dict(grads)

    def one(p, xi, yi):
        return loss_fn(nnx.merge(graphdef, p), xi[None], yi[None])

    per_example = nnx.to_pure_dict(jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(state, x, y))
    st = stats["gen"]
    d_in, d_out = st.inputs.shape[-1], st.outputs.shape[-1]
    v = _stack(grads["gen"]["kernel"], grads["gen"]["bias"], d_in, d_out)[0]
    wants = {
        "kfac": _kfac_reference(st.inputs, st.output_grads, v, damping),
        "mbf": _mbf_reference(
            _stack(per_example["gen"]["kernel"], per_example["gen"]["bias"], d_in, d_out),
            v,
            damping,
            block,
        ),
    }
    txs = {
        "kfac": sofim_optax.scale_by_kfac(damping=damping, kernel_output_axes=axes),
        "mbf": sofim_optax.scale_by_mini_block_fisher(
            damping=damping, dense_block_size=block, kernel_output_axes=axes
        ),
    }
    for key, tx in txs.items():
        u = tx.update(grads, tx.init(params), params, layer_stats=stats)[0]["gen"]
        got = _stack(u["kernel"], u["bias"], d_in, d_out)[0]
        want = wants[key]
        np.testing.assert_allclose(
            got, want, rtol=1e-8, atol=1e-11 * np.abs(want).max(), err_msg=key
        )
