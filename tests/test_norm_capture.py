"""Normalisation layers' scale and shift: captured statistics and the methods' first step.

Every normalisation layer ends with ``y = x̂ ⊙ scale + bias``; the capture records ``x̂`` and
the output gradients, whose per-position products sum to the per-example gradients of the
scale and bias. References here are independent: the Jacobian of the vector of per-example
losses with respect to the parameters (exact even for ``BatchNorm``, whose examples are coupled
through the batch statistics), in float64.
"""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sofim_optax import scale_by_kfac, scale_by_mini_block_fisher
from sofim_optax.curvature import linen as cl
from sofim_optax.curvature import nnx as cn

F64 = jnp.float64
N, T, D = 5, 3, 6

LINEN_NORMS = {
    "LayerNorm": lambda: nn.LayerNorm(param_dtype=F64, dtype=F64),
    "RMSNorm": lambda: nn.RMSNorm(param_dtype=F64, dtype=F64),
    "GroupNorm": lambda: nn.GroupNorm(num_groups=2, param_dtype=F64, dtype=F64),
    "BatchNorm": lambda: nn.BatchNorm(use_running_average=False, param_dtype=F64, dtype=F64),
    "InstanceNorm": lambda: nn.InstanceNorm(param_dtype=F64, dtype=F64),
}
NNX_NORMS = {
    "LayerNorm": lambda r: nnx.LayerNorm(D, param_dtype=F64, dtype=F64, rngs=r),
    "RMSNorm": lambda r: nnx.RMSNorm(D, param_dtype=F64, dtype=F64, rngs=r),
    "GroupNorm": lambda r: nnx.GroupNorm(D, num_groups=2, param_dtype=F64, dtype=F64, rngs=r),
    "BatchNorm": lambda r: nnx.BatchNorm(D, param_dtype=F64, rngs=r),
    "InstanceNorm": lambda r: nnx.InstanceNorm(D, param_dtype=F64, dtype=F64, rngs=r),
}


def _data():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.normal(size=(N, T, 4))), jnp.asarray(rng.normal(size=(N, T, 2)))


def _per_example_losses(out, y):
    return jnp.mean(jnp.square(out - y), axis=(1, 2))


class LinenNet(nn.Module):
    norm: str

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(D, param_dtype=F64)(x)
        h = LINEN_NORMS[self.norm]()(h)
        return nn.Dense(2, param_dtype=F64)(jnp.tanh(h))


class NnxNet(nnx.Module):
    def __init__(self, norm, rngs):
        self.first = nnx.Linear(4, D, param_dtype=F64, rngs=rngs)
        self.norm = NNX_NORMS[norm](rngs)
        self.last = nnx.Linear(D, 2, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        return self.last(jnp.tanh(self.norm(self.first(x))))


def _linen_case(norm, zero_scale=False):
    """``(loss_fn, params, per-example losses of params, path)`` of a linen model; the norm's
    scale and bias are drawn away from their initial ones so that nothing is special."""
    model, (x, y) = LinenNet(norm), _data()
    variables = model.init(jax.random.key(0), x)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda a: a + 0.3 * jnp.asarray(rng.normal(size=a.shape)), variables)
    path = f"{norm}_0"
    if zero_scale:
        scale = params["params"][path]["scale"]
        params["params"][path]["scale"] = scale.at[0].set(0.0)

    def per_example(p):
        out = model.apply(p, x, mutable=["batch_stats"])[0]
        return _per_example_losses(out, y)

    def loss_fn(p):
        return jnp.mean(per_example(p))

    return loss_fn, params, per_example, path


