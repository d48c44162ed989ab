"""Data sets of the experiments: Fashion-MNIST and MNIST (IDX), CIFAR-10/100, SVHN, CURVES, FACES.

:func:`load_arrays` is the entry point of the CLIs. The IDX sets are described
here; the others (upstream URLs, published checksums, formats) in the section
"CIFAR-10, CIFAR-100, SVHN, CURVES, FACES" below. Every set has a fixture
generator writing small files in the real format (``write_fixture_*``), and a
corrupt, truncated or wrong-format file raises :class:`DatasetFormatError`
naming it.

IDX sets.

The IDX loaders use only numpy and the standard library.  The four files of each set
(``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, gzip-compressed with a
``.gz`` suffix or plain) are looked up, in this order:

1. the ``data_dir`` argument, when given (no fallback if the files are absent);
2. ``$SOFIM_OPTAX_DATA/<name>/`` and then ``$SOFIM_OPTAX_DATA/`` itself;
3. a system folder (for Fashion-MNIST the Debian package
   ``dataset-fashion-mnist`` installs ``/usr/share/datasets/fashion-mnist``);
4. the user cache (``cache_dir`` argument, else
   ``$XDG_CACHE_HOME/sofim_optax/<name>``, else
   ``~/.cache/sofim_optax/<name>``), downloading missing files there when
   ``download=True``.

Integrity is checked with the SHA-256 of the *decompressed* IDX payload, which
does not depend on how (or whether) a file was gzip-compressed.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import logging
import os
import pickle
import struct
import tempfile
import urllib.request
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple, Optional, Union

import numpy as np

__all__ = [
    "DatasetFormatError",
    "DatasetDownloadError",
    "Dataset",
    "FloatDataset",
    "IDX_FILES",
    "FASHION_MNIST_SHA256",
    "MNIST_SHA256",
    "read_idx",
    "encode_idx",
    "write_idx",
    "load_fashion_mnist",
    "load_mnist",
    "write_fixture_idx",
    "to_float_arrays",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

ENV_VAR = "SOFIM_OPTAX_DATA"

# Base names (without ``.gz``) of the four files, in the order
# train images, train labels, test images, test labels.
IDX_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# SHA-256 of the decompressed IDX payloads, measured from the Debian package
# ``dataset-fashion-mnist`` (the payloads are identical to upstream's; only
# the gzip wrapping differs).
FASHION_MNIST_SHA256: dict[str, Optional[str]] = {
    # 47040016 bytes
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    # 60008 bytes
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    # 7840016 bytes
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    # 10008 bytes
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

# The MNIST payload hashes have not yet been recorded from a trusted copy, so
# verification is skipped (with a logged warning) until they are filled in.
MNIST_SHA256: dict[str, Optional[str]] = {name: None for name in IDX_FILES}

# System-wide folders searched (step 3 of the lookup), per data set name.
# Kept in a module-level mapping so that tests can empty it.
SYSTEM_DATA_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
    "mnist": (),
}

# Upstream download locations (file names are appended).  The Fashion-MNIST
# bucket is only served over plain HTTP; integrity comes from the checksums.
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"

_DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK_BYTES = 1 << 20

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES: dict[str, int] = {dt.newbyteorder("=").str: code for code, dt in _IDX_DTYPES.items()}

_GZIP_MAGIC = b"\x1f\x8b"


class DatasetFormatError(ValueError):
    """A data file is corrupt, truncated, of the wrong format or fails its checksum."""


class DatasetDownloadError(OSError):
    """A data file could not be downloaded."""


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """An image classification set held as uint8 numpy arrays.

    Attributes:
        x_train: training images, shape ``(N_train, 28, 28)``, uint8.
        y_train: training labels, shape ``(N_train,)``, uint8.
        x_test: test images, shape ``(N_test, 28, 28)``, uint8.
        y_test: test labels, shape ``(N_test,)``, uint8.
        source: the directory the files were read from.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: Path

    def __repr__(self) -> str:
        """Summarise shapes instead of printing the arrays."""
        return (
            f"Dataset(x_train={self.x_train.shape}, y_train={self.y_train.shape}, "
            f"x_test={self.x_test.shape}, y_test={self.y_test.shape}, "
            f"source={str(self.source)!r})"
        )


