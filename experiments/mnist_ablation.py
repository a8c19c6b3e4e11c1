"""Ablation of FOGZO's open choices on MNIST 784-10-10 (the paper's MNIST setting): why the plain reading loses.

Each run trains the 2-bit (or ternary / sign) MLP with one estimator and one setting and
prints one JSON line: final full-training-set loss, test accuracy, the fraction of FOGZO's
finite differences that were exactly zero, and wall time.

    python experiments/mnist_ablation.py --estimator fogzo --alpha-init max --guide-norm 1 \
        --lr 1e-3 --iterations 2000 --seed 0
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
import torch.nn.functional as F

import fogzo
from fogzo.data import MNIST_MEAN, MNIST_STD, load_mnist, to_float
from fogzo.models import MLP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--estimator", choices=["ste", "fogzo", "spsa"], default="fogzo")
    parser.add_argument("--bits", default="2")
    parser.add_argument("--alpha-init", default="max")
    parser.add_argument("--eps-bar", type=float, default=None, help="override ε̄ (default: the STE's)")
    parser.add_argument("--ste", default="identity")
    parser.add_argument("--guide-norm", type=float, default=1.0, help="‖ĝ‖; 0 means √d")
    parser.add_argument("--normalize", default="global")
    parser.add_argument("--beta-min", type=float, default=0.999)
    parser.add_argument("--beta", type=float, default=None, help="constant β instead of the schedule")
    parser.add_argument("--perturb", default="all")
    parser.add_argument("--eps", type=float, default=None, help="ε for biases (default: ε̄·mean α)")
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--one-sided", action="store_true")
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)

    data = load_mnist()
    train_x = to_float(data.train_images, MNIST_MEAN, MNIST_STD).reshape(-1, 784)
    test_x = to_float(data.test_images, MNIST_MEAN, MNIST_STD).reshape(-1, 784)
    train_y, test_y = data.train_labels, data.test_labels
    bits = args.bits if args.bits == "ternary" else int(args.bits)

    torch.manual_seed(args.seed)
    model = MLP((784, 10, 10))
    config = fogzo.QuantConfig(bits=bits, ste=args.ste, alpha_init=args.alpha_init, eps_bar=args.eps_bar)
    fogzo.quantize(model, config)
    layers = [layer for _, layer in fogzo.quantized_layers(model)]
    mean_alpha = sum(layer.weight_quantizer.alpha.mean().item() for layer in layers) / len(layers)
    eps = args.eps if args.eps is not None else config.smoothing.eps_bar * mean_alpha
    d = sum(p.numel() for p in model.parameters())
    if args.estimator == "ste":
        estimator = fogzo.STE(model)
    elif args.estimator == "spsa":
        estimator = fogzo.SPSA(model, n=args.n, seed=args.seed, perturb=args.perturb, eps=eps,
                               vectorize=min(args.n, 256), report_loss=False)
    else:
        estimator = fogzo.FOGZO(
            model, total_steps=args.iterations, beta_min=args.beta_min, beta=args.beta, n=args.n,
            seed=args.seed, perturb=args.perturb, eps=eps, normalize=args.normalize,
            guide_norm=args.guide_norm if args.guide_norm > 0 else math.sqrt(d), one_sided=args.one_sided,
        )
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    generator = torch.Generator().manual_seed(args.seed)
    zero, total, start = 0, 0, time.perf_counter()
    step = 0
    while step < args.iterations:
        order = torch.randperm(60000, generator=generator)
        for begin in range(0, 60000 - args.batch_size + 1, args.batch_size):
            if step >= args.iterations:
                break
            index = order[begin : begin + args.batch_size]
            x, y = train_x[index], train_y[index]
            optimizer.zero_grad(set_to_none=True)
            info = estimator.estimate(lambda: F.cross_entropy(model(x), y))
            zero += info.zero_differences
            total += len(info.differences)
            optimizer.step()
            step += 1
    wall = time.perf_counter() - start
    with torch.no_grad():
        train_loss = F.cross_entropy(model(train_x), train_y).item()
        test_accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    record = {k: v for k, v in vars(args).items()}
    record.update(train_loss=train_loss, test_accuracy=test_accuracy, zero_fraction=zero / max(total, 1),
                  wall_s=round(wall, 1), eps=eps, d=d)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
