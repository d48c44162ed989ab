"""SOFIM against an explicit dense reference, optax conformance and convergence."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sofim_optax

SHAPES = {"w": (3, 5), "b": (5,), "conv": (2, 2, 3, 2), "scalar": ()}


def random_tree(rng, dtype=np.float32, scale=1.0):
    """Random numpy arrays (numpy keeps float64 whatever JAX's x64 setting)."""
    return {k: np.asarray(scale * rng.normal(size=s), dtype) for k, s in SHAPES.items()}


def flatten(tree):
    return np.concatenate([np.asarray(tree[k], np.float64).reshape(-1) for k in sorted(tree)])


def blocks_of(scope, block_size):
    """Index ranges of the Fisher blocks, in the order of ``flatten``."""
    ranges, start = [], 0
    for k in sorted(SHAPES):
        size = int(np.prod(SHAPES[k]))
        if scope == "global":
            ranges.append((start, start + size))
        elif scope == "per_tensor":
            ranges.append((start, start + size))
        else:
            for lo in range(0, size, block_size):
                ranges.append((start + lo, start + min(lo + block_size, size)))
        start += size
    if scope == "global":
        ranges = [(0, start)]
    return ranges


def dense_sofim_directions(grads_seq, b1, rho, scope, block_size):
    """The explicit (m̂m̂ᵀ + ρI)⁻¹ m̂ with a block-diagonal matrix, solved densely in float64."""
    m = np.zeros_like(flatten(grads_seq[0]))
    out = []
    with jax.enable_x64(True):
        for t, g in enumerate(grads_seq, start=1):
            m = b1 * m + (1 - b1) * flatten(g)
            mhat = m / (1 - b1**t)
            d = mhat.size
            fisher = rho * np.eye(d)
            for lo, hi in blocks_of(scope, block_size):
                fisher[lo:hi, lo:hi] += np.outer(mhat[lo:hi], mhat[lo:hi])
            out.append(np.asarray(jnp.linalg.solve(jnp.asarray(fisher), jnp.asarray(mhat))))
    return out


@pytest.mark.parametrize("scope,block_size", [("global", None), ("per_tensor", None), ("mini_block", 4), ("mini_block", 7)])
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_matches_dense_reference_over_several_steps(scope, block_size, precision):
    rng = np.random.default_rng(42)
    b1, rho = 0.8, 0.3
    # Gradients of varying size so that both regimes of ‖m̂‖² vs ρ occur.
    grads_seq = [random_tree(rng, np.float64, scale=s) for s in (2.0, 0.5, 0.05, 1.0, 0.2)]
    expected = dense_sofim_directions(grads_seq, b1, rho, scope, block_size)
    with jax.enable_x64(precision == "float64"):
        dtype = jnp.float64 if precision == "float64" else jnp.float32
        tx = sofim_optax.scale_by_sofim(b1=b1, damping=rho, scope=scope, block_size=block_size)
        params = jax.tree.map(lambda g: jnp.zeros(g.shape, dtype), grads_seq[0])
        state = tx.init(params)
        update = jax.jit(tx.update)
        for g, want in zip(grads_seq, expected):
            g = jax.tree.map(lambda x: jnp.asarray(x, dtype), g)
            got, state = update(g, state, params)
            assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(got))
            tol = dict(rtol=1e-10, atol=1e-13) if precision == "float64" else dict(rtol=2e-5, atol=1e-7)
            np.testing.assert_allclose(flatten(got), want, **tol)


def test_scopes_differ_and_mini_block_with_one_big_block_equals_per_tensor():
    rng = np.random.default_rng(0)
    g = random_tree(rng)
    results = {}
    for scope, bs in [("global", None), ("per_tensor", None), ("mini_block", 4), ("mini_block", 10_000)]:
        tx = sofim_optax.scale_by_sofim(scope=scope, block_size=bs)
        results[(scope, bs)] = flatten(tx.update(g, tx.init(g))[0])
    assert not np.allclose(results[("global", None)], results[("per_tensor", None)])
    assert not np.allclose(results[("per_tensor", None)], results[("mini_block", 4)])
    np.testing.assert_allclose(results[("mini_block", 10_000)], results[("per_tensor", None)], rtol=1e-6)


