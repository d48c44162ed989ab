"""Smoke and correctness tests of the KPSVD-family experiment scripts on tiny synthetic data.

``experiments/fisher_approximation.py`` (errors of KFAC/KPSVD/Deflation/KFAC-corrected/Lanczos
against an explicitly formed Fisher block) and ``experiments/benchmarks/kpsvd.py``. No real
data: the Fashion-MNIST loader is replaced by a tiny random dataset.
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from experiments import datasets
from experiments import fisher_approximation as fa
from experiments.benchmarks import kpsvd as benchmark_kpsvd


@pytest.fixture
def samples():
    """Non-Kronecker-structured per-example statistics: ā with a bias column, g correlated with ā."""
    rng = np.random.default_rng(0)
    n, d_in, d_g = 64, 3, 4
    a = np.concatenate([rng.normal(size=(n, d_in)), np.ones((n, 1))], axis=1)
    g = rng.normal(size=(n, d_g)) * (1.0 + np.abs(a[:, :1]))  # heteroscedastic: F ≠ A ⊗ G
    return a, g


def _dense_fisher(a, g):
    """Independent reference: the mean of explicit Kronecker products of outer products."""
    return np.mean([np.kron(np.outer(x, x), np.outer(y, y)) for x, y in zip(a, g)], axis=0)


def _dense_rearrangement(F, d_a, d_g):
    """Van Loan–Pitsianis rearrangement by loops: row (i, j) is vec of block F[i·d_g:(i+1)·d_g, j·d_g:…]."""
    rows = []
    for i in range(d_a):
        for j in range(d_a):
            rows.append(F[i * d_g : (i + 1) * d_g, j * d_g : (j + 1) * d_g].reshape(-1))
    return np.stack(rows)


def test_exact_block_matches_dense_reference(samples):
    a, g = samples
    np.testing.assert_allclose(fa.exact_block(a, g), _dense_fisher(a, g), rtol=1e-12, atol=1e-12)


def test_errors_match_independent_numpy_computation(samples, x64):
    a, g = samples
    d_a, d_g = a.shape[1], g.shape[1]
    F = _dense_fisher(a, g)
    r = fa.block_errors(a, g, tol=1e-12, max_iters=5000, krylov_dim=6)
    err = r["errors"]
    # KFAC: explicit A ⊗ G.
    A, G = a.T @ a / len(a), g.T @ g / len(g)
    kfac = np.linalg.norm(F - np.kron(A, G)) / np.linalg.norm(F)
    assert err["KFAC"] == pytest.approx(kfac, rel=1e-10)
    # Best rank-r errors from the SVD of the loop-built rearrangement.
    s = np.linalg.svd(_dense_rearrangement(F, d_a, d_g), compute_uv=False)
    best = [np.sqrt(np.sum(s[r:] ** 2) / np.sum(s**2)) for r in (1, 2)]
    assert err["optimal rank 1"] == pytest.approx(best[0], rel=1e-8)
    assert err["optimal rank 2"] == pytest.approx(best[1], rel=1e-8)
    assert err["KPSVD"] == pytest.approx(best[0], rel=1e-6)
    assert err["Deflation"] == pytest.approx(best[1], rel=1e-6)
    assert err["Lanczos"] == pytest.approx(best[1], rel=1e-6)
    # KFAC-corrected: explicit best rank-one fit of F − A ⊗ G.
    U, t, Vt = np.linalg.svd(_dense_rearrangement(F - np.kron(A, G), d_a, d_g))
    corr = np.kron(A, G) + t[0] * np.kron(U[:, 0].reshape(d_a, d_a), Vt[0].reshape(d_g, d_g))
    assert err["KFAC-corrected"] == pytest.approx(
        np.linalg.norm(F - corr) / np.linalg.norm(F), rel=1e-6
    )


def test_error_ordering_and_range(samples):
    """float32 solvers as in the script: KPSVD ≤ KFAC, rank 2 ≤ rank 1, corrected ≤ KFAC, in [0, 1]."""
    a, g = samples
    err = fa.block_errors(a.astype(np.float32), g.astype(np.float32))["errors"]
    slack = 1e-4
    assert err["KPSVD"] <= err["KFAC"] + slack
    assert err["KFAC-corrected"] <= err["KFAC"] + slack
    assert err["Deflation"] <= err["KPSVD"] + slack
    assert err["Lanczos"] <= err["KPSVD"] + slack
    assert err["KPSVD"] < err["KFAC"] - 1e-3  # the synthetic F is far from A ⊗ G: a strict gain
    for m in (
        "KPSVD",
        "Deflation",
        "Lanczos",
        "KFAC-corrected",
        "optimal rank 1",
        "optimal rank 2",
    ):
        assert 0.0 <= err[m] <= 1.0, m  # best fits: the zero approximation has error 1
    assert err["KFAC"] >= 0.0
    assert err["KPSVD"] >= err["optimal rank 1"] - slack
    assert err["Deflation"] >= err["optimal rank 2"] - slack


def test_exact_kronecker_block_has_zero_error(x64):
    """F = A ⊗ G exactly when every example has the same g up to sign: all errors vanish."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(20, 3))
    g = np.outer(rng.choice([-1.0, 1.0], size=20), rng.normal(size=4))
    err = fa.block_errors(a, g, tol=1e-12, max_iters=2000)["errors"]
    for m in fa.METHODS:
        assert err[m] == pytest.approx(0.0, abs=1e-6), m


