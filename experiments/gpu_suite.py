"""The deep-network comparison at GPU scale, in one call that fits a 9-minute slot on one H200.

STE vs FOGZO on three families, several `fogzo train` processes at once on one GPU, bf16
autocast, fixed iterations (equal-iteration comparison), 2-bit weights, identity STE:

* LLaMA-10M (char-level, 10.7 M parameters) on Shakespeare, 3,000 steps of 32 × 256 tokens;
* ResNet-20 on Fashion-MNIST (32 × 32), 20 epochs at batch 128 (9,375 steps);
* the ViT-tiny of `vit_tiny_fmnist.toml` on Fashion-MNIST, 20 epochs at batch 128.

Each family runs STE, FOGZO in the paper's reading (β_min 0.999, ‖ĝ‖ = 1) and FOGZO with
‖ĝ‖ = 10, two seeds, at one learning rate per family (the CPU tables' best, docs/results.md).
Writes ``OUT/runs/<name>/`` (the trainer's usual folder), ``OUT/results.jsonl`` (one line per
finished run) and ``OUT/summary.md``. Runs still going at the deadline are stopped with a
checkpoint (their folders resume with ``--resume``) and marked unfinished.

    # on the CPU machine, once: the data the GPU machine cannot download
    python experiments/gpu_suite.py --prepare-data .gpu-data
    # a 2-step rehearsal of every run on the CPU (builds everything, bf16 autocast included)
    python experiments/gpu_suite.py --dry-run --data .gpu-data --out results/gpu-dry
    # on the GPU (PYTHONPATH=src; torch with CUDA; no network)
    python experiments/gpu_suite.py --data .gpu-data --out $OUT/gpu --deadline 510
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
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
    "fogzo-g10": {"estimator": "fogzo", "beta_min": 0.999, "guide_norm": 10.0},
}
FAMILIES = {
    "llama10m": (
        "llama1m_shakespeare.toml",
        {"model": "llama-10m", "batch_size": 32, "seq_len": 256, "steps": 3000, "lr": 1e-3, "eval_every": 1000},
    ),
    "resnet20": (
        "resnet20_fmnist.toml",
        {"batch_size": 128, "steps": 9375, "lr": 3e-3, "eval_every": 2345, "eval_size": 10000},
    ),
    "vit": (
        "vit_tiny_fmnist.toml",
        {"batch_size": 128, "steps": 9375, "lr": 1e-3, "eval_every": 2345, "eval_size": 10000},
    ),
}
SEEDS = (0, 1)


def jobs() -> list[Job]:
    return [
        Job(f"{family}-{estimator}-seed{seed}", config, {**values, **ESTIMATORS[estimator], "seed": seed})
        for family, (config, values) in FAMILIES.items()
        for estimator in ESTIMATORS
        for seed in SEEDS
    ]


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
    values.update(out=str(out / "runs" / job.name), threads=2, progress=False, checkpoint_every=500)
    if dry_run:
        # Every model at its full size, bf16 autocast included, on small batches: it checks that
        # each run builds and steps, not its speed (no deadline applies).
        values.update(steps=2, eval_every=0, eval_size=64, train_eval_size=64, device="cpu", autocast="bf16", batch_size=4)
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


def run_all(out: Path, data: Path | None, dry_run: bool, deadline: float, parallel: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.time()
    queue = jobs()
    running: dict[str, tuple[subprocess.Popen, object]] = {}
    finished: dict[str, int] = {}
    while queue or running:
        while queue and len(running) < parallel:
            job = queue.pop(0)
            log = (out / "runs" / f"{job.name}.log").open("w")
            process = subprocess.Popen(command(job, out, data, dry_run), stdout=log, stderr=subprocess.STDOUT, env=env)
            running[job.name] = (process, log)
            print(f"[{time.time() - started:6.1f} s] started {job.name}", flush=True)
        for name, (process, log) in list(running.items()):
            if process.poll() is not None:
                finished[name] = process.returncode
                log.close()
                del running[name]
                print(f"[{time.time() - started:6.1f} s] {name} exited {process.returncode}", flush=True)
        if time.time() - started > deadline:
            for name, (process, log) in running.items():
                process.send_signal(signal.SIGINT)  # the trainer checkpoints on Ctrl-C
            for name, (process, log) in running.items():
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                finished[name] = -1
                log.close()
            running.clear()
            queue.clear()
            print(f"deadline of {deadline:.0f} s reached", flush=True)
        time.sleep(0.5)
    write_summary(out, finished, time.time() - started, dry_run)


def write_summary(out: Path, finished: dict[str, int], wall: float, dry_run: bool) -> None:
    lines, records = [], []
    for job in jobs():
        results = out / "runs" / job.name / "results.json"
        record = json.loads(results.read_text()) if results.exists() else None
        records.append({"name": job.name, "exit": finished.get(job.name), "results": record})
    with (out / "results.jsonl").open("w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    lines.append(f"# GPU suite{' (dry run on CPU)' if dry_run else ''}\n")
    lines.append(f"Command: `{' '.join(sys.argv)}`; wall time {wall:.0f} s.\n")
    lines.append("| run | exit | final metrics |\n|---|---|---|")
    for record in records:
        metrics = record["results"] or {}
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        text = ", ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items())[:8]) or "unfinished"
        lines.append(f"| {record['name']} | {record['exit']} | {text} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print((out / "summary.md").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/gpu"))
    parser.add_argument("--data", type=Path, help="folder written by --prepare-data (default: the local installs)")
    parser.add_argument("--prepare-data", type=Path, metavar="FOLDER", help="write the data to carry, then exit")
    parser.add_argument("--dry-run", action="store_true", help="2 steps of every run on the CPU")
    parser.add_argument("--deadline", type=float, default=510.0, help="stop every run after this many seconds")
    parser.add_argument("--parallel", type=int, default=18, help="runs at a time")
    args = parser.parse_args()
    if args.prepare_data:
        prepare_data(args.prepare_data)
        return
    deadline = float("inf") if args.dry_run else args.deadline
    run_all(args.out, args.data, args.dry_run, deadline, 2 if args.dry_run else args.parallel)


if __name__ == "__main__":
    main()
