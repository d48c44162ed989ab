"""``nn.Einsum`` / ``nnx.Einsum`` layers that are dense maps on contracted axes: their
statistics against per-example gradients (linen and nnx), the patterns refused with the
pattern named, and the first KFAC and Mini-Block Fisher steps against dense float64
references (the references of tests/test_dense_general.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_dense_general import _kfac_reference, _mbf_reference, _per_example_kernel_grads, _stack

import sofim_optax
from sofim_optax.curvature import CaptureError
from sofim_optax.curvature import linen as capture_linen
from sofim_optax.curvature import nnx as capture_nnx

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")

F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)

# name: (input shape per example, einsum_str, kernel shape, bias)
CASES = {
    "plain": ((4,), "bd,de->be", (4, 3), True),
    "heads": ((5, 4), "btd,dhk->bthk", (4, 2, 3), True),  # attention's projections
    "heads_first": ((5, 4), "btd,dhk->bhtk", (4, 2, 3), True),  # features not last
    "two_contracted": ((5, 2, 3), "bthk,hke->bte", (2, 3, 4), False),
    "ellipsis": ((5, 4), "...d,de->...e", (4, 3), True),
}


def _head_input(h):
    return h.reshape(h.shape[0], -1)


def _linen(name, n=6, seed=0):
    shape, equation, kernel, bias = CASES[name]

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Einsum(kernel, equation, use_bias=bias, **F64, name="gen")(x)
            return nn.Dense(3, **F64, name="head")(_head_input(h))

    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n,) + shape))
    y = jnp.asarray(np.arange(n) % 3)
    model = Net()
    params = model.init(jax.random.key(seed), x)

    def loss_fn(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

    return params, loss_fn, x, y


def _nnx(name, n=6, seed=0):
    shape, equation, kernel, bias = CASES[name]
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n,) + shape))
    y = jnp.asarray(np.arange(n) % 3)
    bias_shape = None
    if bias:
        features = equation.split("->")[1]
        rhs = equation.split(",")[1].split("->")[0]
        bias_shape = tuple(kernel[rhs.index(c)] for c in features if c in rhs)
    width = int(
        np.prod(
            jax.eval_shape(lambda a, k: jnp.einsum(equation, a, k), x[:1], jnp.zeros(kernel)).shape[
                1:
            ]
        )
    )

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.gen = nnx.Einsum(equation, kernel, bias_shape, **F64, rngs=rngs)
            self.head = nnx.Linear(width, 3, **F64, rngs=rngs)

        def __call__(self, x):
            return self.head(_head_input(self.gen(x)))

    def loss_fn(m, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    return Net(nnx.Rngs(seed)), loss_fn, x, y


def _check(st, kernel, bias, per_kernel, per_bias):
    d_in, d_out = st.inputs.shape[-1], st.outputs.shape[-1]
    assert d_in * d_out == kernel.size
    want = np.asarray(st.inputs) @ np.asarray(kernel).reshape(d_in, d_out)
    if bias is not None:
        want = want + np.asarray(bias).reshape(d_out)
    np.testing.assert_allclose(st.outputs, want, rtol=1e-12, atol=1e-12)
    got_kernel, got_bias = _per_example_kernel_grads(st)
    np.testing.assert_allclose(
        got_kernel, np.asarray(per_kernel).reshape(-1, d_in, d_out), rtol=1e-9, atol=1e-12
    )
    if bias is not None:
        np.testing.assert_allclose(
            got_bias, np.asarray(per_bias).reshape(-1, d_out), rtol=1e-9, atol=1e-12
        )


@pytest.mark.parametrize("name", sorted(CASES))
def test_linen_einsum_statistics_against_per_example_gradients(x64, name):
    params, loss_fn, x, y = _linen(name)
    _, _, stats = capture_linen.value_grad_and_stats(loss_fn, params, x, y)
    assert sorted(stats) == ["gen", "head"]
    per_example = jax.vmap(
        jax.grad(lambda p, xi, yi: loss_fn(p, xi[None], yi[None])), in_axes=(None, 0, 0)
    )(params, x, y)["params"]["gen"]
    gen = params["params"]["gen"]
    _check(
        stats["gen"], gen["kernel"], gen.get("bias"), per_example["kernel"], per_example.get("bias")
    )
    n_features = len(CASES[name][2]) - len(
        [
            c
            for c in CASES[name][1].split(",")[1].split("->")[0]
            if c in CASES[name][1].split(",")[0]
        ]
    )
    assert capture_linen.kernel_output_axes(loss_fn, params, x, y) == {"gen": n_features}


@pytest.mark.parametrize("name", sorted(CASES))
def test_nnx_einsum_statistics_against_per_example_gradients(x64, name):
    model, loss_fn, x, y = _nnx(name)
    _, _, stats = capture_nnx.value_grad_and_stats(loss_fn, model, x, y)
    assert sorted(stats) == ["gen", "head"]
    graphdef, state = nnx.split(model, nnx.Param)
    per_example = nnx.to_pure_dict(
        jax.vmap(
            jax.grad(lambda p, xi, yi: loss_fn(nnx.merge(graphdef, p), xi[None], yi[None])),
            in_axes=(None, 0, 0),
        )(state, x, y)
    )["gen"]
    gen = nnx.to_pure_dict(state)["gen"]
    _check(
        stats["gen"], gen["kernel"], gen.get("bias"), per_example["kernel"], per_example.get("bias")
    )


@pytest.mark.parametrize(
    "equation, kernel, message",
    [
        ("btd,hkd->bthk", (2, 3, 4), "contracted axes before its output axes"),
        ("bhd,hde->bhe", (2, 4, 3), "in the input, the kernel and the output"),
        ("btd,de->be", (4, 3), "summed away"),
        ("btd,dez->bte", (4, 3, 2), "summed away"),
        ("dbt,de->bte", (4, 3), "first axis must be the batch"),
        ("btd,dhk->btkh", (4, 2, 3), "keep the kernel's order"),
    ],
)
def test_einsum_patterns_that_are_not_dense_maps_are_refused(equation, kernel, message):
    x = jnp.ones({"bhd": (6, 2, 4), "dbt": (4, 6, 5)}.get(equation[:3], (6, 5, 4)))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum(kernel, equation, use_bias=False, name="gen")(x).sum()

    model = Net()
    params = model.init(jax.random.key(0), x)
    with pytest.raises(CaptureError, match=message) as err:
        capture_linen.value_grad_and_stats(lambda p, x: model.apply(p, x), params, x)
    assert "'gen'" in str(err.value) and equation in str(err.value)


@pytest.mark.parametrize("name", ["heads", "heads_first", "two_contracted"])
def test_first_kfac_and_mbf_steps_on_an_einsum_against_dense_references(x64, name):
    params, loss_fn, x, y = _linen(name, n=7, seed=3)
    axes = capture_linen.kernel_output_axes(loss_fn, params, x, y)
    damping, block = 0.05, 5
    _, grads, stats = capture_linen.value_grad_and_stats(loss_fn, params, x, y)
    per_example = jax.vmap(
        jax.grad(lambda p, xi, yi: loss_fn(p, xi[None], yi[None])), in_axes=(None, 0, 0)
    )(params, x, y)["params"]["gen"]
    st, g = stats["gen"], grads["params"]["gen"]
    d_in, d_out = st.inputs.shape[-1], st.outputs.shape[-1]
    n = x.shape[0]
    bias = g.get("bias", jnp.zeros(d_out))
    per_bias = per_example.get("bias", jnp.zeros((n, d_out)))
    v = _stack(g["kernel"], bias, d_in, d_out)[0]
    if "bias" not in g:  # no bias row: compare the kernel rows only
        v = v[:-1]
    wants = {
        "kfac": _kfac_reference(st.inputs, st.output_grads, v, damping) if "bias" in g else None,
        "mbf": _mbf_reference(
            _stack(per_example["kernel"], per_bias, d_in, d_out)[:, : len(v)], v, damping, block
        ),
    }
    txs = {
        "kfac": sofim_optax.scale_by_kfac(damping=damping, kernel_output_axes=axes),
        "mbf": sofim_optax.scale_by_mini_block_fisher(
            damping=damping, dense_block_size=block, kernel_output_axes=axes
        ),
    }
    for key, tx in txs.items():
        if wants[key] is None:
            continue
        u = tx.update(grads, tx.init(params), params, layer_stats=stats)[0]["params"]["gen"]
        got = _stack(u["kernel"], u.get("bias", jnp.zeros(d_out)), d_in, d_out)[0][: len(v)]
        np.testing.assert_allclose(
            got, wants[key], rtol=1e-8, atol=1e-11 * np.abs(wants[key]).max(), err_msg=key
        )
