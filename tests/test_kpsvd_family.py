"""KPSVD, Deflation, KFAC-corrected and Lanczos transformations against dense float64
references (explicit Fisher blocks, numpy SVD of their rearrangement, explicit Kronecker
solves); the common optax checks are in ``tests/test_conformance.py``.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sofim_optax
from sofim_optax.curvature import LayerStats
from sofim_optax.kpsvd import (
    kfac_corrected,
    kpsvd,
    kpsvd_deflation,
    kpsvd_lanczos,
    scale_by_kfac_corrected,
    scale_by_kpsvd,
    scale_by_kpsvd_deflation,
    scale_by_kpsvd_lanczos,
)

SCALES = {
    "kpsvd": scale_by_kpsvd,
    "deflation": scale_by_kpsvd_deflation,
    "kfac_corrected": scale_by_kfac_corrected,
    "lanczos": scale_by_kpsvd_lanczos,
}
ALIASES = {
    "kpsvd": kpsvd,
    "deflation": kpsvd_deflation,
    "kfac_corrected": kfac_corrected,
    "lanczos": kpsvd_lanczos,
}


def arr(x, dtype=jnp.float32):
    return jnp.asarray(np.asarray(x).astype(dtype))


def rand_stats(seed, n, d_in, d_out, t=None, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    shape = (n,) if t is None else (n, t)
    x = rng.standard_normal(shape + (d_in,)) + 0.3
    g = rng.standard_normal(shape + (d_out,)) * rng.uniform(0.3, 2.0, shape + (1,))
    return LayerStats(arr(x, dtype), arr(g, dtype), None)


def rand_like(seed, tree):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda l: arr(rng.standard_normal(l.shape), l.dtype), tree)


def grad_matrix(kernel, bias=None):
    v = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1])
    return v if bias is None else np.concatenate([v, np.asarray(bias, np.float64)[None]], axis=0)


# ----------------------------------------------------------------------------------------
# Independent dense float64 reference.
# ----------------------------------------------------------------------------------------


def ref_fisher(stats, has_bias):
    """F = (1/N) Σ_{n,t} kron(ā āᵀ, g gᵀ) (KFC's conv Fisher; t = 1 for dense), explicit loops."""
    a = np.asarray(stats.inputs, np.float64)
    g = np.asarray(stats.output_grads, np.float64)
    if a.ndim == 2:
        a, g = a[:, None], g[:, None]
    n, t = a.shape[:2]
    if has_bias:
        a = np.concatenate([a, np.ones((n, t, 1))], axis=-1)
    F = (
        sum(
            np.kron(np.outer(a[i, j], a[i, j]), np.outer(g[i, j], g[i, j]))
            for i in range(n)
            for j in range(t)
        )
        / n
    )
    A = sum(np.outer(a[i, j], a[i, j]) for i in range(n) for j in range(t)) / (n * t)
    G = sum(np.outer(g[i, j], g[i, j]) for i in range(n) for j in range(t)) / n
    return F, A, G, a.shape[-1], g.shape[-1]


def ref_terms(F, d_a, d_g, rank, subtract=None):
    RF = F.reshape(d_a, d_g, d_a, d_g).transpose(0, 2, 1, 3).reshape(d_a * d_a, d_g * d_g)
    if subtract is not None:
        RF = RF - np.outer(subtract[0].reshape(-1), subtract[1].reshape(-1))
    u, s, vt = np.linalg.svd(RF)
    out = []
    for k in range(rank):
        R, S = np.sqrt(s[k]) * u[:, k].reshape(d_a, d_a), np.sqrt(s[k]) * vt[k].reshape(d_g, d_g)
        if np.trace(R) < 0:
            R, S = -R, -S
        out.append((R, S))
    return out


def ref_update(kind, stats, has_bias, V, damping):
    F, A, G, d_a, d_g = ref_fisher(stats, has_bias)
    if kind == "kfac_corrected":
        first, second = (A, G), ref_terms(F, d_a, d_g, 1, subtract=(A, G))[0]
    elif kind == "kpsvd":
        first, second = ref_terms(F, d_a, d_g, 1)[0], (np.zeros((d_a, d_a)), np.zeros((d_g, d_g)))
    else:
        first, second = ref_terms(F, d_a, d_g, 2)
    R, S = first
    pi = np.sqrt((np.trace(R) / d_a) / (np.trace(S) / d_g))
    op = np.kron(R + pi * np.sqrt(damping) * np.eye(d_a), S + np.sqrt(damping) / pi * np.eye(d_g))
    op = op + np.kron(*second)
    return np.linalg.solve(op, V.reshape(-1)).reshape(V.shape)


LAYERS = {
    # name: (kernel shape, has bias, positions T or None)
    "dense": ((4, 3), True, None),
    "dense_nobias": ((3, 2), False, None),
    "conv": ((2, 1, 2, 3), True, 3),
}


def test_first_step_matches_dense_reference(x64):
    params, stats = {}, {}
    for i, (name, (kshape, has_bias, t)) in enumerate(LAYERS.items()):
        params[name] = {"kernel": arr(np.zeros(kshape), jnp.float64)}
        if has_bias:
            params[name]["bias"] = arr(np.zeros(kshape[-1]), jnp.float64)
        stats[name] = rand_stats(i, 6, int(np.prod(kshape[:-1])), kshape[-1], t, jnp.float64)
    grads = rand_like(7, params)
    damping = 0.05
    # "exact" inverts the approximation itself (the "abs" rule is tested in test_linalg_kronecker_svd).
    txs = {
        kind: make(
            damping=damping,
            tol=1e-13,
            max_iters=5000,
            **({} if kind == "kpsvd" else {"indefinite": "exact"}),
        )
        for kind, make in SCALES.items()
    }
    run = jax.jit(
        lambda g, p, s: {k: tx.update(g, tx.init(p), p, layer_stats=s)[0] for k, tx in txs.items()}
    )
    out = run(grads, params, stats)
    for kind, updates in out.items():
        for name, (kshape, has_bias, _) in LAYERS.items():
            g, u = grads[name], updates[name]
            want = ref_update(
                kind, stats[name], has_bias, grad_matrix(g["kernel"], g.get("bias")), damping
            )
            assert u["kernel"].shape == kshape and u["kernel"].dtype == jnp.float64
            np.testing.assert_allclose(
                grad_matrix(u["kernel"], u.get("bias")),
                want,
                rtol=1e-6,
                atol=1e-7 * np.abs(want).max(),
                err_msg=f"{kind} {name}",
            )


def test_second_step_averages_the_factors(x64):
    """Two statistics updates: factors averaged separately with ρ = min(1 − 1/2, ema) = 1/2."""
    params = {
        "d": {"kernel": arr(np.zeros((3, 2)), jnp.float64), "bias": arr(np.zeros(2), jnp.float64)}
    }
    s1, s2 = (rand_stats(seed, 7, 3, 2, dtype=jnp.float64) for seed in (1, 2))
    txs = {
        k: make(damping=0.1, tol=1e-13, max_iters=5000, stats_period=1, inverse_period=1)
        for k, make in SCALES.items()
    }
    grads = rand_like(3, params)

    @jax.jit
    def run(grads):
        out = {}
        for k, tx in txs.items():
            state = tx.init(params)
            _, state = tx.update(grads, state, params, layer_stats={"d": s1})
            out[k] = tx.update(grads, state, params, layer_stats={"d": s2})
        return out

    out = run(grads)
    refs = {}
    for seed, st in enumerate((s1, s2)):
        F, A, G, d_a, d_g = ref_fisher(st, True)
        refs[seed] = (F, A, G)
    V = grad_matrix(grads["d"]["kernel"], grads["d"]["bias"])
    for kind, (updates, state) in out.items():
        factors = state.curvature.factors
        (F1, A1, G1), (F2, A2, G2) = refs[0], refs[1]
        if kind == "kfac_corrected":
            A, G = (A1 + A2) / 2, (G1 + G2) / 2
            terms1 = ref_terms(F1, 4, 2, 1, subtract=(A1, G1))
            terms2 = ref_terms(F2, 4, 2, 1, subtract=(A, G))
        else:
            rank = 1 if kind == "kpsvd" else 2
            terms1, terms2 = ref_terms(F1, 4, 2, rank), ref_terms(F2, 4, 2, rank)
        avg = []
        for (R1, S1), (R2, S2) in zip(terms1, terms2):
            if np.vdot(S2, S1) < 0:  # the fresh pair is aligned with the warm start
                R2, S2 = -R2, -S2
            avg.append(((R1 + R2) / 2, (S1 + S2) / 2))
        if kind == "kfac_corrected":
            avg = [(A, G)] + avg
        np.testing.assert_allclose(factors["d4"][0], avg[0][0], rtol=1e-7, atol=1e-9, err_msg=kind)
        np.testing.assert_allclose(factors["d2"][0], avg[0][1], rtol=1e-7, atol=1e-9, err_msg=kind)
        if len(avg) == 2:
            np.testing.assert_allclose(
                factors["d4"][1], avg[1][0], rtol=1e-7, atol=1e-9, err_msg=kind
            )
            np.testing.assert_allclose(
                factors["d2"][1], avg[1][1], rtol=1e-7, atol=1e-9, err_msg=kind
            )
            want = np.asarray(sofim_optax.linalg.kron_sum_solve(*avg[0], *avg[1], V, 0.1))
        else:
            want = np.asarray(sofim_optax.linalg.damped_kron_solve(*avg[0], V, 0.1))
        got = grad_matrix(updates["d"]["kernel"], updates["d"]["bias"])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9, err_msg=kind)
        assert np.asarray(state.curvature.stat_updates).tolist() == [2]


