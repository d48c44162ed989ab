"""Tests of ``sofim_optax.curvature.linen.value_grad_and_stats``.

The references are independent of the capture code: every test model takes
optional ``perts`` (explicit additive perturbations of the captured layer
outputs, keyed by the expected statistics key) and ``taps`` (a dict that the
model fills with each layer's input and output). Per-example output gradients
are ``jax.vmap`` over examples of ``jax.grad`` of the one-example loss with
respect to those perturbations; convolution patches are cut out with explicit
Python loops in numpy.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sofim_optax import curvature
from sofim_optax.curvature import CaptureError, LayerStats, losses
from sofim_optax.curvature import linen as cl

F64 = jnp.float64

#: ``jax.jit`` with cheaper XLA:CPU compilation (these graphs are tiny and run once).
fast_jit = functools.partial(
    jax.jit,
    compiler_options={
        "xla_backend_optimization_level": 0,
        "xla_llvm_disable_expensive_passes": True,
    },
)


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


# ---------------------------------------------------------------------------
# Independent references (also imported by test_curvature_nnx.py).
# ---------------------------------------------------------------------------


def tap(layer, key, x, perts, taps):
    """Applies ``layer``; records ``(input, output)`` in ``taps``; adds ``perts[key]``."""
    y = layer(x)
    if taps is not None:
        taps[key] = (x, y)
    if perts is not None:
        y = y + perts[key]
    return y


def np_patches(x, kernel_size, strides, padding, kernel_dilation, input_dilation):
    """Convolution patches by explicit loops, flattened in (k_1, [k_2,] c_in) order.

    Supports 1-d and 2-d convolutions; ``padding`` is "SAME", "VALID",
    "CIRCULAR", "CAUSAL" (1-d) or a list of (low, high) pairs.
    """
    x = np.asarray(x)
    one_d = len(kernel_size) == 1
    if one_d:
        x = x[:, :, None, :]
        kernel_size, strides = (kernel_size[0], 1), (strides[0], 1)
        kernel_dilation, input_dilation = (kernel_dilation[0], 1), (input_dilation[0], 1)
        if not isinstance(padding, str):
            padding = [tuple(padding[0]), (0, 0)]
    n, h, w, c = x.shape
    size = [(h - 1) * input_dilation[0] + 1, (w - 1) * input_dilation[1] + 1]  # dilated input
    dk = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
    wrap = False
    if padding == "SAME":
        pads = []
        for sz, k, s in zip(size, dk, strides):
            out = -(-sz // s)
            total = max((out - 1) * s + k - sz, 0)
            pads.append((total // 2, total - total // 2))
    elif padding == "VALID":
        pads = [(0, 0), (0, 0)]
    elif padding == "CIRCULAR":
        pads = [((k - 1) // 2, k // 2) for k in dk]
        wrap = True
    elif padding == "CAUSAL":
        assert one_d
        pads = [(dk[0] - 1, 0), (0, 0)]
    else:
        pads = [tuple(p) for p in padding]
    out = [(sz + lo + hi - k) // s + 1 for sz, (lo, hi), k, s in zip(size, pads, dk, strides)]
    if one_d:
        out[1], pads[1] = 1, (0, 0)
    patches = np.zeros((n, out[0], out[1], kernel_size[0], kernel_size[1], c), x.dtype)
    for i in range(out[0]):
        for j in range(out[1]):
            for a in range(kernel_size[0]):
                for b in range(kernel_size[1]):
                    r = i * strides[0] + a * kernel_dilation[0] - pads[0][0]
                    q = j * strides[1] + b * kernel_dilation[1] - pads[1][0]
                    if wrap:
                        r, q = r % size[0], q % size[1]
                    if not (0 <= r < size[0] and 0 <= q < size[1]):
                        continue
                    if r % input_dilation[0] or q % input_dilation[1]:
                        continue
                    patches[:, i, j, a, b, :] = x[
                        :, r // input_dilation[0], q // input_dilation[1], :
                    ]
    return patches.reshape(n, out[0] * out[1], -1)


def per_example_output_grads(forward, example_loss, x, y):
    """``d l_n / d s_n`` for every captured layer, by vmap over examples.

    Args:
      forward: ``forward(x, perts=None, taps=None) -> predictions`` (traceable).
      example_loss: ``example_loss(predictions, targets)`` on a batch of one.
      x, y: the batch.

    Returns:
      dict key -> array ``(N, *output_shape_of_one_example)``.
    """
    taps = {}
    forward(x[:1], taps=taps)
    zeros = {k: jnp.zeros_like(out) for k, (_, out) in taps.items()}

    def one(xn, yn):
        return jax.grad(
            lambda p: example_loss(forward(xn[None], perts=p), jax.tree.map(lambda a: a[None], yn))
        )(zeros)

    return {k: v[:, 0] for k, v in jax.vmap(one)(x, y).items()}


def taps_of(forward, x):
    """Each captured layer's ``(input, output)`` on the batch ``x``."""
    taps = {}
    forward(x, taps=taps)
    return taps


