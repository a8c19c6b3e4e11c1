"""The deep-network comparison at GPU scale, in one call that fits a 9-minute slot on one H200.

STE vs FOGZO on three families, several `fogzo train` processes at once on one GPU, bf16
autocast, fixed iterations (equal-iteration comparison), 2-bit weights, identity STE:

* LLaMA-10M (char-level, 10.7 M parameters) on Shakespeare, 2,000 steps of 32 × 256 tokens;
* ResNet-20 on Fashion-MNIST (32 × 32), 2,500 steps at batch 128 (5.3 epochs);
* the ViT-tiny of `vit_tiny_fmnist.toml` on Fashion-MNIST, 2,500 steps at batch 128.

Sized from the first run on an H200 (docs/results.md §5): with all 18 runs sharing the GPU a
FOGZO run made 4.7 (LLaMA-10M), 6.0 (ResNet-20) and 6.6 (ViT) steps per second, data and
evaluation included, so 20 epochs of the image models (9,375 steps) would take ~25 minutes;
these step counts end inside the 480 s deadline at those rates.

Each family runs STE, FOGZO in the paper's reading (β_min 0.999, ‖ĝ‖ = 1) and FOGZO's best
variant of the CPU tables (‖ĝ‖ = 10, β_min = 1 − 0.8/d, d = the model's quantized weights), two
seeds, each estimator at its tuned learning rate of the CPU tables (docs/results.md §5). Every run evaluates EVALS = 8 times, at the same steps, and
checkpoints there. Runs still going at the deadline are stopped (SIGINT: the trainer saves a
checkpoint, ``--resume`` continues the folder), so the summary compares each family at the last
evaluation step that all its runs reached. Writes ``OUT/runs/<name>/`` (the trainer's usual
folders), ``OUT/results.jsonl`` (one line per run: exit code, steps, median seconds per step,
every evaluation, results), ``OUT/summary.md`` and ``OUT/runs.tar.gz`` (every run's config,
metrics, results and log, no checkpoints: what the device tool can bring back). ``--summarize``
rewrites the summary from the run folders (e.g. after unpacking the archive), ``--plot FOLDER``
draws each family's training curves.

    # on the CPU machine, once: the data the GPU machine cannot download
    python experiments/gpu_suite.py --prepare-data .gpu-data
    # a 2-step rehearsal of every run on the CPU (builds everything, bf16 autocast included)
    python experiments/gpu_suite.py --dry-run --data .gpu-data --out results/gpu-dry
    # on the GPU (PYTHONPATH=src; torch with CUDA; no network)
    python experiments/gpu_suite.py --data .gpu-data --out /tmp/gpu --deadline 480
    # here again, from the archive of the run folders
    tar xzf runs.tar.gz -C FOLDER && python experiments/gpu_suite.py --summarize --out FOLDER
    python experiments/gpu_suite.py --plot docs/img --out FOLDER
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CONFIGS = ROOT / "configs"


@dataclass(frozen=True)
class Job:
    name: str
    config: str
    values: dict[str, object] = field(default_factory=dict)


ESTIMATORS = {
    "ste": {"estimator": "ste"},
    "fogzo": {"estimator": "fogzo", "beta_min": 0.999, "guide_norm": 1.0},
    "fogzo-best": {"estimator": "fogzo", "guide_norm": 10.0, "beta_min": "1-0.8/d"},
}
# Each family's steps come in EVALS equal parts, so runs stopped at the deadline still share
# evaluation points (the summary compares every estimator at the last point all its runs reached).
EVALS = 8
FAMILIES = {
    "llama10m": (
        "llama1m_shakespeare.toml",
        {"model": "llama-10m", "batch_size": 32, "seq_len": 256, "steps": 2000},
    ),
    "resnet20": (
        "resnet20_fmnist.toml",
        {"batch_size": 128, "steps": 2500, "eval_size": 10000, "train_eval_size": 10000},
    ),
    "vit": (
        "vit_tiny_fmnist.toml",
        {"batch_size": 128, "steps": 2500, "eval_size": 10000, "train_eval_size": 10000},
    ),
}
# Each estimator at its tuned learning rate of the CPU tables (docs/results.md §5, 2-bit: LM
# 224 k, ResNet-20 w8, ViT 118 k). The first H200 run (2026-12-04) gave the ViT 1e-3 for all
# three: its CPU table did not exist yet.
LRS = {
    "llama10m": {"ste": 1e-3, "fogzo": 3e-2, "fogzo-best": 1e-3},
    "resnet20": {"ste": 3e-3, "fogzo": 1e-2, "fogzo-best": 1e-2},
    "vit": {"ste": 3e-3, "fogzo": 3e-3, "fogzo-best": 3e-3},
}
SEEDS = (0, 1)


def jobs() -> list[Job]:
    return [
        Job(
            f"{family}-{estimator}-seed{seed}",
            config,
            {**values, **ESTIMATORS[estimator], "lr": LRS[family][estimator], "seed": seed,
             "eval_every": values["steps"] // EVALS},
        )
        for family, (config, values) in FAMILIES.items()
        for estimator in ESTIMATORS
        for seed in SEEDS
    ]


def family_of(name: str) -> str:
    return name.split("-")[0]


def estimator_of(name: str) -> str:
    return name.split("-", 1)[1].rsplit("-seed", 1)[0]


def prepare_data(folder: Path) -> None:
    """Copy Fashion-MNIST's IDX files and Shakespeare's text into ``folder`` (to carry)."""
    from fogzo.data import load_shakespeare
    from fogzo.data import images

    folder.mkdir(parents=True, exist_ok=True)
    source = next(
        (f for f in (images.ENV_FASHION_MNIST_DIR, images.SYSTEM_FASHION_MNIST_DIR) if Path(f).is_dir()), None
    )
    if source is None:
        raise SystemExit("gpu_suite: Fashion-MNIST is not installed here: run `make data` first")
    target = folder / "fashion-mnist"
    target.mkdir(exist_ok=True)
    for file in Path(source).glob("*-ubyte*"):
        shutil.copy2(file, target / file.name)
    (folder / "shakespeare.txt").write_text(load_shakespeare(), encoding="utf-8")
    print(f"wrote {target} and {folder / 'shakespeare.txt'}")


def command(job: Job, out: Path, data: Path | None, dry_run: bool) -> list[str]:
    values = dict(job.values)
    values.update(out=str(out / "runs" / job.name), threads=1, progress=False, checkpoint_every=values["eval_every"])
    if values.get("beta_min") == "1-0.8/d":
        values["beta_min"] = 1.0 - 0.8 / _coordinates(job.config, values.get("model"))
    if dry_run:
        # Every model at its full size, bf16 autocast included, on small batches: it checks that
        # each run builds and steps, not its speed (no deadline applies).
        values.update(steps=2, eval_every=1, checkpoint_every=1, eval_size=64, train_eval_size=64, device="cpu",
                      autocast="bf16", batch_size=4)
        if "seq_len" in values:
            values["seq_len"] = 64
    else:
        values.update(device="cuda", autocast="bf16")
    if data is not None:
        if "llama" in job.name:
            values["text_file"] = str(data / "shakespeare.txt")
        else:
            values["data_dir"] = str(data / "fashion-mnist")
    args = [sys.executable, "-m", "fogzo.train", "--config", str(CONFIGS / job.config)]
    args += [f"--{key.replace('_', '-')}={value}" for key, value in values.items()]
    return args


@functools.cache
def _coordinates(config: str, model: str | None) -> int:
    """d of the family's model (quantized weights), for the best variant's β_min = 1 − 0.8/d."""
    from deep_study import perturbed_coordinates

    values = {"bits": 2, "ste": "identity", **({"model": model} if model else {})}
    return perturbed_coordinates(CONFIGS / config, values)


def run_all(out: Path, data: Path | None, dry_run: bool, deadline: float, parallel: int) -> None:
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"gpu_suite: {out} is not empty; choose another --out (nothing is overwritten)")
    (out / "runs").mkdir(parents=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.time()
    queue = jobs()
    commands = {job.name: command(job, out, data, dry_run) for job in queue}  # β_min's d before any start
    running: dict[str, tuple[subprocess.Popen, object]] = {}
    finished: dict[str, int] = {}
    while queue or running:
        while queue and len(running) < parallel:
            job = queue.pop(0)
            log = (out / "runs" / f"{job.name}.log").open("w")
            process = subprocess.Popen(commands[job.name], stdout=log, stderr=subprocess.STDOUT, env=env)
            running[job.name] = (process, log)
            print(f"[{time.time() - started:6.1f} s] started {job.name}", flush=True)
        for name, (process, log) in list(running.items()):
            if process.poll() is not None:
                finished[name] = process.returncode
                log.close()
                del running[name]
                print(f"[{time.time() - started:6.1f} s] {name} exited {process.returncode}", flush=True)
        if running and time.time() - started > deadline:
            print(f"deadline of {deadline:.0f} s reached: stopping {len(running)} runs (checkpoint each)", flush=True)
            for process, _ in running.values():
                process.send_signal(signal.SIGINT)  # the trainer stops after the step and checkpoints
            grace = time.time() + 40  # one shared grace period, not one per run
            for name, (process, log) in running.items():
                try:
                    process.wait(timeout=max(0.1, grace - time.time()))
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
                finished[name] = process.returncode
                log.close()
            running.clear()
            queue.clear()
        time.sleep(0.5)
    write_summary(out, finished, time.time() - started, dry_run)
    bundle(out)


def bundle(out: Path) -> None:
    """``OUT/runs.tar.gz``: every run's config, metrics, results and log, no checkpoints (the
    device tool brings back a few files two folders deep at most)."""
    with tarfile.open(out / "runs.tar.gz", "w:gz") as tar:
        for path in sorted((out / "runs").rglob("*")):
            if path.is_file() and path.suffix != ".pt":
                tar.add(path, arcname=str(path.relative_to(out)))


def run_lr(out: Path, job: Job) -> float:
    """The learning rate the run used (its saved config; an older suite's runs may differ from
    today's ``LRS``), else the one it would use."""
    config = out / "runs" / job.name / "config.json"
    return json.loads(config.read_text())["lr"] if config.exists() else job.values["lr"]


def _records(out: Path, name: str) -> list[dict]:
    """The run's metrics.jsonl records (none if it never started)."""
    from fogzo.train.records import read_jsonl

    metrics = out / "runs" / name / "metrics.jsonl"
    return read_jsonl(metrics) if metrics.exists() else []


def run_record(out: Path, name: str, exit_code: int | None) -> dict:
    """What one run reached: its evaluations, its steps, its time per step (from metrics.jsonl,
    so a run stopped at the deadline counts too) and its results when it finished."""
    folder = out / "runs" / name
    records = _records(out, name)
    train = [r for r in records if r.get("event") == "train"]
    results = folder / "results.json"
    return {
        "name": name,
        "exit": exit_code,
        "steps": train[-1]["step"] if train else 0,
        "step_time": statistics.median(r["step_time"] for r in train[len(train) // 4:]) if train else None,
        "evals": {r["step"]: _metrics(r) for r in records if r.get("event") == "eval"},
        "results": json.loads(results.read_text()) if results.exists() else None,
    }


def _metrics(record: dict) -> dict:
    """The held-out and train-eval metrics of an eval record or results.json (not their timing)."""
    return {k: v for k, v in record.items() if k.startswith(("eval_", "train_eval_")) and k != "eval_time"}


def write_summary(out: Path, finished: dict[str, int], wall: float, dry_run: bool) -> None:
    runs = [run_record(out, job.name, finished.get(job.name)) for job in jobs()]
    for run in runs:  # the final evaluation counts as the evaluation at the last step
        if run["results"]:
            run["evals"][run["results"]["steps_done"]] = _metrics(run["results"])
    with (out / "results.jsonl").open("w") as handle:
        for run in runs:
            handle.write(json.dumps(run) + "\n")
    title = "GPU suite" + (" (dry run on CPU)" if dry_run else "")
    lines = [f"# {title}\n", f"Command: `{' '.join(sys.argv)}`; wall time {wall:.0f} s.\n",
             "| run | lr | exit | steps | s / step | last eval (step: metric) |", "|---|---|---|---|---|---|"]
    lrs = {job.name: run_lr(out, job) for job in jobs()}
    for run in runs:
        last = max(run["evals"], default=None)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in run["evals"][last].items()) if last is not None else "none"
        step_time = f"{run['step_time']:.4f}" if run["step_time"] else "-"
        lines.append(f"| {run['name']} | {lrs[run['name']]:g} | {run['exit']} | {run['steps']} | {step_time} | {last}: {shown} |")
    lines += ["", "Per family, every estimator at the last evaluation step that all of the family's runs",
              "reached (mean over seeds; the seeds' values in brackets; s / step is the median over the",
              "run's last three quarters, with all runs sharing the GPU):", "",
              "| family | step | estimator | metric | seeds | s / step |", "|---|---|---|---|---|---|"]
    for family in FAMILIES:
        mine = [run for run in runs if family_of(run["name"]) == family]
        common = set.intersection(*(set(run["evals"]) for run in mine)) if mine else set()
        if not common:
            lines.append(f"| {family} | - | - | no evaluation reached by every run | - | - |")
            continue
        step = max(common)
        metric = "eval_ppl" if "eval_ppl" in mine[0]["evals"][step] else "eval_accuracy"
        for estimator in ESTIMATORS:
            values = [run["evals"][step][metric] for run in mine if estimator_of(run["name"]) == estimator]
            times = [run["step_time"] for run in mine if estimator_of(run["name"]) == estimator and run["step_time"]]
            seeds = ", ".join(f"{v:.4g}" for v in values)
            time_text = f"{statistics.mean(times):.4f}" if times else "-"
            lines.append(f"| {family} | {step} | {estimator} | {metric} {statistics.mean(values):.4g} | [{seeds}] | {time_text} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print((out / "summary.md").read_text())


def plot(out: Path, images: Path) -> list[Path]:
    """Training loss (mean of each 100 steps) against steps, mean ± std over the seeds, one PNG
    per family (``images/gpu-deep-<family>.png``), from the run folders under ``out``; a run
    stopped early shortens its estimator's curve to the steps every seed reached."""
    from fogzo.train.summaries import mean_curve, plot_curves

    written = []
    for family in FAMILIES:
        curves = []
        for estimator in ESTIMATORS:
            mine = [job for job in jobs() if family_of(job.name) == family and estimator_of(job.name) == estimator]
            runs = []
            for job in mine:
                train = [r for r in _records(out, job.name) if r.get("event") == "train"]
                if not train:
                    continue
                windows: dict[int, list[float]] = {}
                for record in train:
                    windows.setdefault((record["step"] - 1) // 100, []).append(record["loss"])
                runs.append([(100 * (w + 1), statistics.mean(v)) for w, v in sorted(windows.items()) if len(v) == 10])
            if runs:
                lr = run_lr(out, mine[0])
                curves.append(mean_curve(f"{estimator}, lr {lr:g}, {len(runs)} seeds", runs))
        if curves:
            path = images / f"gpu-deep-{family}.png"
            plot_curves(path, curves, xlabel="training step", ylabel="training loss (mean of 100 steps)", log_y=True,
                        title=f"{family} on one H200 (18 runs sharing it), 2-bit: mean ± std over seeds")
            written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/gpu"))
    parser.add_argument("--data", type=Path, help="folder written by --prepare-data (default: the local installs)")
    parser.add_argument("--prepare-data", type=Path, metavar="FOLDER", help="write the data to carry, then exit")
    parser.add_argument("--dry-run", action="store_true", help="2 steps of every run on the CPU")
    parser.add_argument("--deadline", type=float, help="stop every run after this many seconds (default 480; none in a dry run)")
    parser.add_argument("--parallel", type=int, default=18, help="runs at a time")
    parser.add_argument("--summarize", action="store_true",
                        help="rewrite summary.md and results.jsonl from the run folders under --out, then exit")
    parser.add_argument("--plot", type=Path, metavar="FOLDER",
                        help="write gpu-deep-<family>.png plots of the runs under --out into FOLDER, then exit")
    args = parser.parse_args()
    if args.deadline is not None and not args.deadline > 0:
        parser.error(f"--deadline must be a positive number of seconds, got {args.deadline:g}")
    if args.parallel < 1:
        parser.error(f"--parallel must be at least 1, got {args.parallel}")
    if (args.plot or args.summarize) and not (args.out / "runs").is_dir():
        parser.error(f"{args.out} holds no runs/ folder (a suite's --out, or an unpacked runs.tar.gz)")
    if args.plot:
        for path in plot(args.out, args.plot):
            print(f"wrote {path}")
        return
    if args.summarize:
        previous = args.out / "results.jsonl"
        exits = {r["name"]: r["exit"] for r in map(json.loads, previous.read_text().splitlines())} if previous.exists() else {}
        write_summary(args.out, exits, float("nan"), dry_run=False)
        return
    if args.prepare_data:
        prepare_data(args.prepare_data)
        return
    deadline = args.deadline if args.deadline is not None else (float("inf") if args.dry_run else 480.0)
    run_all(args.out, args.data, args.dry_run, deadline, 2 if args.dry_run else args.parallel)


if __name__ == "__main__":
    main()
