"""Helpers shared by the reproduction experiments.

Nothing here knows about MNIST: a later experiment (a deep network, a language model)
reuses the same pieces.

* Configs: :func:`config_to_dict`, :func:`config_from_dict` (nested frozen dataclasses,
  tuples and unions survive a JSON round trip), :func:`apply_overrides` (``key=value``
  strings such as ``fogzo.beta_min=0.99`` or ``lrs=1e-3,3e-3``), :func:`format_config`.
* Logging: :class:`JsonlLogger` (one JSON object a line, flushed at once), :func:`read_jsonl`,
  :func:`write_json` / :func:`read_json` (atomic), :func:`write_text_atomic`. Every file is
  strict JSON (RFC 8259): a NaN or infinite float is written as ``null`` and named in the
  record's ``"nonfinite"`` field (``{"loss": "nan"}``; dotted paths for nested values);
  :func:`read_jsonl` and :func:`read_json` put the floats back.
* Statistics: :func:`mean_std`, :func:`format_mean_std`, :func:`select_best`.
* Curves: :class:`Curve`, :func:`mean_curve`, :func:`first_reach`, :func:`compute_ratio`.
* Output: :func:`markdown_table`, :func:`plot_curves` (matplotlib, Agg backend),
  :func:`progress` (tqdm on a terminal; one line every N updates when stderr is
  redirected), :func:`is_png`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._optional import require

__all__ = [
    "NONFINITE",
    "PNG_SIGNATURE",
    "ConfigError",
    "RunInterrupted",
    "Curve",
    "JsonlLogger",
    "LineProgress",
    "Reach",
    "Ratio",
    "apply_overrides",
    "compute_ratio",
    "config_from_dict",
    "config_to_dict",
    "first_reach",
    "format_config",
    "format_mean_std",
    "format_number",
    "is_png",
    "markdown_table",
    "mean_curve",
    "mean_std",
    "plot_curves",
    "progress",
    "read_json",
    "read_jsonl",
    "restore_nonfinite",
    "select_best",
    "strict_json",
    "write_json",
    "write_text_atomic",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ConfigError(ValueError):
    """A config, option, file, data source or output folder is wrong (found before any work).

    The command line prints it as one line (``fogzo train: error: ...``) and exits with 2.
    """


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run after what it had done was saved; the message says how to continue."""


