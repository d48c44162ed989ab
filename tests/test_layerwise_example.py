"""The worked example of ``docs/layerwise.md`` runs and equals a numpy reference (float64).

The first ``python`` code block of that page is executed as it is, so the example a reader
copies is the one tested.
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sofim_optax.curvature import LayerStats

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "layerwise.md"


@pytest.fixture(scope="module")
def example():
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[0]
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace["scale_by_diagonal_kronecker"]


def reference_step(stats_seq, grads_seq, has_bias, damping, ema):
    """Two diagonals per layer, averaged with ρ_k = min(1 − 1/k, ema), then V / (a gᵀ + λ)."""
    a_avg = g_avg = None
    out = []
    for k, ((inputs, output_grads), v) in enumerate(zip(stats_seq, grads_seq), start=1):
        x = np.asarray(inputs, np.float64)
        if has_bias:
            x = np.concatenate([x, np.ones(x.shape[:-1] + (1,))], axis=-1)
        g = np.asarray(output_grads, np.float64)
        n = g.shape[0]
        fresh_a = np.mean(x.reshape(-1, x.shape[-1]) ** 2, axis=0)
        fresh_g = np.sum(g.reshape(-1, g.shape[-1]) ** 2, axis=0) / n
        rho = min(1 - 1 / k, ema)
        a_avg = fresh_a if a_avg is None else rho * a_avg + (1 - rho) * fresh_a
        g_avg = fresh_g if g_avg is None else rho * g_avg + (1 - rho) * fresh_g
        out.append(np.asarray(v, np.float64) / (np.outer(a_avg, g_avg) + damping))
    return out


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_example_matches_reference(example, kind, x64):
    rng = np.random.default_rng(0)
    if kind == "dense":
        kernel_shape, stats_shape = (3, 2), (5,)
    else:
        kernel_shape, stats_shape = (2, 2, 1, 2), (5, 4)  # 4 output positions
    d_in, d_out = int(np.prod(kernel_shape[:-1])), kernel_shape[-1]
    params = {"layer": {"kernel": jnp.zeros(kernel_shape), "bias": jnp.zeros((d_out,))}}
    tx = example(damping=1e-2, ema=0.5)
    state = tx.init(params)
    stats_seq, grads_seq, got = [], [], []
    for _ in range(3):
        inputs = rng.standard_normal(stats_shape + (d_in,))
        output_grads = rng.standard_normal(stats_shape + (d_out,))
        v = rng.standard_normal((d_in + 1, d_out))
        grads = {
            "layer": {
                "kernel": jnp.asarray(v[:-1].reshape(kernel_shape)),
                "bias": jnp.asarray(v[-1]),
            }
        }
        stats = {"layer": LayerStats(jnp.asarray(inputs), jnp.asarray(output_grads), None)}
        updates, state = jax.jit(lambda g, s, st: tx.update(g, s, layer_stats=st))(
            grads, state, stats
        )
        got.append(
            np.concatenate(
                [
                    np.asarray(updates["layer"]["kernel"]).reshape(d_in, d_out),
                    np.asarray(updates["layer"]["bias"])[None],
                ]
            )
        )
        stats_seq.append((inputs, output_grads))
        grads_seq.append(v)
    want = reference_step(stats_seq, grads_seq, True, 1e-2, 0.5)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-10)


def test_example_chains_and_refuses_missing_statistics(example):
    params = {"Dense_0": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros((2,))}}
    tx = optax.chain(example(), optax.scale(-0.1))
    state = tx.init(params)
    with pytest.raises(TypeError, match="layer_stats"):
        tx.update(params, state, params)
