"""K-BFGS / K-BFGS(L) (``sofim_optax.kbfgs``) against a float64 numpy reference, K-BFGS-specific
optax behaviour and the two-pass train step (the common optax checks:
``tests/test_conformance.py``).

The reference below re-implements the authors' iteration step by step in numpy (product-form
BFGS, the literal double damping of their code, their skip rules, a list of L-BFGS pairs turned
into a dense matrix), independently of ``sofim_optax.linalg``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sofim_optax import layerwise
from sofim_optax.curvature import LayerStats
from sofim_optax.kbfgs import ScaleByKbfgsState, kbfgs, kbfgs_l, scale_by_kbfgs
from sofim_optax.kbfgs_curvature import layouts
from sofim_optax.kbfgs_warm_start import average_input_factors, batch_input_factors, warm_start


def arr(x, dtype=jnp.float32):
    return jnp.asarray(np.asarray(x).astype(dtype))


# ----------------------------------------------------------------------------------------
# Independent float64 reference of the authors' iteration.
# ----------------------------------------------------------------------------------------


def ref_bfgs(H, s, y):
    rho = 1.0 / (s @ y)
    E = np.eye(len(s)) - rho * np.outer(s, y)
    return E @ H @ E.T + rho * np.outer(s, s)


def ref_bfgs_guarded(H, s, y, g):
    sy = s @ y
    if sy <= 0 or sy <= 1e-4 * (s @ s) * np.linalg.norm(g):
        return H, False
    return ref_bfgs(H, s, y), True


def ref_damping(s, y, Hy, mu1, mu2):
    sy, yHy = s @ y, y @ Hy
    if not sy / yHy > mu1:
        t = (1 - mu1) * yHy / (yHy - sy)
        s = t * s + (1 - t) * Hy
    ss, sy = s @ s, s @ y
    if not sy / ss > mu2:
        t = (1 - mu2) * ss / (ss - sy)
        y = t * y + (1 - t) * s
    return s, y


def ref_lbfgs_matrix(pairs, d, gamma=1.0):
    H = gamma * np.eye(d)
    for s, y in pairs:
        H = ref_bfgs(H, s, y)
    return H


def homog(x, has_bias):
    x = np.asarray(x, np.float64)
    return np.concatenate([x, np.ones(x.shape[:-1] + (1,))], -1) if has_bias else x


class RefLayer:
    """One layer of the reference: dense (N, d) or conv (N, T, d) statistics."""

    def __init__(
        self, d_a, d_g, has_bias, damping, memory=None, ema=0.9, pair_ema=0.9, mu1=0.2, A_warm=None
    ):
        self.has_bias, self.lam, self.memory = has_bias, damping, memory
        self.ema, self.pair_ema, self.mu1, self.mu2 = ema, pair_ema, mu1, np.sqrt(damping)
        self.A = A_warm
        self.warm = A_warm is not None
        self.Ha, self.Hg = None, np.eye(d_g)
        self.pairs = []
        self.s_ema, self.y_ema = np.zeros(d_g), np.zeros(d_g)
        self.prev = None  # (s̄, ḡ) of the last minibatch at its own parameters
        self.d_g = d_g
        self.first = True
        self.hg_updates = 0

    @staticmethod
    def means(st):
        out = np.asarray(st.outputs, np.float64)
        g = np.asarray(st.output_grads, np.float64)
        t = 1 if g.ndim == 2 else g.shape[1]
        return out.reshape(-1, out.shape[-1]).mean(0), t * g.reshape(-1, g.shape[-1]).mean(0)

    def H_g(self):
        return ref_lbfgs_matrix(self.pairs, self.d_g) if self.memory else self.Hg

    def step(self, V, st, prev_st):
        if prev_st is not None and self.prev is not None:
            out_new, g_new = self.means(prev_st)
            s_new, y_new = self.prev[0] - out_new, self.prev[1] - g_new
            self.s_ema = self.pair_ema * self.s_ema + (1 - self.pair_ema) * s_new
            self.y_ema = self.pair_ema * self.y_ema + (1 - self.pair_ema) * y_new
            Hg = self.H_g()
            s, y = ref_damping(self.s_ema, self.y_ema, Hg @ self.y_ema, self.mu1, self.mu2)
            if self.memory:
                if s @ y > 1e-4 * (s @ s) * np.linalg.norm(self.prev[1]):
                    self.pairs = (self.pairs + [(s, y)])[-self.memory :]
                    self.hg_updates += 1
            else:
                self.Hg, ok = ref_bfgs_guarded(Hg, s, y, self.prev[1])
                self.hg_updates += ok
        self.prev = self.means(st)
        a = homog(st.inputs, self.has_bias)
        a = a.reshape(-1, a.shape[-1])
        A_hat = a.T @ a / len(a)
        a_mean = a.mean(0)
        if self.first:
            if not self.warm:
                self.A = A_hat
            self.Ha = np.linalg.inv(self.A + np.sqrt(self.lam) * np.eye(len(self.A)))
            self.first = False
        else:
            self.A = self.ema * self.A + (1 - self.ema) * A_hat
        D = self.Ha @ V @ self.H_g()
        s_a = self.Ha @ a_mean
        y_a = (self.A + np.sqrt(self.lam) * np.eye(len(self.A))) @ s_a
        self.Ha, _ = ref_bfgs_guarded(self.Ha, s_a, y_a, a_mean)
        return D


def grad_matrix(g):
    k = np.asarray(g["kernel"], np.float64)
    v = k.reshape(-1, k.shape[-1])
    if "bias" in g:
        v = np.concatenate([v, np.asarray(g["bias"], np.float64)[None]], 0)
    return v


# ----------------------------------------------------------------------------------------
# Random problems.
# ----------------------------------------------------------------------------------------

LAYERS = {
    # name: (kernel shape, bias, positions T or None)
    "dense": ((4, 3), True, None),
    "dense_nobias": ((3, 2), False, None),
    "conv": ((2, 2, 2, 3), True, 3),
}


def make_params(dtype=jnp.float64, layers=LAYERS):
    params = {}
    for name, (kshape, bias, _) in layers.items():
        params[name] = {"kernel": arr(np.zeros(kshape), dtype)}
        if bias:
            params[name]["bias"] = arr(np.zeros(kshape[-1:]), dtype)
    return params


def rand_stats(rng, layers=LAYERS, n=6, dtype=jnp.float64, drift=None):
    """Statistics whose output gradients respond to the outputs through a fixed SPD matrix,
    so that the (s, y) pairs carry curvature (and random noise, so damping also happens)."""
    out = {}
    for name, (kshape, _, t) in layers.items():
        d_in, d_out = int(np.prod(kshape[:-1])), kshape[-1]
        shape = (n, d_in) if t is None else (n, t, d_in)
        oshape = shape[:-1] + (d_out,)
        x = rng.standard_normal(shape) + 0.3
        o = rng.standard_normal(oshape) + (0 if drift is None else drift)
        B = np.diag(np.linspace(0.5, 2.0, d_out))
        g = o @ B + 0.3 * rng.standard_normal(oshape)
        out[name] = LayerStats(arr(x, dtype), arr(g, dtype), arr(o, dtype))
    return out


def perturb(stats, rng, scale=0.2, dtype=jnp.float64):
    """The 'same minibatch at new parameters': outputs shifted, gradients moved along B."""
    out = {}
    for name, st in stats.items():
        o = np.asarray(st.outputs, np.float64)
        d_out = o.shape[-1]
        B = np.diag(np.linspace(0.5, 2.0, d_out))
        shift = scale * rng.standard_normal(d_out)
        noise = 0.02 * rng.standard_normal(o.shape)
        g = np.asarray(st.output_grads, np.float64) + (shift @ B) + noise
        out[name] = LayerStats(st.inputs, arr(g, dtype), arr(o + shift, dtype))
    return out


def rand_like(rng, tree, dtype=None):
    return jax.tree.map(lambda l: arr(rng.standard_normal(l.shape), dtype or l.dtype), tree)


def run_steps(tx, params, grads_seq, stats_seq, prev_seq, state=None):
    """Steps through one jitted ``update`` (``previous_batch_stats`` at every step, ignored at
    the first); returns the updates of every step and the final state."""
    step = jax.jit(tx.update)
    if state is None:
        state = jax.jit(tx.init)(params)
    outs = []
    for g, st, pv in zip(grads_seq, stats_seq, prev_seq):
        u, state = step(g, state, params, layer_stats=st, previous_batch_stats=pv)
        outs.append(u)
    return outs, state


def problem(seed, steps, layers=LAYERS, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    params = make_params(dtype, layers)
    stats_seq = [rand_stats(rng, layers, dtype=dtype) for _ in range(steps)]
    # At the first step there is no previous minibatch: the current one's, as two_pass does.
    prev_seq = [stats_seq[0]] + [
        perturb(stats_seq[t - 1], rng, dtype=dtype) for t in range(1, steps)
    ]
    grads_seq = [rand_like(rng, params) for _ in range(steps)]
    return params, grads_seq, stats_seq, prev_seq


# ----------------------------------------------------------------------------------------
# Against the dense reference.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("memory", [None, 2])
def test_first_steps_match_dense_reference(x64, memory):
    steps, damping = 6, 0.3
    params, grads_seq, stats_seq, prev_seq = problem(0, steps)
    tx = scale_by_kbfgs(damping=damping, memory=memory)
    updates, state = run_steps(tx, params, grads_seq, stats_seq, prev_seq)
    refs = {}
    for name, (kshape, bias, _) in LAYERS.items():
        d_a = int(np.prod(kshape[:-1])) + bias
        refs[name] = RefLayer(d_a, kshape[-1], bias, damping, memory=memory)
    for t in range(steps):
        for name, ref in refs.items():
            want = ref.step(
                grad_matrix(grads_seq[t][name]),
                stats_seq[t][name],
                prev_seq[t][name],
            )
            got = grad_matrix(updates[t][name])
            np.testing.assert_allclose(
                got,
                want,
                rtol=1e-8,
                atol=1e-10 * np.abs(want).max(),
                err_msg=f"step {t}, layer {name}",
            )
    curv = state.curvature
    names = sorted(LAYERS)
    la, lg = layouts(layerwise.discover_layers(params).layers)  # where each layer is stacked
    for i, name in enumerate(names):
        np.testing.assert_allclose(la.get(curv.Ha, i, "a"), refs[name].Ha, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(la.get(curv.A, i, "a"), refs[name].A, rtol=1e-10)
        assert int(curv.hg_updates[i]) == refs[name].hg_updates, name
        if memory is None:
            np.testing.assert_allclose(
                lg.get(curv.Hg, i, "g"), refs[name].Hg, rtol=1e-8, atol=1e-10
            )
    # The reference accepted pairs (and for the L variant wrapped the ring of 2).
    assert sum(r.hg_updates for r in refs.values()) >= 3 * len(refs) // 2
    if memory:
        assert max(r.hg_updates for r in refs.values()) > memory


def test_first_step_is_exact_inverse_and_warm_start(x64):
    damping = 0.5
    params, grads_seq, stats_seq, prev_seq = problem(1, 2, layers={"dense": LAYERS["dense"]})
    tx = kbfgs(1.0, damping=damping, gradient_ema=None)
    rng = np.random.default_rng(7)
    batches = [rand_stats(rng, {"dense": LAYERS["dense"]}) for _ in range(3)]
    factors = average_input_factors(jax.jit(batch_input_factors)(params, b) for b in batches)
    a = homog(np.concatenate([np.asarray(b["dense"].inputs) for b in batches]), True)
    np.testing.assert_allclose(factors["dense"], a.T @ a / len(a), rtol=1e-12)
    state = warm_start(jax.jit(tx.init)(params), params, factors)
    updates, state = run_steps(tx, params, grads_seq, stats_seq, prev_seq, state)
    ref = RefLayer(5, 3, True, damping, A_warm=np.asarray(factors["dense"]))
    for t in range(2):
        want = -ref.step(
            grad_matrix(grads_seq[t]["dense"]),
            stats_seq[t]["dense"],
            prev_seq[t]["dense"],
        )
        np.testing.assert_allclose(grad_matrix(updates[t]["dense"]), want, rtol=1e-8)
    # The first direction is exactly (A_warm + √λ I)⁻¹ V (H_g = I).
    A0 = np.asarray(factors["dense"])
    first = np.linalg.solve(A0 + np.sqrt(damping) * np.eye(5), grad_matrix(grads_seq[0]["dense"]))
    np.testing.assert_allclose(grad_matrix(updates[0]["dense"]), -first, rtol=1e-8)
    with pytest.raises(ValueError, match="no layer 'nope'"):
        warm_start(state, params, {"nope": factors["dense"]})
    with pytest.raises(ValueError, match="shape"):
        warm_start(state, params, {"dense": np.eye(3)})


def _scan_steps(tx, params, stats_fn, steps):
    """Many steps under lax.scan with statistics from ``stats_fn(key)`` (jax.random)."""

    def body(carry, key):
        state, prev = carry
        k1, k2 = jax.random.split(key)
        stats = stats_fn(k1)
        grads = jax.tree.map(lambda p: jax.random.normal(k2, p.shape, p.dtype), params)
        _, state = tx.update(grads, state, params, layer_stats=stats, previous_batch_stats=prev)
        # "previous minibatch at the next parameters": this minibatch, moved at random.
        moved = {
            k: LayerStats(
                v.inputs,
                v.output_grads + 0.3 * jax.random.normal(k2, v.output_grads.shape),
                v.outputs + 0.3 * jax.random.normal(k1, v.outputs.shape),
            )
            for k, v in stats.items()
        }
        return (state, moved), None

    @jax.jit
    def run(state, prev):
        (state, _), _ = jax.lax.scan(
            body, (state, prev), jax.random.split(jax.random.key(0), steps)
        )
        return state

    # The first update gets a dummy previous_batch_stats (ignored: nothing stored yet), so the
    # whole run is one compilation.
    return run(jax.jit(tx.init)(params), jax.jit(stats_fn)(jax.random.key(1)))


def test_hg_and_ha_stay_symmetric_positive_definite_over_many_steps():
    params = {"d": {"kernel": jnp.zeros((4, 5)), "bias": jnp.zeros((5,))}}

    def stats_fn(key):
        k1, k2 = jax.random.split(key)
        x = jax.random.normal(k1, (8, 4)) + 0.5
        o = jax.random.normal(k2, (8, 5))
        return {"d": LayerStats(x, o * jnp.linspace(0.1, 3.0, 5) + 0.1 * x[:, :1], o)}

    for memory in (None, 3):
        tx = scale_by_kbfgs(damping=0.01, memory=memory)
        state = _scan_steps(tx, params, stats_fn, 200)
        curv = state.curvature
        assert int(curv.hg_updates[0]) > 100, memory  # the pairs were mostly accepted
        # One layer, d_a = 5 (4 inputs and the bias), d_g = 5: one entry in each stack.
        mats = [np.asarray(curv.Ha["d5"][0], np.float64)]
        if memory is None:
            mats.append(np.asarray(curv.Hg["d5"][0], np.float64))
        else:
            S, Y = (
                np.asarray(curv.S["d5"][0], np.float64),
                np.asarray(curv.Y["d5"][0], np.float64),
            )
            assert np.all(np.sum(S * Y, 1) > 0) and bool(np.all(curv.valid["d5"][0]))
        for M in mats:
            assert np.all(np.isfinite(M))
            np.testing.assert_allclose(M, M.T, rtol=1e-5, atol=1e-7)
            assert np.linalg.eigvalsh(0.5 * (M + M.T)).min() > 0
            # H_g ≤ 1/μ₂-type bound: eigenvalues stay moderate (μ₂ = 0.1 here).
            assert np.linalg.eigvalsh(0.5 * (M + M.T)).max() < 1e4


def test_skip_rules(x64):
    layers = {"dense": LAYERS["dense"]}
    params, grads_seq, stats_seq, prev_seq = problem(2, 3, layers=layers)
    tx = scale_by_kbfgs(damping=1e-6)
    # (a) ‖ḡ‖ huge: sᵀy ≤ 1e-4·sᵀs·‖ḡ‖ after damping (μ₂ = 1e-3), the update is skipped.
    big = [
        {k: LayerStats(v.inputs, 1e8 * v.output_grads, v.outputs) for k, v in st.items()}
        for st in stats_seq
    ]
    big_prev = [big[0]] + [
        {k: LayerStats(v.inputs, 1e8 * v.output_grads, v.outputs) for k, v in st.items()}
        for st in prev_seq[1:]
    ]
    _, state = run_steps(tx, params, grads_seq, big, big_prev)
    assert int(state.curvature.hg_updates[0]) == 0
    np.testing.assert_array_equal(state.curvature.Hg["d3"][0], np.eye(3))
    ref = RefLayer(5, 3, True, 1e-6)
    for t in range(3):
        ref.step(
            grad_matrix(grads_seq[t]["dense"]),
            big[t]["dense"],
            None if t == 0 else big_prev[t]["dense"],
        )
    assert ref.hg_updates == 0
    # (b) s = y = 0 (outputs and gradients that do not move): skipped.
    flat = [
        {k: LayerStats(v.inputs, 0 * v.output_grads, 0 * v.outputs) for k, v in st.items()}
        for st in stats_seq
    ]
    _, state = run_steps(tx, params, grads_seq, flat, [flat[0]] + flat[:-1])
    assert int(state.curvature.hg_updates[0]) == 0
    # (c) non-finite previous statistics: skipped, and nothing in the state turns non-finite.
    bad = [stats_seq[0]] + [
        {
            k: LayerStats(v.inputs, v.output_grads.at[0, 0].set(jnp.nan), v.outputs)
            for k, v in p.items()
        }
        for p in prev_seq[1:]
    ]
    _, state = run_steps(tx, params, grads_seq, stats_seq, bad)
    assert int(state.curvature.hg_updates[0]) == 0
    assert all(
        np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state) if x.dtype != bool
    )
    # (d) good pairs are accepted (the control).
    _, state = run_steps(tx, params, grads_seq, stats_seq, prev_seq)
    assert int(state.curvature.hg_updates[0]) == 2


def test_first_step_ignores_previous_batch_stats(x64):
    """At the first step there is no previous minibatch: whatever correctly shaped statistics
    are passed (the current batch's, or others) give bit-identical updates and states."""
    params, grads_seq, stats_seq, prev_seq = problem(4, 3)
    other = perturb(stats_seq[0], np.random.default_rng(9), scale=3.0)
    for memory in (None, 2):
        tx = scale_by_kbfgs(damping=0.3, memory=memory)
        a = run_steps(tx, params, grads_seq, stats_seq, prev_seq)
        b = run_steps(tx, params, grads_seq, stats_seq, [other] + prev_seq[1:])
        jax.tree.map(np.testing.assert_array_equal, a, b)
        assert int(a[1].curvature.hg_updates.sum()) > 0  # the later pairs are used


def test_pair_ema_is_zero_started_average(x64):
    layers = {"dense": LAYERS["dense"]}
    params, grads_seq, stats_seq, prev_seq = problem(3, 4, layers=layers)
    for pair_ema in (0.5,):
        _, state = run_steps(
            scale_by_kbfgs(damping=0.3, pair_ema=pair_ema), params, grads_seq, stats_seq, prev_seq
        )
        s_ema = np.zeros(3)
        for t in range(1, 4):
            s_new = (
                RefLayer.means(stats_seq[t - 1]["dense"])[0]
                - RefLayer.means(prev_seq[t]["dense"])[0]
            )
            s_ema = pair_ema * s_ema + (1 - pair_ema) * s_new
        np.testing.assert_allclose(state.curvature.s_ema["d3"][0], s_ema, rtol=1e-10)


# ----------------------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------------------


def test_errors():
    params = make_params(jnp.float32, {"dense": LAYERS["dense"]})
    rng = np.random.default_rng(0)
    stats = rand_stats(rng, {"dense": LAYERS["dense"]}, dtype=jnp.float32)
    tx = scale_by_kbfgs()
    state = jax.eval_shape(tx.init, params)
    with pytest.raises(TypeError, match="layer_stats"):
        jax.eval_shape(tx.update, params, state, params)
    no_out = {"dense": LayerStats(stats["dense"].inputs, stats["dense"].output_grads, None)}
    with pytest.raises(ValueError, match=r"'dense'.*outputs"):
        jax.eval_shape(functools.partial(tx.update, layer_stats=no_out), params, state, params)
    with pytest.raises(
        ValueError, match=r"previous_batch_stats.*'dense'|'dense'.*previous_batch_stats"
    ):
        jax.eval_shape(
            functools.partial(tx.update, layer_stats=stats, previous_batch_stats=no_out),
            params,
            state,
            params,
        )
    # previous_batch_stats is required on every update (else H_g would never change).
    for tx_ in (tx, kbfgs(0.1), kbfgs_l(0.1, memory=2)):
        st = jax.eval_shape(tx_.init, params)
        for kwargs in ({}, {"previous_batch_stats": None}):
            with pytest.raises(ValueError) as err:
                jax.eval_shape(
                    functools.partial(tx_.update, layer_stats=stats, **kwargs), params, st, params
                )
            msg = str(err.value)
            assert "scale_by_kbfgs" in msg and "`previous_batch_stats`" in msg, msg
            assert "sofim_optax.curvature.two_pass.two_pass_value_grad_and_stats" in msg, msg
            assert "previous_batch_stats=layer_stats" in msg, msg  # the first step
    # ... checked like layer_stats, naming the argument ...
    wrong = {"dense": LayerStats(jnp.ones((6, 4)), jnp.ones((6, 1, 3)), jnp.ones((6, 1, 3)))}
    with pytest.raises(ValueError, match=r"previous_batch_stats of layer 'dense'.*expected inputs"):
        jax.eval_shape(
            functools.partial(tx.update, layer_stats=stats, previous_batch_stats=wrong),
            params,
            state,
            params,
        )
    with pytest.raises(ValueError, match=r"previous_batch_stats has key 'dens'.*Did you mean"):
        jax.eval_shape(
            functools.partial(
                tx.update, layer_stats=stats, previous_batch_stats={"dens": stats["dense"]}
            ),
            params,
            state,
            params,
        )
    # ... and holds the layers of layer_stats.
    two = make_params(jnp.float32, MLP)
    both = rand_stats(rng, MLP, dtype=jnp.float32)
    with pytest.raises(
        ValueError, match=r"same layers.*missing from previous_batch_stats: \['Dense_1'\]"
    ):
        jax.eval_shape(
            functools.partial(
                tx.update, layer_stats=both, previous_batch_stats={"Dense_0": both["Dense_0"]}
            ),
            two,
            jax.eval_shape(tx.init, two),
            two,
        )
    for kwargs, match in [
        ({"memory": 0}, "memory"),
        ({"ema": 1.0}, "ema"),
        ({"pair_ema": -0.1}, "pair_ema"),
        ({"damping": -1.0}, "damping"),
        ({"mu1": 1.5}, "mu1"),
        ({"lbfgs_method": "x"}, "lbfgs_method"),
    ]:
        with pytest.raises(ValueError, match=match):
            scale_by_kbfgs(**kwargs)


# ----------------------------------------------------------------------------------------
# optax conformance.
# ----------------------------------------------------------------------------------------

MLP = {"Dense_0": ((3, 4), True, None), "Dense_1": ((4, 2), True, None)}


def conf_problem(seed=0, dtype=jnp.float32, steps=3):
    """Like ``problem`` but with ``previous_batch_stats`` at every step, so that one
    compilation serves all steps (at the first step they are ignored: there is no previous
    minibatch in the state yet)."""
    params, grads_seq, stats_seq, prev_seq = problem(seed, steps, layers=MLP, dtype=dtype)
    prev_seq[0] = prev_seq[1]
    return params, grads_seq, stats_seq, prev_seq


def test_multisteps_forwards_extra_args():
    params, grads_seq, stats_seq, prev_seq = conf_problem()
    ms = optax.MultiSteps(kbfgs(0.1, damping=0.1), every_k_schedule=2)
    state = jax.jit(ms.init)(params)
    step = jax.jit(ms.update)
    u, state = step(
        grads_seq[0], state, params, layer_stats=stats_seq[0], previous_batch_stats=prev_seq[0]
    )
    assert all(float(np.abs(np.asarray(x)).max()) == 0.0 for x in jax.tree.leaves(u))
    u, state = step(
        grads_seq[1], state, params, layer_stats=stats_seq[1], previous_batch_stats=prev_seq[1]
    )
    ref = kbfgs(0.1, damping=0.1)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, grads_seq[0], grads_seq[1])
    want, _ = jax.jit(ref.update)(
        mean,
        jax.jit(ref.init)(params),
        params,
        layer_stats=stats_seq[1],
        previous_batch_stats=prev_seq[1],
    )
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_fallback_identity_for_uncovered_layers():
    params, grads_seq, stats_seq, prev_seq = conf_problem()
    stats_seq = [{"Dense_0": s["Dense_0"]} for s in stats_seq]
    prev_seq = [{"Dense_0": p["Dense_0"]} for p in prev_seq]
    updates, state = run_steps(
        scale_by_kbfgs(fallback=None), params, grads_seq, stats_seq, prev_seq
    )
    for u, g in zip(updates, grads_seq):
        np.testing.assert_array_equal(u["Dense_1"]["kernel"], g["Dense_1"]["kernel"])
        assert not np.allclose(u["Dense_0"]["kernel"], g["Dense_0"]["kernel"])
    assert int(state.curvature.hg_updates[1]) == 0 and not bool(state.curvature.started[1])


