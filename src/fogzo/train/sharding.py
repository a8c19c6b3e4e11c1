"""This rank's part of every global batch and of the evaluation chunks (data parallelism).

Every rank runs the same batch stream with the same generator, so every rank draws the same
*global* batch; :class:`Shard` keeps this rank's equal share
(:func:`fogzo.train.distributed.shard_indices`), deals evaluation chunks round-robin and gathers
their per-chunk sums so they add up in the single-process order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import distributed as fd

__all__ = ["Shard"]


class Shard:
    """Rank ``rank`` of ``world_size``: which part of a global batch / of the eval chunks it owns."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.rank, self.world_size, self.device = rank, world_size, device

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise ValueError(
                f"batch_size={batch_size} (the global batch) is not divisible by the world size "
                f"{self.world_size}: every rank needs an equal share"
            )

    def block(self, total: int) -> slice:
        """This rank's slice of a global batch of ``total`` examples."""
        part = fd.shard_indices(total, self.rank, self.world_size)
        return slice(part.start, part.stop)

    def take(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.world_size == 1:
            return tensors
        block = self.block(tensors[0].shape[0])
        return tuple(t[block] for t in tensors)

    def owns(self, chunk: int) -> bool:
        """Evaluation chunks are dealt round-robin: chunk ``i`` belongs to rank ``i % w``."""
        return chunk % self.world_size == self.rank

    def gather(self, values: dict[int, tuple[float, ...]], count: int, width: int) -> list[tuple[float, ...]]:
        """Every chunk's values on every rank, in chunk order (exact: one rank adds, the rest add 0).

        ``values`` holds this rank's chunks. One all-reduce of ``count × width`` float64.
        """
        if self.world_size == 1:
            return [values[index] for index in range(count)]
        on_device = dist.get_backend() == "nccl"
        table = torch.zeros(count, width, dtype=torch.float64)
        for index, row in values.items():
            table[index] = torch.tensor(row, dtype=torch.float64)
        if on_device:
            table = table.to(self.device)
        dist.all_reduce(table, op=dist.ReduceOp.SUM)
        return [tuple(row) for row in table.cpu().tolist()]