# ----------------------------------------------------------------------------------------
# A damping changed at run time (optax.inject_hyperparams) between two refreshes.
# ----------------------------------------------------------------------------------------

# Inverse refreshes at counts 0 and 3; the damping is changed before count 2.
_PERIOD = 3


def _damping_run(kind, lam0, lam1):
    """Counts 0 and 1 with ``lam0``, then counts 2 (no refresh) and 3 (refresh) with
    ``lam1`` set in ``state.hyperparams``; also count 2 with ``lam0`` kept, and count 3 by a
    factory built with ``lam1`` from the same state. Returns the statistics of count 0, the
    gradient matrix of count 2 and the updates' gradient matrices."""
    f = SCALES[kind]
    kw = dict(inverse_period=_PERIOD, tol=1e-13, max_iters=5000)
    if kind != "kpsvd":
        kw["indefinite"] = "exact"  # the dense reference inverts the approximation itself
    tx = optax.inject_hyperparams(f, static_args=getattr(f, "static_args", ()))(damping=lam0, **kw)
    params = {
        "d": {"kernel": arr(np.zeros((3, 2)), jnp.float64), "bias": arr(np.zeros(2), jnp.float64)}
    }
    steps = [
        ({"d": rand_stats(30 + t, 7, 3, 2, dtype=jnp.float64)}, rand_like(50 + t, params))
        for t in range(_PERIOD + 1)
    ]
    update = jax.jit(lambda g, s, st: tx.update(g, s, params, layer_stats=st))
    fresh = f(damping=lam1, **kw)
    fresh_update = jax.jit(lambda g, s, st: fresh.update(g, s, params, layer_stats=st))
    state = tx.init(params)
    for stats, grads in steps[:2]:
        _, state = update(grads, state, stats)
    stats, grads = steps[2]
    out = {"kept": update(grads, state, stats)[0]}
    state.hyperparams["damping"] = jnp.asarray(lam1, state.hyperparams["damping"].dtype)
    out["changed"], state = update(grads, state, stats)
    stats, grads = steps[3]
    out["refreshed"], _ = update(grads, state, stats)
    out["fresh"], _ = fresh_update(grads, state.inner_state, stats)
    state.hyperparams["damping"] = jnp.asarray(lam0, state.hyperparams["damping"].dtype)
    out["refreshed_kept"], _ = update(grads, state, stats)
    V2 = grad_matrix(steps[2][1]["d"]["kernel"], steps[2][1]["d"]["bias"])
    got = {k: grad_matrix(u["d"]["kernel"], u["d"]["bias"]) for k, u in out.items()}
    return steps[0][0]["d"], V2, got


