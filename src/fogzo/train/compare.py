"""Compare estimators on a shared learning-rate grid over several seeds; write ``summary.md``.

    python -m fogzo.train.compare --config experiments/configs/resnet20_fmnist.toml \\
        --estimators ste,fogzo --seeds 0,1,2 --lrs 1e-3,3e-3 --out results/resnet20 \\
        [--quick] [--workers 2] [--time-budget 120] [--key=value ...]

Every (estimator, lr, seed) combination is trained under ``OUT/runs/<estimator>-lr<lr>-seed<seed>/``
by the sweep driver (:func:`fogzo.train.sweep.run_sweep`): in this process (``--workers 1``, the
default) or in that many worker processes (one torch thread each unless the config sets ``threads``). A run's initial weights and its data order
(epoch permutations, augmentation, text windows) depend on the seed only, so for one seed
every estimator starts from the same model and sees the same batches.

An estimator is ``ste``, ``fogzo`` or ``spsa``, optionally with its own overrides joined
by ``+``: ``fogzo+ste_fraction=0.7`` ("70 % STE then FOGZO"), ``fogzo+one_sided=true``.
Other ``--key=value`` arguments go to every run (``--steps=300``, ``--threads=1``).

Equal iterations: the default (every run does the config's ``steps``). Equal wall time:
``--time-budget SECONDS`` gives every run the same training-time budget (see
:mod:`fogzo.train.trainer` for how the schedule length is estimated).

Finished runs (those in the archive ``runs.jsonl``: one results record per run, appended as it
finishes) are not repeated and interrupted ones resume from their checkpoint, so the same
command continues an interrupted comparison; ``--rerun`` starts everything afresh. Outputs:
``summary.md`` (tables: mean ± std over seeds per estimator and lr, and each estimator at its
best lr of the grid; the command), ``loss_vs_iterations.png``, ``loss_vs_wall_time.png`` and
``loss_vs_compute.png`` (training loss at each estimator's best lr, mean ± std over seeds). Tables, statistics and plots use :mod:`fogzo.train.summaries`.
"""

from __future__ import annotations

import argparse
import math
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .checkpoint import CONFIG, METRICS, _check_resume_config
from .config import ConfigError, load_config, parse_overrides
from .records import check_output_folder, read_json, read_jsonl, write_text_atomic
from .summaries import (
    Curve,
    format_mean_std,
    format_number,
    markdown_table,
    mean_curve,
    mean_std,
    plot_curves,
    select_best,
)
from .sweep import read_archive, run_sweep
from .trainer import train

__all__ = ["main", "parse_estimator", "run_comparison", "summarize"]


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_estimator(spec: str) -> tuple[str, dict[str, Any]]:
    """``"fogzo+ste_fraction=0.7"`` → (``"fogzo"``, ``{"ste_fraction": 0.7}``) (type-checked)."""
    name, *options = spec.split("+")
    overrides = parse_overrides([f"--{option}" for option in options])
    return name, {"estimator": name, **overrides}


def _run_label(spec: str, lr: float, seed: int) -> str:
    safe = spec.replace("+", "_").replace("=", "").replace("/", "_")
    return f"{safe}-lr{lr:g}-seed{seed}"


def _train_one(plan: tuple[str, Any, Path]) -> dict[str, Any]:
    spec, config, run_dir = plan
    results = train(config, resume=True, command=["fogzo.train.compare", *sys.argv[1:]])
    return {**results, "label": spec, "run_dir": str(run_dir)}


def run_comparison(
    config_path: str | None,
    estimators: list[str],
    seeds: list[int],
    lrs: list[float],
    out: Path,
    *,
    quick: bool = False,
    overrides: list[str] | None = None,
    rerun: bool = False,
    workers: int = 1,
) -> list[dict[str, Any]]:
    """Train every combination (``workers`` at a time); returns one record per run."""
    check_output_folder(out)
    common = parse_overrides(overrides or [])
    specs = [(spec, *parse_estimator(spec)) for spec in estimators]
    # Validate every combination before spending time on the first one.
    plans = []
    for seed in seeds:
        for lr in lrs:
            for spec, _, spec_overrides in specs:
                run_dir = out / "runs" / _run_label(spec, lr, seed)
                values = {**common, **spec_overrides, "lr": lr, "seed": seed, "out": str(run_dir)}
                config = load_config(config_path, values, quick=quick)
                plans.append((spec, config, run_dir))
    archive = out / "runs.jsonl"
    if rerun:
        archive.unlink(missing_ok=True)
        for _, _, run_dir in plans:
            shutil.rmtree(run_dir, ignore_errors=True)
    try:
        finished = read_archive(archive)
    except ValueError as error:
        raise ConfigError(f"{archive} is not a comparison's archive ({error}); use --rerun or another --out") from None
    for _, config, run_dir in plans:
        if run_dir.name in finished:
            try:
                _check_resume_config(read_json(run_dir / CONFIG), config)
            except (ConfigError, OSError) as error:
                raise ConfigError(
                    f"{run_dir} holds a finished run of another config; use --rerun or another --out. {error}"
                ) from None
    results = run_sweep(
        lambda done: plans,
        _train_one,
        archive,
        key=lambda plan: plan[2].name,
        workers=workers,
        threads=None if workers == 1 else 1,
    )
    return [results[run_dir.name] for _, _, run_dir in plans]


