"""FSDP2 / ``DTensor`` pieces of the perturbation: a rank's shard of a parameter, and FSDP's
module state that perturbed passes must leave as they found it.

Under FSDP (parameters are ``DTensor`` s sharded on dim 0 over a 1-D mesh) every tensor an
estimator builds for a perturbed parameter is the rank's *local* part (see
:class:`~fogzo.estimators.perturbed_set.PerturbedTensor` and
:meth:`~fogzo.estimators.perturbed_set.PerturbedSet.shifted`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["local_part", "shifted_shards"]


def _is_dtensor(tensor: object) -> bool:
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "to_local")


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own shard of a ``DTensor`` (a view: writes reach the DTensor), else ``tensor``."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _shard_rows(param: torch.Tensor) -> tuple[int, int]:
    """``(first row, rows)`` of this rank's shard of a dim-0-sharded ``DTensor``."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tuple(param.placements)  # type: ignore[attr-defined]
    if param.device_mesh.ndim != 1 or placements != (Shard(0),):  # type: ignore[attr-defined]
        raise ValueError(
            f"sharded parameters must be DTensors sharded on dim 0 over a 1-D mesh (FSDP2's default); "
            f"got placements {placements}"
        )
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, placements)  # type: ignore[attr-defined]
    return int(offset[0]), int(shape[0])


def _fsdp_forward_records(modules: list[nn.Module]) -> list[tuple[list, int]]:
    """FSDP2's forward-order logs (private attributes; skipped where a version lacks them)."""
    logs: dict[int, list] = {}
    for module in modules:
        get_state = getattr(module, "_get_fsdp_state", None)
        state = get_state() if callable(get_state) else None
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            group = getattr(state, "_fsdp_param_group", None)
            groups = [] if group is None else [group]
        for group in groups:
            for log in (getattr(group, "_post_forward_indices", None),
                        getattr(getattr(group, "comm_ctx", None), "post_forward_order", None)):
                if isinstance(log, list):
                    logs[id(log)] = log
    return [(log, len(log)) for log in logs.values()]


def _is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def shifted_shards(
    fsdp_modules: list[nn.Module], tensors: Iterable[Any], shift: Callable[[Any], tuple[torch.Tensor, float]]
) -> Iterator[None]:
    """FSDP's :meth:`~fogzo.estimators.perturbed_set.PerturbedSet.shifted`: inside the block the
    model computes with ``W + a·t`` for ``(t, a) = shift(entry)`` of each perturbed tensor.

    ``t`` is the rank's local part; it is added to the local shard in place (after a copy of
    the shard is kept) and the FSDP modules are resharded, so the forward all-gathers the
    shifted shards; on exit each shard is copied back bit for bit and resharded again.
    """
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    records = _fsdp_forward_records(fsdp_modules)
    try:
        with torch.no_grad():
            _reshard(fsdp_modules)
            for entry in tensors:
                local = entry.local_param()
                saved.append((local, local.clone()))
                tensor, alpha = shift(entry)
                local.add_(tensor, alpha=alpha)
        yield
    finally:
        with torch.no_grad():
            for local, original in saved:
                local.copy_(original)
            _reshard(fsdp_modules)
        # FSDP2 records the order of forwards to pick what to prefetch in the next
        # backward; the perturbed forwards have no backward, so forget them (otherwise
        # the next backward prefetches a module it does not need: one wasted all-gather).
        for log, length in records:
            del log[length:]


def _reshard(modules: list[nn.Module]) -> None:
    for module in modules:
        module.reshard()  # type: ignore[operator]
