"""The benchmarks' cost model against XLA's own count of the compiled step, on small models."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.benchmarks import cost_model, floor
from experiments.benchmarks.problems import Problem
from sofim_optax.curvature import losses


class _Net(nn.Module):
    conv: bool

    @nn.compact
    def __call__(self, x):
        if self.conv:
            x = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2))(x))
            x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(96)(x.reshape(x.shape[0], -1)))
        return nn.Dense(48)(x)


def _problem(conv: bool) -> Problem:
    rng = np.random.default_rng(0)
    x = rng.random((64, 12, 12, 1), dtype=np.float32)
    y = rng.integers(0, 48, 64).astype(np.int32)
    return Problem(
        "net", _Net(conv), lambda logits, x, y: losses.softmax_cross_entropy(logits, y), (x, y)
    )


def test_captured_layers_have_the_statistics_shapes():
    p = _problem(conv=True)
    layers = cost_model.captured_layers(p.loss_fn, p.params, *p.batch)
    by_path = {la.path: la for la in layers}
    conv, dense = by_path["Conv_0"], by_path["Dense_0"]
    assert (conv.kind, conv.d_a, conv.d_g, conv.positions, conv.first) == ("conv", 10, 16, 36, True)
    assert (dense.d_a, dense.d_g, dense.positions, dense.first) == (36 * 16 + 1, 96, 1, False)
    assert by_path["Dense_1"].d_a == 97 and by_path["Dense_1"].batch == 64


def _xla_macs(p: Problem, name: str, tx) -> float:
    step, _, previous = floor.jitted_step(p, name, tx)
    return floor.xla_macs(step, p.params, tx.init(p.params), jnp.int32(0), p.batch, previous)


@pytest.mark.parametrize("conv", [False, True], ids=["mlp", "cnn"])
@pytest.mark.parametrize("name", ["sgdm", "kfac", "kpsvd", "mbf", "kfac_adaptive"])
def test_the_model_counts_what_xla_counts(name, conv):
    """Within 10 % of ``cost_analysis()`` on the compiled train step (refreshes in full, loop
    bodies once, LAPACK calls not at all: the model's ``xla_view``)."""
    p = _problem(conv)
    layers = cost_model.captured_layers(p.loss_fn, p.params, *p.batch)
    tx = floor.make_tx(name, {})
    fisher = "sampled" if name in floor.SAMPLED else "empirical"
    model = cost_model.step_cost(name, layers, fisher=fisher).xla_view
    np.testing.assert_allclose(_xla_macs(p, name, tx) / model, 1.0, atol=0.1)


def test_amortised_parts_divide_by_their_periods():
    p = _problem(conv=False)
    layers = cost_model.captured_layers(p.loss_fn, p.params, *p.batch)
    every = cost_model.step_cost("kfac", layers, hparams=dict(stats_period=1, inverse_period=1))
    rare = cost_model.step_cost("kfac", layers, hparams=dict(stats_period=4, inverse_period=10))
    assert rare.amortised["statistics"] == pytest.approx(every.amortised["statistics"] / 4)
    assert rare.amortised["refresh"] == pytest.approx(every.amortised["refresh"] / 10)
    assert rare.amortised["precondition"] == every.amortised["precondition"]
    # what XLA sees does not depend on the periods (both sides of a lax.cond are compiled)
    assert rare.xla_view == every.xla_view


def test_state_size_matches_the_initialised_state():
    p = _problem(conv=True)
    layers = cost_model.captured_layers(p.loss_fn, p.params, *p.batch)
    for name in ("kfac", "kpsvd_deflation", "mbf", "kbfgs"):
        state = jax.eval_shape(floor.make_tx(name, {}).init, p.params)
        model = cost_model.step_cost(name, layers).state_floats
        np.testing.assert_allclose(
            cost_model.tree_floats(state) / model, 1.0, atol=0.1, err_msg=name
        )


@pytest.mark.parametrize(
    "name, inverse, fields",
    [("mbf", "cholesky", ("inverses",)), ("mbf", "eigh", ("eigvecs", "eigvals"))],
)
def test_precondition_floats_are_the_state_the_product_reads(name, inverse, fields):
    p = _problem(conv=True)
    layers = cost_model.captured_layers(p.loss_fn, p.params, *p.batch)
    state = jax.eval_shape(floor.make_tx(name, {"inverse": inverse}).init, p.params)
    read = sum(cost_model.tree_floats(floor.state_field(state, f)) for f in fields)
    model = cost_model.step_cost(name, layers, hparams={"inverse": inverse})
    assert model.precondition_floats == read > 0


def test_memory_floor_takes_the_slower_of_arithmetic_and_reading():
    cost = cost_model.StepCost({"gradient": 6e9, "precondition": 1e8}, 0.0, 0.0, 2.5e8)
    # At 1e9 MACs/s and 1e10 B/s the gradient takes 6 s and the preconditioning's 1e8 MACs
    # 0.1 s; reading 2.5e8 floats (1 GB) also takes 0.1 s, 5e8 floats 0.2 s (bound by
    # memory), 1e7 floats 4 ms (bound by arithmetic).
    assert cost_model.memory_floor(cost, 1e9, 1e10) == pytest.approx(6.0 + 0.1)
    bound = cost_model.StepCost(cost.amortised, 0.0, 0.0, 5e8)
    assert cost_model.memory_floor(bound, 1e9, 1e10) == pytest.approx(6.0 + 0.2)
    light = cost_model.StepCost(cost.amortised, 0.0, 0.0, 1e7)
    assert cost_model.memory_floor(light, 1e9, 1e10) == pytest.approx(6.0 + 0.1)