def random_params(shapes, seed=1):
    """Fills a tree of ShapeDtypeStructs with scaled normal draws (numpy, no XLA RNG)."""
    rng = np.random.default_rng(seed)

    def draw(s):
        fan_in = math.prod(s.shape[:-1]) if len(s.shape) > 1 else 1
        return jnp.asarray(rng.normal(size=s.shape) / math.sqrt(fan_in), s.dtype)

    return jax.tree.map(draw, shapes)


def rows(a, n):
    """The statistics view: (N, d) stays, (N, ..., d) -> (N, T, d)."""
    a = jnp.asarray(a)
    return a if a.ndim == 2 else a.reshape(n, -1, a.shape[-1])


def kernel_paths(tree, prefix=()):
    """Paths (joined with '/') of every 'kernel' leaf of a nested dict."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(kernel_paths(v, prefix + (str(k),)))
        elif k == "kernel":
            out["/".join(prefix)] = v
    return out


def bias_at(tree, key):
    node = tree
    for part in key.split("/") if key else []:
        node = node[part]
    return node.get("bias") if hasattr(node, "get") else None


def assert_stats_match(stats, taps, ref_grads, kernels, biases, geometries, n):
    """Checks inputs/outputs/output_grads against the references, and the identity."""
    assert set(stats) == set(taps) == set(kernels)
    for key, st in stats.items():
        assert isinstance(st, LayerStats)
        x, out = taps[key]
        if key in geometries:
            expected_inputs = np_patches(x, **geometries[key])
        else:
            expected_inputs = rows(x, n)
        np.testing.assert_allclose(st.inputs, expected_inputs, rtol=1e-12, atol=1e-12, err_msg=key)
        np.testing.assert_allclose(st.outputs, rows(out, n), rtol=1e-12, atol=1e-12, err_msg=key)
        np.testing.assert_allclose(
            st.output_grads, rows(ref_grads[key], n), rtol=1e-9, atol=1e-12, err_msg=key
        )
        kernel = kernels[key]
        pred = st.inputs @ jnp.reshape(kernel, (-1, kernel.shape[-1]))
        if biases.get(key) is not None:
            pred = pred + biases[key]
        np.testing.assert_allclose(pred, st.outputs, rtol=1e-10, atol=1e-12, err_msg=key)


# ---------------------------------------------------------------------------
# Test models.
# ---------------------------------------------------------------------------


class Block(nn.Module):
    width: int
    key: str

    @nn.compact
    def __call__(self, x, perts=None, taps=None):
        return jnp.tanh(tap(nn.Dense(self.width, param_dtype=F64), self.key, x, perts, taps))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, perts=None, taps=None):
        x = Block(6, "Block_0/Dense_0")(x, perts, taps)
        x = Block(5, "enc/Dense_0", name="enc")(x, perts, taps)
        x = nn.LayerNorm(param_dtype=F64)(x)  # statistics of kind "scale_shift"
        return tap(nn.Dense(3, param_dtype=F64, name="head"), "head", x, perts, taps)


class Stage(nn.Module):
    @nn.compact
    def __call__(self, x, perts=None, taps=None):
        conv = nn.Conv(4, (2, 2), padding="VALID", kernel_dilation=2, param_dtype=F64, name="dil")
        return nn.relu(tap(conv, "Stage_0/dil", x, perts, taps))


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, perts=None, taps=None):  # x: (N, 9, 8, 2)
        x = tap(
            nn.Conv(3, (3, 3), strides=2, padding="SAME", param_dtype=F64), "Conv_0", x, perts, taps
        )
        x = Stage()(nn.relu(x), perts, taps)  # (N, 3, 2, 4)
        conv = nn.Conv(
            2,
            (2, 3),
            padding=((1, 0), (2, 1)),
            input_dilation=(2, 1),
            use_bias=False,
            param_dtype=F64,
            name="explicit",
        )
        x = jnp.tanh(tap(conv, "explicit", x, perts, taps))  # (N, 5, 3, 2)
        x = x.reshape(x.shape[0], -1)
        return tap(nn.Dense(3, param_dtype=F64, name="head"), "head", x, perts, taps)


CNN_GEOMETRY = {
    "Conv_0": dict(
        kernel_size=(3, 3),
        strides=(2, 2),
        padding="SAME",
        kernel_dilation=(1, 1),
        input_dilation=(1, 1),
    ),
    "Stage_0/dil": dict(
        kernel_size=(2, 2),
        strides=(1, 1),
        padding="VALID",
        kernel_dilation=(2, 2),
        input_dilation=(1, 1),
    ),
    "explicit": dict(
        kernel_size=(2, 3),
        strides=(1, 1),
        padding=[(1, 0), (2, 1)],
        kernel_dilation=(1, 1),
        input_dilation=(2, 1),
    ),
}


class CNN1D(nn.Module):
    @nn.compact
    def __call__(self, x, perts=None, taps=None):  # x: (N, 7, 2)
        conv = nn.Conv(3, (3,), padding="CAUSAL", kernel_dilation=2, param_dtype=F64, name="causal")
        x = jnp.tanh(tap(conv, "causal", x, perts, taps))
        conv = nn.Conv(2, (3,), strides=2, padding="CIRCULAR", param_dtype=F64, name="circ")
        x = jnp.tanh(tap(conv, "circ", x, perts, taps))
        return tap(nn.Dense(3, param_dtype=F64, name="head"), "head", x.mean(axis=1), perts, taps)


CNN1D_GEOMETRY = {
    "causal": dict(
        kernel_size=(3,), strides=(1,), padding="CAUSAL", kernel_dilation=(2,), input_dilation=(1,)
    ),
    "circ": dict(
        kernel_size=(3,),
        strides=(2,),
        padding="CIRCULAR",
        kernel_dilation=(1,),
        input_dilation=(1,),
    ),
}


class Seq(nn.Module):
    """Dense layers applied to (N, L, d) inputs after an Embed (its statistics: one-hot rows,
    checked by :func:`set_aside_lookup`)."""

    @nn.compact
    def __call__(self, tokens, perts=None, taps=None):
        h = nn.Embed(7, 4, param_dtype=F64)(tokens)
        h = jnp.tanh(tap(nn.Dense(5, param_dtype=F64), "Dense_0", h, perts, taps))
        return tap(nn.Dense(6, param_dtype=F64), "Dense_1", h, perts, taps)  # (N, L, 6)


def _data(kind, n=4, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "mlp":
        return MLP(), {}, jnp.asarray(rng.normal(size=(n, 4))), jnp.asarray(rng.integers(0, 3, n))
    if kind == "cnn":
        return (
            CNN(),
            CNN_GEOMETRY,
            jnp.asarray(rng.normal(size=(n, 9, 8, 2))),
            jnp.asarray(rng.integers(0, 3, n)),
        )
    if kind == "cnn1d":
        return (
            CNN1D(),
            CNN1D_GEOMETRY,
            jnp.asarray(rng.normal(size=(n, 7, 2))),
            jnp.asarray(rng.integers(0, 3, n)),
        )
    tokens = jnp.asarray(rng.integers(0, 7, (n, 3)))
    return Seq(), {}, tokens, jnp.asarray(rng.integers(0, 6, (n, 3)))


def _params(model, x, seed=1):
    return random_params(jax.eval_shape(model.init, jax.random.key(0), x), seed)


def capture_and_references(
    model, params, x, y, loss_fn, example_loss=losses.softmax_cross_entropy, **kwargs
):
    """One jitted computation: capture, jax.value_and_grad, taps, per-example grads."""

    @fast_jit
    def run(params, x, y):
        captured = cl.value_grad_and_stats(loss_fn, params, x, y, **kwargs)
        reference = jax.value_and_grad(loss_fn, has_aux=kwargs.get("has_aux", False))(params, x, y)
        variables = params if "params" in params else {"params": params}

        def forward(xb, perts=None, taps=None):
            return model.apply(variables, xb, perts, taps)

        return (
            captured,
            reference,
            taps_of(forward, x),
            per_example_output_grads(forward, example_loss, x, y),
        )

    return run(params, x, y)


def set_aside_lookup(stats, path, tokens, table_grad):
    """Removes an embedding's statistics from ``stats`` after checking them: one-hot rows of
    the tokens, whose products with the output gradients average to the table's gradient."""
    st = stats.pop(path)
    x, g = np.asarray(st.inputs), np.asarray(st.output_grads)
    np.testing.assert_array_equal(x, np.eye(x.shape[-1])[np.asarray(tokens)])
    mean = x.reshape(-1, x.shape[-1]).T @ g.reshape(-1, g.shape[-1]) / x.shape[0]
    np.testing.assert_allclose(mean, table_grad, rtol=1e-10, atol=1e-14)


