"""Data sets of the experiments: Fashion-MNIST and MNIST (IDX), CIFAR-10/100, SVHN, CURVES, FACES.

:func:`load_arrays` is the entry point of the CLIs. The IDX sets are described in
:mod:`experiments.datasets.idx`; the others (upstream URLs, published checksums, formats)
in :mod:`experiments.datasets.remote`. Every set has a fixture generator writing small
files in the real format (``write_fixture_*``), and a corrupt, truncated or wrong-format
file raises :class:`DatasetFormatError` naming it.

Modules: :mod:`~experiments.datasets.download` (the one download-and-verify path, the cache
folder, the error types), :mod:`~experiments.datasets.idx_format` (reading and writing IDX
files), :mod:`~experiments.datasets.idx` (Fashion-MNIST, MNIST),
:mod:`~experiments.datasets.remote` (CIFAR-10/100, SVHN, CURVES, FACES),
:mod:`~experiments.datasets.fixtures`.
"""

from __future__ import annotations

import urllib.request  # noqa: F401  (the loaders download through it; tests patch urlopen)
from typing import Optional

from experiments.datasets.download import (
    ENV_VAR,
    DatasetDownloadError,
    DatasetFormatError,
    PathLike,
    default_cache_dir,
)
from experiments.datasets.fixtures import (
    write_fixture_cifar,
    write_fixture_curves,
    write_fixture_faces,
    write_fixture_svhn,
)
from experiments.datasets.idx import (
    FASHION_MNIST_SHA256,
    FASHION_MNIST_URL,
    IDX_FILES,
    MNIST_SHA256,
    MNIST_URL,
    SYSTEM_DATA_DIRS,
    Dataset,
    FloatDataset,
    load_fashion_mnist,
    load_mnist,
    to_float_arrays,
    write_fixture_idx,
)
from experiments.datasets.idx_format import encode_idx, read_idx, write_idx
from experiments.datasets.remote import (
    FACES_TEST,
    FACES_TRAIN,
    IDX_GZ_MD5,
    REMOTE_FILES,
    RemoteFile,
    load_cifar,
    load_curves,
    load_faces,
    load_svhn,
    locate_files,
)

__all__ = [
    "DatasetFormatError",
    "DatasetDownloadError",
    "Dataset",
    "FloatDataset",
    "ENV_VAR",
    "IDX_FILES",
    "FASHION_MNIST_SHA256",
    "MNIST_SHA256",
    "SYSTEM_DATA_DIRS",
    "FASHION_MNIST_URL",
    "MNIST_URL",
    "RemoteFile",
    "REMOTE_FILES",
    "IDX_GZ_MD5",
    "FACES_TRAIN",
    "FACES_TEST",
    "read_idx",
    "encode_idx",
    "write_idx",
    "load_fashion_mnist",
    "load_mnist",
    "load_cifar",
    "load_svhn",
    "load_curves",
    "load_faces",
    "locate_files",
    "default_cache_dir",
    "to_float_arrays",
    "write_fixture_idx",
    "write_fixture_cifar",
    "write_fixture_svhn",
    "write_fixture_curves",
    "write_fixture_faces",
    "NUM_CLASSES",
    "RECONSTRUCTION",
    "load_arrays",
]

_EXTRA_LOADERS = {
    "cifar10": lambda **kw: load_cifar(10, kw.pop("data_dir"), **kw),
    "cifar100": lambda **kw: load_cifar(100, kw.pop("data_dir"), **kw),
    "svhn": lambda **kw: load_svhn(kw.pop("data_dir"), **kw),
    "curves": lambda **kw: load_curves(kw.pop("data_dir"), **kw),
    "faces": lambda **kw: load_faces(kw.pop("data_dir"), **kw),
}

NUM_CLASSES: dict[str, int] = {
    "fashion-mnist": 10,
    "mnist": 10,
    "cifar10": 10,
    "cifar100": 100,
    "svhn": 10,
}
# Autoencoder loss per data set: Bernoulli (sigmoid cross-entropy) or Gaussian (squared error).
RECONSTRUCTION: dict[str, str] = {
    "fashion-mnist": "bernoulli",
    "mnist": "bernoulli",
    "curves": "bernoulli",
    "faces": "gaussian",
}


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
        return to_float_arrays(
            load_fashion_mnist(data_dir, verify=verify, download=download), flatten=flatten
        )
    if name == "mnist":
        return to_float_arrays(
            load_mnist(data_dir, verify=verify, download=download), flatten=flatten
        )
    loaders = _EXTRA_LOADERS
    if name not in loaders:
        raise ValueError(
            f"unknown data set {name!r}; known: {sorted(['fashion-mnist', 'mnist', *loaders])}"
        )
    return loaders[name](data_dir=data_dir, verify=verify, download=download, flatten=flatten)