class FloatDataset(NamedTuple):
    """Float32 images in ``[0, 1]`` and int32 labels (see :func:`to_float_arrays`)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


# ---------------------------------------------------------------------------
# IDX reading and writing
# ---------------------------------------------------------------------------


def _read_payload(path: Path, label: Optional[str] = None) -> bytes:
    """Return the IDX bytes of ``path``, gunzipping when it is gzip data.

    A file is treated as gzip when its name ends in ``.gz`` or it starts with
    the gzip magic bytes.  ``label`` is the name used in error messages
    (defaults to ``path``).
    """
    label = str(path) if label is None else label
    raw = path.read_bytes()
    if path.name.endswith(".gz") or raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetFormatError(
                f"{label}: broken gzip stream ({type(exc).__name__}: {exc})"
            ) from exc
    return raw


def _parse_idx(payload: bytes, label: str) -> np.ndarray:
    """Parse decompressed IDX bytes into a native-endian numpy array."""
    if len(payload) < 4:
        raise DatasetFormatError(
            f"{label}: not an IDX file (only {len(payload)} bytes, header needs at least 4)"
        )
    if payload[0] != 0 or payload[1] != 0:
        raise DatasetFormatError(
            f"{label}: not an IDX file (bad magic {payload[:4].hex()}; "
            "the first two bytes must be zero)"
        )
    code, ndim = payload[2], payload[3]
    if code not in _IDX_DTYPES:
        raise DatasetFormatError(
            f"{label}: unknown IDX dtype code 0x{code:02X} "
            f"(known: {', '.join(f'0x{c:02X}' for c in _IDX_DTYPES)})"
        )
    header_len = 4 + 4 * ndim
    if len(payload) < header_len:
        raise DatasetFormatError(
            f"{label}: truncated IDX header ({len(payload)} bytes, "
            f"{ndim} dimensions need {header_len})"
        )
    dims = struct.unpack(f">{ndim}I", payload[4:header_len])
    dtype = _IDX_DTYPES[code]
    count = 1
    for d in dims:
        count *= d
    expected = count * dtype.itemsize
    actual = len(payload) - header_len
    if actual != expected:
        what = "truncated" if actual < expected else "has extra trailing bytes"
        raise DatasetFormatError(
            f"{label}: IDX data {what}: header dims {tuple(dims)} of {dtype.name} "
            f"need {expected} data bytes, found {actual}"
        )
    array = np.frombuffer(payload, dtype=dtype, count=count, offset=header_len)
    # Copy into a native-endian array that owns (and may write) its memory.
    return array.astype(dtype.newbyteorder("="), copy=True).reshape(dims)


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed or plain) into a numpy array.

    Args:
        path: the file; compression is detected from a ``.gz`` suffix or the
            gzip magic bytes.

    Returns:
        A native-endian array with the dtype and shape given in the header.

    Raises:
        DatasetFormatError: bad magic, unknown dtype code, data length not
            matching the header, or a broken gzip stream.  The message names
            the file.
    """
    path = Path(path)
    return _parse_idx(_read_payload(path), str(path))


def encode_idx(array: np.ndarray) -> bytes:
    """Encode an array as uncompressed IDX bytes.

    Supported dtypes: uint8, int8, int16, int32, float32, float64.
    """
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=").str
    if native not in _IDX_CODES:
        raise TypeError(f"dtype {array.dtype} has no IDX type code")
    if array.ndim > 255:
        raise ValueError("IDX supports at most 255 dimensions")
    code = _IDX_CODES[native]
    header = struct.pack(f">BBBB{array.ndim}I", 0, 0, code, array.ndim, *array.shape)
    return header + np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()


def write_idx(path: PathLike, array: np.ndarray) -> str:
    """Write ``array`` as an IDX file, gzip-compressed when ``path`` ends in ``.gz``.

    Returns:
        The SHA-256 hex digest of the uncompressed IDX payload.
    """
    path = Path(path)
    payload = encode_idx(array)
    data = gzip.compress(payload, mtime=0) if path.name.endswith(".gz") else payload
    path.write_bytes(data)
    return hashlib.sha256(payload).hexdigest()


# ---------------------------------------------------------------------------
# Locating, verifying and downloading the files
# ---------------------------------------------------------------------------


def _find_files(directory: Path) -> tuple[dict[str, Path], list[str]]:
    """Map each base name to its file in ``directory`` (plain preferred over ``.gz``).

    Returns the found files and the base names that are missing.
    """
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in IDX_FILES:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                found[name] = candidate
                break
        else:
            missing.append(name)
    return found, missing


def _default_cache_dir(set_name: str) -> Path:
    """The per-user cache directory for ``set_name``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "sofim_optax" / set_name


def _check_sha(payload: bytes, expected: Optional[str], label: str) -> None:
    """Raise DatasetFormatError when the payload's SHA-256 differs from ``expected``."""
    if expected is None:
        return
    digest = hashlib.sha256(payload).hexdigest()
    if digest != expected.lower():
        raise DatasetFormatError(
            f"{label}: SHA-256 mismatch of the decompressed IDX data "
            f"(expected {expected.lower()}, got {digest}, {len(payload)} bytes)"
        )


