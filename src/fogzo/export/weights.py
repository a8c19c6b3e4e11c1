"""One exported layer weight: :class:`QuantizedWeight` (packed codes, step sizes ``α``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear
from ..quantizers import LevelSet
from .packing import container_bits, unpack_codes

__all__ = ["QuantizedWeight"]

# Quantized layer class -> the plain torch class it was re-classed from (see convert.py).
_PLAIN_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    QuantLinear: nn.Linear,
    QuantConv1d: nn.Conv1d,
    QuantConv2d: nn.Conv2d,
    QuantEmbedding: nn.Embedding,
}
_PLAIN_BY_NAME: dict[str, type[nn.Module]] = {cls.__name__: cls for cls in _PLAIN_CLASSES.values()}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _format_bytes(count: int) -> str:
    return f"{count:,} B"


@dataclass(frozen=True, eq=False, repr=False)
class QuantizedWeight:
    """The weight of one quantized layer: packed integer codes and step sizes ``α``.

    The dequantized weight is ``α · levels.from_codes(codes)`` with
    ``codes = unpack_codes(packed, bits, numel).reshape(shape)`` (see :meth:`dequantize`).

    Attributes:
        module: the layer's module name in the model (``""`` for the root).
        layer_type: ``"Linear"``, ``"Conv1d"``, ``"Conv2d"`` or ``"Embedding"``.
        levels: the level set of ``h``.
        shape: the weight's shape.
        dtype: the latent weight's dtype (that of the dequantized weight).
        packed: 1-D uint8, ``ceil(numel · bits / 8)`` bytes (see :func:`pack_codes`).
        alpha: float32 step sizes, shape ``()`` or ``(shape[0], 1, …, 1)``.
        input_levels: the level set of the layer's input (activation) quantizer, if any.
        aliases: further module names under which the same layer object appears.
    """

    module: str
    layer_type: str
    levels: LevelSet
    shape: tuple[int, ...]
    dtype: torch.dtype
    packed: torch.Tensor
    alpha: torch.Tensor
    input_levels: LevelSet | None = None
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        where = f"quantized weight of {self.module!r}"
        if self.layer_type not in _PLAIN_BY_NAME:
            raise ValueError(
                f"{where}: unknown layer type {self.layer_type!r}; expected one of {sorted(_PLAIN_BY_NAME)}"
            )
        if not isinstance(self.levels, LevelSet) or not self.levels.low < self.levels.high:
            raise ValueError(f"{where}: invalid level set {self.levels!r}")
        if self.levels.is_sign and (self.levels.low, self.levels.high) != (-1, 1):
            raise ValueError(f"{where}: sign levels must span -1..1, got {self.levels!r}")
        bits = container_bits(self.levels)
        if not all(_is_int(size) and size >= 0 for size in self.shape) or len(self.shape) == 0:
            raise ValueError(f"{where}: invalid weight shape {self.shape!r}")
        if not self.dtype.is_floating_point:
            raise ValueError(f"{where}: weight dtype must be floating point, got {self.dtype}")
        if self.packed.dtype != torch.uint8 or self.packed.dim() != 1:
            raise ValueError(
                f"{where}: packed codes must be a 1-D uint8 tensor, got {self.packed.dtype} {tuple(self.packed.shape)}"
            )
        expected_bytes = -(-self.numel // (8 // bits))
        if self.packed.numel() != expected_bytes:
            raise ValueError(
                f"{where}: {self.numel} codes of {bits} bits need {expected_bytes} bytes, got {self.packed.numel()}"
            )
        per_channel_shape = (self.shape[0],) + (1,) * (len(self.shape) - 1)
        if self.alpha.dtype != torch.float32 or tuple(self.alpha.shape) not in ((), per_channel_shape):
            raise ValueError(
                f"{where}: alpha must be float32 of shape () or {per_channel_shape}, "
                f"got {self.alpha.dtype} {tuple(self.alpha.shape)}"
            )
        if self.alpha.numel() and not bool(torch.isfinite(self.alpha).all() and (self.alpha > 0).all()):
            raise ValueError(f"{where}: step sizes alpha must be finite and positive")
        if self.levels.num_levels < 1 << bits and self.numel:
            # Every code, the zero padding included, must name a level.
            per_byte = 8 // bits
            codes = unpack_codes(self.packed, bits, self.packed.numel() * per_byte)
            if int(codes[: self.numel].max()) >= self.levels.num_levels:
                raise ValueError(f"{where}: code out of range for {self.levels.num_levels} levels (corrupted codes)")
            if bool(codes[self.numel :].any()):
                raise ValueError(f"{where}: non-zero padding bits after the last code (corrupted codes)")

    @property
    def bits(self) -> int:
        """Container width in bits per code (1, 2, 4 or 8)."""
        return container_bits(self.levels)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def per_channel(self) -> bool:
        return self.alpha.dim() > 0

    @property
    def key(self) -> str:
        """The weight's state-dict name."""
        return f"{self.module}.weight" if self.module else "weight"

    @property
    def keys(self) -> tuple[str, ...]:
        """The weight's state-dict names (one per module name of the layer)."""
        return tuple(f"{name}.weight" if name else "weight" for name in (self.module, *self.aliases))

    @property
    def nbytes(self) -> int:
        """Bytes of the packed codes plus the step sizes."""
        return self.packed.numel() + 4 * self.alpha.numel()

    @property
    def fp32_nbytes(self) -> int:
        """Bytes of the same weight stored as float32."""
        return 4 * self.numel

    def codes(self) -> torch.Tensor:
        """The unsigned codes, uint8 of shape :attr:`shape`."""
        return unpack_codes(self.packed, self.bits, self.numel).reshape(self.shape)

    def dequantize(self) -> torch.Tensor:
        """``α · level(code)`` in :attr:`dtype`: the layer's fake-quantized weight ``Q(W)``."""
        return (self.levels.from_codes(self.codes()) * self.alpha).to(self.dtype)

    def __repr__(self) -> str:
        grain = f"per-channel alpha {tuple(self.alpha.shape)}" if self.per_channel else "per-tensor alpha"
        extra = f", input levels {self.input_levels.name}" if self.input_levels is not None else ""
        return (
            f"QuantizedWeight({self.module!r}: {self.layer_type} {self.levels.name} "
            f"[{self.levels.low}..{self.levels.high}] in {self.bits}-bit codes, shape {self.shape}, "
            f"{grain}{extra}; {_format_bytes(self.nbytes)} vs {_format_bytes(self.fp32_nbytes)} fp32)"
        )
