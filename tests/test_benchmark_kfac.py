"""Smoke tests of experiments/benchmarks/kfac*.py and their kfac_jax_runner.py on tiny sizes.

No real data and no kfac-jax environment are needed, except for the last test, which runs
the kfac-jax runner when ``SOFIM_OPTAX_KFAC_JAX_VENV`` points at a virtual environment that
imports ``kfac_jax`` (0.0.8 with jax 0.9.0, as ``experiments.benchmarks.kfac`` creates it).
"""

import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.benchmarks import curves, kfac, kfac_cost, kfac_jax_env, kfac_training, problems
from experiments.benchmarks import kfac_jax_runner as runner

TINY_ENCODER = (16, 8, 4)


@pytest.fixture(scope="module")
def tiny_ae():
    x = np.random.default_rng(0).random((64, 36), dtype=np.float32)
    return problems.autoencoder_problem(32, encoder=TINY_ENCODER, x=x)


def test_capture_cost_reports_ratios_to_value_and_grad(tiny_ae):
    r = kfac_cost.capture_cost(tiny_ae, rounds=2, calls=2)
    assert set(r["times"]) == {
        "value_and_grad",
        "value_grad_and_stats (empirical)",
        "value_grad_and_stats (sampled)",
    }
    assert r["ratios"]["value_and_grad"] == 1.0
    assert all(t > 0 and math.isfinite(t) for t in r["times"].values())
    assert all(len(s) == 2 for s in r["samples"].values())
    table = kfac_cost.capture_table({"autoencoder": {**r, "batch": 32}})
    assert table.count("\n| autoencoder |") == 3


def test_step_times_interleaves_against_sgd_and_checks_the_block(tiny_ae):
    calls = []
    external = {"fake": lambda steps: calls.append(steps) or 1e-3}
    r = kfac_cost.step_times(
        tiny_ae,
        rounds=2,
        block_steps=4,
        inverse_period=2,
        contenders=["KFAC (eigh, sampled)", "SGD-momentum"],
        external=external,
    )
    assert list(r["times"]) == ["SGD-momentum", "KFAC (eigh, sampled)", "fake"]  # baseline first
    assert r["ratios"]["SGD-momentum"] == 1.0 and calls == [4, 4]
    assert all(math.isfinite(v) and v > 0 for v in r["ratios"].values())
    with pytest.raises(ValueError, match="multiple of inverse_period"):
        kfac_cost.step_times(
            tiny_ae, rounds=1, block_steps=3, inverse_period=2, contenders=["SGD-momentum"]
        )


def test_cnn_problem_capture_runs():
    cnn = problems.cnn_problem(4, channels=(2, 4), hidden=8, side=8)
    stats = jax.eval_shape(
        lambda p, *b: kfac_cost.curvature_linen.value_grad_and_stats(cnn.loss_fn, p, *b)[2],
        cnn.params,
        *cnn.batch,
    )
    assert sorted(stats) == ["Conv_0", "Conv_1", "Dense_0", "Dense_1"]


def test_export_npz_roundtrip_and_runner_matches_flax_model(tiny_ae, tmp_path):
    x = np.asarray(tiny_ae.batch[0])
    path = tmp_path / "data.npz"
    kfac_jax_env.export_npz(path, x, tiny_ae.params)
    x_back, params = runner.load(str(path))
    np.testing.assert_array_equal(x_back, x)
    assert len(params) == 2 * len(TINY_ENCODER)
    for i, (w, b) in enumerate(params):
        np.testing.assert_array_equal(w, tiny_ae.params[f"Dense_{i}"]["kernel"])
        np.testing.assert_array_equal(b, tiny_ae.params[f"Dense_{i}"]["bias"])
    # Same architecture (ReLU placement, linear code layer) and the same loss, L2 included.
    logits = jax.jit(tiny_ae.model.apply)({"params": tiny_ae.params}, x)
    np.testing.assert_allclose(jax.jit(runner.forward)(params, x), logits, rtol=1e-5, atol=1e-5)
    ours = jax.jit(tiny_ae.loss_fn)(tiny_ae.params, x)
    theirs = jax.jit(runner.make_loss(problems.L2_REG, register=False))(params, x)
    np.testing.assert_allclose(theirs, ours, rtol=1e-5)


def test_runner_config_is_json_and_complete():
    runs = kfac_training._kfac_jax_points(
        "kfac_jax_fixed", [{"learning_rate": 0.1, "damping": 10.0}], steps=5
    )
    runs += kfac_training._kfac_jax_points("kfac_jax_adaptive", [{"damping": 100.0}], steps=5)
    cfg = json.loads(
        json.dumps(kfac_jax_env.runner_config(runs, batch_size=16, seed=3, warmup_steps=4))
    )
    assert cfg["batch_size"] == 16 and cfg["seed"] == 3 and cfg["warmup_steps"] == 4
    assert cfg["inverse_period"] == problems.INVERSE_PERIOD and cfg["l2_reg"] == problems.L2_REG
    assert cfg["estimation_mode"] == "fisher_gradients"
    assert [r["mode"] for r in cfg["runs"]] == ["fixed", "adaptive"]
    assert (
        cfg["runs"][0]["learning_rate"] == 0.1 and cfg["runs"][0]["momentum"] == problems.MOMENTUM
    )
    assert "learning_rate" not in cfg["runs"][1]


