#!/usr/bin/env python
"""Two versions of fogzo side by side in one process: operator counts and time per step.

Command lines (from the repository root; ``/tmp/before/src`` holds an older checkout's
``src``, e.g. ``git archive <commit> src | tar -x -C /tmp/before``)::

    python benchmarks/compare_trees.py --before /tmp/before/src --ops-models mlp,resnet20,vit_tiny_cifar,llama-1m,llama-10m
    python benchmarks/compare_trees.py --before /tmp/before/src --time-models tiny --repeats 300 --calls-per-sample 5

The older package is imported as ``fogzo_before`` next to this tree's ``fogzo`` (relative
imports keep each package to its own files), and both build the same workloads
(``workloads.py``, same seeds, hence the same weights and batches). ``--ops-models``: the
operator counts of ``harness.count_ops`` (deterministic) for each tree and model.
``--time-models``: the variants of *both* trees timed in one interleaved run (shuffled
rounds, medians: ``harness.time_interleaved``), so the machine's load hits both alike; with
the ``tiny`` model a step's wall time is its Python and dispatcher overhead. The summary
gives, per tree, the ratios STE / float and FOGZO / (STE + 2·forward) and, per variant, the
ratio after / before.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import fogzo  # noqa: E402
from harness import count_ops, machine_info, quartiles, ratio, time_interleaved, total  # noqa: E402
from workloads import ALL_MODELS, build_workload, make_steps  # noqa: E402

VARIANTS = ("ste", "forward_inference", "fogzo", "fogzo_one_sided", "float_step")


def load_tree(src: Path, name: str = "fogzo_before") -> ModuleType:
    """The ``fogzo`` package under ``src`` imported as ``name``."""
    package = src / "fogzo"
    if not (package / "__init__.py").is_file():
        raise SystemExit(f"--before {src}: no fogzo/__init__.py there (pass the src directory of a checkout)")
    spec = importlib.util.spec_from_file_location(name, package / "__init__.py", submodule_search_locations=[str(package)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def steps_for(lib: ModuleType, model: str, args: argparse.Namespace) -> dict[str, Any]:
    sizes = {k: v for k, v in (("batch", args.lm_batch), ("seq_len", args.lm_seq)) if v is not None}
    workload = build_workload(model, quick=args.quick, device=torch.device("cpu"), seed=args.seed, lib=lib,
                              sizes=sizes)
    return make_steps(workload, VARIANTS, spsa_n=2, seed=args.seed, lib=lib).calls


def op_ratios(counts: dict[str, dict[str, int]]) -> dict[str, float | None]:
    get = lambda v: counts[v]["ops"]  # noqa: E731
    return {
        "ste_over_float": ratio(get("ste"), get("float_step")),
        "fogzo_over_limit": ratio(get("fogzo"), total(get("ste"), get("forward_inference"), get("forward_inference"))),
        "one_sided_over_limit": ratio(get("fogzo_one_sided"), total(get("ste"), get("forward_inference"))),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, type=Path, help="src directory of the older tree")
    parser.add_argument("--ops-models", default="", help=f"comma list from {','.join(ALL_MODELS)}")
    parser.add_argument("--time-models", default="", help="comma list (tiny: Python time per step)")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--calls-per-sample", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="the workloads' small sizes")
    parser.add_argument("--lm-batch", type=int, default=None, help="override the LMs' batch size")
    parser.add_argument("--lm-seq", type=int, default=None, help="override the LMs' sequence length")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    before = load_tree(args.before.resolve())
    trees = {"before": before, "after": fogzo}
    result: dict[str, Any] = {"machine": machine_info(torch.device("cpu")), "before_src": str(args.before),
                              "ops": {}, "time": {}}
    for model in [m for m in args.ops_models.split(",") if m]:
        result["ops"][model] = {}
        for tree, lib in trees.items():
            calls = steps_for(lib, model, args)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(2):  # warm-up; the FOGZO step 0 (β = 1) is not counted
                    for call in calls.values():
                        call()
            counts = {v: count_ops(calls[v]) for v in VARIANTS}
            result["ops"][model][tree] = {"counts": counts, "ratios": op_ratios(counts)}
        print_ops(model, result["ops"][model])
    for model in [m for m in args.time_models.split(",") if m]:
        calls = {f"{tree}:{v}": c for tree, lib in trees.items() for v, c in steps_for(lib, model, args).items()}
        samples, _ = time_interleaved(
            calls, rounds=args.repeats, warmup=args.warmup, expensive_rounds=0, device=torch.device("cpu"),
            seed=args.seed, log=lambda message: print(message, file=sys.stderr), calls_per_sample=args.calls_per_sample,
        )
        median = {k: statistics.median(s) * 1e6 for k, s in samples.items()}
        iqr = {k: [q * 1e6 for q in quartiles(s)] for k, s in samples.items()}
        entry: dict[str, Any] = {"median_us": median, "iqr_us": iqr, "repeats": args.repeats,
                                 "calls_per_sample": args.calls_per_sample}
        for tree in trees:
            t = {v: median[f"{tree}:{v}"] for v in VARIANTS}
            entry[tree] = {
                "ste_over_float": ratio(t["ste"], t["float_step"]),
                "fogzo_over_limit": ratio(t["fogzo"], t["ste"] + 2 * t["forward_inference"]),
                "one_sided_over_limit": ratio(t["fogzo_one_sided"], t["ste"] + t["forward_inference"]),
            }
        entry["after_over_before"] = {v: ratio(median[f"after:{v}"], median[f"before:{v}"]) for v in VARIANTS}
        result["time"][model] = entry
        print_time(model, entry)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def print_ops(model: str, entry: dict[str, Any]) -> None:
    print(f"\n== {model}: operator counts per step (top-level aten ops / kernels) ==")
    print(f"  {'variant':<18}" + "".join(f"{tree:>18}" for tree in entry))
    for variant in VARIANTS:
        row = "".join(f"{entry[t]['counts'][variant]['ops']:>10} /{entry[t]['counts'][variant]['kernels']:>6}" for t in entry)
        print(f"  {variant:<18}{row}")
    for key in ("ste_over_float", "fogzo_over_limit", "one_sided_over_limit"):
        print(f"  {key:<24}" + "".join(f"{entry[t]['ratios'][key]:>12.3f}" for t in entry))


def print_time(model: str, entry: dict[str, Any]) -> None:
    print(f"\n== {model}: median µs per step, both trees interleaved ==")
    for variant in VARIANTS:
        before, after = entry["median_us"][f"before:{variant}"], entry["median_us"][f"after:{variant}"]
        print(f"  {variant:<18}{before:>10.1f}{after:>10.1f}   after/before {after / before:.3f}")
    for key in ("ste_over_float", "fogzo_over_limit", "one_sided_over_limit"):
        print(f"  {key:<24}{entry['before'][key]:>10.3f}{entry['after'][key]:>10.3f}")


if __name__ == "__main__":
    main()
