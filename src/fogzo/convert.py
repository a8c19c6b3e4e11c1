"""Model conversion: ``quantize(model, config)`` swaps layers in place; ``full_precision``;
``quantization_report``."""

from __future__ import annotations

import contextlib
import fnmatch
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from .layers import QuantConv1d, QuantConv2d, QuantEmbedding, QuantizedLayer, QuantLinear, QuantMultiheadAttention
from .quantizers import ALPHA_INITS, ActivationQuantizer, WeightQuantizer, level_set
from .smoothing import NOISE_LAWS, STE_KINDS, Smoothing, smoothing_for

__all__ = [
    "QuantConfig",
    "QuantizationReport",
    "ReportEntry",
    "full_precision",
    "quantization_report",
    "quantize",
    "quantized_layers",
]

_SWAPS: dict[type[nn.Module], type[QuantizedLayer]] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Embedding: QuantEmbedding,
}
#: ``nn.MultiheadAttention``'s input projections when query, key and value differ in size.
_SEPARATE_PROJECTIONS = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
_Quantized = TypeVar("_Quantized", bound=nn.Module)


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model's weights (and optionally the inputs of its layers).

    Args:
        bits: 1 (sign), ``"ternary"``, or 2..8 (uniform levels −2^(b−1) … 2^(b−1)−1).
        ste: the STE kind, which fixes the smoothing (noise law and ``ε̄``):
            ``"identity"``, ``"hardtanh"``, ``"tanh"`` or ``"approxsign"``.
        noise: override the STE's noise law (``"uniform"``, ``"logistic"``,
            ``"triangular"``, ``"gaussian"``); ``None`` keeps the STE's own.
        eps_bar: override the STE's ``ε̄`` (in units of ``α``).
        step_size: ``"fixed"`` (α set once from the weights) or ``"lsq"`` (learned).
        alpha_init: ``"lsq"`` (default), ``"mse"`` or ``"max"`` (see
            :func:`initial_step_size`). ``"mse"`` fits the weights best but clips the
            largest ones, whose identity-STE gradient is then exactly zero; on the MNIST MLP
            that costs STE a lot (final loss 0.86 vs 0.38 with ``"lsq"``, docs/results.md).
        per_channel: one ``α`` per output channel (dim 0) instead of per tensor.
        activation_bits: if set, also LSQ-quantize each layer's input to these bits.
    """

    bits: int | str = 2
    ste: str = "identity"
    noise: str | None = None
    eps_bar: float | None = None
    step_size: str = "fixed"
    alpha_init: str = "lsq"
    per_channel: bool = False
    activation_bits: int | str | None = None

    def __post_init__(self) -> None:
        level_set(self.bits)  # raises ValueError for unsupported bits
        if self.ste not in STE_KINDS:
            raise ValueError(f"unknown ste={self.ste!r}; choose one of {sorted(STE_KINDS)}")
        if self.noise is not None and self.noise not in NOISE_LAWS:
            raise ValueError(f"unknown noise={self.noise!r}; choose one of {sorted(NOISE_LAWS)}")
        if self.eps_bar is not None and not self.eps_bar > 0:
            raise ValueError(f"eps_bar must be > 0, got {self.eps_bar!r}")
        if self.step_size not in ("fixed", "lsq"):
            raise ValueError(f"step_size must be 'fixed' or 'lsq', got {self.step_size!r}")
        if self.alpha_init not in ALPHA_INITS:
            raise ValueError(f"unknown alpha_init={self.alpha_init!r}; choose one of {ALPHA_INITS}")
        if self.activation_bits is not None:
            level_set(self.activation_bits)

    @property
    def smoothing(self) -> Smoothing:
        return smoothing_for(self.ste, self.noise, self.eps_bar)


def quantize(
    model: nn.Module,
    config: QuantConfig | None = None,
    *,
    skip: Sequence[str] = (),
    skip_first_last: bool = False,
) -> nn.Module:
    """Swap every ``nn.Linear``/``Conv1d``/``Conv2d``/``Embedding``/``MultiheadAttention``
    for its quantized twin.

    Works in place and returns ``model``. The original weights become the latent weights
    (same ``Parameter`` objects, so an optimizer built before or after sees the same
    tensors). ``skip`` is a list of ``fnmatch`` patterns on module names (``["head"]``,
    ``["blocks.*.attn"]``); a pattern that matches no quantizable layer warns.
    ``skip_first_last`` leaves the first and the last quantizable layer (in registration
    order) in full precision. An ``nn.MultiheadAttention`` is one layer: its input
    projection and its ``out_proj`` are quantized (or skipped) together.

    Exact types only: a subclass of ``nn.Linear`` etc. stays float (with a warning, as does
    any other ``torch.nn`` layer with a weight matrix, e.g. ``nn.Conv3d``); normalization
    layers and biases stay float by design. :func:`quantization_report` lists what was
    converted and what was not.

    torch's fused inference path of ``nn.TransformerEncoderLayer``
    (``torch._transformer_encoder_layer_fwd``, taken in eval mode without autograd) reads
    the latent weights directly; it is switched off for every encoder layer that contains a
    quantized layer (and the nested-tensor path of its ``nn.TransformerEncoder``), so such a
    model computes with quantized weights in eval mode too.

    Quantizing is done once: a model that already holds quantized layers outside ``skip``
    raises ``ValueError`` (the first configuration would silently stay). To quantize parts
    of a model differently, call ``quantize`` on each part, or skip the quantized parts.

    Example::

        model = fogzo.quantize(model, fogzo.QuantConfig(bits=2), skip=["head"])
        print(fogzo.quantization_report(model))
    """
    if isinstance(skip, str):
        raise TypeError(f"skip must be a list of fnmatch patterns, not the string {skip!r}: write skip=[{skip!r}]")
    skip = list(skip)
    bad = [pattern for pattern in skip if not isinstance(pattern, str)]
    if bad:
        raise TypeError(f"skip patterns must be strings, got {bad!r}")
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a fogzo.QuantConfig, got {type(config).__name__}")

    def skipped_by_pattern(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)

    quantized_before = [(n, m) for n, m in quantized_layers(model) if not _inside_quantized_attention(n, model)]
    candidates = [(n, m) for n, m in model.named_modules() if _quantizable(m) and n]  # n: the root cannot be swapped
    if not candidates and not quantized_before and _quantizable(model):
        raise ValueError("quantize() swaps submodules in place; wrap a bare layer in nn.Sequential")
    kept = [name for name, _ in quantized_before if not skipped_by_pattern(name)]
    if kept:
        described = ", ".join(f"{name!r} ({_describe(layer)})" for name, layer in quantized_before[:3] if name in kept)
        raise ValueError(
            f"{len(kept)} layer(s) already quantized, e.g. {described}; quantize() does not re-configure "
            "a quantized layer. Start from the float model, or pass skip= patterns that cover the quantized "
            "layers to quantize only the others"
        )
    quantizable_names = [name for name, _ in candidates] + [name for name, _ in quantized_before]
    for pattern in skip:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in quantizable_names):
            examples = ", ".join(repr(name) for name in quantizable_names[:5]) or "none"
            warnings.warn(
                f"skip pattern {pattern!r} matches no quantizable layer of this model (names: {examples}"
                f"{', ...' if len(quantizable_names) > 5 else ''}); it has no effect",
                stacklevel=2,
            )
    skipped = {name for name, _ in candidates if skipped_by_pattern(name)}
    if skip_first_last and candidates:
        skipped |= {candidates[0][0], candidates[-1][0]}
    levels = level_set(config.bits)
    smoothing = config.smoothing
    attention_inputs = []

    def weight_quantizer(weight: torch.Tensor, name: str) -> WeightQuantizer:
        return WeightQuantizer(
            weight,
            levels,
            smoothing,
            learned=config.step_size == "lsq",
            per_channel=config.per_channel,
            alpha_init=config.alpha_init,
            name=name,
        ).to(weight.device)

    for name, module in candidates:
        if name in skipped:
            continue
        if isinstance(module, nn.MultiheadAttention):
            projections = ("in_proj_weight",) if module._qkv_same_embed_dim else _SEPARATE_PROJECTIONS
            quantizers = {p: weight_quantizer(module.get_parameter(p), f"{name}.{p}") for p in projections}
            out_proj = _swap_class(module.out_proj, QuantLinear)
            out_proj._attach(weight_quantizer(out_proj.weight, f"{name}.out_proj"), None)
            _swap_class(module, QuantMultiheadAttention)._attach_projections(quantizers)
            if config.activation_bits is not None:
                attention_inputs.append(name)
            continue
        if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
            raise ValueError(f"{name}: Embedding with max_norm or sparse=True is not supported")
        quantized = _swap_class(module, _SWAPS[type(module)])
        input_quantizer = None
        if config.activation_bits is not None and not isinstance(module, nn.Embedding):
            input_quantizer = ActivationQuantizer(level_set(config.activation_bits), smoothing).to(module.weight.device)
        quantized._attach(weight_quantizer(module.weight, name), input_quantizer)
    if attention_inputs:
        warnings.warn(
            f"activation_bits: the inputs of nn.MultiheadAttention layers {attention_inputs[:3]} stay float "
            "(their weights are quantized)",
            stacklevel=2,
        )
    _disable_fused_transformer_paths(model)
    skipped_prefixes = tuple(f"{name}." for name in skipped)
    floats = [(n, m, reason) for n, m, reason in _float_weight_layers(model) if not skipped_by_pattern(n)]
    left = [(n, m, reason) for n, m, reason in floats if not n.startswith(skipped_prefixes)]  # nor inside a skipped one
    if left:
        listed = ", ".join(f"{n or '(root)'!r} ({type(m).__name__}: {reason})" for n, m, reason in left[:4])
        warnings.warn(
            f"quantize() left {len(left)} layer(s) with weight matrices in float: {listed}"
            f"{', ...' if len(left) > 4 else ''}. See fogzo.quantization_report(model)",
            stacklevel=2,
        )
    return model


def _quantizable(module: nn.Module) -> bool:
    return type(module) in _SWAPS or type(module) is nn.MultiheadAttention


def _inside_quantized_attention(name: str, model: nn.Module) -> bool:
    """True for the ``out_proj`` of a :class:`QuantMultiheadAttention` (part of that layer)."""
    parent, _, leaf = name.rpartition(".")
    if leaf != "out_proj":
        return False
    try:
        return isinstance(model.get_submodule(parent), QuantMultiheadAttention)
    except AttributeError:
        return False


def _describe(layer: QuantizedLayer) -> str:
    """``int2, fixed per-tensor α`` for a quantized layer's first quantizer."""
    quantizer = layer.quantized_weights()[0][1]
    kind = "learned" if quantizer.learned else "fixed"
    grain = "per-channel" if quantizer.per_channel else "per-tensor"
    return f"{quantizer.levels.name}, {kind} {grain} α, {quantizer.smoothing.noise} ε̄={quantizer.smoothing.eps_bar:.4g}"


