"""The experiment harness: registry, extra arguments, tasks, BatchNorm, resume, reports, CLIs.

Everything runs on tiny generated fixtures (no real data), a few steps each.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sofim_optax
from experiments import (
    autoencoder,
    checkpoint,
    classify,
    datasets,
    harness,
    loop,
    models,
    registry,
    reporting,
    tasks,
)


@pytest.fixture
def fixture_dir(tmp_path):
    datasets.write_fixture_idx(tmp_path / "fx", n_train=64, n_test=24, seed=3)
    return tmp_path / "fx"


def _data(n_train=48, n_test=16, seed=0, flat=True):
    rng = np.random.default_rng(seed)
    x = rng.random((n_train + n_test, 16), dtype=np.float32)
    y = rng.integers(0, 3, n_train + n_test).astype(np.int32)
    if not flat:
        x = x.reshape(-1, 4, 4, 1)
    return tasks.Data(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def _assert_trees_close(a, b, **tol):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


class _Recorded(NamedTuple):
    count: jax.Array
    prev_out_grads: jax.Array  # sum of previous_batch_stats["Dense_1"].output_grads per unit
    had_prev: jax.Array
    obj_value: jax.Array
    layer_keys_ok: jax.Array


def _recorder(learning_rate: float = 0.1) -> optax.GradientTransformationExtraArgs:
    """SGD that records what the loop passed it (previous-batch statistics and obj_fn's value)."""

    def init(params):
        return _Recorded(
            jnp.zeros([], jnp.int32),
            jnp.zeros(3),
            jnp.zeros([], bool),
            jnp.zeros([]),
            jnp.zeros([], bool),
        )

    def update(grads, state, params, *, layer_stats, previous_batch_stats, obj_fn):
        keys_ok = jnp.asarray(sorted(layer_stats) == ["Dense_0", "Dense_1"])
        # The first step has no previous batch: the step passes the current layer_stats.
        if previous_batch_stats is layer_stats:
            prev, had = jnp.zeros(3), jnp.zeros([], bool)
        else:
            prev, had = (
                jnp.sum(previous_batch_stats["Dense_1"].output_grads, axis=0),
                jnp.ones([], bool),
            )
        updates = jax.tree_util.tree_map(lambda g: -learning_rate * g, grads)
        return updates, _Recorded(state.count + 1, prev, had, obj_fn(params), keys_ok)

    return optax.GradientTransformationExtraArgs(init, update)


@pytest.fixture
def recorder_registered(monkeypatch):
    spec = registry.OptimizerSpec(
        "Recorder",
        _recorder,
        {"learning_rate": 0.1},
        needs=("layer_stats", "previous_batch_stats", "obj_fn"),
    )
    monkeypatch.setitem(registry.OPTIMIZERS, "recorder", spec)
    return spec


class _TwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        hidden = jnp.tanh(nn.Dense(5)(x))  # Dense_0
        return nn.Dense(3)(hidden)  # Dense_1


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


def test_registry_entries_are_consistent():
    for name, spec in registry.OPTIMIZERS.items():
        assert set(spec.needs) <= set(registry.NEEDS), name
        assert all(isinstance(v, (list, tuple)) and v for v in spec.grid.values()), name
    available = registry.available_optimizers()
    assert {"sofim", "kfac", "sgdm", "adam", "rmsprop", "lbfgs", "muon"} <= set(available)
    assert registry.OPTIMIZERS["kbfgs"].needs == ("layer_stats", "previous_batch_stats")
    assert registry.OPTIMIZERS["adahessian"].needs == ("obj_fn",)
    colors = [spec.color for spec in registry.OPTIMIZERS.values()]
    assert None not in colors and len(set(colors)) == len(colors), (
        "every method needs its own plot colour"
    )


def test_missing_optimizer_fails_only_when_selected(monkeypatch, fixture_dir, tmp_path):
    monkeypatch.setitem(
        registry.OPTIMIZERS,
        "ghost",
        registry.OptimizerSpec("Ghost", "sofim_optax:not_landed_yet", {}),
    )
    assert "ghost" not in registry.available_optimizers()
    with pytest.raises(registry.OptimizerUnavailable, match="sofim_optax.not_landed_yet"):
        registry.make_optimizer("ghost")
    with pytest.raises(SystemExit):
        classify.main(
            [
                "--data-dir",
                str(fixture_dir),
                "--no-verify",
                "--optimizers",
                "ghost",
                "--out",
                str(tmp_path),
            ]
        )
    with pytest.raises(ValueError, match="unknown optimizer"):
        registry.make_optimizer("nope")


def test_defaults_per_task(monkeypatch):
    spec, _, hp = registry.make_optimizer("kfac", "autoencoder")
    assert hp["fisher"] == "sampled" and hp["damping"] == 10.0
    _, _, hp = registry.make_optimizer("kfac", "classification", damping=0.5)
    assert hp["fisher"] == "empirical" and hp["damping"] == 0.5


def test_a_default_or_override_the_factory_does_not_take_is_an_error(monkeypatch):
    def factory(learning_rate):
        return optax.sgd(learning_rate)

    monkeypatch.setitem(
        registry.OPTIMIZERS, "narrow", registry.OptimizerSpec("N", factory, {"learning_rate": 0.1})
    )
    _, _, hp = registry.make_optimizer("narrow")
    assert hp == {"learning_rate": 0.1}
    with pytest.raises(ValueError, match=r"'narrow'.*override damping=2\.0 is not an argument"):
        registry.make_optimizer("narrow", damping=2.0)  # a user override is never dropped
    monkeypatch.setitem(
        registry.OPTIMIZERS,
        "narrow",
        registry.OptimizerSpec(
            "N", factory, {"learning_rate": 0.1}, task_defaults={"autoencoder": {"damping": 1.0}}
        ),
    )
    registry.make_optimizer("narrow", "classification")
    with pytest.raises(
        ValueError, match=r"'narrow'.*registry default \(autoencoder\) damping=1\.0"
    ):
        registry.make_optimizer("narrow", "autoencoder")  # neither is a registry default


def test_every_registry_default_applies_to_its_factory():
    for name in registry.available_optimizers():
        for kind in ("classification", "autoencoder"):
            registry.make_optimizer(
                name, kind
            )  # raises ValueError on a default that does not apply


def test_grid_points_vary_the_first_name_slowest():
    assert registry.grid_points({"a": [1, 2], "b": [3, 4]}) == [
        {"a": 1, "b": 3},
        {"a": 1, "b": 4},
        {"a": 2, "b": 3},
        {"a": 2, "b": 4},
    ]
    assert registry.grid_points({}) == [{}]


# ---------------------------------------------------------------------------
# Extra arguments
# ---------------------------------------------------------------------------


def _loss(model, p, x, y):
    return jnp.mean(
        optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y)
    )