# ----------------------------------------------------------------------------------------
# The two-pass train step with a linen model.
# ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_pass_train_step_linen():
    nn = pytest.importorskip("flax.linen")
    from sofim_optax.curvature import linen as linen_capture
    from sofim_optax.curvature.two_pass import (
        make_two_pass_train_step,
        two_pass_value_grad_and_stats,
    )

    class AE(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(6)(nn.relu(nn.Dense(3)(nn.relu(nn.Dense(8)(x)))))

    rng = np.random.default_rng(0)
    z = rng.standard_normal((400, 2))
    data = arr(1 / (1 + np.exp(-(z @ rng.standard_normal((2, 6))))))
    model = AE()
    variables = jax.jit(model.init)(jax.random.key(0), data[:1])

    def loss_fn(v, x):
        return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(model.apply(v, x), x), -1))

    batches = [(data[i : i + 100],) for i in range(0, 400, 100)]
    # The helper's second pass equals a direct capture of the previous batch at the same params.
    _, _, st, prev = jax.jit(
        lambda v: two_pass_value_grad_and_stats(loss_fn, v, batches[1], batches[0])
    )(variables)
    _, _, direct = jax.jit(lambda v: linen_capture.value_grad_and_stats(loss_fn, v, *batches[0]))(
        variables
    )
    assert sorted(prev) == sorted(st) == ["Dense_0", "Dense_1", "Dense_2"]
    np.testing.assert_allclose(prev["Dense_1"].outputs, direct["Dense_1"].outputs, rtol=1e-6)

    for opt in (kbfgs_l(0.3, damping=0.3, memory=5),):  # kbfgs: same code path, one fewer compile
        step = jax.jit(make_two_pass_train_step(loss_fn, opt))
        v, state, previous = variables, opt.init(variables), None
        losses = []
        for epoch in range(4):
            for b in batches:
                v, state, loss = step(v, state, b, previous)
                previous = b
                losses.append(float(loss))
        inner = [s for s in state if isinstance(s, ScaleByKbfgsState)][0]
        assert int(inner.curvature.hg_updates.min()) > 5
        assert np.isfinite(losses).all() and np.mean(losses[-4:]) < np.mean(losses[:4]), losses


def test_inject_hyperparams_needs_memory_as_a_static_argument():
    """K-BFGS(L) works under ``inject_hyperparams`` with its ``static_args``; without them the
    error names ``memory`` and ``static_args`` (it used to be an unrelated TypeError)."""
    params = {"Dense_0": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros((2,))}}
    injected = optax.inject_hyperparams(kbfgs_l, static_args=kbfgs_l.static_args)(
        learning_rate=0.1, memory=3
    )
    state = injected.init(params)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.1)
    assert kbfgs.static_args == kbfgs_l.static_args == ("memory", "max_factor_dim")
    with pytest.raises(TypeError, match=r"memory must be a Python int.*static_args"):
        optax.inject_hyperparams(kbfgs)(learning_rate=0.1, memory=5).init(params)