def test_sub_block_and_fit_modes(samples):
    a, g = samples
    rng = np.random.default_rng(0)
    ia, ig = fa.select_block(a.shape[1], g.shape[1], 6, rng)
    assert len(ia) * len(ig) <= 6 and ia[-1] == a.shape[1] - 1  # bias coordinate kept
    ia_all, ig_all = fa.select_block(a.shape[1], g.shape[1], 10**6, rng)
    assert list(ia_all) == list(range(a.shape[1])) and list(ig_all) == list(range(g.shape[1]))
    # The block of F is the F of the restricted samples.
    np.testing.assert_allclose(
        fa.exact_block(a[:, ia], g[:, ig]),
        fa.exact_block(a, g)[
            np.ix_(np.ravel(ia[:, None] * g.shape[1] + ig), np.ravel(ia[:, None] * g.shape[1] + ig))
        ],
        rtol=1e-12,
    )
    blk = fa.block_errors(a, g, ia, ig, fit="block", optima=False)["errors"]
    lay = fa.block_errors(a, g, ia, ig, fit="layer", optima=False)["errors"]
    assert blk["KFAC"] == pytest.approx(lay["KFAC"], rel=1e-5)  # KFAC's factors restrict exactly
    assert blk["KPSVD"] <= lay["KPSVD"] + 1e-4  # fitted to the block is best on the block
    full_b = fa.block_errors(a, g, fit="block", optima=False)["errors"]
    full_l = fa.block_errors(a, g, fit="layer", optima=False)["errors"]
    for m in fa.METHODS:
        assert full_b[m] == pytest.approx(full_l[m], rel=1e-5), m
    with pytest.raises(ValueError, match="fit"):
        fa.block_errors(a, g, fit="nope")


@pytest.fixture
def tiny_data(monkeypatch):
    rng = np.random.default_rng(0)
    x = (rng.random((64, 28, 28)) * 255).astype(np.uint8)
    y = rng.integers(0, 10, 64).astype(np.uint8)
    ds = types.SimpleNamespace(x_train=x, y_train=y, x_test=x[:8], y_test=y[:8])
    monkeypatch.setattr(datasets, "load_fashion_mnist", lambda *a, **k: ds)
    return ds


def test_fisher_approximation_script_smoke(tiny_data, tmp_path):
    res = fa.main(
        [
            "--encoder",
            "6,3",
            "--batch-size",
            "16",
            "--steps",
            "2",
            "--every",
            "1",
            "--max-block",
            "30",
            "--layers",
            "Dense_1,Dense_3",
            "--max-iters",
            "200",
            "--out",
            str(tmp_path),
        ]
    )
    assert res["iterations"] == [0, 1, 2]
    assert (tmp_path / "fisher_errors.png").stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    for name in ("Dense_1", "Dense_3"):
        r = saved["layers"][name]
        assert len(r["idx_a"]) * len(r["idx_g"]) <= 30
        for m in fa.METHODS:
            assert len(r["errors"][m]) == 3
            assert all(np.isfinite(r["errors"][m]))
        assert max(np.subtract(r["errors"]["KPSVD"], r["errors"]["KFAC"])) <= 1e-4
    assert "KFAC-corrected" in (tmp_path / "table.md").read_text()


@pytest.mark.slow
def test_benchmark_kpsvd_script_smoke(tiny_data, tmp_path):
    res = benchmark_kpsvd.main(
        [
            "--quick",
            "--encoder",
            "5,3",
            "--batch-size",
            "16",
            "--steps",
            "4",
            "--tune-steps",
            "2",
            "--select-last",
            "2",
            "--rounds",
            "1",
            "--block-steps",
            "2",
            "--inverse-period",
            "2",
            "--eval-examples",
            "32",
            "--out",
            str(tmp_path),
            "--methods",
            "kfac,lanczos,adam",
        ]
    )  # three methods keep the compile time down
    assert set(res["step_time"]["ratios"]) == {"kfac", "lanczos", "adam"}
    assert res["step_time"]["ratios"]["kfac"] == pytest.approx(1.0)
    for m, r in res["train"]["runs"].items():
        assert len(r["losses"]) == 4 and np.all(np.isfinite(r["losses"])), m
    for f in ("results.json", "table.md", "curves.png"):
        assert (tmp_path / f).stat().st_size > 0
