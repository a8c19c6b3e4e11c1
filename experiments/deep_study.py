"""Deep networks at 10× the training length: STE vs FOGZO on ResNet-20, the ViT and a LLaMA-style LM.

Every run is one ``fogzo train`` process with its own folder under ``--out`` (config, metrics,
checkpoints every 250 steps, results). The driver is resumable across sessions: a finished run
(``results.json``) is read, an interrupted one continues from its checkpoint (``--resume``),
and the learning-rate procedure of fogzo.train.sweep decides what runs next (every rate
of the shared grid with seed 0, an extension beyond a winning edge, then the best rate with
seeds 1 and 2). One run per core: ``--workers 2`` on the 2-core development machine.

Run folders are scratch (``results/`` is not tracked, and a fresh checkout starts without
them): every finished run is also appended to the tracked archive ``--archive``
(docs/data/deep.jsonl: the run's results and its evaluation curve), which the driver reads
first, so a finished run is never repeated in a later session. Commit the archive.

    python experiments/deep_study.py run resnet --out results/deep --workers 2
    python experiments/deep_study.py summarize
    python experiments/deep_study.py plot          # docs/img/deep-<family>-<row>-{steps,time}.png

Families (sized so that one family's table costs a few core-hours on this CPU; docs/results.md
says what was cut against the configs in experiments/configs/):

* ``resnet``: ResNet-20 at width 8 (68 k parameters; the config's width is 16) on
  Fashion-MNIST 32×32, batch 32, 2,000 steps (~1 epoch), augmentation as in the config;
* ``vit``: the config's ViT at D = 48, depth 4 (118 k parameters), same data and budget;
* ``lm``: a LLaMA-style LM with dim 64, 4 layers (226 k parameters) on Shakespeare (characters),
  16 × 128 tokens per step, 2,000 steps.

Rows: 2-bit weights with the identity STE, and 1-bit sign weights with the tanh STE, fixed α
(``lsq`` rule), first and last layers in full precision. Estimators: STE; FOGZO in the paper's
reading (n = 1, β_min = 0.999, ‖ĝ‖ = 1); FOGZO's best variant on the MNIST MLP (‖ĝ‖ = 10,
β_min = 0.9999: docs/results.md §2) carried over by keeping its noise-to-guide ratio
(1 − β_min)·d/‖ĝ‖² = 0.008 at the end of the schedule, i.e. β_min = 1 − 0.8/d for d perturbed
weights. Score: the config's primary metric on the held-out set (accuracy for
images, perplexity for text).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fogzo.train import sweep as tuning  # the learning-rate procedure

ROOT = Path(__file__).resolve().parent
CONFIGS = ROOT / "configs"
ARCHIVE = ROOT.parent / "docs" / "data" / "deep.jsonl"
_archive: dict[str, dict[str, Any]] = {}  # run name -> archived record (read_archive)
STEPS = 2000
SEEDS = (0, 1, 2)
LRS = (1e-3, 3e-3, 1e-2)

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet": ("resnet20_fmnist.toml", {"model_args": {"width": 8}, "batch_size": 32, "eval_size": 10000}),
    "vit": ("vit_tiny_fmnist.toml", {"model_args": {"dim": 48, "depth": 4, "heads": 3}, "batch_size": 32, "eval_size": 10000}),
    "lm": ("llama1m_shakespeare.toml", {"model_args": {"dim": 64, "n_layers": 4, "n_heads": 4}, "batch_size": 16}),
}
ROWS = {"2bit": {"bits": 2, "ste": "identity"}, "1bit": {"bits": 1, "ste": "tanh"}}
ESTIMATORS: dict[str, dict[str, Any]] = {
    "ste": {"estimator": "ste"},
    "fogzo": {"estimator": "fogzo", "beta_min": 0.999, "guide_norm": 1.0},
    "fogzo-best": {"estimator": "fogzo", "guide_norm": 10.0, "beta_min": "1-0.8/d"},
    # Issue 22's controls, on the 1-bit rows only: the noise-matched STE (matched to the paper's
    # reading: same beta schedule, guide norm and perturbed set) and the smoothed-forward STE.
    "ste-noise": {"estimator": "ste-noise", "beta_min": 0.999, "guide_norm": 1.0},
    "ste-sr": {"estimator": "ste-sr"},
}
#: Estimators that run on some rows only (the others run on every row).
ESTIMATOR_ROWS = {"ste-noise": ("1bit",), "ste-sr": ("1bit",)}


@dataclass(frozen=True)
class Run:
    family: str
    row: str
    estimator: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.family}-{self.row}-{self.estimator}-lr{self.lr:g}-seed{self.seed}"


def _values(run: Run, out: Path) -> tuple[Path, dict[str, Any]]:
    config, family = FAMILIES[run.family]
    values: dict[str, Any] = {
        **family, **ROWS[run.row], **ESTIMATORS[run.estimator], "lr": run.lr, "seed": run.seed, "steps": STEPS,
        "eval_every": min(500, STEPS), "checkpoint_every": min(250, STEPS), "threads": 1, "progress": False, "out": str(out / run.name),
    }
    if values.get("beta_min") == "1-0.8/d":
        values["beta_min"] = 1.0 - 0.8 / perturbed_coordinates(CONFIGS / config, values)
    return CONFIGS / config, values


def perturbed_coordinates(config_path: Path, values: dict[str, Any]) -> int:
    """d: the number of quantized (perturbed) weights of the run's model."""
    import fogzo
    from fogzo.train import load_config
    from fogzo.train.data import data_dimensions
    from fogzo.train.trainer import build_quantized_model

    keys = ("model", "model_args", "bits", "ste")
    config = load_config(config_path, {k: values[k] for k in keys if k in values})
    model = build_quantized_model(config, data_dimensions(config))
    return sum(entry.param.numel() for entry in fogzo.PerturbedSet.from_model(model).tensors)


