"""Does the noise-matched STE's noise match FOGZO's random part on the real, quantized MLP?

docs/method.md §8 matches the noise under the first-order model ``d = vᵀg_x``; on a quantized
loss the finite difference ``d`` measures the smoothed loss instead, so ``E[d²]`` may differ from
the model's ``(β r² + 1 − β)‖g_x‖²``. On one MNIST batch of 128 at the initial weights of the
map's MLP (784-10-10, α = max), with β = β_min = 0.999 and the paper's reading (‖ĝ‖ = 1, every
parameter perturbed), this draws ``samples`` FOGZO and noise-matched estimates and prints, per
setting, one JSON line: the mean over coordinates of each estimator's per-coordinate variance
(FOGZO: of ``G − mean(G)``; the control: of ``G − g_STE``), their ratio, and ``E[d²]`` over the
model's prediction.

    python experiments/controls_match.py --samples 400
"""

from __future__ import annotations

import argparse
import json

import torch

import fogzo
from fogzo.data import MNIST_MEAN, MNIST_STD, load_mnist, to_float
from fogzo.models import MLP

SETTINGS = [(2, "identity"), ("ternary", "identity"), (1, "identity"), (1, "hardtanh"), (1, "tanh"), (1, "approxsign")]


def measure(bits, ste: str, samples: int, beta: float = 0.999) -> dict:
    torch.set_num_threads(1)
    data = load_mnist()
    index = torch.randperm(60_000, generator=torch.Generator().manual_seed(0))[:128]
    x = to_float(data.train_images[index], MNIST_MEAN, MNIST_STD).reshape(-1, 784)
    y = data.train_labels[index]
    torch.manual_seed(0)
    config = fogzo.QuantConfig(bits=bits, ste=ste, alpha_init="max")
    model = fogzo.quantize(MLP((784, 10, 10)), config)
    layers = [layer for _, layer in fogzo.quantized_layers(model)]
    mean_alpha = sum(float(layer.weight_quantizer.alpha.mean()) for layer in layers) / len(layers)
    eps = config.smoothing.eps_bar * mean_alpha  # as in smoothed_study.run
    closure = lambda: torch.nn.functional.cross_entropy(model(x), y)
    params = [p for p in model.parameters() if p.requires_grad]

    def flat() -> torch.Tensor:
        return torch.cat([p.grad.reshape(-1) for p in params]).double()

    options = dict(total_steps=1, beta=beta, perturb="all", eps=eps, seed=1)
    estimators = {"fogzo": fogzo.FOGZO(model, **options), "control": fogzo.NoiseMatchedSTE(model, **options)}
    model.zero_grad(set_to_none=True)
    fogzo.STE(model).estimate(closure)
    g_ste = flat()
    scale = estimators["control"].perturbed  # c per coordinate, for ‖g_x‖
    c = torch.cat([
        (torch.ones_like(e.param) * (e.coordinate_scale(scale.smoothing.eps_bar))).reshape(-1) for e in scale.tensors
    ]).double()
    order = {id(e.param): i for i, e in enumerate(scale.tensors)}
    assert len(order) == len(params)
    g_x_norm_sq = float(((g_ste * c) ** 2).sum())
    draws, d_squares = {}, []
    for name, estimator in estimators.items():
        values = []
        for _ in range(samples):
            model.zero_grad(set_to_none=True)
            info = estimator.estimate(closure)
            values.append(flat())
            if name == "fogzo":
                d_squares.append(info.differences[0] ** 2)
        draws[name] = torch.stack(values)
    var_fogzo = (draws["fogzo"] - draws["fogzo"].mean(0)).square().mean(0)
    var_control = (draws["control"] - g_ste).square().mean(0)
    predicted_d2 = (beta + 1 - beta) * g_x_norm_sq
    return {
        "bits": bits, "ste": ste, "beta": beta, "samples": samples, "coordinates": int(g_ste.numel()),
        "var_fogzo_mean": float(var_fogzo.mean()), "var_control_mean": float(var_control.mean()),
        "variance_ratio_fogzo_over_control": float(var_fogzo.mean() / var_control.mean()),
        "mean_d2_over_first_order": float(sum(d_squares) / len(d_squares) / predicted_d2),
        "ste_norm_x": g_x_norm_sq ** 0.5,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=400)
    args = parser.parse_args()
    for bits, ste in SETTINGS:
        print(json.dumps(measure(bits, ste, args.samples)), flush=True)


if __name__ == "__main__":
    main()
