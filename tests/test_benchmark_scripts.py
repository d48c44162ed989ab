"""Argument parsing of the benchmark scripts (their runs are too slow for the suite)."""

import pytest

from experiments import benchmark_mbf


def test_mbf_points_parse_into_one_point_grids():
    grids = benchmark_mbf.parse_points("sgdm:learning_rate=0.1; mbf:learning_rate=0.001,damping=0.01;mbf:learning_rate=3e-3")
    assert grids == {
        "sgdm": [{"learning_rate": 0.1}],
        "mbf": [{"learning_rate": 0.001, "damping": 0.01}, {"learning_rate": 0.003}],
    }
    assert benchmark_mbf.parse_points(None) == {}
    assert benchmark_mbf.parse_points("") == {}


@pytest.mark.parametrize("bad", ["lbfgs:learning_rate=1", "sgdm learning_rate=1", "adam:learning_rate"])
def test_mbf_points_refuse_bad_entries(bad):
    with pytest.raises(ValueError, match="--points entry"):
        benchmark_mbf.parse_points(bad)
