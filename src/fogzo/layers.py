"""Quantized drop-in replacements for ``nn.Linear``, ``nn.Conv1d/2d`` and ``nn.Embedding``.

Each layer keeps its original full-precision weight as the *latent* weight ``W`` (the same
``weight`` parameter name, so state dicts and optimizers see the usual names) and runs its
forward pass with ``Q(W) = α·h(W/α)`` from a :class:`~fogzo.quantizers.WeightQuantizer`.

Estimators see these layers through :class:`fogzo.adapters.FogzoAdapter`: ``weight`` (the
latent parameter), ``weight_quantizer.coordinate_scale()`` (``α``) and
``weight_quantizer.smoothing``. Perturbations for zeroth-order passes are swapped in by the
estimator around the layer's forward call; the layers themselves know nothing about them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import ActivationQuantizer, WeightQuantizer

__all__ = ["QuantConv1d", "QuantConv2d", "QuantEmbedding", "QuantLinear", "QuantizedLayer"]


class QuantizedLayer(nn.Module):
    """Mixin: a layer whose ``weight`` is fake-quantized in the forward pass."""

    weight: nn.Parameter
    weight_quantizer: WeightQuantizer
    input_quantizer: ActivationQuantizer | None
    quantization_enabled: bool

    def _attach(self, weight_quantizer: WeightQuantizer, input_quantizer: ActivationQuantizer | None) -> None:
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.quantization_enabled = True

    def quantized_weight(self) -> torch.Tensor:
        """``Q(W)``, or the latent ``W`` inside :func:`fogzo.full_precision`."""
        if not self.quantization_enabled:
            return self.weight
        return self.weight_quantizer(self.weight)

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is None or not self.quantization_enabled:
            return x
        return self.input_quantizer(x)


class QuantLinear(nn.Linear, QuantizedLayer):
    """``y = q(x) Q(W)ᵀ + b``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quantize_input(x), self.quantized_weight(), self.bias)


class QuantConv1d(nn.Conv1d, QuantizedLayer):
    """1-d convolution with a fake-quantized kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._quantize_input(x), self.quantized_weight(), self.bias)


class QuantConv2d(nn.Conv2d, QuantizedLayer):
    """2-d convolution with a fake-quantized kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._quantize_input(x), self.quantized_weight(), self.bias)


class QuantEmbedding(nn.Embedding, QuantizedLayer):
    """Embedding lookup of quantized rows.

    Only the looked-up rows are quantized (``Q`` is element-wise, and per-channel ``α`` is
    per row), so the cost scales with the batch, not with the vocabulary.
    """

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(indices, self.weight, self.padding_idx)
        if not self.quantization_enabled:
            return rows
        alpha = self.weight_quantizer.step_size()
        if alpha.dim() > 0:  # per-row step sizes: gather the ones used
            alpha = F.embedding(indices, alpha.reshape(-1, 1))
        return self.weight_quantizer(rows, alpha)
