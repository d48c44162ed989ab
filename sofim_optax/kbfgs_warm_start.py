"""The authors' warm start of K-BFGS's input factor ``A``.

Before training, the authors average ``mean ā āᵀ`` of every captured layer over one pass of
the training set at the initial parameters and start ``A`` (and its exact damped inverse
``H_a``) from it. :func:`batch_input_factors` computes one minibatch's factors (jittable),
:func:`average_input_factors` averages them, and :func:`warm_start` writes them into a K-BFGS
optimizer state (found anywhere inside a chain).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from sofim_optax import hyperparameters as hp
from sofim_optax import layerwise
from sofim_optax.kbfgs import ScaleByKbfgsState
from sofim_optax.kbfgs_curvature import layouts

__all__ = ["batch_input_factors", "warm_start", "average_input_factors"]


def batch_input_factors(params: Any, layer_stats: Mapping[str, Any]) -> dict[str, jax.Array]:
    """``{layer path: mean ā āᵀ}`` of one minibatch (float32 at least), for :func:`warm_start`.

    Average it over one pass of the training set at the initial parameters (the authors' warm
    start); jittable.
    """
    layout = layerwise.discover_layers(params)
    active = layerwise.check_layer_stats(layout, layer_stats, "batch_input_factors")
    out = {}
    for i in active:
        layer = layout.layers[i]
        x = jnp.asarray(layer_stats[layer.path].inputs)
        dtype = hp.accumulation_dtype(x)
        out[layer.path] = layerwise.input_factor(x, layer.has_bias, dtype)
    return out


def warm_start(opt_state: Any, params: Any, input_factors: Mapping[str, jax.Array]) -> Any:
    """Sets ``A`` of every K-BFGS state inside ``opt_state`` (any nesting: chains,
    ``inject_hyperparams``, ``MultiSteps``) to ``input_factors[path]`` and marks it warm, so
    that the first update keeps it (the authors' code).

    Call it after ``init`` and before the first update. ``input_factors`` maps layer paths to
    ``(d_a, d_a)`` matrices, e.g. the mean over minibatches of :func:`batch_input_factors`;
    layers absent from it keep the default (the first minibatch's ``mean ā āᵀ``).

    Raises:
      ValueError: an unknown path or a wrong shape (naming the layer).
    """
    layout = layerwise.discover_layers(params)
    for path, a in input_factors.items():
        if path not in layout.layer_paths:
            raise ValueError(f"warm_start: no layer {path!r}; layers: {list(layout.layer_paths)}")
        d = layout.layers[layout.index(path)].d_a
        if tuple(jnp.shape(a)) != (d, d):
            raise ValueError(
                f"warm_start: layer {path!r} needs A of shape {(d, d)}, got {tuple(jnp.shape(a))}"
            )

    la, _ = layouts(layout.layers)

    def fix(node):
        if not isinstance(node, ScaleByKbfgsState):
            return node
        curv = node.curvature
        dtype = next(iter(curv.A.values())).dtype
        values = {
            (layout.index(p), "a"): jnp.asarray(a).astype(dtype) for p, a in input_factors.items()
        }
        warm = curv.warm
        for path in input_factors:
            warm = warm.at[layout.index(path)].set(True)
        return node._replace(curvature=curv._replace(A=la.set(curv.A, values), warm=warm))

    return jax.tree.map(fix, opt_state, is_leaf=lambda x: isinstance(x, ScaleByKbfgsState))


def average_input_factors(factors: Iterable[Mapping[str, jax.Array]]) -> dict[str, jax.Array]:
    """Plain mean of a sequence of :func:`batch_input_factors` results."""
    total: dict[str, jax.Array] = {}
    n = 0
    for f in factors:
        n += 1
        for k, v in f.items():
            total[k] = v if k not in total else total[k] + v
    if n == 0:
        raise ValueError("average_input_factors: no minibatch given")
    return {k: v / n for k, v in total.items()}
