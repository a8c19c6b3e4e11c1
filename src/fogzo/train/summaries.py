"""What a summary is made of: statistics over seeds, curves, Markdown tables and plots.

Shared by ``python -m fogzo.train.compare``, the diagnosis report and ``fogzo reproduce``;
nothing here knows about a particular model or data set.

* Statistics: :func:`mean_std`, :func:`format_mean_std`, :func:`format_number`,
  :func:`select_best`.
* Curves: :class:`Curve`, :func:`mean_curve`, :func:`first_reach`, :func:`compute_ratio`.
* Output: :func:`markdown_table`, :func:`plot_curves` (matplotlib, Agg backend),
  :func:`is_png`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._optional import require

__all__ = [
    "PNG_SIGNATURE",
    "Curve",
    "Reach",
    "Ratio",
    "compute_ratio",
    "first_reach",
    "format_mean_std",
    "format_number",
    "is_png",
    "markdown_table",
    "mean_curve",
    "mean_std",
    "plot_curves",
    "select_best",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- statistics


def _finite(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population, ddof = 0) standard deviation; NaN in gives NaN out."""
    values = _finite(values)
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / len(values)
    return mean, math.sqrt(variance)


def format_mean_std(values: Sequence[float], digits: int = 3, scale: float = 1.0) -> str:
    """``"0.331 ± 0.021"`` (just the value for one sample, ``"diverged"`` for NaN)."""
    mean, std = mean_std([v * scale for v in values])
    if not math.isfinite(mean):
        return "diverged"
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_number(value: float, digits: int = 3) -> str:
    """Compact formatting for compute counts and ratios (``1.2e+06``, ``796``, ``3.16``)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 1e5:
        return f"{value:.{max(digits - 1, 1)}e}"
    if magnitude >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def select_best(grid: Mapping[Any, Sequence[float]]) -> tuple[Any, float]:
    """The key of ``grid`` (e.g. a learning rate) whose values have the lowest mean.

    A cell with a non-finite value (a diverged seed) counts as +inf. Ties go to the first
    key in iteration order. Returns ``(key, mean)``.
    """
    if not grid:
        raise ValueError("select_best needs at least one cell")
    best_key, best_mean = None, math.inf
    for key, values in grid.items():
        mean = mean_std(values)[0] if values else math.inf
        if not math.isfinite(mean):
            mean = math.inf
        if best_key is None or mean < best_mean:
            best_key, best_mean = key, mean
    return best_key, best_mean


# ----------------------------------------------------------------------------- curves


@dataclass(frozen=True)
class Curve:
    """A labelled curve: ``x`` and the mean (and std) of ``y`` over seeds."""

    label: str
    x: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...] | None = None


def mean_curve(label: str, runs: Sequence[Sequence[tuple[float, float]]]) -> Curve:
    """Average ``[(x, y), ...]`` curves of several seeds on their common points.

    The runs of one configuration share their evaluation points; only the longest common
    prefix of ``x`` values is used if they do not.
    """
    if not runs:
        raise ValueError("mean_curve needs at least one run")
    length = min(len(run) for run in runs)
    xs, means, stds = [], [], []
    for index in range(length):
        x = runs[0][index][0]
        if any(run[index][0] != x for run in runs):
            break
        mean, std = mean_std([run[index][1] for run in runs])
        xs.append(float(x))
        means.append(mean)
        stds.append(std)
    return Curve(label, tuple(xs), tuple(means), tuple(stds))


def first_reach(x: Sequence[float], y: Sequence[float], target: float) -> float | None:
    """The smallest ``x`` at which the curve ``y(x)`` first reaches ``y <= target``.

    Between two evaluation points the curve is interpolated linearly in ``y`` against
    ``log x`` (log-linear); a segment that starts at ``x = 0`` is interpolated linearly in
    ``x``. Returns ``None`` if the curve never reaches ``target``.
    """
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    previous = None
    for xi, yi in zip(x, y):
        if not math.isfinite(yi):
            previous = None
            continue
        if yi <= target:
            if previous is None:
                return float(xi)
            x0, y0 = previous
            fraction = (y0 - target) / (y0 - yi)
            if x0 <= 0:
                return float(x0 + fraction * (xi - x0))
            return float(math.exp(math.log(x0) + fraction * (math.log(xi) - math.log(x0))))
        previous = (float(xi), float(yi))
    return None


@dataclass(frozen=True)
class Reach:
    """Where one curve reaches the target: ``compute`` (``None``: never), and its budget."""

    label: str
    compute: float | None
    max_compute: float


@dataclass(frozen=True)
class Ratio:
    """``ratio = best.compute / reference_compute``; a lower bound when nothing reached it."""

    target: float
    reference_compute: float
    ratio: float
    lower_bound: bool
    best_label: str | None
    reaches: tuple[Reach, ...]

    def text(self) -> str:
        prefix = ">= " if self.lower_bound else ""
        return f"{prefix}{format_number(self.ratio)}x"


def compute_ratio(target: float, curves: Sequence[Curve], reference_compute: float) -> Ratio:
    """How much more compute than ``reference_compute`` the cheapest curve needs to reach ``target``.

    ``curves`` hold compute on ``x`` and a (seed-mean) loss on ``mean``. For each curve,
    :func:`first_reach` gives the compute at which it first reaches ``target``; the ratio is
    the smallest such compute over the curves divided by ``reference_compute``. If no curve
    reaches the target, the ratio is a lower bound: the largest compute any of them spent,
    divided by ``reference_compute``.
    """
    if not reference_compute > 0:
        raise ValueError(f"reference_compute must be > 0, got {reference_compute!r}")
    reaches = tuple(
        Reach(curve.label, first_reach(curve.x, curve.mean, target), max(curve.x, default=0.0)) for curve in curves
    )
    reached = [(reach.compute, reach.label) for reach in reaches if reach.compute is not None]
    if reached:
        compute, label = min(reached, key=lambda reach: reach[0])  # the first curve on a tie, as before
        return Ratio(target, reference_compute, compute / reference_compute, False, label, reaches)
    spent = max((reach.max_compute for reach in reaches), default=0.0)
    return Ratio(target, reference_compute, spent / reference_compute, True, None, reaches)


# ----------------------------------------------------------------------------- output


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub Markdown table; ``align`` holds one of ``l``, ``r``, ``c`` per column."""
    rows = [[str(cell) for cell in row] for row in rows]
    align = align or "l" + "r" * (len(headers) - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join(marks[a] for a in align) + " |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plot_curves(
    path: str | Path,
    curves: Sequence[Curve],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    log_x: bool = False,
    log_y: bool = False,
    hline: tuple[float, str] | None = None,
) -> Path:
    """Save a line plot of ``curves`` (mean line, shaded ± std) as a PNG (Agg backend).

    With ``log_x`` points at ``x <= 0`` are dropped. ``hline = (y, label)`` draws a dashed
    reference line.
    """
    matplotlib = require("matplotlib", "cli", "plotting")
    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    try:
        for curve in curves:
            points = [
                (x, m, s)
                for x, m, s in zip(curve.x, curve.mean, curve.std or (0.0,) * len(curve.x))
                if math.isfinite(m) and (x > 0 or not log_x)
            ]
            if not points:
                continue
            xs, means, stds = zip(*points)
            (line,) = axes.plot(xs, means, label=curve.label, linewidth=1.6)
            if curve.std is not None and any(s > 0 for s in stds):
                axes.fill_between(
                    xs,
                    [m - s for m, s in zip(means, stds)],
                    [m + s for m, s in zip(means, stds)],
                    color=line.get_color(),
                    alpha=0.18,
                    linewidth=0,
                )
        if hline is not None:
            axes.axhline(hline[0], color="0.3", linestyle="--", linewidth=1.0, label=hline[1])
        if log_x:
            axes.set_xscale("log")
        if log_y:
            axes.set_yscale("log")
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        if title:
            axes.set_title(title)
        axes.grid(True, which="both", alpha=0.25)
        axes.legend(fontsize=8, loc="best")
        figure.tight_layout()
        temporary = path.with_name(path.name + ".tmp")
        figure.savefig(temporary, format="png")
        os.replace(temporary, path)  # a reader never sees half a PNG
    finally:
        plt.close(figure)
    return path


def is_png(path: str | Path) -> bool:
    """Whether the file starts with the PNG signature."""
    with Path(path).open("rb") as file:
        return file.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
