"""Tests of the rank-one linear algebra in ``sofim_optax.linalg``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sofim_optax import linalg


@pytest.mark.parametrize("d", [1, 3, 17])
@pytest.mark.parametrize("rho", [1e-3, 0.5, 10.0])
def test_sherman_morrison_matches_dense_solve(d, rho):
    rng = np.random.default_rng(d)
    u = rng.normal(size=d)
    v = rng.normal(size=d)
    with jax.enable_x64(True):
        dense = jnp.linalg.solve(rho * jnp.eye(d) + jnp.outer(u, u), v)
        ours = linalg.sherman_morrison_solve(jnp.asarray(u), rho, jnp.asarray(v))
        assert ours.dtype == jnp.float64
        np.testing.assert_allclose(ours, dense, rtol=1e-10, atol=1e-12)


def test_sherman_morrison_self_solve_has_no_cancellation_in_float32():
    # ‖u‖² = 1e6 times rho: the textbook form loses about 6 digits here.
    rng = np.random.default_rng(0)
    u64 = rng.normal(size=4096)
    u64 *= 10.0 / np.linalg.norm(u64)
    rho = 1e-4
    exact = u64 / (rho + u64 @ u64)
    u32 = jnp.asarray(u64, jnp.float32)
    ours = np.asarray(linalg.sherman_morrison_solve(u32, rho, u32), np.float64)
    np.testing.assert_allclose(ours, exact, rtol=1e-6)
    textbook = np.asarray(
        u32 / rho - u32 * jnp.vdot(u32, u32) / (rho * (rho + jnp.vdot(u32, u32))), np.float64
    )
    assert np.max(np.abs(textbook - exact) / np.abs(exact)) > 100 * np.max(
        np.abs(ours - exact) / np.abs(exact)
    )


def test_sherman_morrison_zero_direction_is_plain_ridge():
    v = jnp.arange(1.0, 4.0)
    np.testing.assert_allclose(linalg.sherman_morrison_solve(jnp.zeros(3), 2.0, v), v / 2.0)


def test_sherman_morrison_vmaps_over_blocks():
    rng = np.random.default_rng(1)
    u = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    batched = jax.vmap(linalg.sherman_morrison_solve, in_axes=(0, None, 0))(u, 0.3, v)
    for i in range(5):
        dense = np.linalg.solve(
            0.3 * np.eye(4) + np.outer(u[i], u[i]), np.asarray(v[i], np.float64)
        )
        np.testing.assert_allclose(batched[i], dense, rtol=2e-5, atol=1e-6)


def test_sherman_morrison_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="equal shape"):
        linalg.sherman_morrison_solve(jnp.ones(3), 1.0, jnp.ones(4))
    with pytest.raises(ValueError, match="equal shape"):
        linalg.sherman_morrison_solve(jnp.ones((2, 3)), 1.0, jnp.ones((2, 3)))