def test_extra_arguments_match_independent_references(recorder_registered):
    """previous_batch_stats = the previous batch at the CURRENT params; obj_fn = the current batch's loss."""
    data = _data(n_train=24, n_test=8)
    model = _TwoLayer()
    res = loop.train(model, "recorder", data, epochs=1, batch_size=8, seed=5, progress=False)
    assert res.epochs[0].steps == 3
    # Replay the three steps independently, in float32 as the loop does.
    params = model.init(jax.random.PRNGKey(5), jnp.asarray(data.x_train[:1]))["params"]
    order = list(loop._batches(24, 8, 5, 1))
    history = []
    for idx in order:
        x, y = data.x_train[idx], data.y_train[idx]
        history.append((params, idx))
        params = jax.tree_util.tree_map(
            lambda w, g: w - 0.1 * g, params, jax.grad(lambda p: _loss(model, p, x, y))(params)
        )
    _assert_trees_close(res.params, params, rtol=1e-5, atol=1e-6)
    # Last step: params before it = history[2][0]; previous batch = order[1].
    p_cur, _ = history[2]
    prev_idx = order[1]
    xp, yp = data.x_train[prev_idx], data.y_train[prev_idx]

    def per_example(bias, x1, y1):
        p = {**p_cur, "Dense_1": {**p_cur["Dense_1"], "bias": bias}}
        return _loss(model, p, x1[None], y1[None])

    per_grads = jax.vmap(jax.grad(per_example), in_axes=(None, 0, 0))(
        p_cur["Dense_1"]["bias"], xp, yp
    )
    # The capture itself agrees with the per-example reference.
    _, _, stats = jax.jit(
        lambda p, x, y: sofim_optax.curvature.linen.value_grad_and_stats(
            lambda q, a, b: _loss(model, q, a, b), p, x, y
        )
    )(p_cur, xp, yp)
    np.testing.assert_allclose(stats["Dense_1"].output_grads, per_grads, rtol=1e-5, atol=1e-6)
    # Now check what the loop handed to the optimizer on the last step.
    state = _last_recorder_state(model, data, order)
    np.testing.assert_allclose(
        state.prev_out_grads, np.sum(per_grads, axis=0), rtol=1e-5, atol=1e-6
    )
    assert bool(state.had_prev) and bool(state.layer_keys_ok)
    x, y = data.x_train[order[2]], data.y_train[order[2]]
    np.testing.assert_allclose(state.obj_value, _loss(model, p_cur, x, y), rtol=1e-6)


