"""Tests of experiments/datasets/ (IDX reading, lookup order, download, checks)."""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import struct
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from experiments import datasets as ds  # noqa: E402

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")
MP = pytest.MonkeyPatch


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Hide the real data and user cache; refuse real network access."""
    monkeypatch.delenv(ds.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setitem(ds.SYSTEM_DATA_DIRS, "fashion-mnist", ())
    monkeypatch.setitem(ds.SYSTEM_DATA_DIRS, "mnist", ())

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("tests must not touch the network")

    monkeypatch.setattr(ds.urllib.request, "urlopen", no_network)


def _read_fixture_arrays(directory: Path) -> list[np.ndarray]:
    """Decode the files written by write_fixture_idx independently of read_idx."""
    out = []
    for name in ds.IDX_FILES:
        plain = directory / name
        if plain.exists():
            raw = plain.read_bytes()
        else:
            raw = gzip.decompress((directory / f"{name}.gz").read_bytes())
        ndim = raw[3]
        dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        out.append(np.frombuffer(raw[4 + 4 * ndim :], dtype=np.uint8).reshape(dims))
    return out


def _assert_matches(dataset: ds.Dataset, directory: Path, n_train: int, n_test: int) -> None:
    expected = _read_fixture_arrays(directory)
    got = [dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test]
    shapes = [(n_train, 28, 28), (n_train,), (n_test, 28, 28), (n_test,)]
    for arr, ref, shape in zip(got, expected, shapes):
        assert arr.dtype == np.uint8
        assert arr.shape == shape
        np.testing.assert_array_equal(arr, ref)
    assert dataset.y_train.max() <= 9
    assert Path(dataset.source) == directory


# ---------------------------------------------------------------------------
# read_idx
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8", "<i4", "<f8"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_roundtrip_dtypes(tmp_path: Path, dtype: str, suffix: str) -> None:
    rng = np.random.default_rng(1)
    array = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    path = tmp_path / f"a-idx3{suffix}"
    digest = ds.write_idx(path, array)
    assert digest == hashlib.sha256(ds.encode_idx(array)).hexdigest()
    out = ds.read_idx(path)
    assert out.shape == (3, 4, 5)
    assert out.dtype == np.dtype(dtype).newbyteorder("=")
    assert out.dtype.isnative
    np.testing.assert_array_equal(out, array)
    out[0, 0, 0] = 0  # owns writable memory


def test_read_idx_header_layout(tmp_path: Path) -> None:
    payload = bytes([0, 0, 0x0C, 2]) + struct.pack(">II", 2, 1) + struct.pack(">ii", -7, 1 << 20)
    path = tmp_path / "hand-made"
    path.write_bytes(payload)
    expected = np.array([[-7], [1 << 20]], dtype=np.int32)
    np.testing.assert_array_equal(ds.read_idx(str(path)), expected)


def test_read_idx_sniffs_gzip_without_suffix(tmp_path: Path) -> None:
    array = np.arange(10, dtype=np.uint8)
    path = tmp_path / "labels-without-suffix"
    path.write_bytes(gzip.compress(ds.encode_idx(array)))
    np.testing.assert_array_equal(ds.read_idx(path), array)


# ---------------------------------------------------------------------------
# Corruption
# ---------------------------------------------------------------------------

_GOOD = ds.encode_idx(np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28) % 251)


def _bad_magic() -> bytes:
    return b"\x01\x00" + _GOOD[2:]


def _bad_dtype() -> bytes:
    return _GOOD[:2] + b"\x0a" + _GOOD[3:]


def _truncated() -> bytes:
    return _GOOD[:-5]


def _trailing() -> bytes:
    return _GOOD + b"\x00\x00\x00"


def _truncated_header() -> bytes:
    return _GOOD[:9]


def _tiny() -> bytes:
    return b"\x00\x00"


CORRUPTIONS = {
    "bad-magic": (_bad_magic, "magic"),
    "unknown-dtype": (_bad_dtype, "dtype code 0x0A"),
    "truncated-data": (_truncated, "truncated"),
    "trailing-bytes": (_trailing, "extra trailing bytes"),
    "truncated-header": (_truncated_header, "header"),
    "too-short": (_tiny, "not an IDX file"),
}


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_read_idx_corrupt_payload(tmp_path: Path, case: str, compress: bool) -> None:
    make, phrase = CORRUPTIONS[case]
    payload = make()
    path = tmp_path / ("t10k-images-idx3-ubyte" + (".gz" if compress else ""))
    path.write_bytes(gzip.compress(payload) if compress else payload)
    with pytest.raises(ds.DatasetFormatError, match=phrase) as info:
        ds.read_idx(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(gzip.compress(_GOOD)[:-40], id="truncated-stream"),
        pytest.param(gzip.compress(_GOOD)[:10], id="header-only"),
        pytest.param(b"\x1f\x8b" + bytes(range(200)), id="garbage-after-magic"),
        pytest.param(b"this is not gzip at all", id="not-gzip"),
        pytest.param(gzip.compress(_GOOD)[:-8] + b"\x00" * 8, id="bad-crc"),
    ],
)
def test_read_idx_broken_gzip(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(data)
    with pytest.raises(ds.DatasetFormatError, match="gzip") as info:
        ds.read_idx(path)
    assert str(path) in str(info.value)


def test_load_corrupt_file_names_it(tmp_path: Path) -> None:
    checksums = ds.write_fixture_idx(tmp_path, compress=True)
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(gzip.decompress(bad.read_bytes())[:-1]))
    with pytest.raises(ds.DatasetFormatError, match="truncated") as info:
        ds.load_fashion_mnist(tmp_path, checksums=checksums, verify=False)
    assert str(bad) in str(info.value)
    assert bad.exists()  # never delete files outside the cache


def test_checksum_mismatch(tmp_path: Path) -> None:
    checksums = ds.write_fixture_idx(tmp_path, compress=False)
    checksums["t10k-images-idx3-ubyte"] = "0" * 64
    with pytest.raises(ds.DatasetFormatError, match="SHA-256 mismatch") as info:
        ds.load_fashion_mnist(tmp_path, checksums=checksums)
    assert str(tmp_path / "t10k-images-idx3-ubyte") in str(info.value)
    # Switching verification off accepts the same files.
    ds.load_fashion_mnist(tmp_path, checksums=checksums, verify=False)


def test_builtin_checksums_reject_fixture(tmp_path: Path) -> None:
    ds.write_fixture_idx(tmp_path)
    with pytest.raises(ds.DatasetFormatError, match="train-images-idx3-ubyte.gz"):
        ds.load_fashion_mnist(tmp_path)


def test_checksum_keys_may_carry_gz_suffix(tmp_path: Path) -> None:
    checksums = ds.write_fixture_idx(tmp_path)
    with_gz = {f"{k}.gz": v for k, v in checksums.items()}
    ds.load_fashion_mnist(tmp_path, checksums=with_gz)
    with_gz["train-labels-idx1-ubyte.gz"] = "f" * 64
    with pytest.raises(ds.DatasetFormatError, match="train-labels"):
        ds.load_fashion_mnist(tmp_path, checksums=with_gz)


def _write_set(directory: Path, arrays: list[np.ndarray]) -> dict[str, str]:
    return {name: ds.write_idx(directory / name, a) for name, a in zip(ds.IDX_FILES, arrays)}


def test_shape_checks(tmp_path: Path) -> None:
    good = [
        np.zeros((4, 28, 28), np.uint8),
        np.zeros(4, np.uint8),
        np.zeros((2, 28, 28), np.uint8),
        np.zeros(2, np.uint8),
    ]
    variants = {
        "t10k-images-idx3-ubyte": (2, np.zeros((2, 27, 28), np.uint8)),
        "train-images-idx3-ubyte": (0, np.zeros((4, 28, 28), np.float32)),
        "train-labels-idx1-ubyte": (1, np.zeros(5, np.uint8)),
        "t10k-labels-idx1-ubyte": (3, np.full(2, 10, np.uint8)),
    }
    for named, (index, replacement) in variants.items():
        directory = tmp_path / named
        directory.mkdir()
        arrays = list(good)
        arrays[index] = replacement
        sums = _write_set(directory, arrays)
        with pytest.raises(ds.DatasetFormatError) as info:
            ds.load_fashion_mnist(directory, checksums=sums)
        assert str(directory / named) in str(info.value)


# ---------------------------------------------------------------------------
# Lookup order
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_load_explicit_dir(tmp_path: Path, compress: bool) -> None:
    sums = ds.write_fixture_idx(tmp_path, n_train=20, n_test=7, seed=3, compress=compress)
    data = ds.load_fashion_mnist(tmp_path, checksums=sums)
    _assert_matches(data, tmp_path, 20, 7)
    data = ds.load_fashion_mnist(str(tmp_path), checksums=sums)
    _assert_matches(data, tmp_path, 20, 7)
    assert "x_train=(20, 28, 28)" in repr(data)


def test_mixed_compression_and_plain_preferred(tmp_path: Path) -> None:
    sums = ds.write_fixture_idx(tmp_path, compress=True)
    # An uncompressed copy of one file next to the .gz is fine (and preferred).
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(
        gzip.decompress((tmp_path / "train-labels-idx1-ubyte.gz").read_bytes())
    )
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    ds.write_fixture_idx(tmp_path / "other", compress=False)
    data_other = ds.load_fashion_mnist(tmp_path / "other", verify=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(
        (tmp_path / "other" / "t10k-labels-idx1-ubyte").read_bytes()
    )
    data = ds.load_fashion_mnist(tmp_path, checksums=sums)
    np.testing.assert_array_equal(data.y_test, data_other.y_test)


def test_explicit_dir_missing_files(tmp_path: Path, monkeypatch: MP) -> None:
    # Even with valid data elsewhere, an explicit dir never falls through.
    ds.write_fixture_idx(tmp_path / "env")
    monkeypatch.setenv(ds.ENV_VAR, str(tmp_path / "env"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        ds.load_fashion_mnist(empty)
    assert str(empty) in str(info.value)

    partial = tmp_path / "partial"
    ds.write_fixture_idx(partial)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as info:
        ds.load_fashion_mnist(partial)
    assert str(partial) in str(info.value)

    with pytest.raises(FileNotFoundError, match="nonexistent"):
        ds.load_mnist(tmp_path / "nonexistent")


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("subdir", [True, False])
def test_load_via_env(tmp_path: Path, monkeypatch: MP, compress: bool, subdir: bool) -> None:
    root = tmp_path / "data"
    target = root / "fashion-mnist" if subdir else root
    sums = ds.write_fixture_idx(target, n_train=9, n_test=5, seed=7, compress=compress)
    monkeypatch.setenv(ds.ENV_VAR, str(root))
    data = ds.load_fashion_mnist(checksums=sums, download=False)
    _assert_matches(data, target, 9, 5)


def test_env_subdir_wins_over_root_and_system(tmp_path: Path, monkeypatch: MP) -> None:
    root = tmp_path / "data"
    sums_sub = ds.write_fixture_idx(root / "fashion-mnist", n_train=3, seed=1)
    ds.write_fixture_idx(root, n_train=4, seed=2)
    system = tmp_path / "system"
    ds.write_fixture_idx(system, n_train=5, seed=3)
    monkeypatch.setitem(ds.SYSTEM_DATA_DIRS, "fashion-mnist", (system,))
    monkeypatch.setenv(ds.ENV_VAR, str(root))
    assert ds.load_fashion_mnist(checksums=sums_sub).source == root / "fashion-mnist"
    # Env set but holding nothing: the system folder is next.
    monkeypatch.setenv(ds.ENV_VAR, str(tmp_path / "nothing-here"))
    data = ds.load_fashion_mnist(verify=False, download=False)
    assert data.source == system and data.x_train.shape[0] == 5


def test_nothing_found_without_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        ds.load_fashion_mnist(cache_dir=tmp_path / "cache", download=False)
    msg = str(info.value)
    assert "data_dir" in msg and ds.ENV_VAR in msg
    assert "apt-get install dataset-fashion-mnist" in msg


def test_cache_used_without_download(tmp_path: Path) -> None:
    cache = tmp_path / "xdg-cache" / "sofim_optax" / "fashion-mnist"
    sums = ds.write_fixture_idx(cache)
    data = ds.load_fashion_mnist(checksums=sums, download=False)
    assert data.source == cache


# ---------------------------------------------------------------------------
# Download (served from memory; no network)
# ---------------------------------------------------------------------------


class _FakeResponse(io.BytesIO):
    def __init__(
        self, data: bytes, *, fail_after: int | None = None, length: int | None = None
    ) -> None:
        super().__init__(data)
        self.headers = {} if length is None else {"Content-Length": str(length)}
        self._fail_after = fail_after

    def read(self, size: int | None = -1) -> bytes:
        if self._fail_after is not None and self.tell() >= self._fail_after:
            raise ConnectionResetError("connection reset by peer")
        if self._fail_after is not None and size is not None and size > 0:
            size = min(size, self._fail_after - self.tell())
        return super().read(size)


def _serve(monkeypatch: MP, files: dict[str, bytes], requested: list[str], **kw: int) -> None:
    def fake_urlopen(url: str, timeout: float | None = None) -> _FakeResponse:
        requested.append(url)
        name = url.rsplit("/", 1)[-1]
        if name not in files:
            raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)  # type: ignore
        return _FakeResponse(files[name], **kw)

    monkeypatch.setattr(ds.urllib.request, "urlopen", fake_urlopen)


def _served_files(tmp_path: Path, **kw: int) -> tuple[dict[str, bytes], dict[str, str]]:
    src = tmp_path / "upstream"
    sums = ds.write_fixture_idx(src, **kw)
    return {p.name: p.read_bytes() for p in src.iterdir()}, sums


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_download_into_cache(tmp_path: Path, monkeypatch: MP) -> None:
    files, sums = _served_files(tmp_path, n_train=11, n_test=6)
    requested: list[str] = []
    _serve(monkeypatch, files, requested)
    cache = tmp_path / "cache"
    data = ds.load_fashion_mnist(cache_dir=cache, checksums=sums)
    assert sorted(requested) == sorted(ds.FASHION_MNIST_URL + f"{n}.gz" for n in ds.IDX_FILES)
    assert _leftovers(cache) == sorted(f"{n}.gz" for n in ds.IDX_FILES)
    for name in files:
        assert (cache / name).read_bytes() == files[name]
    _assert_matches(data, cache, 11, 6)

    # Second call: served from the cache, no request.
    requested.clear()
    again = ds.load_fashion_mnist(cache_dir=cache, checksums=sums)
    assert requested == []
    np.testing.assert_array_equal(again.x_train, data.x_train)


def test_download_default_cache_and_only_missing(tmp_path: Path, monkeypatch: MP) -> None:
    files, sums = _served_files(tmp_path)
    cache = tmp_path / "xdg-cache" / "sofim_optax" / "fashion-mnist"
    cache.mkdir(parents=True)
    (cache / "train-images-idx3-ubyte.gz").write_bytes(files["train-images-idx3-ubyte.gz"])
    requested: list[str] = []
    _serve(monkeypatch, files, requested)
    data = ds.load_fashion_mnist(checksums=sums)
    assert data.source == cache
    assert len(requested) == 3 and not any("train-images" in u for u in requested)


def test_download_checksum_mismatch_leaves_nothing(tmp_path: Path, monkeypatch: MP) -> None:
    files, sums = _served_files(tmp_path)
    sums["train-labels-idx1-ubyte"] = hashlib.sha256(b"something else").hexdigest()
    requested: list[str] = []
    _serve(monkeypatch, files, requested)
    cache = tmp_path / "cache"
    with pytest.raises(ds.DatasetFormatError, match="SHA-256 mismatch") as info:
        ds.load_fashion_mnist(cache_dir=cache, checksums=sums)
    assert str(cache / "train-labels-idx1-ubyte.gz") in str(info.value)
    assert "train-labels-idx1-ubyte.gz" not in _leftovers(cache)
    assert not any(n.endswith(".part") for n in _leftovers(cache))


def test_download_corrupt_gzip_leaves_nothing(tmp_path: Path, monkeypatch: MP) -> None:
    files, sums = _served_files(tmp_path)
    files["t10k-images-idx3-ubyte.gz"] = files["t10k-images-idx3-ubyte.gz"][:-30]
    _serve(monkeypatch, files, [])
    cache = tmp_path / "cache"
    with pytest.raises(ds.DatasetFormatError, match="gzip") as info:
        ds.load_fashion_mnist(cache_dir=cache, verify=False)
    assert "t10k-images-idx3-ubyte.gz" in str(info.value)
    left = _leftovers(cache)
    assert "t10k-images-idx3-ubyte.gz" not in left
    assert not any(n.startswith(".") for n in left)


@pytest.mark.parametrize("mode", ["reset-midway", "short-content-length", "http-404"])
def test_download_failure_midway(tmp_path: Path, monkeypatch: MP, mode: str) -> None:
    files, sums = _served_files(tmp_path, n_train=200)
    requested: list[str] = []
    if mode == "reset-midway":
        _serve(monkeypatch, files, requested, fail_after=1000)
    elif mode == "short-content-length":
        _serve(monkeypatch, files, requested, length=10**7)
    else:
        _serve(monkeypatch, {}, requested)
    cache = tmp_path / "cache"
    with pytest.raises(ds.DatasetDownloadError) as info:
        ds.load_fashion_mnist(cache_dir=cache, checksums=sums)
    msg = str(info.value)
    assert ds.FASHION_MNIST_URL in msg
    assert "data_dir" in msg and ds.ENV_VAR in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert isinstance(info.value, OSError)
    assert _leftovers(cache) == []  # no final name, no temp file


def test_corrupt_cached_file_is_removed(tmp_path: Path, monkeypatch: MP) -> None:
    cache = tmp_path / "cache"
    sums = ds.write_fixture_idx(cache)
    bad = cache / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ds.DatasetFormatError, match="removed") as info:
        ds.load_fashion_mnist(cache_dir=cache, checksums=sums, download=False)
    assert str(bad) in str(info.value)
    assert not bad.exists()


def test_mnist_download_and_unverified_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert all(v is None for v in ds.MNIST_SHA256.values())
    files, sums = _served_files(tmp_path)
    requested: list[str] = []
    _serve(monkeypatch, files, requested)
    with caplog.at_level(logging.WARNING, logger=ds.__name__):
        data = ds.load_mnist()
    assert requested and all(u.startswith(ds.MNIST_URL) for u in requested)
    assert ds.MNIST_URL == "https://storage.googleapis.com/cvdf-datasets/mnist/"
    assert data.source == tmp_path / "xdg-cache" / "sofim_optax" / "mnist"
    assert "skipping checksum verification" in caplog.text
    # Explicit checksums are honoured for MNIST too.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=ds.__name__):
        ds.load_mnist(checksums=sums)
    assert caplog.text == ""


def test_mnist_env_folder(tmp_path: Path, monkeypatch: MP) -> None:
    sums = ds.write_fixture_idx(tmp_path / "data" / "mnist", seed=5)
    ds.write_fixture_idx(tmp_path / "data" / "fashion-mnist", seed=6)
    monkeypatch.setenv(ds.ENV_VAR, str(tmp_path / "data"))
    data = ds.load_mnist(checksums=sums, download=False)
    assert data.source == tmp_path / "data" / "mnist"


# ---------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------


def test_to_float_arrays(tmp_path: Path) -> None:
    ds.write_fixture_idx(tmp_path, n_train=10, n_test=4)
    data = ds.load_fashion_mnist(tmp_path, verify=False)
    out = ds.to_float_arrays(data)
    assert out.x_train.shape == (10, 28, 28, 1) and out.x_test.shape == (4, 28, 28, 1)
    assert out.x_train.dtype == np.float32 and out.y_train.dtype == np.int32
    assert 0.0 <= out.x_train.min() and out.x_train.max() <= 1.0
    np.testing.assert_allclose(out.x_train[..., 0] * 255.0, data.x_train, atol=1e-4)
    np.testing.assert_array_equal(out.y_test, data.y_test)
    x_train, y_train, x_test, y_test = ds.to_float_arrays(data, flatten=True)
    assert x_train.shape == (10, 784) and x_test.shape == (4, 784)
    np.testing.assert_array_equal(x_train.reshape(10, 28, 28), out.x_train[..., 0])


# ---------------------------------------------------------------------------
# The real data (Debian package dataset-fashion-mnist)
# ---------------------------------------------------------------------------


@pytest.mark.needs_data
def test_real_fashion_mnist() -> None:
    if not all(((REAL_DIR / n).exists() or (REAL_DIR / f"{n}.gz").exists()) for n in ds.IDX_FILES):
        pytest.skip(f"{REAL_DIR} not present (apt-get install dataset-fashion-mnist)")
    data = ds.load_fashion_mnist(REAL_DIR, verify=True)
    assert data.x_train.shape == (60000, 28, 28) and data.x_train.dtype == np.uint8
    assert data.y_train.shape == (60000,) and data.y_train.dtype == np.uint8
    assert data.x_test.shape == (10000, 28, 28) and data.y_test.shape == (10000,)
    assert data.y_train.min() == 0 and data.y_train.max() == 9
    assert set(np.unique(data.y_test)) == set(range(10))
    assert np.bincount(data.y_train).tolist() == [6000] * 10
