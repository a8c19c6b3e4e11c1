"""The MNIST study's analysis of the run records (:func:`analyze`: best learning rates,
seed-mean curves, the compute ratio) and the console summary; ``summary.md`` and the plots are
written by :mod:`fogzo.reproduce.mnist_summary`."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..train.summaries import (
    Curve,
    Ratio,
    compute_ratio,
    first_reach,
    format_mean_std,
    mean_curve,
    mean_std,
    select_best,
)
from .mnist_runs import ESTIMATORS

__all__ = [
    "PAPER_RATIO",
    "MnistAnalysis",
    "analyze",
    "console_summary",
    "final_loss",
    "grid_edges",
    "group_runs",
    "lr_text",
    "minutes_text",
    "runs_at",
]

#: The abstract's figure: n-SPSA needs this many times FOGZO's computation for the same loss.
PAPER_RATIO = 796


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


def group_runs(records: Sequence[dict[str, Any]]) -> dict[tuple[str, float, int], list[dict[str, Any]]]:
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


def _order(point: dict[str, Any]) -> tuple[int, int]:
    return (ESTIMATORS.index(point["estimator"]), point["n"] or 0)


def analyze(records: Sequence[dict[str, Any]]) -> MnistAnalysis:
    """Best learning rates, seed-mean curves and the compute ratio from the runs' evaluation points.

    The best learning rate of an estimator is the tuned-lr procedure's (:mod:`fogzo.train.sweep`):
    the lowest final training loss of its first (smallest) seed, a diverged run counting as +inf.
    """
    runs = group_runs(records)
    example = {label: points[0] for (label, _, _), points in runs.items()}
    labels = sorted(example, key=lambda label: _order(example[label]))
    grid: dict[str, dict[float, list[float]]] = {label: defaultdict(list) for label in labels}
    first: dict[str, dict[float, list[float]]] = {label: {} for label in labels}
    first_seed = {label: min(seed for (name, _, seed) in runs if name == label) for label in labels}
    for (label, lr, seed), points in sorted(runs.items()):
        grid[label][lr].append(final_loss(points))
        if seed == first_seed[label]:
            first[label][lr] = [final_loss(points)]
    grid = {label: dict(sorted(cells.items())) for label, cells in grid.items()}
    best_lr = {label: select_best(cells)[0] for label, cells in first.items()}
    curves_iter, curves_compute = {}, {}
    for label in labels:
        seeds = [points for (name, lr, _), points in sorted(runs.items()) if name == label and lr == best_lr[label]]
        curves_iter[label] = mean_curve(label, [[(p["iteration"], p["train_loss"]) for p in run] for run in seeds])
        curves_compute[label] = mean_curve(
            label, [[(p["compute_units"], p["train_loss"]) for p in run] for run in seeds]
        )
    fogzo_label = next((label for label in labels if label.startswith("FOGZO")), None)
    target, fogzo_compute, ratio = math.nan, math.nan, None
    reach: dict[str, float | None] = {}
    if fogzo_label is not None:
        target = mean_std(grid[fogzo_label][best_lr[fogzo_label]])[0]
        fogzo_runs = [p for (name, lr, _), p in runs.items() if name == fogzo_label and lr == best_lr[fogzo_label]]
        fogzo_compute = mean_std([run[-1]["compute_units"] for run in fogzo_runs])[0]
        ladder = [curves_compute[label] for label in labels if label.startswith("SPSA")]
        if ladder and math.isfinite(target) and fogzo_compute > 0:
            ratio = compute_ratio(target, ladder, fogzo_compute)
        if math.isfinite(target):
            reach = {label: first_reach(curve.x, curve.mean, target) for label, curve in curves_compute.items()}
    return MnistAnalysis(runs, labels, grid, best_lr, curves_iter, curves_compute, target, fogzo_compute, ratio, reach)


# ----------------------------------------------------------------------------- outputs


def minutes_text(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if math.isfinite(seconds) else "n/a min"


def lr_text(value: float) -> str:
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


def runs_at(analysis: MnistAnalysis, label: str, lr: float) -> list[list[dict[str, Any]]]:
    return [points for (name, r, _), points in sorted(analysis.runs.items()) if name == label and r == lr]


def console_summary(analysis: MnistAnalysis, out: Path, total: float) -> str:
    lines = [f"total wall time {minutes_text(total)}; summary: {out / 'summary.md'}"]
    for label in analysis.labels:
        lr = analysis.best_lr[label]
        lines.append(
            f"  {label:<14} best lr {lr_text(lr):<7} final train loss {format_mean_std(analysis.grid[label][lr], 4)}"
        )
    if analysis.ratio is not None:
        lines.append(
            f"  n-SPSA compute / FOGZO compute for FOGZO's loss: {analysis.ratio.text()} (paper: {PAPER_RATIO}x)"
        )
    return "\n".join(lines)
