"""The paper's shallow-network study on real MNIST: STE vs FOGZO vs the n-SPSA ladder.

``fogzo reproduce mnist`` (or :func:`reproduce`) trains ``MLP((784, 10, 10))`` (7,960
parameters) with quantized weights from one initialisation per seed and one data order per
seed, with every estimator, its learning rate tuned by the procedure of
:mod:`fogzo.train.sweep` (STE and FOGZO) or on a fixed grid (the n-SPSA ladder), the runs
trained in parallel worker processes (``workers``, default: one per CPU core), and writes to
the output folder:

* ``config.json``: the resolved :class:`~fogzo.reproduce.mnist_config.MnistConfig`
  (``config_from_dict`` reads it back);
* ``runs.jsonl``: the sweep archive, one JSON object per finished run, appended as it
  finishes: the run (:func:`~fogzo.reproduce.mnist_runs.run_record`) and its ``"points"``,
  one per evaluation (see :func:`~fogzo.reproduce.mnist_runs.train_run`);
* ``summary.md``: the learning-rate grid, the best-lr comparison, the compute ratio and the
  paper's claims beside ours, with the command that produced it;
* ``loss_vs_iterations.png`` and ``loss_vs_compute.png``.

Counting rule: a forward pass over a mini-batch is 1 compute unit and a backward pass 2 units
(``EstimateInfo.compute_units``, summed over steps). STE costs 3 units a step, FOGZO(n)
3 + 2n, n-SPSA 2n (it runs without the extra unperturbed loss pass). Evaluation passes are
not counted. Wall time is training time only (evaluation excluded).

The study's pieces: :mod:`~fogzo.reproduce.mnist_config` (the config),
:mod:`~fogzo.reproduce.mnist_runs` (the plan and the loop of one run) and
:mod:`~fogzo.reproduce.mnist_report` (the analysis, ``summary.md`` and the plots). This module
checks the config and the output folder, runs the plan with :func:`fogzo.train.sweep.run_sweep`
and writes the outputs.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..train.config_io import ConfigError, config_to_dict, format_config
from ..train.records import RunInterrupted, check_output_folder, read_jsonl, write_text_atomic
from ..train.sweep import default_workers, read_archive, run_sweep
from .mnist_config import MnistConfig, load_config
from .mnist_report import MnistAnalysis, console_summary
from .mnist_runs import (
    MnistData,
    RunSpec,
    build_model,
    final_score,
    load_data,
    make_estimator,
    plan_runs,
    run_record,
    spsa_accepts_vectorize,
    train_run,
)
from .mnist_summary import write_outputs

__all__ = [
    "OUTPUT_FILES",
    "RESUME_FREE_FIELDS",
    "points_of",
    "prepare_output",
    "reproduce",
    "resummarize",
    "validate",
]

OUTPUT_FILES = ("config.json", "runs.jsonl", "summary.md", "loss_vs_iterations.png", "loss_vs_compute.png")


#: Fields a resumed run may change: they do not change any result.
RESUME_FREE_FIELDS = frozenset({"threads", "workers"})


def validate(config: MnistConfig) -> None:
    """Check what :class:`MnistConfig` cannot check alone, before any data is read.

    The device, and every estimator of the plan constructed exactly as the runs will
    construct it (FOGZO with ``config.fogzo``, n-SPSA with each ``spsa_n``), on the seed-0
    model: ``--fogzo.n=0`` fails here with the estimator's own message, not after
    the STE runs. Raises :class:`~fogzo.train.config_io.ConfigError`.
    """
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device={config.device!r} but CUDA is not available here (torch.cuda.is_available() is False)"
        )
    if config.device != "cpu" and (config.workers or 1) > 1:
        raise ConfigError(
            f"workers={config.workers} needs device='cpu'; on {config.device!r} the runs share one process"
        )
    model = build_model(config, 0)
    specs = [RunSpec("fogzo", config.fogzo.n, config.lrs[0], 0, config.iterations, config.eval_every)]
    specs += [RunSpec("spsa", n, config.spsa_lrs[0], 0, config.spsa_iterations_for(n), 1) for n in config.spsa_n]
    for spec in specs:
        try:
            make_estimator(spec, model, config)
        except (TypeError, ValueError) as error:
            where = (
                "the FOGZO options (--fogzo.KEY=VALUE)" if spec.estimator == "fogzo" else f"the n-SPSA rung n={spec.n}"
            )
            raise ConfigError(f"{where}: {error}") from None


def _differences(saved: MnistConfig, config: MnistConfig) -> list[str]:
    old, new = config_to_dict(saved), config_to_dict(config)
    return [
        f"{key}: saved {old.get(key)!r}, now {new[key]!r}"
        for key in new
        if key not in RESUME_FREE_FIELDS and old.get(key) != new[key]
    ]


def prepare_output(out: Path, config: MnistConfig, *, resume: bool, overwrite: bool) -> int:
    """Check the output folder before anything is written; return the number of finished runs kept.

    An empty or missing folder: a new study. A folder with files needs ``overwrite``
    (the earlier study's :data:`OUTPUT_FILES` are removed by :func:`reproduce`, nothing
    else) or ``resume``: its ``config.json`` must equal ``config`` (all fields but
    :data:`RESUME_FREE_FIELDS`) and the finished runs of its ``runs.jsonl`` are kept (each
    run is independent of the others, so they are not redone). Raises ``ConfigError``.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    check_output_folder(out)
    entries = sorted(entry.name for entry in out.iterdir()) if out.is_dir() else []
    if overwrite or not entries:
        return 0
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
        raise ConfigError(
            f"--resume: {out / 'config.json'} is unreadable ({error}); use --overwrite or another --out"
        ) from None
    differing = _differences(saved, config)
    if differing:
        raise ConfigError(
            f"cannot resume: the config differs from {out / 'config.json'} ({'; '.join(differing)}); "
            "resume with the same options, or use --overwrite or another --out"
        )
    try:
        return len(read_archive(out / "runs.jsonl"))
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"--resume: {out / 'runs.jsonl'} is unreadable ({error}); use --overwrite or another --out"
        ) from None


