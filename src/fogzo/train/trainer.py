"""The training loop behind ``fogzo train``: build, (resume,) train, log, checkpoint, evaluate.

The loop's pieces: :mod:`~fogzo.train.build` (model, estimator, optimizer, schedule),
:mod:`~fogzo.train.checks` (what is checked before any data is read),
:mod:`~fogzo.train.checkpoint` (the run folder, checkpoints, resume), :mod:`~fogzo.train.step`
(one step, calibration), :mod:`~fogzo.train.parallel` (collectives over ranks) and
:mod:`~fogzo.train.records` (metrics files, progress).

Outputs in the run folder (``config.output_dir()``):

* ``config.json`` — the resolved config (flat: usable again as ``--config``) plus a
  ``_resolved`` record (data set actually loaded, model size, total steps, device, command);
* ``metrics.jsonl`` — one JSON object per line: ``{"event": "train", "step", "loss",
  "loss_avg", "lr", "beta", "phase", "forward_passes", "backward_passes", "compute_units",
  "wall_time", "step_time", ...}`` every ``log_every`` steps (passes and compute units
  cumulative; a forward is 1 unit, a backward 2); ``{"event": "eval", ...}`` for each
  evaluation; ``{"event": "final", ...}`` at the end;
* ``checkpoint.pt`` — model, optimizer, LR scheduler, ``estimator.state_dict()``, data stream
  state (generator, epoch order, position), global RNG state, step and counters;
* ``results.json`` — the final metrics of a finished (or diverged) run.

Every JSON file is strict JSON: a NaN or infinite value (a diverged loss) is written as
``null`` and named in the record's ``"nonfinite"`` field (``{"loss": "nan"}``);
:func:`fogzo.train.records.read_jsonl` / ``read_json`` restore the floats.
``config.json``, ``results.json`` and ``checkpoint.pt`` are written to a temporary file and
renamed, so a crash never leaves half a file.

Never losing a result. A run folder that holds files is refused (:class:`ConfigError`)
unless ``resume`` (its checkpoint's config must match, keys outside ``RUN_CONTROL_KEYS``)
or ``overwrite`` (its config.json, metrics.jsonl, results.json and checkpoint.pt are
removed; nothing else). Ctrl-C stops the run after the current step and saves a
checkpoint (:class:`TrainingInterrupted`). Everything that can be checked without data
(:func:`check_config`) is checked before the folder is touched or the data loaded.

Progress: a tqdm bar on stderr when it is a terminal; otherwise (a log file, a batch
system) one line every ``progress_every`` steps (0: about 20 per run); rank 0 only.

Data parallelism. Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` in the environment)
:func:`train` joins the process group (:func:`fogzo.distributed.init_from_env`: gloo on CPU,
nccl on ``cuda:LOCAL_RANK``), wraps the model in DDP and hands the DDP module to the
estimator. ``batch_size`` stays the *global* batch: every rank draws the same global batch
and trains on its equal share, so N ranks follow the 1-process trajectory up to float
summation order. Only rank 0 prints, shows the progress bar and writes files; logged
losses are means over ranks. Checkpoints hold the unwrapped model and global-batch stream
states, so a run can resume with a different world size (see ``docs/distributed.md``).

Wall time (``wall_time``) counts training steps only (data, estimate, optimizer step);
evaluation and checkpointing are excluded, also from ``time_budget``.

Time budget. With ``time_budget`` the run stops once that many seconds of training are
spent (or at ``T`` steps, whichever comes first). The schedules (LR warm-up + cosine, the
FOGZO β schedule and ``ste_fraction``) need ``T`` up front. ``budget_steps="given"`` uses
``T = steps``. ``budget_steps="measure"`` (the default; ``steps`` is then ignored) times
``calibration_steps`` STE steps and, for FOGZO/SPSA, as many estimator steps on a throw-away
copy of the model (after one untimed warm-up step each; the median is used), then sets
``T = floor(budget / (r·t_ste + (1 − r)·t_est))`` with ``r = ste_fraction``. The copy, the
data stream state and the global RNG are restored, so calibration does not change the run;
its duration is reported (``calibration_s``) and not charged to the budget. ``T`` is saved
in the checkpoint, so a resumed run keeps it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import distributed as fd
from .. import quantized_layers
from ..diagnostics import diagnose as fogzo_diagnose
from ..estimators import derive_seed
from ..models import count_parameters
from .build import build_estimator, build_optimizer, build_quantized_model, build_scheduler, resolve_device, warmup_length
from .checkpoint import (
    CHECKPOINT,
    CONFIG,
    METRICS,
    RESULTS,
    _atomic_save,
    _kept_records,
    _remove_outputs,
    _rng_state,
    _seed_rank_rng,
    _set_rng_state,
    _write_json,
    prepare_output,
)
from .checks import check_config, check_text_tokens
from .config import ConfigError, TrainConfig
from .data import build_data
from .diagnosis_log import DIAGNOSE_STREAM, diagnosis_record, write_diagnostics_report
from .parallel import _barrier, _broadcast_buffers, _config_digest, _mean_over_ranks, _synchronize, launch_world_size
from .records import JsonlLogger, RunInterrupted, progress
from .step import StepRunner, _phase, calibrate

__all__ = [
    "TrainingInterrupted",
    "train",
]


# ---------------------------------------------------------------------------- interrupts


class TrainingInterrupted(RunInterrupted):
    """Ctrl-C stopped :func:`train` between two steps, after it saved a checkpoint.

    A ``KeyboardInterrupt`` (so a loop over runs stops too) that says where the checkpoint
    is: ``step``, ``total_steps``, ``checkpoint`` (a path). ``--resume`` continues the run.
    """

    def __init__(self, step: int, total_steps: int, checkpoint: Path) -> None:
        super().__init__(
            f"interrupted after step {step} of {total_steps}; checkpoint saved to {checkpoint}: "
            "continue with --resume"
        )
        self.step, self.total_steps, self.checkpoint = step, total_steps, checkpoint


class _StopRequest:
    """The first SIGINT (Ctrl-C) during training asks the loop to stop after the current step
    (it then saves a checkpoint); a second one raises ``KeyboardInterrupt`` at once.

    Installed only in the main thread (elsewhere Python delivers no signals); the previous
    handler is restored on exit.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.requested = False
        self._enabled = enabled and threading.current_thread() is threading.main_thread()
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        # os.write: no Python-level stream lock (the interrupted code may hold stderr's).
        os.write(2, b"\nfogzo: interrupt: stopping after this step and saving a checkpoint (Ctrl-C again stops at once)\n")

    def __enter__(self) -> _StopRequest:
        if self._enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._enabled:
            signal.signal(signal.SIGINT, self._previous)