def _help_text(set_name: str) -> str:
    """How to provide the files without downloading."""
    text = (
        f"Provide the four {set_name} IDX files another way: pass data_dir=..., "
        f"or set {ENV_VAR} to a folder holding them (or a '{set_name}' subfolder)"
    )
    if set_name == "fashion-mnist":
        text += (
            ", or install the Debian package ('apt-get install dataset-fashion-mnist', "
            "files in /usr/share/datasets/fashion-mnist)"
        )
    return text + "."


def _download(url: str, dest: Path, expected_sha: Optional[str], set_name: str) -> None:
    """Download ``url`` to ``dest`` atomically, validating it before the rename.

    The data goes to a temporary file in ``dest``'s folder, is checked (gzip
    stream, IDX structure and, when ``expected_sha`` is given, the checksum)
    and only then renamed to ``dest``; on any failure the temporary file is
    removed, so nothing partial is ever left under the final name.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        try:
            written = 0
            with os.fdopen(fd, "wb") as out:
                with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
                    headers = getattr(response, "headers", None)
                    length = headers.get("Content-Length") if headers is not None else None
                    while True:
                        chunk = response.read(_CHUNK_BYTES)
                        if not chunk:
                            break
                        out.write(chunk)
                        written += len(chunk)
            if length is not None and written != int(length):
                raise OSError(f"connection closed after {written} of {length} bytes")
        except Exception as exc:  # urllib raises a variety of OSError/HTTP errors
            raise DatasetDownloadError(
                f"Downloading {url} to {dest} failed ({type(exc).__name__}: {exc}). "
                + _help_text(set_name)
            ) from exc
        label = f"{dest} (downloaded from {url})"
        payload = _read_payload(tmp, label=label)
        _check_sha(payload, expected_sha, label)
        _parse_idx(payload, label)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _load_file(path: Path, expected_sha: Optional[str]) -> np.ndarray:
    """Read one file once: decompress, hash the payload, parse the same bytes."""
    payload = _read_payload(path)
    _check_sha(payload, expected_sha, str(path))
    return _parse_idx(payload, str(path))


def _check_pair(images: np.ndarray, labels: np.ndarray, img_path: Path, lbl_path: Path) -> None:
    """Check an images/labels pair has the expected MNIST-like shapes and dtypes."""
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DatasetFormatError(
            f"{img_path}: expected uint8 images of shape (N, 28, 28), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetFormatError(
            f"{lbl_path}: expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}"
        )
    if labels.shape[0] != images.shape[0]:
        raise DatasetFormatError(
            f"{lbl_path}: {labels.shape[0]} labels do not match the "
            f"{images.shape[0]} images in {img_path}"
        )
    if labels.size and int(labels.max()) > 9:
        raise DatasetFormatError(f"{lbl_path}: label {int(labels.max())} outside 0..9")


def _read_dir(
    files: Mapping[str, Path],
    source: Path,
    checksums: Mapping[str, Optional[str]],
    verify: bool,
    set_name: str,
    delete_bad: bool,
) -> Dataset:
    """Read, verify and shape-check the four files found in ``source``."""
    if verify:
        unknown = [name for name in IDX_FILES if checksums.get(name) is None]
        if unknown:
            logger.warning(
                "No SHA-256 recorded for %s file(s) %s; skipping checksum verification "
                "for them.",
                set_name,
                ", ".join(unknown),
            )
    arrays: dict[str, np.ndarray] = {}
    for name in IDX_FILES:
        path = files[name]
        try:
            arrays[name] = _load_file(path, checksums.get(name) if verify else None)
        except DatasetFormatError as exc:
            if delete_bad:
                path.unlink(missing_ok=True)
                raise DatasetFormatError(
                    f"{exc} -- removed the bad cached file; the next call will download it again"
                ) from exc
            raise
    train_img, train_lbl, test_img, test_lbl = (arrays[name] for name in IDX_FILES)
    _check_pair(train_img, train_lbl, files[IDX_FILES[0]], files[IDX_FILES[1]])
    _check_pair(test_img, test_lbl, files[IDX_FILES[2]], files[IDX_FILES[3]])
    return Dataset(train_img, train_lbl, test_img, test_lbl, source)


def _normalise_checksums(
    checksums: Optional[Mapping[str, Optional[str]]],
    builtin: Mapping[str, Optional[str]],
) -> dict[str, Optional[str]]:
    """Use ``checksums`` (keys with or without ``.gz``) or else the built-in table."""
    table = builtin if checksums is None else checksums
    out: dict[str, Optional[str]] = {}
    for key, value in table.items():
        base = key[:-3] if key.endswith(".gz") else key
        out[base] = value
    return out


def _load(
    set_name: str,
    url_base: str,
    builtin_checksums: Mapping[str, Optional[str]],
    data_dir: Optional[PathLike],
    download: bool,
    cache_dir: Optional[PathLike],
    verify: bool,
    checksums: Optional[Mapping[str, Optional[str]]],
) -> Dataset:
    """Shared lookup / download / read logic of the public loaders."""
    table = _normalise_checksums(checksums, builtin_checksums)

    # 1. Explicit directory: no fallback.
    if data_dir is not None:
        directory = Path(data_dir).expanduser()
        files, missing = _find_files(directory)
        if missing:
            raise FileNotFoundError(
                f"data_dir {directory} does not hold the {set_name} file(s) "
                f"{', '.join(missing)} (with or without .gz)"
            )
        return _read_dir(files, directory, table, verify, set_name, delete_bad=False)

    # 2. Environment variable, 3. system folders.
    candidates: list[Path] = []
    env = os.environ.get(ENV_VAR)
    if env:
        root = Path(env).expanduser()
        candidates += [root / set_name, root]
    candidates += list(SYSTEM_DATA_DIRS.get(set_name, ()))
    for directory in candidates:
        files, missing = _find_files(directory)
        if not missing:
            return _read_dir(files, directory, table, verify, set_name, delete_bad=False)
        if len(missing) < len(IDX_FILES):
            logger.info(
                "%s: incomplete %s set (missing %s); skipping", directory, set_name, missing
            )

    # 4. User cache, downloading what is missing.
    cache = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir(set_name)
    files, missing = _find_files(cache)
    if missing:
        if not download:
            raise FileNotFoundError(
                f"The {set_name} files were not found (searched "
                f"{', '.join(str(c) for c in candidates + [cache]) or cache}) and "
                "download=False. " + _help_text(set_name)
            )
        for name in missing:
            dest = cache / f"{name}.gz"
            logger.info("Downloading %s%s.gz to %s", url_base, name, dest)
            _download(f"{url_base}{name}.gz", dest, table.get(name) if verify else None, set_name)
            files[name] = dest
    return _read_dir(files, cache, table, verify, set_name, delete_bad=True)


def load_fashion_mnist(
    data_dir: Optional[PathLike] = None,
    *,
    download: bool = True,
    cache_dir: Optional[PathLike] = None,
    verify: bool = True,
    checksums: Optional[Mapping[str, Optional[str]]] = None,
) -> Dataset:
    """Load Fashion-MNIST (60000 train / 10000 test images, 28x28 uint8).

    Args:
        data_dir: folder holding the four IDX files; when given, nothing else
            is searched and missing files raise FileNotFoundError.
        download: allow downloading missing files into the cache folder.
        cache_dir: cache folder (default ``$XDG_CACHE_HOME/sofim_optax/fashion-mnist``
            or ``~/.cache/sofim_optax/fashion-mnist``).
        verify: check the SHA-256 of each decompressed payload.
        checksums: expected SHA-256 per base file name (``None`` uses the
            built-in table; a ``None`` value skips that file).

    Returns:
        A :class:`Dataset`.

    Raises:
        FileNotFoundError: ``data_dir`` lacks the files, or nothing was found
            and ``download=False``.
        DatasetFormatError: a file is corrupt or fails its checksum.
        DatasetDownloadError: a download failed.
    """
    return _load(
        "fashion-mnist",
        FASHION_MNIST_URL,
        FASHION_MNIST_SHA256,
        data_dir,
        download,
        cache_dir,
        verify,
        checksums,
    )


def load_mnist(
    data_dir: Optional[PathLike] = None,
    *,
    download: bool = True,
    cache_dir: Optional[PathLike] = None,
    verify: bool = True,
    checksums: Optional[Mapping[str, Optional[str]]] = None,
) -> Dataset:
    """Load MNIST; same lookup order and arguments as :func:`load_fashion_mnist`.

    The environment folder is ``$SOFIM_OPTAX_DATA/mnist`` (then
    ``$SOFIM_OPTAX_DATA``), there is no system folder, and the cache is
    ``.../sofim_optax/mnist``.  No MNIST checksums are recorded yet, so unless
    ``checksums`` is given verification is skipped with a logged warning.
    """
    return _load(
        "mnist",
        MNIST_URL,
        MNIST_SHA256,
        data_dir,
        download,
        cache_dir,
        verify,
        checksums,
    )


# ---------------------------------------------------------------------------
# Fixtures and conversion
# ---------------------------------------------------------------------------


def write_fixture_idx(
    directory: PathLike,
    *,
    n_train: int = 64,
    n_test: int = 32,
    seed: int = 0,
    compress: bool = True,
) -> dict[str, str]:
    """Write a small, valid, MNIST-shaped IDX set under the real file names.

    Images are random uint8 28x28, labels random in 0..9.

    Args:
        directory: target folder (created if needed).
        n_train: number of training examples.
        n_test: number of test examples.
        seed: seed of the random generator.
        compress: write ``<name>.gz`` files instead of plain ones.

    Returns:
        SHA-256 of each decompressed payload, keyed by base file name (the
        format of the ``checksums`` argument of the loaders).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = (
        rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, size=(n_train,), dtype=np.uint8),
        rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, size=(n_test,), dtype=np.uint8),
    )
    suffix = ".gz" if compress else ""
    return {
        name: write_idx(directory / f"{name}{suffix}", array)
        for name, array in zip(IDX_FILES, arrays)
    }


