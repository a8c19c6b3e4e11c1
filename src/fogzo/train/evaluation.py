"""Evaluation helpers shared by the data sets of :mod:`fogzo.train.data`.

:func:`evaluating` switches a model to eval mode without gradients for a block;
:func:`classification_metrics` adds up loss and accuracy over evaluation chunks, across
ranks in the single-process order (:class:`~fogzo.train.sharding.Shard`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .sharding import Shard

__all__ = ["ForwardContext", "classification_metrics", "evaluating"]

ForwardContext = Callable[[], contextlib.AbstractContextManager]


def _classification_sums(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, forward: ForwardContext
) -> tuple[float, ...]:
    with forward():
        logits = model(x)
    logits = logits.float()
    return float(F.cross_entropy(logits, y, reduction="sum")), int((logits.argmax(1) == y).sum()), len(y)


def classification_metrics(
    model: nn.Module,
    batches: Any,
    forward: ForwardContext,
    shard: Shard | None = None,
    count: int | None = None,
) -> tuple[float, float]:
    """Mean loss and accuracy over ``batches`` (an iterable of ``(x, y)``).

    With a ``shard`` of several ranks, ``batches`` yields only this rank's chunks (chunk
    indices ``rank, rank + w, ...`` of ``count`` chunks); the per-chunk sums are gathered and
    added in chunk order, as in one process.
    """
    shard = shard or Shard()
    if count is None:
        rows = [_classification_sums(model, x, y, forward) for x, y in batches]
    else:
        mine = [index for index in range(count) if shard.owns(index)]
        values = {index: _classification_sums(model, x, y, forward) for index, (x, y) in zip(mine, batches)}
        rows = shard.gather(values, count, 3)
    total_loss, correct, total = 0.0, 0, 0
    for loss, hits, size in rows:
        total_loss += loss
        correct += int(hits)
        total += int(size)
    return total_loss / total, correct / total


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """``model.eval()`` and ``torch.no_grad()`` inside the block; the previous mode after it."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
