"""Export of quantized models: packed integer codes, step sizes, and a safetensors file.

:func:`export` turns a model prepared with :func:`fogzo.quantize` into an
:class:`ExportedModel`:

* for every quantized layer a :class:`QuantizedWeight` holding the integer codes of
  ``h(W/α)`` (``code = level − low``, or ``1`` for ``+1`` / ``0`` for ``−1`` with sign
  levels) packed into ``uint8``, the step sizes ``α`` (float32, shape ``()`` or
  ``(C, 1, …, 1)``), the level set and the weight's shape and dtype, so that::

      weight = α · levels.from_codes(unpack_codes(packed, bits, numel)).reshape(shape)

  is exactly the fake-quantized weight ``Q(W)`` the layer uses in its forward pass;
* every other entry of the model's state dict (biases, norms, running statistics,
  unquantized layers, …) as it is, under its state-dict name. The latent weights and the
  weight quantizers' ``α`` entries are left out: ``α`` is stored once, with the codes.

Packing (:func:`pack_codes`): codes go into a *container* of ``b ∈ {1, 2, 4, 8}`` bits, the
smallest that holds ``code_bits`` (sign: 1, ternary: 2, int2: 2, int3/int4: 4, int5…int8: 8);
``8 // b`` codes share a byte, little-endian within the byte (the first code in the lowest
bits); the last byte is padded with zero codes. The packed size is
``ceil(numel · b / 8)`` bytes, ``b/32`` of the float32 size up to that padding.

File format (:meth:`ExportedModel.save`, :meth:`ExportedModel.load`): a
`safetensors <https://github.com/huggingface/safetensors>`_ file, written with
``safetensors.torch.save_file`` and read memory-mapped with ``safetensors.safe_open``.

Tensors: ``"<module>.weight.codes"`` (U8, 1-D, the packed codes) and
``"<module>.weight.alpha"`` (F32) for every quantized layer, and every other state-dict
entry under its own name and dtype. ``__metadata__`` holds ``"format"``
(``"fogzo.export"``), ``"format_version"`` (``"2"``), ``"layers"`` (a JSON list with, per
quantized layer, ``module``, ``aliases``, ``type``, ``levels`` ``{name, low, high}``, ``bits``
(container width), ``code_bits``, ``shape``, ``dtype``, the names of its ``codes`` and
``alpha`` tensors and ``input_levels``), ``"tensors"`` (a JSON list of the other tensors'
names, in state-dict order) and ``"sha256"``: the hex digest of the tensors' raw
little-endian bytes concatenated in metadata order (each layer's codes then α, then the
other tensors), checked on load. It does not depend on how a writer lays the tensors out
in the file.

:func:`rebuild_float_model` turns an export back into a plain float model (``nn.Linear``,
``nn.Conv1d``, ``nn.Conv2d``, ``nn.Embedding``) whose outputs equal the fake-quantized
model's.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..convert import quantized_layers
from ..layers import QuantConv1d, QuantConv2d, QuantEmbedding, QuantizedLayer, QuantLinear
from ..quantizers import LevelSet

__all__ = [
    "CONTAINER_BITS",
    "ExportedModel",
    "QuantizedWeight",
    "container_bits",
    "export",
    "pack_codes",
    "rebuild_float_model",
    "unpack_codes",
]

CONTAINER_BITS = (1, 2, 4, 8)
FORMAT_NAME = "fogzo.export"
FORMAT_VERSION = "2"  # 2: "sha256" covers the tensors' bytes in metadata order (1: the file's data buffer)

_CODES_SUFFIX = ".codes"
_ALPHA_SUFFIX = ".alpha"

# Quantized layer class -> the plain torch class it was re-classed from (see convert.py).
_PLAIN_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    QuantLinear: nn.Linear,
    QuantConv1d: nn.Conv1d,
    QuantConv2d: nn.Conv2d,
    QuantEmbedding: nn.Embedding,
}
_PLAIN_BY_NAME: dict[str, type[nn.Module]] = {cls.__name__: cls for cls in _PLAIN_CLASSES.values()}

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
_LAYER_FIELDS = frozenset(
    {"module", "aliases", "type", "levels", "bits", "code_bits", "shape", "dtype", "codes", "alpha"}
    | {"input_levels"}
)


# ---------------------------------------------------------------------------------------
# Code packing
# ---------------------------------------------------------------------------------------


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
        raise ValueError(
            f"{numel} codes of {bits} bits pack into {expected} bytes, got {packed.numel()}"
        )
    flat = packed.detach().reshape(-1)
    if per_byte == 1:
        return flat.clone()
    fields = (flat.reshape(-1, 1) >> _shifts(bits, flat.device)) & ((1 << bits) - 1)
    return fields.reshape(-1)[:numel].clone()


# ---------------------------------------------------------------------------------------
# Exported weights and models
# ---------------------------------------------------------------------------------------


def _levels_json(levels: LevelSet | None) -> dict[str, object] | None:
    if levels is None:
        return None
    return {"name": levels.name, "low": levels.low, "high": levels.high}


def _levels_from_json(value: object, what: str) -> LevelSet:
    if not isinstance(value, dict) or set(value) != {"name", "low", "high"}:
        raise ValueError(f"{what}: expected {{name, low, high}}, got {value!r}")
    name, low, high = value["name"], value["low"], value["high"]
    if not isinstance(name, str) or not _is_int(low) or not _is_int(high) or not low < high:
        raise ValueError(f"{what}: malformed level set {value!r}")
    return LevelSet(name, low, high)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _format_bytes(count: int) -> str:
    return f"{count:,} B"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


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
                f"{where}: packed codes must be a 1-D uint8 tensor, "
                f"got {self.packed.dtype} {tuple(self.packed.shape)}"
            )
        expected_bytes = -(-self.numel // (8 // bits))
        if self.packed.numel() != expected_bytes:
            raise ValueError(
                f"{where}: {self.numel} codes of {bits} bits need {expected_bytes} bytes, "
                f"got {self.packed.numel()}"
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
                raise ValueError(
                    f"{where}: code out of range for {self.levels.num_levels} levels (corrupted codes)"
                )
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


@dataclass(frozen=True, eq=False, repr=False)
class ExportedModel:
    """A quantized model for storage: packed weights plus the rest of the state dict.

    Attributes:
        layers: one :class:`QuantizedWeight` per quantized layer, in module order.
        tensors: every other state-dict entry (latent weights and weight-quantizer ``α``
            entries excluded), by state-dict name, detached CPU tensors in their own dtype.

    See the module docstring for the file format of :meth:`save` / :meth:`load`.
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
        reserved |= {self._codes_name(layer) for layer in self.layers}
        reserved |= {self._alpha_name(layer) for layer in self.layers}
        clash = sorted(reserved & set(self.tensors))
        if clash:
            raise ValueError(f"tensor names clash with the quantized weights' entries: {clash}")

    @staticmethod
    def _codes_name(layer: QuantizedWeight) -> str:
        return layer.key + _CODES_SUFFIX

    @staticmethod
    def _alpha_name(layer: QuantizedWeight) -> str:
        return layer.key + _ALPHA_SUFFIX

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
        """Write a safetensors file (see the module docstring for the layout)."""
        tensors: dict[str, torch.Tensor] = {}
        layers_meta = []
        for layer in self.layers:
            codes_name, alpha_name = self._codes_name(layer), self._alpha_name(layer)
            tensors[codes_name] = layer.packed
            tensors[alpha_name] = layer.alpha
            layers_meta.append(
                {
                    "module": layer.module,
                    "aliases": list(layer.aliases),
                    "type": layer.layer_type,
                    "levels": _levels_json(layer.levels),
                    "bits": layer.bits,
                    "code_bits": layer.levels.code_bits,
                    "shape": list(layer.shape),
                    "dtype": _dtype_name(layer.dtype),
                    "codes": codes_name,
                    "alpha": alpha_name,
                    "input_levels": _levels_json(layer.input_levels),
                }
            )
        tensors.update(self.tensors)
        metadata = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "layers": json.dumps(layers_meta),
            "tensors": json.dumps(list(self.tensors)),
        }
        _write_safetensors(path, tensors, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ExportedModel:
        """Read a file written by :meth:`save`.

        Raises:
            ValueError: the file is truncated, corrupted, or not a fogzo export.
        """
        tensors, metadata = _read_safetensors(path)
        try:
            return cls._from_file_contents(tensors, metadata)
        except ValueError as error:
            raise ValueError(f"{os.fspath(path)}: {error}") from error

    @classmethod
    def _from_file_contents(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> ExportedModel:
        if metadata.get("format") != FORMAT_NAME:
            raise ValueError(f"not a fogzo export (metadata 'format' is {metadata.get('format')!r})")
        if metadata.get("format_version") != FORMAT_VERSION:
            hint = " (written by a development version of fogzo before 0.1; export the model again)"
            raise ValueError(
                f"unsupported format_version {metadata.get('format_version')!r}, expected {FORMAT_VERSION!r}"
                + (hint if metadata.get("format_version") == "1" else "")
            )
        try:
            layers_meta = json.loads(metadata["layers"])
            names = json.loads(metadata["tensors"])
        except (KeyError, json.JSONDecodeError) as error:
            raise ValueError(f"missing or malformed 'layers'/'tensors' metadata: {error}") from error
        if not isinstance(layers_meta, list) or not isinstance(names, list):
            raise ValueError("metadata 'layers' and 'tensors' must be JSON lists")
        # The checksum first: a flipped bit must read as corruption, not as a malformed code.
        order = [entry.get(role) for entry in layers_meta if isinstance(entry, dict) for role in ("codes", "alpha")]
        order += names
        if "sha256" not in metadata:
            raise ValueError("metadata has no 'sha256' checksum")
        if all(isinstance(name, str) and name in tensors for name in order) and len(set(order)) == len(tensors):
            if _content_digest([tensors[name] for name in order]) != metadata["sha256"]:
                raise ValueError("data checksum (sha256) mismatch: the tensor data is corrupted")
        used: set[str] = set()
        layers = []
        for entry in layers_meta:
            layers.append(_layer_from_json(entry, tensors))
            used.update((entry["codes"], entry["alpha"]))
        if not all(isinstance(name, str) for name in names) or len(set(names)) != len(names):
            raise ValueError("metadata 'tensors' must list distinct names")
        if used & set(names) or used | set(names) != set(tensors):
            raise ValueError(
                "the file's tensors do not match its metadata: "
                f"unlisted {sorted(set(tensors) - used - set(names))}, "
                f"missing {sorted((used | set(names)) - set(tensors))}"
            )
        return cls(tuple(layers), {name: tensors[name] for name in names})

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


def _layer_from_json(entry: object, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
    if not isinstance(entry, dict) or set(entry) != _LAYER_FIELDS:
        raise ValueError(f"malformed layer entry in metadata: {entry!r}")
    module = entry["module"]
    for field in ("module", "type", "dtype", "codes", "alpha"):
        if not isinstance(entry[field], str):
            raise ValueError(f"layer entry {module!r}: {field!r} must be a string, got {entry[field]!r}")
    levels = _levels_from_json(entry["levels"], f"layer {module!r}")
    input_levels = None
    if entry["input_levels"] is not None:
        input_levels = _levels_from_json(entry["input_levels"], f"layer {module!r} input")
    if entry["bits"] != container_bits(levels) or entry["code_bits"] != levels.code_bits:
        raise ValueError(
            f"layer {module!r}: bits {entry['bits']}/{entry['code_bits']} do not match levels {levels}"
        )
    shape, aliases = entry["shape"], entry["aliases"]
    if not isinstance(shape, list) or not all(_is_int(size) for size in shape):
        raise ValueError(f"layer {module!r}: malformed shape {shape!r}")
    if not isinstance(aliases, list) or not all(isinstance(name, str) for name in aliases):
        raise ValueError(f"layer {module!r}: malformed aliases {aliases!r}")
    if entry["dtype"] not in _DTYPES:
        raise ValueError(f"layer {module!r}: unknown dtype {entry['dtype']!r}")
    for role in ("codes", "alpha"):
        if entry[role] not in tensors:
            raise ValueError(f"layer {module!r}: tensor {entry[role]!r} missing from the file")
    return QuantizedWeight(
        module=module,
        layer_type=entry["type"],
        levels=levels,
        shape=tuple(shape),
        dtype=_DTYPES[entry["dtype"]],
        packed=tensors[entry["codes"]],
        alpha=tensors[entry["alpha"]],
        input_levels=input_levels,
        aliases=tuple(aliases),
    )


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


# ---------------------------------------------------------------------------------------
# export / rebuild
# ---------------------------------------------------------------------------------------


def export(model: nn.Module) -> ExportedModel:
    """Export a model prepared with :func:`fogzo.quantize` (see the module docstring).

    The codes are those of the current step sizes (learned ``α`` included), whatever the
    model's train/eval mode or a surrounding :func:`fogzo.full_precision` block.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: the model has no quantized layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export() expects an nn.Module, got {type(model).__name__}")
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, QuantizedLayer):
            names.setdefault(id(module), []).append(name)
    found = list(quantized_layers(model))
    if not found:
        raise ValueError(
            "export() found no quantized layer in this model; prepare it with "
            "fogzo.quantize(model, fogzo.QuantConfig(...)) before exporting "
            "(layers skipped by quantize() are stored as ordinary float tensors)"
        )
    state = model.state_dict()
    dropped: set[str] = set()
    layers = []
    for name, layer in found:
        if type(layer) not in _PLAIN_CLASSES:
            raise ValueError(f"{name!r}: cannot export quantized layer type {type(layer).__name__}")
        quantizer = layer.weight_quantizer
        weight = layer.weight.detach()
        codes = quantizer.codes(weight)
        aliases = tuple(alias for alias in names[id(layer)] if alias != name)
        for prefix in (name, *aliases):
            prefix = f"{prefix}." if prefix else ""
            dropped.add(prefix + "weight")
            dropped.update(f"{prefix}weight_quantizer.{key}" for key in quantizer.state_dict())
        input_quantizer = layer.input_quantizer
        layers.append(
            QuantizedWeight(
                module=name,
                layer_type=_PLAIN_CLASSES[type(layer)].__name__,
                levels=quantizer.levels,
                shape=tuple(weight.shape),
                dtype=weight.dtype,
                packed=pack_codes(codes, container_bits(quantizer.levels)).cpu(),
                alpha=quantizer.coordinate_scale().to(device="cpu", dtype=torch.float32).clone(),
                input_levels=None if input_quantizer is None else input_quantizer.levels,
                aliases=aliases,
            )
        )
    tensors = {key: value.detach().cpu().clone() for key, value in state.items() if key not in dropped}
    return ExportedModel(tuple(layers), tensors)


def _to_plain(module: QuantizedLayer) -> nn.Module:
    """Undo :func:`fogzo.quantize`'s re-classing in place: back to the plain torch layer."""
    module.__class__ = _PLAIN_CLASSES[type(module)]
    for attribute in ("weight_quantizer", "input_quantizer", "quantization_enabled"):
        try:
            delattr(module, attribute)
        except AttributeError:
            pass
    return module


def rebuild_float_model(model_like: nn.Module, exported: ExportedModel) -> nn.Module:
    """A plain float model equivalent to the fake-quantized model that was exported.

    ``model_like`` (a quantized model of the same architecture, or its unquantized
    original) is deep-copied and left untouched; in the copy every quantized layer becomes
    its plain torch class again (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``,
    ``nn.Embedding``, same hyper-parameters, quantizers removed), and
    :meth:`ExportedModel.dequantized_state_dict` is loaded strictly.

    Raises:
        ValueError: a layer quantizes its input (activation quantization has no plain
            float equivalent); the architecture of ``model_like`` does not match the
            export; or a weight shared by two layers was quantized differently by them.
    """
    if not isinstance(exported, ExportedModel):
        raise TypeError(f"rebuild_float_model() expects an ExportedModel, got {type(exported).__name__}")
    quantized_inputs = [layer.module for layer in exported.layers if layer.input_levels is not None]
    quantized_inputs += [
        name
        for name, layer in quantized_layers(model_like)
        if getattr(layer, "input_quantizer", None) is not None
    ]
    if quantized_inputs:
        raise ValueError(
            f"layers {sorted(set(quantized_inputs))} quantize their inputs (activation_bits); activation "
            "quantization is not representable in a plain float model, so no equivalent float model exists"
        )
    model = copy.deepcopy(model_like)
    for module in list(model.modules()):
        if isinstance(module, QuantizedLayer):
            if type(module) not in _PLAIN_CLASSES:
                raise ValueError(
                    f"cannot convert quantized layer type {type(module).__name__} to a plain layer"
                )
            _to_plain(module)
    weights: dict[int, tuple[str, torch.Tensor]] = {}
    for layer in exported.layers:
        expected = _PLAIN_BY_NAME[layer.layer_type]
        dequantized = layer.dequantize()
        for name in (layer.module, *layer.aliases):
            try:
                module = model.get_submodule(name)
            except AttributeError as error:
                raise ValueError(
                    f"model_like has no module {name!r} for the exported {layer.layer_type}"
                ) from error
            if type(module) is not expected or tuple(module.weight.shape) != layer.shape:
                raise ValueError(
                    f"module {name!r} is {type(module).__name__} with weight {tuple(module.weight.shape)}, "
                    f"but the export holds a {layer.layer_type} weight {layer.shape}"
                )
            seen = weights.setdefault(id(module.weight), (name, dequantized))
            if seen[0] != name and not torch.equal(seen[1], dequantized):
                raise ValueError(
                    f"modules {seen[0]!r} and {name!r} share one weight but quantized it differently "
                    "(different step sizes); a plain float model cannot hold both, untie the weights"
                )
    try:
        model.load_state_dict(exported.dequantized_state_dict(), strict=True)
    except RuntimeError as error:
        raise ValueError(f"model_like does not match the exported model: {error}") from error
    return model


# ---------------------------------------------------------------------------------------
# safetensors files (the safetensors package) and the content checksum
# ---------------------------------------------------------------------------------------

# safetensors' reasons for refusing a file, in words that say what happened to it.
_SAFETENSORS_REASONS = (
    ("header too small", "the file is too short for a safetensors header (truncated or empty)"),
    ("invalid header length", "the header length exceeds the bytes that follow it (truncated file)"),
    ("header too large", "the header length exceeds safetensors' limit (corrupted or not a safetensors file)"),
    ("invalid json", "the header is not valid UTF-8 JSON (corrupted or not a safetensors file)"),
    ("invalid utf-8", "the header is not valid UTF-8 JSON (corrupted or not a safetensors file)"),
    ("file not fully covered", "the data does not match the header (truncated file or trailing bytes)"),
    ("invalid shape, data type, or offset", "tensor data_offsets do not match their dtype and shape (corrupted header)"),
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
    return memoryview(raw.numpy())


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
