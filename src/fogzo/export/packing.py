"""Bit-packing of integer weight codes into ``uint8`` containers.

Codes go into a *container* of ``b ∈ {1, 2, 4, 8}`` bits, the smallest that holds
``code_bits`` (sign: 1, ternary: 2, int2: 2, int3/int4: 4, int5…int8: 8); ``8 // b`` codes
share a byte, little-endian within the byte (the first code in the lowest bits); the last
byte is padded with zero codes. The packed size is ``ceil(numel · b / 8)`` bytes, ``b/32`` of
the float32 size up to that padding.
"""

from __future__ import annotations

import torch

from ..quantizers import LevelSet

__all__ = ["CONTAINER_BITS", "container_bits", "pack_codes", "unpack_codes"]

CONTAINER_BITS = (1, 2, 4, 8)


def container_bits(levels: LevelSet) -> int:
    """The container width (1, 2, 4 or 8 bits) used to store codes of ``levels``."""
    needed = levels.code_bits
    for bits in CONTAINER_BITS:
        if bits >= needed:
            return bits
    raise ValueError(f"level set {levels.name!r} needs {needed} bits per code; at most 8 are supported")


def _check_container(bits: int) -> None:
    if isinstance(bits, bool) or bits not in CONTAINER_BITS:
        raise ValueError(f"bits must be one of {CONTAINER_BITS}, got {bits!r}")


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 8, bits, dtype=torch.uint8, device=device)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (uint8, any shape, read in row-major order) into bytes.

    ``8 // bits`` codes share a byte, the first in the lowest bits; the last byte is padded
    with zero codes. Returns a 1-D uint8 tensor of ``ceil(numel / (8 // bits))`` bytes on
    the device of ``codes``.

    Raises:
        ValueError: ``bits`` is not 1, 2, 4 or 8, ``codes`` is not uint8, or a code does
            not fit in ``bits`` bits.
    """
    _check_container(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be a uint8 tensor, got {codes.dtype}")
    flat = codes.detach().reshape(-1)
    if bits < 8 and flat.numel() > 0 and int(flat.max()) >= 1 << bits:
        raise ValueError(f"code {int(flat.max())} does not fit in {bits} bits")
    per_byte = 8 // bits
    if per_byte == 1:
        return flat.clone()
    padding = -flat.numel() % per_byte
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    shifted = flat.reshape(-1, per_byte) << _shifts(bits, flat.device)
    return shifted.sum(dim=1).to(torch.uint8)  # the fields are disjoint: sum == bitwise or


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes (1-D uint8) of ``packed``.

    Raises:
        ValueError: ``bits`` is not 1, 2, 4 or 8, ``packed`` is not uint8, or its length is
            not ``ceil(numel / (8 // bits))``.
    """
    _check_container(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be a uint8 tensor, got {packed.dtype}")
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    per_byte = 8 // bits
    expected = -(-numel // per_byte)
    if packed.numel() != expected:
        raise ValueError(f"{numel} codes of {bits} bits pack into {expected} bytes, got {packed.numel()}")
    flat = packed.detach().reshape(-1)
    if per_byte == 1:
        return flat.clone()
    fields = (flat.reshape(-1, 1) >> _shifts(bits, flat.device)) & ((1 << bits) - 1)
    return fields.reshape(-1)[:numel].clone()
