"""Run many ``mnist_ablation.py`` settings in parallel worker processes, JSON lines out.

    python experiments/run_grid.py GRID_NAME OUT.jsonl [--workers 2]

Grids are defined in ``GRIDS`` below; each entry is a list of command-line argument lists.
The runs go through the sweep driver (:func:`fogzo.train.sweep.run_sweep`): one archive line
per finished run (the script's JSON line, with its arguments as ``"key"``), appended as it
finishes; the same command again runs only what ``OUT.jsonl`` lacks.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from fogzo.train.sweep import run_sweep

SCRIPT = str(Path(__file__).with_name("mnist_ablation.py"))
LRS = ["3e-4", "1e-3", "3e-3", "1e-2"]
SEEDS = ["0", "1", "2"]


def _product(**axes: list[str]) -> list[list[str]]:
    keys = list(axes)
    runs = []
    for values in itertools.product(*(axes[k] for k in keys)):
        args = []
        for key, value in zip(keys, values):
            if value == "__flag__":
                args.append(f"--{key}")
            elif value != "__off__":
                args += [f"--{key}", value]
        runs.append(args)
    return runs


GRIDS = {
    # Baseline: the plain reading, per α rule, every lr, both estimators.
    "alpha": _product(estimator=["ste", "fogzo"], **{"alpha-init": ["max", "mse", "lsq"]}, lr=LRS, seed=SEEDS),
    # FOGZO's open choices at α = max, 2 seeds, Adam lr 1e-3 / 3e-3 (the STE / FOGZO optima).
    "knobs": (
        _product(estimator=["fogzo"], **{"beta-min": ["0.9999", "1.0"]}, lr=["1e-3", "3e-3"], seed=["0", "1"])
        + _product(estimator=["fogzo"], perturb=["quantized"], lr=["1e-3", "3e-3"], seed=["0", "1"])
        + _product(estimator=["fogzo"], **{"guide-norm": ["10", "0"]}, lr=["1e-3", "3e-3"], seed=["0", "1"])
        + _product(estimator=["fogzo"], **{"eps-bar": ["0.5774"]}, lr=["1e-3", "3e-3"], seed=["0", "1"])
    ),
    # The best knobs combined, 3 seeds, on the shared Adam lr grid.
    "tuned": _product(estimator=["fogzo"], **{"guide-norm": ["10"]}, **{"beta-min": ["0.999", "0.9999"]},
                      lr=LRS, seed=SEEDS),
    # Bit widths: sign and ternary against the 2-bit rows of "alpha" (α = max, Adam).
    "bits": _product(estimator=["ste", "fogzo"], bits=["1", "ternary"], lr=["1e-3", "3e-3"], seed=["0", "1"]),
    # SGD with momentum 0.9, both estimators on one lr grid.
    "sgd": _product(estimator=["ste", "fogzo"], optimizer=["sgd"], lr=["0.003", "0.01", "0.03", "0.1"], seed=["0", "1"]),
}


def run(args: list[str]) -> dict[str, Any]:
    """One ``mnist_ablation.py`` run in a child process; its last stdout line, parsed."""
    result = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"run {' '.join(args)} failed: {result.stderr[-500:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("grid", choices=sorted(GRIDS))
    parser.add_argument("out")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--extra", default="", help="extra arguments appended to every run")
    args = parser.parse_args()
    runs = [run + args.extra.split() for run in GRIDS[args.grid]]
    run_sweep(lambda done: runs, run, args.out, key=" ".join, workers=args.workers)


if __name__ == "__main__":
    main()