def set_aside_norms(stats, grads, reduction="mean"):
    """Removes the normalisation layers' statistics from ``stats`` after checking them: the
    per-example gradients they give, ``Σ_t x̂ ⊙ g`` for the scale and ``Σ_t g`` for the bias,
    average (or sum, for a summed loss) to the autodiff gradient. (Per example they are checked
    against vmapped per-example gradients in test_norm_capture.py.)"""
    combine = np.mean if reduction == "mean" else np.sum
    for key in [k for k, st in stats.items() if st.layer_kind == "scale_shift"]:
        st = stats.pop(key)
        x, g = np.asarray(st.inputs), np.asarray(st.output_grads)
        node = grads
        for part in key.split("/") if key else []:
            node = node[part]
        per_example = {"scale": np.sum(x * g, axis=1), "bias": np.sum(g, axis=1)}
        for name, rows in per_example.items():
            if name in node:
                want = np.asarray(node[name]).reshape(-1)
                np.testing.assert_allclose(
                    combine(rows, axis=0), want, rtol=1e-10, atol=1e-14, err_msg=key
                )


def check_against_references(
    captured, reference, taps, ref_grads, params, geometries, n, has_aux=False, reduction="mean"
):
    value, grads, stats = captured
    set_aside_norms(stats, grads["params"] if "params" in grads else grads, reduction)
    ref_value, ref_grads_params = reference
    if has_aux:
        (value, aux), (ref_value, ref_aux) = value, ref_value
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-14), aux, ref_aux)
    np.testing.assert_allclose(value, ref_value, rtol=1e-14)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14),
        grads,
        ref_grads_params,
    )
    tree = params["params"] if "params" in params else params
    kernels = kernel_paths(tree)
    biases = {k: bias_at(tree, k) for k in kernels}
    assert_stats_match(stats, taps, ref_grads, kernels, biases, geometries, n)


