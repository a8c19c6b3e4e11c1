#!/usr/bin/env python
"""Host overhead of a FOGZO step on the paper's own model, side by side with its minimum.

The 784-10-10 MLP of the paper (2-bit weights, identity STE, batch 128, Adam), one thread:
its forward is so small that a step's time is mostly Python and operator dispatch — what a
GPU step costs when it is launch-bound. Timed in one process, interleaved (each round runs
every variant once, in a shuffled order), median of the rounds::

    python benchmarks/host_overhead.py                 # 200 rounds, about a minute
    python benchmarks/host_overhead.py --rounds 20     # a smoke run
    python benchmarks/host_overhead.py --phases        # also: where a FOGZO step's time goes

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


def phases(rounds: int) -> dict[str, float]:
    """Median µs per FOGZO (``perturb="quantized"``) step spent in each phase, timed by wrapping
    the engine's methods for the duration of this call; the rest is the STE pass's forward, the
    gradient's last operators, ``estimate``'s bookkeeping and the Adam step."""
    from fogzo.estimators import engine, fogzo as fogzo_module, perturbed_set, state

    wrapped = {
        "call state (CallState)": (state.CallState, "__init__"),
        "STE backward": (fogzo_module, "run_backward"),
        "guide (c·g, norms, normalise)": (fogzo_module.FOGZO, "_guide"),
        "RNG/buffer guard after STE pass": (state.StateGuard, "after_first_pass"),
        "noise draw and add": (perturbed_set.PerturbedSet, "add_noise_"),
        "backup of W": (engine.Passes, "__enter__"),
        "2 perturbed passes (shift + forward)": (engine.Passes, "_loss_at"),
        "finite difference, d·v": (engine.Passes, "_record"),
        "restore of W": (engine.Passes, "__exit__"),
        "host read and checks (resolve)": (engine.ZerothOrderMeasurement, "resolve"),
    }
    spent = dict.fromkeys(wrapped, 0.0)
    originals = {name: getattr(owner, attribute) for name, (owner, attribute) in wrapped.items()}

    def timed(name, function):
        def call(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - begin
        return call

    step = build("quantized")[0]
    per_round: dict[str, list[float]] = {name: [] for name in [*wrapped, "FOGZO step (wrapped)"]}
    try:
        for name, (owner, attribute) in wrapped.items():
            setattr(owner, attribute, timed(name, originals[name]))
        for index in range(rounds + 3):
            for name in spent:
                spent[name] = 0.0
            begin = time.perf_counter()
            step()
            total = time.perf_counter() - begin
            if index >= 3:  # warm-up
                for name in wrapped:
                    per_round[name].append(spent[name])
                per_round["FOGZO step (wrapped)"].append(total)
    finally:
        for name, (owner, attribute) in wrapped.items():
            setattr(owner, attribute, originals[name])
    return {name: 1e6 * statistics.median(values) for name, values in per_round.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--phases", action="store_true",
                        help="also time the phases of a FOGZO (quantized) step (each wrapped: ~1 us added per phase)")
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
    if args.phases:
        result["phases_us"] = phases(args.rounds)
        for name, us in result["phases_us"].items():
            print(f"  {name:34s} {us:7.1f} us")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=1)
    return result


if __name__ == "__main__":
    main()