def _last_recorder_state(model, data, order):
    """The recorder's state after the loop's steps, via a checkpoint of the run."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "r.ckpt"
        loop.train(
            model, "recorder", data, epochs=1, batch_size=8, seed=5, progress=False, checkpoint=ckpt
        )
        template_params = model.init(jax.random.PRNGKey(5), jnp.asarray(data.x_train[:1]))["params"]
        template = (template_params, {}, _recorder().init(template_params))
        (_, _, state), meta, extra = checkpoint.load_checkpoint(ckpt, template)
        np.testing.assert_array_equal(extra["prev_idx"], order[-1])
        return state


def test_first_step_gets_the_current_batch_as_previous(recorder_registered):
    """K-BFGS requires previous_batch_stats on every update; the first step passes the current
    batch's layer_stats (no second pass), which K-BFGS ignores at its first step."""
    data = _data(n_train=8, n_test=8)
    import tempfile
    from pathlib import Path

    model = _TwoLayer()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "r.ckpt"
        loop.train(model, "recorder", data, epochs=1, batch_size=8, progress=False, checkpoint=ckpt)
        p = model.init(jax.random.PRNGKey(0), jnp.asarray(data.x_train[:1]))["params"]
        (_, _, state), _, _ = checkpoint.load_checkpoint(ckpt, (p, {}, _recorder().init(p)))
    assert int(state.count) == 1 and not bool(state.had_prev)


def test_train_step_feeds_kbfgs_its_previous_batch():
    """The registry's K-BFGS through the one train step: the first step (no previous batch)
    runs, and the pairs of the later steps update H_g."""
    from experiments.step import make_train_step
    from sofim_optax.kbfgs import ScaleByKbfgsState

    data = _data(n_train=24, n_test=8)
    model = _TwoLayer()
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(data.x_train[:1]))["params"]
    spec, tx, _ = registry.make_optimizer("kbfgs", "classification")
    step = jax.jit(make_train_step(lambda p, x, y: _loss(model, p, x, y), tx, needs=spec.needs))
    batches = [(data.x_train[i : i + 8], data.y_train[i : i + 8]) for i in range(0, 24, 8)]
    state, previous = tx.init(params), None
    for batch in batches:
        params, state, loss, _ = step(params, state, batch, previous)
        previous = batch
    inner = next(s for s in state if isinstance(s, ScaleByKbfgsState))
    assert np.isfinite(float(loss)) and int(inner.curvature.hg_updates.max()) > 0


def test_value_fn_arguments_for_lbfgs():
    # Full batch: the objective is deterministic, so the line search (which calls value_fn) must descend.
    res = loop.train(_TwoLayer(), "lbfgs", _data(), epochs=4, batch_size=48, progress=False)
    losses = [e.train_loss for e in res.epochs]
    assert all(np.isfinite(losses)) and all(b < a for a, b in zip(losses, losses[1:]))


# ---------------------------------------------------------------------------
# Peers from other packages (experiments/peers.py)
# ---------------------------------------------------------------------------

