"""The layout of an export file: which tensors it holds under which names, and its metadata.

A file (:meth:`fogzo.export.ExportedModel.save`, :meth:`~fogzo.export.ExportedModel.load`) is a
`safetensors <https://github.com/huggingface/safetensors>`_ file, written and read by
:mod:`fogzo.export.safetensors_io`.

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
"""

from __future__ import annotations

import json

import torch

from ..quantizers import LevelSet
from .packing import container_bits
from .safetensors_io import _DTYPES, _content_digest, _dtype_name
from .weights import QuantizedWeight, _is_int

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "alpha_name", "codes_name", "decode", "encode"]

FORMAT_NAME = "fogzo.export"
FORMAT_VERSION = "2"  # 2: "sha256" covers the tensors' bytes in metadata order (1: the file's data buffer)

_CODES_SUFFIX = ".codes"
_ALPHA_SUFFIX = ".alpha"
_LAYER_FIELDS = frozenset(
    {"module", "aliases", "type", "levels", "bits", "code_bits", "shape", "dtype", "codes", "alpha"} | {"input_levels"}
)


def codes_name(layer: QuantizedWeight) -> str:
    """The file's name for the packed codes of ``layer``."""
    return layer.key + _CODES_SUFFIX


def alpha_name(layer: QuantizedWeight) -> str:
    """The file's name for the step sizes of ``layer``."""
    return layer.key + _ALPHA_SUFFIX


def encode(
    layers: tuple[QuantizedWeight, ...], others: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a file holding ``layers`` and the other tensors ``others``.

    The ``"sha256"`` entry is added by the writer (:mod:`fogzo.export.safetensors_io`).
    """
    tensors: dict[str, torch.Tensor] = {}
    layers_meta = []
    for layer in layers:
        codes_key, alpha_key = codes_name(layer), alpha_name(layer)
        tensors[codes_key] = layer.packed
        tensors[alpha_key] = layer.alpha
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
                "codes": codes_key,
                "alpha": alpha_key,
                "input_levels": _levels_json(layer.input_levels),
            }
        )
    tensors.update(others)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "layers": json.dumps(layers_meta),
        "tensors": json.dumps(list(others)),
    }
    return tensors, metadata


def decode(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> tuple[tuple[QuantizedWeight, ...], dict[str, torch.Tensor]]:
    """Inverse of :func:`encode`: the quantized weights and the other tensors of a file.

    Raises:
        ValueError: the metadata is not a fogzo export's, or does not match the tensors, or
            the checksum does not match the tensors' bytes.
    """
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
        if (
            _content_digest([tensors[name] for name in order if isinstance(name, str)]) != metadata["sha256"]
        ):  # (all are)
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
    return tuple(layers), {name: tensors[name] for name in names}


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
        raise ValueError(f"layer {module!r}: bits {entry['bits']}/{entry['code_bits']} do not match levels {levels}")
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
