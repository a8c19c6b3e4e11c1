"""Helpers shared by the model zoo."""

from __future__ import annotations

from torch import nn

__all__ = ["count_parameters"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``model``.

    A Parameter shared between modules (tied embeddings) is counted once.
    Works for models built on the ``meta`` device (no storage needed).
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