def test_first_step_is_gradient_over_rho_plus_squared_norm():
    rng = np.random.default_rng(1)
    g = random_tree(rng)
    tx = sofim_optax.scale_by_sofim(damping=0.7)
    got, _ = tx.update(g, tx.init(g))
    flat = flatten(g)
    np.testing.assert_allclose(flatten(got), flat / (0.7 + flat @ flat), rtol=1e-6)


def test_padding_never_changes_a_result():
    # A leaf of 7 entries with block_size 4: the padded last block [a, b, c, 0].
    g = {"v": jnp.arange(1.0, 8.0)}
    tx = sofim_optax.scale_by_sofim(damping=1.0, scope="mini_block", block_size=4)
    got = np.asarray(tx.update(g, tx.init(g))[0]["v"])
    first, last = np.arange(1.0, 5.0), np.arange(5.0, 8.0)
    np.testing.assert_allclose(got[:4], first / (1.0 + first @ first), rtol=1e-6)
    np.testing.assert_allclose(got[4:], last / (1.0 + last @ last), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(scope="layerwise"), "scope must be one of"),
        (dict(scope="mini_block", block_size=0), "positive int"),
        (dict(scope="mini_block", block_size=2.5), "positive int"),
        (dict(b1=1.0), r"b1 must be in \[0, 1\)"),
        (dict(damping=0.0), "damping must be"),
        (dict(damping=float("inf")), "damping must be"),
    ],
)
def test_bad_hyperparameters_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sofim_optax.scale_by_sofim(**kwargs)


# ---------------------------------------------------------------------------
# optax conformance
# ---------------------------------------------------------------------------


def run_steps(tx, params, grads_seq, jit=True, **extra):
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for g in grads_seq:
        updates, state = update(g, state, params, **extra)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.fixture
def problem():
    rng = np.random.default_rng(7)
    params = random_tree(rng)
    grads_seq = [random_tree(rng, scale=s) for s in (1.0, 0.3, 0.1, 0.5)]
    return params, grads_seq


def assert_trees_close(a, b, **tol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), **tol), a, b)


def test_jit_matches_eager_and_extra_args_are_ignored(problem):
    params, grads_seq = problem
    tx = sofim_optax.sofim(0.1)
    eager, _ = run_steps(tx, params, grads_seq, jit=False)
    jitted, _ = run_steps(tx, params, grads_seq, jit=True, layer_stats=None, unrelated=3)
    assert_trees_close(eager, jitted, rtol=1e-6, atol=1e-7)


def test_alias_equals_explicit_chain_and_chains_with_other_transforms(problem):
    params, grads_seq = problem
    alias, _ = run_steps(sofim_optax.sofim(0.05, damping=0.2, weight_decay=0.01), params, grads_seq)
    chained = optax.chain(
        sofim_optax.scale_by_sofim(damping=0.2), optax.add_decayed_weights(0.01), optax.scale(-0.05)
    )
    manual, _ = run_steps(chained, params, grads_seq)
    assert_trees_close(alias, manual, rtol=1e-6, atol=1e-7)
    # Composes with clipping in front, as any optax transformation does.
    clipped, _ = run_steps(optax.chain(optax.clip_by_global_norm(0.1), sofim_optax.sofim(0.05)), params, grads_seq)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(clipped))


def test_weight_decay_is_decoupled(problem):
    params, grads_seq = problem
    zero_grads = jax.tree.map(jnp.zeros_like, grads_seq[0])
    tx = sofim_optax.sofim(0.1, weight_decay=0.5)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    # With a zero gradient the moment and the Fisher see nothing: only -ηλθ remains.
    assert_trees_close(updates, jax.tree.map(lambda p: -0.1 * 0.5 * p, params), rtol=1e-6)


