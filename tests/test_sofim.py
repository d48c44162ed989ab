"""SOFIM against an explicit dense reference, SOFIM-specific optax behaviour and convergence
(the common optax checks: ``tests/test_conformance.py``)."""

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


@pytest.mark.parametrize(
    "scope,block_size",
    [("global", None), ("per_tensor", None), ("mini_block", 4), ("mini_block", 7)],
)
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
            tol = (
                dict(rtol=1e-10, atol=1e-13)
                if precision == "float64"
                else dict(rtol=2e-5, atol=1e-7)
            )
            np.testing.assert_allclose(flatten(got), want, **tol)


def test_scopes_differ_and_mini_block_with_one_big_block_equals_per_tensor():
    rng = np.random.default_rng(0)
    g = random_tree(rng)
    results = {}
    for scope, bs in [
        ("global", None),
        ("per_tensor", None),
        ("mini_block", 4),
        ("mini_block", 10_000),
    ]:
        tx = sofim_optax.scale_by_sofim(scope=scope, block_size=bs)
        results[(scope, bs)] = flatten(tx.update(g, tx.init(g))[0])
    assert not np.allclose(results[("global", None)], results[("per_tensor", None)])
    assert not np.allclose(results[("per_tensor", None)], results[("mini_block", 4)])
    np.testing.assert_allclose(
        results[("mini_block", 10_000)], results[("per_tensor", None)], rtol=1e-6
    )


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
        (dict(b1=1.0), r"b1 must be in \[0, 1\)"),
        (dict(damping=0.0), "damping must be"),
        (dict(damping=float("inf")), "damping must be"),
    ],
)
def test_bad_hyperparameters_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sofim_optax.scale_by_sofim(**kwargs)


def test_block_size_must_be_a_python_int():
    # It fixes shapes: a float (or an array from inject_hyperparams) is a type error.
    with pytest.raises(TypeError, match="block_size must be a Python int.*static_args"):
        sofim_optax.scale_by_sofim(scope="mini_block", block_size=2.5)


# ---------------------------------------------------------------------------
# optax conformance specific to SOFIM (the common checks: tests/test_conformance.py)
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
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(
            np.asarray(x, np.float64), np.asarray(y, np.float64), **tol
        ),
        a,
        b,
    )


def test_chains_with_clipping_in_front(problem):
    # (The alias against its explicit chain: tests/test_conformance.py.)
    params, grads_seq = problem
    clipped, _ = run_steps(
        optax.chain(optax.clip_by_global_norm(0.1), sofim_optax.sofim(0.05)), params, grads_seq
    )
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(clipped))


def test_weight_decay_is_decoupled(problem):
    params, grads_seq = problem
    zero_grads = jax.tree.map(jnp.zeros_like, grads_seq[0])
    tx = sofim_optax.sofim(0.1, weight_decay=0.5)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    # With a zero gradient the moment and the Fisher see nothing: only -ηλθ remains.
    assert_trees_close(updates, jax.tree.map(lambda p: -0.1 * 0.5 * p, params), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("scope", ["global", "per_tensor"])  # mini_block: test_conformance.py
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
    tx = sofim_optax.scale_by_sofim(
        damping=1e-4, scope=scope, block_size=128 if scope == "mini_block" else None
    )
    got = np.asarray(
        tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), tx.init(g))[0]["w"],
        np.float64,
    )
    [want] = dense_sofim_directions_single(g["w"], 1e-4, scope, 128)
    np.testing.assert_allclose(got.reshape(-1), want, rtol=3e-6)


def dense_sofim_directions_single(w, rho, scope, block_size):
    flat = np.asarray(w, np.float32).astype(np.float64).reshape(-1)
    size = block_size if scope == "mini_block" else flat.size
    out = np.concatenate([b / (rho + b @ b) for b in np.split(flat, range(size, flat.size, size))])
    return [out]
