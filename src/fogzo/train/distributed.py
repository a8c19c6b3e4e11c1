"""Helpers for data-parallel training with ``torch.distributed`` (DDP).

The estimators need no distributed code of their own beyond one collective (see
``docs/distributed.md``): noise is drawn from private generators seeded by
``(seed, step, tensor, sample)``, so every rank draws the same ``u_i``; DDP averages the
STE gradient, so every rank sees the same ``ĝ``; and the ``n`` finite differences ``d_i``
are averaged over ranks with one ``all_reduce`` of ``n`` scalars. What is left for the
training script is process-group plumbing, which this module provides::

    import fogzo.train.distributed as fd

    device = fd.init_from_env()                 # torchrun: gloo on CPU, nccl on CUDA
    model = fogzo.quantize(make_model(), fogzo.QuantConfig(bits=2)).to(device)
    ddp = fd.wrap_ddp(model)
    estimator = fogzo.FOGZO(ddp, total_steps=T, n=1, seed=0)   # same seed on every rank
    fd.check_same_on_all_ranks(estimator.counter.seed, "estimator seed")
    for x, y in loader:                        # full global batch on every rank ...
        x, y = fd.shard_batch(x, y)             # ... each rank keeps its equal share
        optimizer.zero_grad(set_to_none=True)
        info = estimator.estimate(lambda: F.cross_entropy(ddp(x), y))
        optimizer.step()
        fd.rank_zero_print(f"loss {fd.all_reduce_mean(info.loss):.4f}")
    fd.cleanup()

Launch with ``torchrun --nproc-per-node 2 train.py``. Without torchrun (no ``WORLD_SIZE``
in the environment) every helper degrades to the single-process case.

:func:`spawn_local` starts ``world_size`` local processes on one machine with a file-based
rendezvous, a collective timeout and a wall-clock deadline; the tests and
``benchmarks/distributed.py`` use it. It forks only where forking is safe (no GPU or other
accelerator, CUDA not initialised) and uses ``forkserver`` otherwise
(:func:`safe_start_method`).
"""

from __future__ import annotations

import builtins
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DEFAULT_TIMEOUT",
    "all_reduce_mean",
    "check_same_on_all_ranks",
    "cleanup",
    "default_backend",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "local_rank",
    "rank",
    "rank_zero_print",
    "safe_start_method",
    "shard_batch",
    "shard_indices",
    "spawn_local",
    "world_size",
    "wrap_ddp",
]

DEFAULT_TIMEOUT = timedelta(minutes=5)
"""Collective timeout used by :func:`init_from_env` unless told otherwise.

A rank that dies or diverges makes the others fail after at most this long instead of
hanging (gloo honours it for every collective; for nccl we also enable async error
handling, see :func:`init_from_env`)."""


def is_distributed() -> bool:
    """True when a process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _current_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _current_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without an initialised process group)."""
    return _current_world_size()


def rank() -> int:
    """This process's global rank (0 without an initialised process group)."""
    return _current_rank()


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK`` from torchrun, else 0)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0 (and in a single-process run)."""
    return rank() == 0


def rank_zero_print(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (flushes by default so torchrun's output interleaves sanely)."""
    if is_main_process():
        kwargs.setdefault("flush", True)
        builtins.print(*args, **kwargs)


def default_backend(device: torch.device | str | None = None) -> str:
    """``"nccl"`` for CUDA devices (or when CUDA is available and no device is given), else ``"gloo"``."""
    if device is not None:
        return "nccl" if torch.device(device).type == "cuda" else "gloo"
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_from_env(
    backend: str | None = None,
    *,
    timeout: timedelta = DEFAULT_TIMEOUT,
    device: str | None = None,
) -> torch.device:
    """Join the process group described by torchrun's environment; return this rank's device.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
    (``init_method="env://"``). With ``WORLD_SIZE`` unset or 1 no group is created and the
    function only picks the device, so the same script runs with ``python`` and with
    ``torchrun``. Calling it twice is harmless.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default: nccl for CUDA, gloo for CPU.
        timeout: collective timeout. A rank that fails makes the others raise after at
            most this long rather than hang (torchrun also tears the job down as soon as
            one worker exits with an error).
        device: ``"cpu"`` or ``"cuda"``; default: the joined group's (gloo: CPU, nccl:
            CUDA) when a process group exists, else CUDA when available. On CUDA the
            device is ``cuda:LOCAL_RANK`` and is made current.
    """
    if device is None and dist.is_available() and dist.is_initialized():
        # Already joined: the device of that group's backend (not whatever is available).
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    kind = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if kind == "cuda":
        target = torch.device("cuda", local_rank())
        torch.cuda.set_device(target)
    else:
        target = torch.device("cpu")
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        return target
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={size} but {', '.join(missing)} not set: launch with `torchrun --nproc-per-node N script.py`"
        )
    chosen = backend or default_backend(target)
    if chosen == "nccl":
        # Without async error handling an NCCL collective waiting for a dead peer never
        # returns; with it, the watchdog aborts the communicator after ``timeout``.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    kwargs: dict[str, Any] = {"backend": chosen, "init_method": "env://", "timeout": timeout}
    if chosen == "nccl":
        kwargs["device_id"] = target
    dist.init_process_group(**kwargs)
    return target