def command(run: Run, out: Path) -> list[str]:
    config, values = _values(run, out)
    args = [sys.executable, "-m", "fogzo.train", "--config", str(config)]
    for key, value in values.items():
        text = json.dumps(value) if isinstance(value, (dict, list)) else str(value).lower() if isinstance(value, bool) else value
        args.append(f"--{key.replace('_', '-')}={text}")
    if (out / run.name).exists() and not (out / run.name / "results.json").exists():
        args.append("--resume")
    return args


def result(run: Run, out: Path | None) -> dict[str, Any] | None:
    """The finished run's results: from the archive, else from its folder under ``out``."""
    if run.name in _archive:
        return _archive[run.name]["results"]
    path = None if out is None else out / run.name / "results.json"
    return json.loads(path.read_text()) if path is not None and path.exists() else None


def read_archive(path: Path) -> None:
    _archive.clear()
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                _archive[record["name"]] = record


def archive(run: Run, out: Path, path: Path) -> None:
    """Append the finished run (results, evaluation curve, command) to the tracked archive."""
    folder = out / run.name
    results = json.loads((folder / "results.json").read_text())
    curve = []
    metrics = folder / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            event = json.loads(line) if line.strip() else {}
            if event.get("event") in ("eval", "train") and (event["event"] == "eval" or event.get("step", 0) % 100 == 0):
                curve.append({k: v for k, v in event.items() if isinstance(v, (int, float, str)) or v is None})
    record = {"name": run.name, "run": {"family": run.family, "row": run.row, "estimator": run.estimator,
              "lr": run.lr, "seed": run.seed, "steps": STEPS}, "results": results, "curve": curve}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    _archive[run.name] = record


def score(record: dict[str, Any]) -> float:
    """Lower is better: −accuracy for images, perplexity for text; a diverged run is ``inf``."""
    if record.get("diverged"):
        return math.inf
    value = record.get(record["primary_metric"])
    if value is None or not math.isfinite(value):
        return math.inf
    return -value if record["higher_is_better"] else value


def needed(family: str, out: Path) -> list[Run]:
    runs = []
    for row in ROWS:
        for estimator in ESTIMATORS:
            if row not in ESTIMATOR_ROWS.get(estimator, (row,)):
                continue
            scored = _scorer(family, row, estimator, out)
            runs += [Run(family, row, estimator, lr, seed) for lr, seed in tuning.needed(LRS, SEEDS, scored)]
    return runs