# name -> (module the peer needs, overrides that exercise its preconditioner within 5 steps)
_PEERS = {
    "muon": ("optax.contrib", {}),
    "psgd_kron": ("psgd_jax", {}),
    "shampoo": ("precondition", {"start_preconditioning_step": 2}),
}


def _skip_unless_installed(module):
    # Not importorskip: psgd_jax imports only through peers' shim, and a package that is
    # installed but fails to import or run here must fail the test, not skip it.
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (the `experiments` extra pins it)")


@pytest.mark.parametrize("name", sorted(_PEERS))
def test_peer_trains_a_tiny_mlp(name):
    module, overrides = _PEERS[name]
    _skip_unless_installed(module)
    data = _data(n_train=32, n_test=8)
    model = _TwoLayer()
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(data.x_train[:1]))["params"]
    _, tx, _ = registry.make_optimizer(name, "classification", **overrides)
    loss_fn = lambda p: _loss(model, p, data.x_train, data.y_train)

    @jax.jit
    def step(p, state):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss, updates

    state, losses = tx.init(params), []
    for _ in range(5):
        params, state, loss, updates = step(params, state)
        assert all(np.isfinite(u).all() for u in jax.tree_util.tree_leaves(updates))
        losses.append(float(loss))
    assert float(loss_fn(params)) < losses[0], losses


def test_muon_orthogonalises_matrices_and_conv_kernels_and_leaves_the_rest_to_adam():
    from experiments import peers

    cnn = models.make_model("cnn")
    shapes = jax.eval_shape(lambda: cnn.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1))))
    params = shapes["params"]
    dims = peers._muon_dimension_numbers(params, adam_for_output_layer=True)
    assert dims["Conv_0"]["kernel"] == optax.contrib.MuonDimensionNumbers((0, 1, 2), 3)
    assert dims["Dense_0"]["kernel"] == optax.contrib.MuonDimensionNumbers(0, 1)
    assert dims["Dense_1"]["kernel"] is None  # the output layer
    assert all(dims[layer]["bias"] is None for layer in params)
    dims = peers._muon_dimension_numbers(params, adam_for_output_layer=False)
    assert dims["Dense_1"]["kernel"] == optax.contrib.MuonDimensionNumbers(0, 1)
    # A conv kernel's Muon step is an orthogonal matrix (times lr and optax's width scaling).
    params = {
        "Conv_0": {"kernel": jnp.zeros((3, 3, 4, 8)), "bias": jnp.zeros(8)},
        "Dense_0": {"kernel": jnp.zeros((8, 3)), "bias": jnp.zeros(3)},
    }
    tx = peers.muon(learning_rate=1.0, nesterov=False)
    grads = jax.tree_util.tree_map(
        lambda x: jax.random.normal(jax.random.PRNGKey(1), x.shape), params
    )
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    k = np.asarray(updates["Conv_0"]["kernel"]).reshape(36, 8)
    s = np.linalg.svd(k / np.sqrt(max(1.0, 8 / 36)), compute_uv=False)
    assert s.min() > 0.5 and s.max() < 1.5  # Newton-Schulz's quintic: singular values ~0.7-1.2


def test_psgd_kron_import_shim_leaves_optax_as_it_was():
    _skip_unless_installed("psgd_jax")
    from experiments import peers

    had_alias = "optax._src.clipping" in sys.modules
    assert peers.psgd_kron_unavailable_reason() is None
    assert ("optax._src.clipping" in sys.modules) == had_alias
    assert registry.available_optimizers(["psgd_kron"]) == ["psgd_kron"]


def _inverse_root(m, p, eps):
    lam = np.linalg.eigvalsh(m).max()
    w, v = np.linalg.eigh(m + eps * lam * np.eye(len(m)))
    return (v * w ** (-1.0 / p)) @ v.T


