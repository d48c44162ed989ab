"""Embedding lookups (``nn.Embed``, ``nnx.Embed``): their statistics (one-hot rows, token
frequencies), the tied ``attend`` head, lookups that are not per example, and the first
preconditioned steps of KFAC (exact diagonal input factor) and Mini-Block Fisher (per-row
blocks) against dense references.

References are independent of the library: per-example gradients from
``jax.vmap(jax.grad(...))`` of the loss on one example, token counts from ``numpy.bincount``,
the KFAC step from ``numpy.kron`` and ``numpy.linalg.solve``, the mini-blocks from the
per-example gradients directly; everything in float64.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sofim_optax
from sofim_optax.curvature import CaptureError
from sofim_optax.curvature import linen as capture_linen
from sofim_optax.curvature import nnx as capture_nnx

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")

VOCAB, WIDTH, CLASSES = 9, 4, 3
F64 = dict(param_dtype=jnp.float64)


class LinenNet(nn.Module):
    """Lookup, a dense mix per position, then the mean over positions into a head (or, tied,
    the table's own ``attend``)."""

    tied: bool = False

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(VOCAB, WIDTH, **F64, name="emb")
        h = jnp.tanh(nn.Dense(WIDTH, **F64, name="mix")(emb(ids)))
        if ids.ndim > 1:
            h = h.mean(axis=tuple(range(1, ids.ndim)))
        if self.tied:
            return emb.attend(h)
        return nn.Dense(CLASSES, **F64, name="head")(h)


class NnxNet(nnx.Module):
    def __init__(self, tied=False, seed=0):
        rngs = nnx.Rngs(seed)
        self.tied = tied
        self.emb = nnx.Embed(VOCAB, WIDTH, param_dtype=jnp.float64, rngs=rngs)
        self.mix = nnx.Linear(WIDTH, WIDTH, param_dtype=jnp.float64, rngs=rngs)
        self.head = nnx.Linear(WIDTH, CLASSES, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, ids):
        h = jnp.tanh(self.mix(self.emb(ids)))
        if ids.ndim > 1:
            h = h.mean(axis=tuple(range(1, ids.ndim)))
        return self.emb.attend(h) if self.tied else self.head(h)


def _ids(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape))


def _labels(n):
    return jnp.asarray(np.arange(n) % CLASSES)


def _xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _linen(ids, tied=False):
    model = LinenNet(tied)
    params = model.init(jax.random.key(0), ids)
    return params, lambda p, ids, y: _xent(model.apply(p, ids), y)


def _check_lookup_stats(st, ids, per_example_table):
    x, g = np.asarray(st.inputs), np.asarray(st.output_grads)
    if x.ndim == 2:
        x, g = x[:, None], g[:, None]
    flat = np.asarray(ids).reshape(ids.shape[0], -1)
    np.testing.assert_array_equal(x, np.eye(VOCAB)[flat])  # one-hot rows
    # Σ_t onehot_t g_tᵀ is each example's gradient of the table.
    np.testing.assert_allclose(
        np.einsum("ntv,ntd->nvd", x, g), per_example_table, rtol=1e-10, atol=1e-13
    )
    freq = np.bincount(flat.reshape(-1), minlength=VOCAB) / flat.size
    np.testing.assert_allclose(np.asarray(st.input_square_mean()), freq, rtol=1e-12)


@pytest.mark.parametrize("shape", [(6, 5), (6,), (6, 2, 3)])
def test_linen_lookup_statistics_against_per_example_gradients(x64, shape):
    ids, y = _ids(shape), _labels(shape[0])
    params, loss_fn = _linen(ids)
    _, grads, stats = jax.jit(lambda p: capture_linen.value_grad_and_stats(loss_fn, p, ids, y))(
        params
    )
    assert sorted(stats) == ["emb", "head", "mix"]
    per_example = jax.vmap(
        jax.grad(lambda p, i, yi: loss_fn(p, i[None], yi[None])), in_axes=(None, 0, 0)
    )(params, ids, y)
    _check_lookup_stats(stats["emb"], ids, per_example["params"]["emb"]["embedding"])
    x, g = np.asarray(stats["emb"].inputs), np.asarray(stats["emb"].output_grads)
    np.testing.assert_allclose(  # their mean over examples is the gradient
        x.reshape(-1, VOCAB).T @ g.reshape(-1, WIDTH) / shape[0],
        grads["params"]["emb"]["embedding"],
        rtol=1e-10,
    )


