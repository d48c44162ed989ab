"""Tests of the loss helpers and of the sampled Fisher (``fisher="sampled"``).

The sampled-Fisher references draw their targets in the test, following the
rule documented in ``curvature.linen.value_grad_and_stats`` (the ``i``-th
registered helper samples with ``jax.random.fold_in(rng, i)``), and compute the
per-example gradients with the independent perturbation references of
``test_curvature_linen``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_curvature_linen import MLP, _params, fast_jit, per_example_output_grads, taps_of

from sofim_optax.curvature import CaptureError, losses
from sofim_optax.curvature import linen as cl


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


# ---------------------------------------------------------------------------
# The helpers as plain losses.
# ---------------------------------------------------------------------------


def test_softmax_cross_entropy_int_and_one_hot_labels():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 3, 5)))  # (N, L, C)
    labels = jnp.asarray(rng.integers(0, 5, (4, 3)))
    one_hot = jax.nn.one_hot(labels, 5, dtype=jnp.float64)

    @fast_jit
    def run(logits, labels, one_hot):
        ref = optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum(axis=1).mean()
        return (
            ref,
            losses.softmax_cross_entropy(logits, labels),
            losses.softmax_cross_entropy(logits, one_hot),
        )

    ref, from_int, from_one_hot = run(logits, labels, one_hot)
    np.testing.assert_allclose(from_int, ref, rtol=1e-12)
    np.testing.assert_allclose(from_one_hot, ref, rtol=1e-12)
    with pytest.raises(ValueError, match="labels"):
        losses.softmax_cross_entropy(logits, labels[:, :2])


def test_sigmoid_binary_cross_entropy_and_squared_error():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(4, 2, 3)))
    targets = jnp.asarray(rng.uniform(size=(4, 2, 3)))

    @fast_jit
    def run(logits, targets):
        return (
            optax.sigmoid_binary_cross_entropy(logits, targets).sum(axis=(1, 2)).mean(),
            losses.sigmoid_binary_cross_entropy(logits, targets),
            0.5 * jnp.sum((logits - targets) ** 2) / 4,
            losses.squared_error(logits, targets),
        )

    ref_bce, bce, ref_se, se = run(logits, targets)
    np.testing.assert_allclose(bce, ref_bce, rtol=1e-12)
    np.testing.assert_allclose(se, ref_se, rtol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        losses.squared_error(logits, targets[:, 0])


def test_low_precision_predictions_give_float32_loss():
    logits = jax.ShapeDtypeStruct((2, 3), jnp.bfloat16)
    for helper, target in [
        (losses.softmax_cross_entropy, jnp.array([0, 1])),
        (losses.sigmoid_binary_cross_entropy, jnp.zeros((2, 3))),
        (losses.squared_error, jnp.zeros((2, 3))),
    ]:
        assert jax.eval_shape(helper, logits, target).dtype == jnp.float32


# ---------------------------------------------------------------------------
# Sampled Fisher.
# ---------------------------------------------------------------------------

LIKELIHOODS = {
    # helper, sampler (the documented rule), data targets
    "categorical": (
        losses.softmax_cross_entropy,
        lambda key, z: jax.random.categorical(key, z, axis=-1),
        lambda rng, n: jnp.asarray(rng.integers(0, 3, n)),
    ),
    "bernoulli": (
        losses.sigmoid_binary_cross_entropy,
        lambda key, z: jax.random.bernoulli(key, jax.nn.sigmoid(z)).astype(z.dtype),
        lambda rng, n: jnp.asarray(rng.integers(0, 2, (n, 3)), jnp.float64),
    ),
    "gaussian": (
        losses.squared_error,
        lambda key, z: z + jax.random.normal(key, z.shape, z.dtype),
        lambda rng, n: jnp.asarray(rng.normal(size=(n, 3))),
    ),
}


@pytest.mark.parametrize(
    "likelihood, fisher_batch_size", [("categorical", 3), ("bernoulli", None), ("gaussian", 3)]
)
def test_sampled_fisher_matches_explicitly_sampled_targets(likelihood, fisher_batch_size):
    helper, sampler, make_targets = LIKELIHOODS[likelihood]
    model = MLP()
    data_rng = np.random.default_rng(2)
    n = 5
    x = jnp.asarray(data_rng.normal(size=(n, 4)))
    y = make_targets(data_rng, n)
    params = _params(model, x)
    key = jax.random.key(7, impl="rbg")  # cheap to compile
    m = n if fisher_batch_size is None else fisher_batch_size

    def loss_fn(p, xb, yb):
        return helper(model.apply(p, xb), yb)

    @fast_jit
    def run(params, x, y, key):
        captured = cl.value_grad_and_stats(
            loss_fn, params, x, y, fisher="sampled", rng=key, fisher_batch_size=fisher_batch_size
        )
        real = jax.value_and_grad(loss_fn)(params, x, y)

        def forward(xb, perts=None, taps=None):
            return model.apply(params, xb, perts, taps)

        preds = forward(x[:m])
        sampled = sampler(jax.random.fold_in(key, 0), preds)
        return (
            captured,
            real,
            taps_of(forward, x[:m]),
            per_example_output_grads(forward, helper, x[:m], sampled),
        )

    (value, grads, stats), (ref_value, ref_grads), taps, ref = run(params, x, y, key)
    np.testing.assert_allclose(value, ref_value, rtol=1e-14)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14), grads, ref_grads
    )
    assert set(stats) == {"Block_0/Dense_0", "enc/Dense_0", "head", "LayerNorm_0"}
    assert stats.pop("LayerNorm_0").inputs.shape[0] == m  # (its own tests: test_norm_capture)
    for k, st in stats.items():
        assert st.inputs.shape[0] == st.outputs.shape[0] == st.output_grads.shape[0] == m
        np.testing.assert_allclose(st.inputs, taps[k][0], rtol=1e-13, err_msg=k)
        np.testing.assert_allclose(st.outputs, taps[k][1], rtol=1e-13, err_msg=k)
        np.testing.assert_allclose(st.output_grads, ref[k], rtol=1e-9, atol=1e-12, err_msg=k)


def test_sampled_fisher_with_two_registered_losses():
    class TwoHeads(nn.Module):
        @nn.compact
        def __call__(self, x, perts=None, taps=None):
            z = nn.Dense(5, param_dtype=jnp.float64, name="trunk")(x)
            if taps is not None:
                taps["trunk"] = (x, z)
            if perts is not None:
                z = z + perts["trunk"]
            return z

    def joint_loss(z, targets):
        labels, values = targets
        return losses.softmax_cross_entropy(z[:, :3], labels) + losses.squared_error(
            z[:, 3:], values
        )

    model = TwoHeads()
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(4, 3)))
    y = (jnp.asarray(rng.integers(0, 3, 4)), jnp.asarray(rng.normal(size=(4, 2))))
    params = _params(model, x)
    key = jax.random.key(11, impl="rbg")

    @fast_jit
    def run(params, x, y, key):
        _, _, stats = cl.value_grad_and_stats(
            lambda p, xb, yb: joint_loss(model.apply(p, xb), yb),
            params,
            x,
            y,
            fisher="sampled",
            rng=key,
        )

        def forward(xb, perts=None, taps=None):
            return model.apply(params, xb, perts, taps)

        z = forward(x)
        labels = jax.random.categorical(jax.random.fold_in(key, 0), z[:, :3], axis=-1)
        values = z[:, 3:] + jax.random.normal(jax.random.fold_in(key, 1), (4, 2), z.dtype)
        return stats, per_example_output_grads(forward, joint_loss, x, (labels, values))

    stats, ref = run(params, x, y, key)
    np.testing.assert_allclose(stats["trunk"].output_grads, ref["trunk"], rtol=1e-10, atol=1e-12)


def test_fisher_batch_size_slices_empirical_stats():
    model = MLP()
    x = jnp.asarray(np.random.default_rng(4).normal(size=(5, 4)))
    y = jnp.array([0, 1, 2, 0, 1])
    params = _params(model, x)
    loss_fn = lambda p: losses.softmax_cross_entropy(model.apply(p, x), y)  # noqa: E731

    @fast_jit
    def run(p):
        return cl.value_grad_and_stats(loss_fn, p)[2], cl.value_grad_and_stats(
            loss_fn, p, fisher_batch_size=2
        )[2]

    full, sliced = run(params)
    for k in full:
        for a, b in zip(full[k], sliced[k]):
            np.testing.assert_allclose(b, a[:2], rtol=1e-13)


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------


def _tiny():
    layer = nn.Dense(3)
    x = jnp.ones((4, 2))
    return layer, _params(layer, x), x


def test_sampled_without_rng_or_registration_raises():
    layer, params, x = _tiny()
    with pytest.raises(ValueError, match="rng"):
        cl.value_grad_and_stats(
            lambda p: losses.softmax_cross_entropy(layer.apply(p, x), jnp.zeros(4, int)),
            params,
            fisher="sampled",
        )
    with pytest.raises(CaptureError, match="losses"):
        cl.value_grad_and_stats(
            lambda p: optax.softmax_cross_entropy_with_integer_labels(
                layer.apply(p, x), jnp.zeros(4, int)
            ).mean(),
            params,
            fisher="sampled",
            rng=jax.random.key(0),
        )


def test_bad_options_raise():
    layer, params, x = _tiny()
    loss_fn = lambda p: losses.squared_error(layer.apply(p, x), jnp.zeros((4, 3)))  # noqa: E731
    with pytest.raises(ValueError, match="fisher_batch_size=5 exceeds"):
        cl.value_grad_and_stats(loss_fn, params, fisher_batch_size=5)
    with pytest.raises(ValueError, match="fisher_batch_size"):
        cl.value_grad_and_stats(loss_fn, params, fisher_batch_size=0)
    with pytest.raises(ValueError, match="fisher"):
        cl.value_grad_and_stats(loss_fn, params, fisher="exact")
    with pytest.raises(ValueError, match="loss_reduction"):
        cl.value_grad_and_stats(loss_fn, params, loss_reduction="none")
    with pytest.raises(TypeError, match="scalar"):
        cl.value_grad_and_stats(lambda p: layer.apply(p, x), params)
    with pytest.raises(TypeError, match="pair"):
        cl.value_grad_and_stats(loss_fn, params, has_aux=True)
