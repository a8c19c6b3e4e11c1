#!/usr/bin/env python
"""Where a FOGZO step's time goes: per-phase wall time, summed per step, median over steps.

Command lines (from the repository root, with the project's virtual environment)::

    python benchmarks/step_phases.py --model mlp --threads 1
    python benchmarks/step_phases.py --model llama-1m --steps 20 --threads 1 --one-sided
    python benchmarks/step_phases.py --model mlp --malloc keep      # glibc keeps freed memory

The models and batches are those of ``benchmarks/step_cost.py``. Each round runs a FOGZO
step, an STE step and an inference forward (``zero_grad`` + ``estimate`` + AdamW step,
as in ``step_cost.py``) on the same model; the estimator's internal methods are wrapped
with timers whose times are summed per step:

* ``closure``: every forward pass (the STE pass and the perturbed passes);
* ``guide``: ``ĝ`` from the STE gradient (``FOGZO._guide``: scales, norm, normalisation);
* ``perturbation``: building ``v`` (``FOGZO._perturbation``), which includes ``noise``;
* ``noise``: drawing the noise;
* ``guard``: snapshots and restores of buffers and the global RNG;
* ``resolve``: the step's one host read of its losses and differences;
* ``other``: the rest of ``estimate`` (backward pass for STE/FOGZO, the in-place shifts and
  their restores, ``G_W``, bookkeeping).

The wrappers cost a few microseconds per call; compare phases within one run.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_cost import BUILDERS, LEARNING_RATE, build_workload, keep_freed_memory  # noqa: E402

import fogzo  # noqa: E402
from fogzo.estimators import engine, perturbed_set, state  # noqa: E402
from fogzo.estimators import fogzo as fogzo_module  # noqa: E402

PHASES = {
    "guide": (fogzo_module.FOGZO, "_guide"),
    "perturbation": (fogzo_module.FOGZO, "_perturbation"),
    "resolve": (engine.ZerothOrderMeasurement, "resolve"),
    "noise": (perturbed_set.PerturbedSet, "noises"),
    "guard": (state.StateGuard, ("after_first_pass", "rewind", "close")),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mlp", choices=sorted(BUILDERS))
    parser.add_argument("--steps", type=int, default=200, help="timed rounds (after --warmup)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--one-sided", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--malloc", default="default", choices=["default", "keep"])
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.malloc == "keep" and not keep_freed_memory():
        raise SystemExit("--malloc keep: mallopt is not available (glibc only)")

    workload = build_workload(args.model, quick=False, device=torch.device("cpu"), seed=0, float_copy=False)
    model = workload.quantized
    assert model is not None
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    fogzo_estimator = fogzo.FOGZO(model, total_steps=10_000, n=1, one_sided=args.one_sided)
    ste_estimator = fogzo.STE(model)
    current: dict[str, float] = collections.defaultdict(float)
    record: dict[str, list[float]] = collections.defaultdict(list)

    def timed(function, label):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return function(*a, **k)
            finally:
                current[label] += time.perf_counter() - start

        return wrapper

    originals = []
    for label, (owner, names) in PHASES.items():
        for name in (names,) if isinstance(names, str) else names:
            originals.append((owner, name, getattr(owner, name)))
            setattr(owner, name, timed(getattr(owner, name), label))
    plain = workload.closure(model)
    closure = timed(plain, "closure")

    def step(estimator, label: str) -> None:
        current.clear()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        estimator.estimate(closure)
        middle = time.perf_counter()
        optimizer.step()
        end = time.perf_counter()
        current["estimate"] = middle - start
        current["optimizer"] = end - middle
        if rounds >= args.warmup:
            for key, value in current.items():
                record[f"{label}.{key}"].append(value)

    try:
        for rounds in range(args.warmup + args.steps):
            step(fogzo_estimator, "fogzo")
            step(ste_estimator, "ste")
            begin = time.perf_counter()
            with torch.inference_mode():
                plain()
            if rounds >= args.warmup:
                record["forward_inference"].append(time.perf_counter() - begin)
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)

    median = {key: 1e3 * statistics.median(values) for key, values in record.items()}
    fogzo_total = median["fogzo.estimate"] + median["fogzo.optimizer"]
    ste_total = median["ste.estimate"] + median["ste.optimizer"]
    forwards = 1 if args.one_sided else 2
    limit = ste_total + forwards * median["forward_inference"]
    named = sum(median.get(f"fogzo.{k}", 0.0) for k in ("closure", "guide", "perturbation", "guard", "resolve"))
    print(f"{args.model}, FOGZO {'one-sided' if args.one_sided else 'two-sided'} n=1, "
          f"{args.steps} steps, malloc {args.malloc}, threads {torch.get_num_threads()} (median ms per step)")
    print(f"  STE step {ste_total:8.3f}   inference forward {median['forward_inference']:8.3f}   "
          f"limit {limit:8.3f}   FOGZO step {fogzo_total:8.3f}   ratio {fogzo_total / limit:6.3f}")
    extra_passes = median["fogzo.closure"] - median["ste.closure"]
    print(f"  perturbed passes (closure time beyond the STE pass's) {extra_passes:8.3f}"
          f"   vs {forwards} inference forward(s) {forwards * median['forward_inference']:8.3f}")
    for key in ("guide", "perturbation", "noise", "guard", "resolve"):
        print(f"  {key:<10} {median.get(f'fogzo.{key}', 0.0):8.3f}")
    other = median["fogzo.estimate"] - named - (median["ste.estimate"] - median["ste.closure"])
    print(f"  other      {other:8.3f}   (estimate minus the phases above minus STE's backward and bookkeeping)")
    return median


if __name__ == "__main__":
    main(sys.argv[1:])