@pytest.mark.parametrize("shape", [(6, 5), (6,)])
def test_nnx_lookup_statistics_against_per_example_gradients(x64, shape):
    ids, y = _ids(shape), _labels(shape[0])
    model = NnxNet()

    def loss_fn(m, ids, y):
        return _xent(m(ids), y)

    _, grads, stats = capture_nnx.value_grad_and_stats(loss_fn, model, ids, y)
    assert sorted(stats) == ["emb", "head", "mix"]
    graphdef, state = nnx.split(model, nnx.Param)

    def one(p, i, yi):
        return loss_fn(nnx.merge(graphdef, p), i[None], yi[None])

    per_example = nnx.to_pure_dict(jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(state, ids, y))
    _check_lookup_stats(stats["emb"], ids, per_example["emb"]["embedding"])


def _per_example_table_grads(loss_fn, params, ids, y):
    """Independent reference: each example's own gradient of the table (vmapped)."""
    return jax.vmap(jax.grad(lambda p, i, yi: loss_fn(p, i[None], yi[None])), in_axes=(None, 0, 0))(
        params, ids, y
    )["params"]["emb"]["embedding"]


def test_a_tied_table_combines_its_lookup_and_its_head(x64, caplog):
    # logits = h @ Eᵀ: the head's positions join the lookup's with their roles swapped, so
    # Σ_t inputs_t ⊗ output_grads_t is each example's exact gradient of the table.
    ids, y = _ids((6, 5)), _labels(6)
    params, loss_fn = _linen(ids, tied=True)
    with caplog.at_level(logging.INFO, logger="sofim_optax"):
        _, grads, stats = capture_linen.value_grad_and_stats(loss_fn, params, ids, y)
    assert any("'emb' is also the output head" in r.getMessage() for r in caplog.records)
    st = stats["emb"]
    assert st.layer_kind == "tied_embedding" and st.outputs is None
    assert st.inputs.shape == (6, 5 + 1, VOCAB) and st.output_grads.shape == (6, 6, WIDTH)
    per_example = np.asarray(_per_example_table_grads(loss_fn, params, ids, y))
    np.testing.assert_allclose(
        np.einsum("ntv,ntd->nvd", st.inputs, st.output_grads), per_example, rtol=1e-10, atol=1e-14
    )
    np.testing.assert_allclose(
        st.input_square_mean(), np.mean(np.square(st.inputs).reshape(-1, VOCAB), 0), rtol=1e-12
    )

    model = NnxNet(tied=True)
    _, _, nnx_stats = capture_nnx.value_grad_and_stats(
        lambda m, i, t: _xent(m(i), t), model, ids, y
    )
    assert sorted(nnx_stats) == ["emb", "mix"]
    assert nnx_stats["emb"].layer_kind == "tied_embedding"
    assert nnx_stats["emb"].inputs.shape == (6, 6, VOCAB)


@pytest.mark.slow  # (one of the suite's slowest, 5-11 s; make test-slow)
def test_first_steps_on_a_tied_table(x64):
    # KFAC: the diagonal of the combined input factor (the token frequencies plus the squared
    # logit gradients) and the combined output factor; MBF: per-row blocks of the exact
    # per-example gradients; K-BFGS: its fallback (the head has no pre-activations).
    ids, y = _ids((7, 5), seed=3), _labels(7)
    params, loss_fn = _linen(ids, tied=True)
    damping = 0.05
    v, st, per_example, outs = _steps(
        params,
        loss_fn,
        ids,
        y,
        {
            "kfac": sofim_optax.scale_by_kfac(damping=damping),
            "mbf": sofim_optax.scale_by_mini_block_fisher(damping=damping, dense_block_size=3),
            "kbfgs": sofim_optax.scale_by_kbfgs(damping=damping),
        },
        previous=True,
    )
    v = np.asarray(v)
    a = np.asarray(st.inputs).reshape(-1, VOCAB)
    A = np.diag(np.mean(np.square(a), axis=0))
    g = np.asarray(st.output_grads).reshape(-1, WIDTH)
    G = g.T @ g / ids.shape[0]
    pi = np.sqrt((np.trace(A) / VOCAB) / (np.trace(G) / WIDTH))
    Ad = A + pi * np.sqrt(damping) * np.eye(VOCAB)
    Gd = G + np.sqrt(damping) / pi * np.eye(WIDTH)
    want = np.linalg.solve(np.kron(Ad, Gd), v.reshape(-1)).reshape(v.shape)
    np.testing.assert_allclose(outs["kfac"], want, rtol=1e-9, atol=1e-12 * np.abs(want).max())

    want = np.zeros_like(v)
    for row in range(VOCAB):
        for cols in (slice(0, 2), slice(2, 4)):
            vb = per_example[:, row, cols]
            F = vb.T @ vb / vb.shape[0]
            want[row, cols] = np.linalg.solve(F + damping * np.eye(2), v[row, cols])
    np.testing.assert_allclose(outs["mbf"], want, rtol=1e-9, atol=1e-12 * np.abs(want).max())

    np.testing.assert_allclose(outs["kbfgs"], v / (v**2 + damping), rtol=1e-10)