def to_float_arrays(dataset: Dataset, *, flatten: bool = False) -> FloatDataset:
    """Convert to float32 images in ``[0, 1]`` and int32 labels.

    Images get shape ``(N, 28, 28, 1)``, or ``(N, 784)`` when ``flatten``.
    """

    def images(x: np.ndarray) -> np.ndarray:
        out = x.astype(np.float32) / np.float32(255.0)
        return out.reshape(len(x), -1) if flatten else out[..., None]

    return FloatDataset(
        images(dataset.x_train),
        dataset.y_train.astype(np.int32),
        images(dataset.x_test),
        dataset.y_test.astype(np.int32),
    )


# ---------------------------------------------------------------------------
# One entry point for the experiment CLIs
# ---------------------------------------------------------------------------

NUM_CLASSES: dict[str, int] = {"fashion-mnist": 10, "mnist": 10, "cifar10": 10, "cifar100": 100, "svhn": 10}
# Autoencoder loss per data set: Bernoulli (sigmoid cross-entropy) or Gaussian (squared error).
RECONSTRUCTION: dict[str, str] = {"fashion-mnist": "bernoulli", "mnist": "bernoulli", "curves": "bernoulli", "faces": "gaussian"}


def load_arrays(
    name: str,
    *,
    data_dir: Optional[PathLike] = None,
    verify: bool = True,
    download: bool = True,
    flatten: bool = False,
) -> FloatDataset:
    """Any supported data set as float32 inputs and int32 labels (``None`` for the autoencoder-only sets).

    Images are in ``[0, 1]``, shaped ``(N, H, W, C)``, or ``(N, H*W*C)`` when
    ``flatten``. CURVES and FACES are always flat (784 and 625 values).
    """
    if name == "fashion-mnist":
        return to_float_arrays(load_fashion_mnist(data_dir, verify=verify, download=download), flatten=flatten)
    if name == "mnist":
        return to_float_arrays(load_mnist(data_dir, verify=verify, download=download), flatten=flatten)
    loaders = _EXTRA_LOADERS
    if name not in loaders:
        raise ValueError(f"unknown data set {name!r}; known: {sorted(['fashion-mnist', 'mnist', *loaders])}")
    return loaders[name](data_dir=data_dir, verify=verify, download=download, flatten=flatten)


