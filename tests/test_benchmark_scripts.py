"""Argument handling of the benchmark scripts (their runs are too slow for the suite), and the
few parts small enough to run on tiny shapes."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from experiments import harness
from experiments.benchmarks import mbf as benchmark_mbf
from sofim_optax import distributed


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


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (simulated) devices")
def test_sharding_benchmark_counts_each_devices_share_of_a_refresh():
    from experiments.benchmarks import sharding

    stacks = {"a": jnp.stack([jnp.eye(5)] * 6), "b": jnp.stack([jnp.eye(3)] * 2)}
    one = 4.0 * (6 * 5**3 + 2 * 3**3)  # eigh: 4 d³ multiply-adds per matrix
    jaxpr = jax.make_jaxpr(lambda s: distributed.map_stacks(jnp.linalg.eigh, s))(stacks).jaxpr
    assert sharding.refresh_macs(jaxpr, 0) == pytest.approx(one)
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(lambda s: distributed.map_stacks(jnp.linalg.eigh, s))(stacks).jaxpr
    shares = [sharding.refresh_macs(jaxpr, d) for d in range(4)]
    loads = distributed.plan({"a": 6, "b": 2}, {"a": 5, "b": 3}, 4).loads
    assert shares == pytest.approx([4.0 * load for load in loads])
    assert sum(shares) == pytest.approx(one)
    rows = sharding.with_ratios(
        [
            {
                "model": "m",
                "method": "kfac",
                "devices": n,
                "refresh_macs": max(s),
                "step_macs": 1.0,
                "state_bytes_replicated": 8.0,
                "state_bytes_sharded": 8.0 / n,
                "state_bytes_partitioned": 8.0 / n,
                **{f"{c}_{f}": 0 for c in ("all-reduce", "all-gather") for f in ("count", "bytes")},
            }
            for n, s in ((1, [one]), (4, shares))
        ]
    )
    assert rows[1]["refresh_macs_vs_1/n"] == pytest.approx(4 * max(shares) / one)
    assert "| m | kfac | 4 |" in sharding.table(rows)
    hlo = (
        "  %a = f32[10,10]{1,0} all-reduce(%x), replica_groups={}\n"
        "  %b = (f32[4], bf16[2]) all-gather-start(%y)"
    )
    assert sharding.collectives(hlo) == {"all-reduce": (1, 400.0), "all-gather": (1, 20.0)}


def test_mbf_layout_part_compares_two_layouts_of_the_same_product():
    # 70 rows in blocks of at most 32: three chunks of 24 (two padded entries per column).
    args = SimpleNamespace(layout_shape="70,6", rounds=1, steps=1)
    r = benchmark_mbf.benchmark_layout(args)
    assert r["block"] == 24
    assert r["max_abs_difference"] < 1e-4
    assert set(r["ms"]) == {"library", "transpose_free"}
    assert r["ratios"]["library"] == 1.0
