"""The adaptive step: exact quadratic forms, the α/μ solve, the damping rule, rejection.

Every reference here is built from explicit float64 matrices (the Gauss-Newton matrix
``Jᵀ H_z J`` from ``jax.jacobian`` and the likelihood's closed-form Hessian, the full
Hessian from ``jax.hessian``) and solved with numpy, independently of the library's
forward-mode products.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import sofim_optax
from sofim_optax.curvature import CaptureError, losses
from sofim_optax.curvature.quadratic_forms import (
    gauss_newton_quadratic_forms,
    hessian_quadratic_forms,
)
from sofim_optax.quadratic_model import adapt_damping, scale_by_quadratic_model

nn = pytest.importorskip("flax.linen")

N, SIDE, C = 5, 4, 3


class ConvDense(nn.Module):
    """A 2×2 convolution (1 -> 2 channels), tanh, then a dense layer to ``C`` outputs."""

    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Conv(2, (2, 2), padding="VALID")(x))
        return nn.Dense(C)(x.reshape(x.shape[0], -1))


def _likelihood_hessian(kind, z):
    """Per-example Hessian of the NLL with respect to the outputs, ``(N, C, C)``."""
    if kind == "categorical":
        p = jax.nn.softmax(z)
        return jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p)
    if kind == "bernoulli":
        s = jax.nn.sigmoid(z)
        return jax.vmap(jnp.diag)(s * (1 - s))
    return jnp.broadcast_to(jnp.eye(z.shape[1]), (z.shape[0], z.shape[1], z.shape[1]))


def _problem(kind, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((N, SIDE, SIDE, 1)))
    model = ConvDense()
    params = jax.tree.map(lambda a: a.astype(x.dtype), model.init(jax.random.key(seed), x))
    targets = {
        "categorical": jnp.asarray(rng.integers(0, C, N)),
        "bernoulli": jnp.asarray(rng.random((N, C)) > 0.5).astype(x.dtype),
        "gaussian": jnp.asarray(rng.standard_normal((N, C))),
    }[kind]
    helper = {
        "categorical": losses.softmax_cross_entropy,
        "bernoulli": losses.sigmoid_binary_cross_entropy,
        "gaussian": losses.squared_error,
    }[kind]

    def predictions(p):
        return model.apply(p, x)

    def obj_fn(p):  # a scaled helper plus an L2 term (curvature-free for the Gauss-Newton)
        return 1.5 * helper(predictions(p), targets) + 0.05 * sum(
            jnp.sum(w**2) for w in jax.tree.leaves(p)
        )

    return params, predictions, obj_fn


def _explicit_gauss_newton(kind, params, predictions):
    flat, unravel = ravel_pytree(params)
    jac = jax.jacobian(lambda v: predictions(unravel(v)))(flat)  # (N, C, P)
    h = _likelihood_hessian(kind, predictions(params))
    return 1.5 * jnp.einsum("ncp,ncd,ndq->pq", jac, h, jac) / N


def _random_directions(params, k, seed=1):
    rng = np.random.default_rng(seed)
    return [
        jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), params) for _ in range(k)
    ]


def _matrix(directions):
    return np.stack([np.asarray(ravel_pytree(d)[0]) for d in directions])


@pytest.mark.parametrize("kind", ["categorical", "bernoulli", "gaussian"])
def test_gauss_newton_forms_equal_the_explicit_matrix(kind, x64):
    params, predictions, obj_fn = _problem(kind)
    directions = _random_directions(params, 3)
    loss, forms = gauss_newton_quadratic_forms(obj_fn, params, directions)
    u = _matrix(directions)
    g = np.asarray(_explicit_gauss_newton(kind, params, predictions))
    np.testing.assert_allclose(np.asarray(forms), u @ g @ u.T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(float(loss), float(obj_fn(params)), rtol=1e-12)
    assert np.linalg.eigvalsh(np.asarray(forms)).min() > -1e-10  # positive semi-definite


@pytest.mark.slow  # the explicit float64 Hessian of the tiny model (about 12 s, `make test-slow`)
def test_hessian_forms_equal_the_explicit_hessian(x64):
    params, _, obj_fn = _problem("categorical")
    directions = _random_directions(params, 2)
    _, forms = hessian_quadratic_forms(obj_fn, params, directions)
    flat, unravel = ravel_pytree(params)
    h = np.asarray(jax.hessian(lambda v: obj_fn(unravel(v)))(flat))
    u = _matrix(directions)
    np.testing.assert_allclose(np.asarray(forms), u @ h @ u.T, rtol=1e-10, atol=1e-12)


def test_a_loss_without_a_helper_is_refused_with_the_remedy():
    params, predictions, _ = _problem("gaussian")
    with pytest.raises(ValueError, match=r"registered no predictions.*squared_error.*hessian"):
        gauss_newton_quadratic_forms(
            lambda p: jnp.mean(predictions(p) ** 2), params, _random_directions(params, 1)
        )


def test_a_helper_inside_vmap_is_refused():
    params, predictions, _ = _problem("gaussian")
    y = jnp.zeros((N, C))

    def per_example_loss(p):
        z = predictions(p)
        return jnp.mean(jax.vmap(lambda a, b: losses.squared_error(a[None], b[None]))(z, y))

    with pytest.raises(CaptureError, match="nested JAX transformation"):
        gauss_newton_quadratic_forms(per_example_loss, params, _random_directions(params, 1))


# ----------------------------------------------------------------------------------------
# The model's solve, against numpy.
# ----------------------------------------------------------------------------------------


def _tree_vector(tree):
    return np.asarray(ravel_pytree(tree)[0])


def test_alpha_and_mu_solve_the_explicit_two_by_two_model(x64):
    """Two steps with the identity direction (``u = g``) and η = 0.1: at each step the update
    is ``α(-g) + μ δ₋`` with ``(α, μ) = -(A + λD)⁻¹ b`` from the explicit Gauss-Newton
    matrix; the damping handed to the direction is ``λ + η``."""
    kind, eta, lam0 = "categorical", 0.1, 0.3
    params, predictions, obj_fn = _problem(kind)
    given = []

    def direction(damping):
        given.append(float(damping))
        return optax.identity()

    tx = scale_by_quadratic_model(
        direction, initial_damping=lam0, l2_regularization=eta, damping_period=1000
    )
    state = tx.init(params)
    previous = np.zeros_like(_tree_vector(params))
    for t in range(2):
        grads = jax.grad(obj_fn)(params)
        update, new_state = tx.update(grads, state, params, obj_fn=obj_fn)
        g = _tree_vector(grads)
        vectors = [-g] if t == 0 else [-g, previous]
        v = np.stack(vectors)
        gn = np.asarray(_explicit_gauss_newton(kind, params, predictions))
        a = v @ (gn + eta * np.eye(len(g))) @ v.T
        d = v @ v.T
        b = v @ g
        lam = float(state.damping)
        w = -np.linalg.solve(a + lam * d, b)
        np.testing.assert_allclose(_tree_vector(update), w @ v, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(float(new_state.learning_rate), w[0], rtol=1e-6)
        if t == 1:
            np.testing.assert_allclose(float(new_state.momentum), w[1], rtol=1e-6)
        assert given[-1] == pytest.approx(lam + eta)
        previous = _tree_vector(update)
        params = optax.apply_updates(params, update)
        state = new_state


def test_the_damping_rule_follows_a_hand_computed_sequence():
    omega = 0.9**5
    ratios = [0.9, 0.5, 0.1, np.nan, 2.0, -3.0, 0.76, 0.74, 0.25, 0.24]
    lam, got = 1.0, []
    for rho in ratios:
        lam = float(
            adapt_damping(
                jnp.float32(lam),
                jnp.float32(rho),
                omega=omega,
                lower_threshold=0.25,
                upper_threshold=0.75,
                min_damping=0.5,
                max_damping=3.0,
            )
        )
        got.append(lam)
    w = omega
    want = []
    lam = 1.0
    for step in ["down", "stay", "up", "up", "down", "up", "down", "stay", "stay", "up"]:
        lam = {"down": lam * w, "stay": lam, "up": lam / w}[step]
        lam = min(max(lam, 0.5), 3.0)
        want.append(lam)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def _least_squares():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((20, 4)))
    y = jnp.asarray(rng.standard_normal((20, 2)))
    params = {"w": jnp.zeros((4, 2))}
    return params, lambda p: losses.squared_error(x @ p["w"], y)


def test_an_exact_model_shrinks_the_damping_by_omega_each_period(x64):
    """A linear least-squares loss is its own quadratic model (ρ = 1), so λ shrinks by
    ``ω = 0.9²`` at every adaptation (``damping_period=2``) and no step is rejected."""
    params, obj_fn = _least_squares()
    tx = scale_by_quadratic_model(optax.scale_by_adam(), initial_damping=1.0, damping_period=2)
    state = tx.init(params)
    dampings = []
    for _ in range(6):
        update, state = tx.update(jax.grad(obj_fn)(params), state, params, obj_fn=obj_fn)
        params = optax.apply_updates(params, update)
        dampings.append(float(state.damping))
        np.testing.assert_allclose(float(state.reduction_ratio), 1.0, rtol=1e-6)
    w = 0.9**2
    np.testing.assert_allclose(dampings, [w, w, w**2, w**2, w**3, w**3], rtol=1e-6)
    assert int(state.rejected) == 0


def _quartic():
    """½ (θ - 1)² through the Gaussian helper plus a curvature-free 3 Σθ⁴: the model (which
    sees only the first term) overshoots from θ = 2."""
    params = {"theta": jnp.full((1, 3), 2.0)}

    def obj_fn(p):
        z = p["theta"]
        return losses.squared_error(z, jnp.ones_like(z)) + 3.0 * jnp.sum(z**4)

    return params, obj_fn


def test_a_step_that_raises_the_loss_is_rejected_and_raises_the_damping(x64):
    params, obj_fn = _quartic()
    tx = scale_by_quadratic_model(
        optax.identity(), initial_damping=1e-3, min_damping=1e-6, damping_period=1
    )
    state = tx.init(params)
    update, new_state = tx.update(jax.grad(obj_fn)(params), state, params, obj_fn=obj_fn)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(update))
    assert int(new_state.rejected) == 1
    assert float(new_state.damping) == pytest.approx(1e-3 / 0.9)
    assert float(new_state.reduction_ratio) < 0.25
    # Without rejection the same step is taken (and the loss does rise).
    loose = scale_by_quadratic_model(
        optax.identity(),
        initial_damping=1e-3,
        min_damping=1e-6,
        damping_period=1,
        reject_increasing_steps=False,
    )
    taken, _ = loose.update(jax.grad(obj_fn)(params), loose.init(params), params, obj_fn=obj_fn)
    assert float(obj_fn(optax.apply_updates(params, taken))) > float(obj_fn(params))


def test_a_nonfinite_loss_at_the_new_point_rejects_the_step_and_keeps_the_state_finite(x64):
    params, obj_fn = _least_squares()
    far = jax.tree.map(lambda p: p + 10.0, params)

    def cliff(p):  # NaN anywhere but at the starting point
        return jnp.where(jnp.abs(p["w"] - far["w"]).max() < 1e-12, obj_fn(p), jnp.nan)

    tx = scale_by_quadratic_model(optax.identity(), damping_period=1)
    update, state = tx.update(jax.grad(obj_fn)(far), tx.init(far), far, obj_fn=cliff)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(update))
    assert int(state.rejected) == 1 and float(state.damping) == pytest.approx(1 / 0.9)
    assert float(state.reduction_ratio) == -100.0
    leaves = jax.tree.leaves(state)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)


def test_an_indefinite_hessian_raises_the_damping_until_a_step_is_possible(x64):
    """``-θ²/2 + θ⁴/4`` from θ = 0.1 has negative curvature: the Hessian model has no
    direction of positive damped curvature while λ < 1 - 3θ², so λ grows step by step until
    one exists (and then until the step lands lower), then descent steps are taken."""
    params = {"theta": jnp.asarray([0.1])}

    def obj_fn(p):
        t = p["theta"]
        return jnp.sum(-0.5 * t**2 + 0.25 * t**4)

    tx = scale_by_quadratic_model(
        optax.identity(), curvature="hessian", initial_damping=0.5, damping_period=1
    )
    state = tx.init(params)
    dampings, rejected = [], []
    for _ in range(20):
        update, state = tx.update(jax.grad(obj_fn)(params), state, params, obj_fn=obj_fn)
        new = optax.apply_updates(params, update)
        assert float(obj_fn(new)) <= float(obj_fn(params)) + 1e-15
        params = new
        dampings.append(float(state.damping))
        rejected.append(int(state.rejected))
    assert rejected[0] == 1 and dampings[0] == pytest.approx(0.5 / 0.9)
    assert rejected[-1] < len(rejected)  # steps were taken once λ was large enough
    assert float(jnp.abs(params["theta"]).max()) > 0.1  # moving away from the maximum at 0


def test_the_norm_constraint_bounds_the_step_in_the_curvature_norm(x64):
    kind = "gaussian"
    params, predictions, obj_fn = _problem(kind)
    grads = jax.grad(obj_fn)(params)
    free = scale_by_quadratic_model(optax.identity(), l2_regularization=0.1)
    unclipped, _ = free.update(grads, free.init(params), params, obj_fn=obj_fn)
    gn = np.asarray(_explicit_gauss_newton(kind, params, predictions))
    delta = _tree_vector(unclipped)
    norm = delta @ (gn + 0.1 * np.eye(len(delta))) @ delta
    limit = norm / 4
    clipped_tx = scale_by_quadratic_model(
        optax.identity(), l2_regularization=0.1, norm_constraint=limit
    )
    clipped, _ = clipped_tx.update(grads, clipped_tx.init(params), params, obj_fn=obj_fn)
    np.testing.assert_allclose(_tree_vector(clipped), delta / 2, rtol=1e-8)


def test_bad_arguments_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="initial_damping must be a finite number > 0"):
        scale_by_quadratic_model(optax.identity(), initial_damping=0.0)
    with pytest.raises(ValueError, match="curvature"):
        scale_by_quadratic_model(optax.identity(), curvature="fisher")
    with pytest.raises(TypeError, match="direction must be an optax.GradientTransformation"):
        scale_by_quadratic_model(3)
    with pytest.raises(TypeError, match="static_args"):
        scale_by_quadratic_model(optax.identity(), adapt_momentum=1)
    params, obj_fn = _least_squares()
    tx = scale_by_quadratic_model(optax.identity())
    with pytest.raises(ValueError, match="obj_fn"):
        tx.update(jax.grad(obj_fn)(params), tx.init(params), params)
    with pytest.raises(ValueError, match="ema"):
        sofim_optax.kfac_adaptive(ema=2.0)  # the method's own check, at construction


@pytest.mark.slow  # (compiles KFAC and the quadratic model: `make test-slow`)
def test_an_adaptive_alias_skips_a_nonfinite_gradient_and_survives_a_nonfinite_loss():
    """``kfac_adaptive`` on the conv model: a NaN in the gradient skips the whole step (the
    state unchanged but for the method's ``skipped.steps``); a NaN loss (``obj_fn``) gives no
    step, a larger damping and a finite state; the next clean step is taken."""
    from sofim_optax.curvature import linen as capture

    params, _, obj_fn = _problem("categorical")
    tx = sofim_optax.kfac_adaptive(inverse_period=2)

    def loss_of(p, scale):
        return obj_fn(p) * scale

    @jax.jit
    def step(params, state, poison_grad, poison_loss):
        _, grads, stats = capture.value_grad_and_stats(loss_of, params, jnp.float32(1.0))
        grads = jax.tree.map(lambda g: g + poison_grad, grads)
        return tx.update(
            grads, state, params, layer_stats=stats, obj_fn=lambda p: loss_of(p, 1.0 + poison_loss)
        )

    state = tx.init(params)
    update, state = step(params, state, 0.0, 0.0)
    params = optax.apply_updates(params, update)
    skipped, after = step(params, state, jnp.nan, 0.0)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(skipped))
    assert int(sofim_optax.guards.skip_counts(after).steps) == 1
    kept = (after.count, after.damping, after.previous_update, after.direction_state.curvature)
    was = (state.count, state.damping, state.previous_update, state.direction_state.curvature)
    jax.tree.map(np.testing.assert_array_equal, kept, was)
    nan_loss, after = step(params, state, 0.0, jnp.nan)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(nan_loss))
    assert float(after.damping) > float(state.damping) and int(after.rejected) == 1
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(after))
    update, after = step(params, after, 0.0, 0.0)
    assert any(float(jnp.abs(u).max()) > 0.0 for u in jax.tree.leaves(update))


def test_alias_default_overrides_reach_the_quadratic_model(monkeypatch):
    """An alias's ``overrides`` may change a quadratic-model default (K-BFGS's ``min_damping``
    of 0.1, MBF's 1e-3), and what reaches ``scale_by_quadratic_model`` is that default, the
    user's value when given, and the shared default for the other aliases."""
    from sofim_optax import adaptive

    seen = []
    real = adaptive.scale_by_quadratic_model

    def spy(direction, **model):
        seen.append(model)
        return real(direction, **model)

    monkeypatch.setattr(adaptive, "scale_by_quadratic_model", spy)
    sofim_optax.kbfgs_adaptive()
    sofim_optax.kbfgs_l_adaptive()
    sofim_optax.kbfgs_adaptive(min_damping=0.5)
    sofim_optax.mbf_adaptive()
    sofim_optax.kfac_adaptive()
    assert [m["min_damping"] for m in seen] == [
        0.1,
        0.1,
        0.5,
        1e-3,
        adaptive.QUADRATIC_MODEL_ARGUMENTS["min_damping"],
    ]
    assert adaptive.QUADRATIC_MODEL_ARGUMENTS["min_damping"] == 1e-2
    with pytest.raises(TypeError, match="no \\['not_an_argument'\\]"):
        adaptive.make_adaptive_alias(
            sofim_optax.scale_by_kfac,
            name="x",
            summary="x",
            needs="x",
            feeds_damping=True,
            reference="x",
            overrides={"not_an_argument": 1},
        )