def _value(record: dict[str, Any], key: str) -> float:
    """A numeric result, NaN when missing (a diverged run has no eval metrics)."""
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _best_lr(records: list[dict[str, Any]], label: str, key: str, higher: bool) -> float | None:
    """The lr with the best mean ``key`` (a diverged seed makes its lr last: common.select_best)."""
    grid: dict[float, list[float]] = {}
    for record in records:
        if record["label"] == label:
            value = _value(record, key)
            grid.setdefault(record["lr"], []).append(-value if higher else value)
    if not grid:
        return None
    lr, mean = select_best(grid)
    return lr if math.isfinite(mean) else None


def _curves(label: str, runs: list[list[dict[str, Any]]], x_key: str) -> Curve | None:
    """Mean ± std (over seeds) of the logged training loss against ``x_key``."""
    runs = [[r for r in run if r.get("event") == "train"] for run in runs]
    runs = [run for run in runs if run]
    if not runs:
        return None
    if x_key != "wall_time":
        return mean_curve(label, [[(r[x_key], r["loss_avg"]) for r in run] for run in runs])
    # Wall-clock points differ between seeds: average x too, point by point.
    length = min(len(run) for run in runs)
    xs, means, stds = [], [], []
    for index in range(length):
        xs.append(mean_std([run[index]["wall_time"] for run in runs])[0])
        mean, std = mean_std([run[index]["loss_avg"] for run in runs])
        means.append(mean)
        stds.append(std)
    return Curve(label, tuple(xs), tuple(means), tuple(stds))


