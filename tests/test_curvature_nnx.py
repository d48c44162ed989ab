"""Tests of ``sofim_optax.curvature.nnx.value_grad_and_stats``.

Same independent references as ``test_curvature_linen``: each test model takes
optional ``perts`` (explicit additive perturbations of the captured layer
outputs) and ``taps`` (records each layer's input and output); per-example
output gradients come from ``jax.vmap`` of ``jax.grad`` with respect to the
perturbations, conv patches from explicit numpy loops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_curvature_linen import (
    assert_stats_match,
    fast_jit,
    kernel_paths,
    np_patches,
    per_example_output_grads,
    random_params,
    set_aside_lookup,
    set_aside_norms,
    tap,
    taps_of,
)

from sofim_optax.curvature import CaptureError, losses
from sofim_optax.curvature import nnx as cn

F64 = jnp.float64


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def build(make, seed=1):
    """Builds ``make(rngs)`` without running XLA random initialisers.

    Parameters are filled with scaled normal draws from numpy; other variables
    (BatchNorm statistics) with ones.
    """
    abstract = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    params = random_params(params, seed)
    rest = jax.tree.map(
        lambda s: (
            jax.random.key(0)
            if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key)
            else jnp.ones(s.shape, s.dtype)
        ),
        rest,
    )
    return nnx.merge(graphdef, params, rest)


def pure(state):
    """An ``nnx.State`` as a nested dict with string keys."""

    def strkeys(d):
        return {str(k): strkeys(v) if isinstance(v, dict) else v for k, v in d.items()}

    return strkeys(nnx.to_pure_dict(state))


# ---------------------------------------------------------------------------
# Test models.
# ---------------------------------------------------------------------------


class Encoder(nnx.Module):
    def __init__(self, rngs):
        self.linear1 = nnx.Linear(4, 6, param_dtype=F64, rngs=rngs)
        self.linear2 = nnx.Linear(6, 5, param_dtype=F64, rngs=rngs)

    def __call__(self, x, perts=None, taps=None):
        x = jnp.tanh(tap(self.linear1, "encoder/linear1", x, perts, taps))
        return jnp.tanh(tap(self.linear2, "encoder/linear2", x, perts, taps))


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.encoder = Encoder(rngs)
        self.norm = nnx.LayerNorm(5, param_dtype=F64, rngs=rngs)  # kind "scale_shift"
        self.layers = nnx.List(
            [
                nnx.Linear(5, 4, param_dtype=F64, rngs=rngs),
                nnx.Linear(4, 3, param_dtype=F64, rngs=rngs),
            ]
        )

    def __call__(self, x, perts=None, taps=None):
        x = self.norm(self.encoder(x, perts, taps))
        x = jnp.tanh(tap(self.layers[0], "layers/0", x, perts, taps))
        return tap(self.layers[1], "layers/1", x, perts, taps)


class ConvBlock(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(
            3, 4, (2, 2), padding="VALID", kernel_dilation=2, param_dtype=F64, rngs=rngs
        )

    def __call__(self, x, perts=None, taps=None):
        return nnx.relu(tap(self.conv, "block/conv", x, perts, taps))


class CNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(2, 3, (3, 3), strides=2, padding="SAME", param_dtype=F64, rngs=rngs)
        self.block = ConvBlock(rngs)
        self.conv3 = nnx.Conv(
            4,
            2,
            (2, 3),
            padding=((1, 0), (2, 1)),
            input_dilation=(2, 1),
            use_bias=False,
            param_dtype=F64,
            rngs=rngs,
        )
        self.head = nnx.Linear(30, 3, param_dtype=F64, rngs=rngs)

    def __call__(self, x, perts=None, taps=None):  # x: (N, 9, 8, 2)
        x = nnx.relu(tap(self.conv1, "conv1", x, perts, taps))  # (N, 5, 4, 3)
        x = self.block(x, perts, taps)  # (N, 3, 2, 4)
        x = jnp.tanh(tap(self.conv3, "conv3", x, perts, taps))  # (N, 5, 3, 2)
        return tap(self.head, "head", x.reshape(x.shape[0], -1), perts, taps)


CNN_GEOMETRY = {
    "conv1": dict(
        kernel_size=(3, 3),
        strides=(2, 2),
        padding="SAME",
        kernel_dilation=(1, 1),
        input_dilation=(1, 1),
    ),
    "block/conv": dict(
        kernel_size=(2, 2),
        strides=(1, 1),
        padding="VALID",
        kernel_dilation=(2, 2),
        input_dilation=(1, 1),
    ),
    "conv3": dict(
        kernel_size=(2, 3),
        strides=(1, 1),
        padding=[(1, 0), (2, 1)],
        kernel_dilation=(1, 1),
        input_dilation=(2, 1),
    ),
}


class Seq(nnx.Module):
    """Linear layers on (N, L, d) inputs after an Embed (its statistics checked apart)."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(7, 4, param_dtype=F64, rngs=rngs)
        self.proj = nnx.Linear(4, 5, param_dtype=F64, rngs=rngs)
        self.out = nnx.Linear(5, 6, param_dtype=F64, rngs=rngs)

    def __call__(self, tokens, perts=None, taps=None):
        h = jnp.tanh(tap(self.proj, "proj", self.embed(tokens), perts, taps))
        return tap(self.out, "out", h, perts, taps)


