#!/usr/bin/env python
"""Step cost of FOGZO against its theoretical limit, STE, n-SPSA and an unquantized step.

Command lines (from the repository root, with the project's virtual environment)::

    python benchmarks/step_cost.py                      # five models, CPU (long: tens of minutes on few cores)
    python benchmarks/step_cost.py --quick              # smoke run, under a minute: every code path, tiny sizes
    python benchmarks/step_cost.py --models mlp,llama-1m --repeats 20 --threads 8 --json step_cost.json
    python benchmarks/step_cost.py --ops-only --models mlp,resnet20,vit_tiny_cifar,llama-1m,llama-10m
    python benchmarks/step_cost.py --models tiny --repeats 200 --calls-per-sample 5 --memory-variants none
    python benchmarks/step_cost.py --models llama-1m --compile --quick   # torch.compile variants
    python benchmarks/step_cost.py --device cuda --json step_cost_cuda.json
    python benchmarks/step_cost.py --gpu-suite --json gpu_suite.json     # one GPU, <= 5 minutes
    python benchmarks/step_cost.py --gpu-suite --dry-run                 # the same suite on CPU, tiny sizes

This file is the command line and the per-model run; the models and step variants are in
``workloads.py``, the measurements in ``harness.py``, the ratios, JSON object and printed
table in ``step_cost_report.py``.

Models (``workloads.py``; weights quantized to 2 bits with ``fogzo.quantize(model,
fogzo.QuantConfig(bits=2), skip_first_last=True)``; the MLPs are quantized whole), each
trained on one fixed random batch: ``mlp``, ``resnet20``, ``vit_tiny_cifar``, ``llama-1m``,
``llama-10m`` (the default list), and opt-in ``llama-30m``/``llama-95m`` (the paper-size LMs:
8 × 512 tokens, bf16 autocast, fused AdamW where the device has it) and ``tiny`` (MLP
32-64-10 at batch 8: a step's wall time is Python and dispatcher overhead).

``--quick`` runs mlp, resnet20 and llama-1m at small sizes (override with ``--models``),
with 1 warm-up and 3 timed rounds, n = 8 for the n-SPSA(n) variants (timed once), and peak
memory of ``ste`` and ``fogzo`` only, two subprocesses at a time: every code path runs, but
the numbers mean little.

Variants timed for each model (one AdamW optimizer shared by all quantized variants; the
float step has its own model copy and AdamW):

* ``ste``               ``optimizer.zero_grad(); fogzo.STE(model).estimate(closure); optimizer.step()``
* ``forward_inference`` ``with torch.inference_mode(): closure()``
* ``forward_no_grad``   ``with torch.no_grad(): closure()``
* ``fogzo``             the STE line with ``fogzo.FOGZO(model, total_steps=10_000, n=1)`` (two-sided)
* ``fogzo_one_sided``   the same with ``one_sided=True``
* ``spsa_n1``           ``fogzo.SPSA(model, n=1, report_loss=False)`` (2 forwards, docs/method.md §5)
* ``spsa_looped``       n-SPSA with ``n = --spsa-n`` (64; quick 8), ``vectorize=None``: 2n forwards one by one
* ``spsa_batched``      the same with ``vectorize=n``: all 2n perturbed passes in ``torch.func.vmap``
                        chunks; skipped (null) for models with BatchNorm in training mode (ResNet),
                        which cannot be vmapped
* ``float_step``        the unquantized copy: ``zero_grad(); closure().backward(); optimizer.step()``
* with ``--compile``: ``ste_compiled``, ``forward_compiled``, ``fogzo_compiled``, ``float_compiled``,
  the same steps with the closure calling ``torch.compile(model)``

All forward passes run in training mode (BatchNorm uses batch statistics), as the perturbed
passes of a training step do; the FOGZO β schedule is the default linear one (step 0, where
β = 1 and no noise is drawn, falls in the warm-up).

Method (``harness.py``). All variants of one model are timed in the same process,
*interleaved*: after ``--warmup`` untimed rounds, each of ``--repeats`` rounds runs every
variant once in a freshly shuffled order (fixed seed), so slow drifts of the machine (other
processes, frequency scaling, thermal state) hit every variant alike. The expensive
n-SPSA(64) variants take part in only ``--spsa-repeats`` rounds, spread evenly. Each call is
timed with ``time.perf_counter`` (with ``torch.cuda.synchronize()`` before and after on
CUDA), Python's garbage collector is run between calls and disabled inside them, and the
*median* per variant is reported (the interquartile range and all samples go to the JSON).

The *limit* is the theoretical minimum of a FOGZO step: one STE step (forward, backward and
optimizer step) plus two inference-mode forward passes (one for the one-sided variant). So::

    fogzo_over_limit     = t(fogzo)           / (t(ste) + 2·t(forward_inference))
    one_sided_over_limit = t(fogzo_one_sided) / (t(ste) + t(forward_inference))
    fogzo_over_ste       = t(fogzo) / t(ste)                (docs/method.md §5 cost units: 5/3 at n = 1)
    quantizer_overhead   = t(ste) / t(float_step)           (STE quantized / float step)
    spsa_batched_speedup = t(spsa_looped) / t(spsa_batched)
    peak_memory_ratio    = Δpeak(fogzo) / Δpeak(ste)

Operator counts (``op_counts``; ``harness.count_ops``): one profiled call of ``ste``,
``float_step``, ``fogzo``, ``fogzo_one_sided`` and ``forward_inference`` after the timing
(``--ops-only``: after three warm-up rounds, no timing), as top-level aten operators
(``ops``), innermost computing operators (``kernels``) and host syncs. They are
deterministic, so on a shared CPU they are the proxy for launch-bound GPU overhead, with the
targets of issue 12: ``ste / float_step ≤ 1.2`` and ``fogzo / (ste + 2·forward_inference) ≤
1.1`` (``op_targets`` in the JSON says whether each is met).

With ``--compile`` the compiled variants are also reported: ``compile_seconds`` (the first,
compiling call of each), ``graph_breaks`` and ``unique_graphs`` (dynamo's counters over the
compiled variants' warm-up and timed calls) and ``explain`` (``torch._dynamo.explain`` of the
quantized model's forward: graph and graph-break counts, break reasons).

On CUDA, ``kernel_profile`` gives the summed kernel time against wall time of 3 STE and 3
FOGZO steps (``busy`` = kernel / wall; issue 12's target is ≥ 0.8 for LLaMA-30M FOGZO).

Peak memory is measured per variant in a *separate process* (the script re-invokes itself
with the hidden ``--measure-memory VARIANT --model NAME``): build the model, run one warm-up
STE step (the float step for ``float_step``; this creates gradients and the AdamW state) and
one call of the variant, then take the baseline and run the variant once more. Δpeak is the
peak during that call minus the baseline. On CPU the peak is the resident-set high-water
mark (``VmHWM`` after ``malloc_trim`` and a ``clear_refs`` reset, minus ``VmRSS``: see
``harness.peak_of_call``); children run with ``MALLOC_MMAP_THRESHOLD_=131072`` (unless set)
so that RSS follows the live tensors. On CUDA it is ``torch.cuda.max_memory_allocated()``
after ``reset_peak_memory_stats()``, over ``torch.cuda.memory_allocated()``;
``--memory-mode inprocess`` measures there in the benchmark's own process (clean on CUDA,
what ``--gpu-suite`` does).

``--gpu-suite``: the GPU table of issue 12 in one command (``--device cuda``): every model
including the paper-size LMs, the variants ``ste``, ``forward_inference``, ``fogzo``,
``fogzo_one_sided``, ``float_step``, 7 rounds, operator counts, peak memory in-process,
kernel/wall profiles, and ``--compile`` for ``llama-30m``; it stops starting new work after
``--budget-s`` (270 s) and writes the JSON after every model. ``--dry-run`` runs the same
suite on the CPU at quick sizes with one round (a smoke test of every path).

``--json PATH`` writes a list with one object per model. Keys always present:
``model``, ``fogzo_over_limit``, ``one_sided_over_limit``, ``fogzo_over_ste``,
``peak_memory_ratio``, ``spsa_batched_speedup`` (positive floats, or null where not
measured). Extra keys: ``one_sided_over_ste``, ``fogzo_over_limit_no_grad``,
``quantizer_overhead``, ``peak_memory_total_ratio``, ``fogzo_overhead_ms`` and
``one_sided_overhead_ms``, ``times_ms`` (medians; null for a skipped variant),
``times_ms_iqr``, ``times_ms_samples``, ``memory``, ``op_counts``, ``op_ratios``,
``op_targets``, ``compile``, ``kernel_profile``, ``skipped``, ``workload``, ``settings``,
``notes`` and ``machine`` (torch version, threads, CPU model, device, load averages).

Allocator (``--malloc``). With glibc's default settings, freeing a large tensor at the top
of the heap returns its pages to the OS and the next allocation faults them back in; on a
CPU a step that keeps more buffers alive pays for this in page faults. ``--malloc keep``
sets ``mallopt`` so that freed memory stays in the process (what jemalloc/tcmalloc do);
the memory children always run with the defaults.

Timings are never asserted anywhere: a busy machine gives noisy numbers; read the load
average in the JSON before trusting a run. On a machine whose cores are shared with other
work, pass ``--threads 1``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from harness import (  # noqa: E402
    compile_warmup,
    count_ops,
    dynamo_counters,
    keep_freed_memory,
    kernel_profile,
    machine_info,
    participation,
    peak_of_call,
    ratio,
    time_interleaved,
)
from step_cost_report import OP_TARGETS, REQUIRED_KEYS, print_summary, summarize  # noqa: E402
from workloads import (  # noqa: E402
    ALL_MODELS,
    BUILDERS,
    COMPILED_VARIANTS,
    EXPENSIVE,
    FOGZO_TOTAL_STEPS,
    LEARNING_RATE,
    MODELS,
    NOISE_VARIANTS,
    QUICK_MODELS,
    VARIANTS,
    Steps,
    Workload,
    build_workload,
    compiled_factory,
    explain_forward,
    has_training_batchnorm,
    make_steps,
)

__all__ = [
    "BUILDERS", "EXPENSIVE", "LEARNING_RATE", "MODELS", "OP_TARGETS", "REQUIRED_KEYS", "VARIANTS", "Steps",
    "Workload", "build_workload", "has_training_batchnorm", "keep_freed_memory", "main", "make_steps",
    "participation", "ratio", "summarize",
]

QUICK_MEMORY_VARIANTS = ("ste", "fogzo")
OP_VARIANTS = ("ste", "forward_inference", "fogzo", "fogzo_one_sided", "float_step", *NOISE_VARIANTS)
SUITE_VARIANTS = ("ste", "forward_inference", "fogzo", "fogzo_one_sided", "float_step")
SUITE_MODELS = ("mlp", "resnet20", "vit_tiny_cifar", "llama-1m", "llama-10m", "llama-30m", "llama-95m", "tiny")
SUITE_COMPILE_MODELS = ("llama-30m",)
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


# -------------------------------------------------------------------------------- memory


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
    return {"model": args.model, "variant": variant, **_warm_peak(steps, variant, device)}


def _warm_peak(steps: Steps, variant: str, device: torch.device) -> dict[str, Any]:
    call = steps.calls[variant]
    assert steps.warmup_step is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steps.warmup_step()  # gradients and optimizer state exist from here on
        call()  # one-time allocations of the variant itself
        return peak_of_call(call, device)


def run_memory_child(model: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--measure-memory", variant, "--model", model,
        "--device", args.device, "--threads", str(torch.get_num_threads()), "--spsa-n", str(args.spsa_n),
        "--seed", str(args.seed),
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


# --------------------------------------------------------------------------- op counts


def count_variants(steps: Steps, variants: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {v: count_ops(steps.calls[v], top=12) for v in variants if v in steps.calls}


# ------------------------------------------------------------------------------- summary


# ---------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats: under a minute")
    parser.add_argument("--models", default=None, help=f"comma-separated, from {','.join(ALL_MODELS)}")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated, from {','.join(VARIANTS + NOISE_VARIANTS)} (default: the first {len(VARIANTS)})")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default cpu (--gpu-suite: cuda)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds R (default 10; quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 2; quick 1)")
    parser.add_argument(
        "--spsa-repeats", type=int, default=None, help="rounds for the n-SPSA(n) variants (default min(R, 3); quick 1)"
    )
    parser.add_argument("--spsa-n", type=int, default=None, help="n of the looped/batched n-SPSA variants (64; quick 8)")
    parser.add_argument("--calls-per-sample", type=int, default=1, help="calls averaged per timing sample (tiny steps)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--memory-variants",
        default=None,
        help="'all', 'none' or a comma list of variants for the memory measurement (default all; quick: ste,fogzo)",
    )
    parser.add_argument("--memory-mode", default="subprocess", choices=["subprocess", "inprocess"])
    parser.add_argument("--ops-only", action="store_true", help="operator counts only (no timing, no memory)")
    parser.add_argument("--no-ops", action="store_true", help="skip the operator counts")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model) variants")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)")
    parser.add_argument("--gpu-suite", action="store_true", help="issue 12's GPU table in one run (see docstring)")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu-suite: on CPU, quick sizes, one round")
    parser.add_argument("--budget-s", type=float, default=None, help="start no new model after this (suite: 270)")
    parser.add_argument("--lm-batch", type=int, default=None, help="override the LMs' batch size")
    parser.add_argument("--lm-seq", type=int, default=None, help="override the LMs' sequence length")
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
    if args.dry_run and not args.gpu_suite:
        parser.error("--dry-run goes with --gpu-suite")
    if args.gpu_suite:
        _apply_suite(args)
    args.device = args.device or "cpu"
    if args.spsa_n is None:
        args.spsa_n = 8 if args.quick else 64
    if args.memory_jobs is None:
        args.memory_jobs = 2 if args.quick else 1
    if args.spsa_n < 1 or args.memory_jobs < 1 or args.calls_per_sample < 1:
        parser.error("--spsa-n, --memory-jobs and --calls-per-sample must be >= 1")
    if args.measure_memory is not None:
        if args.model not in ALL_MODELS or args.measure_memory not in VARIANTS:
            parser.error("--measure-memory needs a known VARIANT and --model NAME")
        return args
    names = args.models.split(",") if isinstance(args.models, str) else list(args.models or ())
    names = [name.strip() for name in names if name.strip()] or list(QUICK_MODELS if args.quick else MODELS)
    unknown = [name for name in names if name not in ALL_MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {','.join(ALL_MODELS)}")
    args.models = names
    variants = args.variants.split(",") if isinstance(args.variants, str) else list(args.variants or VARIANTS)
    variants = [v.strip() for v in variants if v.strip()]
    bad = [v for v in variants if v not in VARIANTS + NOISE_VARIANTS]
    if bad:
        parser.error(f"unknown variants {bad}; choose from {','.join(VARIANTS + NOISE_VARIANTS)}")
    args.variants = variants
    args.repeats = args.repeats if args.repeats is not None else (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.repeats < 1 or args.warmup < 1:
        parser.error("--repeats and --warmup must be >= 1 (warm-up also skips the FOGZO step 0, where β = 1)")
    if args.spsa_repeats is None:
        args.spsa_repeats = 1 if args.quick else min(args.repeats, 3)
    spec = args.memory_variants or (",".join(QUICK_MEMORY_VARIANTS) if args.quick else "all")
    if args.ops_only or spec == "none":
        args.memory_variants = []
    elif spec == "all":
        args.memory_variants = list(variants)
    else:
        args.memory_variants = [v.strip() for v in spec.split(",") if v.strip()]
        bad = [v for v in args.memory_variants if v not in VARIANTS]
        if bad:
            parser.error(f"unknown memory variants {bad}; choose from {','.join(VARIANTS)}")
    return args


def _apply_suite(args: argparse.Namespace) -> None:
    """The ``--gpu-suite`` preset (explicit options still win)."""
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    args.models = args.models or list(SUITE_MODELS)
    args.variants = args.variants or list(SUITE_VARIANTS)
    args.quick = args.quick or args.dry_run
    args.repeats = args.repeats or (1 if args.dry_run else 7)
    args.warmup = args.warmup or (1 if args.dry_run else 2)
    args.memory_variants = args.memory_variants or "ste,fogzo"
    args.memory_mode = "inprocess"
    args.budget_s = args.budget_s if args.budget_s is not None else 270.0
    args.suite_compile = list(SUITE_COMPILE_MODELS)


def run_model(name: str, args: argparse.Namespace, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    machine = machine_info(device)
    notes: list[str] = []
    extra: dict[str, Any] = {}
    sizes = {k: v for k, v in (("batch", args.lm_batch), ("seq_len", args.lm_seq)) if v is not None}
    workload = build_workload(name, quick=args.quick, device=device, seed=args.seed, sizes=sizes)
    with_compile = args.compile or name in getattr(args, "suite_compile", ())
    variants = list(args.variants)
    if with_compile:
        variants += list(COMPILED_VARIANTS)
    compiled = compiled_factory(args.compile_backend) if with_compile else None
    if with_compile:
        import torch._dynamo

        torch._dynamo.reset()
        from torch._dynamo.utils import counters

        counters.clear()
    steps = make_steps(workload, variants, spsa_n=args.spsa_n, seed=args.seed, compiled=compiled)
    if with_compile:
        log(f"[{name}] compiling ({', '.join(v for v in COMPILED_VARIANTS if v in steps.calls)})")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert steps.warmup_step is not None
            steps.warmup_step()  # the FOGZO step 0 (β = 1) must not be the compiled variants' first
            extra["compile"] = {"seconds": compile_warmup(steps.calls, COMPILED_VARIANTS, device)}
    samples: dict[str, list[float]] = {}
    if args.ops_only:
        log(f"[{name}] operator counts (after {max(args.warmup, 3)} warm-up rounds)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(max(args.warmup, 3)):  # (compiled kernels settle in the first rounds)
                for variant in steps.calls:
                    steps.calls[variant]()
    else:
        log(f"[{name}] timing {len(steps.calls)} variants, {args.repeats} rounds")
        samples, seen = time_interleaved(
            steps.calls, rounds=args.repeats, warmup=args.warmup, expensive_rounds=args.spsa_repeats,
            device=device, seed=args.seed, log=log, expensive=EXPENSIVE, calls_per_sample=args.calls_per_sample,
        )
        notes += [f"warning during warm-up: {message}" for message in seen]
    op_counts = None
    if not args.no_ops:
        op_counts = count_variants(steps, [v for v in (*OP_VARIANTS, *COMPILED_VARIANTS) if v in steps.calls])
    if with_compile:
        extra["compile"].update(dynamo_counters())
        with contextlib.suppress(Exception):
            extra["compile"]["explain"] = explain_forward(workload)
    if device.type == "cuda" or getattr(args, "gpu_suite", False):
        extra["kernel_profile"] = {v: kernel_profile(steps.calls[v], device) for v in ("ste", "fogzo") if v in steps.calls}
    description = workload.description
    skipped = dict(steps.skipped)
    memory: dict[str, dict[str, Any]] = {}
    to_measure = [v for v in args.memory_variants if v not in skipped and v in VARIANTS]
    if to_measure and args.memory_mode == "inprocess":
        log(f"[{name}] peak memory of {','.join(to_measure)} (in this process)")
        for variant in to_measure:
            if variant in steps.calls:
                memory[variant] = _warm_peak(steps, variant, device)
    del steps, workload
    gc.collect()
    if to_measure and args.memory_mode == "subprocess":
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
        "quick": args.quick, "repeats": args.repeats, "warmup": args.warmup, "spsa_repeats": args.spsa_repeats,
        "memory_jobs": args.memory_jobs, "memory_mode": args.memory_mode, "spsa_n": args.spsa_n,
        "spsa_report_loss": False, "calls_per_sample": args.calls_per_sample, "ops_only": args.ops_only,
        "compile": with_compile, "compile_backend": args.compile_backend if with_compile else None, "gpu_suite": getattr(args, "gpu_suite", False), "dry_run": args.dry_run,
        "fogzo": {"n": 1, "total_steps": FOGZO_TOTAL_STEPS, "beta_min": 0.999, "schedule": "linear"},
        "optimizer": f"AdamW(lr={LEARNING_RATE})", "quant_config": "QuantConfig(bits=2)", "seed": args.seed,
        "limit": "t(ste) + 2 t(forward_inference); one-sided: t(ste) + t(forward_inference)",
        "statistic": "median", "malloc": args.malloc,
    }
    return summarize(name, samples, memory, skipped, description, settings, machine, notes, op_counts, extra)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available (use --gpu-suite --dry-run to try the suite on a CPU)")
    if args.measure_memory is not None:
        print(json.dumps(measure_memory(args)), flush=True)
        return []
    device = torch.device(args.device)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.malloc == "keep" and not keep_freed_memory():
        raise SystemExit("--malloc keep: mallopt is not available (glibc only)")

    started = time.perf_counter()
    results = []
    path = Path(args.json) if args.json else None
    for name in args.models:
        if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
            log(f"[{name}] skipped: the time budget of {args.budget_s:.0f} s is spent")
            continue
        result = run_model(name, args, device, log)
        results.append(result)
        print_summary(result, print)
        if path is not None:  # after every model, so that a run cut short keeps what it measured
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2) + "\n")
    if path is not None:
        log(f"wrote {path} ({time.perf_counter() - started:.0f} s)")
    return results


if __name__ == "__main__":
    main()