# ---------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "cnn", "cnn1d", "seq"])
def test_stats_match_independent_references(kind):
    model, geometries, x, y = _data(kind)
    params = _params(model, x)

    def loss_fn(p, xb, yb):
        return losses.softmax_cross_entropy(model.apply(p, xb), yb)

    captured, reference, taps, ref_grads = capture_and_references(model, params, x, y, loss_fn)
    if kind == "seq":  # the lookup has no tap of its own: checked, then set aside
        table_grad = captured[1]["params"]["Embed_0"]["embedding"]
        set_aside_lookup(captured[2], "Embed_0", x, table_grad)
    check_against_references(captured, reference, taps, ref_grads, params, geometries, x.shape[0])
    for st in captured[2].values():
        assert all(a.dtype == F64 for a in st)


def test_has_aux_and_sum_reduction_and_bare_params():
    model, _, x, y = _data("mlp")
    params = _params(model, x)["params"]  # the bare params tree

    def loss_fn(p, xb, yb):
        logits = model.apply({"params": p}, xb)
        return xb.shape[0] * losses.softmax_cross_entropy(logits, yb), {"logits": logits}

    captured, reference, taps, ref_grads = capture_and_references(
        model, params, x, y, loss_fn, has_aux=True, loss_reduction="sum"
    )
    check_against_references(
        captured, reference, taps, ref_grads, params, {}, x.shape[0], has_aux=True, reduction="sum"
    )
    # The keys are the kernel paths of the bare tree.
    assert (
        set(captured[2]) == set(kernel_paths(params)) == {"Block_0/Dense_0", "enc/Dense_0", "head"}
    )


