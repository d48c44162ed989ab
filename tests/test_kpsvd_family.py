"""KPSVD, Deflation, KFAC-corrected and Lanczos transformations against dense float64
references (explicit Fisher blocks, numpy SVD of their rearrangement, explicit Kronecker
solves), plus optax conformance.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sofim_optax
from sofim_optax.curvature import LayerStats
from sofim_optax.kpsvd import kfac_corrected, scale_by_kfac_corrected
from sofim_optax.kpsvd import ScaleByKpsvdState, kpsvd, scale_by_kpsvd
from sofim_optax.kpsvd import kpsvd_deflation, scale_by_kpsvd_deflation
from sofim_optax.kpsvd import kpsvd_lanczos, scale_by_kpsvd_lanczos

SCALES = {
    "kpsvd": scale_by_kpsvd,
    "deflation": scale_by_kpsvd_deflation,
    "kfac_corrected": scale_by_kfac_corrected,
    "lanczos": scale_by_kpsvd_lanczos,
}
ALIASES = {"kpsvd": kpsvd, "deflation": kpsvd_deflation, "kfac_corrected": kfac_corrected, "lanczos": kpsvd_lanczos}



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
    F = sum(np.kron(np.outer(a[i, j], a[i, j]), np.outer(g[i, j], g[i, j])) for i in range(n) for j in range(t)) / n
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
        kind: make(damping=damping, tol=1e-13, max_iters=5000, **({} if kind == "kpsvd" else {"indefinite": "exact"}))
        for kind, make in SCALES.items()
    }
    run = jax.jit(lambda g, p, s: {k: tx.update(g, tx.init(p), p, layer_stats=s)[0] for k, tx in txs.items()})
    out = run(grads, params, stats)
    for kind, updates in out.items():
        for name, (kshape, has_bias, _) in LAYERS.items():
            g, u = grads[name], updates[name]
            want = ref_update(kind, stats[name], has_bias, grad_matrix(g["kernel"], g.get("bias")), damping)
            assert u["kernel"].shape == kshape and u["kernel"].dtype == jnp.float64
            np.testing.assert_allclose(
                grad_matrix(u["kernel"], u.get("bias")), want, rtol=1e-6, atol=1e-7 * np.abs(want).max(),
                err_msg=f"{kind} {name}",
            )


def test_second_step_averages_the_factors(x64):
    """Two statistics updates: factors averaged separately with ρ = min(1 − 1/2, ema) = 1/2."""
    params = {"d": {"kernel": arr(np.zeros((3, 2)), jnp.float64), "bias": arr(np.zeros(2), jnp.float64)}}
    s1, s2 = (rand_stats(seed, 7, 3, 2, dtype=jnp.float64) for seed in (1, 2))
    txs = {k: make(damping=0.1, tol=1e-13, max_iters=5000, inverse_period=1) for k, make in SCALES.items()}
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
            np.testing.assert_allclose(factors["d4"][1], avg[1][0], rtol=1e-7, atol=1e-9, err_msg=kind)
            np.testing.assert_allclose(factors["d2"][1], avg[1][1], rtol=1e-7, atol=1e-9, err_msg=kind)
            want = np.asarray(sofim_optax.linalg.kron_sum_solve(*avg[0], *avg[1], V, 0.1))
        else:
            want = np.asarray(sofim_optax.linalg.damped_kron_solve(*avg[0], V, 0.1))
        got = grad_matrix(updates["d"]["kernel"], updates["d"]["bias"])
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9, err_msg=kind)
        assert np.asarray(state.curvature.stat_updates).tolist() == [2]


# ----------------------------------------------------------------------------------------
# optax conformance. The optax plumbing is KFAC's shared skeleton; the methods differ only in
# their statistics/refresh/precondition functions, whose rank-one (KPSVD) and rank-two
# (KFAC-corrected: KFAC factors + power SVD + simultaneous diagonalisation) paths are run here
# (compiling all four in every test would cost minutes on 2 CPU cores); every method runs
# through jit, the EMA and both solves in the two dense-reference tests above.
# ----------------------------------------------------------------------------------------

CONFORMANCE = ("kpsvd", "kfac_corrected")


def mlp_params(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    return {
        f"Dense_{i}": {"kernel": arr(rng.standard_normal((a, b)), dtype), "bias": arr(np.zeros(b), dtype)}
        for i, (a, b) in enumerate(((3, 4), (4, 2)))
    }


def mlp_stats(dtype=jnp.float32):
    return {"Dense_0": rand_stats(10, 6, 3, 4, dtype=dtype), "Dense_1": rand_stats(11, 6, 4, 2, dtype=dtype)}


def leaves_close(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), **kw)


def test_jit_chain_alias_and_schedule():
    params, stats = mlp_params(), mlp_stats()
    grads = [rand_like(i, params) for i in range(3)]
    sched = optax.linear_schedule(0.1, 0.0, transition_steps=2)

    @jax.jit
    def run(grads):
        out = {}
        for kind in CONFORMANCE:
            make = SCALES[kind]
            tx = make(damping=1e-2)
            chained = optax.chain(optax.scale(2.0), make(damping=1e-2), optax.scale(-0.5))
            plain = tx.update(grads[0], tx.init(params), params, layer_stats=stats)[0]
            ch = chained.update(grads[0], chained.init(params), params, layer_stats=stats)[0]
            opt = ALIASES[kind](sched, momentum=0.5, damping=1e-2, weight_decay=1e-2)
            ref = optax.chain(make(damping=1e-2), optax.add_decayed_weights(1e-2), optax.trace(0.5),
                              optax.scale_by_learning_rate(sched))
            s, r, pairs = opt.init(params), ref.init(params), []
            for g in grads:
                u, s = opt.update(g, s, params, layer_stats=stats)
                w, r = ref.update(g, r, params, layer_stats=stats)
                pairs.append((u, w))
            out[kind] = (plain, ch, pairs)
        return out

    for kind, (plain, ch, pairs) in run(grads).items():
        leaves_close(ch, jax.tree.map(lambda x: -x, plain), rtol=1e-5, atol=1e-6)
        for u, w in pairs:
            leaves_close(u, w, rtol=1e-5, atol=1e-7)
        # The schedule reaches 0 at step 2 (the learning rate scales the momentum buffer).
        assert all(float(np.abs(np.asarray(x)).max()) == 0.0 for x in jax.tree.leaves(pairs[2][0])), kind
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(plain)), kind


def test_inject_hyperparams_and_multisteps():
    params, stats = mlp_params(), mlp_stats()
    g1, g2 = rand_like(2, params), rand_like(3, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)

    @jax.jit
    def run():
        out = {}
        for kind in CONFORMANCE:
            opt = optax.inject_hyperparams(ALIASES[kind])(learning_rate=0.1, damping=1e-2, momentum=0.0)
            state = opt.init(params)
            u1, state = opt.update(g1, state, params, layer_stats=stats)
            state.hyperparams["learning_rate"] = jnp.asarray(0.2, state.hyperparams["learning_rate"].dtype)
            u2, state = opt.update(g1, state, params, layer_stats=stats)
            ms = optax.MultiSteps(ALIASES[kind](0.1, damping=1e-2), every_k_schedule=2)
            ms_state = ms.init(params)
            m1, ms_state = ms.update(g1, ms_state, params, layer_stats=stats)
            m2, ms_state = ms.update(g2, ms_state, params, layer_stats=stats)
            ref = ALIASES[kind](0.1, damping=1e-2)
            want = ref.update(mean, ref.init(params), params, layer_stats=stats)[0]
            out[kind] = (u1, u2, m1, m2, want)
        return out

    for kind, (u1, u2, m1, m2, want) in run().items():
        # Same statistics twice: the factors are unchanged, so lr 0.2 doubles the step.
        leaves_close(jax.tree.map(lambda x: 2 * x, u1), u2, rtol=1e-4, atol=1e-6)
        assert all(float(np.abs(np.asarray(x)).max()) == 0.0 for x in jax.tree.leaves(m1)), kind
        leaves_close(m2, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes_state_stability_and_fallback(dtype):
    params = mlp_params(dtype)
    params["norm"] = {"scale": arr(np.ones(4), dtype)}
    stats = {k: LayerStats(v.inputs.astype(dtype), v.output_grads.astype(dtype), None) for k, v in mlp_stats().items()}
    opts = {k: ALIASES[k](0.1, damping=1e-2, fallback=optax.scale_by_rms(), inverse_period=2) for k in CONFORMANCE}

    @jax.jit
    def run():
        out = {}
        for kind, opt in opts.items():
            state0 = opt.init(params)
            state, ups = state0, []
            for i in range(3):
                u, state = opt.update(rand_like(i, params), state, params, layer_stats=stats)
                ups.append(u)
            out[kind] = (state0, state, ups)
        return out

    for kind, (state0, state, ups) in run().items():
        for u in ups:
            for a, p in zip(jax.tree.leaves(u), jax.tree.leaves(params)):
                assert a.dtype == p.dtype, kind
                assert np.all(np.isfinite(np.asarray(a, np.float32))), kind
        assert jax.tree.structure(state0) == jax.tree.structure(state)
        jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype) or pytest.fail(kind), state0, state)
        inner = state[0]
        assert inner.count.dtype == jnp.int32 and int(inner.count) == 3
        assert all(f.dtype == jnp.float32 for f in inner.curvature.factors.values())
        assert int(np.asarray(inner.curvature.solver_iterations)[:, 0].min()) >= 1
        assert kind != "kpsvd" or isinstance(inner, ScaleByKpsvdState)


def test_apply_if_finite_and_degenerate_statistics():
    params, stats = mlp_params(), mlp_stats()
    zero_stats = {
        "Dense_0": LayerStats(arr(np.zeros((4, 3))), arr(np.zeros((4, 4))), None),
        "Dense_1": rand_stats(0, 1, 4, 2),  # one sample: rank one
    }
    bad = rand_like(5, params)
    bad["Dense_0"]["kernel"] = bad["Dense_0"]["kernel"].at[0, 0].set(jnp.nan)

    @jax.jit
    def run():
        out = {}
        for kind in CONFORMANCE:
            make = SCALES[kind]
            opt = optax.apply_if_finite(ALIASES[kind](0.1, damping=1e-2), max_consecutive_errors=3)
            state = opt.init(params)
            _, state = opt.update(rand_like(0, params), state, params, layer_stats=stats)
            u, new_state = opt.update(bad, state, params, layer_stats=stats)
            tx = make(damping=0.0)
            degenerate = tx.update(rand_like(1, params), tx.init(params), params, layer_stats=zero_stats)
            out[kind] = (u, new_state, state, degenerate)
        return out

    for kind, (u, new_state, state, degenerate) in run().items():
        assert all(float(np.abs(np.asarray(x)).max()) == 0.0 for x in jax.tree.leaves(u)), kind
        jax.tree.map(np.testing.assert_array_equal, new_state.inner_state, state.inner_state)
        assert int(new_state.notfinite_count) == 1
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
        jax.eval_shape(functools.partial(tx.update, layer_stats={"Dense_O": mlp_stats()["Dense_0"]}), params, state, params)
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
    for name in ("kpsvd", "kpsvd_deflation", "kfac_corrected", "kpsvd_lanczos",
                 "scale_by_kpsvd", "scale_by_kpsvd_deflation", "scale_by_kfac_corrected", "scale_by_kpsvd_lanczos"):
        assert getattr(sofim_optax, name) is not None
    for name in ("nearest_kronecker", "kron_sum_solve"):
        assert getattr(sofim_optax.linalg, name) is not None
