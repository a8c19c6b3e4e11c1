"""Measurement harness of the benchmarks: interleaved timing, operator counts, kernel time,
compile time and dynamo counters, peak memory helpers, machine description. Nothing here
knows about the models (``workloads.py``) or the command line (``step_cost.py``).

Operator counts (:func:`count_ops`) come from ``torch.profiler`` on one call and are
deterministic, so they are the proxy for per-step overhead on a shared machine (a CUDA
step launches roughly one kernel per operator that computes):

* ``ops``: top-level ``aten::`` operators, i.e. every operator dispatched from Python or
  from an autograd node (nested calls such as ``linear -> addmm`` count once);
* ``kernels``: innermost ``aten::`` operators that compute (views, ``detach``, allocations
  and no-op conversions excluded): a kernel-launch proxy;
* ``host_syncs``: reads of a tensor's value on the host (``item``/``float()``/``bool()``,
  which dispatch ``aten::_local_scalar_dense``, and ``Tensor.tolist``), split into those of
  the optimizer step and the rest (``estimator_syncs``). On CUDA each is a device sync.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import gc
import math
import os
import platform
import random
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

# Innermost aten operators that launch no compute kernel.
NO_KERNEL = frozenset(
    "aten::" + name
    for name in (
        "detach detach_ t view reshape _reshape_alias flatten unflatten slice select transpose permute expand "
        "expand_as as_strided unsqueeze squeeze alias resolve_conj resolve_neg unbind split split_with_sizes "
        "chunk narrow view_as _unsafe_view lift_fresh numpy_T contiguous empty empty_like empty_strided resize_ "
        "to _to_copy set_ result_type size stride is_same_size _has_compatible_shallow_copy_type is_nonzero item "
        "clone"
    ).split()
)
SYNC_OPS = frozenset({"aten::_local_scalar_dense", "host_sync::tolist"})
OPTIMIZER_PREFIX = "Optimizer.step"


# -------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(call: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call; garbage collected before, collector off during the call.

    (Cheap once :func:`time_interleaved` has frozen the long-lived objects: ``gc.freeze``.)
    """
    gc.collect()
    synchronize(device)
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        call()
        synchronize(device)
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()