def test_batch_indices_is_a_fresh_permutation_per_epoch():
    it = runner.batch_indices(10, 3, seed=7)
    got = [next(it) for _ in range(6)]  # 3 batches per epoch, 2 epochs
    rng = np.random.default_rng(7)
    p1, p2 = rng.permutation(10), rng.permutation(10)
    want = [p1[0:3], p1[3:6], p1[6:9], p2[0:3], p2[3:6], p2[6:9]]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_train_run_and_curve_helpers(tiny_ae):
    x = np.asarray(tiny_ae.batch[0])
    big = np.concatenate([x, x[::-1]])
    tx, step = kfac_cost.train_step_for(
        tiny_ae, "eigh", "sampled", inverse_period=2
    )  # compiled in the test above
    state = problems.set_hparams(tx.init(tiny_ae.params), learning_rate=0.05, damping=1.0)
    assert float(state.hyperparams["damping"]) == 1.0
    r = problems.train_run(
        step, tiny_ae.params, state, big, steps=7, batch_size=32, seed=0, log_every=3
    )
    assert len(r["losses"]) == 7 and all(np.isfinite(r["losses"]))
    assert [s for s, _ in r["time_log"]] == [1, 3, 6, 7]
    assert (
        curves.mean_last([1.0, 2.0, 3.0], 2) == 2.5
        and curves.mean_last([1.0, float("nan")], 2) == math.inf
    )
    np.testing.assert_allclose(curves.smoothed([1.0, 3.0, 5.0, 7.0], 2), [1.0, 2.0, 4.0, 6.0])
    run = {"losses": [4.0, 2.0, 2.0, 2.0], "step_time": 0.5}
    assert curves.loss_at_time(run["losses"], run["step_time"], 1.0, 1) == 2.0
    assert math.isnan(curves.loss_at_time(run["losses"], run["step_time"], 3.0, 1))
    assert problems.full_loss(tiny_ae, tiny_ae.params, big, chunk=48) == pytest.approx(
        float(tiny_ae.loss_fn(tiny_ae.params, jnp.asarray(big))), rel=1e-5
    )


def test_cli_parsing():
    args = kfac._parse(["--quick", "--parts", "capture,step_time"])
    assert args.parts == ["capture", "step_time"] and args.step_rounds == 1 and args.steps <= 40
    with pytest.raises(SystemExit):
        kfac._parse(["--parts", "nope"])
    with pytest.raises(SystemExit):
        kfac._parse(["--block-steps", "30"])
    assert kfac_jax_env.default_kfac_jax_venv().name == "kfac-jax-0.0.8-venv"


KFAC_JAX_VENV = os.environ.get("SOFIM_OPTAX_KFAC_JAX_VENV")


@pytest.mark.skipif(
    not KFAC_JAX_VENV or not kfac_jax_env.kfac_jax_venv_ready(Path(KFAC_JAX_VENV)),
    reason="set SOFIM_OPTAX_KFAC_JAX_VENV to a virtual environment that imports kfac_jax 0.0.8 (jax 0.9.0) "
    "to run the kfac-jax runner",
)
def test_kfac_jax_runner_train_and_serve(tiny_ae, tmp_path):
    python = kfac_jax_env.venv_python(Path(KFAC_JAX_VENV))
    x = np.random.default_rng(1).random((48, 36), dtype=np.float32)
    data = tmp_path / "data.npz"
    kfac_jax_env.export_npz(data, x, tiny_ae.params)
    runs = [
        {
            "name": "f",
            "mode": "fixed",
            "learning_rate": 0.01,
            "momentum": 0.9,
            "damping": 1.0,
            "steps": 4,
        },
        {"name": "a", "mode": "adaptive", "damping": 1.0, "steps": 4},
        {"name": "s", "mode": "sgdm", "learning_rate": 1e-3, "momentum": 0.9, "steps": 4},
    ]
    out = kfac_jax_env.run_kfac_jax_train(
        python,
        tmp_path,
        data,
        kfac_jax_env.runner_config(runs, batch_size=16, seed=0, log_every=2, eval_examples=32),
        "t",
        log=lambda s: None,
    )
    assert out["library"] == "kfac-jax 0.0.8"
    assert [len(r["losses"]) for r in out["runs"]] == [4, 4, 4]
    assert all(np.isfinite(r["final_full_loss"]) for r in out["runs"])
    # The first loss is the same for every run: same initial parameters, same first batch.
    first = {r["losses"][0] for r in out["runs"]}
    assert max(first) - min(first) < 1e-3
    ours = float(
        tiny_ae.loss_fn(tiny_ae.params, jnp.asarray(x[next(runner.batch_indices(48, 16, 0))]))
    )
    assert abs(out["runs"][0]["losses"][0] - ours) < 1e-3 * abs(ours)
    server = kfac_jax_env.KfacJaxServer(
        python,
        tmp_path,
        data,
        kfac_jax_env.runner_config(runs, batch_size=16, seed=0, warmup_steps=2),
    )
    try:
        assert server.time_steps("f", 2) > 0 and server.time_steps("a", 2) > 0
    finally:
        server.close()
    assert server.proc.returncode == 0