# ---------------------------------------------------------------------------
# CIFAR-10, CIFAR-100, SVHN, CURVES, FACES
# ---------------------------------------------------------------------------
#
# Each set is a few upstream files looked up like the IDX sets (``data_dir``;
# ``$SOFIM_OPTAX_DATA/<set>/`` then ``$SOFIM_OPTAX_DATA/``; the user cache,
# downloading there when allowed). Integrity: the upstream sites publish MD5
# sums (CIFAR: www.cs.toronto.edu/~kriz/cifar.html; SVHN and MNIST: the sums
# torchvision checks; Fashion-MNIST: its README), not SHA-256, and this
# machine has no internet to measure SHA-256 of the real files; so these
# entries check the published MD5 of the file as served (an integrity check
# against corruption, not a security guarantee) and leave ``sha256`` empty to
# be filled from a trusted copy. CURVES and FACES (Martens's pages) publish no
# checksum at all: only the structure of their files is checked.


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One upstream file: its name, URL and the checksums upstream publishes (``None``: none known)."""

    name: str
    url: str
    md5: Optional[str] = None
    sha256: Optional[str] = None
    size: Optional[int] = None


REMOTE_FILES: dict[str, tuple[RemoteFile, ...]] = {
    "cifar10": (RemoteFile("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                           md5="c58f30108f718f92721af3b95e74349a", size=170498071),),
    "cifar100": (RemoteFile("cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                            md5="eb9058c3a382ffc7106e4002c42a8d85"),),
    "svhn": (
        RemoteFile("train_32x32.mat", "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
                   md5="e26dedcc434d2e4c54c9b2d4a06d8373", size=182040794),
        RemoteFile("test_32x32.mat", "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
                   md5="eb5a983be6a315427106f1b164d9cef3", size=64275384),
    ),
    "curves": (RemoteFile("digs3pts_1.mat", "https://www.cs.toronto.edu/~jmartens/digs3pts_1.mat"),),
    "faces": (RemoteFile("newfaces_rot_single.mat", "https://www.cs.toronto.edu/~jmartens/newfaces_rot_single.mat"),),
}

# MD5 of the gzip files as served upstream (torchvision's table; Fashion-MNIST's README).
# The IDX loaders verify the SHA-256 of the decompressed payload instead (above).
IDX_GZ_MD5: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}

# FACES split (research/kpsvd_kbfgs.md §0): train = first 103500 rows, test = last 41400.
FACES_TRAIN, FACES_TEST = 103500, 41400


def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_file(path: Path, remote: RemoteFile, label: Optional[str] = None) -> None:
    label = label or str(path)
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        raise DatasetFormatError(f"{label}: {size} bytes, upstream's file has {remote.size} (truncated or a different file)")
    for algorithm in ("sha256", "md5"):
        expected = getattr(remote, algorithm)
        if expected is not None:
            got = _file_digest(path, algorithm)
            if got != expected:
                raise DatasetFormatError(f"{label}: {algorithm.upper()} mismatch (expected {expected}, got {got}, {size} bytes)")


def _download_file(remote: RemoteFile, dest: Path, verify: bool, set_name: str) -> None:
    """Download to a temporary file, verify, then rename (nothing partial is left under ``dest``)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(remote.url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
                while True:
                    chunk = response.read(_CHUNK_BYTES)
                    if not chunk:
                        break
                    out.write(chunk)
        except Exception as exc:
            raise DatasetDownloadError(
                f"Downloading {remote.url} to {dest} failed ({type(exc).__name__}: {exc}). Put {remote.name} in a folder "
                f"given as data_dir, or in ${ENV_VAR}/{set_name}/."
            ) from exc
        if verify:
            _verify_file(tmp, remote, f"{dest} (downloaded from {remote.url})")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def locate_files(
    set_name: str,
    data_dir: Optional[PathLike] = None,
    *,
    download: bool = True,
    cache_dir: Optional[PathLike] = None,
    verify: bool = True,
) -> dict[str, Path]:
    """Finds (or downloads into the cache) the upstream files of ``set_name``, checked against their checksums."""
    remotes = REMOTE_FILES[set_name]
    names = [r.name for r in remotes]
    if data_dir is not None:
        directory = Path(data_dir).expanduser()
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise FileNotFoundError(f"data_dir {directory} does not hold the {set_name} file(s) {', '.join(missing)}")
        candidates = [directory]
    else:
        candidates = []
        env = os.environ.get(ENV_VAR)
        if env:
            candidates += [Path(env).expanduser() / set_name, Path(env).expanduser()]
    for directory in candidates:
        if all((directory / n).is_file() for n in names):
            files = {r.name: directory / r.name for r in remotes}
            if verify:
                for r in remotes:
                    _verify_file(files[r.name], r)
            return files
    cache = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir(set_name)
    files = {}
    for r in remotes:
        path = cache / r.name
        if not path.is_file():
            if not download:
                raise FileNotFoundError(
                    f"The {set_name} file {r.name} was not found (searched {', '.join(map(str, candidates + [cache]))}) "
                    f"and download=False. Download {r.url} into one of these folders."
                )
            logger.info("Downloading %s to %s", r.url, path)
            _download_file(r, path, verify, set_name)
        elif verify:
            try:
                _verify_file(path, r)
            except DatasetFormatError as exc:
                path.unlink(missing_ok=True)
                raise DatasetFormatError(f"{exc} -- removed the bad cached file; the next call will download it again") from exc
        files[r.name] = path
    return files


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts of bytes, lists and numpy arrays) and refuses everything else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def _unpickle(raw: bytes, label: str) -> dict:
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:
        raise DatasetFormatError(f"{label}: not a CIFAR python batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{label}: not a CIFAR python batch (a {type(obj).__name__}, expected a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(raw: bytes, label: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(raw, label)
    if "data" not in batch or label_key not in batch:
        raise DatasetFormatError(f"{label}: CIFAR batch without 'data' / '{label_key}' (keys {sorted(batch)})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise DatasetFormatError(f"{label}: expected uint8 data (N, 3072) and N labels, got {data.dtype} {data.shape}, {labels.shape}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # channel-major rows -> NHWC
    return images, labels


def _read_cifar(path: Path, num_classes: int) -> Dataset:
    import tarfile

    folder, train_members, test_member, key = (
        ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels")
        if num_classes == 10 else ("cifar-100-python", ["train"], "test", "fine_labels")
    )
    try:
        with tarfile.open(path, "r:gz") as tar:
            def read(member: str) -> bytes:
                try:
                    f = tar.extractfile(f"{folder}/{member}")
                except KeyError:
                    raise DatasetFormatError(f"{path}: archive lacks {folder}/{member}") from None
                if f is None:
                    raise DatasetFormatError(f"{path}: {folder}/{member} is not a file")
                return f.read()

            train = [_cifar_batch(read(m), f"{path}:{folder}/{m}", key) for m in train_members]
            x_test, y_test = _cifar_batch(read(test_member), f"{path}:{folder}/{test_member}", key)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DatasetFormatError(f"{path}: not a readable .tar.gz archive ({type(exc).__name__}: {exc})") from exc
    x_train = np.concatenate([b[0] for b in train])
    y_train = np.concatenate([b[1] for b in train])
    for y, where in ((y_train, "training"), (y_test, "test")):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise DatasetFormatError(f"{path}: {where} label outside 0..{num_classes - 1}")
    return Dataset(x_train, y_train.astype(np.uint8), x_test, y_test.astype(np.uint8), path.parent)


def _loadmat(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, variable_names=list(keys))
    except NotImplementedError as exc:  # MATLAB v7.3 (HDF5) files
        raise DatasetFormatError(f"{path}: a MATLAB v7.3 (HDF5) file; convert it to v5 or install h5py ({exc})") from exc
    except Exception as exc:
        raise DatasetFormatError(f"{path}: not a readable MATLAB .mat file ({type(exc).__name__}: {exc})") from exc
    missing = [k for k in keys if k not in mat]
    if missing:
        raise DatasetFormatError(f"{path}: lacks the variable(s) {missing}")
    return {k: np.asarray(mat[k]) for k in keys}


def _read_svhn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    m = _loadmat(path, ("X", "y"))
    x, y = m["X"], m["y"].reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.shape != (x.shape[3],):
        raise DatasetFormatError(f"{path}: expected X uint8 (32, 32, 3, N) and y (N, 1), got {x.dtype} {x.shape}, {m['y'].shape}")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise DatasetFormatError(f"{path}: SVHN labels must be 1..10 (10 is the digit 0)")
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)), (y % 10).astype(np.uint8)


