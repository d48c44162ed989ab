"""The shared plumbing of every layer-wise preconditioner (KFAC, the KPSVD family, Mini-Block
Fisher, K-BFGS), public so that a new method is one file on top of it.

A layer-wise method preconditions the gradient of each captured layer (a node of the
parameter tree with a ``kernel`` of ``ndim >= 2``, plus its ``bias``) from that layer's
:class:`~sofim_optax.curvature.LayerStats`, and hands every other parameter to a fallback
transformation. The package is split by concern, each module readable on its own:

==================================== =====================================================
module                               what it holds
==================================== =====================================================
:mod:`sofim_optax.layerwise.layers`  :class:`Layer`, :class:`ParamLayout`,
                                     :func:`discover_layers`, the gradient matrix
                                     ``V = [kernel.reshape(-1, d_out); bias]``
:mod:`sofim_optax.layerwise.checks`  :func:`check_layer_stats` (trace-time errors naming the
                                     layer)
:mod:`sofim_optax.layerwise.factors` second moments ``A``, ``G``, the EMA warm-up rule,
                                     :class:`FactorLayout` (stacks by size),
                                     :func:`stacked_damped_inverse`
:mod:`sofim_optax.layerwise.fallback` :class:`FallbackState` and the routing of uncovered
                                     parameters
:mod:`sofim_optax.layerwise.transformation` :class:`LayerwiseMethod` and
                                     :func:`layerwise_transformation`, the skeleton
==================================== =====================================================

A method is the four functions of a :class:`LayerwiseMethod` (``init``,
``update_statistics``, ``refresh``, ``precondition``) handed to
:func:`layerwise_transformation` with its state class and periods. ``docs/layerwise.md``
walks through a complete example (a 40-line per-layer diagonal method). The aliases that
chain a method with momentum, weight decay and the learning rate are built by
:mod:`sofim_optax.aliases`.
"""

from sofim_optax.layerwise.checks import check_layer_stats, missing_stats_message
from sofim_optax.layerwise.factors import (
    FactorLayout,
    ema_decay,
    homogeneous_inputs,
    input_factor,
    output_factor,
    stacked_damped_inverse,
)
from sofim_optax.layerwise.fallback import FallbackState, fallback_init, fallback_update
from sofim_optax.layerwise.layers import (
    Layer,
    ParamLayout,
    discover_layers,
    gradient_matrix,
    split_matrix,
)
from sofim_optax.layerwise.transformation import LayerwiseMethod, layerwise_transformation

__all__ = [
    "Layer",
    "ParamLayout",
    "discover_layers",
    "gradient_matrix",
    "split_matrix",
    "check_layer_stats",
    "missing_stats_message",
    "homogeneous_inputs",
    "input_factor",
    "output_factor",
    "ema_decay",
    "FactorLayout",
    "stacked_damped_inverse",
    "FallbackState",
    "fallback_init",
    "fallback_update",
    "LayerwiseMethod",
    "layerwise_transformation",
]
