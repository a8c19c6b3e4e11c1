#!/usr/bin/env python
"""Step cost of FOGZO against its theoretical limit, STE, n-SPSA and an unquantized step.

Command lines (from the repository root, with the project's virtual environment)::

    python benchmarks/step_cost.py                      # all five models, CPU (long: tens of minutes on few cores)
    python benchmarks/step_cost.py --quick              # smoke run, under a minute: every code path, tiny sizes
    python benchmarks/step_cost.py --models mlp,llama-1m --repeats 20 --threads 8 --json step_cost.json
    python benchmarks/step_cost.py --device cuda --json step_cost_cuda.json
    python benchmarks/step_cost.py --memory-variants none   # timings only (no memory subprocesses)

Models (weights quantized to 2 bits with ``fogzo.quantize(model, fogzo.QuantConfig(bits=2),
skip_first_last=True)``; the MLP is quantized whole), each trained on one fixed random batch:

=================  ==========================================  ==============================
name               model                                       batch (full / ``--quick``)
=================  ==========================================  ==============================
mlp                MLP 784-256-10                              256 / 256
resnet20           CIFAR ResNet-20 (BatchNorm, training mode)  128×3×32×32 / 8×3×16×16, width 4
vit_tiny_cifar     DeiT-style ViT, D=96, 6 blocks, patch 4     128×3×32×32 / 8, D=48, 2 blocks
llama-1m           LLaMA-style LM, 1.0 M parameters            16 × 128 tokens / 4 × 32
llama-10m          LLaMA-style LM, 10.7 M parameters           16 × 128 tokens / 2 × 32, 1 block
=================  ==========================================  ==============================

``--quick`` runs mlp, resnet20 and llama-1m at the small sizes (override with ``--models``),
with 1 warm-up and 3 timed rounds, n = 8 for the n-SPSA(n) variants (timed once), and peak
memory of ``ste`` and ``fogzo`` only, two subprocesses at a time: every code path runs, but
the numbers mean little.

Variants timed for each model (one AdamW optimizer shared by all quantized variants; the
float step has its own model copy and AdamW):

* ``ste``               ``optimizer.zero_grad(); fogzo.STE(model).estimate(closure); optimizer.step()``
* ``forward_inference`` ``with torch.inference_mode(): closure()``
* ``forward_no_grad``   ``with torch.no_grad(): closure()`` (what the estimators' perturbed passes use)
* ``fogzo``             the STE line with ``fogzo.FOGZO(model, total_steps=10_000, n=1)`` (two-sided)
* ``fogzo_one_sided``   the same with ``one_sided=True``
* ``spsa_n1``           ``fogzo.SPSA(model, n=1, report_loss=False)`` (2 forwards, as in SPEC §3)
* ``spsa_looped``       n-SPSA with ``n = --spsa-n`` (64; quick 8), ``vectorize=None``: 2n forwards one by one
* ``spsa_batched``      the same with ``vectorize=n``: all 2n perturbed passes in ``torch.func.vmap``
                        chunks; skipped (null) for models with BatchNorm in training mode (ResNet),
                        which cannot be vmapped
* ``float_step``        the unquantized copy: ``zero_grad(); closure().backward(); optimizer.step()``

All forward passes run in training mode (BatchNorm uses batch statistics), as the perturbed
passes of a training step do; the FOGZO β schedule is the default linear one (step 0, where
β = 1 and no noise is drawn, falls in the warm-up).

Method. All variants of one model are timed in the same process, *interleaved*: after
``--warmup`` untimed rounds, each of ``--repeats`` rounds runs every variant once in a freshly
shuffled order (fixed seed), so slow drifts of the machine (other processes, frequency
scaling, thermal state) hit every variant alike instead of whichever ran last. The expensive
n-SPSA(64) variants take part in only ``--spsa-repeats`` rounds, spread evenly. Each call is
timed with ``time.perf_counter`` (with ``torch.cuda.synchronize()`` before and after on
CUDA), Python's garbage collector is run between calls and disabled inside them, and the
*median* per variant is reported (the interquartile range and all samples go to the JSON).

The *limit* is the theoretical minimum of a FOGZO step: one STE step (forward, backward and
optimizer step) plus two inference-mode forward passes (one for the one-sided variant). So::

    fogzo_over_limit     = t(fogzo)           / (t(ste) + 2·t(forward_inference))
    one_sided_over_limit = t(fogzo_one_sided) / (t(ste) + t(forward_inference))
    fogzo_over_ste       = t(fogzo) / t(ste)                (SPEC cost units: 5/3 at n = 1)
    quantizer_overhead   = t(ste) / t(float_step)           (STE quantized / float step)
    spsa_batched_speedup = t(spsa_looped) / t(spsa_batched)
    peak_memory_ratio    = Δpeak(fogzo) / Δpeak(ste)

``fogzo_over_limit − 1`` is the estimator's own overhead: noise generation, building the
perturbed weights, the guide norm, state snapshots, hooks, the final gradient.

Peak memory is measured per variant in a *separate process* (the script re-invokes itself
with the hidden ``--measure-memory VARIANT --model NAME``): build the model, run one warm-up
STE step (the float step for ``float_step``; this creates gradients and the AdamW state) and
one call of the variant, then take the baseline and run the variant once more. Δpeak is the
peak during that call minus the baseline. On CPU the peak is the resident-set high-water
mark: the child returns freed heap memory to the OS (``malloc_trim``), resets the mark
(``echo 5 > /proc/self/clear_refs``), takes the baseline (``VmRSS``) right after and reads
the peak as ``VmHWM``. That is the term of ``getrusage(RUSAGE_SELF).ru_maxrss`` that belongs to
the process's own address space; ``ru_maxrss`` itself is useless here because Linux carries
the parent's high-water mark over fork + exec, so in a child of this (large) process it never
drops below the parent's RSS (its values are still recorded, ``ru_maxrss_*_mb``). Children run
with ``MALLOC_MMAP_THRESHOLD_=131072`` (unless set) so that large tensors are unmapped when
freed and RSS follows the live tensors. Where the mark cannot be reset (no ``/proc``) the
baseline is ``ru_maxrss`` after warm-up and the Δ only a lower bound (``method`` says which).
On CUDA it is ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, over
``torch.cuda.memory_allocated()``. Both the Δ and the absolute peak (MB) are reported;
``peak_memory_ratio`` is the ratio of the Δs (the step's working memory over model, gradients
and optimizer state), ``peak_memory_total_ratio`` that of the absolute peaks.

``--json PATH`` writes a list with one object per model. Keys always present:
``model``, ``fogzo_over_limit``, ``one_sided_over_limit``, ``fogzo_over_ste``,
``peak_memory_ratio``, ``spsa_batched_speedup`` (positive floats, or null where not
measured). Extra keys: ``one_sided_over_ste``, ``fogzo_over_limit_no_grad`` (the limit with
no_grad forwards), ``quantizer_overhead``, ``peak_memory_total_ratio``, ``fogzo_overhead_ms``
and ``one_sided_overhead_ms`` (median time above the limit), ``times_ms`` (medians; null for
a skipped variant), ``times_ms_iqr``, ``times_ms_samples``, ``memory`` (per variant),
``skipped``, ``workload``, ``settings``, ``notes`` (e.g. warnings seen during warm-up) and
``machine`` (torch version, threads, CPU model, device name, load average before and after).

Allocator (``--malloc``). With glibc's default settings, freeing a large tensor at the top
of the heap returns its pages to the OS and the next allocation faults them back in. An
estimator step that keeps more buffers alive (FOGZO's shift, a perturbed weight) pays for
this in page faults on a CPU — on the MLP that was most of the gap between the perturbed
pass and an inference forward. ``--malloc keep`` sets ``mallopt`` so that freed memory
stays in the process (what jemalloc/tcmalloc, recommended by PyTorch's CPU tuning guide, do
anyway); the memory children always run with the defaults. The CUDA caching allocator has
no such effect.

Timings are never asserted anywhere: a busy machine gives noisy numbers; read the load
average in the JSON before trusting a run. On a machine whose cores are shared with other
work, pass ``--threads 1``: OpenMP threads that spin-wait on oversubscribed cores can make
small kernels 10-50× slower and the ratios meaningless.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fogzo

MODELS = ("mlp", "resnet20", "vit_tiny_cifar", "llama-1m", "llama-10m")
QUICK_MODELS = ("mlp", "resnet20", "llama-1m")
VARIANTS = (
    "ste",
    "forward_inference",
    "forward_no_grad",
    "fogzo",
    "fogzo_one_sided",
    "spsa_n1",
    "spsa_looped",
    "spsa_batched",
    "float_step",
)
EXPENSIVE = ("spsa_looped", "spsa_batched")
QUICK_MEMORY_VARIANTS = ("ste", "fogzo")
REQUIRED_KEYS = (
    "model",
    "fogzo_over_limit",
    "one_sided_over_limit",
    "fogzo_over_ste",
    "peak_memory_ratio",
    "spsa_batched_speedup",
)
LEARNING_RATE = 1e-4  # small: the shared model drifts little over the timed steps
FOGZO_TOTAL_STEPS = 10_000
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


# ----------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    """A model (quantized and float copies), one fixed batch and its loss."""

    name: str
    quantized: nn.Module | None
    float_model: nn.Module | None
    inputs: torch.Tensor
    targets: torch.Tensor
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    description: dict[str, Any] = field(default_factory=dict)

    def closure(self, model: nn.Module) -> Callable[[], torch.Tensor]:
        inputs, targets, loss = self.inputs, self.targets, self.loss
        return lambda: loss(model(inputs), targets)


def _classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets)


def _language_model_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _registered(name: str, fallback: Callable[..., nn.Module], **kwargs: Any) -> nn.Module:
    """``fogzo.models.build_model(name, **kwargs)``, or ``fallback(**kwargs)`` if it is missing."""
    try:
        from fogzo.models import build_model

        return build_model(name, **kwargs)
    except (ImportError, KeyError):
        return fallback(**kwargs)


def _mlp(quick: bool) -> tuple[nn.Module, dict[str, Any]]:
    from fogzo.models import MLP

    return MLP((784, 256, 10)), {"kind": "image", "batch": 256, "shape": (784,), "classes": 10}


def _resnet20(quick: bool) -> tuple[nn.Module, dict[str, Any]]:
    from fogzo.models.resnet import cifar_resnet

    width = 4 if quick else 16
    model = _registered("resnet20", lambda **kw: cifar_resnet(20, **kw), width=width)
    size = 16 if quick else 32
    return model, {"kind": "image", "batch": 8 if quick else 128, "shape": (3, size, size), "classes": 10, "width": width}


def _vit_tiny_cifar(quick: bool) -> tuple[nn.Module, dict[str, Any]]:
    from fogzo.models.vit import VisionTransformer

    def fallback(**kw: Any) -> nn.Module:
        return VisionTransformer(**{"patch_size": 4, "dim": 96, "depth": 6, "heads": 3, **kw})

    overrides = {"dim": 48, "depth": 2} if quick else {}
    model = _registered("vit_tiny_cifar", fallback, **overrides)
    return model, {"kind": "image", "batch": 8 if quick else 128, "shape": (3, 32, 32), "classes": 10, **overrides}


_LLAMA_FALLBACK = {
    "llama-1m": dict(vocab_size=96, dim=128, n_layers=5, n_heads=4, max_seq_len=256),
    "llama-10m": dict(vocab_size=96, dim=384, n_layers=6, n_heads=6, max_seq_len=256),
}


def _llama(name: str, quick: bool) -> tuple[nn.Module, dict[str, Any]]:
    from fogzo.models.llama import Llama, LlamaConfig

    overrides: dict[str, Any] = {"n_layers": 1} if quick and name == "llama-10m" else {}
    model = _registered(name, lambda **kw: Llama(LlamaConfig(**{**_LLAMA_FALLBACK[name], **kw})), **overrides)
    if quick:
        batch, seq = (4, 32) if name == "llama-1m" else (2, 32)
    else:
        batch, seq = 16, 128
    vocab = model.config.vocab_size if hasattr(model, "config") else _LLAMA_FALLBACK[name]["vocab_size"]
    return model, {"kind": "tokens", "batch": batch, "seq_len": seq, "vocab": vocab, **overrides}


BUILDERS: dict[str, Callable[[bool], tuple[nn.Module, dict[str, Any]]]] = {
    "mlp": _mlp,
    "resnet20": _resnet20,
    "vit_tiny_cifar": _vit_tiny_cifar,
    "llama-1m": lambda quick: _llama("llama-1m", quick),
    "llama-10m": lambda quick: _llama("llama-10m", quick),
}


def build_workload(
    name: str, *, quick: bool, device: torch.device, seed: int, quantized: bool = True, float_copy: bool = True
) -> Workload:
    """The model ``name`` (2-bit quantized and/or its float copy) and one fixed batch."""
    torch.manual_seed(seed)
    model, info = BUILDERS[name](quick)
    model.to(device).train()
    generator = torch.Generator().manual_seed(seed + 1)
    if info["kind"] == "tokens":
        tokens = torch.randint(0, info["vocab"], (info["batch"], info["seq_len"] + 1), generator=generator)
        inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        loss = _language_model_loss
    else:
        inputs = torch.randn(info["batch"], *info["shape"], generator=generator)
        targets = torch.randint(0, info["classes"], (info["batch"],), generator=generator)
        loss = _classification_loss
    float_model = copy.deepcopy(model) if float_copy else None
    quantized_model = None
    if quantized:
        quantized_model = fogzo.quantize(model, fogzo.QuantConfig(bits=2), skip_first_last=name != "mlp")
    info = {key: list(value) if isinstance(value, tuple) else value for key, value in info.items()}
    info["parameters"] = sum(p.numel() for p in model.parameters())
    if quantized_model is not None:
        info["quantized_layers"] = sum(1 for _ in fogzo.quantized_layers(quantized_model))
        info["perturbed_coordinates"] = fogzo.PerturbedSet.from_model(quantized_model).num_coordinates
    info["skip_first_last"] = name != "mlp"
    return Workload(name, quantized_model, float_model, inputs.to(device), targets.to(device), loss, info)


def has_training_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


# ------------------------------------------------------------------------------ variants


@dataclass
class Steps:
    """The callables of one model's variants (absent: not measured, with a reason)."""

    calls: dict[str, Callable[[], object]]
    skipped: dict[str, str]
    warmup_step: Callable[[], object] | None = None


