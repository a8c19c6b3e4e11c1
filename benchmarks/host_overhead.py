#!/usr/bin/env python
"""Host overhead of a FOGZO step on the paper's own model, side by side with its minimum.

The 784-10-10 MLP of the paper (2-bit weights, identity STE, batch 128, Adam), one thread:
its forward is so small that a step's time is mostly Python and operator dispatch — what a
GPU step costs when it is launch-bound. Timed in one process, interleaved (each round runs
every variant once, in a shuffled order), median of the rounds::

    python benchmarks/host_overhead.py                 # 200 rounds, about a minute
    python benchmarks/host_overhead.py --rounds 20     # a smoke run

Printed: ms per call of the STE step (zero_grad + estimate + Adam step), an inference forward,
and FOGZO steps with ``perturb="quantized"`` and ``"all"``; the ratios FOGZO / (STE + 2
forwards) (the issue's target: <= 1.2) and FOGZO / STE; Python function calls per step
(``sys.setprofile``), the host-overhead proxy that does not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import fogzo


def build(perturb: str | None):
    torch.manual_seed(0)
    model = fogzo.quantize(nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.ReLU(), nn.Linear(10, 10)),
                           fogzo.QuantConfig(bits=2, ste="identity"))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if perturb is None:
        estimator = fogzo.STE(model)
    else:
        estimator = fogzo.FOGZO(model, total_steps=10**9, beta_min=0.999, seed=0, perturb=perturb,
                                eps=0.05)
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 1, 28, 28, generator=generator), torch.randint(0, 10, (128,), generator=generator)

    def closure():
        return F.cross_entropy(model(x), y)

    def step():
        optimizer.zero_grad(set_to_none=True)
        estimator.estimate(closure)
        optimizer.step()

    def forward():
        with torch.inference_mode():
            closure()

    return step, forward


def python_calls(function) -> int:
    count = 0

    def profiler(frame, event, arg):
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(profiler)
    try:
        function()
    finally:
        sys.setprofile(None)
    return count


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    torch.set_num_threads(1)
    ste, forward = build(None)
    variants = {"ste": ste, "forward": forward, "fogzo_quantized": build("quantized")[0], "fogzo_all": build("all")[0]}
    for function in variants.values():  # warm-up (the first FOGZO step has β = 1 and one-time checks)
        for _ in range(3):
            function()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    shuffle = random.Random(0)
    for _ in range(args.rounds):
        shuffle.shuffle(order)
        for name in order:
            begin = time.perf_counter()
            variants[name]()
            samples[name].append(time.perf_counter() - begin)
    ms = {name: 1e3 * statistics.median(values) for name, values in samples.items()}
    minimum = ms["ste"] + 2 * ms["forward"]
    result = {
        "ms": ms,
        "fogzo_over_minimum": {k: ms[f"fogzo_{k}"] / minimum for k in ("quantized", "all")},
        "fogzo_over_ste": {k: ms[f"fogzo_{k}"] / ms["ste"] for k in ("quantized", "all")},
        "python_calls": {name: python_calls(function) for name, function in variants.items()},
        "rounds": args.rounds,
        "torch": torch.__version__,
    }
    for name in variants:
        print(f"{name:16s} {ms[name]:7.3f} ms   {result['python_calls'][name]:5d} Python calls")
    for kind in ("quantized", "all"):
        print(f"FOGZO ({kind}) / (STE + 2 forwards) = {result['fogzo_over_minimum'][kind]:.2f}   "
              f"FOGZO / STE = {result['fogzo_over_ste'][kind]:.2f}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=1)
    return result


if __name__ == "__main__":
    main()