def test_mean_reduction_scales_by_batch_size():
    model, _, x, y = _data("mlp")
    params = _params(model, x)

    def mean_loss(p):
        return losses.softmax_cross_entropy(model.apply(p, x), y)

    def sum_loss(p):
        return x.shape[0] * mean_loss(p)

    @fast_jit
    def all_stats(p):
        return (
            cl.value_grad_and_stats(mean_loss, p)[2],
            cl.value_grad_and_stats(sum_loss, p, loss_reduction="sum")[2],
            cl.value_grad_and_stats(mean_loss, p, loss_reduction="sum")[2],  # dL/ds itself
        )

    mean_stats, sum_stats, raw = all_stats(params)
    for key in mean_stats:
        np.testing.assert_allclose(
            mean_stats[key].output_grads, sum_stats[key].output_grads, rtol=1e-12
        )
        np.testing.assert_allclose(
            mean_stats[key].output_grads, x.shape[0] * raw[key].output_grads, rtol=1e-12
        )


def test_eager_equals_jit():
    layer = nn.Dense(2, param_dtype=F64)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)))
    params = _params(layer, x)

    def loss_fn(p, xb):
        return losses.squared_error(layer.apply(p, xb), jnp.ones((3, 2)))

    eager = cl.value_grad_and_stats(loss_fn, params, x)
    jitted = fast_jit(lambda p, xb: cl.value_grad_and_stats(loss_fn, p, xb))(params, x)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14), eager, jitted
    )
    assert list(eager[2]) == [""]  # a root-level layer has the empty key
    np.testing.assert_allclose(
        eager[2][""].output_grads, eager[2][""].outputs - 1.0, rtol=1e-12
    )  # N dL/ds