def _images_to_float(x: np.ndarray, flatten: bool) -> np.ndarray:
    out = x.astype(np.float32) / np.float32(255.0)
    return out.reshape(len(out), -1) if flatten else out


def _check_unit_interval(x: np.ndarray, path: Path, key: str, width: int) -> np.ndarray:
    if x.ndim != 2 or x.shape[1] != width or not np.issubdtype(x.dtype, np.floating):
        raise DatasetFormatError(f"{path}: '{key}' must be a float (N, {width}) array, got {x.dtype} {x.shape}")
    if x.size and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 1):
        raise DatasetFormatError(f"{path}: '{key}' values must be finite and in [0, 1]")
    return x.astype(np.float32)


def load_cifar(num_classes: int = 10, data_dir: Optional[PathLike] = None, *, download: bool = True,
               cache_dir: Optional[PathLike] = None, verify: bool = True, flatten: bool = False) -> FloatDataset:
    """CIFAR-10 or CIFAR-100 (fine labels) from the python ``.tar.gz``: 50000/10000 images (N, 32, 32, 3) in [0, 1]."""
    if num_classes not in (10, 100):
        raise ValueError("num_classes must be 10 or 100")
    set_name = f"cifar{num_classes}"
    path = next(iter(locate_files(set_name, data_dir, download=download, cache_dir=cache_dir, verify=verify).values()))
    ds = _read_cifar(path, num_classes)
    return FloatDataset(_images_to_float(ds.x_train, flatten), ds.y_train.astype(np.int32),
                        _images_to_float(ds.x_test, flatten), ds.y_test.astype(np.int32))