def test_shampoo_matches_a_numpy_shampoo():
    """The shimmed distributed_shampoo against Shampoo written out in NumPy (float64).

    A (12, 10) matrix (two Kronecker factors, ``merge_small_dims_block_size=1`` keeps it 2-D)
    and an (18,) vector (one full-matrix factor); statistics w₁·S + w₂·GGᵀ from ε·I, the
    inverse 4th root of S + ε·λ_max·I, the step grafted to the gradient's norm, heavy-ball
    momenta for both the grafted and the Shampoo step, Nesterov; Shampoo from step 2.
    """
    _skip_unless_installed("precondition")
    from experiments import peers

    lr, b1, b2, eps, start = 0.1, 0.9, 0.99, 1e-5, 2
    jax_had_tree_map = hasattr(jax, "tree_map")
    tx = peers.shampoo(
        lr,
        beta1=b1,
        beta2=b2,
        matrix_epsilon=eps,
        start_preconditioning_step=start,
        merge_small_dims_block_size=1,
    )
    assert hasattr(jax, "tree_map") == jax_had_tree_map  # the shim leaves the process's jax alone
    rng = np.random.default_rng(0)
    shapes = {"m": (12, 10), "v": (18,)}
    params = {k: jnp.zeros(s) for k, s in shapes.items()}
    state, update = tx.init(params), jax.jit(tx.update)
    stats = {"m": [eps * np.eye(12), eps * np.eye(10)], "v": [eps * np.eye(18)]}
    mom = {k: (np.zeros(s), np.zeros(s)) for k, s in shapes.items()}  # (grafted, Shampoo)
    for step in range(5):
        grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        updates, state = update({k: jnp.asarray(g) for k, g in grads.items()}, state, params)
        for k, g32 in grads.items():
            g = g32.astype(np.float64)
            if g.ndim == 2:
                left, right = stats[k]
                stats[k] = [b2 * left + (1 - b2) * g @ g.T, b2 * right + (1 - b2) * g.T @ g]
                pre = _inverse_root(stats[k][0], 4, eps) @ g @ _inverse_root(stats[k][1], 4, eps)
            else:
                stats[k] = [b2 * stats[k][0] + (1 - b2) * np.outer(g, g)]
                pre = _inverse_root(stats[k][0], 4, eps) @ g
            shampoo_step = pre * np.linalg.norm(g) / np.linalg.norm(pre)
            mom[k] = (b1 * mom[k][0] + g, b1 * mom[k][1] + shampoo_step)
            u, m = (shampoo_step, mom[k][1]) if step >= start else (g, mom[k][0])
            expected = -lr * (u + b1 * m)
            np.testing.assert_allclose(
                np.asarray(updates[k]), expected, rtol=0, atol=2e-3 * np.abs(expected).max()
            )


# ---------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------


def test_autoencoder_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 7)).astype(np.float32)
    x = rng.random((5, 7)).astype(np.float32)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    bce = -np.sum(x * np.log(p) + (1 - x) * np.log(1 - p), axis=1)
    task = tasks.Task("autoencoder")
    np.testing.assert_allclose(task.data_loss(jnp.asarray(logits), (x,)), bce.mean(), rtol=1e-5)
    np.testing.assert_allclose(task.eval_sums(jnp.asarray(logits), (x,))[0], bce.sum(), rtol=1e-5)
    gauss = tasks.Task("autoencoder", reconstruction="gaussian")
    np.testing.assert_allclose(
        gauss.data_loss(jnp.asarray(logits), (x,)),
        (0.5 * ((logits - x) ** 2).sum(1)).mean(),
        rtol=1e-5,
    )
    with pytest.raises(ValueError):
        tasks.Task("regression")


def test_autoencoder_training_with_l2_and_sampled_fisher():
    data = _data(n_train=64, n_test=16)
    model = models.Autoencoder(encoder=(8, 3), output_dim=16)
    res = loop.train(
        model,
        "kfac",
        data,
        epochs=4,
        batch_size=16,
        progress=False,
        task=tasks.Task("autoencoder", l2=1e-3),
        hparams={"damping": 1.0, "learning_rate": 0.05},
    )
    assert res.hparams["fisher"] == "sampled"
    assert res.epochs[0].test_accuracy is None
    losses = [e.train_loss for e in res.epochs]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert res.epochs[-1].test_loss > 0


