"""Small files in the real formats of CIFAR, SVHN, CURVES and FACES, for tests.

(The IDX fixture, :func:`experiments.datasets.idx.write_fixture_idx`, lives with the IDX code.)
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from experiments.datasets.download import PathLike

__all__ = [
    "write_fixture_cifar",
    "write_fixture_svhn",
    "write_fixture_curves",
    "write_fixture_faces",
]


def write_fixture_cifar(
    directory: PathLike,
    *,
    num_classes: int = 10,
    n_train: int = 20,
    n_test: int = 10,
    seed: int = 0,
) -> Path:
    """Writes a small ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` with upstream's layout."""
    import tarfile

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    folder, train_members, test_member, key = (
        ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels")
        if num_classes == 10
        else ("cifar-100-python", ["train"], "test", b"fine_labels")
    )
    path = directory / f"cifar-{num_classes}-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:

        def add(name: str, n: int) -> None:
            batch = {
                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                key: [int(v) for v in rng.integers(0, num_classes, n)],
                b"batch_label": name.encode(),
            }
            raw = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))

        per = max(1, n_train // len(train_members))
        for m in train_members:
            add(m, per)
        add(test_member, n_test)
    return path


def write_fixture_svhn(
    directory: PathLike, *, n_train: int = 20, n_test: int = 10, seed: int = 0
) -> None:
    import scipy.io

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        scipy.io.savemat(
            directory / name,
            {
                "X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                "y": rng.integers(1, 11, (n, 1)).astype(np.uint8),
            },
        )


def write_fixture_curves(
    directory: PathLike, *, n_train: int = 40, n_test: int = 20, seed: int = 0
) -> None:
    import scipy.io

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scipy.io.savemat(
        directory / "digs3pts_1.mat",
        {"bdata": rng.random((n_train, 784)), "bdatatest": rng.random((n_test, 784))},
    )


def write_fixture_faces(directory: PathLike, *, n: int = 80, seed: int = 0) -> None:
    import scipy.io

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scipy.io.savemat(
        directory / "newfaces_rot_single.mat",
        {"newfaces_single": rng.standard_normal((625, n)).astype(np.float32)},
    )