def test_inject_hyperparams_learning_rate_and_damping_take_effect(problem):
    params, grads_seq = problem
    tx = optax.inject_hyperparams(sofim_optax.sofim)(learning_rate=0.1, damping=0.5)
    state = tx.init(params)
    update = jax.jit(tx.update)
    first, state = update(grads_seq[0], state, params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    zero, state = update(grads_seq[1], state, params)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(zero))

    # rho changed at run time equals a fresh optimizer built with that rho.
    tx_a = optax.inject_hyperparams(sofim_optax.sofim)(learning_rate=0.1, damping=0.5)
    state_a = tx_a.init(params)
    _, state_a = update(grads_seq[0], state_a, params)
    state_a.hyperparams["damping"] = jnp.asarray(3.0)
    got, _ = update(grads_seq[1], state_a, params)
    ref = sofim_optax.sofim(0.1, damping=0.5)
    ref_state = ref.init(params)
    _, ref_state = ref.update(grads_seq[0], ref_state, params)
    ref_new = sofim_optax.sofim(0.1, damping=3.0)
    want, _ = ref_new.update(grads_seq[1], ref_state, params)
    assert_trees_close(got, want, rtol=1e-6, atol=1e-8)
    # And it really changed the result.
    same_rho, _ = ref.update(grads_seq[1], ref_state, params)
    assert not np.allclose(flatten(got), flatten(same_rho))


def test_multisteps_accumulates_then_applies_sofim_to_the_mean_gradient(problem):
    params, grads_seq = problem
    k = 2
    tx = optax.MultiSteps(sofim_optax.sofim(0.1), every_k_schedule=k)
    state = tx.init(params)
    p = params
    for i, g in enumerate(grads_seq[:k]):
        updates, state = jax.jit(tx.update)(g, state, p)
        if i < k - 1:
            assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
        p = optax.apply_updates(p, updates)
    mean_grad = jax.tree.map(lambda a, b: (a + b) / 2, grads_seq[0], grads_seq[1])
    inner = sofim_optax.sofim(0.1)
    want_updates, _ = inner.update(mean_grad, inner.init(params), params)
    assert_trees_close(p, optax.apply_updates(params, want_updates), rtol=1e-5, atol=1e-7)


def test_schedule_as_learning_rate(problem):
    params, grads_seq = problem
    schedule = optax.linear_schedule(0.1, 0.0, transition_steps=len(grads_seq))
    scheduled = sofim_optax.sofim(schedule)
    unit = sofim_optax.scale_by_sofim()
    s_state, u_state = scheduled.init(params), unit.init(params)
    for step, g in enumerate(grads_seq):
        got, s_state = jax.jit(scheduled.update)(g, s_state, params)
        direction, u_state = unit.update(g, u_state, params)
        assert_trees_close(got, jax.tree.map(lambda d: -schedule(step) * d, direction), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("scope", ["global", "per_tensor", "mini_block"])
def test_dtypes_are_kept_and_moment_is_float32(problem, dtype, scope):
    params, grads_seq = problem
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    grads_seq = [jax.tree.map(lambda x: x.astype(dtype), g) for g in grads_seq]
    tx = sofim_optax.sofim(0.1, scope=scope, block_size=4 if scope == "mini_block" else None)
    new_params, state = run_steps(tx, params, grads_seq)
    assert all(x.dtype == dtype for x in jax.tree.leaves(new_params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state[0].mu))
    assert all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree.leaves(new_params))


def test_mu_dtype_is_respected(problem):
    params, grads_seq = problem
    tx = sofim_optax.scale_by_sofim(mu_dtype=jnp.bfloat16)
    _, state = tx.update(grads_seq[0], tx.init(params), params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.mu))


def test_state_is_arrays_only_with_stable_shapes_and_dtypes(problem):
    params, grads_seq = problem
    tx = sofim_optax.sofim(0.1, scope="mini_block", block_size=3)
    state0 = tx.init(params)
    _, state1 = run_steps(tx, params, grads_seq)
    for leaf in jax.tree.leaves(state0):
        assert isinstance(leaf, jax.Array)
    assert jax.tree.structure(state0) == jax.tree.structure(state1)
    jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype) or pytest.fail(f"{a.shape} {b.shape}"), state0, state1)
    assert int(state1[0].count) == len(grads_seq)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_apply_if_finite_skips_non_finite_gradients(problem, bad):
    params, grads_seq = problem
    tx = optax.apply_if_finite(sofim_optax.sofim(0.1), max_consecutive_errors=5)
    state = tx.init(params)
    update = jax.jit(tx.update)
    updates, state = update(grads_seq[0], state, params)
    params = optax.apply_updates(params, updates)
    poisoned = dict(grads_seq[1])
    poisoned["w"] = jnp.asarray(poisoned["w"]).at[1, 2].set(bad)
    new_updates, new_state = update(poisoned, state, params)
    new_params = optax.apply_updates(params, new_updates)
    assert_trees_close(new_params, params, rtol=0, atol=0)
    assert_trees_close(new_state.inner_state, state.inner_state, rtol=0, atol=0)
    assert int(new_state.notfinite_count) == 1