def load_svhn(data_dir: Optional[PathLike] = None, *, download: bool = True, cache_dir: Optional[PathLike] = None,
              verify: bool = True, flatten: bool = False) -> FloatDataset:
    """SVHN (cropped digits, train and test, no 'extra'): images (N, 32, 32, 3) in [0, 1], labels 0..9."""
    files = locate_files("svhn", data_dir, download=download, cache_dir=cache_dir, verify=verify)
    x_train, y_train = _read_svhn(files["train_32x32.mat"])
    x_test, y_test = _read_svhn(files["test_32x32.mat"])
    return FloatDataset(_images_to_float(x_train, flatten), y_train.astype(np.int32),
                        _images_to_float(x_test, flatten), y_test.astype(np.int32))


def load_curves(data_dir: Optional[PathLike] = None, *, download: bool = True, cache_dir: Optional[PathLike] = None,
                verify: bool = True, flatten: bool = True) -> FloatDataset:
    """CURVES (Hinton & Salakhutdinov; Martens's file): 20000 train / 10000 test rows of 784 values in [0, 1]."""
    path = locate_files("curves", data_dir, download=download, cache_dir=cache_dir, verify=verify)["digs3pts_1.mat"]
    m = _loadmat(path, ("bdata", "bdatatest"))
    return FloatDataset(_check_unit_interval(m["bdata"], path, "bdata", 784), None,
                        _check_unit_interval(m["bdatatest"], path, "bdatatest", 784), None)


