"""Issue 22's table: STE, FOGZO (paper), FOGZO β = 1, noise-matched STE and smoothed-forward STE
on the map's 24 settings (docs/method.md §8).

The STE and FOGZO (paper) columns are the map's runs (docs/data/map.jsonl), the controls come
from ``smoothed_study.py grid controls`` (and ``grid controls-noise``: the noise-matched STE at
twice the matched variance); every column uses the same learning-rate
procedure (fogzo.train.sweep) and is shown at its best seed-0 rate (by final training loss)
as mean ± std over the seeds there.

    python experiments/controls_summary.py docs/data/map.jsonl results/controls*.jsonl [--metric accuracy]

Verdict rule (the one used so far): a column beats another only if their mean ± std intervals
do not overlap (``smoothed_study._beats``); a cell with fewer seeds than the grid's is not judged.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import smoothed_study as study

COLUMNS = {
    "ste": "STE",
    "fogzo": "FOGZO (paper)",
    "fogzo-beta1": "FOGZO β=1",
    "ste-noise": "noise-matched STE",
    "ste-sr": "smoothed-forward STE",
    "ste-noise-v2": "noise-matched STE, variance ×2",
}
CONTROLS = ("fogzo-beta1", "ste-noise", "ste-sr", "ste-noise-v2")


def merged_results(paths: list[Path]) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for path in paths:
        results.update(study.read_results(path))
    return results


def _stat(cell: dict[str, Any], metric: str) -> tuple[float, float]:
    """Lower is better: the loss, or minus the accuracy."""
    return cell["loss"] if metric == "loss" else (-cell["accuracy"][0], cell["accuracy"][1])


def _verdict(a: tuple[float, float], b: tuple[float, float]) -> str:
    return "+" if study._beats(a, b) else "−" if study._beats(b, a) else "="


def table(results: dict[str, dict[str, Any]], metric: str = "loss") -> tuple[str, dict[str, dict[str, int]]]:
    """The Markdown table and, per control, how many judged settings it beats / loses to / ties
    the STE, and how many it matches FOGZO (paper) within the spread."""
    grid = study.GRIDS["controls"]
    full = len(grid.seeds)
    cells = study.best_cells(results, grid)
    counts = {c: {"beats STE": 0, "loses to STE": 0, "ties STE": 0, "matches FOGZO": 0, "judged": 0} for c in CONTROLS}
    counts["fogzo"] = {"beats STE": 0, "loses to STE": 0, "ties STE": 0, "judged": 0}
    header = ("| data | bits / STE | α | " + " | ".join(COLUMNS.values())
              + " | vs STE (β=1 / noise / SR / noise×2) | vs FOGZO (β=1 / noise / SR / noise×2) |")
    lines = [header, "|" + "---|" * (len(COLUMNS) + 5)]
    for setting in grid.settings:
        row, judged = [], {}
        for name in COLUMNS:
            cell = cells.get((study.spec_from({**setting, "estimator": name}).setting(), name))
            if cell is None:
                row.append("–")
                continue
            seeds = len(cell["seeds"])
            value = cell["loss"] if metric == "loss" else cell["accuracy"]
            note = "" if seeds >= full else f" ({seeds} seed{'s' if seeds > 1 else ''})"
            row.append(f"{study._fmt(value, 3 if metric == 'loss' else 1)}{note}")
            if seeds >= full:
                judged[name] = _stat(cell, metric)
        versus_ste, versus_fogzo = [], []
        for name in ("fogzo", *CONTROLS):
            if name in judged and "ste" in judged:
                verdict = _verdict(judged[name], judged["ste"])
                counts[name]["judged"] += 1
                counts[name][{"+": "beats STE", "−": "loses to STE", "=": "ties STE"}[verdict]] += 1
                if name != "fogzo":
                    versus_ste.append(verdict)
            elif name != "fogzo":
                versus_ste.append("·")
            if name == "fogzo":
                continue
            if name in judged and "fogzo" in judged:
                verdict = _verdict(judged[name], judged["fogzo"])
                counts[name]["matches FOGZO"] += verdict == "="
                versus_fogzo.append(verdict)
            else:
                versus_fogzo.append("·")
        lines.append(f"| {setting['dataset']} | {setting['bits']} / {setting['ste']} | {setting['step_size']} | "
                     + " | ".join(row) + f" | {' / '.join(versus_ste)} | {' / '.join(versus_fogzo)} |")
    return "\n".join(lines), counts


def equal_time_table(results: dict[str, dict[str, Any]]) -> str:
    """The STE given as many more iterations as a control's step costs more (grids
    ``equal-time-sr`` and ``equal-time-noise``) against that control at 2,000 iterations, loss and
    test accuracy, each at its own best rate (mean ± std over its seeds)."""
    lines = ["| data | bits / STE | α | control (2,000 it.) | STE, 2,000 it. | STE, equal time | control | "
             "loss: control vs STE equal time | accuracy % : STE equal time | control | vs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for grid_name, control in (("equal-time-sr", "ste-sr"), ("equal-time-noise", "ste-noise")):
        grid = study.GRIDS[grid_name]
        long_cells = study.best_cells(results, grid)
        for setting in grid.settings:
            base = {**setting, "iterations": 2000}
            cell = {name: study.best_cells(results, study.GRIDS["controls"]).get(
                (study.spec_from({**base, "estimator": name}).setting(), name)) for name in ("ste", control)}
            long = long_cells.get((study.spec_from({**setting, "estimator": "ste"}).setting(), "ste"))
            if long is None or cell[control] is None or cell["ste"] is None:
                continue
            loss = _verdict(cell[control]["loss"], long["loss"])
            accuracy = _verdict((-cell[control]["accuracy"][0], cell[control]["accuracy"][1]),
                                (-long["accuracy"][0], long["accuracy"][1]))
            lines.append(
                f"| {setting['dataset']} | {setting['bits']} / {setting['ste']} | {setting['step_size']} | "
                f"{COLUMNS[control]} | {study._fmt(cell['ste']['loss'])} | {study._fmt(long['loss'])} "
                f"({setting['iterations']} it., lr {long['lr']:g}, {len(long['seeds'])} seeds) | "
                f"{study._fmt(cell[control]['loss'])} | {loss} | {study._fmt(long['accuracy'], 1)} | "
                f"{study._fmt(cell[control]['accuracy'], 1)} | {accuracy} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", type=Path, nargs="+", help="JSONL files of runs (the map's and the controls')")
    parser.add_argument("--metric", default="loss", choices=("loss", "accuracy"))
    parser.add_argument("--equal-time", action="store_true", help="the equal-wall-time table (grids equal-time-*)")
    args = parser.parse_args()
    if args.equal_time:
        print(equal_time_table(merged_results(args.paths)))
        return
    text, counts = table(merged_results(args.paths), args.metric)
    print(text)
    print()
    print("+ beats, − loses, = within the spread (mean ± std intervals overlap), · not judged yet "
          f"(fewer than {len(study.GRIDS['controls'].seeds)} seeds)")
    for name, count in counts.items():
        print(f"- {COLUMNS[name]}: " + ", ".join(f"{key} {value}" for key, value in count.items()))


if __name__ == "__main__":
    main()
