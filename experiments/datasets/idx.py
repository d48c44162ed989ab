"""Fashion-MNIST and MNIST: where the IDX files are looked up, how they are checked, the loaders.

The file format itself (reading, parsing, writing) is in
:mod:`experiments.datasets.idx_format`. The four files of each set
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
import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np

from experiments.datasets.download import (
    ENV_VAR,
    DatasetFormatError,
    PathLike,
    default_cache_dir,
    download_verified,
)
from experiments.datasets.idx_format import parse_idx, read_payload, write_idx

__all__ = [
    "Dataset",
    "FloatDataset",
    "IDX_FILES",
    "FASHION_MNIST_SHA256",
    "MNIST_SHA256",
    "SYSTEM_DATA_DIRS",
    "FASHION_MNIST_URL",
    "MNIST_URL",
    "load_idx_set",
    "load_fashion_mnist",
    "load_mnist",
    "write_fixture_idx",
    "to_float_arrays",
]

logger = logging.getLogger(__name__)

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
    """Downloads one IDX file, checking its gzip stream, IDX structure and checksum first."""

    def check(tmp: Path, label: str) -> None:
        payload = read_payload(tmp, label=label)
        _check_sha(payload, expected_sha, label)
        parse_idx(payload, label)

    download_verified(url, dest, check=check, help_text=_help_text(set_name))


def _load_file(path: Path, expected_sha: Optional[str]) -> np.ndarray:
    """Read one file once: decompress, hash the payload, parse the same bytes."""
    payload = read_payload(path)
    _check_sha(payload, expected_sha, str(path))
    return parse_idx(payload, str(path))


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
                "No SHA-256 recorded for %s file(s) %s; skipping checksum verification for them.",
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


# Upstream URL and built-in checksum table of each IDX set.
_IDX_SETS: dict[str, tuple[str, Mapping[str, Optional[str]]]] = {
    "fashion-mnist": (FASHION_MNIST_URL, FASHION_MNIST_SHA256),
    "mnist": (MNIST_URL, MNIST_SHA256),
}


def load_idx_set(
    set_name: str,
    data_dir: Optional[PathLike] = None,
    *,
    download: bool = True,
    cache_dir: Optional[PathLike] = None,
    verify: bool = True,
    checksums: Optional[Mapping[str, Optional[str]]] = None,
) -> Dataset:
    """Load the IDX set ``set_name`` (``"fashion-mnist"`` or ``"mnist"``).

    Args:
        set_name: which set; it also names the environment subfolder and the
            cache folder (``$XDG_CACHE_HOME/sofim_optax/<set_name>`` or
            ``~/.cache/sofim_optax/<set_name>``).
        data_dir: folder holding the four IDX files; when given, nothing else
            is searched and missing files raise FileNotFoundError.
        download: allow downloading missing files into the cache folder.
        cache_dir: cache folder, instead of the default above.
        verify: check the SHA-256 of each decompressed payload.
        checksums: expected SHA-256 per base file name (``None`` uses the
            built-in table; a ``None`` value skips that file).

    Returns:
        A :class:`Dataset`.

    Raises:
        ValueError: ``set_name`` is not an IDX set.
        FileNotFoundError: ``data_dir`` lacks the files, or nothing was found
            and ``download=False``.
        DatasetFormatError: a file is corrupt or fails its checksum.
        DatasetDownloadError: a download failed.
    """
    if set_name not in _IDX_SETS:
        raise ValueError(f"unknown IDX set {set_name!r}; known: {sorted(_IDX_SETS)}")
    url_base, builtin_checksums = _IDX_SETS[set_name]
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
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(set_name)
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


def load_fashion_mnist(data_dir: Optional[PathLike] = None, **options: Any) -> Dataset:
    """Load Fashion-MNIST (60000 train / 10000 test images, 28x28 uint8).

    ``load_idx_set("fashion-mnist", data_dir, **options)``: the keyword options
    (``download``, ``cache_dir``, ``verify``, ``checksums``), the lookup order
    and the errors are those of :func:`load_idx_set`. The system folder is
    ``/usr/share/datasets/fashion-mnist`` (Debian package
    ``dataset-fashion-mnist``).
    """
    return load_idx_set("fashion-mnist", data_dir, **options)


def load_mnist(data_dir: Optional[PathLike] = None, **options: Any) -> Dataset:
    """Load MNIST; ``load_idx_set("mnist", data_dir, **options)`` (see :func:`load_idx_set`).

    The environment folder is ``$SOFIM_OPTAX_DATA/mnist`` (then
    ``$SOFIM_OPTAX_DATA``), there is no system folder, and the cache is
    ``.../sofim_optax/mnist``.  No MNIST checksums are recorded yet, so unless
    ``checksums`` is given verification is skipped with a logged warning.
    """
    return load_idx_set("mnist", data_dir, **options)


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