def _disable_fused_transformer_paths(model: nn.Module) -> None:
    """Keep torch's fused Transformer kernels from reading latent (float) weights.

    ``nn.TransformerEncoderLayer.forward`` hands ``linear1.weight``, ``self_attn.in_proj_weight``
    … straight to ``torch._transformer_encoder_layer_fwd`` in eval mode without autograd; it
    takes that path only while ``activation_relu_or_gelu`` is set (torch sets it to 0 itself
    for other activations, and the regular path does not read it). ``nn.TransformerEncoder``
    turns a padded batch into a nested tensor only for that fused path (``use_nested_tensor``).
    """
    for module in model.modules():
        if not any(isinstance(m, QuantizedLayer) for m in module.modules()):
            continue
        if isinstance(module, nn.TransformerEncoderLayer):
            module.activation_relu_or_gelu = 0
        elif isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False


_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)
_NORMS += (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()  # torch >= 2.4


def _float_reason(name: str, module: nn.Module) -> str:
    """Why a module that holds parameters is not quantized."""
    if isinstance(module, parametrize.ParametrizationList):
        return f"holds the parametrized weight of layer {name.rsplit('.parametrizations.', 1)[0]!r} (see that layer)"
    if parametrize.is_parametrized(module):
        return (
            "weight parametrized (torch.nn.utils.parametrize, e.g. weight_norm): quantize() converts plain weights only"
        )
    if isinstance(module, _NORMS):
        return "normalization layer: float by design"
    if _quantizable(module):
        return "quantizable type left in float (skip=, skip_first_last, or not quantized)"
    if type(module).__name__ == "NonDynamicallyQuantizableLinear" and name.rpartition(".")[2] == "out_proj":
        return "output projection of a float nn.MultiheadAttention (quantized together with it)"
    for base in (*_SWAPS, nn.MultiheadAttention):
        if isinstance(module, base):
            return f"subclass of nn.{base.__name__}: quantize() converts exact torch types only"
    return "type not supported by quantize()"


def _float_weight_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """``(name, module, reason)`` for the torch layers with a weight matrix that quantize()
    cannot convert (other ``torch.nn`` types, subclasses of the supported types).

    A layer whose weight is parametrized (``weight_norm``) is listed, not its parametrization.
    Not listed: user modules with bare parameters (a position embedding, a class token), the
    ``out_proj`` of an attention layer (it goes with its ``nn.MultiheadAttention``).
    """
    for name, module in model.named_modules():
        skipped = (QuantizedLayer, WeightQuantizer, ActivationQuantizer, parametrize.ParametrizationList, *_NORMS)
        if isinstance(module, skipped) or _quantizable(module):  # a parametrization: its layer is listed
            continue
        tensors = [*module._parameters.values(), *(getattr(module, t) for t in getattr(module, "parametrizations", ()))]
        if not any(p is not None and p.dim() >= 2 for p in tensors):
            continue
        parent, _, leaf = name.rpartition(".")
        if leaf == "out_proj" and name and isinstance(model.get_submodule(parent), nn.MultiheadAttention):
            continue
        if isinstance(module, (*_SWAPS, nn.MultiheadAttention)) or type(module).__module__.startswith("torch.nn"):
            yield name, module, _float_reason(name, module)


@dataclass(frozen=True)
class ReportEntry:
    """One module in a :class:`QuantizationReport`."""

    module: str
    type: str
    parameters: tuple[str, ...]
    detail: str


@dataclass(frozen=True)
class QuantizationReport:
    """What :func:`quantize` converted (``quantized``) and which modules holding parameters
    stayed float (``float_modules``, with the reason). ``print(report)`` shows a table."""

    quantized: tuple[ReportEntry, ...]
    float_modules: tuple[ReportEntry, ...]

    def __str__(self) -> str:
        rows = [f"quantized: {len(self.quantized)} layers"]
        rows += [f"  {e.module or '(root)'}  [{e.type}]  {e.detail}" for e in self.quantized]
        rows.append(f"float: {len(self.float_modules)} modules with parameters")
        for e in self.float_modules:
            rows.append(f"  {e.module or '(root)'}  [{e.type}]  {', '.join(e.parameters)}: {e.detail}")
        rows.append("biases of quantized layers stay float")
        return "\n".join(rows)


def quantization_report(model: nn.Module) -> QuantizationReport:
    """What :func:`quantize` did to ``model``: converted layers and float modules, with reasons.

    Example::

        fogzo.quantize(model, fogzo.QuantConfig(bits=2))
        print(fogzo.quantization_report(model))
    """
    quantized, float_modules = [], []
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLayer):
            if not _inside_quantized_attention(name, model):  # (an out_proj is listed with its attention layer)
                quantized.append(_quantized_entry(name, module))
        elif not isinstance(module, (WeightQuantizer, ActivationQuantizer)):
            parameters = tuple(p for p, value in module._parameters.items() if value is not None)
            if parameters:
                float_modules.append(ReportEntry(name, type(module).__name__, parameters, _float_reason(name, module)))
    return QuantizationReport(tuple(quantized), tuple(float_modules))


