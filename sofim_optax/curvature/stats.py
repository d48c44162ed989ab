"""The statistics contract shared by every curvature-based transformation.

A captured layer computes ``outputs = inputs @ kernel.reshape(-1, d_out) + bias``
(the bias only when the layer has one). For every such layer the capture
adapters return a :class:`LayerStats` holding, per example:

* dense layers: ``inputs (N, d_in)``, ``output_grads (N, d_out)``,
  ``outputs (N, d_out)``; on inputs ``(N, L_1, ..., d_in)`` the middle axes are
  flattened into ``T`` positions: ``(N, T, d_in)``, ``(N, T, d_out)``;
* convolutions: ``inputs (N, T, kh*kw*c_in)`` (patches, flattened in the
  kernel's own ``(kh, kw, c_in)`` order), ``output_grads (N, T, c_out)``,
  ``outputs (N, T, c_out)``, with ``T`` the number of output positions. The
  example axis ``N`` stays apart from ``T``: the transformations refuse a
  convolution's statistics flattened to ``(N*T, ·)``.

``output_grads`` are gradients of the *per-example* loss with respect to the
layer's pre-activation output. For a batch-mean loss ``L = mean_n l_n`` that is
``N * dL/ds``.

The statistics of a model are a flat ``dict[str, LayerStats]`` keyed by the
layer's module path joined with ``/`` (for example ``"Encoder_0/Dense_1"``);
the transformation finds that layer's ``kernel`` (and ``bias``) at that path
inside ``params`` (or inside ``params["params"]`` for a Flax variables dict).
"""

from __future__ import annotations

from typing import NamedTuple

import jax


class LayerStats(NamedTuple):
    """Per-example quantities of one dense or convolutional layer.

    Attributes:
      inputs: the layer's inputs, ``(N, d_in)`` for dense layers or the
        flattened patches ``(N, T, kh*kw*c_in)`` for convolutions.
      output_grads: gradients of the per-example loss with respect to the
        pre-activation outputs, ``(N, d_out)`` or ``(N, T, c_out)``.
      outputs: the pre-activation outputs, same shape as ``output_grads``.
    """

    inputs: jax.Array
    output_grads: jax.Array
    outputs: jax.Array


#: The statistics of a model, ``{layer path: LayerStats}`` (paths joined with ``/``).
LayerStatsDict = dict[str, LayerStats]