def test_a_lookup_without_the_batch_axis_is_refused_with_the_fix():
    class Positions(nn.Module):
        @nn.compact
        def __call__(self, x):
            pos = nn.Embed(5, 3, name="pos")(jnp.arange(x.shape[1])[None])
            return nn.Dense(2, name="head")((x + pos).mean(1))

    x = jnp.ones((4, 5, 3))
    params = Positions().init(jax.random.key(0), x)
    with pytest.raises(CaptureError, match=r"'pos'.*\(1, 5\).*N = 4.*broadcast_to"):
        capture_linen.value_grad_and_stats(lambda p: Positions().apply(p, x).sum(), params)


def test_float_ids_are_refused_naming_the_layer():
    spec = sofim_optax.curvature._layer_specs.EmbedSpec(4)
    with pytest.raises(CaptureError, match="'tok'.*integer"):
        spec.check_inputs("tok", jax.ShapeDtypeStruct((3, 2), jnp.float32))


def _steps(params, loss_fn, ids, y, txs, previous=False):
    _, grads, stats = capture_linen.value_grad_and_stats(loss_fn, params, ids, y)
    per_example = _per_example_table_grads(loss_fn, params, ids, y)
    extra = {"previous_batch_stats": stats} if previous else {}
    outs = {
        k: tx.update(grads, tx.init(params), params, layer_stats=stats, **extra)[0]["params"][
            "emb"
        ]["embedding"]
        for k, tx in txs.items()
    }
    return grads["params"]["emb"]["embedding"], stats["emb"], np.asarray(per_example), outs


