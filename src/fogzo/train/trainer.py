"""The training loop behind ``fogzo train``: build, (resume,) train, log, checkpoint, evaluate.

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
* ``results.json`` — the final metrics of a finished run.

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
import copy
import json
import math
import os
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import FOGZO, SPSA, STE, QuantConfig, quantize, quantized_layers
from ..experiments.common import JsonlLogger, progress, read_jsonl
from ..models import build_model, count_parameters
from .config import RUN_CONTROL_KEYS, ConfigError, TrainConfig
from .data import TaskData, build_data, data_dimensions, is_text_model

__all__ = [
    "build_estimator",
    "build_optimizer",
    "build_quantized_model",
    "build_scheduler",
    "lr_factor",
    "plan_model",
    "train",
]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
CONFIG = "config.json"


# ----------------------------------------------------------------------------- building


def _model_kwargs(config: TrainConfig, dims: dict[str, int]) -> dict[str, Any]:
    kwargs = dict(config.model_args)
    name = config.model.strip().lower().replace("_", "-")
    if is_text_model(name):
        if "vocab_size" in dims:
            kwargs["vocab_size"] = dims["vocab_size"]
        kwargs.setdefault("max_seq_len", config.seq_len)
        if kwargs["max_seq_len"] < config.seq_len:
            raise ValueError(f"max_seq_len={kwargs['max_seq_len']} < seq_len={config.seq_len}")
    else:
        kwargs["num_classes"] = dims["num_classes"]
        kwargs["in_channels"] = dims["in_channels"]
        if name.startswith(("vit", "deit")):
            kwargs["image_size"] = dims["image_size"]
    if config.dropout is not None:
        if name.startswith(("resnet", "mlp")):
            if config.dropout != 0.0:
                raise ValueError(f"model {config.model!r} has no dropout; leave dropout unset")
        else:
            kwargs["dropout"] = config.dropout
    return kwargs


def quant_config(config: TrainConfig, alpha_init: str | None = None) -> QuantConfig:
    return QuantConfig(
        bits=config.bits,
        ste=config.ste,
        noise=config.noise,
        eps_bar=config.eps_bar,
        step_size=config.step_size,
        alpha_init=alpha_init or config.alpha_init,
        per_channel=config.per_channel,
        activation_bits=config.activation_bits,
    )


def build_quantized_model(config: TrainConfig, dims: dict[str, int]) -> nn.Module:
    """Seed the global RNG with ``config.seed``, build the model on the CPU and quantize it.

    The initialisation depends on the seed only (not on the estimator or the data), so runs
    that differ in the estimator start from the same weights.
    """
    torch.manual_seed(config.seed)
    model = build_model(config.model, **_model_kwargs(config, dims))
    quantize(model, quant_config(config), skip=config.skip, skip_first_last=config.skip_first_last)
    return model


def plan_model(config: TrainConfig) -> nn.Module:
    """The quantized model on the ``meta`` device (shapes only, no data read, no memory).

    α is initialised with the cheap ``"max"`` rule here (meta tensors hold no values).
    """
    dims = data_dimensions(config)
    with torch.device("meta"):
        model = build_model(config.model, **_model_kwargs(config, dims))
    quantize(model, quant_config(config, "max"), skip=config.skip, skip_first_last=config.skip_first_last)
    return model


def build_estimator(
    config: TrainConfig, model: nn.Module, total_steps: int, *, kind: str | None = None, ste_fraction: float | None = None
):
    """The configured estimator; every estimator option of the config is forwarded."""
    kind = kind or config.estimator
    if kind == "ste":
        return STE(model)
    if kind == "spsa":
        return SPSA(
            model,
            n=config.n,
            seed=config.seed,
            perturb=config.perturb,
            eps=config.eps,
            one_sided=config.one_sided,
            on_nonfinite=config.on_nonfinite,
            vectorize=config.vectorize,
        )
    return FOGZO(
        model,
        total_steps=total_steps,
        beta_min=config.beta_min,
        n=config.n,
        seed=config.seed,
        beta=config.beta,
        perturb=config.perturb,
        eps=config.eps,
        one_sided=config.one_sided,
        ste_fraction=config.ste_fraction if ste_fraction is None else ste_fraction,
        normalize=config.normalize,
        guide_norm=config.guide_norm,
        on_nonfinite=config.on_nonfinite,
        vectorize=config.vectorize,
    )


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (or SGD); weight decay on the ``*.weight`` matrices/kernels only."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if name.endswith("weight") and param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2))


def warmup_length(config: TrainConfig, total_steps: int) -> int:
    if config.warmup_steps is not None:
        return min(config.warmup_steps, total_steps)
    return round(config.warmup_fraction * total_steps)


def lr_factor(step: int, total_steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if step < warmup:
        return (step + 1) / warmup
    fraction = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * fraction))


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    warmup = warmup_length(config, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, config.min_lr_ratio)
    )


# ------------------------------------------------------------------------------ helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda requested but CUDA is not available (use --device=cpu)")
    return torch.device(name)


def forward_context(config: TrainConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the forward's autocast context (fp32 latent weights either way)."""
    if config.autocast == "none":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if config.autocast == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _atomic_save(obj: Any, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def _write_json(path: Path, obj: Any) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(temporary, path)


class StepRunner:
    """One training step: next batch, closure, estimate, (unscale, clip,) optimizer step."""

    def __init__(self, config, model, data: TaskData, estimator, optimizer, scheduler, device, scaler=None):
        self.config, self.model, self.data = config, model, data
        self.estimator, self.optimizer, self.scheduler = estimator, optimizer, scheduler
        self.device, self.scaler = device, scaler
        self.forward = forward_context(config, device)
        self.text = data.kind == "text"

    def closure_for(self, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
        def closure() -> torch.Tensor:
            with self.forward():
                logits = self.model(x)
            logits = logits.float()
            if self.text:
                loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            else:
                loss = F.cross_entropy(logits, y)
            return self.scaler.scale(loss) if self.scaler is not None else loss

        return closure

    def step(self):
        x, y = self.data.stream.next_batch()
        self.optimizer.zero_grad(set_to_none=True)
        scale = float(self.scaler.get_scale()) if self.scaler is not None else 1.0
        info = self.estimator.estimate(self.closure_for(x, y))
        loss = info.loss / scale
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return info, loss


def _phase(info) -> str:
    if info.beta is None:
        return "ste"
    return "spsa" if info.backward_passes == 0 else "fogzo"


# -------------------------------------------------------------------------- calibration


def calibrate(config: TrainConfig, model: nn.Module, data: TaskData, device: torch.device, log) -> dict[str, Any]:
    """Median step times of STE and of the configured estimator (see the module docstring)."""
    started = time.perf_counter()
    rng = _rng_state()
    stream_state = copy.deepcopy(data.stream.state_dict())
    kinds = ["ste"] if config.estimator == "ste" else ["ste", config.estimator]
    times: dict[str, float] = {}
    for kind in kinds:
        clone = copy.deepcopy(model)
        clone.train()
        optimizer = build_optimizer(config, clone)
        estimator = build_estimator(config, clone, 10**9, kind=kind, ste_fraction=0.0)
        runner = StepRunner(config, clone, data, estimator, optimizer, None, device)
        samples = []
        for index in range(config.calibration_steps + 1):
            _synchronize(device)
            begin = time.perf_counter()
            runner.step()
            _synchronize(device)
            if index > 0:  # the first step warms up caches and allocators
                samples.append(time.perf_counter() - begin)
        times[kind] = statistics.median(samples)
        del clone, optimizer, estimator, runner
    data.stream.load_state_dict(stream_state)
    _set_rng_state(rng)
    t_ste = times["ste"]
    t_est = times.get(config.estimator, t_ste)
    r = config.ste_fraction if config.estimator == "fogzo" else 0.0
    per_step = r * t_ste + (1.0 - r) * t_est
    total = max(1, math.floor(config.time_budget / per_step))
    result = {
        "ste_step_s": t_ste,
        f"{config.estimator}_step_s": t_est,
        "expected_step_s": per_step,
        "total_steps": total,
        "calibration_s": time.perf_counter() - started,
    }
    log(
        f"calibration: STE {t_ste * 1e3:.1f} ms/step, {config.estimator} {t_est * 1e3:.1f} ms/step, "
        f"ste_fraction {r:g} -> T = {total} steps for a {config.time_budget:g} s budget"
    )
    return result


# ------------------------------------------------------------------------------- resume


def _check_resume_config(saved: dict[str, Any], config: TrainConfig) -> None:
    current = config.to_dict()
    differing = [
        f"{key}: checkpoint {saved.get(key)!r} vs now {current[key]!r}"
        for key in current
        if key not in RUN_CONTROL_KEYS and saved.get(key) != current[key]
    ]
    if differing:
        raise ConfigError(
            "cannot resume: the config differs from the checkpoint's in keys that change the "
            "training trajectory:\n  " + "\n  ".join(differing)
        )


def _kept_records(path: Path, step: int) -> list[dict[str, Any]]:
    """The metrics records up to the checkpoint's step (later ones are redone after resuming)."""
    if not path.exists():
        return []
    return [r for r in read_jsonl(path) if r.get("event") != "final" and r.get("step", 0) <= step]


# -------------------------------------------------------------------------------- train


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    command: list[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) one training run; returns the results record (also in ``results.json``).

    With ``stop_at`` the run saves a checkpoint after that step and returns a record with
    ``"stop_reason": "stop_at"`` and no final evaluation; ``resume=True`` continues it.
    """
    log = log or (lambda message: print(message, flush=True))
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    out = config.output_dir()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / CHECKPOINT
    checkpoint = None
    if resume:
        if checkpoint_path.exists():
            checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
            _check_resume_config(checkpoint["config"], config)
            log(f"resuming from {checkpoint_path} at step {checkpoint['step']}")
        else:
            log(f"--resume: no checkpoint in {out}; starting from scratch")

    data = build_data(config, device, log)
    model = build_quantized_model(config, data.dims).to(device)
    model.train()

    calibration: dict[str, Any] = {}
    if checkpoint is not None:
        total_steps = int(checkpoint["total_steps"])
        calibration = checkpoint.get("calibration") or {}
    elif config.time_budget is not None and config.budget_steps == "measure":
        calibration = calibrate(config, model, data, device, log)
        total_steps = calibration["total_steps"]
    else:
        total_steps = config.steps

    estimator = build_estimator(config, model, total_steps)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, total_steps)
    scaler = None
    if config.autocast == "fp16":
        scaler = torch.amp.GradScaler(device.type)
    runner = StepRunner(config, model, data, estimator, optimizer, scheduler, device, scaler)

    counters = {"forward_passes": 0, "backward_passes": 0, "compute_units": 0, "zero_differences": 0, "differences": 0}
    phase_time: dict[str, float] = {}
    phase_steps: dict[str, int] = {}
    step, elapsed = 0, 0.0
    recent: deque[float] = deque(maxlen=50)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        estimator.load_state_dict(checkpoint["estimator"])
        data.stream.load_state_dict(checkpoint["data"])
        if scaler is not None and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        _set_rng_state(checkpoint["rng"])
        step, elapsed = int(checkpoint["step"]), float(checkpoint["elapsed"])
        counters.update(checkpoint["counters"])
        phase_time.update(checkpoint["phase_time"])
        phase_steps.update(checkpoint["phase_steps"])
        recent.extend(checkpoint["recent_losses"])
    kept = _kept_records(out / METRICS, step) if checkpoint is not None else []
    (out / RESULTS).unlink(missing_ok=True)

    layers = [name for name, _ in quantized_layers(model)]
    resolved = {
        "data": data.describe(),
        "model_parameters": count_parameters(model),
        "quantized_layers": len(layers),
        "quantized_parameters": sum(layer.weight.numel() for _, layer in quantized_layers(model)),
        "total_steps": total_steps,
        "warmup_steps": warmup_length(config, total_steps),
        "ste_steps": round(config.ste_fraction * total_steps) if config.estimator == "fogzo" else None,
        "calibration": calibration,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": command if command is not None else sys.argv,
        "resumed_from_step": step if checkpoint is not None else None,
    }
    config_record = {**config.to_dict(), "_resolved": resolved}
    _write_json(out / CONFIG, config_record)
    log("resolved config:\n" + json.dumps(config_record, indent=2, default=str))

    def save_checkpoint() -> None:
        _atomic_save(
            {
                "config": config.to_dict(),
                "step": step,
                "total_steps": total_steps,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "estimator": estimator.state_dict(),
                "data": data.stream.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": _rng_state(),
                "elapsed": elapsed,
                "counters": dict(counters),
                "phase_time": dict(phase_time),
                "phase_steps": dict(phase_steps),
                "recent_losses": list(recent),
                "calibration": calibration,
            },
            checkpoint_path,
        )

    logger = JsonlLogger(out / METRICS)  # truncates; a resumed run first rewrites the kept records
    for record in kept:
        logger.log(record)
    write = logger.log

    def evaluate() -> dict[str, float]:
        begin = time.perf_counter()
        metrics = data.evaluate(model, runner.forward)
        write({"event": "eval", "step": step, "wall_time": elapsed, **metrics, "eval_time": time.perf_counter() - begin})
        return metrics

    # tqdm on stderr (quiet when stderr is not a terminal, or with progress=false).
    bar = progress(total_steps, config.name, enabled=None if config.progress else False)
    bar.update(step)
    stop_reason = "steps"
    diverged = False
    interval_losses: list[float] = []
    interval_time = 0.0
    interval_zero, interval_differences = 0, 0
    try:
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
            begin = time.perf_counter()
            info, loss = runner.step()
            _synchronize(device)
            seconds = time.perf_counter() - begin
            step += 1
            elapsed += seconds
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
            interval_losses.append(loss)
            interval_time += seconds
            recent.append(loss)
            bar.update(1)
            if not math.isfinite(loss):
                diverged = True
                stop_reason = "diverged"
                log(f"training loss is {loss} at step {step}: stopping (diverged)")
            if step % config.log_every == 0 or diverged or step == total_steps:
                write(
                    {
                        "event": "train",
                        "step": step,
                        "loss": loss,
                        "loss_avg": sum(interval_losses) / len(interval_losses),
                        "lr": lr,
                        "beta": info.beta,
                        "phase": phase,
                        "forward_passes": counters["forward_passes"],
                        "backward_passes": counters["backward_passes"],
                        "compute_units": counters["compute_units"],
                        "wall_time": elapsed,
                        "step_time": interval_time / len(interval_losses),
                        "zero_difference_fraction": interval_zero / interval_differences if interval_differences else None,
                    }
                )
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", beta=info.beta if info.beta is None else f"{info.beta:.4f}")
                interval_losses, interval_time, interval_zero, interval_differences = [], 0.0, 0, 0
            if diverged:
                break
            if config.eval_every and step % config.eval_every == 0 and step < total_steps:
                evaluate()
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                save_checkpoint()
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
        if stop_reason == "stop_at":
            log(f"stopped at step {step} (stop_at); resume with --resume")
            return base
        metrics = {} if diverged else evaluate()
        results = {**base, **metrics, "diverged": diverged}
        write({"event": "final", "step": step, **{k: v for k, v in results.items() if not isinstance(v, dict)}})
        _write_json(out / RESULTS, results)
        summary = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        log(f"done: {step}/{total_steps} steps ({stop_reason}), {elapsed:.1f} s training; {summary}")
        return results
    finally:
        bar.close()
        logger.close()