def cleanup() -> None:
    """Destroy the process group if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, **kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` when distributed, else ``model`` unchanged.

    On CUDA ``device_ids`` defaults to the model's device. Pass the returned module to the
    estimator (``fogzo.FOGZO(ddp, ...)``) and call it in the closure: the estimator then
    turns off DDP's per-forward buffer broadcast during its perturbed passes.
    Keep ``gradient_as_bucket_view=False`` (the default) when gradients accumulate over
    several ``estimate`` calls: see ``docs/distributed.md``.
    """
    if not is_distributed():
        return model
    first = next(model.parameters(), None)
    if first is not None and first.device.type == "cuda":
        kwargs.setdefault("device_ids", [first.device.index])
    return nn.parallel.DistributedDataParallel(model, **kwargs)


def shard_indices(
    total: int,
    rank: int | None = None,
    world_size: int | None = None,
    *,
    drop_last: bool = False,
) -> range:
    """The contiguous block of ``range(total)`` that rank ``rank`` of ``world_size`` owns.

    Shards are equal, so the mean of the per-rank mean losses is the full-batch mean loss
    and DDP's gradient average is the full-batch gradient. ``total`` must therefore be
    divisible by ``world_size``; with ``drop_last=True`` the last ``total % world_size``
    items are dropped instead of raising.
    """
    r = _current_rank() if rank is None else rank
    w = _current_world_size() if world_size is None else world_size
    if not isinstance(total, int) or total < 0:
        raise ValueError(f"total must be an int >= 0, got {total!r}")
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"need 0 <= rank < world_size, got rank={r}, world_size={w}")
    if total % w and not drop_last:
        raise ValueError(
            f"{total} items do not split into {w} equal shards: unequal shards make the average "
            "of per-rank mean losses differ from the full-batch mean; pass drop_last=True or "
            "use a batch size divisible by the world size"
        )
    size = total // w
    return range(r * size, (r + 1) * size)


def shard_batch(*tensors: torch.Tensor, drop_last: bool = False) -> tuple[torch.Tensor, ...] | torch.Tensor:
    """This rank's equal share (along dim 0) of a batch that every rank holds in full."""
    if not tensors:
        raise ValueError("shard_batch needs at least one tensor")
    total = tensors[0].shape[0]
    if any(t.shape[0] != total for t in tensors):
        raise ValueError(f"tensors disagree on the batch size: {[t.shape[0] for t in tensors]}")
    block = shard_indices(total, drop_last=drop_last)
    parts = tuple(t[block.start : block.stop] for t in tensors)
    return parts[0] if len(parts) == 1 else parts


def all_reduce_mean(value: float | torch.Tensor, device: torch.device | str | None = None) -> float:
    """The mean of a scalar over ranks (for logging: one extra collective per call)."""
    if not is_distributed():
        return float(value)
    if device is None:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.as_tensor(value, dtype=torch.float64 if device == "cpu" else torch.float32, device=device)
    tensor = tensor.detach().clone().reshape(())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor) / dist.get_world_size()


