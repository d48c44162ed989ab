"""Nyström-SGD (``sofim_optax.nystrom_sgd``) against dense float64 references (the
common optax checks: ``tests/test_conformance.py``).

Quadratics ``½ xᵀAx − bᵀx`` over a small parameter pytree have the known Hessian ``A``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sofim_optax.nystrom_sgd import (
    nystrom_sgd,
    nystrom_sketch,
    nystrom_solve,
    scale_by_nystrom_sgd,
)


def arr(x, dtype=jnp.float32):
    return jnp.asarray(np.asarray(x).astype(dtype))


SHAPES = {"w": (3, 2), "b": (3,)}  # d = 9
D = 9


def quadratic(seed, dtype=jnp.float64, rank=None, indefinite=False):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    eig = np.logspace(-2, 1, D)
    if rank is not None:
        eig[: D - rank] = 0.0
    if indefinite:
        eig[:3] = -eig[:3]
    a = (q * eig) @ q.T
    b = rng.standard_normal(D)
    params = {k: arr(rng.standard_normal(s), dtype) for k, s in SHAPES.items()}
    a_, b_ = arr(a, dtype), arr(b, dtype)

    def obj(p):
        x = jax.flatten_util.ravel_pytree(p)[0]
        return 0.5 * x @ a_ @ x - b_ @ x

    return a, params, obj


def flat(tree):
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0], np.float64)


def test_sketch_exact_at_full_rank_and_for_low_rank_matrices(x64):
    a, _, _ = quadratic(0)
    a_low, _, _ = quadratic(1, rank=3)
    a_ind, _, _ = quadratic(2, indefinite=True)
    cases = [
        ("full/gaussian", a, D, "gaussian"),
        ("full/coordinates", a, D, "coordinates"),
        ("rank3/gaussian", a_low, 3, "gaussian"),
        ("indefinite", a_ind, 5, "gaussian"),
    ]

    @jax.jit
    def run(key):
        return [
            nystrom_sketch(lambda v, m=arr(m, jnp.float64): m @ v, D, r, key, jnp.float64, tm)
            for _, m, r, tm in cases
        ]

    for (name, m, r, _), (v, lam) in zip(cases, run(jax.random.PRNGKey(0))):
        v, lam = np.asarray(v), np.asarray(lam)
        assert v.shape == (D, r) and lam.shape == (r,) and v.dtype == np.float64
        np.testing.assert_allclose(v.T @ v, np.eye(r), atol=1e-10, err_msg=name)
        approx = (v * lam) @ v.T
        if name == "indefinite":
            assert np.all(lam >= 0) and np.all(np.isfinite(approx))
            assert np.linalg.eigvalsh(approx).min() > -1e-10  # positive semi-definite
        else:
            np.testing.assert_allclose(approx, m, atol=1e-10 * np.abs(m).max(), err_msg=name)


def test_low_rank_sketch_is_psd_and_below_a_psd_matrix(x64):
    """For PSD A the Nyström approximation satisfies 0 ⪯ Â ⪯ A."""
    a, _, _ = quadratic(3)
    v, lam = jax.jit(
        lambda k: nystrom_sketch(lambda x: arr(a, jnp.float64) @ x, D, 4, k, jnp.float64)
    )(jax.random.PRNGKey(1))
    approx = (np.asarray(v) * np.asarray(lam)) @ np.asarray(v).T
    assert np.linalg.eigvalsh(approx).min() > -1e-10
    assert np.linalg.eigvalsh(a - approx).min() > -1e-10


def test_woodbury_solve_matches_dense(x64):
    rng = np.random.default_rng(0)
    v, _ = np.linalg.qr(rng.standard_normal((D, 4)))
    lam, g, rho = rng.uniform(0, 5, 4), rng.standard_normal(D), 0.3
    got = nystrom_solve(arr(v, jnp.float64), arr(lam, jnp.float64), rho, arr(g, jnp.float64))
    want = np.linalg.solve((v * lam) @ v.T + rho * np.eye(D), g)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_step_equals_dense_regularised_newton_at_full_rank(x64):
    a, params, obj = quadratic(4)
    rho = 0.05
    grads = jax.grad(obj)(params)
    txs = {
        "fixed": scale_by_nystrom_sgd(rank=D, damping=rho, auto_step=False),
        "coordinates": scale_by_nystrom_sgd(
            rank=D, damping=rho, auto_step=False, test_matrix="coordinates"
        ),
        # ρ = 1 spreads the spectrum of P^{-1/2} A P^{-1/2} so the power method converges.
        "auto": scale_by_nystrom_sgd(rank=D, damping=1.0, auto_step=True, power_iterations=200),
    }

    @jax.jit
    def run(grads):
        return {k: tx.update(grads, tx.init(params), params, obj_fn=obj) for k, tx in txs.items()}

    out = run(grads)
    for name, (u, state) in out.items():
        r = 1.0 if name == "auto" else rho
        want = np.linalg.solve(a + r * np.eye(D), flat(grads))
        v, lam = np.asarray(state.eigvecs), np.asarray(state.eigvals)
        np.testing.assert_allclose((v * lam) @ v.T, a, atol=1e-10 * np.abs(a).max(), err_msg=name)
        scale = float(state.step_scale)
        if name == "auto":
            # 1/λ_max(P^{-1/2} A P^{-1/2}) with P = A + ρI: eigenvalues λ/(λ+ρ).
            eig = np.linalg.eigvalsh(a)
            assert scale == pytest.approx((eig.max() + 1.0) / eig.max(), rel=1e-6)
        else:
            assert scale == 1.0
        np.testing.assert_allclose(flat(u), scale * want, rtol=1e-8, err_msg=name)
        assert u["w"].shape == (3, 2) and u["w"].dtype == jnp.float64


def test_refresh_period_semantics(x64):
    _, params, obj = quadratic(5)
    tx = scale_by_nystrom_sgd(rank=3, damping=0.1, stats_period=3, auto_step=False)
    seq = [jax.tree.map(lambda x, i=i: x + 0.1 * i, params) for i in range(5)]  # moving parameters

    @jax.jit
    def run(seq):
        s, out = tx.init(params), []
        for p in seq:
            u, s = tx.update(jax.grad(obj)(p), s, p, obj_fn=obj)
            out.append((u, s))
        return out

    out = run(seq)
    keys = [np.asarray(s.key) for _, s in out]
    vecs = [np.asarray(s.eigvecs) for _, s in out]
    for t in (1, 2, 4):
        np.testing.assert_array_equal(vecs[t], vecs[t - 1])
        np.testing.assert_array_equal(keys[t], keys[t - 1])
    assert not np.array_equal(vecs[3], vecs[2]) and not np.array_equal(keys[3], keys[2])
    # Between refreshes the step uses the stored sketch.
    for (u, s), p in zip(out, seq):
        v, lam = np.asarray(s.eigvecs), np.asarray(s.eigvals)
        want = np.linalg.solve((v * lam) @ v.T + 0.1 * np.eye(D), flat(jax.grad(obj)(p)))
        np.testing.assert_allclose(flat(u), want, rtol=1e-8)
    assert int(out[-1][1].count) == 5


def test_errors():
    _, params, obj = quadratic(0, jnp.float32)
    tx = scale_by_nystrom_sgd(rank=2)
    state = jax.eval_shape(tx.init, params)
    with pytest.raises(TypeError, match="obj_fn"):
        jax.eval_shape(tx.update, params, state, params)
    with pytest.raises(ValueError, match="rank=20 exceeds"):
        jax.eval_shape(scale_by_nystrom_sgd(rank=20).init, params)
    for kwargs, err, match in [
        ({"rank": 0}, ValueError, "rank"),
        ({"rank": 2.5}, TypeError, "static_args"),
        ({"damping": 0.0}, ValueError, "damping"),
        ({"stats_period": 0}, ValueError, "stats_period"),
        ({"test_matrix": "sparse"}, ValueError, "test_matrix"),
    ]:
        with pytest.raises(err, match=match):
            scale_by_nystrom_sgd(**kwargs)


# ----------------------------------------------------------------------------------------
# optax conformance.
# ----------------------------------------------------------------------------------------


def _problem(dtype=jnp.float32):
    rng = np.random.default_rng(1)
    params = {"w": arr(0.5 * rng.standard_normal((4, 3)), dtype), "b": arr(np.zeros(3), dtype)}
    x = arr(rng.standard_normal((6, 4)), dtype)

    def obj(p):
        return jnp.mean(jnp.tanh(x @ p["w"] + p["b"]) ** 2).astype(jnp.float32) + 0.01 * jnp.sum(
            p["w"].astype(jnp.float32) ** 2
        )

    return params, obj


def test_beats_sgd_on_ill_conditioned_quadratic():
    a, params, obj = quadratic(6, jnp.float32)  # condition number 1e3

    def run(opt, steps=30):
        def body(carry, _):
            p, s = carry
            u, s = opt.update(jax.grad(obj)(p), s, p, obj_fn=obj)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(body, (params, opt.init(params)), None, length=steps)
        return obj(p)

    nys, sgd = (
        float(x)
        for x in jax.jit(
            lambda: [run(nystrom_sgd(1.0, rank=D, damping=1e-3)), run(optax.sgd(0.19))]
        )()
    )
    best = float(-0.5 * flat_b(6) @ np.linalg.solve(a, flat_b(6)))
    assert nys - best < 1e-3 * abs(best), (nys, best)
    assert nys - best < 0.01 * (sgd - best), (nys, sgd, best)


def flat_b(seed):
    rng = np.random.default_rng(seed)
    rng.standard_normal((D, D))
    return rng.standard_normal(D)
