"""The shared plumbing of every layer-wise preconditioner (KFAC, the KPSVD family, Mini-Block
Fisher, K-BFGS), public so that a new method is one file on top of it.

A layer-wise method preconditions the gradient of each captured layer (a node of the
parameter tree with a ``kernel`` of ``ndim >= 2``, plus its ``bias``) from that layer's
:class:`~sofim_optax.curvature.LayerStats`, and hands every other parameter to a fallback
transformation. The package is split by concern, each module readable on its own:

=========================================== =======================================================
module                                      what it holds
=========================================== =======================================================
:mod:`sofim_optax.layerwise.layers`         :class:`Layer`, :class:`ParamLayout`,
                                            :func:`discover_layers`, the gradient matrix
                                            ``V = [kernel.reshape(-1, d_out); bias]``
:mod:`sofim_optax.layerwise.checks`         :func:`check_layer_stats` (trace-time errors naming the
                                            layer)
:mod:`sofim_optax.layerwise.factors`        second moments ``A``, ``G``, the EMA warm-up rule,
                                            :class:`FactorLayout` (stacks by size),
                                            :func:`stacked_damped_inverses`
:mod:`sofim_optax.layerwise.block_diagonal` block-diagonal factors (the size cap
                                            ``max_factor_dim``): their statistics and solves
:mod:`sofim_optax.layerwise.fallback`       :class:`FallbackState` and the routing of uncovered
                                            parameters
:mod:`sofim_optax.layerwise.transformation` :class:`LayerwiseMethod` and
                                            :func:`layerwise_transformation`, the skeleton
=========================================== =======================================================

A method is the four functions of a :class:`LayerwiseMethod` (``init``,
``update_statistics``, ``refresh``, ``precondition``) handed to
:func:`layerwise_transformation` with its state class and periods. ``docs/layerwise.md``
walks through a complete example (a 40-line per-layer diagonal method). The aliases that
chain a method with momentum, weight decay and the learning rate are built by
:mod:`sofim_optax.aliases`.
"""

# Each module's __all__ is its public API; the package re-exports all of them.
from sofim_optax.layerwise import (
    block_diagonal,  # noqa: F401  (used by name, not re-exported)
    checks,
    factors,
    fallback,
    layers,
    transformation,
)
from sofim_optax.layerwise.checks import *  # noqa: F403
from sofim_optax.layerwise.factors import *  # noqa: F403
from sofim_optax.layerwise.fallback import *  # noqa: F403
from sofim_optax.layerwise.layers import *  # noqa: F403
from sofim_optax.layerwise.transformation import *  # noqa: F403

__all__ = [
    *layers.__all__,
    *checks.__all__,
    *factors.__all__,
    *fallback.__all__,
    *transformation.__all__,
]
