"""Fully connected classifier.

``MLP(sizes=(d_0, d_1, ..., d_L))`` computes, for an input ``x`` flattened to
``[B, d_0]``,

    h_0 = flatten(x)
    h_l = act(W_l h_{l-1} + b_l)        for l = 1 .. L-1
    y   = W_L h_{L-1} + b_L             (logits, no activation)

with ``W_l`` of shape ``[d_l, d_{l-1}]``. The paper's MNIST model is
``MLP((784, 10, 10))``: 784*10 + 10 + 10*10 + 10 = 7,960 parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["MLP", "ACTIVATIONS"]

#: Activation names accepted by :class:`MLP`.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}


class MLP(nn.Module):
    """Multi-layer perceptron on flattened inputs.

    Args:
        sizes: ``(in_features, hidden_1, ..., num_classes)``; at least two
            entries. ``len(sizes) - 1`` ``nn.Linear`` layers are built and
            stored as ``layers.0``, ``layers.1``, ...
        activation: name of the activation between layers (see
            :data:`ACTIVATIONS`); none is applied after the last layer.
        bias: whether the linear layers have a bias.

    Shapes:
        input ``[B, *]`` with ``prod(*) == sizes[0]`` (e.g. ``[B, 1, 28, 28]``),
        output ``[B, sizes[-1]]``.
    """

    def __init__(
        self,
        sizes: Sequence[int] = (784, 10, 10),
        activation: str = "relu",
        bias: bool = True,
    ) -> None:
        super().__init__()
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least (in_features, out_features), got {sizes}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        self.sizes = sizes
        self.layers = nn.ModuleList(nn.Linear(d_in, d_out, bias=bias) for d_in, d_out in zip(sizes[:-1], sizes[1:]))
        self.activation = ACTIVATIONS[activation]()

    @property
    def boundary_layers(self) -> tuple[str, str]:
        """Names of the first and last layers (often kept at full precision)."""
        return "layers.0", f"layers.{len(self.layers) - 1}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, *] -> [B, sizes[-1]]`` logits."""
        h = x.flatten(1)
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            h = layer(h)
            if index < last:
                h = self.activation(h)
        return h