def participation(rounds: int, count: int) -> set[int]:
    """``count`` round indices spread evenly over ``range(rounds)``."""
    count = max(1, min(count, rounds))
    return {(j * rounds) // count for j in range(count)}


def time_interleaved(
    calls: dict[str, Callable[[], object]],
    *,
    rounds: int,
    warmup: int,
    expensive_rounds: int,
    device: torch.device,
    seed: int,
    log: Callable[[str], None],
    expensive: tuple[str, ...] = (),
    calls_per_sample: int = 1,
) -> tuple[dict[str, list[float]], list[str]]:
    """Round-robin timing in shuffled order; returns samples (s) per variant and warnings seen.

    With ``calls_per_sample > 1`` each sample is the mean of that many back-to-back calls
    (for calls of microseconds, where one ``perf_counter`` pair is too coarse).
    """
    rng = random.Random(seed)
    seen: list[str] = []
    names = list(calls)

    def repeated(call: Callable[[], object]) -> Callable[[], object]:
        if calls_per_sample == 1:
            return call

        def run() -> None:
            for _ in range(calls_per_sample):
                call()

        return run

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for index in range(warmup):
            order = [v for v in names if v not in expensive or index == 0]
            rng.shuffle(order)
            for variant in order:
                calls[variant]()
            synchronize(device)
        for item in caught:
            message = f"{item.category.__name__}: {str(item.message).splitlines()[0]}"
            if message not in seen:
                seen.append(message)
    cheap_rounds = set(range(rounds))
    costly_rounds = participation(rounds, expensive_rounds)
    samples: dict[str, list[float]] = {variant: [] for variant in names}
    runners = {variant: repeated(calls[variant]) for variant in names}
    # Everything alive now (torch, modules, the model) goes to the permanent generation, so
    # the collection before each timed call scans only the garbage of the calls themselves.
    gc.collect()
    gc.freeze()
    try:
        for index in range(rounds):
            order = [v for v in names if index in (costly_rounds if v in expensive else cheap_rounds)]
            rng.shuffle(order)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for variant in order:
                    samples[variant].append(timed_call(runners[variant], device) / calls_per_sample)
            if rounds <= 50 or (index + 1) % 50 == 0:
                log(f"    round {index + 1}/{rounds} done")
    finally:
        gc.unfreeze()
    return samples, seen


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


# ------------------------------------------------------------------------ operator counts


@contextlib.contextmanager
def _recorded_tolist() -> Iterator[None]:
    """Make ``Tensor.tolist`` visible to the profiler (on CPU it dispatches no aten op)."""
    original = torch.Tensor.tolist

    def tolist(self: torch.Tensor) -> Any:
        with torch.profiler.record_function("host_sync::tolist"):
            return original(self)

    torch.Tensor.tolist = tolist  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.tolist = original  # type: ignore[method-assign]


def _ancestors(event: Any) -> Iterator[Any]:
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def count_ops(call: Callable[[], object], *, top: int = 0) -> dict[str, Any]:
    """Operator counts of one ``call`` (see the module docstring); ``top`` most frequent ops too."""
    from torch.profiler import ProfilerActivity, profile

    with _recorded_tolist(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call()
    events = list(prof.events())
    ops = kernels = syncs = optimizer_syncs = 0
    names: collections.Counter[str] = collections.Counter()
    for event in events:
        name = event.name
        if name in SYNC_OPS:
            syncs += 1
            if any(a.name.startswith(OPTIMIZER_PREFIX) for a in _ancestors(event)):
                optimizer_syncs += 1
        if not name.startswith("aten::"):
            continue
        if not any(a.name.startswith("aten::") for a in _ancestors(event)):
            ops += 1
            names[name] += 1
        if name not in NO_KERNEL and not any(c.name.startswith("aten::") for c in event.cpu_children):
            kernels += 1
    result: dict[str, Any] = {
        "ops": ops,
        "kernels": kernels,
        "host_syncs": syncs,
        "estimator_syncs": syncs - optimizer_syncs,
    }
    if top:
        result["top_ops"] = dict(names.most_common(top))
    return result


def kernel_profile(call: Callable[[], object], device: torch.device, steps: int = 3) -> dict[str, Any]:
    """CUDA kernel time against wall time over ``steps`` calls (``torch.profiler``).

    ``busy`` = summed kernel time / wall time: near 1 when the GPU never waits for Python.
    On a CPU device only the wall and CPU-side times are reported.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            call()
        synchronize(device)
        wall = time.perf_counter() - start
    averages = prof.key_averages()
    cpu_us = sum(a.self_cpu_time_total for a in averages)
    kernel_us = None
    if device.type == "cuda":
        device_entries = [a for a in averages if getattr(a, "device_type", None) == torch.autograd.DeviceType.CUDA]
        source = device_entries or list(averages)
        kernel_us = sum(
            getattr(a, "self_device_time_total", None) or getattr(a, "self_cuda_time_total", 0) or 0 for a in source
        )
    wall_ms = wall * 1e3 / steps
    result = {"steps": steps, "wall_ms_per_step": wall_ms, "cpu_ms_per_step": cpu_us / 1e3 / steps}
    if kernel_us is not None:
        result["kernel_ms_per_step"] = kernel_us / 1e3 / steps
        result["busy"] = result["kernel_ms_per_step"] / wall_ms if wall_ms > 0 else None
    return result


# ------------------------------------------------------------------------------ compile


def compile_warmup(
    calls: dict[str, Callable[[], object]], variants: Sequence[str], device: torch.device
) -> dict[str, float]:
    """Seconds of the first (compiling) call of each compiled variant."""
    seconds = {}
    for variant in variants:
        if variant in calls:
            synchronize(device)
            start = time.perf_counter()
            calls[variant]()
            synchronize(device)
            seconds[variant] = time.perf_counter() - start
    return seconds


def dynamo_counters() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
    }


# -------------------------------------------------------------------------------- memory


def proc_status_mb(key: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process from ``/proc/self/status`` (Linux), in MB."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def maxrss_mb() -> float:
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / (1024 * 1024) if sys.platform == "darwin" else value / 1024  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Give freed heap back to the OS and reset the RSS high-water mark (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def peak_of_call(call: Callable[[], object], device: torch.device) -> dict[str, Any]:
    """Peak memory of one ``call`` over the memory in use just before it (call it warm)."""
    extra: dict[str, Any] = {}
    synchronize(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        method = "torch.cuda.max_memory_allocated - memory_allocated after reset_peak_memory_stats"
        baseline_mb, peak_mb = baseline / 2**20, peak / 2**20
    else:
        reset = reset_peak_rss()
        rss = proc_status_mb("VmRSS")
        if reset and rss is not None:
            # ru_maxrss = max(high-water mark of this address space, a value the kernel
            # carries over from the parent at fork + exec), so in a child of a big
            # process it never drops below the parent's RSS. VmHWM is the first term
            # alone, and clear_refs has just reset it to the current RSS.
            baseline_mb = rss
            maxrss_before = maxrss_mb()
            call()
            peak_mb = proc_status_mb("VmHWM") or maxrss_mb()
            extra["ru_maxrss_before_mb"], extra["ru_maxrss_after_mb"] = maxrss_before, maxrss_mb()
            method = "VmHWM (ru_maxrss's own-address-space term) after malloc_trim + clear_refs reset, minus VmRSS"
        else:
            baseline_mb = maxrss_mb()
            call()
            peak_mb = maxrss_mb()
            method = "ru_maxrss delta without reset (lower bound: the warm-up peak is in the baseline)"
    return {"baseline_mb": baseline_mb, "peak_mb": peak_mb, "delta_mb": max(peak_mb - baseline_mb, 0.0),
            "method": method, **extra}


# ------------------------------------------------------------------------------ machine


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
    }
    with contextlib.suppress(OSError, AttributeError):
        info["load_average_start"] = list(os.getloadavg())
    return info


def keep_freed_memory() -> bool:
    """glibc only: keep freed heap memory in the process (no trimming; no ``mmap`` below 32 MiB).

    With glibc's defaults a tensor of a few hundred KiB that is freed at the top of the heap
    is returned to the OS and the next allocation page-faults it back in; a step that
    allocates more temporaries than another pays for it in page faults, not in compute.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return bool(
        libc.mallopt(m_mmap_threshold, 32 << 20)
        and libc.mallopt(m_trim_threshold, (1 << 31) - 1)
        and libc.mallopt(m_top_pad, 64 << 20)
    )


# ----------------------------------------------------------------------------- arithmetic


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator`` if both are positive and finite, else ``None``."""
    if numerator is None or denominator is None:
        return None
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or numerator <= 0 or denominator <= 0:
        return None
    value = numerator / denominator
    return value if math.isfinite(value) and value > 0 else None


def difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def total(*values: float | None) -> float | None:
    return None if any(v is None for v in values) else sum(values)  # type: ignore[arg-type]