def test_l2_term_enters_the_gradient():
    data = _data(n_train=16, n_test=8)
    kw = dict(
        epochs=1, batch_size=16, progress=False, hparams={"learning_rate": 0.1, "momentum": 0.0}
    )
    ae = models.Autoencoder(encoder=(4,), output_dim=16)
    task = tasks.Task("autoencoder", l2=0.5)
    res = loop.train(ae, "sgdm", data, task=task, **kw)
    q0 = ae.init(jax.random.PRNGKey(0), jnp.asarray(data.x_train[:1]))["params"]
    idx = next(loop._batches(16, 16, 0, 1))
    x = data.x_train[idx]

    def objective(q):
        z = ae.apply({"params": q}, x)
        data_term = jnp.mean(jnp.sum(jax.nn.softplus(z) - z * x, axis=1))
        return data_term + 0.25 * sum(jnp.sum(w**2) for w in jax.tree_util.tree_leaves(q))

    expected = jax.tree_util.tree_map(lambda w, g: w - 0.1 * g, q0, jax.grad(objective)(q0))
    _assert_trees_close(res.params, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# BatchNorm state
# ---------------------------------------------------------------------------


def test_batchnorm_state_is_carried():
    data = _data(n_train=32, n_test=8, flat=False)
    model = models.ResNet(stage_sizes=(1,), widths=(4,), num_classes=3, norm="batch")
    res = loop.train(model, "kfac", data, epochs=2, batch_size=16, progress=False)
    init_state = model.init(jax.random.PRNGKey(0), jnp.asarray(data.x_train[:1]))["batch_stats"]
    moved = jax.tree_util.tree_map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), res.model_state["batch_stats"], init_state
    )
    assert max(jax.tree_util.tree_leaves(moved)) > 0
    assert all(np.isfinite(e.train_loss) and np.isfinite(e.test_loss) for e in res.epochs)


# ---------------------------------------------------------------------------
# Checkpoint and resume
# ---------------------------------------------------------------------------


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("optimizer,hparams", [("kfac", {"fisher": "sampled"}), ("recorder", {})])
def test_interrupted_run_resumes_to_identical_numbers(
    tmp_path, monkeypatch, recorder_registered, optimizer, hparams
):
    data = _data(n_train=48, n_test=16)
    model = _TwoLayer()
    kw = dict(epochs=3, batch_size=16, seed=2, progress=False, hparams=hparams)
    full = loop.train(model, optimizer, data, **kw)

    original = loop._batches
    calls = {"n": 0}

    def interrupted(n, bs, seed, epoch):
        for i, idx in enumerate(original(n, bs, seed, epoch)):
            if epoch == 3 and i == 1:
                raise _Interrupt  # killed in the middle of epoch 3, after the epoch-2 checkpoint
            calls["n"] += 1
            yield idx

    ckpt = tmp_path / "run.ckpt"
    monkeypatch.setattr(loop, "_batches", interrupted)
    with pytest.raises(_Interrupt):
        loop.train(model, optimizer, data, checkpoint=ckpt, **kw)
    monkeypatch.setattr(loop, "_batches", original)
    resumed = loop.train(model, optimizer, data, checkpoint=ckpt, **kw)
    assert resumed.resumed_from_epoch == 2
    for a, b in zip(full.epochs, resumed.epochs, strict=True):
        assert (a.epoch, a.train_loss, a.test_loss, a.test_accuracy, a.steps) == (
            b.epoch,
            b.train_loss,
            b.test_loss,
            b.test_accuracy,
            b.steps,
        )
    for a, b in zip(
        jax.tree_util.tree_leaves(full.params), jax.tree_util.tree_leaves(resumed.params)
    ):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
    data = _data()
    ckpt = tmp_path / "run.ckpt"
    loop.train(_TwoLayer(), "sgdm", data, epochs=1, batch_size=16, progress=False, checkpoint=ckpt)
    with pytest.raises(checkpoint.CheckpointMismatch, match="different configuration"):
        loop.train(
            _TwoLayer(),
            "sgdm",
            data,
            epochs=2,
            batch_size=16,
            progress=False,
            checkpoint=ckpt,
            hparams={"learning_rate": 0.2},
        )
    ckpt.write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointMismatch, match="not a readable checkpoint"):
        loop.train(
            _TwoLayer(), "sgdm", data, epochs=2, batch_size=16, progress=False, checkpoint=ckpt
        )