def _data(kind, n=4, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "mlp":
        return MLP, {}, jnp.asarray(rng.normal(size=(n, 4))), jnp.asarray(rng.integers(0, 3, n))
    if kind == "cnn":
        return (
            CNN,
            CNN_GEOMETRY,
            jnp.asarray(rng.normal(size=(n, 9, 8, 2))),
            jnp.asarray(rng.integers(0, 3, n)),
        )
    return Seq, {}, jnp.asarray(rng.integers(0, 7, (n, 3))), jnp.asarray(rng.integers(0, 6, (n, 3)))


def loss_fn(model, x, y):
    return losses.softmax_cross_entropy(model(x), y)


# ---------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
def test_stats_match_independent_references(kind):
    make, geometries, x, y = _data(kind)
    model = build(make)
    graphdef, state = nnx.split(model)

    @fast_jit
    def run(state, x, y):
        model = nnx.merge(graphdef, state)
        captured = cn.value_grad_and_stats(loss_fn, model, x, y)
        reference = nnx.value_and_grad(loss_fn)(model, x, y)

        def forward(xb, perts=None, taps=None):
            return model(xb, perts, taps)

        return (
            captured,
            reference,
            taps_of(forward, x),
            per_example_output_grads(forward, losses.softmax_cross_entropy, x, y),
        )

    (value, grads, stats), (ref_value, ref_grads), taps, ref = run(state, x, y)
    set_aside_norms(stats, pure(grads))
    if kind == "seq":  # the lookup has no tap of its own: checked, then set aside
        set_aside_lookup(stats, "embed", x, pure(grads)["embed"]["embedding"])
    np.testing.assert_allclose(value, ref_value, rtol=1e-14)
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14), grads, ref_grads
    )
    params = pure(nnx.state(model, nnx.Param))
    kernels = kernel_paths(params)
    biases = {}
    for key in kernels:
        node = params
        for part in key.split("/"):
            node = node[part]
        biases[key] = node.get("bias")
    assert_stats_match(stats, taps, ref, kernels, biases, geometries, x.shape[0])


