"""The MNIST study's outputs: ``summary.md`` (:func:`summary_markdown`) and the two plots
(:func:`write_outputs`), from the analysis of :mod:`fogzo.reproduce.mnist_report`."""

from __future__ import annotations

import dataclasses
import math
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..train.records import write_text_atomic
from ..train.summaries import format_mean_std, format_number, markdown_table, mean_std, plot_curves
from .mnist_config import MODEL_SIZES, MnistConfig
from .mnist_report import PAPER_RATIO, MnistAnalysis, analyze, grid_edges, lr_text, minutes_text, runs_at

__all__ = ["summary_markdown", "write_outputs"]


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
    add(
        f"# MNIST {MODEL_SIZES[0]}-{MODEL_SIZES[1]}-{MODEL_SIZES[2]}, {config.bits}-bit weights: STE vs FOGZO vs n-SPSA\n"
    )
    add(f"Command: `{command}`\n")
    add(
        f"Written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; total wall time "
        f"{minutes_text(total_wall_s)} on {platform.machine()} ({platform.processor() or 'cpu'}), "
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
        f"* STE and FOGZO: {config.iterations} iterations; learning rates tuned by one procedure for both: "
        f"every rate of the grid {[lr_text(x) for x in config.lrs]} with seed {config.seeds[0]}, the grid extended "
        "past a winning edge along the ladder 1e-4, 3e-4, ..., 3e-1 (at most two rates per side), then the "
        f"best rate with seeds {list(config.seeds[1:]) or 'none'}."
    )
    add(f"* FOGZO options: `{dataclasses.asdict(config.fogzo)}`.")
    if config.spsa_n:
        per_n = ", ".join(f"n={n}: {config.spsa_iterations_for(n)}" for n in config.spsa_n)
        add(
            f"* n-SPSA ladder (perturb='all', eps={config.fogzo.eps:g}, same noise law): iterations {per_n}; "
            f"seeds {list(config.spsa_seeds)}; learning rates {[lr_text(x) for x in config.spsa_lrs]} "
            "(one grid for every n; smaller than the STE/FOGZO grid to fit the time budget)."
        )
    add(
        f"* Train loss: cross-entropy of the quantized model on "
        f"{'the full training set' if config.eval_subset is None else f'the first {config.eval_subset} training examples'}; "
        f"test accuracy on {'the full test set' if config.eval_subset is None else f'the first {config.eval_subset} test examples'}."
    )
    add(
        "* Best learning rate per estimator: the lowest final training loss of the first seed "
        "(a diverged run counts as +inf); it is then run with the other seeds."
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
        clear = (
            math.isfinite(ste_mean) and math.isfinite(fogzo_mean) and abs(ste_mean - fogzo_mean) > ste_std + fogzo_std
        )
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
            "`--spsa-lrs=...`) before reading the comparison as final.\n"
        )

    # Best-lr comparison.
    add("## Best learning rate per estimator\n")
    rows = []
    for label in a.labels:
        lr = a.best_lr[label]
        runs = runs_at(a, label, lr)
        losses = a.grid[label][lr]
        accuracies = [run[-1]["test_accuracy"] for run in runs]
        walls = [run[-1]["wall_s"] for run in runs]
        computes = [run[-1]["compute_units"] for run in runs]
        iterations = runs[0][-1]["iterations"]
        wall = mean_std(walls)[0]
        rows.append(
            [
                label,
                lr_text(lr) + (" (edge)" if label in edges else ""),
                format_mean_std(losses, 4),
                ", ".join("diverged" if not math.isfinite(x) else f"{x:.4f}" for x in losses),
                format_mean_std(accuracies, 2, scale=100.0) + " %",
                str(iterations),
                str(len(runs)),
                format_number(mean_std(computes)[0]),
                f"{wall:.1f}",
                f"{1000 * wall / max(iterations, 1):.1f}",
            ]
        )
    headers = [
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
    ]
    add(markdown_table(headers, rows))
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
            share = f"{format_number(reached / a.fogzo_compute)}x" if reached is not None else None
            rows.append(
                [
                    label,
                    lr_text(a.best_lr[label]),
                    format_number(spent),
                    f"{curve.mean[-1]:.4f}" if curve.mean else "n/a",
                    format_number(reached) if reached is not None else "not reached",
                    share or f">= {format_number(spent / a.fogzo_compute)}x",
                ]
            )
        headers = [
            "estimator",
            "best lr",
            "compute spent",
            "final loss (seed mean)",
            "compute to reach",
            "/ FOGZO compute",
        ]
        add(markdown_table(headers, rows))
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
    add(markdown_table(["estimator"] + [f"lr {lr_text(lr)}" for lr in all_lrs], rows))
    add("\nBold: the best learning rate of the row. —: not run.\n")

    # Zeroth-order diagnostics.
    add("## Zeroth-order diagnostics at the best learning rate (end of training, mean over seeds)\n")
    rows = []
    for label in a.labels:
        if not label.startswith(("FOGZO", "SPSA")):  # the STE and its controls measure nothing
            continue
        runs = runs_at(a, label, a.best_lr[label])

        def mean_of(key: str) -> str:
            values = [run[-1][key] for run in runs if run[-1].get(key) is not None]  # noqa: B023 (called at once)
            return f"{mean_std(values)[0]:.4g}" if values else "n/a"

        rows.append(
            [label, mean_of("zero_difference_fraction"), mean_of("mean_abs_difference"), mean_of("mean_ste_grad_norm")]
        )
    add(
        markdown_table(
            ["estimator", "zero finite differences (fraction of samples)", "mean abs d", "mean STE grad norm"], rows
        )
    )
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
            config,
            analysis,
            command=command,
            total_wall_s=total_wall_s,
            data_source=data_source,
            reused_runs=reused_runs,
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