def test_typed_prng_keys_survive_a_checkpoint(tmp_path):
    tree = {"key": jax.random.key(3), "w": jnp.arange(3.0)}
    checkpoint.save_checkpoint(tmp_path / "k.ckpt", tree, {"a": 1}, {})
    restored, meta, _ = checkpoint.load_checkpoint(
        tmp_path / "k.ckpt", {"key": jax.random.key(0), "w": jnp.zeros(3)}
    )
    np.testing.assert_array_equal(
        jax.random.key_data(restored["key"]), jax.random.key_data(tree["key"])
    )
    assert meta == {"a": 1}


# ---------------------------------------------------------------------------
# Reports and CLIs
# ---------------------------------------------------------------------------


def _result(name, values, walls):
    epochs = [
        loop.EpochMetrics(i + 1, v, v, 1 - v, w, 0.01)
        for i, (v, w) in enumerate(zip(values, walls))
    ]
    return loop.RunResult(name, name.upper(), {}, 0, 0.0, epochs)


def test_time_to_target_and_table():
    fast = _result("a", [0.9, 0.5, 0.2], [1.0, 2.0, 3.0])
    slow = _result("b", [0.9, 0.8, 0.45], [2.0, 4.0, 6.0])
    assert reporting.time_to_target(fast, "train_loss", 0.5) == (2, 2.0)
    assert reporting.time_to_target(slow, "train_loss", 0.5) == (3, 6.0)
    assert reporting.time_to_target(slow, "train_loss", 0.1) is None
    assert reporting.time_to_target(fast, "test_accuracy", 0.5) == (2, 2.0)
    table = reporting.format_target_table(
        [fast, slow], {"train_loss": 0.5, "test_accuracy": 0.9}, baseline="a"
    )
    assert "| B | 3 / 6.0 (3.00× A) | — |" in table


def test_selection_rule():
    trials = [
        {"train_loss": float("nan")},
        {"train_loss": 0.3},
        {"train_loss": 0.2},
        {"train_loss": 0.2},
        {"train_loss": float("inf")},
    ]
    assert harness.select_best(trials) is trials[2]
    assert harness.select_best([{"train_loss": float("nan")}]) is not None


def test_classify_cli_writes_everything_and_resumes(fixture_dir, tmp_path, capsys):
    out = tmp_path / "c"
    argv = [
        "--data-dir",
        str(fixture_dir),
        "--no-verify",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--optimizers",
        "sgdm,adam",
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "adam.learning_rate=0.003",
        "--target-train-loss",
        "100",
        "--target-test-acc",
        "0.0",
    ]
    results = classify.main(argv)
    assert [r.optimizer for r in results] == ["sgdm", "adam"] and results[1].hparams[
        "learning_rate"
    ] == 0.003
    printed = capsys.readouterr().out
    assert "| SGD-momentum |" in printed and "| Adam |" in printed and "1 / " in printed
    for name in ("sgdm", "adam"):
        run = json.loads((out / f"{name}.json").read_text())
        assert (
            run["seed"] == 0
            and run["versions"]["jax"]
            and run["config"]["dataset"] == "fashion-mnist"
        )
        assert len(run["run"]["epochs"]) == 2
        assert (out / f"{name}.ckpt").exists()
    assert (out / "curves.png").stat().st_size > 10_000
    assert "Time to target" in (out / "table.md").read_text()
    again = classify.main(argv)  # finished runs resume at their end: same numbers, no new epochs
    assert [e.train_loss for e in again[0].epochs] == [e.train_loss for e in results[0].epochs]
    assert again[0].resumed_from_epoch == 2


