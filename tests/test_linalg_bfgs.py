"""``sofim_optax.linalg.bfgs`` against float64 numpy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sofim_optax import linalg


def ref_bfgs(H, s, y):
    """The product form (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ, float64."""
    rho = 1.0 / (s @ y)
    E = np.eye(len(s)) - rho * np.outer(s, y)
    return E @ H @ E.T + rho * np.outer(s, s)


def ref_two_loop(S, Y, v, gamma):
    """Textbook two-loop recursion over the rows of S, Y (oldest first), numpy float64."""
    q = v.copy()
    alphas = []
    for s, y in reversed(list(zip(S, Y))):
        a = (s @ q) / (s @ y)
        alphas.append(a)
        q = q - a * y
    r = gamma * q
    for (s, y), a in zip(zip(S, Y), reversed(alphas)):
        b = (y @ r) / (s @ y)
        r = r + s * (a - b)
    return r


def spd(rng, d):
    m = rng.standard_normal((d, d))
    return m @ m.T / d + 0.5 * np.eye(d)


def pairs(rng, m, d):
    """Pairs with sᵀy > 0 from a random SPD 'Hessian' plus noise."""
    B = spd(rng, d)
    S = rng.standard_normal((m, d))
    Y = S @ B + 0.05 * rng.standard_normal((m, d))
    assert np.all(np.sum(S * Y, 1) > 0)
    return S, Y


def test_secant_equation_and_product_form(x64):
    rng = np.random.default_rng(0)
    for d in (1, 3, 7):
        H = spd(rng, d)
        s, y = pairs(rng, 1, d)
        s, y = s[0], y[0]
        Hn = np.asarray(
            jax.jit(linalg.bfgs_inverse_update)(jnp.asarray(H), jnp.asarray(s), jnp.asarray(y))
        )
        np.testing.assert_allclose(Hn @ y, s, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(Hn, ref_bfgs(H, s, y), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(Hn, Hn.T, rtol=1e-13, atol=1e-15)
        assert np.linalg.eigvalsh(Hn).min() > 0


def test_secant_equation_float32():
    rng = np.random.default_rng(1)
    H = spd(rng, 6)
    s, y = pairs(rng, 1, 6)
    Hn = np.asarray(
        linalg.bfgs_inverse_update(
            jnp.asarray(H, jnp.float32),
            jnp.asarray(s[0], jnp.float32),
            jnp.asarray(y[0], jnp.float32),
        )
    )
    assert Hn.dtype == np.float32
    np.testing.assert_allclose(Hn @ y[0], s[0], rtol=1e-4, atol=1e-4)


def _damp(s, y, H, mu1, mu2):
    out = jax.jit(linalg.double_damping)(
        jnp.asarray(s), jnp.asarray(y), jnp.asarray(H @ y), mu1, mu2
    )
    return tuple(np.asarray(x) for x in out)


def ref_double_damping(s, y, H, mu1, mu2):
    """The authors' code, literally (non-degenerate inputs)."""
    Hy = H @ y
    sy, yHy = s @ y, y @ Hy
    if not sy / yHy > mu1:
        t = (1 - mu1) * yHy / (yHy - sy)
        s = t * s + (1 - t) * Hy
    ss, sy = s @ s, s @ y
    if not sy / ss > mu2:
        t = (1 - mu2) * ss / (ss - sy)
        y = t * y + (1 - t) * s
    return s, y


@pytest.mark.parametrize("mu2", [0.1, 0.5, 3.0])
def test_double_damping_bounds_and_reference(x64, mu2):
    rng = np.random.default_rng(2)
    mu1 = 0.2
    n_damped = [0, 0]
    for trial in range(40):
        d = 5
        H = spd(rng, d)
        s = rng.standard_normal(d)
        y = rng.standard_normal(d) * rng.choice([0.01, 1.0, 10.0])  # any sign of sᵀy
        s2, y2 = _damp(s, y, H, mu1, mu2)
        assert s2 @ y2 >= mu2 * (s2 @ s2) * (1 - 1e-9), trial
        # After step 1 alone (y unchanged), sᵀy ≥ μ₁ yᵀHy.
        s1, _ = _damp(s, y, H, mu1, -np.inf)
        assert s1 @ y >= mu1 * (y @ H @ y) * (1 - 1e-9)
        want = ref_double_damping(s, y, H, mu1, mu2)
        np.testing.assert_allclose(s2, want[0], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(y2, want[1], rtol=1e-9, atol=1e-12)
        n_damped[0] += not np.allclose(s1, s)
        n_damped[1] += not np.allclose(y2, y)
    assert n_damped[0] > 0 and n_damped[1] > 0  # both branches were exercised
    # A pair that satisfies both conditions is unchanged.
    H = np.eye(3)
    s = np.array([1.0, 0.0, 0.0])
    s2, y2 = _damp(s, 2 * s, H, mu1, mu2)  # sᵀy/yᵀHy = 0.5 > μ₁; sᵀy/sᵀs = 2
    np.testing.assert_array_equal(s2, s)
    if mu2 < 2:
        np.testing.assert_array_equal(y2, 2 * s)


def test_double_damping_degenerate_inputs_are_finite(x64):
    H = np.eye(3)
    s = np.array([1.0, 2.0, 0.0])
    for y, mu2 in [
        (np.zeros(3), 0.5),
        (s.copy(), 2.0),
        (s.copy(), 1.0),
    ]:  # y = 0; sᵀy = sᵀs, μ₂ ≥ 1
        s2, y2 = _damp(s, y, H, 0.2, mu2)
        assert np.all(np.isfinite(s2)) and np.all(np.isfinite(y2))
        assert s2 @ y2 >= mu2 * (s2 @ s2) * (1 - 1e-9)
    s2, y2 = _damp(np.zeros(3), np.zeros(3), H, 0.2, 0.5)
    assert np.all(s2 == 0) and np.all(y2 == 0)


def dense_lbfgs(S, Y, mask, gamma):
    H = gamma * np.eye(S.shape[1])
    for s, y, ok in zip(S, Y, mask):
        if ok:
            H = ref_bfgs(H, s, y)
    return H


@pytest.mark.parametrize("method", ["compact", "two_loop"])
def test_lbfgs_matches_dense_recursion_and_two_loop(x64, method):
    rng = np.random.default_rng(3)
    m, d, k = 5, 6, 3
    S, Y = pairs(rng, m, d)
    masks = [
        np.ones(m, bool),
        np.array([0, 0, 1, 1, 1], bool),
        np.array([1, 0, 1, 0, 1], bool),
        np.zeros(m, bool),
    ]
    run = jax.jit(linalg.lbfgs_inverse_matvec, static_argnames="method")
    for mask in masks:
        for gamma in (1.0, 0.3):
            # Invalid rows hold garbage that must be ignored.
            Sg, Yg = S.copy(), Y.copy()
            Sg[~mask] = 1e3 * rng.standard_normal(((~mask).sum(), d))
            Yg[~mask] = -Sg[~mask]
            H = dense_lbfgs(S, Y, mask, gamma)
            v = rng.standard_normal(d)
            V = rng.standard_normal((d, k))
            got_v = np.asarray(
                run(
                    jnp.asarray(Sg),
                    jnp.asarray(Yg),
                    jnp.asarray(mask),
                    jnp.asarray(v),
                    gamma,
                    method=method,
                )
            )
            got_V = np.asarray(
                run(
                    jnp.asarray(Sg),
                    jnp.asarray(Yg),
                    jnp.asarray(mask),
                    jnp.asarray(V),
                    gamma,
                    method=method,
                )
            )
            np.testing.assert_allclose(got_v, H @ v, rtol=1e-9, atol=1e-10, err_msg=str(mask))
            np.testing.assert_allclose(got_V, H @ V, rtol=1e-9, atol=1e-10, err_msg=str(mask))
            np.testing.assert_allclose(
                got_v, ref_two_loop(S[mask], Y[mask], v, gamma), rtol=1e-9, atol=1e-10
            )


def test_lbfgs_ring_buffer_order(x64):
    """A ring buffer rolled so that the oldest pair comes first gives the chronological H."""
    rng = np.random.default_rng(4)
    m, d = 4, 5
    S, Y = pairs(rng, 6, d)  # 6 pairs into a ring of 4: slots hold pairs 4, 5, 2, 3
    ring_S, ring_Y = np.zeros((m, d)), np.zeros((m, d))
    head = 0
    for s, y in zip(S, Y):
        ring_S[head], ring_Y[head] = s, y
        head = (head + 1) % m
    mask = np.ones(m, bool)
    v = rng.standard_normal(d)
    H = dense_lbfgs(S[2:], Y[2:], mask, 1.0)  # the last four, oldest first
    got = linalg.lbfgs_inverse_matvec(
        jnp.roll(jnp.asarray(ring_S), -head, 0),
        jnp.roll(jnp.asarray(ring_Y), -head, 0),
        jnp.asarray(mask),
        jnp.asarray(v),
        1.0,
    )
    np.testing.assert_allclose(np.asarray(got), H @ v, rtol=1e-9)
    unrolled = linalg.lbfgs_inverse_matvec(
        jnp.asarray(ring_S), jnp.asarray(ring_Y), jnp.asarray(mask), jnp.asarray(v), 1.0
    )
    assert not np.allclose(np.asarray(unrolled), H @ v)  # order matters


def test_lbfgs_errors():
    with pytest.raises(ValueError, match="method"):
        linalg.lbfgs_inverse_matvec(
            jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones(2, bool), jnp.zeros(3), method="x"
        )
    with pytest.raises(ValueError, match="mask"):
        linalg.lbfgs_inverse_matvec(
            jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones(3, bool), jnp.zeros(3)
        )
    with pytest.raises(ValueError, match="v must be"):
        linalg.lbfgs_inverse_matvec(
            jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones(2, bool), jnp.zeros(4)
        )