def test_captured_stats_are_deferred_and_behave_like_plain_ones():
    # The capture's LayerStats hold the layer's own input (not its patches) as a pytree leaf
    # and form the fields when read; a plain LayerStats of those fields is interchangeable.
    model, geometries, x, y = _data("cnn")
    params = _params(model, x)

    def loss_fn(p, xb, yb):
        return losses.softmax_cross_entropy(model.apply(p, xb), yb)

    _, _, stats = cl.value_grad_and_stats(loss_fn, params, x, y)
    conv = next(k for k in stats if k in geometries)
    st = stats[conv]
    leaf_shapes = [a.shape for a in jax.tree.leaves(st)]
    assert st.inputs.ndim == 3 and st.inputs.shape not in leaf_shapes  # patches not held
    assert "deferred" in repr(st) and str(st.inputs.shape) in repr(st)
    plain = LayerStats(*st)
    again = jax.tree.unflatten(jax.tree.structure(st), jax.tree.leaves(st))
    jitted = fast_jit(lambda s: s)(st)
    for other in (plain, again, jitted, st._replace()):
        for a, b in zip(st, other):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    abstract = jax.eval_shape(lambda p: cl.value_grad_and_stats(loss_fn, p, x, y)[2], params)
    assert abstract[conv].inputs.shape == st.inputs.shape
    assert st._asdict().keys() == {"inputs", "output_grads", "outputs"}
    assert st[0].shape == st.inputs.shape and st[-1].shape == st.outputs.shape and len(st) == 3
    assert [a.shape for a in st[1:]] == [st.output_grads.shape, st.outputs.shape]
    with pytest.raises(ValueError, match="no field"):
        st._replace(patches=None)
    # fisher_batch_size keeps the first examples of every field.
    cut = cl.value_grad_and_stats(loss_fn, params, x, y, fisher_batch_size=2)[2][conv]
    for a, b in zip(cut, st):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b)[:2], rtol=1e-12)


def test_bfloat16_model_gives_float32_stats_and_param_dtype_grads():
    class Low(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(3, (3, 3), dtype=jnp.bfloat16)(x)
            x = nn.relu(x).reshape(x.shape[0], -1)
            return nn.Dense(2, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)(x)

    model = Low()
    x = jnp.ones((2, 4, 4, 1), jnp.float32)
    params = _params(model, x)
    loss_fn = lambda p: losses.squared_error(model.apply(p, x), jnp.zeros((2, 2)))  # noqa: E731
    value, grads, stats = fast_jit(lambda p: cl.value_grad_and_stats(loss_fn, p))(params)
    assert value.dtype == jnp.float32
    assert grads["params"]["Conv_0"]["kernel"].dtype == jnp.float32
    assert grads["params"]["Dense_0"]["kernel"].dtype == jnp.bfloat16
    for st in stats.values():
        assert all(a.dtype == jnp.float32 for a in st)


def test_layers_of_other_kinds_and_subclasses():
    class Doubling(nn.Dense):  # overrides __call__ but runs Dense.__call__: captured
        @nn.compact
        def __call__(self, x):
            return 2.0 * super().__call__(x)

    class Other(nn.Dense):  # overrides __call__ without Dense.__call__: not captured
        @nn.compact
        def __call__(self, x):
            k = self.param(
                "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), F64
            )
            return x @ k

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = Doubling(3, param_dtype=F64, name="dbl")(x)
            x = nn.DenseGeneral(3, param_dtype=F64, name="gen")(x)
            return Other(2, name="other")(x)

    model = Net()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)))
    params = _params(model, x)
    loss_fn = lambda p: losses.squared_error(model.apply(p, x), jnp.zeros((3, 2)))  # noqa: E731
    _, grads, stats = fast_jit(lambda p: cl.value_grad_and_stats(loss_fn, p))(params)
    assert set(stats) == {"dbl", "gen"}  # DenseGeneral is captured too
    assert set(grads["params"]) == {"dbl", "gen", "other"}
    dbl = stats["dbl"]
    k, b = params["params"]["dbl"]["kernel"], params["params"]["dbl"]["bias"]
    np.testing.assert_allclose(dbl.outputs, x @ k + b, rtol=1e-12)  # pre-doubling Dense output


