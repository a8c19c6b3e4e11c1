"""Reader and writer for the IDX file format used by MNIST and Fashion-MNIST.

An IDX file is a small big-endian header followed by the raw array data:

* bytes 0-1: always zero (the first half of the "magic number");
* byte 2: a code for the element type (see :data:`IDX_TYPE_CODES`);
* byte 3: the number of dimensions;
* then one unsigned 32-bit big-endian integer per dimension (its size);
* then the elements in C order, each stored big-endian.

Files may be gzip-compressed (the usual ``.gz`` downloads); compression is detected from
the file content, not from the file name.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["IDX_TYPE_CODES", "read_idx", "write_idx"]

#: Element-type code (byte 2 of the header) -> big-endian numpy dtype.
IDX_TYPE_CODES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),  # unsigned byte
    0x09: np.dtype(">i1"),  # signed byte
    0x0B: np.dtype(">i2"),  # 16-bit integer
    0x0C: np.dtype(">i4"),  # 32-bit integer
    0x0D: np.dtype(">f4"),  # 32-bit float
    0x0E: np.dtype(">f8"),  # 64-bit float
}

_GZIP_SIGNATURE = b"\x1f\x8b"
_HEADER_PREFIX_BYTES = 4  # two zero bytes, type code, number of dimensions
_DIMENSION_BYTES = 4


def _read_file_bytes(path: Path) -> bytes:
    """Return the (decompressed, if gzip) content of ``path``."""
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise ValueError(f"IDX file {path} is a directory, not a file") from None
    if raw[:2] != _GZIP_SIGNATURE:
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as error:
        raise ValueError(
            f"IDX file {path} is gzip-compressed but cannot be decompressed ({error}); "
            "the file is probably truncated or corrupt: download it again"
        ) from error


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (plain or gzip-compressed) into a numpy array.

    Args:
        path: the file to read, for example ``train-images-idx3-ubyte.gz``.

    Returns:
        A writable array in native byte order with the shape given in the header
        (for example ``uint8 [60000, 28, 28]`` for the MNIST training images).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a valid IDX file: wrong magic number, unknown
            element-type code, zero dimensions, or a length that does not match the
            header (truncated or with trailing bytes). The message names the file.
    """
    path = Path(path)
    content = _read_file_bytes(path)

    if len(content) < _HEADER_PREFIX_BYTES:
        raise ValueError(
            f"IDX file {path} is too short ({len(content)} bytes) to hold the 4-byte IDX "
            "header; the file is empty or truncated"
        )
    if content[0] != 0 or content[1] != 0:
        raise ValueError(
            f"IDX file {path} has a wrong magic number: its first two bytes are "
            f"0x{content[0]:02x} 0x{content[1]:02x}, expected 0x00 0x00; this is not an "
            "IDX file (or it is corrupt)"
        )
    type_code, dimension_count = content[2], content[3]
    if type_code not in IDX_TYPE_CODES:
        known = ", ".join(f"0x{code:02x}" for code in IDX_TYPE_CODES)
        raise ValueError(
            f"IDX file {path} has an unknown element-type code 0x{type_code:02x} in its "
            f"header (known codes: {known}); the file is corrupt or not an IDX file"
        )
    if dimension_count == 0:
        raise ValueError(f"IDX file {path} declares 0 dimensions; an IDX array needs at least 1")

    header_bytes = _HEADER_PREFIX_BYTES + _DIMENSION_BYTES * dimension_count
    if len(content) < header_bytes:
        raise ValueError(
            f"IDX file {path} is truncated inside its header: it declares "
            f"{dimension_count} dimensions, which needs {header_bytes} header bytes, but the "
            f"file has only {len(content)} bytes"
        )
    shape = struct.unpack(f">{dimension_count}I", content[_HEADER_PREFIX_BYTES:header_bytes])
    dtype = IDX_TYPE_CODES[type_code]
    expected_data_bytes = math.prod(shape) * dtype.itemsize
    actual_data_bytes = len(content) - header_bytes
    if actual_data_bytes < expected_data_bytes:
        raise ValueError(
            f"IDX file {path} is truncated: its header declares shape {tuple(shape)} of "
            f"{dtype.newbyteorder('=').name}, which needs {expected_data_bytes} data bytes, but "
            f"only {actual_data_bytes} follow the header; download the file again"
        )
    if actual_data_bytes > expected_data_bytes:
        raise ValueError(
            f"IDX file {path} has {actual_data_bytes - expected_data_bytes} unexpected bytes "
            f"after the data declared by its header (shape {tuple(shape)} of "
            f"{dtype.newbyteorder('=').name}); the file is corrupt or not an IDX file"
        )

    array = np.frombuffer(content, dtype=dtype, count=math.prod(shape), offset=header_bytes)
    # astype copies: the result is writable and in native byte order.
    return array.reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write ``array`` as an IDX file; gzip-compress it if ``path`` ends in ``.gz``.

    Args:
        path: the destination file.
        array: an array with at least one dimension, of dtype uint8, int8, int16, int32,
            float32 or float64.

    Raises:
        ValueError: if the array has no dimensions, a dimension too large for the 32-bit
            header field, or a dtype that IDX cannot store.
    """
    array = np.asarray(array)
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"IDX stores arrays with 1 to 255 dimensions, got {array.ndim}")
    if any(size >= 2**32 for size in array.shape):
        raise ValueError(f"IDX dimension sizes must fit in 32 bits, got shape {array.shape}")
    native_to_code = {dtype.newbyteorder("=").str: code for code, dtype in IDX_TYPE_CODES.items()}
    type_code = native_to_code.get(array.dtype.newbyteorder("=").str)
    if type_code is None:
        names = ", ".join(dtype.newbyteorder("=").name for dtype in IDX_TYPE_CODES.values())
        raise ValueError(f"IDX cannot store dtype {array.dtype}; use one of: {names}")

    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    content = header + np.ascontiguousarray(array, dtype=IDX_TYPE_CODES[type_code]).tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        # mtime=0 makes the compressed bytes deterministic.
        content = gzip.compress(content, mtime=0)
    path.write_bytes(content)
