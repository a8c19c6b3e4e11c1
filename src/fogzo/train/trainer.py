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
:func:`train` joins the process group (:func:`fogzo.train.distributed.init_from_env`: gloo on CPU,
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import quantized_layers
from ..diagnostics import diagnose as fogzo_diagnose
from ..estimators import derive_seed
from ..models import count_parameters
from . import distributed as fd
from .build import (
    build_estimator,
    build_optimizer,
    build_quantized_model,
    build_scheduler,
    resolve_device,
    warmup_length,
)
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
from .step import StepRunner, calibrate
from .tally import Tally

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
            f"interrupted after step {step} of {total_steps}; checkpoint saved to {checkpoint}: continue with --resume"
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
        os.write(
            2, b"\nfogzo: interrupt: stopping after this step and saving a checkpoint (Ctrl-C again stops at once)\n"
        )

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
    :func:`fogzo.train.distributed.cleanup` ends it; the CLI does) and trains with DDP; every rank
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
    run = _Run(config, out, world, log)
    run.start(checkpoint, resume=resume, overwrite=overwrite)
    run.write_config(command, resumed=checkpoint)
    # A resumed run keeps the records up to its checkpoint (rewritten atomically), then appends.
    kept = _kept_records(out / METRICS, run.tally.step) if checkpoint is not None and run.main else []
    run.logger = JsonlLogger(out / METRICS, keep=kept if checkpoint is not None else None) if run.main else None
    try:
        return run.train()
    finally:
        if run.logger is not None:
            run.logger.close()


