"""Step cost of the STE controls against the STE and FOGZO (docs/method.md §8), on one thread.

The map's MLP (784-10-10, 2-bit identity STE, α = max), a fixed batch of 128, every parameter
perturbed as in the map's runs; 7 interleaved rounds of 100 ``estimate`` calls per estimator
(no optimizer step), the median of the last 6 rounds in ms per step.

    python benchmarks/controls_step_cost.py
"""

from __future__ import annotations

import statistics
import time

import torch

import fogzo
from fogzo.models import MLP


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    model = fogzo.quantize(MLP((784, 10, 10)), fogzo.QuantConfig(bits=2, ste="identity", alpha_init="max"))
    eps = fogzo.QuantConfig(bits=2).smoothing.eps_bar * 0.1
    estimators = {
        "STE": fogzo.STE(model),
        "smoothed-forward STE": fogzo.SmoothedForwardSTE(model, seed=0),
        "noise-matched STE": fogzo.NoiseMatchedSTE(model, total_steps=2000, perturb="all", eps=eps),
        "FOGZO (paper)": fogzo.FOGZO(model, total_steps=2000, perturb="all", eps=eps),
    }
    closure = lambda: torch.nn.functional.cross_entropy(model(x), y)
    times: dict[str, list[float]] = {name: [] for name in estimators}
    for _ in range(7):
        for name, estimator in estimators.items():
            started = time.perf_counter()
            for _ in range(100):
                model.zero_grad(set_to_none=True)
                estimator.estimate(closure)
            times[name].append((time.perf_counter() - started) * 10)  # ms per step
    ste = statistics.median(times["STE"][1:])
    for name, values in times.items():
        median = statistics.median(values[1:])
        print(f"{name}: {median:.2f} ms/step ({median / ste:.2f}× STE)")


if __name__ == "__main__":
    main()