def summarize(records: list[dict[str, Any]], out: Path, command: str, select: str = "eval") -> str:
    """Write ``summary.md`` and the loss plots into ``out``; return the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    if not records:
        raise ValueError("no runs to summarize")
    first = records[0]
    primary, higher = first.get("primary_metric", "eval_accuracy"), first.get("higher_is_better", True)
    if select == "train":
        select_key, select_higher = ("train_eval_loss" if "train_eval_loss" in first else "final_train_loss"), False
    else:
        select_key, select_higher = primary, higher
    percent = primary.endswith("accuracy")
    metric_name = f"{primary} (%)" if percent else primary
    labels = list(dict.fromkeys(record["label"] for record in records))
    lrs = sorted({record["lr"] for record in records})

    def column(group: list[dict[str, Any]], key: str, digits: int, scale: float = 1.0) -> str:
        return format_mean_std([_value(r, key) for r in group], digits, scale)

    def row(label: str, lr: float) -> list[Any] | None:
        group = [r for r in records if r["label"] == label and r["lr"] == lr]
        if not group:
            return None
        train_key = "train_eval_loss" if "train_eval_loss" in group[0] else "final_train_loss"
        return [
            label,
            f"{lr:g}",
            len(group),
            column(group, primary, 2, 100.0 if percent else 1.0),
            column(group, "eval_loss", 4),
            column(group, train_key, 4),
            column(group, "steps_done", 0),
            column(group, "wall_time", 1),
            column(group, "mean_step_time", 1, 1e3),
            format_number(mean_std([_value(r, "compute_units") for r in group])[0]),
            sum(bool(r.get("diverged")) for r in group),
        ]

    headers = [
        "estimator",
        "lr",
        "seeds",
        metric_name,
        "eval loss",
        "train loss",
        "iterations",
        "wall time / run (s)",
        "ms / step",
        "compute units",
        "diverged",
    ]
    all_rows = [r for label in labels for lr in lrs if (r := row(label, lr)) is not None]
    best = {label: _best_lr(records, label, select_key, select_higher) for label in labels}
    best_rows = [r for label in labels if (lr := best[label]) is not None and (r := row(label, lr)) is not None]

    data_names = sorted({str(r.get("data")) for r in records})
    notes = sorted({str(r["data_note"]) for r in records if r.get("data_note")})
    budget = sorted({str(r["calibration"]["total_steps"]) for r in records if r.get("calibration")})
    lines = [
        f"# {first.get('name', 'comparison')}: {', '.join(labels)}",
        "",
        "Command:",
        "",
        f"    {command}",
        "",
        f"Data: {', '.join(data_names)}." + (f" Note: {'; '.join(notes)}." if notes else ""),
        f"Runs: {len(records)} ({len(labels)} estimators x {len(lrs)} learning rates x seeds); "
        "values are mean ± std (ddof 0) over seeds.",
        f"Primary metric: {primary} ({'higher' if higher else 'lower'} is better); "
        f"best lr chosen by mean {select_key} on the shared grid (an lr with a diverged seed comes last).",
        "'train loss' is the loss on a fixed training subset at the end (no augmentation); "
        "compute units count a forward pass as 1 and a backward pass as 2; wall time is training "
        "time only (evaluation excluded).",
    ]
    if budget:
        lines.append(f"Equal wall time: schedules sized by calibration to T = {', '.join(budget)} steps.")
    plots = {
        "step": "loss_vs_iterations.png",
        "wall_time": "loss_vs_wall_time.png",
        "compute_units": "loss_vs_compute.png",
    }
    lines += [
        "",
        "## Each estimator at its best learning rate",
        "",
        markdown_table(headers, best_rows),
        "",
        "## All runs",
        "",
        markdown_table(headers, all_rows),
        "",
        *[f"![training loss vs {x_key}]({name})" for x_key, name in plots.items()],
        "",
    ]
    text = "\n".join(lines)
    write_text_atomic(out / "summary.md", text)
    x_labels = {
        "step": "iteration",
        "wall_time": "training wall time (s)",
        "compute_units": "compute units (forward 1, backward 2)",
    }
    for x_key, name in plots.items():
        curves = []
        for label in labels:
            if best[label] is None:
                continue
            runs = [r for r in records if r["label"] == label and r["lr"] == best[label]]
            metrics = [read_jsonl(Path(r["run_dir"]) / METRICS) for r in runs]
            curve = _curves(f"{label} lr={best[label]:g} (n={len(runs)})", metrics, x_key)
            if curve is not None:
                curves.append(curve)
        plot_curves(
            out / name,
            curves,
            xlabel=x_labels[x_key],
            ylabel="training loss (mean over the log interval)",
            title=str(first.get("name", "")),
        )
    return text


def main(argv: list[str] | None = None) -> int:
    from .cli import guarded

    return guarded(lambda: _main(argv), "compare")


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fogzo.train.compare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--estimators", default="ste,fogzo", help="comma-separated; NAME[+key=value...]")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lrs", default=None, help="comma-separated learning rates (default: the config's lr)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--quick", action="store_true", help="use the config's [quick] table")
    parser.add_argument("--rerun", action="store_true", help="delete and redo runs that exist")
    parser.add_argument("--workers", type=int, default=1, help="runs trained at once, one process each (default 1)")
    parser.add_argument(
        "--select",
        choices=("eval", "train"),
        default="eval",
        help="pick the best lr by the primary eval metric (default) or by the final train loss",
    )
    args, extra = parser.parse_known_args(argv)
    argv_used = sys.argv[1:] if argv is None else argv
    command = "python -m fogzo.train.compare " + " ".join(shlex.quote(a) for a in argv_used)
    try:
        estimators = _split(args.estimators)
        for spec in estimators:
            name, _ = parse_estimator(spec)
            if name not in ("ste", "fogzo", "spsa"):
                raise ConfigError(f"unknown estimator {name!r} in {spec!r}; use ste, fogzo or spsa")
        seeds = [int(s) for s in _split(args.seeds)]
        if args.lrs is None:
            lrs = [load_config(args.config, extra, quick=args.quick).lr]
        else:
            lrs = [float(s) for s in _split(args.lrs)]
    except (ConfigError, ValueError) as error:
        print(f"compare: error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    started = time.perf_counter()
    try:
        records = run_comparison(
            args.config,
            estimators,
            seeds,
            lrs,
            out,
            quick=args.quick,
            overrides=extra,
            rerun=args.rerun,
            workers=args.workers,
        )
    except ConfigError as error:
        print(f"compare: error: {error}", file=sys.stderr)
        return 2
    text = summarize(records, out, command, args.select)
    print(text)
    print(f"compare: {len(records)} runs in {time.perf_counter() - started:.0f} s; wrote {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