# ---------------------------------------------------------------------------
# Convergence
# ---------------------------------------------------------------------------


def test_converges_on_a_convex_quadratic():
    rng = np.random.default_rng(3)
    d = 20
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    hessian = (q * np.linspace(1.0, 10.0, d)) @ q.T
    target = rng.normal(size=d)
    hessian_j, target_j = jnp.asarray(hessian, jnp.float32), jnp.asarray(target, jnp.float32)

    def loss(x):
        diff = x - target_j
        return 0.5 * diff @ hessian_j @ diff

    # ‖g‖² starts near 1e3 here; ρ = 10 keeps the early steps from being tiny
    # and gives an effective rate η/ρ = 0.1 near the optimum (λ_max = 10).
    tx = sofim_optax.sofim(learning_rate=1.0, damping=10.0)
    x = jnp.zeros(d)
    state = tx.init(x)

    @jax.jit
    def step(x, state):
        updates, state = tx.update(jax.grad(loss)(x), state, x)
        return optax.apply_updates(x, updates), state

    for _ in range(600):
        x, state = step(x, state)
    assert float(jnp.linalg.norm(x - target_j)) < 1e-3
    assert float(loss(x)) < 1e-6


def test_converges_on_logistic_regression():
    rng = np.random.default_rng(4)
    n, d = 400, 10
    features = rng.normal(size=(n, d))
    true_w = rng.normal(size=d)
    labels = (features @ true_w + 0.5 * rng.normal(size=n) > 0).astype(np.float64)
    l2 = 1e-2

    def loss_fn(w, xs, ys):
        logits = xs @ w
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, ys)) + 0.5 * l2 * w @ w

    # The optimum, by Newton's method in float64: an independent reference.
    with jax.enable_x64(True):
        xs64, ys64 = jnp.asarray(features), jnp.asarray(labels)
        w_star = jnp.zeros(d)
        for _ in range(30):
            g = jax.grad(loss_fn)(w_star, xs64, ys64)
            h = jax.hessian(loss_fn)(w_star, xs64, ys64)
            w_star = w_star - jnp.linalg.solve(h, g)
        loss_star = float(loss_fn(w_star, xs64, ys64))

    xs32, ys32 = jnp.asarray(features, jnp.float32), jnp.asarray(labels, jnp.float32)
    tx = sofim_optax.sofim(learning_rate=0.1, damping=0.1)
    w = jnp.zeros(d)
    state = tx.init(w)

    @jax.jit
    def step(w, state):
        updates, state = tx.update(jax.grad(loss_fn)(w, xs32, ys32), state, w)
        return optax.apply_updates(w, updates), state

    for _ in range(800):
        w, state = step(w, state)
    assert float(loss_fn(w, xs32, ys32)) - loss_star < 1e-5
    np.testing.assert_allclose(np.asarray(w), np.asarray(w_star), atol=2e-3)


@pytest.mark.parametrize("scope", ["global", "per_tensor", "mini_block"])
def test_float32_keeps_full_precision_when_gradient_norm_dwarfs_rho(scope):
    # ‖m̂‖² ≈ 1e6 against ρ = 1e-4: the paper's expanded Sherman–Morrison form
    # loses about ten digits here; the closed form must stay at float32 accuracy.
    rng = np.random.default_rng(11)
    g = {"w": (1e3 / np.sqrt(1000)) * rng.normal(size=(40, 25))}
    tx = sofim_optax.scale_by_sofim(damping=1e-4, scope=scope, block_size=128 if scope == "mini_block" else None)
    got = np.asarray(tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), tx.init(g))[0]["w"], np.float64)
    [want] = dense_sofim_directions_single(g["w"], 1e-4, scope, 128)
    np.testing.assert_allclose(got.reshape(-1), want, rtol=3e-6)


def dense_sofim_directions_single(w, rho, scope, block_size):
    flat = np.asarray(w, np.float32).astype(np.float64).reshape(-1)
    size = block_size if scope == "mini_block" else flat.size
    out = np.concatenate([b / (rho + b @ b) for b in np.split(flat, range(size, flat.size, size))])
    return [out]
