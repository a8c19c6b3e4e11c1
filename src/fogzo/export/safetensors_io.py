"""The safetensors codec: write and read a file of named tensors plus string metadata.

Files are written with ``safetensors.torch.save_file`` (to ``<path>.partial``, then an atomic
rename) and read memory-mapped with ``safetensors.safe_open``. The writer adds a ``"sha256"``
metadata entry: the hex digest of the tensors' raw little-endian bytes concatenated in the
order given, which does not depend on how safetensors lays the tensors out in the file.
Nothing here knows what the tensors mean (that is :mod:`fogzo.export.format`).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

# safetensors dtype names.
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
_DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in _DTYPES.items()}


# safetensors' reasons for refusing a file, in words that say what happened to it.
_SAFETENSORS_REASONS = (
    ("header too small", "the file is too short for a safetensors header (truncated or empty)"),
    ("invalid header length", "the header length exceeds the bytes that follow it (truncated file)"),
    ("header too large", "the header length exceeds safetensors' limit (corrupted or not a safetensors file)"),
    ("invalid json", "the header is not valid UTF-8 JSON (corrupted or not a safetensors file)"),
    ("invalid utf-8", "the header is not valid UTF-8 JSON (corrupted or not a safetensors file)"),
    ("file not fully covered", "the data does not match the header (truncated file or trailing bytes)"),
    (
        "invalid shape, data type, or offset",
        "tensor data_offsets do not match their dtype and shape (corrupted header)",
    ),
    ("invalid offset", "tensor data_offsets do not match their dtype and shape (corrupted header)"),
)


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        supported = sorted(_DTYPES)
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors; supported: {supported}") from None


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of ``tensor`` in row-major order (no copy where possible)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    raw = flat.view(torch.uint8)
    if sys.byteorder == "big" and flat.element_size() > 1:
        raw = raw.reshape(-1, flat.element_size()).flip(1).reshape(-1)
    return raw.numpy().data


def _content_digest(tensors: list[torch.Tensor]) -> str:
    """sha256 of the tensors' raw little-endian bytes, concatenated in the given order."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _write_safetensors(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write ``tensors`` and ``metadata`` plus a ``"sha256"`` of the tensors' bytes in this order.

    ``safetensors.torch.save_file`` to ``<path>.partial``, then an atomic rename.
    """
    from safetensors.torch import save_file

    if "__metadata__" in tensors:
        raise ValueError("'__metadata__' is reserved and cannot name a tensor")
    for tensor in tensors.values():
        _dtype_name(tensor.dtype)  # a clear error for dtypes safetensors cannot hold
    contents = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    metadata = {**metadata, "sha256": _content_digest(list(contents.values()))}
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        save_file(contents, os.fspath(partial), metadata=metadata)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file (memory-mapped, ``safe_open``): its tensors and ``__metadata__``.

    Raises:
        ValueError: the file is missing, truncated or malformed; the message names the file.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (not a dict)
    except SafetensorError as error:
        message = str(error)
        reason = next((words for key, words in _SAFETENSORS_REASONS if key in message.lower()), "malformed file")
        raise ValueError(f"{os.fspath(path)}: not a readable safetensors file: {reason} ({message})") from error
    return tensors, metadata