def _check_stats(st, jac):
    """The statistics' per-example scale and bias gradients against the Jacobian rows."""
    assert st.layer_kind == "scale_shift"
    assert st.inputs.shape == st.output_grads.shape == (N, T, D)
    x, g = np.asarray(st.inputs), np.asarray(st.output_grads)
    if "scale" in jac:
        np.testing.assert_allclose(np.sum(x * g, axis=1), jac["scale"], rtol=1e-9, atol=1e-12)
    if "bias" in jac:
        np.testing.assert_allclose(np.sum(g, axis=1), jac["bias"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("norm", sorted(LINEN_NORMS))
def test_linen_norm_statistics_match_per_example_gradients(x64, norm):
    loss_fn, params, per_example, path = _linen_case(norm)
    _, _, stats = jax.jit(lambda p: cl.value_grad_and_stats(loss_fn, p))(params)
    jac = jax.jacrev(per_example)(params)["params"][path]
    _check_stats(stats[path], jac)


# (nnx.BatchNorm keeps float32 running averages and warns when float64 batches update them)
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types:FutureWarning")
@pytest.mark.parametrize("norm", sorted(NNX_NORMS))
def test_nnx_norm_statistics_match_per_example_gradients(x64, norm):
    model, (x, y) = NnxNet(norm, nnx.Rngs(0)), _data()
    rng = np.random.default_rng(1)
    for _, param in nnx.iter_graph(model):
        if isinstance(param, nnx.Param):
            param[...] = param[...] + 0.3 * jnp.asarray(rng.normal(size=param.shape))

    def loss_fn(m):
        return jnp.mean(_per_example_losses(m(x), y))

    graphdef, state = nnx.split(model)
    _, _, stats = cn.value_grad_and_stats(loss_fn, nnx.merge(graphdef, state))
    params, rest = nnx.split(nnx.merge(graphdef, state), nnx.Param, ...)[1:]

    def per_example(p):  # (the rest rebuilt inside the trace: BatchNorm writes to it)
        return _per_example_losses(nnx.merge(graphdef, p, jax.tree.map(lambda v: v, rest))(x), y)

    jac = jax.jacrev(per_example)(params)["norm"]
    _check_stats(stats["norm"], {k: v[...] for k, v in jac.items()})


@pytest.mark.parametrize("method", ["kfac", "mbf"])
def test_first_step_on_norm_parameters_is_the_exact_per_example_diagonal(x64, method):
    # One exact-zero scale entry: its per-example gradient cannot be read from the output
    # (x̂ = (y − b) / scale), so the capture gives 0 there and the fallback floors the
    # statistic at the minibatch gradient's square.
    damping = 1e-3
    loss_fn, params, per_example, path = _linen_case("LayerNorm", zero_scale=True)
    make = scale_by_kfac if method == "kfac" else scale_by_mini_block_fisher
    tx = make(damping=damping)

    @jax.jit
    def step(p):
        _, grads, stats = cl.value_grad_and_stats(loss_fn, p)
        return grads, tx.update(grads, tx.init(p), p, layer_stats=stats)[0]

    grads, updates = step(params)
    jac = jax.jacrev(per_example)(params)["params"][path]
    for leaf in ("scale", "bias"):
        g = np.asarray(grads["params"][path][leaf])
        diagonal = np.mean(np.square(np.asarray(jac[leaf])), axis=0)
        if leaf == "scale":
            diagonal[0] = g[0] ** 2  # (the floor)
        assert np.any(diagonal[1:] > 1.5 * g[1:] ** 2)  # (not the minibatch square)
        np.testing.assert_allclose(
            updates["params"][path][leaf], g / (diagonal + damping), rtol=1e-9, err_msg=leaf
        )


class Twice(nn.Module):
    @nn.compact
    def __call__(self, x):
        norm = nn.LayerNorm(param_dtype=F64)
        h = norm(nn.Dense(D, param_dtype=F64)(x))
        return nn.Dense(2, param_dtype=F64)(norm(jnp.tanh(h)))


class Rematerialised(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.remat(nn.LayerNorm)(param_dtype=F64)(nn.Dense(D, param_dtype=F64)(x))
        return nn.Dense(2, param_dtype=F64)(h)


class FeaturesInFront(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(D, param_dtype=F64)(x).transpose(0, 2, 1)  # (N, D, T)
        h = nn.LayerNorm(feature_axes=1, reduction_axes=1, param_dtype=F64)(h)
        return nn.Dense(2, param_dtype=F64)(h.transpose(0, 2, 1))


@pytest.mark.parametrize(
    "model, why",
    [
        (Twice(), "applied more than once"),
        (Rematerialised(), "inside a nested transformation"),
        (FeaturesInFront(), None),
    ],
)
def test_norms_the_capture_cannot_read_are_left_to_minibatch_statistics(x64, caplog, model, why):
    # Unlike a shared dense layer (refused), such a norm just gets no statistics: the
    # methods' diagonal fallback then uses its minibatch gradient, as for any other leaf.
    x, y = _data()
    params = model.init(jax.random.key(0), x)

    def loss_fn(p):
        return jnp.mean(_per_example_losses(model.apply(p, x), y))

    with caplog.at_level(logging.INFO, logger="sofim_optax.curvature"):
        _, grads, stats = cl.value_grad_and_stats(loss_fn, params)
    assert sorted(stats) == ["Dense_0", "Dense_1"]
    if why is not None:
        assert why in caplog.text and "LayerNorm_0" in caplog.text
    tx = scale_by_kfac(damping=1e-3)
    updates, _ = tx.update(grads, tx.init(params), params, layer_stats=stats)
    norm = next(k for k in params["params"] if "LayerNorm" in k)
    g = np.asarray(grads["params"][norm]["scale"])
    np.testing.assert_allclose(updates["params"][norm]["scale"], g / (g**2 + 1e-3), rtol=1e-9)


def test_rebuilt_norm_statistics_get_a_clear_error(x64):
    loss_fn, params, _, path = _linen_case("LayerNorm")
    _, grads, stats = cl.value_grad_and_stats(loss_fn, params)
    rebuilt = {k: type(v)(*v) for k, v in stats.items()}  # plain arrays: the kind is lost
    tx = scale_by_kfac()
    with pytest.raises(ValueError, match=f"{path}.*must be the capture's own"):
        tx.update(grads, tx.init(params), params, layer_stats=rebuilt)


def test_norm_statistics_survive_optax_chain_and_identity_fallback(x64):
    loss_fn, params, _, path = _linen_case("RMSNorm")
    _, grads, stats = cl.value_grad_and_stats(loss_fn, params)
    tx = optax.chain(scale_by_kfac(fallback=None), optax.scale(-0.1))
    updates, _ = tx.update(grads, tx.init(params), params, layer_stats=stats)
    np.testing.assert_allclose(
        updates["params"][path]["scale"], -0.1 * grads["params"][path]["scale"], rtol=1e-12
    )
