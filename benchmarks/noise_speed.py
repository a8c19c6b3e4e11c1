#!/usr/bin/env python
"""Noise generation speed: block-seeded torch generators against the counter-based stream.

Command line (from the repository root)::

    python benchmarks/noise_speed.py --threads 1 --sizes 262144,1048576 --json docs/data/noise_speed.json

For each size and law, the median time per element of ``block_noise`` (``noise_stream="blocks"``,
torch's ``uniform_``/``normal_`` per block of 2^18 elements), ``counter_noise`` in eager mode
and ``counter_noise(compiled=True)`` (one kernel made by ``torch.compile``; its first call,
which compiles, is reported as ``compile_s``). Both counter variants must return the same
numbers (checked here, bit for bit for the uniform and triangular laws).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fogzo.estimators import noise
from fogzo.smoothing import Smoothing


def per_element_ns(call, count: int, repeats: int) -> float:
    call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e9 / count


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="262144,1048576")
    parser.add_argument("--laws", default="uniform,gaussian")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device), "rows": []}
    generator = torch.Generator(device=device)
    for law in args.laws.split(","):
        smoothing = Smoothing(law, 0.5)
        for count in (int(size) for size in args.sizes.split(",")):
            key = (1, 0, 2, 0)

            def run(fn):
                def call():
                    fn()
                    sync()
                return call

            blocks = run(lambda: noise.block_noise(smoothing, key, (count,), device, torch.float32,
                                                          generator=generator))
            eager = run(lambda: noise.counter_noise(smoothing, key, (count,), device, torch.float32))
            compiled = run(lambda: noise.counter_noise(smoothing, key, (count,), device, torch.float32,
                                                              compiled=True))
            start = time.perf_counter()
            compiled()
            compile_s = time.perf_counter() - start
            same = torch.equal(
                noise.counter_noise(smoothing, key, (count,), device, torch.float32),
                noise.counter_noise(smoothing, key, (count,), device, torch.float32, compiled=True),
            )
            row = {
                "law": law, "elements": count, "compile_s": compile_s, "counter_compiled_equals_eager": same,
                "ns_per_element": {
                    "blocks": per_element_ns(blocks, count, args.repeats),
                    "counter_eager": per_element_ns(eager, count, args.repeats),
                    "counter_compiled": per_element_ns(compiled, count, args.repeats),
                },
            }
            results["rows"].append(row)
            ns = row["ns_per_element"]
            print(f"{law:<10}{count:>10}  blocks {ns['blocks']:6.2f}  counter eager {ns['counter_eager']:6.2f}  "
                  f"compiled {ns['counter_compiled']:6.2f} ns/element  (same numbers: {same})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