# -------------------------------------------------------------------------------- train


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    command: list[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) one training run; returns the results record (also in ``results.json``).

    Before anything is read or written, :func:`check_config` checks the config and
    :func:`prepare_output` the run folder: a folder that holds files is refused unless
    ``resume`` (same config) or ``overwrite``; errors are :class:`ConfigError`.

    With ``stop_at`` the run saves a checkpoint after that step and returns a record with
    ``"stop_reason": "stop_at"`` and no final evaluation; ``resume=True`` continues it.
    With ``deterministic`` the run uses ``torch.use_deterministic_algorithms(True)`` (needed
    for bit-reproducible CUDA runs; see ``docs/reproducibility.md``).
    A non-finite training loss, or an estimator's ``FloatingPointError`` (a non-finite
    perturbed loss), ends the run as ``"diverged"``: metrics and ``results.json`` are written
    (``"diverged": true``), no checkpoint. Ctrl-C (SIGINT) stops the run after the current
    step, saves a checkpoint and raises :class:`TrainingInterrupted`.

    Under torchrun (``WORLD_SIZE`` > 1) this joins the process group (and leaves it joined:
    :func:`fogzo.distributed.cleanup` ends it; the CLI does) and trains with DDP; every rank
    returns the same record. ``log`` is called on rank 0 only.
    """
    world = launch_world_size()
    # Before any collective, folder or data: every rank raises alike.
    check_config(config, world)
    out = config.output_dir()
    checkpoint = prepare_output(out, config, resume=resume, overwrite=overwrite)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    with _deterministic(config.deterministic):
        return _train(config, checkpoint, out, world, resume=resume, overwrite=overwrite, command=command, log=log)


@contextlib.contextmanager
def _deterministic(enabled: bool):
    """``torch.use_deterministic_algorithms(True)`` inside the block (previous setting after it).

    cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` for deterministic results; it is set to
    ``:4096:8`` unless given (it must be set before the process's first CUDA matmul).
    """
    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _train(
    config: TrainConfig,
    checkpoint: dict[str, Any] | None,
    out: Path,
    world: int,
    *,
    resume: bool,
    overwrite: bool,
    command: list[str] | None,
    log: Callable[[str], None] | None,
) -> dict[str, Any]:
    device = resolve_device(config.device)
    if world > 1:
        device = fd.init_from_env(device=device.type)
    rank = fd.rank()
    main = rank == 0
    if not main or log is None:
        log = (lambda message: None) if not main else (lambda message: print(message, flush=True))
    if world > 1:
        fd.check_same_on_all_ranks(config.seed, "seed (model init, data order, estimator noise)")
        fd.check_same_on_all_ranks(_config_digest(config), "the training config")
    checkpoint_path = out / CHECKPOINT
    if checkpoint is not None:
        saved_world = int(checkpoint.get("world_size", 1))
        log(
            f"resuming from {checkpoint_path} at step {checkpoint['step']}"
            + (f" (saved by {saved_world} ranks, now {world})" if saved_world != world else "")
        )
    elif resume:
        log(f"--resume: no checkpoint in {out}; starting from scratch")
    if world > 1:
        # Every rank must agree on whether (and from which step) it resumes.
        fd.check_same_on_all_ranks(-1 if checkpoint is None else int(checkpoint["step"]), "the resumed step")

    try:
        data = build_data(config, device, log, rank=rank, world_size=world)
    except (FileNotFoundError, ValueError) as error:  # data missing, malformed, or too small
        raise ConfigError(f"cannot load the data: {error}") from None
    if data.kind == "text":
        check_text_tokens(data.sizes["train_tokens"] + data.sizes["val_tokens"], f"the text ({data.name})", config)
    if main:
        if overwrite:
            removed = _remove_outputs(out)
            if removed:
                log(f"--overwrite: removed the earlier run's {', '.join(removed)} from {out}")
        out.mkdir(parents=True, exist_ok=True)
    model = build_quantized_model(config, data.dims).to(device)
    model.train()
    if world > 1 and rank > 0:
        # Dropout masks: rank 0 keeps the 1-process RNG stream, the others get their own.
        _seed_rank_rng(config.seed, 0, rank, device)

    calibration: dict[str, Any] = {}
    if checkpoint is not None:
        total_steps = int(checkpoint["total_steps"])
        calibration = checkpoint.get("calibration") or {}
    elif config.time_budget is not None and config.budget_steps == "measure":
        calibration = calibrate(config, model, data, device, log)
        total_steps = calibration["total_steps"]
    else:
        total_steps = config.steps
    fd.check_same_on_all_ranks(total_steps, "total steps T")

    if checkpoint is not None:
        state = checkpoint["model"]
        model.load_state_dict({key.removeprefix("module."): value for key, value in state.items()})
    ddp = fd.wrap_ddp(model)  # the model itself in one process
    estimator = build_estimator(config, ddp, total_steps)
    if world > 1 and getattr(estimator, "counter", None) is not None:
        fd.check_same_on_all_ranks(estimator.counter.seed, "estimator seed")
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, total_steps)
    scaler = None
    if config.autocast == "fp16":
        scaler = torch.amp.GradScaler(device.type)
    runner = StepRunner(config, ddp, data, estimator, optimizer, scheduler, device, scaler)

    counters = {"forward_passes": 0, "backward_passes": 0, "compute_units": 0, "zero_differences": 0, "differences": 0}
    phase_time: dict[str, float] = {}
    phase_steps: dict[str, int] = {}
    step, elapsed = 0, 0.0
    recent: deque[float] = deque(maxlen=50)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        estimator.load_state_dict(checkpoint["estimator"])
        data.stream.load_state_dict(checkpoint["data"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        step, elapsed = int(checkpoint["step"]), float(checkpoint["elapsed"])
        # The global RNG (dropout, nothing else: data and noise have their own generators).
        # Rank r restores the state rank r saved; a rank the checkpoint has no state for
        # (more ranks than before) is seeded from (seed, step, rank).
        saved_world = int(checkpoint.get("world_size", 1))
        states = checkpoint.get("rng_per_rank") or [checkpoint["rng"]]
        if rank < min(saved_world, len(states)):
            _set_rng_state(states[rank], device)
        else:
            _seed_rank_rng(config.seed, step, rank, device)
        counters.update(checkpoint["counters"])
        phase_time.update(checkpoint["phase_time"])
        phase_steps.update(checkpoint["phase_steps"])
        recent.extend(checkpoint["recent_losses"])
    kept = _kept_records(out / METRICS, step) if checkpoint is not None and main else []

    layers = [name for name, _ in quantized_layers(model)]
    resolved = {
        "data": data.describe(),
        "model_parameters": count_parameters(model),
        "quantized_layers": len(layers),
        "quantized_parameters": sum(
            layer._parameters[name].numel() for _, layer in quantized_layers(model) for name, _ in layer.quantized_weights()
        ),
        "total_steps": total_steps,
        "warmup_steps": warmup_length(config, total_steps),
        "ste_steps": round(config.ste_fraction * total_steps) if config.estimator == "fogzo" else None,
        "calibration": calibration,
        "device": str(device),
        "world_size": world,
        "batch_size_per_rank": config.batch_size // world,
        "backend": dist.get_backend() if fd.is_distributed() else None,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": command if command is not None else sys.argv,
        "resumed_from_step": step if checkpoint is not None else None,
        "resumed_from_world_size": int(checkpoint.get("world_size", 1)) if checkpoint is not None else None,
    }
    config_record = {**config.to_dict(), "_resolved": resolved}
    if main:
        _write_json(out / CONFIG, config_record)
    log("resolved config:\n" + json.dumps(config_record, indent=2, default=str))

    def save_checkpoint() -> None:
        # A collective under DDP (the ranks' RNG states are gathered); rank 0 writes.
        rng = _rng_state(device)
        per_rank = None
        if fd.is_distributed():
            per_rank = [None] * world
            dist.all_gather_object(per_rank, rng)
        if not main:
            return
        _atomic_save(
            {
                "config": config.to_dict(),
                "step": step,
                "total_steps": total_steps,
                "world_size": world,
                "model": model.state_dict(),  # the unwrapped model: no "module." prefix
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "estimator": estimator.state_dict(),
                "data": data.stream.state_dict(),  # in global batches
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng,
                "rng_per_rank": per_rank,
                "elapsed": elapsed,
                "counters": dict(counters),
                "phase_time": dict(phase_time),
                "phase_steps": dict(phase_steps),
                "recent_losses": list(recent),
                "calibration": calibration,
            },
            checkpoint_path,
        )

    # A resumed run keeps the records up to its checkpoint (rewritten atomically), then appends.
    logger = JsonlLogger(out / METRICS, keep=kept if checkpoint is not None else None) if main else None

    def write(record: dict[str, Any]) -> None:
        if logger is not None:
            logger.log(record)

    def evaluate() -> dict[str, float]:
        begin = time.perf_counter()
        _broadcast_buffers(model)
        metrics = data.evaluate(model, runner.forward)  # sharded over the ranks
        write({"event": "eval", "step": step, "wall_time": elapsed, **metrics, "eval_time": time.perf_counter() - begin})
        return metrics

    def diagnose(closure: Callable[[], torch.Tensor]) -> None:
        """The STE against the exact smoothed gradient on this step's batch (docs/diagnostics.md)."""
        report = fogzo_diagnose(
            ddp, closure, coordinates=config.diagnose_coordinates, draws=config.diagnose_draws,
            seed=derive_seed(config.seed, DIAGNOSE_STREAM, step),
        )
        overall = report.overall
        write({"event": "diagnose", "step": step, **diagnosis_record(report)})
        log(f"step {step}: STE vs the smoothed gradient: cosine {overall.cosine:.3f}"
            + (f" (noise-corrected {overall.cosine_corrected:.3f})" if overall.cosine_corrected is not None else "")
            + f", sign agreement {overall.sign_agreement:.3f}, norm ratio {overall.norm_ratio:.3f}")

    # On a terminal: a tqdm bar on stderr. Redirected: a line every progress_every steps
    # (0: about 20 lines a run). progress=false: neither. Rank 0 only.
    every = config.progress_every or max(1, math.ceil(total_steps / 20))
    bar = progress(total_steps, config.name, enabled=None if config.progress and main else False, every=every)
    bar.update(step)
    stop_reason = "steps"
    diverged = False
    failure: str | None = None
    interval_losses: list[float] = []
    interval_time = 0.0
    interval_zero, interval_differences = 0, 0
    stop = _StopRequest()
    try:
        with stop:
            while True:
                if step >= total_steps:
                    stop_reason = "steps"
                    break
                if config.time_budget is not None and elapsed >= config.time_budget:
                    stop_reason = "time_budget"
                    break
                if config.stop_at is not None and step >= config.stop_at:
                    stop_reason = "stop_at"
                    break
                lr = optimizer.param_groups[0]["lr"]
                batch = data.stream.next_batch()
                if config.diagnose_every and step % config.diagnose_every == 0:
                    diagnose(runner.closure_for(*batch))  # not timed: outside the training step
                begin = time.perf_counter()
                try:
                    info, loss = runner.step(batch)
                except FloatingPointError as error:
                    # The estimator refused a step with a non-finite (perturbed) loss; it
                    # changed no weight. The run cannot go on: it diverged.
                    info, loss, failure = None, math.nan, str(error)
                _synchronize(device)
                seconds = time.perf_counter() - begin
                # The loss of the global batch (mean of the ranks' shard means), a step time
                # and a Ctrl-C flag that every rank agrees on (time budget, divergence and
                # interruption: the same decision everywhere).
                loss, seconds, interrupted = _mean_over_ranks([loss, seconds, float(stop.requested)], device)
                step += 1
                elapsed += seconds
                interval_losses.append(loss)
                interval_time += seconds
                recent.append(loss)
                if info is not None:
                    phase = _phase(info)
                    phase_time[phase] = phase_time.get(phase, 0.0) + seconds
                    phase_steps[phase] = phase_steps.get(phase, 0) + 1
                    counters["forward_passes"] += info.forward_passes
                    counters["backward_passes"] += info.backward_passes
                    counters["compute_units"] += info.compute_units
                    counters["zero_differences"] += info.zero_differences
                    counters["differences"] += len(info.differences)
                    interval_zero += info.zero_differences
                    interval_differences += len(info.differences)
                if not math.isfinite(loss):
                    diverged = True
                    stop_reason = "diverged"
                    cause = failure or f"training loss is {loss}"
                    log(f"step {step}: {cause}; stopping (diverged)")
                if step % config.log_every == 0 or diverged or step == total_steps:
                    beta = info.beta if info is not None else None
                    write(
                        {
                            "event": "train",
                            "step": step,
                            "loss": loss,
                            "loss_avg": sum(interval_losses) / len(interval_losses),
                            "lr": lr,
                            "beta": beta,
                            "phase": _phase(info) if info is not None else None,
                            "forward_passes": counters["forward_passes"],
                            "backward_passes": counters["backward_passes"],
                            "compute_units": counters["compute_units"],
                            "wall_time": elapsed,
                            "step_time": interval_time / len(interval_losses),
                            "zero_difference_fraction": interval_zero / interval_differences if interval_differences else None,
                            **({"error": failure} if failure else {}),
                        }
                    )
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", beta=beta if beta is None else f"{beta:.4f}")
                    interval_losses, interval_time, interval_zero, interval_differences = [], 0.0, 0, 0
                bar.update(1)
                if diverged:
                    break
                if config.eval_every and step % config.eval_every == 0 and step < total_steps:
                    evaluate()
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    save_checkpoint()
                if interrupted > 0:
                    stop_reason = "interrupted"
                    break
        bar.close()
        if not diverged:
            save_checkpoint()
        base = {
            "name": config.name,
            "estimator": config.estimator,
            "lr": config.lr,
            "seed": config.seed,
            "steps_done": step,
            "total_steps": total_steps,
            "stop_reason": stop_reason,
            "wall_time": elapsed,
            "world_size": world,
            **counters,
            "phase_steps": phase_steps,
            "phase_step_time": {k: phase_time[k] / phase_steps[k] for k in phase_time},
            "mean_step_time": elapsed / step if step else None,
            "final_train_loss": sum(recent) / len(recent) if recent else None,
            "data": data.name,
            "data_note": data.note,
            "primary_metric": data.primary[0],
            "higher_is_better": data.primary[1],
            "calibration": calibration,
            "out": str(out),
        }
        if stop_reason == "interrupted":
            write({"event": "interrupted", "step": step, "wall_time": elapsed})
            log(f"interrupted at step {step}; checkpoint saved to {checkpoint_path}; continue with --resume")
            _barrier(device)
            raise TrainingInterrupted(step, total_steps, checkpoint_path)
        if stop_reason == "stop_at":
            log(f"stopped at step {step} (stop_at); resume with --resume")
            _barrier(device)  # the checkpoint is on disk when any rank returns
            return base
        metrics = {} if diverged else evaluate()
        if config.diagnose_every and not diverged and step % config.diagnose_every == 0:
            diagnose(runner.closure_for(*data.stream.next_batch()))  # the trained model, too
        results = {**base, **metrics, "diverged": diverged, **({"error": failure} if failure else {})}
        write({"event": "final", "step": step, **{k: v for k, v in results.items() if not isinstance(v, dict)}})
        if main:
            _write_json(out / RESULTS, results)
            if config.diagnose_every:
                write_diagnostics_report(out)
        summary = "".join(f"; {k}={v:.4g}" for k, v in metrics.items())
        log(f"done: {step}/{total_steps} steps ({stop_reason}), {elapsed:.1f} s training{summary}")
        _barrier(device)
        return results
    finally:
        bar.close()
        if logger is not None:
            logger.close()