def test_grid_via_the_cli(fixture_dir, tmp_path, monkeypatch):
    spec = registry.OPTIMIZERS["sgdm"]
    monkeypatch.setitem(
        registry.OPTIMIZERS,
        "sgdm",
        registry.OptimizerSpec(
            spec.label, spec.factory, spec.defaults, grid={"learning_rate": [1e-7, 0.05]}
        ),
    )
    out = tmp_path / "g"
    results = classify.main(
        [
            "--data-dir",
            str(fixture_dir),
            "--no-verify",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--optimizers",
            "sgdm",
            "--grid",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    grid = json.loads((out / "grid.json").read_text())
    assert [t["hparams"]["learning_rate"] for t in grid["results"]["sgdm"]["trials"]] == [
        1e-7,
        0.05,
    ]
    assert grid["results"]["sgdm"]["best"]["hparams"]["learning_rate"] == 0.05
    assert "lowest training loss" in grid["selection_rule"]
    assert results[0].hparams["learning_rate"] == 0.05


def test_autoencoder_cli(fixture_dir, tmp_path):
    out = tmp_path / "a"
    results = autoencoder.main(
        [
            "--data-dir",
            str(fixture_dir),
            "--no-verify",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--model",
            "small",
            "--optimizers",
            "adam,sgdm",
            "--out",
            str(out),
            "--no-progress",
            "--l2",
            "1e-5",
        ]
    )
    assert [r.task for r in results] == ["autoencoder", "autoencoder"]
    assert all(e.test_accuracy is None for r in results for e in r.epochs)
    payload = json.loads((out / "results.json").read_text())
    assert payload["config"]["l2"] == 1e-5 and len(payload["runs"]) == 2
    assert (out / "curves.png").exists()


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def _param_shapes(model, x):
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
    return variables


@pytest.mark.parametrize("name,blocks", [("resnet20", 9), ("resnet32", 15), ("resnet18", 8)])
def test_resnets_have_the_papers_depth(name, blocks):
    model = models.make_model(name, num_classes=100)
    x = jnp.zeros((2, 32, 32, 3))
    variables = _param_shapes(model, x)
    convs = [
        k
        for k in jax.tree_util.tree_leaves_with_path(variables["params"])
        if "kernel" in jax.tree_util.keystr(k[0])
    ]
    n_3x3 = sum(1 for path, leaf in convs if leaf.shape[:2] == (3, 3))
    assert n_3x3 == 2 * blocks + 1  # stem + two per block
    out = jax.eval_shape(lambda v: model.apply(v, x), variables)
    assert out.shape == (2, 100)
    assert "batch_stats" in variables


def test_vgg_and_group_norm_variant():
    x = jnp.zeros((2, 32, 32, 3))
    vgg = models.make_model("vgg16", num_classes=10)
    v = _param_shapes(vgg, x)
    convs = [
        leaf for path, leaf in jax.tree_util.tree_leaves_with_path(v["params"]) if leaf.ndim == 4
    ]
    assert len(convs) == 13
    gn = models.ResNet(stage_sizes=(1,), widths=(8,), norm="group")
    assert "batch_stats" not in _param_shapes(gn, x)


def test_paper_autoencoder_sizes():
    for dataset, widths in [
        ("mnist", [784, 1000, 500, 250, 30, 250, 500, 1000, 784]),
        ("faces", [625, 2000, 1000, 500, 30, 500, 1000, 2000, 625]),
        ("curves", [784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784]),
    ]:
        model = models.make_autoencoder("paper", dataset)
        v = _param_shapes(model, jnp.zeros((1, widths[0])))
        kernels = [v["params"][f"Dense_{i}"]["kernel"].shape for i in range(len(widths) - 1)]
        assert kernels == list(zip(widths[:-1], widths[1:]))
    with pytest.raises(ValueError):
        models.make_autoencoder("paper", "faces", input_dim=784)


def test_classifiers_accept_flat_inputs():
    x = jnp.zeros((2, 16))  # flat 4x4 images
    for name in ("cnn", "resnet20"):
        model = models.make_model(name, num_classes=3)
        v = _param_shapes(model, x)
        assert jax.eval_shape(lambda v: model.apply(v, x), v).shape == (2, 3)
    with pytest.raises(ValueError, match="square image"):
        _param_shapes(models.make_model("cnn"), jnp.zeros((2, 15)))