def test_nnx_jit_state_and_rng_updates_and_model_untouched():
    class WithBatchNorm(nnx.Module):
        def __init__(self, rngs):
            # float32 throughout: NNX keeps BatchNorm statistics in float32.
            self.lin = nnx.Linear(3, 4, rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.head = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.head(self.drop(nnx.relu(self.bn(self.lin(x)))))

    model = build(WithBatchNorm)
    twin = nnx.clone(model)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(6, 3)), jnp.float32)
    y = jnp.array([0, 1, 1, 0, 1, 0])
    kernel_before = model.lin.kernel[...]
    count_before = int(model.drop.rngs.count[...])

    @nnx.jit
    def capture_step(model, x, y):
        return cn.value_grad_and_stats(loss_fn, model, x, y, has_aux=False)

    @nnx.jit
    def reference_step(model, x, y):
        return nnx.value_and_grad(loss_fn)(model, x, y)

    value, grads, stats = capture_step(model, x, y)
    ref_value, ref_grads = reference_step(twin, x, y)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads
    )
    # BatchNorm statistics were written back, as nnx.value_and_grad does; parameters untouched.
    np.testing.assert_allclose(model.bn.mean[...], twin.bn.mean[...], rtol=1e-6)
    np.testing.assert_allclose(model.bn.var[...], twin.bn.var[...], rtol=1e-6)
    assert not np.allclose(model.bn.mean[...], 1.0)
    np.testing.assert_array_equal(model.lin.kernel[...], kernel_before)
    # The dropout RNG stream advanced once, as with nnx.value_and_grad (same masks: same value).
    assert int(model.drop.rngs.count[...]) == int(twin.drop.rngs.count[...]) == count_before + 1
    assert type(model.lin) is nnx.Linear and type(model.head) is nnx.Linear
    assert set(stats) == {"lin", "head", "bn"} and stats["bn"].layer_kind == "scale_shift"
    assert stats["lin"].inputs.shape == (6, 3) and stats["head"].output_grads.shape == (6, 2)


def test_eager_equals_jit_and_root_layer_key():
    model = build(lambda rngs: nnx.Linear(4, 2, param_dtype=F64, rngs=rngs))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)))

    def se(m, xb):
        out = m(xb)
        return losses.squared_error(out, jnp.ones((3, 2))), out

    eager = cn.value_grad_and_stats(se, model, x, has_aux=True)
    jitted = nnx.jit(lambda m, xb: cn.value_grad_and_stats(se, m, xb, has_aux=True))(model, x)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14), eager, jitted
    )
    (_, out), _, stats = eager
    assert list(stats) == [""]
    np.testing.assert_allclose(stats[""].output_grads, out - 1.0, rtol=1e-12)  # N dL/ds


def test_sampled_fisher_nnx():
    make, _, x, y = _data("mlp", n=5)
    model = build(make)
    graphdef, state = nnx.split(model)
    key = jax.random.key(3, impl="rbg")

    @fast_jit
    def run(state, x, y, key):
        model = nnx.merge(graphdef, state)
        captured = cn.value_grad_and_stats(
            loss_fn, model, x, y, fisher="sampled", rng=key, fisher_batch_size=2
        )
        real = nnx.value_and_grad(loss_fn)(model, x, y)

        def forward(xb, perts=None, taps=None):
            return model(xb, perts, taps)

        labels = jax.random.categorical(jax.random.fold_in(key, 0), forward(x[:2]), axis=-1)
        return (
            captured,
            real,
            per_example_output_grads(forward, losses.softmax_cross_entropy, x[:2], labels),
        )

    (value, grads, stats), (ref_value, ref_grads), ref = run(state, x, y, key)
    np.testing.assert_allclose(value, ref_value, rtol=1e-14)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14), grads, ref_grads
    )
    assert stats["norm"].layer_kind == "scale_shift"  # (its output gradients: not tapped)
    for k, st in stats.items():
        assert st.inputs.shape[0] == 2
        if k != "norm":
            np.testing.assert_allclose(st.output_grads, ref[k], rtol=1e-9, atol=1e-12, err_msg=k)


