"""CIFAR-10/100, SVHN, CURVES and FACES loaders on generated fixtures in the real formats."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from experiments import datasets as ds


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.delenv(ds.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))

    def no_network(*args, **kwargs):
        raise AssertionError("tests must not touch the network")

    monkeypatch.setattr(ds.urllib.request, "urlopen", no_network)


def _raw_cifar_member(path: Path, member: str) -> dict:
    with tarfile.open(path, "r:gz") as tar:
        return pickle.loads(tar.extractfile(member).read(), encoding="bytes")


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_fixture_roundtrip(tmp_path, num_classes):
    path = ds.write_fixture_cifar(tmp_path, num_classes=num_classes, n_train=10, n_test=6, seed=1)
    out = ds.load_arrays(f"cifar{num_classes}", data_dir=tmp_path, verify=False)
    folder = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    test = _raw_cifar_member(path, f"{folder}/{'test_batch' if num_classes == 10 else 'test'}")
    key = b"labels" if num_classes == 10 else b"fine_labels"
    # Independent decoding: row = 1024 red, 1024 green, 1024 blue values, each 32x32 row-major.
    first = test[b"data"][0]
    expected = (
        np.stack([first[c * 1024 : (c + 1) * 1024].reshape(32, 32) for c in range(3)], axis=-1)
        / 255.0
    )
    np.testing.assert_allclose(out.x_test[0], expected, rtol=1e-6)
    np.testing.assert_array_equal(out.y_test, test[key])
    assert out.x_train.shape == (10, 32, 32, 3) and out.x_train.dtype == np.float32
    assert out.y_train.dtype == np.int32 and out.y_train.max() < num_classes
    flat = ds.load_arrays(f"cifar{num_classes}", data_dir=tmp_path, verify=False, flatten=True)
    assert flat.x_train.shape == (10, 3072)


def test_cifar_checksum_and_corruption(tmp_path, monkeypatch):
    path = ds.write_fixture_cifar(tmp_path, n_train=5, n_test=5)
    with pytest.raises(
        ds.DatasetFormatError, match=r"cifar-10-python.tar.gz: .*(MD5 mismatch|bytes, upstream)"
    ):
        ds.load_arrays("cifar10", data_dir=tmp_path)  # the real checksum refuses a fixture
    good = ds.RemoteFile(
        path.name, "http://example.invalid/x", md5=hashlib.md5(path.read_bytes()).hexdigest()
    )
    monkeypatch.setitem(ds.REMOTE_FILES, "cifar10", (good,))
    assert ds.load_arrays("cifar10", data_dir=tmp_path).x_train.shape[0] == 5
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ds.DatasetFormatError, match="cifar-10-python.tar.gz"):
        ds.load_arrays("cifar10", data_dir=tmp_path, verify=False)
    path.write_bytes(b"not a tar file at all")
    with pytest.raises(ds.DatasetFormatError, match="not a readable .tar.gz"):
        ds.load_arrays("cifar10", data_dir=tmp_path, verify=False)


def test_cifar_refuses_foreign_pickles_and_missing_members(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with tarfile.open(path, "w:gz") as tar:
        raw = pickle.dumps({b"data": Evil(), b"labels": []})
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    with pytest.raises(ds.DatasetFormatError, match="refusing to unpickle builtins.print"):
        ds.load_arrays("cifar10", data_dir=tmp_path, verify=False)
    with tarfile.open(path, "w:gz") as tar:
        raw = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    with pytest.raises(ds.DatasetFormatError, match="lacks cifar-10-batches-py/data_batch_2"):
        ds.load_arrays("cifar10", data_dir=tmp_path, verify=False)


def test_svhn_fixture_and_label_ten_is_zero(tmp_path):
    ds.write_fixture_svhn(tmp_path, n_train=7, n_test=5, seed=2)
    raw = scipy.io.loadmat(tmp_path / "test_32x32.mat")
    out = ds.load_arrays("svhn", data_dir=tmp_path, verify=False)
    assert out.x_train.shape == (7, 32, 32, 3) and out.x_test.shape == (5, 32, 32, 3)
    np.testing.assert_allclose(out.x_test[3], raw["X"][:, :, :, 3] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(out.y_test, np.where(raw["y"][:, 0] == 10, 0, raw["y"][:, 0]))
    scipy.io.savemat(
        tmp_path / "train_32x32.mat",
        {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[0], [3]], np.uint8)},
    )
    with pytest.raises(ds.DatasetFormatError, match=r"train_32x32.mat: SVHN labels must be 1..10"):
        ds.load_arrays("svhn", data_dir=tmp_path, verify=False)
    (tmp_path / "train_32x32.mat").write_bytes(b"MATLAB 5.0 garbage" * 10)
    with pytest.raises(ds.DatasetFormatError, match="train_32x32.mat: not a readable MATLAB"):
        ds.load_arrays("svhn", data_dir=tmp_path, verify=False)


def test_curves_and_faces(tmp_path):
    ds.write_fixture_curves(tmp_path, n_train=12, n_test=6, seed=3)
    raw = scipy.io.loadmat(tmp_path / "digs3pts_1.mat")
    out = ds.load_arrays("curves", data_dir=tmp_path, verify=False)
    assert out.y_train is None and out.x_train.shape == (12, 784) and out.x_test.shape == (6, 784)
    np.testing.assert_allclose(out.x_test, raw["bdatatest"], rtol=1e-6)
    ds.write_fixture_faces(tmp_path, n=100, seed=4)
    faces = ds.load_arrays("faces", data_dir=tmp_path, verify=False)
    raw_f = scipy.io.loadmat(tmp_path / "newfaces_rot_single.mat")["newfaces_single"].T
    assert faces.x_train.shape[1] == 625 and faces.y_test is None
    np.testing.assert_array_equal(faces.x_train, raw_f[: len(faces.x_train)])
    np.testing.assert_array_equal(faces.x_test, raw_f[len(raw_f) - len(faces.x_test) :])
    assert len(faces.x_train) + len(faces.x_test) < 100  # the validation gap of the real split
    scipy.io.savemat(
        tmp_path / "digs3pts_1.mat",
        {"bdata": np.full((2, 784), 2.0), "bdatatest": np.zeros((1, 784))},
    )
    with pytest.raises(
        ds.DatasetFormatError,
        match=r"digs3pts_1.mat: 'bdata' values must be finite and in \[0, 1\]",
    ):
        ds.load_arrays("curves", data_dir=tmp_path, verify=False)
    scipy.io.savemat(tmp_path / "digs3pts_1.mat", {"bdata": np.zeros((2, 784))})
    with pytest.raises(ds.DatasetFormatError, match=r"lacks the variable\(s\) \['bdatatest'\]"):
        ds.load_arrays("curves", data_dir=tmp_path, verify=False)


def test_download_into_cache_verifies_before_keeping(tmp_path, monkeypatch):
    src = tmp_path / "src"
    ds.write_fixture_curves(src)
    payload = (src / "digs3pts_1.mat").read_bytes()

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(ds.urllib.request, "urlopen", lambda url, timeout: Response(payload))
    bad = ds.RemoteFile("digs3pts_1.mat", "http://example.invalid/c", md5="0" * 32)
    monkeypatch.setitem(ds.REMOTE_FILES, "curves", (bad,))
    cache = tmp_path / "cache"
    with pytest.raises(ds.DatasetFormatError, match="MD5 mismatch"):
        ds.load_curves(cache_dir=cache)
    assert not list(cache.iterdir())  # nothing partial left
    good = ds.RemoteFile(
        "digs3pts_1.mat", "http://example.invalid/c", md5=hashlib.md5(payload).hexdigest()
    )
    monkeypatch.setitem(ds.REMOTE_FILES, "curves", (good,))
    assert ds.load_curves(cache_dir=cache).x_train.shape == (40, 784)
    with pytest.raises(FileNotFoundError, match="download=False"):
        ds.load_faces(download=False, cache_dir=tmp_path / "empty")


def test_published_checksums_are_recorded():
    assert ds.REMOTE_FILES["cifar10"][0].md5 == "c58f30108f718f92721af3b95e74349a"
    assert all(r.md5 for name in ("cifar10", "cifar100", "svhn") for r in ds.REMOTE_FILES[name])
    assert set(ds.IDX_GZ_MD5["mnist"]) == set(ds.IDX_FILES)
    assert gzip and ds.load_arrays  # the IDX sets keep their payload SHA-256 tables
