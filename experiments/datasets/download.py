"""The one download-and-verify path of every data-set loader, and where files are cached.

:func:`download_verified` streams a URL into a temporary file next to its destination,
checks it (the caller's ``check``: structure, checksums) and only then renames it, so nothing
partial is ever left under the final name. Failures raise :class:`DatasetDownloadError`
(network) or :class:`DatasetFormatError` (the file is corrupt or fails its checksum).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Optional, Union

__all__ = [
    "ENV_VAR",
    "PathLike",
    "DatasetFormatError",
    "DatasetDownloadError",
    "default_cache_dir",
    "file_digest",
    "download_verified",
]

PathLike = Union[str, "os.PathLike[str]"]

ENV_VAR = "SOFIM_OPTAX_DATA"

_DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK_BYTES = 1 << 20


class DatasetFormatError(ValueError):
    """A data file is corrupt, truncated, of the wrong format or fails its checksum."""


class DatasetDownloadError(OSError):
    """A data file could not be downloaded."""


def default_cache_dir(set_name: str) -> Path:
    """The per-user cache directory for ``set_name``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "sofim_optax" / set_name


def file_digest(path: Path, algorithm: str) -> str:
    """The hex digest of ``path`` with ``algorithm`` (``hashlib`` name), read in chunks."""
    digest = hashlib.new(algorithm)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_verified(
    url: str, dest: Path, *, check: Optional[Callable[[Path, str], None]], help_text: str
) -> None:
    """Downloads ``url`` to ``dest`` atomically, checked before the rename.

    Args:
      url: what to download.
      dest: the final path; its folder is created.
      check: ``check(tmp_path, label)`` raises :class:`DatasetFormatError` when the
        downloaded file is not what was expected (``None``: no check).
      help_text: appended to the error message of a failed download (how to provide the
        file another way).
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
                f"Downloading {url} to {dest} failed ({type(exc).__name__}: {exc}). {help_text}"
            ) from exc
        if check is not None:
            check(tmp, f"{dest} (downloaded from {url})")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
