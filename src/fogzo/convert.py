"""Model conversion: ``quantize(model, config)`` swaps layers in place; ``full_precision``."""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from .layers import QuantConv1d, QuantConv2d, QuantEmbedding, QuantizedLayer, QuantLinear
from .quantizers import ALPHA_INITS, ActivationQuantizer, WeightQuantizer, level_set
from .smoothing import NOISE_LAWS, STE_KINDS, Smoothing, smoothing_for

__all__ = ["QuantConfig", "full_precision", "quantize", "quantized_layers"]

_SWAPS: dict[type[nn.Module], type[QuantizedLayer]] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Embedding: QuantEmbedding,
}


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
    """Swap every ``nn.Linear``/``Conv1d``/``Conv2d``/``Embedding`` for its quantized twin.

    Works in place and returns ``model``. The original weights become the latent weights
    (same ``Parameter`` objects, so an optimizer built before or after sees the same
    tensors). ``skip`` holds ``fnmatch`` patterns on module names (``"head"``,
    ``"blocks.*.attn.*"``); ``skip_first_last`` leaves the first and the last quantizable
    layer (in registration order) in full precision.

    Example::

        model = fogzo.quantize(model, fogzo.QuantConfig(bits=2), skip=["head"])
    """
    config = config or QuantConfig()
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) in _SWAPS and name  # the root itself cannot be swapped in place
    ]
    if not candidates and type(model) in _SWAPS:
        raise ValueError("quantize() swaps submodules in place; wrap a bare layer in nn.Sequential")
    skipped = {name for name, _ in candidates if any(fnmatch.fnmatchcase(name, p) for p in skip)}
    if skip_first_last and candidates:
        skipped |= {candidates[0][0], candidates[-1][0]}
    levels = level_set(config.bits)
    smoothing = config.smoothing
    for name, module in candidates:
        if name in skipped:
            continue
        if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
            raise ValueError(f"{name}: Embedding with max_norm or sparse=True is not supported")
        quantized = _swap_class(module)
        weight_quantizer = WeightQuantizer(
            module.weight,
            levels,
            smoothing,
            learned=config.step_size == "lsq",
            per_channel=config.per_channel,
            alpha_init=config.alpha_init,
            name=name,
        ).to(module.weight.device)
        input_quantizer = None
        if config.activation_bits is not None and not isinstance(module, nn.Embedding):
            input_quantizer = ActivationQuantizer(level_set(config.activation_bits), smoothing)
            input_quantizer.to(module.weight.device)
        quantized._attach(weight_quantizer, input_quantizer)
    return model


def _swap_class(module: nn.Module) -> QuantizedLayer:
    """Re-class ``module`` in place, keeping its parameters, buffers and hooks."""
    module.__class__ = _SWAPS[type(module)]
    return module  # type: ignore[return-value]


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

