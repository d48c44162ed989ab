"""``sofim_optax.linalg.kronecker_svd`` against dense float64 references (numpy, scipy).

Explicit Fisher blocks ``F = mean_n kron(ā āᵀ, g gᵀ)``, their explicit rearrangement, numpy's
SVD of it, and dense solves with explicit Kronecker products.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from sofim_optax import linalg


def samples(seed, m=12, d_a=5, d_g=4):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, d_a)) + 0.4 * rng.standard_normal(d_a)
    a[:, -1] = 1.0  # homogeneous coordinate
    g = rng.standard_normal((m, d_g)) * rng.uniform(0.2, 2.0, (m, 1))
    return a, g


def dense_fisher(a, g):
    return sum(np.kron(np.outer(x, x), np.outer(y, y)) for x, y in zip(a, g)) / len(a)


def explicit_rearrangement(F, d_a, d_g):
    """Element by element: row (i, j) of 𝓡(F) is vec of the (i, j) block of F."""
    out = np.zeros((d_a * d_a, d_g * d_g))
    for i in range(d_a):
        for j in range(d_a):
            out[i * d_a + j] = F[i * d_g : (i + 1) * d_g, j * d_g : (j + 1) * d_g].reshape(-1)
    return out


def kron_sum(pairs):
    return sum(np.kron(np.asarray(R, np.float64), np.asarray(S, np.float64)) for R, S in pairs)


def test_rearrange_and_matrix_free_products(x64):
    a, g = samples(0)
    d_a, d_g = a.shape[1], g.shape[1]
    F = dense_fisher(a, g)
    RF = explicit_rearrangement(F, d_a, d_g)
    np.testing.assert_allclose(
        linalg.rearrange(jnp.asarray(F), d_a, d_g), RF, rtol=1e-13, atol=1e-13
    )
    rng = np.random.default_rng(1)
    R, S = rng.standard_normal((d_a, d_a)), rng.standard_normal((d_g, d_g))
    np.testing.assert_allclose(
        explicit_rearrangement(np.kron(R, S), d_a, d_g),
        np.outer(R.reshape(-1), S.reshape(-1)),
        rtol=1e-13,
    )
    assert np.linalg.norm(RF) == pytest.approx(np.linalg.norm(F), rel=1e-12)
    V, U = rng.standard_normal((d_g, d_g)), rng.standard_normal((d_a, d_a))  # not symmetric
    np.testing.assert_allclose(
        np.asarray(linalg.rearranged_matvec(a, g, V)).reshape(-1),
        RF @ V.reshape(-1),
        rtol=1e-12,
        atol=1e-12,
    )
    np.testing.assert_allclose(
        np.asarray(linalg.rearranged_rmatvec(a, g, U)).reshape(-1),
        RF.T @ U.reshape(-1),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_top_two_triplets_match_numpy_svd(x64, method):
    a, g = samples(4, m=15, d_a=6, d_g=4)
    d_a, d_g = a.shape[1], g.shape[1]
    A, G = a.T @ a / len(a), g.T @ g / len(g)  # KFAC's factors
    RF = explicit_rearrangement(dense_fisher(a, g), d_a, d_g)
    u, s, vt = np.linalg.svd(RF)
    assert s[1] > 1.2 * s[2]  # a well-separated second triplet

    @jax.jit
    def run(a, g):
        nk = lambda rank, **kw: linalg.nearest_kronecker(
            a, g, rank=rank, method=method, tol=1e-12, max_iters=3000, return_info=True, **kw
        )
        return nk(2), nk(1)[0], nk(1, subtract=(A, G))[0]

    (pairs, info), rank1, corrected = run(a, g)
    np.testing.assert_allclose(info["singular_values"], s[:2], rtol=1e-8)
    for k, (R, S) in enumerate(pairs):
        # Sign-free comparison of the triplet σ u vᵀ, and the balanced split.
        np.testing.assert_allclose(
            np.outer(np.asarray(R).reshape(-1), np.asarray(S).reshape(-1)),
            s[k] * np.outer(u[:, k], vt[k]),
            atol=1e-8 * s[0],
            err_msg=f"term {k}",
        )
        assert np.linalg.norm(R) == pytest.approx(np.linalg.norm(S), rel=1e-10)
        np.testing.assert_allclose(R, np.asarray(R).T, atol=1e-12)
    # The top pair is PSD (oriented with tr R ≥ 0).
    R1, S1 = (np.asarray(x) for x in pairs[0])
    assert np.linalg.eigvalsh(R1).min() > -1e-10 and np.linalg.eigvalsh(S1).min() > -1e-10
    # rank 1 gives the same top triplet.
    np.testing.assert_allclose(np.kron(*rank1[0]), np.kron(R1, S1), atol=1e-8 * s[0])
    # subtract=(A, G): the top triplet of 𝓡(F) − vec(A)vec(G)ᵀ.
    uc, sc, vtc = np.linalg.svd(RF - np.outer(A.reshape(-1), G.reshape(-1)))
    R, S = corrected[0]
    np.testing.assert_allclose(
        np.outer(np.asarray(R).reshape(-1), np.asarray(S).reshape(-1)),
        sc[0] * np.outer(uc[:, 0], vtc[0]),
        atol=1e-8 * sc[0],
    )


def test_errors_kpsvd_below_kfac_and_rank_two_below_rank_one(x64):
    data = [samples(seed, m=9, d_a=5, d_g=3) for seed in range(10, 14)]
    a_all, g_all = np.stack([d[0] for d in data]), np.stack([d[1] for d in data])

    @jax.jit
    @jax.vmap  # one compilation for every seed
    def run(a, g):
        out = {}
        for method in ("power", "lanczos"):
            for rank in (1, 2):
                out[f"{method}{rank}"] = linalg.nearest_kronecker(
                    a, g, rank, method, tol=1e-10, max_iters=2000
                )
        A, G = a.T @ a / a.shape[0], g.T @ g / g.shape[0]
        out["corrected"] = linalg.nearest_kronecker(
            a, g, 1, tol=1e-10, max_iters=2000, subtract=(A, G)
        )
        return out

    out = run(a_all, g_all)
    for n, (a, g) in enumerate(data):
        F = dense_fisher(a, g)
        kfac = np.kron(a.T @ a / len(a), g.T @ g / len(g))
        err = lambda approx: np.linalg.norm(F - approx)
        s = np.linalg.svd(explicit_rearrangement(F, 5, 3), compute_uv=False)
        pick = lambda pairs: [(R[n], S[n]) for R, S in pairs]
        for method in ("power", "lanczos"):
            e_kfac, e1, e2 = (
                err(kfac),
                err(kron_sum(pick(out[f"{method}1"]))),
                err(kron_sum(pick(out[f"{method}2"]))),
            )
            assert e1 <= e_kfac * (1 + 1e-9) and e2 <= e1 * (1 + 1e-9), (method, e_kfac, e1, e2)
            # Eckart–Young: the optimal errors are the tails of the singular values.
            assert e1 == pytest.approx(np.sqrt(np.sum(s[1:] ** 2)), rel=1e-6)
            assert e2 == pytest.approx(np.sqrt(np.sum(s[2:] ** 2)), rel=1e-6)
        # KFAC-corrected: A⊗G + R⊗S is at least as good as KFAC.
        assert err(kfac + kron_sum(pick(out["corrected"]))) <= err(kfac)


def test_warm_start_cap_sign_and_float32():
    a, g = samples(4, m=40, d_a=7, d_g=5)
    a32, g32 = jnp.asarray(a, jnp.float32), jnp.asarray(g, jnp.float32)
    run = jax.jit(
        lambda a, g, init, cap: linalg.nearest_kronecker(
            a, g, 2, "power", 1e-5, cap, init=init, return_info=True
        )
    )
    zeros = [jnp.zeros((5, 5)), jnp.zeros((5, 5))]
    pairs, info = run(a32, g32, zeros, 1000)
    assert all(x.dtype == jnp.float32 for p in pairs for x in p)
    assert np.all(np.asarray(info["residual"]) <= 1e-5)
    cold = np.asarray(info["iterations"])
    # Warm start from the answer: converged at once; from its negative: same product, flipped factors.
    warm, info_w = run(a32, g32, [p[1] for p in pairs], 1000)
    assert np.all(np.asarray(info_w["iterations"]) <= np.minimum(cold, 2))
    flipped, _ = run(a32, g32, [-p[1] for p in pairs], 1000)
    for (R, S), (Rw, Sw), (Rf, Sf) in zip(pairs, warm, flipped):
        np.testing.assert_allclose(Sw, S, atol=1e-4 * float(jnp.abs(S).max()))
        np.testing.assert_allclose(Rf, -np.asarray(R), atol=1e-4 * float(jnp.abs(R).max()))
        np.testing.assert_allclose(
            np.kron(Rf, Sf), np.kron(R, S), atol=1e-4 * float(np.abs(np.kron(R, S)).max())
        )
    # The cap is honoured (lax.while_loop under jit).
    _, info_cap = run(a32, g32, zeros, 2)
    assert np.all(np.asarray(info_cap["iterations"]) <= 2)


def test_degenerate_data_stays_finite():
    a, g = samples(5, m=1)  # one sample: 𝓡(F) has rank one, so the second term is zero

    @jax.jit
    def run(a, g):
        return {
            method: (
                linalg.nearest_kronecker(jnp.zeros((4, 3)), jnp.zeros((4, 2)), 2, method),
                linalg.nearest_kronecker(a, g, 2, method),
            )
            for method in ("power", "lanczos")
        }

    for method, (zeros, (p1, p2)) in run(
        jnp.asarray(a, jnp.float32), jnp.asarray(g, jnp.float32)
    ).items():
        for R, S in zeros:
            assert np.all(np.asarray(R) == 0) and np.all(np.asarray(S) == 0), method
        np.testing.assert_allclose(
            np.kron(*p1), dense_fisher(a, g), rtol=1e-4, atol=1e-5, err_msg=method
        )
        assert np.all(np.isfinite(np.asarray(p2[0]))) and np.abs(np.kron(*p2)).max() < 1e-3, method


def test_nearest_kronecker_errors():
    a, g = jnp.ones((4, 3)), jnp.ones((4, 2))
    with pytest.raises(ValueError, match="method"):
        linalg.nearest_kronecker(a, g, method="svd")
    with pytest.raises(ValueError, match="rank"):
        linalg.nearest_kronecker(a, g, rank=0)
    with pytest.raises(ValueError, match="same number m"):
        linalg.nearest_kronecker(a, jnp.ones((5, 2)))
    with pytest.raises(ValueError, match="subtract"):
        linalg.nearest_kronecker(a, g, subtract=(jnp.eye(2), jnp.eye(2)))
    with pytest.raises(ValueError, match="init"):
        linalg.nearest_kronecker(a, g, init=jnp.eye(3))
    with pytest.raises(ValueError, match="krylov_dim"):
        linalg.nearest_kronecker(a, g, rank=2, method="lanczos", krylov_dim=1)


# ----------------------------------------------------------------------------------------
# kron_sum_solve.
# ----------------------------------------------------------------------------------------


def _spd(rng, n, scale=1.0):
    m = rng.standard_normal((n, n + 1)) * scale
    return m @ m.T / (n + 1)


def _sym(rng, n, scale=1.0):
    m = rng.standard_normal((n, n)) * scale
    return (m + m.T) / 2


def _first_term(A1, G1, damping, pi_adjusted):
    pi = np.sqrt((np.trace(A1) / len(A1)) / (np.trace(G1) / len(G1))) if pi_adjusted else 1.0
    return A1 + pi * np.sqrt(damping) * np.eye(len(A1)), G1 + np.sqrt(damping) / pi * np.eye(
        len(G1)
    )


@pytest.mark.parametrize("pi_adjusted", [True, False])
def test_kron_sum_solve_matches_dense_solve(x64, pi_adjusted):
    rng = np.random.default_rng(0)
    A1, G1 = _spd(rng, 5, 2.0), _spd(rng, 3, 0.2)
    A2, G2 = _spd(rng, 5, 0.5), _spd(rng, 3, 0.1)  # PSD second term: all modes are exact
    V = rng.standard_normal((5, 3))
    damping = 0.03
    A1d, G1d = _first_term(A1, G1, damping, pi_adjusted)
    op = np.kron(A1d, G1d) + np.kron(A2, G2)
    want = np.linalg.solve(op, V.reshape(-1)).reshape(V.shape)
    for mode in linalg.INDEFINITE_MODES:
        got = linalg.kron_sum_solve(A1, G1, A2, G2, V, damping, pi_adjusted, mode)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=mode)
    # A zero second term gives KFAC's damped solve.
    zero = linalg.kron_sum_solve(A1, G1, 0 * A2, 0 * G2, V, damping, pi_adjusted)
    np.testing.assert_allclose(
        zero, linalg.damped_kron_solve(A1, G1, V, damping, pi_adjusted), rtol=1e-9
    )


def test_generalized_eigh_against_scipy(x64):
    rng = np.random.default_rng(1)
    F1, F2, shift = _spd(rng, 6), _sym(rng, 6), 0.1
    K, s = linalg.generalized_eigh(F1, F2, shift)
    want = scipy.linalg.eigh(F2, F1 + shift * np.eye(6), eigvals_only=True)
    np.testing.assert_allclose(s, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        np.asarray(K).T @ (F1 + shift * np.eye(6)) @ K, np.eye(6), atol=1e-10
    )
    np.testing.assert_allclose(np.asarray(K).T @ F2 @ K, np.diag(s), atol=1e-10)


def test_kron_sum_solve_indefinite_second_term(x64):
    """An indefinite A2 ⊗ G2 large enough that the damped sum is indefinite.

    Reference: scipy's generalised eigendecompositions give the explicit operator
    (K1 ⊗ K2)^{-ᵀ} diag(D) (K1 ⊗ K2)^{-1} of each mode, formed densely and solved.
    """
    rng = np.random.default_rng(2)
    A1, G1 = _spd(rng, 4), _spd(rng, 3)
    A2, G2 = _sym(rng, 4, 2.0), _sym(rng, 3, 2.0)
    V = rng.standard_normal((4, 3))
    damping = 1e-2
    A1d, G1d = _first_term(A1, G1, damping, True)
    exact_op = np.kron(A1d, G1d) + np.kron(A2, G2)
    assert np.linalg.eigvalsh(exact_op).min() < 0  # the case that needs a rule
    s1, K1 = scipy.linalg.eigh(A2, A1d)
    s2, K2 = scipy.linalg.eigh(G2, G1d)
    Kinv = np.linalg.inv(np.kron(K1, K2))
    prod = np.outer(s1, s2).reshape(-1)
    refs = {
        "abs": 1 + np.abs(prod),
        "clip": 1 + np.maximum(prod, 0),
    }
    for mode, diag in refs.items():
        op = Kinv.T @ np.diag(diag) @ Kinv
        assert np.linalg.eigvalsh((op + op.T) / 2).min() > 0, mode  # positive definite
        want = np.linalg.solve(op, V.reshape(-1)).reshape(V.shape)
        got = linalg.kron_sum_solve(A1, G1, A2, G2, V, damping, indefinite=mode)
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10, err_msg=mode)
        # Equal to the exact operator on the directions where s1_i s2_j ≥ 0.
        np.testing.assert_allclose(
            op @ np.kron(K1, K2)[:, prod >= 0], exact_op @ np.kron(K1, K2)[:, prod >= 0], atol=1e-9
        )
    # Every denominator ≥ 1: the step is never longer, in the K-basis, than the first term's.
    got = np.asarray(linalg.kron_sum_solve(A1, G1, A2, G2, V, damping, indefinite="abs"))
    first_only = np.asarray(linalg.kron_sum_solve(A1, G1, 0 * A2, 0 * G2, V, damping))
    assert np.all(np.isfinite(got))
    y_got, y_first = (
        np.linalg.solve(np.kron(K1, K2), got.reshape(-1)),
        np.linalg.solve(np.kron(K1, K2), first_only.reshape(-1)),
    )
    assert np.all(np.abs(y_got) <= np.abs(y_first) + 1e-12)
    # "exact" is the exact inverse where it exists.
    got = linalg.kron_sum_solve(A1, G1, A2, G2, V, damping, indefinite="exact")
    np.testing.assert_allclose(
        got, np.linalg.solve(exact_op, V.reshape(-1)).reshape(V.shape), rtol=1e-7, atol=1e-9
    )


def test_kron_sum_solve_float32_and_errors():
    rng = np.random.default_rng(3)
    A1, G1, A2, G2 = _spd(rng, 4), _spd(rng, 3), _sym(rng, 4), _sym(rng, 3)
    V = rng.standard_normal((4, 3))
    f32 = [jnp.asarray(x, jnp.float32) for x in (A1, G1, A2, G2, V)]
    got = jax.jit(linalg.kron_sum_solve)(*f32, 0.1)
    assert got.dtype == jnp.float32
    with jax.enable_x64(True):
        want = linalg.kron_sum_solve(A1, G1, A2, G2, V, 0.1)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    # Zero factors and zero damping: finite (damping floor).
    z = jnp.zeros((4, 4)), jnp.zeros((3, 3))
    assert np.all(
        np.isfinite(np.asarray(linalg.kron_sum_solve(z[0], z[1], z[0], z[1], f32[4], 0.0)))
    )
    with pytest.raises(ValueError, match="indefinite"):
        linalg.kron_sum_solve(*f32, 0.1, indefinite="negate")
    with pytest.raises(ValueError, match="V must have shape"):
        linalg.kron_sum_solve(*f32[:4], f32[4].T, 0.1)