@pytest.mark.parametrize("inverse", ["eigh", "cholesky"])
def test_first_kfac_step_uses_the_exact_diagonal_input_factor(x64, inverse):
    ids, y = _ids((7, 5), seed=3), _labels(7)
    ids = ids.at[:, 0].set(0)  # a frequent token, and (VOCAB = 9 > 7·5 / 5) rare ones
    params, loss_fn = _linen(ids)
    damping = 0.05
    v, st, _, outs = _steps(
        params,
        loss_fn,
        ids,
        y,
        {"kfac": sofim_optax.scale_by_kfac(damping=damping, inverse=inverse)},
    )
    flat = np.asarray(ids).reshape(-1)
    A = np.diag(np.bincount(flat, minlength=VOCAB) / flat.size)
    g = np.asarray(st.output_grads).reshape(-1, WIDTH)
    G = g.T @ g / ids.shape[0]
    pi = np.sqrt((np.trace(A) / VOCAB) / (np.trace(G) / WIDTH))
    Ad = A + pi * np.sqrt(damping) * np.eye(VOCAB)
    Gd = G + np.sqrt(damping) / pi * np.eye(WIDTH)
    want = np.linalg.solve(np.kron(Ad, Gd), np.asarray(v).reshape(-1)).reshape(v.shape)
    np.testing.assert_allclose(outs["kfac"], want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


def test_kfac_keeps_the_input_factor_of_a_table_as_a_vector(x64):
    ids = _ids((4, 3))
    params, _ = _linen(ids)
    state = sofim_optax.scale_by_kfac().init(params)
    stacks = {k: v.shape for k, v in state.curvature.factors.items()}
    assert stacks["d1"] == (VOCAB, 1, 1), stacks  # V blocks of one, not a V × V matrix


def test_first_mbf_step_uses_per_row_blocks(x64):
    ids, y = _ids((7, 5), seed=3), _labels(7)
    params, loss_fn = _linen(ids)
    damping, block = 0.05, 3  # WIDTH = 4: chunks of 2 and 2 per row
    v, _, per_example, outs = _steps(
        params,
        loss_fn,
        ids,
        y,
        {"mbf": sofim_optax.scale_by_mini_block_fisher(damping=damping, dense_block_size=block)},
    )
    want = np.zeros_like(np.asarray(v))
    for row in range(VOCAB):
        for cols in (slice(0, 2), slice(2, 4)):
            vb = per_example[:, row, cols]
            F = vb.T @ vb / vb.shape[0]
            want[row, cols] = np.linalg.solve(F + damping * np.eye(2), np.asarray(v)[row, cols])
    np.testing.assert_allclose(outs["mbf"], want, rtol=1e-9, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize(
    "name",
    [
        "scale_by_kpsvd",
        "scale_by_kpsvd_deflation",
        "scale_by_kfac_corrected",
        "scale_by_kpsvd_lanczos",
    ],
)
def test_the_kpsvd_family_finds_diagonal_input_factors_for_a_table(x64, name):
    # One-hot samples make every input-side factor a weighted sum of e_v e_vᵀ, so the power
    # and Lanczos iterations return diagonal factors although the family does not impose it.
    ids, y = _ids((7, 5), seed=3), _labels(7)
    params, loss_fn = _linen(ids)
    _, grads, stats = capture_linen.value_grad_and_stats(loss_fn, params, ids, y)
    tx = getattr(sofim_optax, name)(damping=0.05)
    _, state = tx.update(grads, tx.init(params), params, layer_stats=stats)
    is_curv = lambda x: isinstance(x, sofim_optax.KroneckerSvdCurvature)  # noqa: E731
    (curv,) = [s for s in jax.tree.leaves(state, is_leaf=is_curv) if is_curv(s)]
    tables = [np.asarray(f) for f in curv.factors.values() if f.shape[-2:] == (VOCAB, VOCAB)]
    assert tables, {k: f.shape for k, f in curv.factors.items()}  # A1 (and A2 at rank two)
    for f in tables:
        assert np.abs(np.einsum("...ii->...i", f)).max() > 0
        np.testing.assert_array_equal(f * (1 - np.eye(VOCAB)), 0.0)  # off the diagonal


METHODS = {  # (kernel_output_axes: attention's output projection, for MBF's partition)
    "kfac": lambda axes: sofim_optax.kfac(learning_rate=0.1, damping=0.1),
    "kpsvd": lambda axes: sofim_optax.kpsvd(learning_rate=0.1, damping=0.1),
    "mbf": lambda axes: sofim_optax.mini_block_fisher(
        learning_rate=0.1, damping=0.1, kernel_output_axes=axes
    ),
}


@pytest.mark.slow  # (one of the suite's slowest, 5-11 s; make test-slow)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_tiny_token_transformer_trains(name, caplog):
    """Embed → self-attention → LayerNorm → mean → head, on a task that needs the tokens: is
    token 0 among the first three? Every lookup and projection is preconditioned."""

    class TokenNet(nn.Module):
        @nn.compact
        def __call__(self, ids):
            h = nn.Embed(12, 16, name="tok")(ids)
            h = h + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(h)
            h = nn.LayerNorm(name="norm")(h)
            return nn.Dense(2, name="head")(h.mean(1))

    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 12, (64, 6)))
    y = jnp.asarray((ids[:, :3] == 0).any(axis=1).astype(np.int32))
    model = TokenNet()
    params = model.init(jax.random.key(0), ids)
    loss_fn = lambda p: _xent(model.apply(p, ids), y)  # noqa: E731
    axes = capture_linen.kernel_output_axes(loss_fn, params)
    tx = METHODS[name](axes)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads, stats = capture_linen.value_grad_and_stats(loss_fn, params)
        updates, state = tx.update(grads, state, params, layer_stats=stats)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    with caplog.at_level(logging.INFO, logger="sofim_optax"):
        for _ in range(25):
            params, state, loss = step(params, state)
            losses.append(float(loss))
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < 0.6 * losses[0], f"{name}: {losses}"
    line = next(r.getMessage() for r in caplog.records if "preconditioning" in r.getMessage())
    # the table, the 4 projections of attention and the head
    assert "preconditioning 6 layer(s)" in line and "tok" in line, line
