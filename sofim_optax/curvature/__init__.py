"""Curvature statistics: the :class:`LayerStats` contract and capture adapters."""

from sofim_optax.curvature.stats import LayerStats, LayerStatsDict

__all__ = ["LayerStats", "LayerStatsDict"]
