"""An exported model: :class:`ExportedModel` (quantized weights plus the rest of the state dict)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .format import alpha_name, codes_name, decode, encode
from .safetensors_io import _read_safetensors, _write_safetensors
from .weights import QuantizedWeight, _format_bytes

__all__ = ["ExportedModel"]


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass(frozen=True, eq=False, repr=False)
class ExportedModel:
    """A quantized model for storage: packed weights plus the rest of the state dict.

    Attributes:
        layers: one :class:`QuantizedWeight` per quantized layer, in module order.
        tensors: every other state-dict entry (latent weights and weight-quantizer ``α``
            entries excluded), by state-dict name, detached CPU tensors in their own dtype.

    See :mod:`fogzo.export.format` for the file format of :meth:`save` / :meth:`load`.
    """

    layers: tuple[QuantizedWeight, ...]
    tensors: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("an ExportedModel needs at least one quantized layer")
        modules = [name for layer in self.layers for name in (layer.module, *layer.aliases)]
        if len(set(modules)) != len(modules):
            raise ValueError(f"duplicate module names among the quantized layers: {modules}")
        reserved = {key for layer in self.layers for key in layer.keys}
        reserved |= {codes_name(layer) for layer in self.layers}
        reserved |= {alpha_name(layer) for layer in self.layers}
        clash = sorted(reserved & set(self.tensors))
        if clash:
            raise ValueError(f"tensor names clash with the quantized weights' entries: {clash}")

    # -- sizes ---------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes of all tensor data (packed codes, step sizes, other tensors)."""
        weights = sum(layer.nbytes for layer in self.layers)
        return weights + sum(_nbytes(t) for t in self.tensors.values())

    @property
    def fp32_nbytes(self) -> int:
        """Bytes of the same state dict with every quantized weight stored as float32."""
        weights = sum(layer.fp32_nbytes for layer in self.layers)
        return weights + sum(_nbytes(t) for t in self.tensors.values())

    @property
    def compression_ratio(self) -> float:
        """``fp32_nbytes / nbytes``."""
        return self.fp32_nbytes / max(self.nbytes, 1)

    # -- conversion ----------------------------------------------------------------------

    def dequantized_state_dict(self) -> dict[str, torch.Tensor]:
        """A plain float state dict: each quantized weight is ``α · level(code)``.

        It loads (``strict=True``) into the model returned by :func:`rebuild_float_model`.
        """
        state = dict(self.tensors)
        for layer in self.layers:
            weight = layer.dequantize()
            for key in layer.keys:
                state[key] = weight
        return state

    # -- files ---------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file (see :mod:`fogzo.export.format` for the layout)."""
        tensors, metadata = encode(self.layers, self.tensors)
        _write_safetensors(path, tensors, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ExportedModel:
        """Read a file written by :meth:`save`.

        Raises:
            ValueError: the file is truncated, corrupted, or not a fogzo export.
        """
        tensors, metadata = _read_safetensors(path)
        try:
            return cls(*decode(tensors, metadata))
        except ValueError as error:
            raise ValueError(f"{os.fspath(path)}: {error}") from error

    def __repr__(self) -> str:
        lines = [
            f"ExportedModel({_plural(len(self.layers), 'quantized layer')}, "
            f"{_plural(len(self.tensors), 'other tensor')}: "
            f"{_format_bytes(self.nbytes)} vs {_format_bytes(self.fp32_nbytes)} with fp32 weights, "
            f"compression {self.compression_ratio:.2f}x"
        ]
        lines += [f"  {layer!r}" for layer in self.layers]
        other = sum(_nbytes(t) for t in self.tensors.values())
        lines.append(f"  other tensors: {_format_bytes(other)}")
        return "\n".join(lines) + "\n)"