# ----------------------------------------------------------------------------- configs


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready ``dict`` of a (nested) dataclass; tuples become lists."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"expected a dataclass instance, got {type(config).__name__}")
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Rebuild dataclass ``cls`` from :func:`config_to_dict`'s output (or a partial dict).

    Missing keys keep their defaults; unknown keys raise ``ValueError``.
    """
    hints = typing.get_type_hints(cls)
    names = {field.name for field in dataclasses.fields(cls) if field.init}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
    values = {name: _coerce(value, hints[name], name) for name, value in data.items()}
    return cls(**values)


def apply_overrides(config: Any, overrides: Iterable[str]) -> Any:
    """A copy of ``config`` with ``key=value`` overrides applied (a later one wins).

    ``key`` is a field name, dotted for nested dataclasses (``fogzo.beta_min``). ``value``
    is parsed by the field's type: numbers, ``true``/``false``, ``none``/``null`` for an
    optional field, and comma-separated lists for tuple fields (``seeds=0,1,2``; an empty
    value is an empty tuple). All overrides are applied together, so fields that are
    validated against each other (``spsa_n`` and ``spsa_iterations``) can change at once.
    """
    changes: dict[str, Any] = {}
    for override in overrides:
        key, sep, text = override.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"an override must look like key=value, got {override!r}")
        node, path = changes, key.split(".")
        owner = config
        for depth, name in enumerate(path):
            if not dataclasses.is_dataclass(owner):
                raise ValueError(f"{key}: {'.'.join(path[:depth])} has no fields")
            names = [field.name for field in dataclasses.fields(owner)]
            if name not in names:
                raise ValueError(f"unknown field {name!r} in {key!r}; {type(owner).__name__} has: {', '.join(names)}")
            if depth == len(path) - 1:
                node[name] = _coerce(text.strip(), typing.get_type_hints(type(owner))[name], key)
            else:
                node = node.setdefault(name, {})
                if not isinstance(node, dict):
                    raise ValueError(f"{key}: {name} is not a nested config")
                owner = getattr(owner, name)
    return _apply_changes(config, changes)


def _apply_changes(config: Any, changes: Mapping[str, Any]) -> Any:
    values = {
        name: _apply_changes(getattr(config, name), value) if isinstance(value, dict) else value
        for name, value in changes.items()
    }
    return dataclasses.replace(config, **values) if values else config


_NONE_WORDS = ("none", "null")
_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (a CLI string or a JSON value) to type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in _NONE_WORDS and type(None) in args):
            if type(None) not in args:
                raise ValueError(f"{key}: None is not allowed")
            return None
        errors = []
        # Prefer the non-string alternatives so "2" becomes 2 for ``int | str``.
        for alternative in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):
            try:
                return _coerce(value, alternative, key)
            except (TypeError, ValueError) as error:
                errors.append(str(error))
        raise ValueError(f"{key}: cannot read {value!r} as {tp}: {'; '.join(errors)}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return config_from_dict(tp, value)
    if origin is tuple:
        if isinstance(value, str):
            items: list[Any] = [item.strip() for item in value.split(",") if item.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(item, args[0], key) for item in items)
        if len(items) != len(args):
            raise ValueError(f"{key}: expected {len(args)} values, got {len(items)}")
        return tuple(_coerce(item, arg, key) for item, arg in zip(items, args))
    if origin is typing.Literal:
        for allowed in args:
            if value == allowed or (isinstance(value, str) and str(allowed) == value):
                return allowed
        raise ValueError(f"{key}: {value!r} is not one of {args}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE_WORDS + _FALSE_WORDS:
            return value.lower() in _TRUE_WORDS
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            text = value.replace("_", "")
            try:
                return int(text)
            except ValueError:
                number = float(text)  # accepts "2e3"
                if number.is_integer():
                    return int(number)
        raise ValueError(f"{key}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value)
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key}: expected a string, got {value!r}")
    return value


def format_config(config: Any, indent: str = "  ") -> str:
    """One ``name = value`` line per field; nested dataclasses are indented."""
    lines = [f"{type(config).__name__}:"]

    def walk(obj: Any, prefix: str) -> None:
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            if dataclasses.is_dataclass(value):
                lines.append(f"{prefix}{field.name}: ({type(value).__name__})")
                walk(value, prefix + indent)
            else:
                lines.append(f"{prefix}{field.name} = {value!r}")

    walk(config, indent)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- logging


NONFINITE = "nonfinite"
"""The record field that names the values written as ``null`` because they were NaN or ±inf."""


def _nonfinite_name(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def strict_json(record: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``record`` that strict JSON can hold.

    A NaN or ±inf float (at any depth, in dicts and lists) becomes ``None``, and
    ``record["nonfinite"]`` maps its path (``"loss"``, ``"calibration.fogzo_step_s"``,
    ``"differences.1"``) to ``"nan"``, ``"inf"`` or ``"-inf"``. :func:`restore_nonfinite`
    undoes it.
    """
    flags: dict[str, str] = {}

    def clean(value: Any, path: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            flags[path] = _nonfinite_name(value)
            return None
        if isinstance(value, Mapping):
            return {key: clean(item, f"{path}.{key}" if path else str(key)) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(item, f"{path}.{index}" if path else str(index)) for index, item in enumerate(value)]
        return value

    cleaned = clean({k: v for k, v in record.items() if k != NONFINITE}, "")
    if flags:
        cleaned[NONFINITE] = flags
    return cleaned


def restore_nonfinite(record: dict[str, Any]) -> dict[str, Any]:
    """Put back the NaN/±inf floats that :func:`strict_json` wrote as ``null`` (in place)."""
    flags = record.pop(NONFINITE, None)
    if not isinstance(flags, dict):
        return record
    for path, name in flags.items():
        parts = path.split(".")
        node: Any = record
        try:
            for part in parts[:-1]:
                node = node[int(part)] if isinstance(node, list) else node[part]
            last = parts[-1]
            if isinstance(node, list):
                node[int(last)] = float(name)
            else:
                node[last] = float(name)
        except (KeyError, IndexError, ValueError, TypeError):
            continue  # a path that no longer fits (the record was edited by hand): leave it
    return record


def _dumps(record: Any, **kwargs: Any) -> str:
    if isinstance(record, Mapping):
        record = strict_json(record)
    return json.dumps(record, allow_nan=False, **kwargs)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``.

    A reader (or a crash) sees the old file or the new one, never a half-written one.
    """
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path


def write_json(path: str | Path, record: Mapping[str, Any]) -> Path:
    """Write ``record`` as indented strict JSON (see :func:`strict_json`), atomically."""
    return write_text_atomic(path, _dumps(record, indent=2, default=str) + "\n")


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object written by :func:`write_json` (non-finite floats restored)."""
    return restore_nonfinite(json.loads(Path(path).read_text(encoding="utf-8")))


class JsonlLogger:
    """Write one strict-JSON object a line to ``path``, flushed per record.

    ``mode="w"`` (default) starts a new file; ``"a"`` appends. ``keep`` records are written
    first, through a temporary file and ``os.replace`` (a resumed run keeps the records up
    to its checkpoint without a moment in which the file is empty or cut short).
    """

    def __init__(self, path: str | Path, *, keep: Iterable[Mapping[str, Any]] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep is not None:
            write_text_atomic(self.path, "".join(_dumps(record, default=str) + "\n" for record in keep))
            self._file = self.path.open("a", encoding="utf-8")
        else:
            self._file = self.path.open("w", encoding="utf-8")

    def log(self, record: Mapping[str, Any]) -> None:
        self._file.write(_dumps(record, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a JSON-lines file (blank lines skipped; non-finite floats restored)."""
    with Path(path).open(encoding="utf-8") as file:
        return [restore_nonfinite(json.loads(line)) for line in file if line.strip()]


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
    reached = [reach for reach in reaches if reach.compute is not None]
    if reached:
        best = min(reached, key=lambda reach: reach.compute)
        return Ratio(target, reference_compute, best.compute / reference_compute, False, best.label, reaches)
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


class LineProgress:
    """A progress report for logs: one line on ``stream`` every ``every`` updates, and at the end.

    The same calls as a tqdm bar (``update``, ``set_postfix``, ``close``, context manager),
    for when stderr is redirected to a file, where a bar would be invisible or garbled.
    """

    def __init__(self, total: int, description: str, every: int, stream: Any = None) -> None:
        self.total, self.description, self.every = total, description, max(1, int(every))
        self.stream = stream
        self.n = 0
        self.postfix = ""
        self._started = time.perf_counter()
        self._reported = 0
        self._closed = False

    def update(self, count: int = 1) -> None:
        before, self.n = self.n, self.n + count
        if self.n // self.every > before // self.every and self.n < self.total:
            self._emit()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        if not self._closed and self.n > self._reported:
            self._emit()
        self._closed = True

    def _emit(self) -> None:
        self._reported = self.n
        percent = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        seconds = time.perf_counter() - self._started
        line = f"{self.description}: {self.n}/{self.total}{percent}, {seconds:.0f} s" + (f", {self.postfix}" if self.postfix else "")
        print(line, file=self.stream or sys.stderr, flush=True)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int, description: str, *, enabled: bool | None = None, every: int | None = None) -> Any:
    """A progress bar over ``total`` units on stderr.

    ``enabled=None``: a tqdm bar when stderr is a terminal; otherwise, with ``every``, a
    :class:`LineProgress` (one line every ``every`` updates, so a redirected log still shows
    progress), else nothing. ``enabled=True`` forces the bar, ``False`` silences both.
    Returns an object with ``update``, ``set_postfix`` and ``close`` (a context manager).
    """
    tqdm = require("tqdm.auto", "cli", "the progress bar").tqdm
    if enabled is None:
        enabled = sys.stderr.isatty()
        if not enabled and every is not None:
            return LineProgress(total, description, every)
    return tqdm(total=total, desc=description, disable=not enabled, dynamic_ncols=True, leave=True)