def test_kpsvd_applies_a_damping_change_at_once(x64):
    """Rank one: the eigendecompositions of ``R, S`` are of the undamped factors, so a damping
    changed between two refreshes acts at the next step, and equals the dense solve with the
    new damping of the factors of the last refresh."""
    lam0, lam1 = 0.05, 0.7
    stats0, V2, got = _damping_run("kpsvd", lam0, lam1)
    for lam, key in ((lam0, "kept"), (lam1, "changed")):
        want = ref_update("kpsvd", stats0, True, V2, lam)
        np.testing.assert_allclose(got[key], want, rtol=1e-6, atol=1e-9, err_msg=key)
    assert not np.allclose(got["changed"], got["kept"], rtol=1e-3)
    np.testing.assert_allclose(got["refreshed"], got["fresh"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["deflation", "kfac_corrected", "lanczos"])
def test_rank_two_applies_a_damping_change_at_the_next_refresh(x64, kind):
    """Rank two (documented): the simultaneous diagonalisation depends on the damping, so a
    change leaves the update as it was until the next inverse refresh, then takes effect."""
    lam0, lam1 = 0.05, 0.7
    stats0, V2, got = _damping_run(kind, lam0, lam1)
    want = ref_update(kind, stats0, True, V2, lam0)  # the factors of count 0, with λ0
    for key in ("kept", "changed"):
        np.testing.assert_allclose(got[key], want, rtol=1e-6, atol=1e-9, err_msg=key)
    np.testing.assert_allclose(got["changed"], got["kept"], rtol=1e-12, atol=1e-14)
    # At the refresh: what a factory built with λ1 gives from the same state, not λ0's.
    np.testing.assert_allclose(got["refreshed"], got["fresh"], rtol=1e-9, atol=1e-12)
    assert not np.allclose(got["refreshed"], got["refreshed_kept"], rtol=1e-3)


# ----------------------------------------------------------------------------------------
# Degenerate statistics and errors (jit, chain, inject_hyperparams, MultiSteps,
# apply_if_finite, schedules and dtypes of every method: tests/test_conformance.py). The
# rank-one (KPSVD) and rank-two (KFAC-corrected: KFAC factors + power SVD + simultaneous
# diagonalisation) paths are run here.
# ----------------------------------------------------------------------------------------

DEGENERATE = ("kpsvd", "kfac_corrected")


def mlp_params(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    return {
        f"Dense_{i}": {
            "kernel": arr(rng.standard_normal((a, b)), dtype),
            "bias": arr(np.zeros(b), dtype),
        }
        for i, (a, b) in enumerate(((3, 4), (4, 2)))
    }


def mlp_stats(dtype=jnp.float32):
    return {
        "Dense_0": rand_stats(10, 6, 3, 4, dtype=dtype),
        "Dense_1": rand_stats(11, 6, 4, 2, dtype=dtype),
    }


def test_degenerate_statistics_stay_finite():
    params = mlp_params()
    zero_stats = {
        "Dense_0": LayerStats(arr(np.zeros((4, 3))), arr(np.zeros((4, 4))), None),
        "Dense_1": rand_stats(0, 1, 4, 2),  # one sample: rank one
    }

    @jax.jit
    def run():
        out = {}
        for kind in DEGENERATE:
            tx = SCALES[kind](damping=jnp.asarray(0.0))  # traced: floored
            out[kind] = tx.update(
                rand_like(1, params), tx.init(params), params, layer_stats=zero_stats
            )
        return out

    for kind, degenerate in run().items():
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(degenerate)), kind


@pytest.mark.parametrize("kind", sorted(SCALES))
def test_errors_name_the_layer(kind):
    params = mlp_params()
    tx = SCALES[kind]()
    state = jax.eval_shape(tx.init, params)
    with pytest.raises(TypeError, match=r"value_grad_and_stats.*Dense_0"):
        jax.eval_shape(tx.update, params, state, params)
    bad = {"Dense_0": LayerStats(jnp.ones((4, 5)), jnp.ones((4, 4)), None)}
    with pytest.raises(ValueError, match="'Dense_0'.*inputs have last dimension 5"):
        jax.eval_shape(functools.partial(tx.update, layer_stats=bad), params, state, params)
    with pytest.raises(ValueError, match="Did you mean"):
        jax.eval_shape(
            functools.partial(tx.update, layer_stats={"Dense_O": mlp_stats()["Dense_0"]}),
            params,
            state,
            params,
        )
    with pytest.raises(ValueError, match="ema"):
        SCALES[kind](ema=1.0)
    with pytest.raises(ValueError, match="max_iters"):
        SCALES[kind](max_iters=0)
    with pytest.raises(ValueError, match="inverse_period"):
        SCALES[kind](inverse_period=0)
    if kind != "kpsvd":
        with pytest.raises(ValueError, match="indefinite"):
            SCALES[kind](indefinite="negate")
    if kind == "lanczos":
        with pytest.raises(ValueError, match="krylov_dim"):
            SCALES[kind](krylov_dim=1)


def test_public_exports():
    for name in (
        "kpsvd",
        "kpsvd_deflation",
        "kfac_corrected",
        "kpsvd_lanczos",
        "scale_by_kpsvd",
        "scale_by_kpsvd_deflation",
        "scale_by_kfac_corrected",
        "scale_by_kpsvd_lanczos",
    ):
        assert getattr(sofim_optax, name) is not None
    for name in ("nearest_kronecker", "kron_sum_solve"):
        assert getattr(sofim_optax.linalg, name) is not None


@pytest.mark.parametrize("kind", list(SCALES))
def test_member_defaults_amortise_the_solver(kind):
    """Each member's signature (and its alias's) carries its own defaults, statistics every
    10 updates and a solver budget of 5 iterations per term (Lanczos: 2 passes), and a
    factory built without them runs exactly that budget, whatever the tolerance asks for."""
    budget = 2 if kind == "lanczos" else 5
    for factory in (SCALES[kind], ALIASES[kind]):
        parameters = inspect.signature(factory).parameters
        assert parameters["stats_period"].default == 10, factory.__name__
        assert parameters["max_iters"].default == budget, factory.__name__
    params = {"dense": {"kernel": arr(np.zeros((6, 5))), "bias": arr(np.zeros(5))}}
    stats = {"dense": rand_stats(0, 32, 6, 5)}
    grads = rand_like(1, params)

    def first_step(tx):
        state = tx.init(params)
        updates, state = jax.jit(lambda g, s: tx.update(g, s, params, layer_stats=stats))(
            grads, state
        )
        return updates, state.curvature.solver_iterations

    # (tol=0 never converges: every term runs to the cap)
    by_default, iterations = first_step(SCALES[kind](tol=0.0))
    explicit, _ = first_step(SCALES[kind](tol=0.0, max_iters=budget, stats_period=10))
    assert int(np.max(iterations)) == budget
    jax.tree.map(np.testing.assert_array_equal, by_default, explicit)


@pytest.mark.parametrize("factory", [scale_by_kpsvd, sofim_optax.scale_by_kfac])
def test_diagonal_fallback_refreshes_every_step_whatever_the_stats_period(factory):
    """The uncovered parameters' diagonal Fisher is refreshed at every step: a stale one (from
    the method's last statistics update) with a small damping turns a gradient that grows
    into a step of about ``g / g_old²``."""
    params = {
        "dense": {"kernel": arr(np.zeros((3, 2))), "bias": arr(np.zeros(2))},
        "norm": {"scale": arr(np.ones(4))},  # no statistics: the fallback's
    }
    stats = {"dense": rand_stats(0, 8, 3, 2)}
    steps = [
        jax.tree.map(lambda x, t=t: (1.0 + 10.0 * t) * x, rand_like(t, params)) for t in range(3)
    ]

    def norm_updates(tx):
        state, out = tx.init(params), []
        for grads in steps:
            updates, state = tx.update(grads, state, params, layer_stats=stats)
            out.append(np.asarray(updates["norm"]["scale"]))
        return out

    every = norm_updates(factory(damping=1e-3, stats_period=1))
    amortised = norm_updates(factory(damping=1e-3, stats_period=10))
    for a, b in zip(every, amortised):
        np.testing.assert_array_equal(a, b)