def check_same_on_all_ranks(value: int, what: str = "value", device: torch.device | str | None = None) -> None:
    """Raise ``RuntimeError`` on every rank if the integer ``value`` differs between ranks.

    Use it once at start-up for the estimator seed (``estimator.counter.seed``) and step:
    ranks with different seeds draw different noise and the averaged ``d_i`` is wrong
    without any error. One all-reduce of two integers.
    """
    if not is_distributed():
        return
    if device is None:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    v = int(value) & ((1 << 62) - 1)  # fits int64 and its negation
    tensor = torch.tensor([v, -v], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    high, low = int(tensor[0]), -int(tensor[1])
    if high != low:
        raise RuntimeError(
            f"{what} differs between ranks (rank {rank()} has {value}; values span {low}..{high} "
            "modulo 2**62): every rank must use the same estimator seed and step"
        )


# ---------------------------------------------------------------- local launcher

#: Environment variable that overrides :func:`safe_start_method` (``fork``, ``forkserver``, ``spawn``).
START_METHOD_ENV_VAR = "FOGZO_START_METHOD"


def _fork_is_unsafe() -> bool:
    """Whether a forked child could fail where a fresh process would not.

    * CUDA initialised in this process: a forked child cannot use CUDA ("Cannot
      re-initialize CUDA in forked subprocess").
    * Any accelerator present: autograd starts a worker thread per device at this
      process's first backward, and a child forked after that cannot run a backward
      ("Unable to handle autograd's threading in combination with fork-based
      multiprocessing"). On a CPU-only machine autograd starts no such threads.
    """
    if torch.cuda.is_initialized():
        return True
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None and hasattr(accelerator, "is_available"):
        try:
            if accelerator.is_available():
                return True
        except RuntimeError:
            return True
    return torch.cuda.is_available()


def safe_start_method() -> str:
    """The start method :func:`spawn_local` uses unless told otherwise.

    ``"fork"`` where it is safe (a CPU-only machine; it starts in milliseconds and shares the
    parent's imported modules), else ``"forkserver"`` (one fresh server process, started
    once, forks the workers: no CUDA state, no autograd threads), else ``"spawn"``.
    ``$FOGZO_START_METHOD`` overrides the choice.
    """
    import torch.multiprocessing as mp

    available = mp.get_all_start_methods()
    chosen = os.environ.get(START_METHOD_ENV_VAR)
    if chosen:
        if chosen not in available:
            raise ValueError(f"{START_METHOD_ENV_VAR}={chosen!r} is not a start method here; choose one of {available}")
        return chosen
    if "fork" in available and not _fork_is_unsafe():
        return "fork"
    return "forkserver" if "forkserver" in available else "spawn"


def _free_file(directory: str | None) -> str:
    handle, path = tempfile.mkstemp(prefix="fogzo_rendezvous_", dir=directory)
    os.close(handle)
    os.unlink(path)  # FileStore creates it; a stale file from an earlier run would confuse it
    return path


def _spawned_entry(
    index: int,
    fn: Callable[..., Any],
    world: int,
    store_path: str,
    backend: str,
    timeout_s: float,
    threads: int | None,
    args: tuple,
) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
    os.environ.update({"RANK": str(index), "LOCAL_RANK": str(index), "WORLD_SIZE": str(world)})
    dist.init_process_group(
        backend=backend,
        init_method=f"file://{store_path}",
        rank=index,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    fn(index, world, *args)
    # Only on success: after a failed or timed-out collective, tearing the group down can
    # wait on peers that will never answer; process exit releases it anyway.
    dist.destroy_process_group()


#: Modules the forkserver imports once, so that each forked worker starts with them loaded.
FORKSERVER_PRELOAD = ("torch", "torch._dynamo", "torch.distributed", "fogzo", "fogzo.train.distributed")


def spawn_local(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    backend: str = "gloo",
    timeout: float = 60.0,
    collective_timeout: float | None = None,
    threads: int | None = 1,
    tmpdir: str | None = None,
    start_method: str | None = None,
) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh local processes.

    Each process joins a process group (file rendezvous under ``tmpdir``, no network port)
    with ``collective_timeout`` (default: ``timeout``) and destroys it when ``fn`` returns.
    ``fn`` must be picklable (a module-level function). If any process raises, the others
    are terminated and ``torch.multiprocessing.ProcessRaisedException`` (or
    ``ProcessExitedException``) is raised here; if they are not all done after
    ``timeout`` seconds of wall clock, they are terminated and ``TimeoutError`` is raised.
    Return values are not collected: have ``fn`` write results to a file.

    ``start_method``: default :func:`safe_start_method` (``"fork"`` on a CPU-only machine,
    ``"forkserver"`` where a GPU is present or CUDA is initialised: forking then breaks
    CUDA and autograd in the children). ``"fork"`` starts fastest (no re-import of torch);
    ``"forkserver"`` pays one interpreter start per session (the server imports
    :data:`FORKSERVER_PRELOAD` once); ``"spawn"`` one per worker.
    """
    import multiprocessing

    import torch.multiprocessing as mp

    method = start_method or safe_start_method()
    if method == "fork":
        # DDP's constructor imports torch._dynamo (seconds on a busy machine); importing it
        # once here lets every forked child share it instead of paying for it in parallel.
        import torch._dynamo  # noqa: F401
    elif method == "forkserver":
        multiprocessing.get_context("forkserver").set_forkserver_preload(list(FORKSERVER_PRELOAD))

    store_path = _free_file(tmpdir)
    collective = timeout if collective_timeout is None else collective_timeout
    context = mp.start_processes(
        _spawned_entry,
        args=(fn, world_size, store_path, backend, collective, threads, tuple(args)),
        nprocs=world_size,
        join=False,
        start_method=method,
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=0.2):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world_size} spawned processes still running after {timeout:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
        for process in context.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
        if os.path.exists(store_path):
            os.unlink(store_path)