def test_setup_defined_submodules_use_attribute_names():
    class Inner(nn.Module):
        def setup(self):
            self.proj = nn.Dense(3, param_dtype=F64)

        def __call__(self, x):
            return self.proj(x)

    class Outer(nn.Module):
        def setup(self):
            self.inner = Inner()
            self.conv = nn.Conv(2, (2,), padding="VALID", param_dtype=F64)

        def __call__(self, x):  # x: (N, L, C)
            return self.conv(self.inner(x))

    model = Outer()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 3)))
    params = _params(model, x)
    stats = jax.eval_shape(
        lambda p: cl.value_grad_and_stats(lambda q: jnp.sum(model.apply(q, x)), p)[2], params
    )
    assert set(stats) == set(kernel_paths(params["params"])) == {"inner/proj", "conv"}
    assert stats["inner/proj"].inputs.shape == (2, 4, 3)  # Dense on (N, L, d): (N, T, d)
    assert stats["conv"].inputs.shape == (2, 3, 6)


def test_shared_layer_raises_naming_it():
    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x):
            layer = nn.Dense(4, name="tied")
            return layer(jnp.tanh(layer(x)))

    model = Shared()
    x = jnp.ones((2, 4))
    params = _params(model, x)
    with pytest.raises(CaptureError, match="'tied'.*more than once"):
        cl.value_grad_and_stats(lambda p: jnp.sum(model.apply(p, x)), params)


@pytest.mark.parametrize(
    "layer, match",
    [
        (
            lambda: nn.Conv(4, (3, 3), feature_group_count=2, name="grouped"),
            "'grouped'.*feature_group_count=2",
        ),
        (lambda: nn.Conv(4, (3, 3), mask=jnp.ones((3, 3, 2, 4)), name="masked"), "'masked'.*mask"),
        (
            lambda: nn.Conv(
                4, (3, 3), conv_general_dilated=jax.lax.conv_general_dilated, name="custom"
            ),
            "'custom'.*custom",
        ),
    ],
)
def test_refused_conv_options_raise_naming_the_layer(layer, match):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(layer()(x).reshape(x.shape[0], -1))

    model = Net()
    x = jnp.ones((2, 5, 5, 2))
    params = _params(model, x)
    with pytest.raises(CaptureError, match=match):
        cl.value_grad_and_stats(lambda p: jnp.sum(model.apply(p, x)), params)


def test_nested_transformation_raises():
    model, _, x, y = _data("mlp")
    params = _params(model, x)

    def per_example_loss(p):
        logits = jax.vmap(lambda xn: model.apply(p, xn[None])[0])(x)
        return losses.softmax_cross_entropy(logits, y)

    with pytest.raises(CaptureError, match="nested JAX transformation"):
        cl.value_grad_and_stats(per_example_loss, params)


def test_a_scanned_stack_of_layers_is_refused_naming_the_layer():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return jnp.tanh(nn.Dense(4, param_dtype=F64, name="dense")(h)), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scanned = nn.scan(
                Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
            )
            h, _ = scanned(name="blocks")(x, None)
            return nn.Dense(2, param_dtype=F64, name="head")(h)

    x = jnp.ones((5, 4), F64)
    params = Stack().init(jax.random.key(0), x)
    assert params["params"]["blocks"]["dense"]["kernel"].shape == (3, 4, 4)  # stacked
    with pytest.raises(CaptureError, match="'blocks/dense'.*nested JAX transformation"):
        cl.value_grad_and_stats(lambda p: jnp.sum(Stack().apply(p, x) ** 2), params)


def test_unbatched_dense_raises():
    layer = nn.Dense(2)
    params = _params(layer, jnp.ones((3,)))
    with pytest.raises(CaptureError, match="leading batch axis"):
        cl.value_grad_and_stats(lambda p: jnp.sum(layer.apply(p, jnp.ones((3,)))), params)


def test_package_exports():
    assert curvature.linen is cl
    assert curvature.losses is losses
    assert curvature.LayerStats is LayerStats
    assert callable(curvature.nnx.value_grad_and_stats)
    assert math.prod(CNN_GEOMETRY["Conv_0"]["kernel_size"]) == 9
