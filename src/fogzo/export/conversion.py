"""From a quantized model to an export and back: :func:`export`, :func:`rebuild_float_model`.

:func:`export` turns a model prepared with :func:`fogzo.quantize` into an
:class:`~fogzo.export.ExportedModel`; :func:`rebuild_float_model` turns an export back into a
plain float model (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Embedding``) whose
outputs equal the fake-quantized model's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..convert import quantized_layers
from ..layers import QuantizedLayer
from .exported import ExportedModel
from .packing import container_bits, pack_codes
from .weights import _PLAIN_BY_NAME, _PLAIN_CLASSES, QuantizedWeight

__all__ = ["export", "rebuild_float_model"]


def export(model: nn.Module) -> ExportedModel:
    """Export a model prepared with :func:`fogzo.quantize` (see :mod:`fogzo.export`).

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


def _to_plain(module: nn.Module) -> nn.Module:
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
        name for name, layer in quantized_layers(model_like) if getattr(layer, "input_quantizer", None) is not None
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
                raise ValueError(f"cannot convert quantized layer type {type(module).__name__} to a plain layer")
            _to_plain(module)
    weights: dict[int, tuple[str, torch.Tensor]] = {}
    for layer in exported.layers:
        expected = _PLAIN_BY_NAME[layer.layer_type]
        dequantized = layer.dequantize()
        for name in (layer.module, *layer.aliases):
            try:
                module = model.get_submodule(name)
            except AttributeError as error:
                raise ValueError(f"model_like has no module {name!r} for the exported {layer.layer_type}") from error
            weight = getattr(module, "weight", None)  # (a module of another type may have none)
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
            if type(module) is not expected or shape != layer.shape:
                raise ValueError(
                    f"module {name!r} is {type(module).__name__} with weight {shape}, "
                    f"but the export holds a {layer.layer_type} weight {layer.shape}"
                )
            seen = weights.setdefault(id(weight), (name, dequantized))
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