def points_of(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluation points of archive records (a ``runs.jsonl`` of an older fogzo, one
    point a line, is read as it is)."""
    return [point for record in records for point in record.get("points", [record])]


# The worker processes' state: the study's config, data and initial models (one per seed).
_WORKER: dict[str, Any] = {}


def _start_worker(config: MnistConfig, data: MnistData) -> None:
    _WORKER.clear()
    _WORKER.update(config=config, data=data, initial={})


def _run(spec: RunSpec) -> dict[str, Any]:
    config, initial = _WORKER["config"], _WORKER["initial"]
    if spec.seed not in initial:
        initial[spec.seed] = build_model(config, spec.seed).to(config.device)
    return run_record(spec, train_run(spec, config, initial[spec.seed], _WORKER["data"]))


def _describe(record: dict[str, Any]) -> str:
    score = final_score(record)
    return f"final train loss {score:.4f}" if score < math.inf else "diverged"


def reproduce(
    config: MnistConfig,
    out: str | Path,
    *,
    command: str = "fogzo reproduce mnist",
    echo: Callable[[str], None] = print,
    resume: bool = False,
    overwrite: bool = False,
) -> MnistAnalysis:
    """Run every planned run, write all outputs to ``out``, return the analysis.

    :func:`validate` and :func:`prepare_output` run first: a bad option or an output folder
    that holds files (without ``resume`` or ``overwrite``) is a ``ConfigError`` before any
    data is read or file written. With ``resume`` the finished runs of ``runs.jsonl`` are
    kept and only the others are run. Progress: one line per finished run on stderr. Ctrl-C
    raises :class:`~fogzo.train.records.RunInterrupted` (the finished runs are in
    ``runs.jsonl``; ``resume`` continues).
    """
    out = Path(out)
    validate(config)
    reused = prepare_output(out, config, resume=resume, overwrite=overwrite)
    echo(format_config(config))
    started = time.perf_counter()
    archive = out / "runs.jsonl"
    try:
        data = load_data(config)
        if len(data.train_x) < config.batch_size:
            raise ConfigError(
                f"the MNIST training set from {data.source} holds {len(data.train_x)} images, fewer than "
                f"batch_size={config.batch_size}; use the full data set or a smaller --batch-size=..."
            )
        if overwrite:
            for name in OUTPUT_FILES:
                (out / name).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.json", json.dumps(config_to_dict(config), indent=2) + "\n")
        if config.spsa_n and config.spsa_vectorize is not None and not spsa_accepts_vectorize():
            echo("note: fogzo.SPSA has no 'vectorize' option here; n-SPSA runs use a Python loop")
        results = run_sweep(
            lambda done: plan_runs(config, done),
            _run,
            archive,
            key=lambda spec: spec.key,
            workers=config.workers or (default_workers() if config.device == "cpu" else 1),
            threads=config.threads,
            initializer=_start_worker,
            initargs=(config, data),
            describe=_describe,
        )
        total = time.perf_counter() - started
        analysis = write_outputs(
            config,
            points_of(list(results.values())),
            out,
            command=command,
            total_wall_s=total,
            data_source=data.source,
            reused_runs=reused,
        )
    except KeyboardInterrupt:
        raise RunInterrupted(
            f"interrupted: {len(read_archive(archive))} runs are finished and saved in {archive}; "
            "the same command with --resume runs the rest"
        ) from None
    finally:
        _WORKER.clear()
    echo(console_summary(analysis, out, total))
    return analysis


def resummarize(out: str | Path, *, echo: Callable[[str], None] = print) -> MnistAnalysis:
    """Rewrite ``summary.md`` and the plots of an output folder from its ``config.json`` and
    ``runs.jsonl`` (no training). Works on a partial ``runs.jsonl`` of an interrupted run.

    The original command, total wall time and data source are kept from the old summary.
    """
    out = Path(out)
    config = load_config(out / "config.json")
    records = points_of(read_jsonl(out / "runs.jsonl"))
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
    echo(console_summary(analysis, out, total))
    return analysis