def run_family(families: list[str], out: Path, workers: int, archive_path: Path = ARCHIVE) -> None:
    out.mkdir(parents=True, exist_ok=True)
    read_archive(archive_path)
    started, running, todo_all = time.time(), {}, {}
    with ThreadPoolExecutor(workers) as pool:
        while True:
            # Row by row (2-bit for every family, then 1-bit), so that whole rows finish first.
            pending = [run for family in families for run in needed(family, out) if run.name not in running]
            todo = sorted(pending, key=lambda run: list(ROWS).index(run.row))  # stable: family order within a row
            for run in todo[: max(0, workers - len(running))]:
                running[run.name] = pool.submit(_execute, run, out)
                todo_all[run.name] = run
            if not running:
                break
            done, _ = wait(list(running.values()), return_when=FIRST_COMPLETED)
            for name in [n for n, f in running.items() if f in done]:
                run = todo_all[name]
                code, wall = running.pop(name).result()
                if (out / name / "results.json").exists() and name not in _archive:
                    archive(run, out, archive_path)
                print(f"[{(time.time() - started) / 60:6.1f} min] {name}: exit {code} ({wall:.0f} s)", file=sys.stderr, flush=True)
                if code not in (0, 1):  # 1: a clean "diverged" stop, which has results
                    raise SystemExit(f"deep_study: {name} failed (exit {code}); see {out / name}.log")


def _execute(run: Run, out: Path) -> tuple[int, float]:
    started = time.time()
    with (out / f"{run.name}.log").open("a") as log:
        code = subprocess.run(command(run, out), stdout=log, stderr=subprocess.STDOUT).returncode
    return code, time.time() - started


def summarize(out: Path | None, archive_path: Path = ARCHIVE) -> str:
    """One Markdown row per family, row and estimator whose lr grid has run: the best lr, the
    held-out metric and final training loss (mean ± std over its seeds), wall time, and the
    first seed's metric at every tried lr."""
    read_archive(archive_path)
    lines = ["| family | row | estimator | best lr | seeds | held-out metric | final train loss | wall s / run | "
             "seed 0 at each tried lr |",
             "|---|---|---|---|---|---|---|---|---|"]

    def mean_std_text(values: list[float], digits: int) -> str:
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if not finite:
            return "–"
        mean = sum(finite) / len(finite)
        std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) if len(finite) > 1 else 0.0
        return f"{mean:.{digits}f} ± {std:.{digits}f}"

    for family in FAMILIES:
        for row in ROWS:
            for estimator in ESTIMATORS:
                found = best_runs(family, row, estimator, out)
                if found is None:
                    continue
                best, records = found
                metric = records[0]["primary_metric"]
                scale, digits, unit = (100.0, 1, " %") if records[0]["higher_is_better"] else (1.0, 2, " ppl")
                held_out = mean_std_text([r.get(metric) * scale if r.get(metric) is not None else None for r in records], digits)
                train_loss = mean_std_text([r.get("final_train_loss") for r in records], 3)
                wall = sum(r["wall_time"] for r in records) / len(records)
                tried = []
                for lr in tuning.tried_lrs(LRS, SEEDS[0], _scorer(family, row, estimator, out)):
                    first = result(Run(family, row, estimator, lr, SEEDS[0]), out)
                    value = first.get(metric) if first and not first.get("diverged") else None
                    tried.append(f"{lr:g}: " + ("diverged" if value is None else f"{value * scale:.{digits}f}"))
                lines.append(f"| {family} | {row} | {estimator} | {best:g} | {len(records)} | {held_out}{unit} | "
                             f"{train_loss} | {wall:.0f} | {'; '.join(tried)} |")
    return "\n".join(lines)


def _scorer(family: str, row: str, estimator: str, out: Path | None):
    def scored(lr: float, seed: int) -> float | None:
        record = result(Run(family, row, estimator, lr, seed), out)
        return None if record is None else score(record)

    return scored


