"""Quantizer adapters: what an estimator needs of a quantized weight, whoever quantized it.

STE, n-SPSA and FOGZO need three things of each quantized weight ``W`` (docs/integrations.md):

* **which tensor** is quantized: the ``Parameter`` and the module whose forward reads it;
* its **coordinate scale** ``c`` (broadcastable to ``W``): the perturbed passes compute with
  ``W + c·ε̄·v`` and the estimate is ``G_W = G_x / c`` in the coordinates ``x = W/c``, so
  that one unit of ``x`` is one quantization step;
* the **smoothing** (noise law ``p``, scale ``ε̄``) whose derivative the quantizer's STE
  backward is, so that the zeroth-order noise and the STE estimate the same smoothed loss.

A :class:`QuantizerAdapter` reports them for the modules it recognises, as one
:class:`QuantizerView` per quantized parameter. Two adapters ship with fogzo:

* :class:`FogzoAdapter` for the layers of :func:`fogzo.quantize` (``c = α``, the smoothing
  of the configured STE);
* :class:`TorchaoAdapter` for torchao QAT models prepared with
  ``quantize_(model, QATConfig(weight_config=IntxFakeQuantizeConfig(torch.intN, ...),
  step="prepare"))``: ``FakeQuantizedLinear`` / ``FakeQuantizedEmbedding`` whose
  ``weight_fake_quantizer`` is an ``IntxFakeQuantizer``. ``c`` is torchao's own scale
  (per channel, or per group of ``group_size`` input columns broadcast over the group), and
  the smoothing is that of its identity-round STE: uniform noise, ``ε̄ = 1/(2√3)`` (the
  rounding's noise support is exactly one step wide).

:func:`quantizer_views` asks every registered adapter; :func:`register_adapter` adds one for
quantizers of your own. No adapter imports an optional package: the torchao adapter only
looks at a module when torchao is already imported (a model cannot hold torchao modules
otherwise).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn.utils import parametrize

from .layers import QuantizedLayer
from .quantizers import ActivationQuantizer, WeightQuantizer
from .smoothing import Smoothing, smoothing_for

if TYPE_CHECKING:  # never imported at run time: torchao is optional (and untyped)
    from torchao.quantization.qat import IntxFakeQuantizer

__all__ = [
    "FogzoAdapter",
    "QuantizerAdapter",
    "QuantizerView",
    "TorchaoAdapter",
    "TorchaoIntxView",
    "adapters",
    "foreign_quantized_layers",
    "quantizer_parameters",
    "quantizer_views",
    "register_adapter",
]


@runtime_checkable
class QuantizerView(Protocol):
    """One quantized weight as the estimators see it.

    ``smoothing``: the noise law and ``ε̄`` of the STE (in units of ``c``).
    ``coordinate_scale()``: ``c``, a detached positive tensor broadcastable to the weight
    (shape ``()``, per-channel ``(C, 1, …)``, or the weight's own shape), computed from
    the weight's *current* value when the quantizer derives its scale from it.
    :class:`fogzo.WeightQuantizer` is one.
    """

    smoothing: Smoothing

    def coordinate_scale(self) -> torch.Tensor: ...


@runtime_checkable
class QuantizerAdapter(Protocol):
    """Finds the quantized weights of one family of quantized modules.

    ``quantized_weights(module)``: ``{parameter name in module._parameters: view}`` for the
    weights ``module`` quantizes in its forward (empty if it is not such a module).
    ``quantizer_parameters(module)``: parameters of a quantizer module (learned step sizes,
    zero points) that are trained by back-propagation and never perturbed, also with
    ``perturb="all"``.
    """

    def quantized_weights(self, module: nn.Module) -> dict[str, QuantizerView]: ...

    def quantizer_parameters(self, module: nn.Module) -> list[nn.Parameter]: ...


class FogzoAdapter:
    """fogzo's own layers: ``c = α`` of the layer's :class:`~fogzo.WeightQuantizer`."""

    def quantized_weights(self, module: nn.Module) -> dict[str, QuantizerView]:
        if isinstance(module, QuantizedLayer):
            return dict(module.quantized_weights())  # several for QuantMultiheadAttention
        return {}

    def quantizer_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        if isinstance(module, (WeightQuantizer, ActivationQuantizer)):
            return list(module.parameters(recurse=False))
        return []


# The identity-round STE: round(x) has derivative 1, which is the slope of E[round(x + ε̄u)]
# for u uniform with half-width √3·ε̄ = 1/2 (one quantization step wide).
IDENTITY_SMOOTHING = smoothing_for("identity")


@dataclass(eq=False)
class TorchaoIntxView:
    """A weight fake-quantized by torchao's ``IntxFakeQuantizer`` (per channel or per group).

    torchao quantizes ``W`` (rows × columns) in groups of ``group_size`` consecutive columns
    of a row (``PerAxis(0)``: the whole row) with ``q = clamp(round(W/s) + z, qmin, qmax)``,
    ``Q(W) = (q − z)·s``, and back-propagates through ``round`` as the identity (the scale
    is computed under ``no_grad``). So ``c = s``: ``(rows, 1)`` per channel, ``(rows,
    columns)`` per group (each group's ``s`` repeated over its columns).

    With ``is_dynamic=True`` (torchao's default) ``s`` is recomputed from the weight in every
    forward (``max|W|/((qmax − qmin)/2)`` per group when symmetric). :meth:`coordinate_scale`
    computes it the same way, by running the fake quantizer on the current weight under
    ``no_grad``, never from the ``scale`` attribute a previous (possibly perturbed) forward
    left behind. A static (``is_dynamic=False``) or learned (``range_learning``) scale is
    read as it is.
    """

    weight: nn.Parameter
    fake_quantizer: IntxFakeQuantizer
    smoothing: Smoothing = IDENTITY_SMOOTHING

    def coordinate_scale(self) -> torch.Tensor:
        quantizer = self.fake_quantizer
        config = quantizer.config
        weight = self.weight.detach()
        if weight.dim() != 2:
            raise ValueError(f"torchao IntxFakeQuantizer weights are 2-D, got shape {tuple(weight.shape)}")
        if config.is_dynamic or quantizer.scale is None:
            enabled = quantizer.enabled
            quantizer.enabled = True  # also the scale of a temporarily disabled quantizer
            try:
                with torch.no_grad():
                    quantizer(weight)
            finally:
                quantizer.enabled = enabled
        scale = quantizer.scale.detach()
        rows, columns = weight.shape
        if scale.numel() % rows:
            raise ValueError(
                f"torchao scale of shape {tuple(scale.shape)} does not match a weight {tuple(weight.shape)}"
            )
        groups = scale.numel() // rows
        scale = scale.reshape(rows, groups)
        if groups == 1:
            return scale
        return scale.repeat_interleave(columns // groups, dim=1)


class TorchaoAdapter:
    """torchao QAT: ``FakeQuantizedLinear`` / ``FakeQuantizedEmbedding`` with an ``IntxFakeQuantizer``.

    Other weight fake quantizers (``Int4WeightFakeQuantizer``, ``Float8FakeQuantizer``, MX,
    NVFP4) are refused with a ``ValueError`` naming the module: their scales are not those
    of a uniform integer grid with an identity-round STE. Activation fake quantizers are
    left as they are (their learned scales, if any, are back-propagated, never perturbed).
    """

    def _qat(self):  # the torchao QAT module, or None when torchao was never imported
        if "torchao" not in sys.modules:
            return None
        from torchao.quantization import qat

        return qat

    def quantized_weights(self, module: nn.Module) -> dict[str, QuantizerView]:
        qat = self._qat()
        if qat is None or not isinstance(module, (qat.FakeQuantizedLinear, qat.FakeQuantizedEmbedding)):
            return {}
        quantizer = module.weight_fake_quantizer
        if quantizer is None:
            return {}
        if not isinstance(quantizer, qat.IntxFakeQuantizer):
            raise ValueError(
                f"{type(module).__name__} fake-quantizes its weight with {type(quantizer).__name__}; fogzo's "
                "torchao adapter supports IntxFakeQuantizer (QATConfig(weight_config=IntxFakeQuantizeConfig(...))) "
                "only; leave this layer out of the QAT prepare step (quantize_'s filter_fn)"
            )
        if module.weight.dim() != 2:
            raise ValueError(f"{type(module).__name__}: expected a 2-D weight, got {tuple(module.weight.shape)}")
        return {"weight": TorchaoIntxView(module.weight, quantizer)}

    def quantizer_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        qat = self._qat()
        if qat is None or not isinstance(module, qat.FakeQuantizerBase):
            return []
        return list(module.parameters(recurse=False))


_ADAPTERS: list[QuantizerAdapter] = [FogzoAdapter(), TorchaoAdapter()]


def register_adapter(adapter: QuantizerAdapter) -> QuantizerAdapter:
    """Add ``adapter`` (asked after the built-in ones) and return it; registering twice is a no-op."""
    if not isinstance(adapter, QuantizerAdapter):
        raise TypeError(
            f"an adapter needs quantized_weights(module) and quantizer_parameters(module), got {type(adapter).__name__}"
        )
    if adapter not in _ADAPTERS:
        _ADAPTERS.append(adapter)
    return adapter


def adapters() -> tuple[QuantizerAdapter, ...]:
    """The registered adapters, in the order they are asked."""
    return tuple(_ADAPTERS)


def quantizer_views(model: nn.Module) -> dict[int, tuple[nn.Parameter, QuantizerView]]:
    """``{id(param): (param, view)}`` for every quantized weight of ``model``.

    A weight two modules quantize (tied weights) keeps the view of the last module in
    ``model.modules()`` order.
    """
    found: dict[int, tuple[nn.Parameter, QuantizerView]] = {}
    for layer, module in model.named_modules():
        for adapter in _ADAPTERS:
            for name, view in adapter.quantized_weights(module).items():
                param = module._parameters.get(name)
                if param is None and parametrize.is_parametrized(module, name):
                    raise ValueError(
                        f"layer {layer!r} ({type(module).__name__}): its quantized weight {name!r} is parametrized "
                        "(torch.nn.utils.parametrize, e.g. weight_norm), so no parameter holds it and it cannot be "
                        "perturbed; remove the parametrization (parametrize.remove_parametrizations) "
                        "or quantize a model without one"
                    )
                if param is None:
                    raise ValueError(
                        f"{type(adapter).__name__}: layer {layer!r} ({type(module).__name__}) has no parameter {name!r}"
                    )
                found[id(param)] = (param, view)
    return found


def quantizer_parameters(model: nn.Module) -> Iterable[nn.Parameter]:
    """The parameters of every quantizer in ``model`` (never perturbed; see :class:`QuantizerAdapter`)."""
    for module in model.modules():
        for adapter in _ADAPTERS:
            yield from adapter.quantizer_parameters(module)


_FOREIGN_QUANTIZER = re.compile(r"^weight_(fake_)?quant(izer)?$")


def foreign_quantized_layers(model: nn.Module) -> list[str]:
    """Layers that look quantized by a library no registered adapter knows: a module with a
    ``weight`` parameter and a child module named ``weight_quant``, ``weight_quantizer``,
    ``weight_fake_quant`` or ``weight_fake_quantizer`` (Brevitas, torch.ao's QAT modules, ...)
    whose weight no adapter reports. One ``"name (Layer, quantizer: Quantizer)"`` each."""
    known = quantizer_views(model)
    found = []
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is None or id(weight) in known:
            continue
        quantizers = [
            (child_name, child) for child_name, child in module.named_children() if _FOREIGN_QUANTIZER.match(child_name)
        ]
        if quantizers:
            child_name, child = quantizers[0]
            found.append(f"{name or '(the model)'} ({type(module).__name__}, {child_name}: {type(child).__name__})")
    return found
