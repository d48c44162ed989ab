"""CIFAR-10, CIFAR-100, SVHN, CURVES and FACES: upstream files, their checks, the loaders.

Each set is a few upstream files looked up like the IDX sets (``data_dir``;
``$SOFIM_OPTAX_DATA/<set>/`` then ``$SOFIM_OPTAX_DATA/``; the user cache, downloading there
when allowed, through :func:`experiments.datasets.download.download_verified`). Integrity:
the upstream sites publish MD5 sums (CIFAR: www.cs.toronto.edu/~kriz/cifar.html; SVHN and
MNIST: the sums torchvision checks; Fashion-MNIST: its README), not SHA-256, so these entries
check the published MD5 of the file as served (an integrity check against corruption, not a
security guarantee) and leave ``sha256`` empty to be filled from a trusted copy. CURVES and
FACES (Martens's pages) publish no checksum at all: only the structure of their files is
checked.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pickle
import zlib
from pathlib import Path
from typing import Optional

import numpy as np

from experiments.datasets.download import (
    ENV_VAR,
    DatasetFormatError,
    PathLike,
    default_cache_dir,
    download_verified,
    file_digest,
)
from experiments.datasets.idx import Dataset, FloatDataset

__all__ = [
    "RemoteFile",
    "REMOTE_FILES",
    "IDX_GZ_MD5",
    "FACES_TRAIN",
    "FACES_TEST",
    "locate_files",
    "load_cifar",
    "load_svhn",
    "load_curves",
    "load_faces",
]

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One upstream file: its name, URL and the checksums upstream publishes (``None``: none known)."""

    name: str
    url: str
    md5: Optional[str] = None
    sha256: Optional[str] = None
    size: Optional[int] = None


