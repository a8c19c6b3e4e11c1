"""The MNIST study's runs: the plan (:func:`plan_runs`), the data, the model, the estimators
and the loop of one run (:func:`train_run`), which records every evaluation point; one run's
archive record (:func:`run_record`) and its score (:func:`final_score`)."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import FOGZO, SPSA, STE, NoiseMatchedSTE, QuantConfig, SmoothedForwardSTE, quantize
from ..data import MNIST_MEAN, MNIST_STD, batches, load_mnist, to_float
from ..models.mlp import MLP
from ..train.sweep import needed
from .mnist_config import MODEL_SIZES, MnistConfig

__all__ = [
    "MnistData",
    "RunSpec",
    "build_model",
    "evaluate",
    "final_score",
    "load_data",
    "plan_runs",
    "run_record",
    "train_run",
]

ESTIMATORS = ("ste", "fogzo", "ste-noise", "ste-sr", "spsa")  # (the order of the tables)
CONTROLS = {"ste-noise": "STE+noise", "ste-sr": "STE smoothed"}  # estimator -> label
EVAL_CHUNK = 10_000


@dataclass(frozen=True)
class RunSpec:
    """One training run: an estimator (with its n), a learning rate and a seed."""

    estimator: str
    n: int | None
    lr: float
    seed: int
    iterations: int
    eval_every: int

    @property
    def label(self) -> str:
        return label_of(self.estimator, self.n)

    @property
    def key(self) -> str:
        """The run's name in the archive: ``"STE lr=0.001 seed=0"``."""
        return f"{self.label} lr={self.lr!r} seed={self.seed}"


def label_of(estimator: str, n: int | None) -> str:
    if estimator == "ste":
        return "STE"
    if estimator == "fogzo":
        return "FOGZO" if n in (None, 1) else f"FOGZO n={n}"
    if estimator in CONTROLS:
        return CONTROLS[estimator]
    return f"SPSA n={n}"


def final_score(record: Mapping[str, Any]) -> float:
    """A finished run's score for the learning-rate procedure: its final training loss (+inf
    if it diverged)."""
    last = record["points"][-1]
    loss = last["train_loss"]
    return math.inf if last["diverged"] or loss is None or not math.isfinite(loss) else float(loss)