def best_runs(family: str, row: str, estimator: str, out: Path | None) -> tuple[float, list[dict[str, Any]]] | None:
    """(best lr, its finished results over the seeds) once the lr grid has run, else None."""
    best = tuning.best_lr(LRS, SEEDS[0], _scorer(family, row, estimator, out))
    if best is None:
        return None
    records = [result(Run(family, row, estimator, best, seed), out) for seed in SEEDS]
    return best, [record for record in records if record]


LABELS = {"ste": "STE", "fogzo": "FOGZO (paper: ‖ĝ‖ = 1, β_min = 0.999)", "fogzo-best": "FOGZO best MNIST variant (‖ĝ‖ = 10)",
          "ste-noise": "noise-matched STE (to the paper's FOGZO)", "ste-sr": "smoothed-forward STE"}


def plot(out_dir: Path, archive_path: Path = ARCHIVE) -> list[Path]:
    """Training loss (mean of each 100 steps) against steps and against training seconds, each
    estimator at its best learning rate, mean ± std over its seeds: one PNG per family and row."""
    from fogzo.train.summaries import mean_curve, plot_curves

    read_archive(archive_path)
    written = []
    for family in FAMILIES:
        for row in ROWS:
            for x_key, x_label, suffix in (("step", "training step", "steps"), ("wall_time", "training seconds (1 core)", "time")):
                curves = []
                for estimator in ESTIMATORS:
                    found = best_runs(family, row, estimator, None)
                    if found is None or not found[1]:
                        continue
                    lr, records = found
                    curves_of = [_archive[Run(family, row, estimator, lr, seed).name]["curve"] for seed in SEEDS
                                 if Run(family, row, estimator, lr, seed).name in _archive]
                    points = [[point for point in curve if point.get("event") == "train"
                               and point.get("loss_avg") is not None] for curve in curves_of]
                    label = f"{LABELS[estimator]}, lr {lr:g}, {len(points)} seed{'s' if len(points) > 1 else ''}"
                    curve = mean_curve(label, [[(p["step"], p["loss_avg"]) for p in run] for run in points])
                    if x_key == "wall_time":  # the seeds' mean training time at each logged step
                        times = mean_curve(label, [[(p["step"], p["wall_time"]) for p in run] for run in points])
                        curve = dataclasses.replace(curve, x=times.mean)
                    curves.append(curve)
                if not curves:
                    continue
                path = out_dir / f"deep-{family}-{row}-{suffix}.png"
                plot_curves(path, curves, xlabel=x_label, ylabel="training loss (mean of 100 steps)", log_y=True,
                            title=f"{family}, {row}: each estimator at its best learning rate (mean ± std over seeds)")
                written.append(path)
    return written


def main() -> None:
    global STEPS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run", help="run (or continue) the families' tables")
    go.add_argument("families", help="comma-separated: resnet, vit, lm")
    go.add_argument("--out", type=Path, default=Path("results/deep"))
    go.add_argument("--workers", type=int, default=2)
    go.add_argument("--steps", type=int, default=2000, help="steps per run (a smoke test: a few, with another --out and --archive)")
    go.add_argument("--archive", type=Path, default=ARCHIVE, help="tracked record of finished runs (default: docs/data/deep.jsonl)")
    show = sub.add_parser("summarize", help="Markdown table of what has finished")
    show.add_argument("out", type=Path, nargs="?", default=None, help="also read run folders here (default: the archive only)")
    show.add_argument("--archive", type=Path, default=ARCHIVE)
    draw = sub.add_parser("plot", help="training-loss curves from the archive, one PNG per family and row")
    draw.add_argument("--to", type=Path, default=ROOT.parent / "docs" / "img", help="folder of the PNGs (default docs/img)")
    draw.add_argument("--archive", type=Path, default=ARCHIVE)
    args = parser.parse_args()
    if args.command == "run":
        families = [f for f in args.families.split(",") if f]
        unknown = [f for f in families if f not in FAMILIES]
        if unknown:
            raise SystemExit(f"deep_study: unknown family {unknown}; choose from {sorted(FAMILIES)}")
        STEPS = args.steps
        run_family(families, args.out, args.workers, args.archive)
    elif args.command == "plot":
        for path in plot(args.to, args.archive):
            print(path)
    else:
        print(summarize(args.out, args.archive))


if __name__ == "__main__":
    main()