REMOTE_FILES: dict[str, tuple[RemoteFile, ...]] = {
    "cifar10": (
        RemoteFile(
            "cifar-10-python.tar.gz",
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            md5="c58f30108f718f92721af3b95e74349a",
            size=170498071,
        ),
    ),
    "cifar100": (
        RemoteFile(
            "cifar-100-python.tar.gz",
            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            md5="eb9058c3a382ffc7106e4002c42a8d85",
        ),
    ),
    "svhn": (
        RemoteFile(
            "train_32x32.mat",
            "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
            md5="e26dedcc434d2e4c54c9b2d4a06d8373",
            size=182040794,
        ),
        RemoteFile(
            "test_32x32.mat",
            "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
            md5="eb5a983be6a315427106f1b164d9cef3",
            size=64275384,
        ),
    ),
    "curves": (
        RemoteFile("digs3pts_1.mat", "https://www.cs.toronto.edu/~jmartens/digs3pts_1.mat"),
    ),
    "faces": (
        RemoteFile(
            "newfaces_rot_single.mat",
            "https://www.cs.toronto.edu/~jmartens/newfaces_rot_single.mat",
        ),
    ),
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

# FACES split (the K-BFGS and KPSVD papers'): train = first 103500 rows, test = last 41400.
FACES_TRAIN, FACES_TEST = 103500, 41400


def _verify_file(path: Path, remote: RemoteFile, label: Optional[str] = None) -> None:
    label = label or str(path)
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        raise DatasetFormatError(
            f"{label}: {size} bytes, upstream's file has {remote.size} (truncated or a different file)"
        )
    for algorithm in ("sha256", "md5"):
        expected = getattr(remote, algorithm)
        if expected is not None:
            got = file_digest(path, algorithm)
            if got != expected:
                raise DatasetFormatError(
                    f"{label}: {algorithm.upper()} mismatch (expected {expected}, got {got}, {size} bytes)"
                )


def _download_file(remote: RemoteFile, dest: Path, verify: bool, set_name: str) -> None:
    """Downloads one upstream file, checked against its published size and checksums."""
    download_verified(
        remote.url,
        dest,
        check=(lambda tmp, label: _verify_file(tmp, remote, label)) if verify else None,
        help_text=f"Put {remote.name} in a folder given as data_dir, or in ${ENV_VAR}/{set_name}/.",
    )


def locate_files(
    set_name: str,
    data_dir: Optional[PathLike] = None,
    *,
    download: bool = True,
    cache_dir: Optional[PathLike] = None,
    verify: bool = True,
) -> dict[str, Path]:
    """Finds (or downloads into the cache) the upstream files of ``set_name``.

    Each file is checked against its checksum.
    """
    remotes = REMOTE_FILES[set_name]
    names = [r.name for r in remotes]
    if data_dir is not None:
        directory = Path(data_dir).expanduser()
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"data_dir {directory} does not hold the {set_name} file(s) {', '.join(missing)}"
            )
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
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(set_name)
    files = {}
    for r in remotes:
        path = cache / r.name
        if not path.is_file():
            if not download:
                raise FileNotFoundError(
                    f"The {set_name} file {r.name} was not found "
                    f"(searched {', '.join(map(str, candidates + [cache]))}) "
                    f"and download=False. Download {r.url} into one of these folders."
                )
            logger.info("Downloading %s to %s", r.url, path)
            _download_file(r, path, verify, set_name)
        elif verify:
            try:
                _verify_file(path, r)
            except DatasetFormatError as exc:
                path.unlink(missing_ok=True)
                raise DatasetFormatError(
                    f"{exc} -- removed the bad cached file; the next call will download it again"
                ) from exc
        files[r.name] = path
    return files


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts of bytes, lists and numpy arrays) and refuses everything else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def _unpickle(raw: bytes, label: str) -> dict:
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:
        raise DatasetFormatError(
            f"{label}: not a CIFAR python batch ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(obj, dict):
        raise DatasetFormatError(
            f"{label}: not a CIFAR python batch (a {type(obj).__name__}, expected a dict)"
        )
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(raw: bytes, label: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(raw, label)
    if "data" not in batch or label_key not in batch:
        raise DatasetFormatError(
            f"{label}: CIFAR batch without 'data' / '{label_key}' (keys {sorted(batch)})"
        )
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if (
        data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
        or labels.shape != (data.shape[0],)
    ):
        raise DatasetFormatError(
            f"{label}: expected uint8 data (N, 3072) and N labels, "
            f"got {data.dtype} {data.shape}, {labels.shape}"
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # channel-major rows -> NHWC
    return images, labels


def _read_cifar(path: Path, num_classes: int) -> Dataset:
    import tarfile

    folder, train_members, test_member, key = (
        ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels")
        if num_classes == 10
        else ("cifar-100-python", ["train"], "test", "fine_labels")
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
        raise DatasetFormatError(
            f"{path}: not a readable .tar.gz archive ({type(exc).__name__}: {exc})"
        ) from exc
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
        raise DatasetFormatError(
            f"{path}: a MATLAB v7.3 (HDF5) file; convert it to v5 or install h5py ({exc})"
        ) from exc
    except Exception as exc:
        raise DatasetFormatError(
            f"{path}: not a readable MATLAB .mat file ({type(exc).__name__}: {exc})"
        ) from exc
    missing = [k for k in keys if k not in mat]
    if missing:
        raise DatasetFormatError(f"{path}: lacks the variable(s) {missing}")
    return {k: np.asarray(mat[k]) for k in keys}


def _read_svhn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    m = _loadmat(path, ("X", "y"))
    x, y = m["X"], m["y"].reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.shape != (x.shape[3],):
        raise DatasetFormatError(
            f"{path}: expected X uint8 (32, 32, 3, N) and y (N, 1), got {x.dtype} {x.shape}, {m['y'].shape}"
        )
    if y.size and (y.min() < 1 or y.max() > 10):
        raise DatasetFormatError(f"{path}: SVHN labels must be 1..10 (10 is the digit 0)")
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)), (y % 10).astype(np.uint8)


def _images_to_float(x: np.ndarray, flatten: bool) -> np.ndarray:
    out = x.astype(np.float32) / np.float32(255.0)
    return out.reshape(len(out), -1) if flatten else out


def _image_dataset(x_train, y_train, x_test, y_test, flatten: bool) -> FloatDataset:
    """uint8 images in [0, 1] (flattened if asked) and int32 labels."""
    return FloatDataset(
        _images_to_float(x_train, flatten),
        y_train.astype(np.int32),
        _images_to_float(x_test, flatten),
        y_test.astype(np.int32),
    )


def _check_unit_interval(x: np.ndarray, path: Path, key: str, width: int) -> np.ndarray:
    if x.ndim != 2 or x.shape[1] != width or not np.issubdtype(x.dtype, np.floating):
        raise DatasetFormatError(
            f"{path}: '{key}' must be a float (N, {width}) array, got {x.dtype} {x.shape}"
        )
    if x.size and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 1):
        raise DatasetFormatError(f"{path}: '{key}' values must be finite and in [0, 1]")
    return x.astype(np.float32)


def load_cifar(
    num_classes: int = 10,
    data_dir: Optional[PathLike] = None,
    *,
    download: bool = True,
    cache_dir: Optional[PathLike] = None,
    verify: bool = True,
    flatten: bool = False,
) -> FloatDataset:
    """CIFAR-10 or CIFAR-100 (fine labels) from the python ``.tar.gz``.

    50000/10000 images (N, 32, 32, 3) in [0, 1].
    """
    if num_classes not in (10, 100):
        raise ValueError("num_classes must be 10 or 100")
    set_name = f"cifar{num_classes}"
    path = next(
        iter(
            locate_files(
                set_name, data_dir, download=download, cache_dir=cache_dir, verify=verify
            ).values()
        )
    )
    ds = _read_cifar(path, num_classes)
    return _image_dataset(ds.x_train, ds.y_train, ds.x_test, ds.y_test, flatten)


def load_svhn(
    data_dir: Optional[PathLike] = None,
    *,
    download: bool = True,
    cache_dir: Optional[PathLike] = None,
    verify: bool = True,
    flatten: bool = False,
) -> FloatDataset:
    """SVHN (cropped digits, train and test, no 'extra'): images (N, 32, 32, 3) in [0, 1], labels 0..9."""
    files = locate_files("svhn", data_dir, download=download, cache_dir=cache_dir, verify=verify)
    x_train, y_train = _read_svhn(files["train_32x32.mat"])
    x_test, y_test = _read_svhn(files["test_32x32.mat"])
    return _image_dataset(x_train, y_train, x_test, y_test, flatten)


def load_curves(
    data_dir: Optional[PathLike] = None,
    *,
    download: bool = True,
    cache_dir: Optional[PathLike] = None,
    verify: bool = True,
    flatten: bool = True,
) -> FloatDataset:
    """CURVES (Hinton & Salakhutdinov; Martens's file).

    20000 train / 10000 test rows of 784 values in [0, 1].
    """
    path = locate_files("curves", data_dir, download=download, cache_dir=cache_dir, verify=verify)[
        "digs3pts_1.mat"
    ]
    m = _loadmat(path, ("bdata", "bdatatest"))
    return FloatDataset(
        _check_unit_interval(m["bdata"], path, "bdata", 784),
        None,
        _check_unit_interval(m["bdatatest"], path, "bdatatest", 784),
        None,
    )


def load_faces(
    data_dir: Optional[PathLike] = None,
    *,
    download: bool = True,
    cache_dir: Optional[PathLike] = None,
    verify: bool = True,
    flatten: bool = True,
) -> FloatDataset:
    """FACES (Martens's ``newfaces_rot_single``): 625-pixel rows; train = first 103500, test = last 41400.

    The file stores ``newfaces_single`` as (625, N); it is transposed. Values
    are real (the autoencoder uses the squared error), not checked against [0, 1].
    A file with fewer than 103500 + 41400 rows (e.g. a test fixture) is split
    in the same 103500 : 41400 proportion.
    """
    path = locate_files("faces", data_dir, download=download, cache_dir=cache_dir, verify=verify)[
        "newfaces_rot_single.mat"
    ]
    raw = _loadmat(path, ("newfaces_single",))["newfaces_single"]
    if raw.ndim != 2 or raw.shape[0] != 625 or not np.issubdtype(raw.dtype, np.floating):
        raise DatasetFormatError(
            f"{path}: 'newfaces_single' must be a float (625, N) array, got {raw.dtype} {raw.shape}"
        )
    if not np.isfinite(raw).all():
        raise DatasetFormatError(f"{path}: 'newfaces_single' holds non-finite values")
    rows = raw.T.astype(np.float32)
    n = len(rows)
    if n >= FACES_TRAIN + FACES_TEST:
        n_train, n_test = FACES_TRAIN, FACES_TEST
    else:
        n_train = int(n * FACES_TRAIN / (FACES_TRAIN + FACES_TEST + 20700))
        n_test = int(n * FACES_TEST / (FACES_TRAIN + FACES_TEST + 20700))
    return FloatDataset(rows[:n_train], None, rows[n - n_test :], None)
