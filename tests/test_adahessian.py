"""AdaHessian (``sofim_optax.adahessian``) against float64 references (the common
optax checks: ``tests/test_conformance.py``).

The references use separable quadratics ``½ Σ a ⊙ x²``, whose Hessian is exactly ``diag(a)``:
then every Rademacher probe gives ``z ⊙ Hz = a`` exactly, so the whole recursion (spatial
averaging, moments, bias corrections, Hessian power, periods) can be checked step by step in
numpy, independently of the random draws.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sofim_optax.adahessian import (
    adahessian,
    hutchinson_hessian_diagonal,
    scale_by_adahessian,
)


def arr(x, dtype=jnp.float32):
    return jnp.asarray(np.asarray(x).astype(dtype))


def rand_tree(seed, shapes, dtype=jnp.float32, scale=1.0):
    rng = np.random.default_rng(seed)
    return {k: arr(scale * rng.standard_normal(s), dtype) for k, s in shapes.items()}


SHAPES = {"conv": (3, 3, 2, 4), "dense": (5, 3), "bias": (7,)}


def separable_obj(curv):
    """``½ Σ curv ⊙ x²``: Hessian diag(curv) exactly."""

    def obj(p):
        return sum(0.5 * jnp.sum(curv[k] * p[k].astype(curv[k].dtype) ** 2) for k in p)

    return obj


# ----------------------------------------------------------------------------------------
# The Hutchinson estimator.
# ----------------------------------------------------------------------------------------


def test_hutchinson_converges_to_true_diagonal_and_is_exact_for_diagonal_hessians(x64):
    rng = np.random.default_rng(0)
    d = 12
    m = rng.standard_normal((d, d))
    hess = m @ m.T / d + np.diag(rng.uniform(0.5, 2.0, d))  # dense, well away from diagonal
    params = {"w": arr(np.zeros((3, 2)), jnp.float64), "b": arr(np.zeros(6), jnp.float64)}
    h = arr(hess, jnp.float64)

    def obj(p):
        x = jax.flatten_util.ravel_pytree(p)[0]
        return 0.5 * x @ h @ x + jnp.sum(jnp.sin(x))  # sin'' = -sin = 0 at x = 0

    curv = rand_tree(1, SHAPES, jnp.float64)
    point = rand_tree(2, SHAPES, jnp.float64)
    seeds, max_probes = 4, 1024
    flat = lambda t: jax.flatten_util.ravel_pytree(t)[0]

    @jax.jit
    def run(key):
        k1, k2, k3 = jax.random.split(key, 3)
        # One probe per key: per-probe samples, averaged over nested prefixes below.
        single = jax.vmap(lambda k: flat(hutchinson_hessian_diagonal(obj, params, k, 1)))(
            jax.random.split(k1, seeds * max_probes)
        )
        # The num_probes path itself.
        multi = jax.vmap(lambda k: flat(hutchinson_hessian_diagonal(obj, params, k, 256)))(
            jax.random.split(k2, seeds)
        )
        exact = hutchinson_hessian_diagonal(separable_obj(curv), point, k3, 3)
        return single.reshape(seeds, max_probes, d), multi, exact

    single, multi, exact = run(jax.random.PRNGKey(0))
    single, multi = np.asarray(single), np.asarray(multi)
    diag = np.diag(hess)
    off = np.sqrt(np.mean(np.sum(hess**2, 1) - diag**2))  # RMS std of one probe
    errs = {}
    for s in (1, 16, 256, 1024):
        errs[s] = np.sqrt(np.mean((single[:, :s].mean(axis=1) - diag) ** 2))
        assert errs[s] == pytest.approx(off / np.sqrt(s), rel=0.5), (s, errs[s], off)
    assert errs[1] > errs[16] > errs[256] > errs[1024]
    assert errs[1024] < 0.04 * np.abs(diag).mean()
    assert np.sqrt(np.mean((multi - diag) ** 2)) == pytest.approx(off / 16, rel=0.5)
    # A diagonal Hessian: z ⊙ Hz = diag(H) exactly, for every probe.
    for k in SHAPES:
        np.testing.assert_allclose(exact[k], curv[k], rtol=1e-12)
        assert exact[k].dtype == jnp.float64


# ----------------------------------------------------------------------------------------
# The whole recursion against numpy.
# ----------------------------------------------------------------------------------------


def ref_average(d, spatial, block, absolute):
    d = np.abs(d) if absolute else d.copy()
    if spatial and d.ndim >= 3:
        return np.broadcast_to(d.mean(axis=tuple(range(d.ndim - 2)), keepdims=True), d.shape).copy()
    if block > 1:
        flat = d.reshape(-1).copy()
        for start in range(0, flat.size, block):
            flat[start : start + block] = flat[start : start + block].mean()
        return flat.reshape(d.shape)
    return d


def ref_adahessian(
    curv, grads_seq, params, b1, b2, eps, k, period, spatial, block, absolute, lr, wd
):
    m = {n: np.zeros_like(v) for n, v in params.items()}
    v = {n: np.zeros_like(x) for n, x in params.items()}
    p = {n: np.array(x, np.float64) for n, x in params.items()}
    j = 0
    out = []
    for t, g in enumerate(grads_seq, start=1):
        if (t - 1) % period == 0:
            j += 1
            for n in p:
                ds = ref_average(np.asarray(curv[n], np.float64), spatial, block, absolute)
                v[n] = b2 * v[n] + (1 - b2) * ds**2
        step = {}
        for n in p:
            m[n] = b1 * m[n] + (1 - b1) * np.asarray(g[n], np.float64)
            mhat = m[n] / (1 - b1**t)
            vhat = v[n] / (1 - b2**j)
            step[n] = mhat / (np.sqrt(vhat) ** k + eps)
            p[n] = p[n] - lr * (step[n] + wd * p[n])
        out.append((step, {n: x.copy() for n, x in p.items()}))
    return out


CONFIGS = [
    # (hessian_power, stats_period, spatial_averaging, block_size, average_absolute)
    (1.0, 1, True, 1, True),
    (0.5, 2, True, 3, False),
    (1.0, 3, False, 4, True),
]


def test_matches_numpy_reference(x64):
    curv = rand_tree(3, SHAPES, jnp.float64)  # signed: |D| and D averages differ
    params = rand_tree(4, SHAPES, jnp.float64)
    grads_seq = [rand_tree(10 + i, SHAPES, jnp.float64) for i in range(5)]
    b1, b2, eps, lr, wd = 0.8, 0.9, 1e-3, 0.05, 0.1
    obj = separable_obj(curv)
    txs = [
        adahessian(
            lr,
            b1=b1,
            b2=b2,
            eps=eps,
            weight_decay=wd,
            hessian_power=k,
            stats_period=per,
            spatial_averaging=sp,
            block_size=bl,
            average_absolute=ab,
        )
        for k, per, sp, bl, ab in CONFIGS
    ]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *grads_seq)

    @jax.jit
    def run(params, stacked):
        results = []
        for tx in txs:

            def body(carry, g, tx=tx):
                p, s = carry
                u, s = tx.update(g, s, p, obj_fn=obj)
                p = optax.apply_updates(p, u)
                return (p, s), p

            (_, state), ps = jax.lax.scan(body, (params, tx.init(params)), stacked)
            results.append((ps, state[0]))
        return results

    for cfg, (ps, state) in zip(CONFIGS, run(params, stacked)):
        k, per, sp, bl, ab = cfg
        ref = ref_adahessian(curv, grads_seq, params, b1, b2, eps, k, per, sp, bl, ab, lr, wd)
        for t, (_, rp) in enumerate(ref):
            for n in SHAPES:
                np.testing.assert_allclose(
                    ps[n][t], rp[n], rtol=1e-10, err_msg=f"{cfg} params {t} {n}"
                )
        assert int(state.count) == 5 and int(state.hessian_count) == -(-5 // per)


def test_spatial_averaging_is_per_kernel_position(x64):
    curv = {"conv": arr(np.arange(18.0).reshape(3, 3, 2, 1) - 8.0, jnp.float64)}
    params = {"conv": arr(np.zeros((3, 3, 2, 1)), jnp.float64)}
    tx = scale_by_adahessian(b2=0.0, average_absolute=False, eps=1e-30)
    _, state = jax.jit(lambda p: tx.update(p, tx.init(p), p, obj_fn=separable_obj(curv)))(params)
    nu = np.asarray(state.nu["conv"])
    want = np.asarray(curv["conv"]).mean(axis=(0, 1)) ** 2  # one value per (c_in, c_out)
    np.testing.assert_allclose(nu, np.broadcast_to(want, nu.shape), rtol=1e-12)


def test_key_advances_only_on_refresh_and_seed_matters():
    params = rand_tree(0, {"w": (4, 3)})
    c = rand_tree(1, {"w": (4, 3)})["w"]
    obj = lambda p: jnp.sum(c * p["w"]) ** 2  # Hessian 2 c cᵀ: not diagonal, probes matter
    tx, tx_other = (
        scale_by_adahessian(stats_period=2, seed=0),
        scale_by_adahessian(stats_period=2, seed=1),
    )

    @jax.jit
    def run(params):
        s, keys, nus = tx.init(params), [], []
        for _ in range(3):
            _, s = tx.update(params, s, params, obj_fn=obj)
            keys.append(s.key)
            nus.append(s.nu["w"])
        other = tx_other.update(params, tx_other.init(params), params, obj_fn=obj)[1]
        return keys, nus, other.nu["w"]

    keys, nus, other = run(params)
    np.testing.assert_array_equal(keys[0], keys[1])  # count 1: no refresh, same key
    assert not np.array_equal(keys[1], keys[2])  # count 2: refresh
    np.testing.assert_array_equal(nus[0], nus[1])
    assert not np.allclose(nus[0], other)  # another seed, other probes


# ----------------------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------------------


def test_errors():
    params = rand_tree(0, {"w": (3,)})
    tx = scale_by_adahessian()
    state = jax.eval_shape(tx.init, params)
    with pytest.raises(TypeError, match="obj_fn"):
        jax.eval_shape(tx.update, params, state, params)
    with pytest.raises(ValueError, match="params"):
        jax.eval_shape(lambda g, s: tx.update(g, s, None, obj_fn=lambda p: 0.0), params, state)
    with pytest.raises(TypeError, match="static_args"):
        scale_by_adahessian(num_probes=2.0)
    for kwargs, match in [
        ({"num_probes": 0}, "num_probes"),
        ({"b1": 1.0}, "b1"),
        ({"b2": -0.1}, "b2"),
        ({"eps": 0.0}, "eps"),
        ({"hessian_power": 2.0}, "hessian_power"),
        ({"stats_period": 0}, "stats_period"),
        ({"block_size": 0}, "block_size"),
    ]:
        with pytest.raises(ValueError, match=match):
            scale_by_adahessian(**kwargs)


# ----------------------------------------------------------------------------------------
# inject_hyperparams and static_args (the common optax checks: tests/test_conformance.py).
# ----------------------------------------------------------------------------------------


def _problem(dtype=jnp.float32):
    params = rand_tree(0, {"conv": (2, 2, 1, 3), "w": (4, 3), "b": (3,)}, dtype, scale=0.5)
    x = arr(np.random.default_rng(1).standard_normal((6, 4)), dtype)

    def obj(p):
        h = jnp.tanh(x @ p["w"] + p["b"])
        return (jnp.mean(h**2) + jnp.sum(p["conv"] ** 4)).astype(jnp.float32)

    return params, obj


def test_inject_hyperparams_needs_the_static_args():
    # (inject_hyperparams, learning rate and schedules of every method: test_conformance.py.)
    params, obj = _problem()
    g = jax.grad(obj)(params)
    opt = optax.inject_hyperparams(adahessian, static_args=("num_probes", "block_size"))(
        learning_rate=0.1, num_probes=2
    )
    # ... and with every shape-defining argument at its default, through the factory's own list.
    assert adahessian.static_args == ("num_probes", "block_size")
    jax.eval_shape(
        optax.inject_hyperparams(adahessian, static_args=adahessian.static_args)(
            learning_rate=0.1
        ).init,
        params,
    )
    # Without it, the error says what to do.
    with pytest.raises(TypeError, match="static_args"):
        opt_bad = optax.inject_hyperparams(adahessian)(learning_rate=0.1)
        jax.jit(lambda s: opt_bad.update(g, s, params, obj_fn=obj))(opt_bad.init(params))
    jax.eval_shape(lambda s: opt.update(g, s, params, obj_fn=obj), jax.eval_shape(opt.init, params))


def test_converges_on_ill_conditioned_quadratic():
    """AdaHessian's diagonal scaling solves a badly scaled separable problem that SGD cannot."""
    curv = {"w": arr(np.logspace(-3, 1, 8))}
    params = {"w": arr(np.ones(8))}
    obj = separable_obj(curv)

    def run(opt, steps=60):
        def body(carry, _):
            p, s = carry
            u, s = opt.update(jax.grad(obj)(p), s, p, obj_fn=obj)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(body, (params, opt.init(params)), None, length=steps)
        return obj(p)

    losses = jax.jit(
        lambda: [run(adahessian(0.3, b2=0.9)), run(optax.sgd(0.19))]
    )()  # sgd lr < 2/10
    ada, sgd = (float(x) for x in losses)
    start = float(obj(params))
    assert ada < 1e-3 * start, (ada, start)
    assert ada < 0.1 * sgd, (ada, sgd)
