"""Argument handling of the benchmark scripts (their runs are too slow for the suite)."""

import pytest

from experiments import harness
from experiments.benchmarks import mbf as benchmark_mbf


def test_mbf_set_pins_the_named_optimizers_and_keeps_the_other_grids():
    overrides = harness.parse_overrides(
        ["sgdm.learning_rate=0.1", "mbf.learning_rate=0.001", "mbf.damping=0.01"]
    )
    grids = benchmark_mbf.grids_with_overrides(overrides)
    assert grids["sgdm"] == [{"learning_rate": 0.1}]
    assert grids["mbf"] == [{"learning_rate": 0.001, "damping": 0.01}]
    assert grids["adam"] == benchmark_mbf.GRIDS["adam"]
    assert benchmark_mbf.grids_with_overrides({}) == benchmark_mbf.GRIDS


def test_mbf_set_refuses_unknown_optimizers():
    with pytest.raises(ValueError, match="lbfgs"):
        benchmark_mbf.grids_with_overrides({"lbfgs": {"learning_rate": 1.0}})
