"""Smoke tests of the experiment scripts on generated IDX fixtures (no real data needed)."""

import json

import numpy as np
import pytest

from experiments import compare, datasets, loop, models, registry, tune
from experiments.benchmarks import step_time as benchmark_step_time


@pytest.fixture
def fixture_dir(tmp_path):
    datasets.write_fixture_idx(tmp_path, n_train=96, n_test=40, seed=1)
    return tmp_path


@pytest.mark.slow  # (one of the suite's slowest, 5-11 s; make test-slow)
def test_compare_runs_both_protocols_and_writes_reports(fixture_dir, tmp_path, capsys):
    out = tmp_path / "run"
    results = compare.main(
        [
            "--data-dir",
            str(fixture_dir),
            "--no-verify",
            "--epochs",
            "2",
            "--batch-size",
            "32",
            "--ae-epochs",
            "2",
            "--ae-batch-size",
            "32",
            "--optimizers",
            "sofim,adam",
            "--out",
            str(out),
            "--no-progress",
            "--set",
            "sofim.damping=0.25",
        ]
    )
    assert [r.optimizer for r in results["classify"]] == ["sofim", "adam"]
    assert [r.task for r in results["autoencoder"]] == ["autoencoder", "autoencoder"]
    assert results["classify"][0].hparams["damping"] == 0.25
    printed = capsys.readouterr().out
    for label in ("SOFIM", "Adam"):
        assert f"| {label} |" in printed
    for task, n_metrics in (("classify", 3), ("autoencoder", 2)):
        payload = json.loads((out / task / "results.json").read_text())
        assert payload["versions"]["jax"]
        assert len(payload["runs"]) == 2 and all(len(r["epochs"]) == 2 for r in payload["runs"])
        for run in payload["runs"]:
            for epoch in run["epochs"]:
                assert np.isfinite(epoch["train_loss"]) and np.isfinite(epoch["test_loss"])
                if task == "classify":
                    assert 0.0 <= epoch["test_accuracy"] <= 1.0
        assert (out / task / "curves.png").stat().st_size > 10_000
        assert (out / task / "table.md").read_text().count("\n|") >= 6
    summary = (out / "summary.md").read_text()
    assert "classify" in summary and "autoencoder" in summary and "Time to target" in summary


def test_compare_rejects_unknown_optimizer(fixture_dir, tmp_path):
    with pytest.raises(SystemExit):
        compare.main(
            [
                "--data-dir",
                str(fixture_dir),
                "--no-verify",
                "--optimizers",
                "nope",
                "--out",
                str(tmp_path),
            ]
        )


def test_training_reduces_loss_on_fixture(fixture_dir):
    data = compare.load_data(str(fixture_dir), None, flatten=False, verify=False)
    # Memorising 96 random images: a working optimizer drives the training loss down.
    result = loop.train(
        models.make_model("mlp"), "sofim", data, epochs=15, batch_size=32, progress=False
    )
    losses = [e.train_loss for e in result.epochs]
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.slow  # (~8 s each; the library's sharded steps are checked in test_sharding.py)
@pytest.mark.parametrize("optimizer", ["kfac", "mbf"])
def test_data_parallel_training_equals_one_device(fixture_dir, optimizer):
    """--devices: the same run split over 4 (simulated) devices gives the same losses."""
    data = compare.load_data(str(fixture_dir), None, flatten=False, verify=False)
    runs = [
        loop.train(
            models.make_model("mlp"),
            optimizer,
            data,
            epochs=2,
            batch_size=32,
            progress=False,
            devices=devices,
            hparams={"inverse_period": 2},
        )
        for devices in (1, 4)
    ]
    one, four = ([(e.train_loss, e.test_loss) for e in r.epochs] for r in runs)
    np.testing.assert_allclose(four, one, rtol=2e-4)
    with pytest.raises(ValueError, match="does not split over 3 devices"):
        loop.train(models.make_model("mlp"), optimizer, data, epochs=1, batch_size=32, devices=3)


def test_unknown_optimizer_and_model_raise():
    with pytest.raises(ValueError, match="unknown optimizer"):
        registry.make_optimizer("nope")
    with pytest.raises(ValueError, match="unknown model"):
        models.make_model("nope")


def test_tune_grid_and_selection_rule(fixture_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(tune.GRIDS, "sgdm", {"learning_rate": [1e-6, 0.05]})
    best = tune.main(
        [
            "--data-dir",
            str(fixture_dir),
            "--no-verify",
            "--optimizers",
            "sgdm",
            "--epochs",
            "3",
            "--batch-size",
            "32",
            "--out",
            str(tmp_path),
        ]
    )
    trials = best["sgdm"]["trials"]
    assert [t["hparams"]["learning_rate"] for t in trials] == [1e-6, 0.05]
    assert best["sgdm"]["best"]["hparams"]["learning_rate"] == 0.05  # a vanishing step cannot win
    assert (tmp_path / "tune_mlp.json").exists()


def test_benchmark_runs_and_reports_every_contender(monkeypatch):
    contenders = {k: benchmark_step_time.CONTENDERS[k] for k in ("sgdm", "sofim (global)")}
    monkeypatch.setattr(benchmark_step_time, "CONTENDERS", contenders)
    res = benchmark_step_time.benchmark_model("mlp", batch_size=16, rounds=2, steps=2)
    assert set(res) == set(contenders)
    assert all(v["train step"] > 0 and v["update only"] > 0 for v in res.values())


@pytest.mark.slow  # (two short training runs, ~5 s)
def test_periods_check_trains_both_variants(fixture_dir, tmp_path, capsys):
    from experiments.benchmarks import periods

    rows = periods.main(
        [
            *("--data-dir", str(fixture_dir), "--no-verify", "--no-progress"),
            *("--optimizers", "kfac,kpsvd", "--epochs", "1", "--batch-size", "32"),
            *("--out", str(tmp_path)),
        ]
    )
    assert [r["method"] for r in rows] == ["kfac", "kpsvd"]
    for r in rows:
        assert np.isfinite(r["defaults"]) and np.isfinite(r["every step"])
        # three steps: refreshing at every step changes the second and third
        assert r["defaults"] != r["every step"]
        np.testing.assert_allclose(
            r["defaults lose (%)"], 100 * (r["defaults"] / r["every step"] - 1)
        )
    assert periods.every_step("kpsvd")["max_iters"] == 100
    assert "| KPSVD |" in capsys.readouterr().out
    assert (tmp_path / "periods.json").exists()