def load_faces(data_dir: Optional[PathLike] = None, *, download: bool = True, cache_dir: Optional[PathLike] = None,
               verify: bool = True, flatten: bool = True) -> FloatDataset:
    """FACES (Martens's ``newfaces_rot_single``): 625-pixel rows; train = first 103500, test = last 41400.

    The file stores ``newfaces_single`` as (625, N); it is transposed. Values
    are real (the autoencoder uses the squared error), not checked against [0, 1].
    A file with fewer than 103500 + 41400 rows (e.g. a test fixture) is split
    in the same 103500 : 41400 proportion.
    """
    path = locate_files("faces", data_dir, download=download, cache_dir=cache_dir, verify=verify)["newfaces_rot_single.mat"]
    raw = _loadmat(path, ("newfaces_single",))["newfaces_single"]
    if raw.ndim != 2 or raw.shape[0] != 625 or not np.issubdtype(raw.dtype, np.floating):
        raise DatasetFormatError(f"{path}: 'newfaces_single' must be a float (625, N) array, got {raw.dtype} {raw.shape}")
    if not np.isfinite(raw).all():
        raise DatasetFormatError(f"{path}: 'newfaces_single' holds non-finite values")
    rows = raw.T.astype(np.float32)
    n = len(rows)
    if n >= FACES_TRAIN + FACES_TEST:
        n_train, n_test = FACES_TRAIN, FACES_TEST
    else:
        n_train = int(n * FACES_TRAIN / (FACES_TRAIN + FACES_TEST + 20700))
        n_test = int(n * FACES_TEST / (FACES_TRAIN + FACES_TEST + 20700))
    return FloatDataset(rows[:n_train], None, rows[n - n_test:], None)


_EXTRA_LOADERS = {
    "cifar10": lambda **kw: load_cifar(10, kw.pop("data_dir"), **kw),
    "cifar100": lambda **kw: load_cifar(100, kw.pop("data_dir"), **kw),
    "svhn": lambda **kw: load_svhn(kw.pop("data_dir"), **kw),
    "curves": lambda **kw: load_curves(kw.pop("data_dir"), **kw),
    "faces": lambda **kw: load_faces(kw.pop("data_dir"), **kw),
}


# --- fixture generators (small files in the real formats, for tests) -------


def write_fixture_cifar(directory: PathLike, *, num_classes: int = 10, n_train: int = 20, n_test: int = 10, seed: int = 0) -> Path:
    """Writes a small ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` with upstream's layout."""
    import tarfile

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    folder, train_members, test_member, key = (
        ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels")
        if num_classes == 10 else ("cifar-100-python", ["train"], "test", b"fine_labels")
    )
    path = directory / f"cifar-{num_classes}-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, n: int) -> None:
            batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                     key: [int(v) for v in rng.integers(0, num_classes, n)], b"batch_label": name.encode()}
            raw = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))

        per = max(1, n_train // len(train_members))
        for m in train_members:
            add(m, per)
        add(test_member, n_test)
    return path


def write_fixture_svhn(directory: PathLike, *, n_train: int = 20, n_test: int = 10, seed: int = 0) -> None:
    import scipy.io

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        scipy.io.savemat(directory / name, {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                             "y": rng.integers(1, 11, (n, 1)).astype(np.uint8)})


def write_fixture_curves(directory: PathLike, *, n_train: int = 40, n_test: int = 20, seed: int = 0) -> None:
    import scipy.io

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scipy.io.savemat(directory / "digs3pts_1.mat", {"bdata": rng.random((n_train, 784)),
                                                    "bdatatest": rng.random((n_test, 784))})


def write_fixture_faces(directory: PathLike, *, n: int = 80, seed: int = 0) -> None:
    import scipy.io

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scipy.io.savemat(directory / "newfaces_rot_single.mat", {"newfaces_single": rng.standard_normal((625, n)).astype(np.float32)})
