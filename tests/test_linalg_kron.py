"""Damped Kronecker-factored solves of ``sofim_optax.linalg`` against dense references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sofim_optax import linalg


def _spd(
    rng: np.random.Generator, n: int, rank: int | None = None, scale: float = 1.0
) -> np.ndarray:
    rank = n if rank is None else rank
    m = rng.standard_normal((n, rank)) * scale
    return m @ m.T / rank


def _dense_reference(A, G, V, damping, pi_adjusted):
    """(A_d ⊗ G_d)⁻¹ vec_r(V) with an explicit Kronecker product, in float64."""
    A, G, V = (np.asarray(t, np.float64) for t in (A, G, V))
    pi = np.sqrt((np.trace(A) / A.shape[0]) / (np.trace(G) / G.shape[0])) if pi_adjusted else 1.0
    Ad = A + pi * np.sqrt(damping) * np.eye(A.shape[0])
    Gd = G + np.sqrt(damping) / pi * np.eye(G.shape[0])
    x = np.linalg.solve(np.kron(Ad, Gd), V.reshape(-1))
    return x.reshape(V.shape)


def test_row_major_vec_convention():
    rng = np.random.default_rng(0)
    A, G, X = rng.standard_normal((3, 3)), rng.standard_normal((4, 4)), rng.standard_normal((3, 4))
    np.testing.assert_allclose(np.kron(A, G) @ X.reshape(-1), (A @ X @ G.T).reshape(-1), rtol=1e-12)


@pytest.mark.parametrize("pi_adjusted", [True, False])
@pytest.mark.parametrize("shape", [(5, 3), (2, 7), (4, 4)])
def test_damped_kron_solve_matches_dense(x64, pi_adjusted, shape):
    rng = np.random.default_rng(1)
    m, n = shape
    # Different scales for the two factors so that π is far from one.
    A, G = _spd(rng, m, scale=3.0), _spd(rng, n, rank=max(1, n - 1), scale=0.1)
    V = rng.standard_normal((m, n))
    damping = 0.05
    got = linalg.damped_kron_solve(
        jnp.asarray(A), jnp.asarray(G), jnp.asarray(V), damping, pi_adjusted
    )
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(
        got, _dense_reference(A, G, V, damping, pi_adjusted), rtol=1e-9, atol=1e-12
    )
    # It solves the damped Kronecker system in the row-major convention.
    sa, sg = linalg.factored_damping(np.trace(A), m, np.trace(G), n, damping, pi_adjusted)
    Ad, Gd = A + float(sa) * np.eye(m), G + float(sg) * np.eye(n)
    np.testing.assert_allclose(Ad @ np.asarray(got) @ Gd.T, V, rtol=1e-9, atol=1e-10)


def test_damped_kron_solve_float32_close_to_float64():
    rng = np.random.default_rng(2)
    A, G, V = _spd(rng, 6), _spd(rng, 3), rng.standard_normal((6, 3))
    got = linalg.damped_kron_solve(
        A.astype(np.float32), G.astype(np.float32), V.astype(np.float32), 1e-2
    )
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, _dense_reference(A, G, V, 1e-2, True), rtol=2e-4, atol=1e-5)


def test_eigh_form_and_vmap(x64):
    rng = np.random.default_rng(3)
    As = np.stack([_spd(rng, 4) for _ in range(3)])
    Gs = np.stack([_spd(rng, 2) for _ in range(3)])
    Vs = rng.standard_normal((3, 4, 2))
    dampings = np.array([1e-3, 1e-1, 1.0])
    got = jax.vmap(linalg.damped_kron_solve)(As, Gs, Vs, dampings)
    via_eigh = jax.vmap(
        lambda a, g, v, d: linalg.damped_kron_solve_eigh(
            jnp.linalg.eigh(a), jnp.linalg.eigh(g), v, d
        )
    )(As, Gs, Vs, dampings)
    for i in range(3):
        ref = _dense_reference(As[i], Gs[i], Vs[i], dampings[i], True)
        np.testing.assert_allclose(got[i], ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(via_eigh[i], ref, rtol=1e-9, atol=1e-12)


def test_factored_damping_values_and_guards(x64):
    sa, sg = linalg.factored_damping(8.0, 2, 1.0, 4, 0.04)  # π = sqrt(4 / 0.25) = 4
    np.testing.assert_allclose([sa, sg], [4 * 0.2, 0.2 / 4])
    sa, sg = linalg.factored_damping(8.0, 2, 1.0, 4, 0.04, pi_adjusted=False)
    np.testing.assert_allclose([sa, sg], [0.2, 0.2])
    # Zero, negative, infinite or NaN traces: π = 1.
    for ta, tg in [(0.0, 1.0), (1.0, 0.0), (-1.0, 1.0), (np.inf, 1.0), (1.0, np.nan)]:
        sa, sg = linalg.factored_damping(ta, 3, tg, 3, 0.04)
        np.testing.assert_allclose([sa, sg], [0.2, 0.2])
    # Extreme but valid traces: π clipped to PI_RANGE.
    sa, sg = linalg.factored_damping(1e30, 1, 1e-30, 1, 1.0)
    np.testing.assert_allclose([sa, sg], [linalg.PI_RANGE[1], 1 / linalg.PI_RANGE[1]])
    # Damping floored.
    sa, sg = linalg.factored_damping(1.0, 1, 1.0, 1, 0.0)
    np.testing.assert_allclose(sa * sg, linalg.DAMPING_FLOOR)


@pytest.mark.parametrize("pi_adjusted", [True, False])
def test_solve_is_finite_for_singular_factors_and_zero_damping(pi_adjusted):
    A = jnp.zeros((3, 3), jnp.float32).at[0, 0].set(1.0)  # rank one
    G = jnp.zeros((2, 2), jnp.float32)  # all zero: π falls back to 1
    V = jnp.ones((3, 2), jnp.float32)
    out = linalg.damped_kron_solve(A, G, V, 0.0, pi_adjusted)
    assert bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("method", ["cholesky", "inv", "eigh"])
def test_damped_inverse(x64, method):
    rng = np.random.default_rng(4)
    F = _spd(rng, 5, rank=2)
    got = linalg.damped_inverse(jnp.asarray(F), 0.3, method)
    np.testing.assert_allclose(got, np.linalg.inv(F + 0.3 * np.eye(5)), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got, np.asarray(got).T)
    with pytest.raises(ValueError, match="method"):
        linalg.damped_inverse(jnp.asarray(F), 0.3, "qr")


def test_shape_errors():
    with pytest.raises(ValueError, match="square"):
        linalg.damped_kron_solve(jnp.ones((2, 3)), jnp.eye(2), jnp.ones((2, 2)), 1.0)
    with pytest.raises(ValueError, match=r"\(dim A, dim G\)"):
        linalg.damped_kron_solve(jnp.eye(2), jnp.eye(3), jnp.ones((3, 2)), 1.0)
