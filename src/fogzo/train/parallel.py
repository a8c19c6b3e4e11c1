"""Data parallelism in the training loop: the world size of a launch, the few collectives
the loop needs (means over ranks, rank 0's buffers, a barrier, a config digest) and the
device synchronisation that makes step times honest. The process group and DDP wrapping
are :mod:`fogzo.train.distributed`'s."""

from __future__ import annotations

import json
import os
import zlib

import torch
import torch.distributed as dist
from torch import nn

from . import distributed as fd
from .config import TrainConfig

__all__ = ["launch_world_size"]


def launch_world_size() -> int:
    """The world size of this launch: the process group's, else ``WORLD_SIZE`` (torchrun), else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or "1")


def _mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Means over ranks of a few scalars: one all-reduce (float64)."""
    if not fd.is_distributed():
        return [float(v) for v in values]
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=where)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [v / dist.get_world_size() for v in tensor.cpu().tolist()]


def _broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics) before an evaluation."""
    if fd.is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def _barrier(device: torch.device) -> None:
    if fd.is_distributed():
        if dist.get_backend() == "nccl" and device.type == "cuda":
            dist.barrier(device_ids=[device.index])
        else:
            dist.barrier()


def _config_digest(config: TrainConfig) -> int:
    return zlib.crc32(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
