"""Curvature statistics: the :class:`LayerStats` contract and capture adapters.

* :mod:`sofim_optax.curvature.linen` — ``value_grad_and_stats`` for
  ``flax.linen`` models (``Dense``, ``Conv``).
* :mod:`sofim_optax.curvature.nnx` — ``value_grad_and_stats`` for ``flax.nnx``
  models (``Linear``, ``Conv``).
* :mod:`sofim_optax.curvature.losses` — losses that register the model's
  likelihood for the sampled Fisher.
* :mod:`sofim_optax.curvature.two_pass` — the two-pass step of K-BFGS (current and
  previous minibatch at the current parameters).
"""

from sofim_optax.curvature import linen, losses, nnx, two_pass
from sofim_optax.curvature._capture import CaptureError
from sofim_optax.curvature.stats import LayerStats, LayerStatsDict

__all__ = ["CaptureError", "LayerStats", "LayerStatsDict", "linen", "losses", "nnx", "two_pass"]