def _quantized_entry(name: str, layer: QuantizedLayer) -> ReportEntry:
    """A quantized layer's :class:`ReportEntry`: its quantized weights, their shapes, and how."""
    weights = tuple(p for p, _ in layer.quantized_weights())
    parametrized = tuple(p for p in weights if parametrize.is_parametrized(layer, p))
    if parametrized:  # the estimators refuse such a layer (fogzo.adapters.quantizer_views)
        detail = f"{', '.join(parametrized)} parametrized (torch.nn.utils.parametrize) after quantize(): not supported"
        return ReportEntry(name, type(layer).__name__, parametrized, detail + ", no parameter to perturb")
    parts = [f"{p} {tuple(layer.get_parameter(p).shape)}" for p in weights]
    if isinstance(layer, QuantMultiheadAttention) and isinstance(layer.out_proj, QuantizedLayer):
        parts.append(f"out_proj.weight {tuple(layer.out_proj.weight.shape)}")
    detail = f"{', '.join(parts)} -> {_describe(layer)}"
    if layer.input_quantizer is not None:
        detail += f"; input -> {layer.input_quantizer.levels.name}"
    return ReportEntry(name, type(layer).__name__, weights, detail)


def _swap_class(module: nn.Module, cls: type[_Quantized]) -> _Quantized:
    """Re-class ``module`` in place as ``cls``, keeping its parameters, buffers and hooks."""
    module.__class__ = cls
    return cast(_Quantized, module)  # the same object, now a ``cls``: mypy cannot follow a class swap


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, QuantizedLayer]]:
    """``(name, layer)`` for every quantized layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLayer):
            yield name, module


@contextlib.contextmanager
def full_precision(model: nn.Module) -> Iterator[nn.Module]:
    """Run the model with its latent (float) weights and unquantized inputs inside the block."""
    layers = [layer for _, layer in quantized_layers(model)]
    previous = [layer.quantization_enabled for layer in layers]
    for layer in layers:
        layer.quantization_enabled = False
    try:
        yield model
    finally:
        for layer, state in zip(layers, previous):
            layer.quantization_enabled = state