def plan_runs(config: MnistConfig, results: Mapping[str, Mapping[str, Any]] | None = None) -> list[RunSpec]:
    """The runs still needed given the finished ``results`` (``key → record``), in the order to start them.

    STE and FOGZO: the tuned-lr procedure of :mod:`fogzo.train.sweep` on ``lrs`` and ``seeds``
    (every rate with the first seed, the grid extended past a winning edge, then the best
    rate with the other seeds), so the plan grows with the results. The n-SPSA ladder: every
    ``spsa_lrs`` × ``spsa_seeds`` (a fixed grid, to fit the time budget). Order: STE and FOGZO
    alternating, then the ladder, costliest rung first; the procedure's later runs come first
    as soon as the results call for them, and the ladder keeps the other workers busy meanwhile.
    """
    results = results or {}
    tuned = []
    for estimator in ("ste", "fogzo", *(CONTROLS if config.controls else ())):
        n = config.fogzo.n if estimator == "fogzo" else None

        def spec(lr: float, seed: int, estimator: str = estimator, n: int | None = n) -> RunSpec:
            return RunSpec(estimator, n, lr, seed, config.iterations, config.eval_every)

        def score(lr: float, seed: int, spec: Any = spec) -> float | None:
            record = results.get(spec(lr, seed).key)
            return None if record is None else final_score(record)

        tuned.append([spec(lr, seed) for lr, seed in needed(config.lrs, config.seeds, score)])
    runs = [run for pair in itertools.zip_longest(*tuned) for run in pair if run is not None]
    for n in sorted(config.spsa_n, key=lambda n: -n * config.spsa_iterations_for(n)):
        iterations = config.spsa_iterations_for(n)
        every = max(1, iterations // config.spsa_eval_points)
        runs += [
            RunSpec("spsa", n, lr, seed, iterations, every) for lr in config.spsa_lrs for seed in config.spsa_seeds
        ]
    return [run for run in runs if run.key not in results]


@dataclass
class MnistData:
    """The data on the run's device: the full training set, and the evaluation tensors."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_train_x: torch.Tensor
    eval_train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str


def load_data(config: MnistConfig) -> MnistData:
    """MNIST, normalised with its mean/std, flattened to ``[N, 784]`` float32, on ``config.device``."""
    dataset = load_mnist(config.data_dir)
    device = torch.device(config.device)

    def prepare(images: torch.Tensor) -> torch.Tensor:
        return to_float(images, MNIST_MEAN, MNIST_STD).reshape(len(images), -1).to(device)

    train_x, train_y = prepare(dataset.train_images), dataset.train_labels.to(device)
    test_x, test_y = prepare(dataset.test_images), dataset.test_labels.to(device)
    k = config.eval_subset
    return MnistData(
        train_x=train_x,
        train_y=train_y,
        eval_train_x=train_x[:k] if k else train_x,
        eval_train_y=train_y[:k] if k else train_y,
        test_x=test_x[:k] if k else test_x,
        test_y=test_y[:k] if k else test_y,
        source=dataset.source,
    )


def build_model(config: MnistConfig, seed: int) -> nn.Module:
    """The seed's initial quantized ``MLP((784, 10, 10))`` (deep-copy it for each run)."""
    torch.manual_seed(seed)
    model = MLP(MODEL_SIZES)
    return quantize(
        model, QuantConfig(bits=config.bits, ste=config.ste, alpha_init=config.alpha_init, step_size="fixed")
    )


def spsa_accepts_vectorize() -> bool:
    return "vectorize" in inspect.signature(SPSA).parameters


def make_estimator(spec: RunSpec, model: nn.Module, config: MnistConfig) -> Any:
    if spec.estimator == "ste":
        return STE(model)
    if spec.estimator == "fogzo":
        return FOGZO(model, total_steps=spec.iterations, seed=spec.seed, **dataclasses.asdict(config.fogzo))
    if spec.estimator == "ste-sr":
        return SmoothedForwardSTE(model, seed=spec.seed)
    if spec.estimator == "ste-noise":  # matched to FOGZO's options (docs/method.md §8)
        options = {k: getattr(config.fogzo, k) for k in ("beta_min", "perturb", "eps", "guide_norm")}
        return NoiseMatchedSTE(model, total_steps=spec.iterations, seed=spec.seed, **options)
    assert spec.n is not None
    extra: dict[str, Any] = {}
    if config.spsa_vectorize is not None and spsa_accepts_vectorize():
        extra["vectorize"] = min(spec.n, config.spsa_vectorize)
    return SPSA(model, n=spec.n, seed=spec.seed, perturb="all", eps=config.fogzo.eps, report_loss=False, **extra)


def make_optimizer(model: nn.Module, lr: float, config: MnistConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the quantized model in eval mode, in chunks."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    try:
        for xc, yc in zip(x.split(EVAL_CHUNK), y.split(EVAL_CHUNK)):
            logits = model(xc)
            total_loss += float(F.cross_entropy(logits, yc, reduction="sum"))
            correct += int((logits.argmax(dim=1) == yc).sum())
    finally:
        model.train(was_training)
    return total_loss / len(y), correct / len(y)


@dataclass
class _Diagnostics:
    """Running sums of the zeroth-order diagnostics over the steps so far."""

    samples: int = 0
    zeros: int = 0
    abs_difference: float = 0.0
    differences: int = 0
    grad_norm: float = 0.0
    grad_norms: int = 0

    def add(self, info: Any, n: int | None) -> None:
        if info.differences:
            self.samples += len(info.differences)
            self.zeros += info.zero_differences
            self.abs_difference += sum(abs(d) for d in info.differences)
            self.differences += len(info.differences)
        elif n:
            self.samples += n  # a skipped step: count its samples, none measured
        if info.ste_grad_norm is not None:
            self.grad_norm += info.ste_grad_norm
            self.grad_norms += 1

    def record(self) -> dict[str, float | None]:
        return {
            "zero_difference_fraction": self.zeros / self.samples if self.samples else None,
            "mean_abs_difference": self.abs_difference / self.differences if self.differences else None,
            "mean_ste_grad_norm": self.grad_norm / self.grad_norms if self.grad_norms else None,
        }


def train_run(
    spec: RunSpec,
    config: MnistConfig,
    initial_model: nn.Module,
    data: MnistData,
) -> list[dict[str, Any]]:
    """Train one run and return one record per evaluation point.

    A record holds: ``estimator``, ``label``, ``n``, ``lr``, ``seed``, ``iteration``,
    ``compute_units`` (summed ``info.compute_units``), ``wall_s`` (training time so far,
    evaluation excluded), ``train_loss`` (full training set unless ``eval_subset``),
    ``train_accuracy``, ``test_loss``, ``test_accuracy``, ``batch_loss`` (mean mini-batch
    loss since the previous point), ``beta``, ``zero_difference_fraction`` (zero finite
    differences / samples, steps so far), ``mean_abs_difference`` (mean ``|d_i|``),
    ``mean_ste_grad_norm``, ``skipped_steps`` and ``diverged``.
    """
    model = copy.deepcopy(initial_model)
    model.train()
    estimator = make_estimator(spec, model, config)
    optimizer = make_optimizer(model, spec.lr, config)
    generator = torch.Generator().manual_seed(spec.seed)  # the data order: same for every estimator
    cuda = data.train_x.device.type == "cuda"
    diagnostics = _Diagnostics()
    records: list[dict[str, Any]] = []
    state: dict[str, Any] = {"compute": 0, "wall": 0.0, "batch_loss": 0.0, "batch_count": 0, "beta": None, "skipped": 0}

    def point(iteration: int, diverged: bool = False) -> dict[str, Any]:
        train_loss, train_accuracy = evaluate(model, data.eval_train_x, data.eval_train_y)
        test_loss, test_accuracy = evaluate(model, data.test_x, data.test_y)
        if not math.isfinite(train_loss):
            diverged = True
        record = {
            "estimator": spec.estimator,
            "label": spec.label,
            "n": spec.n,
            "lr": spec.lr,
            "seed": spec.seed,
            "iteration": iteration,
            "iterations": spec.iterations,
            "compute_units": state["compute"],
            "wall_s": round(state["wall"], 4),
            "train_loss": train_loss if not diverged else math.nan,
            "train_accuracy": train_accuracy,
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "batch_loss": state["batch_loss"] / state["batch_count"] if state["batch_count"] else None,
            "beta": state["beta"],
            **diagnostics.record(),
            "skipped_steps": state["skipped"],
            "diverged": diverged,
        }
        state["batch_loss"], state["batch_count"] = 0.0, 0
        records.append(record)
        return record

    point(0)
    step = 0
    if len(data.train_x) < config.batch_size:  # an epoch would hold no batch: never ending
        raise ValueError(f"{len(data.train_x)} training examples are fewer than batch_size={config.batch_size}")
    while step < spec.iterations:
        for xb, yb in batches(data.train_x, data.train_y, config.batch_size, generator):
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            try:
                info = estimator.estimate(lambda: F.cross_entropy(model(xb), yb))  # noqa: B023 (called at once)
            except FloatingPointError:
                point(step, diverged=True)
                return records
            optimizer.step()
            if cuda:
                torch.cuda.synchronize()
            state["wall"] += time.perf_counter() - started
            state["compute"] += info.compute_units
            loss = float(info.loss)  # (the STE step's info.loss is a 0-d tensor)
            if math.isfinite(loss):
                state["batch_loss"] += loss
                state["batch_count"] += 1
            state["beta"] = info.beta
            state["skipped"] += int(info.skipped)
            diagnostics.add(info, spec.n)
            step += 1
            if step % spec.eval_every == 0 or step == spec.iterations:
                if point(step)["diverged"]:
                    return records
            if step == spec.iterations:
                break
    return records


def run_record(spec: RunSpec, points: list[dict[str, Any]]) -> dict[str, Any]:
    """One finished run in the study's archive (``runs.jsonl``): its spec and its points."""
    return {"label": spec.label, **dataclasses.asdict(spec), "points": points}
