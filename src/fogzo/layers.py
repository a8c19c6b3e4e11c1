"""Quantized drop-in replacements for ``nn.Linear``, ``nn.Conv1d/2d``, ``nn.Embedding`` and
``nn.MultiheadAttention``.

Each layer keeps its original full-precision weight as the *latent* weight ``W`` (the same
parameter name, so state dicts and optimizers see the usual names) and runs its forward
pass with ``Q(W) = α·h(W/α)`` from a :class:`~fogzo.quantizers.WeightQuantizer`.

Estimators see these layers through :class:`fogzo.adapters.FogzoAdapter`:
``quantized_weights()`` (the names of the latent parameters and their quantizers), and per
quantizer ``coordinate_scale()`` (``α``) and ``smoothing``. The layers know nothing of
perturbations: a zeroth-order pass writes ``W + δ`` into the latent weight's storage and
restores it afterwards (:mod:`fogzo.estimators.engine`), so every layer computes ``Q(W + δ)``
as it computes ``Q(W)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import ActivationQuantizer, WeightQuantizer

__all__ = ["QuantConv1d", "QuantConv2d", "QuantEmbedding", "QuantLinear", "QuantMultiheadAttention", "QuantizedLayer"]


class QuantizedLayer(nn.Module):
    """Mixin: a layer whose weights are fake-quantized in the forward pass.

    Single-weight layers (Linear, Conv, Embedding) quantize ``weight`` with
    ``weight_quantizer``; :meth:`quantized_weights` lists every quantized parameter of any
    quantized layer (``nn.MultiheadAttention`` has up to three).
    """

    weight: torch.Tensor
    weight_quantizer: WeightQuantizer
    input_quantizer: ActivationQuantizer | None
    quantization_enabled: bool

    def _attach(self, weight_quantizer: WeightQuantizer, input_quantizer: ActivationQuantizer | None) -> None:
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.quantization_enabled = True

    def quantized_weights(self) -> list[tuple[str, WeightQuantizer]]:
        """``(parameter name, quantizer)`` for each weight this layer fake-quantizes itself."""
        return [("weight", self.weight_quantizer)]

    def quantized_weight(self) -> torch.Tensor:
        """``Q(W)``, or the latent ``W`` inside :func:`fogzo.full_precision`."""
        if not self.quantization_enabled:
            return self.weight
        weight = self.weight_quantizer(self.weight)
        return weight if weight.dtype == self.weight.dtype else weight.to(self.weight.dtype)

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
        dtype = rows.dtype
        if self.quantization_enabled:
            alpha = self.weight_quantizer.step_size()
            if alpha.dim() > 0:  # per-row step sizes: gather the ones used
                alpha = F.embedding(indices, alpha.reshape(-1, 1))
            rows = self.weight_quantizer(rows, alpha)
        return rows if rows.dtype == dtype else rows.to(dtype)


class QuantMultiheadAttention(nn.MultiheadAttention, QuantizedLayer):
    """``nn.MultiheadAttention`` with fake-quantized projection weights.

    The input projection — ``in_proj_weight``, or ``q_proj_weight``, ``k_proj_weight`` and
    ``v_proj_weight`` when ``kdim``/``vdim`` differ from ``embed_dim`` — is quantized by
    ``weight_quantizers[name]`` (one ``α`` per tensor, or per output row with
    ``per_channel``: the packed ``in_proj_weight`` is one ``(3E, E)`` tensor, like one
    Linear layer computing q, k and v); ``out_proj`` is a :class:`QuantLinear`. Biases
    (``in_proj_bias``, ``bias_k``, ``bias_v``, ``out_proj.bias``) stay float.

    ``nn.MultiheadAttention.forward`` reads its weights as attributes (``out_proj.weight``
    too, without calling ``out_proj``), on its slow path and on its inference fast path
    (``torch._native_multi_head_attention``). So the forward here puts ``Q(W)`` in place of
    each latent weight (in ``_parameters``) for the duration of torch's own forward and the
    latent weights back afterwards: every path computes with the quantized weights.
    """

    weight_quantizers: nn.ModuleDict

    def _attach_projections(self, quantizers: dict[str, WeightQuantizer]) -> None:
        self.weight_quantizers = nn.ModuleDict(quantizers)
        self.input_quantizer = None
        self.quantization_enabled = True

    def quantized_weights(self) -> list[tuple[str, WeightQuantizer]]:
        return [(name, quantizer) for name, quantizer in self.weight_quantizers.items()]  # type: ignore[misc]

    def quantized_weight(self) -> torch.Tensor:
        raise AttributeError("QuantMultiheadAttention has several quantized weights: use quantized_weights()")

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.quantization_enabled:
            return super().forward(*args, **kwargs)
        substitutions: list[tuple[nn.Module, str, torch.Tensor]] = [
            (self, name, quantizer(self._parameters[name])) for name, quantizer in self.quantized_weights()
        ]
        out_proj = self.out_proj
        if isinstance(out_proj, QuantizedLayer) and out_proj.quantization_enabled:
            substitutions.append((out_proj, "weight", out_proj.quantized_weight()))
        saved: list[tuple[nn.Module, str, object]] = []
        try:
            for module, name, tensor in substitutions:
                saved.append((module, name, module._parameters[name]))
                module._parameters[name] = tensor  # type: ignore[assignment]
            return super().forward(*args, **kwargs)
        finally:
            for module, name, latent in reversed(saved):
                module._parameters[name] = latent  # type: ignore[assignment]