class _Run:
    """One run of :func:`train` on this rank: what it built (data, model, estimator,
    optimizer, schedule, step runner), its :class:`~fogzo.train.tally.Tally`, and the steps
    that use them: :meth:`start`, :meth:`write_config`, :meth:`train` (the loop),
    :meth:`finish`, with :meth:`save_checkpoint`, :meth:`evaluate` and :meth:`diagnose`."""

    def __init__(self, config: TrainConfig, out: Path, world: int, log: Callable[[str], None] | None) -> None:
        self.config, self.out, self.world = config, out, world
        self.device = resolve_device(config.device)
        if world > 1:
            self.device = fd.init_from_env(device=self.device.type)
        self.rank = fd.rank()
        self.main = self.rank == 0
        if not self.main or log is None:
            log = (lambda message: None) if not self.main else (lambda message: print(message, flush=True))
        self.log = log
        self.checkpoint_path = out / CHECKPOINT
        self.tally = Tally()
        self.calibration: dict[str, Any] = {}
        self.logger: JsonlLogger | None = None

    # ------------------------------------------------------------------- build, resume

    def start(self, checkpoint: dict[str, Any] | None, *, resume: bool, overwrite: bool) -> None:
        """Data, model, ``T``, estimator, optimizer and schedule; the checkpoint's state."""
        config, world, log, device = self.config, self.world, self.log, self.device
        if world > 1:
            fd.check_same_on_all_ranks(config.seed, "seed (model init, data order, estimator noise)")
            fd.check_same_on_all_ranks(_config_digest(config), "the training config")
        if checkpoint is not None:
            saved_world = int(checkpoint.get("world_size", 1))
            log(
                f"resuming from {self.checkpoint_path} at step {checkpoint['step']}"
                + (f" (saved by {saved_world} ranks, now {world})" if saved_world != world else "")
            )
        elif resume:
            log(f"--resume: no checkpoint in {self.out}; starting from scratch")
        if world > 1:
            # Every rank must agree on whether (and from which step) it resumes.
            fd.check_same_on_all_ranks(-1 if checkpoint is None else int(checkpoint["step"]), "the resumed step")

        try:
            data = build_data(config, device, log, rank=self.rank, world_size=world)
        except (FileNotFoundError, ValueError) as error:  # data missing, malformed, or too small
            raise ConfigError(f"cannot load the data: {error}") from None
        if data.kind == "text":
            check_text_tokens(data.sizes["train_tokens"] + data.sizes["val_tokens"], f"the text ({data.name})", config)
        if self.main:
            if overwrite:
                removed = _remove_outputs(self.out)
                if removed:
                    log(f"--overwrite: removed the earlier run's {', '.join(removed)} from {self.out}")
            self.out.mkdir(parents=True, exist_ok=True)
        model = build_quantized_model(config, data.dims).to(device)
        model.train()
        if world > 1 and self.rank > 0:
            # Dropout masks: rank 0 keeps the 1-process RNG stream, the others get their own.
            _seed_rank_rng(config.seed, 0, self.rank, device)

        if checkpoint is not None:
            total_steps = int(checkpoint["total_steps"])
            self.calibration = checkpoint.get("calibration") or {}
        elif config.time_budget is not None and config.budget_steps == "measure":
            self.calibration = calibrate(config, model, data, device, log)
            total_steps = self.calibration["total_steps"]
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
        scaler = torch.amp.GradScaler(device.type) if config.autocast == "fp16" else None
        self.data, self.model, self.ddp, self.total_steps = data, model, ddp, total_steps
        self.estimator, self.optimizer, self.scheduler, self.scaler = estimator, optimizer, scheduler, scaler
        self.runner = StepRunner(config, ddp, data, estimator, optimizer, scheduler, device, scaler)
        if checkpoint is not None:
            self._restore(checkpoint)

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.estimator.load_state_dict(checkpoint["estimator"])
        self.data.stream.load_state_dict(checkpoint["data"])
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.tally.load_state_dict(checkpoint)
        # The global RNG (dropout, nothing else: data and noise have their own generators).
        # Rank r restores the state rank r saved; a rank the checkpoint has no state for
        # (more ranks than before) is seeded from (seed, step, rank).
        saved_world = int(checkpoint.get("world_size", 1))
        states = checkpoint.get("rng_per_rank") or [checkpoint["rng"]]
        if self.rank < min(saved_world, len(states)):
            _set_rng_state(states[self.rank], self.device)
        else:
            _seed_rank_rng(self.config.seed, self.tally.step, self.rank, self.device)

    def write_config(self, command: list[str] | None, resumed: dict[str, Any] | None) -> None:
        """``config.json``: the config and the ``_resolved`` record (what the run really is)."""
        config, model, data = self.config, self.model, self.data
        resolved = {
            "data": data.describe(),
            "model_parameters": count_parameters(model),
            "quantized_layers": len(list(quantized_layers(model))),
            "quantized_parameters": sum(
                layer.get_parameter(name).numel()
                for _, layer in quantized_layers(model)
                for name, _ in layer.quantized_weights()
            ),
            "total_steps": self.total_steps,
            "warmup_steps": warmup_length(config, self.total_steps),
            "ste_steps": round(config.ste_fraction * self.total_steps) if config.estimator == "fogzo" else None,
            "calibration": self.calibration,
            "device": str(self.device),
            "world_size": self.world,
            "batch_size_per_rank": config.batch_size // self.world,
            "backend": dist.get_backend() if fd.is_distributed() else None,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "command": command if command is not None else sys.argv,
            "resumed_from_step": self.tally.step if resumed is not None else None,
            "resumed_from_world_size": int(resumed.get("world_size", 1)) if resumed is not None else None,
        }
        record = {**config.to_dict(), "_resolved": resolved}
        if self.main:
            _write_json(self.out / CONFIG, record)
        self.log("resolved config:\n" + json.dumps(record, indent=2, default=str))

    # ----------------------------------------------------------- outputs during the run

    def write(self, record: dict[str, Any]) -> None:
        if self.logger is not None:
            self.logger.log(record)

    def save_checkpoint(self) -> None:
        # A collective under DDP (the ranks' RNG states are gathered); rank 0 writes.
        rng = _rng_state(self.device)
        per_rank = None
        if fd.is_distributed():
            per_rank = [None] * self.world
            dist.all_gather_object(per_rank, rng)
        if not self.main:
            return
        _atomic_save(
            {
                "config": self.config.to_dict(),
                "total_steps": self.total_steps,
                "world_size": self.world,
                "model": self.model.state_dict(),  # the unwrapped model: no "module." prefix
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "estimator": self.estimator.state_dict(),
                "data": self.data.stream.state_dict(),  # in global batches
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": rng,
                "rng_per_rank": per_rank,
                **self.tally.state_dict(),  # step, elapsed, counters, phase times, recent losses
                "calibration": self.calibration,
            },
            self.checkpoint_path,
        )

    def evaluate(self) -> dict[str, float]:
        begin = time.perf_counter()
        _broadcast_buffers(self.model)
        metrics = self.data.evaluate(self.model, self.runner.forward)  # sharded over the ranks
        self.write(
            {
                "event": "eval",
                "step": self.tally.step,
                "wall_time": self.tally.elapsed,
                **metrics,
                "eval_time": time.perf_counter() - begin,
            }
        )
        return metrics

    def diagnose(self, closure: Callable[[], torch.Tensor]) -> None:
        """The STE against the exact smoothed gradient on this step's batch (docs/diagnostics.md)."""
        config, step = self.config, self.tally.step
        report = fogzo_diagnose(
            self.ddp,
            closure,
            coordinates=config.diagnose_coordinates,
            draws=config.diagnose_draws,
            seed=derive_seed(config.seed, DIAGNOSE_STREAM, step),
        )
        overall = report.overall
        self.write({"event": "diagnose", "step": step, **diagnosis_record(report)})
        self.log(
            f"step {step}: STE vs the smoothed gradient: cosine {overall.cosine:.3f}"
            + (f" (noise-corrected {overall.cosine_corrected:.3f})" if overall.cosine_corrected is not None else "")
            + f", sign agreement {overall.sign_agreement:.3f}, norm ratio {overall.norm_ratio:.3f}"
        )

    # ------------------------------------------------------------------------ the loop

    def train(self) -> dict[str, Any]:
        """Steps until ``T``, the time budget, ``stop_at``, divergence or Ctrl-C; then :meth:`finish`."""
        config, tally = self.config, self.tally
        # On a terminal: a tqdm bar on stderr. Redirected: a line every progress_every steps
        # (0: about 20 lines a run). progress=false: neither. Rank 0 only.
        every = config.progress_every or max(1, math.ceil(self.total_steps / 20))
        bar = progress(
            self.total_steps, config.name, enabled=None if config.progress and self.main else False, every=every
        )
        bar.update(tally.step)
        stop_reason, failure = "steps", None
        stop = _StopRequest()
        try:
            with stop:
                while True:
                    if tally.step >= self.total_steps:
                        stop_reason = "steps"
                        break
                    if config.time_budget is not None and tally.elapsed >= config.time_budget:
                        stop_reason = "time_budget"
                        break
                    if config.stop_at is not None and tally.step >= config.stop_at:
                        stop_reason = "stop_at"
                        break
                    lr = self.optimizer.param_groups[0]["lr"]
                    batch = self.data.stream.next_batch()
                    if config.diagnose_every and tally.step % config.diagnose_every == 0:
                        self.diagnose(self.runner.closure_for(*batch))  # not timed: outside the training step
                    begin = time.perf_counter()
                    try:
                        info, loss = self.runner.step(batch)
                    except FloatingPointError as error:
                        # The estimator refused a step with a non-finite (perturbed) loss; it
                        # changed no weight. The run cannot go on: it diverged.
                        info, loss, failure = None, math.nan, str(error)
                    _synchronize(self.device)
                    seconds = time.perf_counter() - begin
                    # The loss of the global batch (mean of the ranks' shard means), a step time
                    # and a Ctrl-C flag that every rank agrees on (time budget, divergence and
                    # interruption: the same decision everywhere).
                    loss, seconds, interrupted = _mean_over_ranks([loss, seconds, float(stop.requested)], self.device)
                    tally.add(loss, seconds, info)
                    diverged = not math.isfinite(loss)
                    if diverged:
                        stop_reason = "diverged"
                        self.log(f"step {tally.step}: {failure or f'training loss is {loss}'}; stopping (diverged)")
                    if tally.step % config.log_every == 0 or diverged or tally.step == self.total_steps:
                        record = tally.train_record(loss, lr, info, failure)
                        self.write(record)
                        show_beta = config.estimator == "fogzo" and record["beta"] is not None  # not for STE, SPSA
                        bar.set_postfix(
                            loss=f"{loss:.4f}",
                            lr=f"{lr:.2e}",
                            **({"beta": f"{record['beta']:.4f}"} if show_beta else {}),
                        )
                    bar.update(1)
                    if diverged:
                        break
                    if config.eval_every and tally.step % config.eval_every == 0 and tally.step < self.total_steps:
                        self.evaluate()
                    if config.checkpoint_every and tally.step % config.checkpoint_every == 0:
                        self.save_checkpoint()
                    if interrupted > 0:
                        stop_reason = "interrupted"
                        break
            bar.close()
            return self.finish(stop_reason, failure)
        finally:
            bar.close()

    def finish(self, stop_reason: str, failure: str | None) -> dict[str, Any]:
        """The last checkpoint, evaluation and ``results.json`` (or the interrupt)."""
        config, tally, log = self.config, self.tally, self.log
        diverged = stop_reason == "diverged"
        if not diverged:
            self.save_checkpoint()
        base = {
            "name": config.name,
            "estimator": config.estimator,
            "lr": config.lr,
            "seed": config.seed,
            "steps_done": tally.step,
            "total_steps": self.total_steps,
            "stop_reason": stop_reason,
            "wall_time": tally.elapsed,
            "world_size": self.world,
            **tally.summary(),
            "data": self.data.name,
            "data_note": self.data.note,
            "primary_metric": self.data.primary[0],
            "higher_is_better": self.data.primary[1],
            "calibration": self.calibration,
            "out": str(self.out),
        }
        step = tally.step
        if stop_reason == "interrupted":
            self.write({"event": "interrupted", "step": step, "wall_time": tally.elapsed})
            log(f"interrupted at step {step}; checkpoint saved to {self.checkpoint_path}; continue with --resume")
            _barrier(self.device)
            raise TrainingInterrupted(step, self.total_steps, self.checkpoint_path)
        if stop_reason == "stop_at":
            log(f"stopped at step {step} (stop_at); resume with --resume")
            _barrier(self.device)  # the checkpoint is on disk when any rank returns
            return base
        metrics = {} if diverged else self.evaluate()
        if config.diagnose_every and not diverged and step % config.diagnose_every == 0:
            self.diagnose(self.runner.closure_for(*self.data.stream.next_batch()))  # the trained model, too
        results = {**base, **metrics, "diverged": diverged, **({"error": failure} if failure else {})}
        self.write({"event": "final", "step": step, **{k: v for k, v in results.items() if not isinstance(v, dict)}})
        if self.main:
            _write_json(self.out / RESULTS, results)
            if config.diagnose_every:
                write_diagnostics_report(self.out)
        summary = "".join(f"; {k}={v:.4g}" for k, v in metrics.items())
        why = {"time_budget": " (time budget reached)", "diverged": " (diverged)"}.get(stop_reason, "")
        log(f"done: {step}/{self.total_steps} steps{why}, {tally.elapsed:.1f} s training{summary}")
        _barrier(self.device)
        return results
