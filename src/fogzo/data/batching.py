"""Shuffled mini-batches over in-memory tensors; :func:`host_to_device` for batches drawn on the CPU."""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["batches", "host_to_device"]


def batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    drop_last: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield one epoch of shuffled ``(images, labels)`` mini-batches.

    The order is ``torch.randperm(len(images), generator=generator)``: only the private
    generator is used, so the same generator state gives the same epoch, and the global
    RNG is untouched. The inputs are checked when ``batches`` is called, not when the
    first batch is requested.

    Args:
        images: tensor ``[N, ...]``.
        labels: tensor ``[N, ...]`` (same first dimension as ``images``).
        batch_size: examples per batch, at least 1.
        generator: private random generator for the shuffle.
        drop_last: drop the final batch if it has fewer than ``batch_size`` examples
            (keeps every batch the same shape).

    Returns:
        An iterator of ``(image_batch, label_batch)`` pairs on the inputs' device.
    """
    if len(images) != len(labels):
        raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if images.device != labels.device:
        raise ValueError(f"images are on {images.device} but labels on {labels.device}")
    order = torch.randperm(len(images), generator=generator, device=generator.device)
    return _iterate(images, labels, order.to(images.device), batch_size, drop_last)


def _iterate(
    images: torch.Tensor,
    labels: torch.Tensor,
    order: torch.Tensor,
    batch_size: int,
    drop_last: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    end = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, end, batch_size):
        indices = order[start : start + batch_size]
        yield images[indices], labels[indices]


def host_to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor.to(device)``; from the CPU to a CUDA device through pinned memory and without
    waiting (``non_blocking``): a copy from pageable memory makes the host wait for the GPU.
    Safe to drop the source afterwards: the pinned block is not reused before the copy ends."""
    device = torch.device(device)
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