def make_steps(workload: Workload, variants: Sequence[str], *, spsa_n: int, seed: int) -> Steps:
    """One shared AdamW for the quantized model, one for the float copy; estimators built once."""
    calls: dict[str, Callable[[], object]] = {}
    skipped: dict[str, str] = {}
    model = workload.quantized
    warmup_step = None
    if model is not None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
        closure = workload.closure(model)

        def training_step(estimator: Any) -> Callable[[], object]:
            def step() -> object:
                optimizer.zero_grad()
                info = estimator.estimate(closure)
                optimizer.step()
                return info

            return step

        def forward(context: Callable[[], contextlib.AbstractContextManager]) -> Callable[[], object]:
            def run() -> object:
                with context():
                    return closure()

            return run

        factories: dict[str, Callable[[], Callable[[], object]]] = {
            "ste": lambda: training_step(fogzo.STE(model)),
            "forward_inference": lambda: forward(torch.inference_mode),
            "forward_no_grad": lambda: forward(torch.no_grad),
            "fogzo": lambda: training_step(fogzo.FOGZO(model, total_steps=FOGZO_TOTAL_STEPS, n=1, seed=seed)),
            "fogzo_one_sided": lambda: training_step(
                fogzo.FOGZO(model, total_steps=FOGZO_TOTAL_STEPS, n=1, seed=seed, one_sided=True)
            ),
            "spsa_n1": lambda: training_step(fogzo.SPSA(model, n=1, seed=seed, report_loss=False)),
            "spsa_looped": lambda: training_step(fogzo.SPSA(model, n=spsa_n, seed=seed, report_loss=False)),
            "spsa_batched": lambda: training_step(
                fogzo.SPSA(model, n=spsa_n, seed=seed, report_loss=False, vectorize=spsa_n)
            ),
        }
        for variant in variants:
            if variant == "spsa_batched" and has_training_batchnorm(model):
                skipped[variant] = "BatchNorm in training mode writes buffers in the forward: not vmappable"
            elif variant in factories:
                calls[variant] = factories[variant]()
        warmup_step = calls.get("ste") or factories["ste"]()
    if workload.float_model is not None and "float_step" in variants:
        float_model = workload.float_model
        float_optimizer = torch.optim.AdamW(float_model.parameters(), lr=LEARNING_RATE)
        float_closure = workload.closure(float_model)

        def float_step() -> object:
            float_optimizer.zero_grad()
            loss = float_closure()
            loss.backward()
            float_optimizer.step()
            return loss

        calls["float_step"] = float_step
        if warmup_step is None:
            warmup_step = float_step
    ordered = {variant: calls[variant] for variant in variants if variant in calls}
    return Steps(ordered, skipped, warmup_step)