def test_bfloat16_model_gives_float32_stats():
    model = build(lambda rngs: nnx.Conv(1, 2, (3, 3), dtype=jnp.bfloat16, rngs=rngs))
    x = jnp.ones((2, 4, 4, 1), jnp.float32)
    value, grads, stats = nnx.jit(
        lambda m: cn.value_grad_and_stats(
            lambda m: losses.squared_error(m(x), jnp.zeros((2, 4, 4, 2))), m
        )
    )(model)
    assert grads["kernel"][...].dtype == jnp.float32
    assert all(a.dtype == jnp.float32 for a in stats[""])
    assert stats[""].inputs.shape == (2, 16, 9)


def test_shared_layer_raises_and_model_is_restored():
    class Tied(nnx.Module):
        def __init__(self, rngs):
            self.tied = nnx.Linear(3, 3, rngs=rngs)

        def __call__(self, x):
            return self.tied(jnp.tanh(self.tied(x)))

    model = build(Tied)
    with pytest.raises(CaptureError, match="'tied'.*more than once"):
        cn.value_grad_and_stats(lambda m: jnp.sum(m(jnp.ones((2, 3)))), model)
    assert type(model.tied) is nnx.Linear
    model(jnp.ones((2, 3)))  # still usable


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(feature_group_count=2), "'conv'.*feature_group_count=2"),
        (dict(mask=jnp.ones((3, 3, 2, 4))), "'conv'.*mask"),
        (
            dict(conv_general_dilated=lambda *a, **k: jax.lax.conv_general_dilated(*a, **k)),
            "'conv'.*custom",
        ),
    ],
)
def test_refused_conv_options_raise_naming_the_layer(kwargs, match):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs, **kwargs)

        def __call__(self, x):
            return self.conv(x)

    model = build(Net)
    with pytest.raises(CaptureError, match=match):
        cn.value_grad_and_stats(lambda m: jnp.sum(m(jnp.ones((2, 5, 5, 2)))), model)


def test_nested_transformation_raises():
    make, _, x, y = _data("mlp")
    model = build(make)

    def vmapped_loss(m, x, y):
        logits = jax.vmap(lambda xn: m(xn[None])[0])(x)
        return losses.softmax_cross_entropy(logits, y)

    with pytest.raises(CaptureError, match="nested"):
        cn.value_grad_and_stats(vmapped_loss, model, x, y)

    def nnx_vmapped_loss(m, x, y):
        logits = nnx.vmap(lambda mm, xn: mm(xn[None])[0], in_axes=(None, 0))(m, x)
        return losses.softmax_cross_entropy(logits, y)

    with pytest.raises(CaptureError, match="nested"):
        cn.value_grad_and_stats(nnx_vmapped_loss, model, x, y)
    assert type(model.layers[0]) is nnx.Linear


def test_a_scanned_stack_of_layers_is_refused():
    @nnx.vmap(in_axes=0, out_axes=0)
    def stacked(key):
        return nnx.Linear(4, 4, param_dtype=F64, rngs=nnx.Rngs(key))

    class Stack(nnx.Module):
        def __init__(self):
            self.layers = stacked(jax.random.split(jax.random.key(0), 3))
            self.head = nnx.Linear(4, 2, param_dtype=F64, rngs=nnx.Rngs(1))

        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def body(h, layer):
                return jnp.tanh(layer(h))

            return self.head(body(x, self.layers))

    model = Stack()
    assert model.layers.kernel.shape == (3, 4, 4)  # stacked
    x = jnp.ones((5, 4), F64)
    with pytest.raises(CaptureError, match="Linear.*nested transformation"):
        cn.value_grad_and_stats(lambda m, xb: jnp.sum(m(xb) ** 2), model, x)


def test_patch_reference_sanity():
    # The numpy reference itself, on a case small enough to check by hand.
    x = np.arange(1.0, 10.0).reshape(1, 3, 3, 1)
    p = np_patches(x, (2, 2), (1, 1), "VALID", (1, 1), (1, 1))
    np.testing.assert_array_equal(p[0, 0], [1, 2, 4, 5])
    np.testing.assert_array_equal(p[0, 3], [5, 6, 8, 9])
