"""``max_factor_dim`` in the methods whose factors cannot be kept block-diagonal (the KPSVD
family, K-BFGS and K-BFGS(L)): a layer over the cap takes the fallback path, owns no state,
and its statistics are ignored; the other layers are preconditioned as without the cap."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sofim_optax

CAPPED = {
    "kpsvd": sofim_optax.scale_by_kpsvd,
    "kpsvd_deflation": sofim_optax.scale_by_kpsvd_deflation,
    "kfac_corrected": sofim_optax.scale_by_kfac_corrected,
    "kpsvd_lanczos": sofim_optax.scale_by_kpsvd_lanczos,
    "kbfgs": sofim_optax.scale_by_kbfgs,
    "kbfgs_l": lambda **kw: sofim_optax.scale_by_kbfgs(memory=3, **kw),
}


def _problem():
    rng = np.random.default_rng(0)
    shapes = {"small": (3, 4), "wide": (4, 12)}  # "wide": d_g = 12 > the cap of 8
    params = {
        k: {"kernel": jnp.asarray(rng.standard_normal(s)), "bias": jnp.zeros(s[1])}
        for k, s in shapes.items()
    }
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape)), params)
    stats = {
        k: sofim_optax.LayerStats(
            jnp.asarray(rng.standard_normal((6, s[0]))),
            jnp.asarray(rng.standard_normal((6, s[1]))),
            outputs=jnp.asarray(rng.standard_normal((6, s[1]))),
        )
        for k, s in shapes.items()
    }
    return params, grads, stats


def _extra(name, stats):
    return {"previous_batch_stats": stats} if name.startswith("kbfgs") else {}


@pytest.mark.parametrize("name", sorted(CAPPED))
def test_a_layer_over_the_cap_takes_the_fallback(name, caplog):
    params, grads, stats = _problem()
    capped = CAPPED[name](max_factor_dim=8)
    with caplog.at_level(logging.INFO, logger="sofim_optax"):
        state = capped.init(params)
        out, _ = capped.update(grads, state, params, layer_stats=stats, **_extra(name, stats))
    assert "['wide'] have a factor larger than max_factor_dim=8" in caplog.text
    # no curvature of the wide layer: no square matrix in the state is 12 × 12 or larger
    assert all(
        x.ndim < 2 or x.shape[-1] != x.shape[-2] or x.shape[-1] < 12 for x in jax.tree.leaves(state)
    )
    # the wide layer gets what the fallback (the diagonal Fisher step) gives it alone
    diagonal = CAPPED[name](max_factor_dim=8)
    only_wide = {"wide": grads["wide"]}
    alone, _ = diagonal.update(
        only_wide,
        diagonal.init({"wide": params["wide"]}),
        {"wide": params["wide"]},
        layer_stats={},
        **_extra(name, {}),
    )
    jax.tree.map(np.testing.assert_allclose, out["wide"], alone["wide"])
    # the small layer is preconditioned exactly as without a cap
    free = CAPPED[name]()
    ref, _ = free.update(grads, free.init(params), params, layer_stats=stats, **_extra(name, stats))
    jax.tree.map(np.testing.assert_allclose, out["small"], ref["small"])
    assert not np.allclose(out["wide"]["kernel"], ref["wide"]["kernel"])


def test_the_cap_must_be_a_positive_int():
    with pytest.raises(ValueError, match="max_factor_dim"):
        sofim_optax.scale_by_kpsvd(max_factor_dim=0)
