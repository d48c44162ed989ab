"""The IDX file format: reading, parsing, encoding and writing.

An IDX file is a 4-byte header (two zero bytes, a type code, the number of
dimensions), one big-endian uint32 per dimension, then the data, big-endian.
Files may be gzip-compressed; :func:`read_idx` detects it. Only numpy and the
standard library are used. A malformed file raises :class:`DatasetFormatError`
naming it.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from pathlib import Path
from typing import Optional

import numpy as np

from experiments.datasets.download import DatasetFormatError, PathLike

__all__ = ["read_idx", "encode_idx", "write_idx", "read_payload", "parse_idx"]

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


def read_payload(path: Path, label: Optional[str] = None) -> bytes:
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


def parse_idx(payload: bytes, label: str) -> np.ndarray:
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
    return parse_idx(read_payload(path), str(path))


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