# -------------------------------------------------------------------------------- timing


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(call: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call; garbage collected before, collector off during the call.

    (Cheap once :func:`time_interleaved` has frozen the long-lived objects: ``gc.freeze``.)
    """
    gc.collect()
    _synchronize(device)
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        call()
        _synchronize(device)
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
) -> tuple[dict[str, list[float]], list[str]]:
    """Round-robin timing in shuffled order; returns samples (s) per variant and warnings seen."""
    rng = random.Random(seed)
    seen: list[str] = []
    names = list(calls)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for index in range(warmup):
            order = [v for v in names if v not in EXPENSIVE or index == 0]
            rng.shuffle(order)
            for variant in order:
                calls[variant]()
            _synchronize(device)
        for item in caught:
            message = f"{item.category.__name__}: {str(item.message).splitlines()[0]}"
            if message not in seen:
                seen.append(message)
    cheap_rounds = set(range(rounds))
    costly_rounds = participation(rounds, expensive_rounds)
    samples: dict[str, list[float]] = {variant: [] for variant in names}
    # Everything alive now (torch, modules, the model) goes to the permanent generation, so
    # the collection before each timed call scans only the garbage of the calls themselves.
    gc.collect()
    gc.freeze()
    try:
        for index in range(rounds):
            order = [v for v in names if index in (costly_rounds if v in EXPENSIVE else cheap_rounds)]
            rng.shuffle(order)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for variant in order:
                    samples[variant].append(timed_call(calls[variant], device))
            log(f"    round {index + 1}/{rounds} done")
    finally:
        gc.unfreeze()
    return samples, seen


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


# -------------------------------------------------------------------------------- memory


def _proc_status_mb(key: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process from ``/proc/self/status`` (Linux), in MB."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _maxrss_mb() -> float:
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / (1024 * 1024) if sys.platform == "darwin" else value / 1024  # bytes on macOS, KiB on Linux


def _reset_peak_rss() -> bool:
    """Give freed heap back to the OS and reset the RSS high-water mark (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def measure_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Child process: peak memory of one variant over a post-warm-up baseline."""
    device = torch.device(args.device)
    variant = args.measure_memory
    is_float = variant == "float_step"
    workload = build_workload(
        args.model, quick=args.quick, device=device, seed=args.seed, quantized=not is_float, float_copy=is_float
    )
    steps = make_steps(workload, [variant], spsa_n=args.spsa_n, seed=args.seed)
    if variant not in steps.calls:
        return {"model": args.model, "variant": variant, "skipped": steps.skipped.get(variant, "not available")}
    call = steps.calls[variant]
    assert steps.warmup_step is not None
    extra: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steps.warmup_step()  # gradients and AdamW state exist from here on
        call()  # one-time allocations of the variant itself
        _synchronize(device)
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
            reset = _reset_peak_rss()
            rss = _proc_status_mb("VmRSS")
            if reset and rss is not None:
                # ru_maxrss = max(high-water mark of this address space, a value the kernel
                # carries over from the parent at fork + exec), so in a child of a big
                # process it never drops below the parent's RSS. VmHWM is the first term
                # alone, and clear_refs has just reset it to the current RSS.
                baseline_mb = rss
                maxrss_before = _maxrss_mb()
                call()
                peak_mb = _proc_status_mb("VmHWM") or _maxrss_mb()
                extra["ru_maxrss_before_mb"], extra["ru_maxrss_after_mb"] = maxrss_before, _maxrss_mb()
                method = "VmHWM (ru_maxrss's own-address-space term) after malloc_trim + clear_refs reset, minus VmRSS"
            else:
                baseline_mb = _maxrss_mb()
                call()
                peak_mb = _maxrss_mb()
                method = "ru_maxrss delta without reset (lower bound: the warm-up peak is in the baseline)"
    return {
        "model": args.model,
        "variant": variant,
        "baseline_mb": baseline_mb,
        "peak_mb": peak_mb,
        "delta_mb": max(peak_mb - baseline_mb, 0.0),
        "method": method,
        **extra,
    }


def run_memory_child(model: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--measure-memory",
        variant,
        "--model",
        model,
        "--device",
        args.device,
        "--threads",
        str(torch.get_num_threads()),
        "--spsa-n",
        str(args.spsa_n),
        "--seed",
        str(args.seed),
    ]
    if args.quick:
        command.append("--quick")
    env = {**os.environ}
    for key, value in MEMORY_ENV.items():
        env.setdefault(key, value)
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        return {"model": model, "variant": variant, "error": f"exit {result.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------- summary


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator`` if both are positive and finite, else ``None``."""
    if numerator is None or denominator is None:
        return None
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or numerator <= 0 or denominator <= 0:
        return None
    value = numerator / denominator
    return value if math.isfinite(value) and value > 0 else None


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _sum(*values: float | None) -> float | None:
    return None if any(v is None for v in values) else sum(values)  # type: ignore[arg-type]


def summarize(
    model: str,
    samples: dict[str, list[float]],
    memory: dict[str, dict[str, Any]],
    skipped: dict[str, str],
    workload: dict[str, Any],
    settings: dict[str, Any],
    machine: dict[str, Any],
    notes: list[str],
) -> dict[str, Any]:
    median = {v: statistics.median(s) * 1e3 for v, s in samples.items() if s}
    t = median.get
    delta = {v: m.get("delta_mb") for v, m in memory.items()}
    peak = {v: m.get("peak_mb") for v, m in memory.items()}
    return {
        "model": model,
        "fogzo_over_limit": ratio(t("fogzo"), _sum(t("ste"), t("forward_inference"), t("forward_inference"))),
        "one_sided_over_limit": ratio(t("fogzo_one_sided"), _sum(t("ste"), t("forward_inference"))),
        "fogzo_over_ste": ratio(t("fogzo"), t("ste")),
        "peak_memory_ratio": ratio(delta.get("fogzo"), delta.get("ste")),
        "spsa_batched_speedup": ratio(t("spsa_looped"), t("spsa_batched")),
        "one_sided_over_ste": ratio(t("fogzo_one_sided"), t("ste")),
        "fogzo_over_limit_no_grad": ratio(t("fogzo"), _sum(t("ste"), t("forward_no_grad"), t("forward_no_grad"))),
        "quantizer_overhead": ratio(t("ste"), t("float_step")),
        "spsa_n1_over_two_forwards": ratio(t("spsa_n1"), _sum(t("forward_no_grad"), t("forward_no_grad"))),
        "peak_memory_total_ratio": ratio(peak.get("fogzo"), peak.get("ste")),
        "fogzo_over_ste_cost_units": 5 / 3,
        "fogzo_overhead_ms": _difference(t("fogzo"), _sum(t("ste"), t("forward_inference"), t("forward_inference"))),
        "one_sided_overhead_ms": _difference(t("fogzo_one_sided"), _sum(t("ste"), t("forward_inference"))),
        "times_ms": {v: median.get(v) for v in VARIANTS if v in samples or v in skipped},
        "times_ms_iqr": {v: [q * 1e3 for q in _quartiles(s)] for v, s in samples.items() if s},
        "times_ms_samples": {v: [x * 1e3 for x in s] for v, s in samples.items()},
        "memory": memory,
        "skipped": skipped,
        "workload": workload,
        "settings": settings,
        "notes": notes,
        "machine": machine,
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def print_summary(result: dict[str, Any], out: Callable[[str], None]) -> None:
    w = result["workload"]
    shape = f"batch {w['batch']} x seq {w['seq_len']}" if "seq_len" in w else f"batch {w['batch']} x {w['shape']}"
    out(
        f"\n== {result['model']}: {w['parameters']:,} parameters, "
        f"{w.get('perturbed_coordinates', 0):,} perturbed, {shape} =="
    )
    out(f"  {'variant':<18}{'median ms':>12}{'IQR ms':>20}{'n':>4}{'peak Δ MB':>12}{'peak MB':>10}")
    for variant, value in result["times_ms"].items():
        iqr = result["times_ms_iqr"].get(variant)
        count = len(result["times_ms_samples"].get(variant, []))
        memory = result["memory"].get(variant, {})
        iqr_text = f"{iqr[0]:.2f}-{iqr[1]:.2f}" if iqr else "-"
        median_text = _fmt(value, 2) if value is not None else "skipped"
        out(
            f"  {variant:<18}{median_text:>12}{iqr_text:>20}{count:>4}"
            f"{_fmt(memory.get('delta_mb'), 1):>12}{_fmt(memory.get('peak_mb'), 1):>10}"
        )
    n = result["settings"]["spsa_n"]
    rows = [
        ("FOGZO / (STE + 2·forward)", result["fogzo_over_limit"]),
        ("  FOGZO − (STE + 2·forward), ms", result["fogzo_overhead_ms"]),
        ("one-sided / (STE + forward)", result["one_sided_over_limit"]),
        ("FOGZO / STE  (cost units 5/3 = 1.667)", result["fogzo_over_ste"]),
        ("one-sided / STE  (cost units 4/3 = 1.333)", result["one_sided_over_ste"]),
        ("peak memory Δ FOGZO / STE", result["peak_memory_ratio"]),
        ("peak memory total FOGZO / STE", result["peak_memory_total_ratio"]),
        ("STE quantized / float step", result["quantizer_overhead"]),
        (f"n-SPSA({n}) looped / batched (speed-up)", result["spsa_batched_speedup"]),
    ]
    for label, value in rows:
        out(f"  {label:<44}{_fmt(value):>8}")
    for variant, reason in result["skipped"].items():
        out(f"  note: {variant} not measured: {reason}")
    for note in result["notes"]:
        out(f"  note: {note}")


# ------------------------------------------------------------------------------- machine


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


# ---------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats: under a minute")
    parser.add_argument("--models", default=None, help=f"comma-separated, from {','.join(MODELS)}")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds R (default 10; quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 2; quick 1)")
    parser.add_argument(
        "--spsa-repeats", type=int, default=None, help="rounds for the n-SPSA(n) variants (default min(R, 3); quick 1)"
    )
    parser.add_argument("--spsa-n", type=int, default=None, help="n of the looped/batched n-SPSA variants (64; quick 8)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--memory-variants",
        default=None,
        help="'all', 'none' or a comma list of variants for the memory subprocesses (default all; quick: ste,fogzo)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--malloc",
        default="default",
        choices=["default", "keep"],
        help="CPU timings: 'keep' stops glibc from returning freed memory to the OS (mallopt), as "
        "jemalloc/tcmalloc would; 'default' leaves glibc as it is (see the module docstring)",
    )
    parser.add_argument("--json", default=None, help="write the results (a list, one object per model) here")
    parser.add_argument("--measure-memory", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--memory-jobs", type=int, default=None, help="memory subprocesses run at once (default 1; quick 2)"
    )
    args = parser.parse_args(argv)
    if args.spsa_n is None:
        args.spsa_n = 8 if args.quick else 64
    if args.memory_jobs is None:
        args.memory_jobs = 2 if args.quick else 1
    if args.spsa_n < 1 or args.memory_jobs < 1:
        parser.error("--spsa-n and --memory-jobs must be >= 1")
    if args.measure_memory is not None:
        if args.model not in MODELS or args.measure_memory not in VARIANTS:
            parser.error("--measure-memory needs a known VARIANT and --model NAME")
        return args
    names = args.models.split(",") if args.models else list(QUICK_MODELS if args.quick else MODELS)
    names = [name.strip() for name in names if name.strip()]
    unknown = [name for name in names if name not in MODELS]
    if unknown or not names:
        parser.error(f"unknown models {unknown}; choose from {','.join(MODELS)}")
    args.models = names
    args.repeats = args.repeats if args.repeats is not None else (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.repeats < 1 or args.warmup < 1:
        parser.error("--repeats and --warmup must be >= 1 (warm-up also skips the FOGZO step 0, where β = 1)")
    if args.spsa_repeats is None:
        args.spsa_repeats = 1 if args.quick else min(args.repeats, 3)
    spec = args.memory_variants or (",".join(QUICK_MEMORY_VARIANTS) if args.quick else "all")
    if spec == "all":
        args.memory_variants = list(VARIANTS)
    elif spec == "none":
        args.memory_variants = []
    else:
        args.memory_variants = [v.strip() for v in spec.split(",") if v.strip()]
        bad = [v for v in args.memory_variants if v not in VARIANTS]
        if bad:
            parser.error(f"unknown memory variants {bad}; choose from {','.join(VARIANTS)}")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if args.measure_memory is not None:
        print(json.dumps(measure_memory(args)), flush=True)
        return []

    device = torch.device(args.device)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.malloc == "keep" and not keep_freed_memory():
        raise SystemExit("--malloc keep: mallopt is not available (glibc only)")

    results = []
    for name in args.models:
        machine = machine_info(device)
        log(f"[{name}] building and timing {len(VARIANTS)} variants, {args.repeats} rounds")
        workload = build_workload(name, quick=args.quick, device=device, seed=args.seed)
        steps = make_steps(workload, VARIANTS, spsa_n=args.spsa_n, seed=args.seed)
        samples, seen = time_interleaved(
            steps.calls,
            rounds=args.repeats,
            warmup=args.warmup,
            expensive_rounds=args.spsa_repeats,
            device=device,
            seed=args.seed,
            log=log,
        )
        notes = [f"warning during warm-up: {message}" for message in seen]
        description = workload.description
        skipped = dict(steps.skipped)
        del steps, workload
        gc.collect()
        memory: dict[str, dict[str, Any]] = {}
        to_measure = [v for v in args.memory_variants if v not in skipped]
        if to_measure:
            log(f"[{name}] peak memory of {','.join(to_measure)} (one subprocess each, {args.memory_jobs} at a time)")
            with ThreadPoolExecutor(max_workers=args.memory_jobs) as pool:
                children = list(pool.map(lambda variant: run_memory_child(name, variant, args), to_measure))
            for variant, measured in zip(to_measure, children):
                memory[variant] = {k: v for k, v in measured.items() if k not in ("model", "variant")}
                if "error" in measured:
                    notes.append(f"memory of {variant} failed: {measured['error']}")
        with contextlib.suppress(OSError, AttributeError):
            machine["load_average_end"] = list(os.getloadavg())
        settings = {
            "quick": args.quick,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "spsa_repeats": args.spsa_repeats,
            "memory_jobs": args.memory_jobs,
            "spsa_n": args.spsa_n,
            "spsa_report_loss": False,
            "fogzo": {"n": 1, "total_steps": FOGZO_TOTAL_STEPS, "beta_min": 0.999, "schedule": "linear"},
            "optimizer": f"AdamW(lr={LEARNING_RATE})",
            "quant_config": "QuantConfig(bits=2)",
            "seed": args.seed,
            "limit": "t(ste) + 2 t(forward_inference); one-sided: t(ste) + t(forward_inference)",
            "statistic": "median",
            "malloc": args.malloc,
        }
        result = summarize(name, samples, memory, skipped, description, settings, machine, notes)
        results.append(result)
        print_summary(result, print)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        log(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
