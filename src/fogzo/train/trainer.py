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
import copy
import json
import math
import os
import statistics
import sys
import time
import zlib
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import FOGZO, SPSA, STE, QuantConfig, quantize, quantized_layers
from .. import distributed as fd
from ..estimators import derive_seed
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
    if name == "mlp":
        # MLP(sizes): the input and output sizes come from the data; model_args may give
        # the hidden sizes (``hidden = [256]``, the default) or ``sizes`` in full.
        hidden = [int(size) for size in kwargs.pop("hidden", [256])]
        inputs = dims["in_channels"] * dims["image_size"] ** 2
        kwargs.setdefault("sizes", [inputs, *hidden, dims["num_classes"]])
        if config.dropout not in (None, 0.0):
            raise ValueError(f"model {config.model!r} has no dropout; leave dropout unset")
        return kwargs
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
    zeroth_order = {
        "n": config.n,
        "seed": config.seed,
        "perturb": config.perturb,
        "eps": config.eps,
        "one_sided": config.one_sided,
        "on_nonfinite": config.on_nonfinite,
        "vectorize": config.vectorize,
    }
    if kind == "spsa":
        return SPSA(model, **zeroth_order)
    return FOGZO(
        model,
        total_steps=total_steps,
        beta_min=config.beta_min,
        beta=config.beta,
        ste_fraction=config.ste_fraction if ste_fraction is None else ste_fraction,
        normalize=config.normalize,
        guide_norm=config.guide_norm,
        **zeroth_order,
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


def _rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The global RNG state: CPU, and CUDA (every device; under DDP only this rank's device)."""
    state = {"cpu": torch.get_rng_state()}
    if device is not None and device.type == "cuda" and fd.is_distributed():
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    elif torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda_device" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_device"], device)
    elif "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_rank_rng(seed: int, step: int, rank: int, device: torch.device) -> None:
    """Seed this rank's global RNG (dropout) from ``(seed, step, rank)``."""
    value = derive_seed(seed, 0x5EED, step, rank)
    torch.manual_seed(value)
    if device.type == "cuda":
        torch.cuda.manual_seed(value)


# -------------------------------------------------------------------- data parallelism


def launch_world_size() -> int:
    """The world size of this launch: the process group's, else ``WORLD_SIZE`` (torchrun), else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or "1")


def check_batch_divisible(config: TrainConfig, world: int) -> None:
    if config.batch_size % world:
        lower = config.batch_size - config.batch_size % world
        raise ConfigError(
            f"batch_size={config.batch_size} is the global batch and must be divisible by the world "
            f"size {world} (each rank trains on batch_size / world_size examples): use e.g. "
            f"--batch-size={lower or world} or --batch-size={lower + world}"
        )


def _mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Means over ranks of a few scalars: one all-reduce (float64)."""
    if not fd.is_distributed():
        return [float(v) for v in values]
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=where)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [v / dist.get_world_size() for v in tensor.cpu().tolist()]


def _broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics) before an evaluation."""
    if fd.is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def _barrier(device: torch.device) -> None:
    if fd.is_distributed():
        if dist.get_backend() == "nccl" and device.type == "cuda":
            dist.barrier(device_ids=[device.index])
        else:
            dist.barrier()


def _config_digest(config: TrainConfig) -> int:
    return zlib.crc32(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())


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
    """Median step times of STE and of the configured estimator (see the module docstring).

    Under DDP every rank times DDP steps on its shard and the medians are averaged over
    ranks, so every rank computes the same ``T``.
    """
    started = time.perf_counter()
    rng = _rng_state(device)
    stream_state = copy.deepcopy(data.stream.state_dict())
    kinds = ["ste"] if config.estimator == "ste" else ["ste", config.estimator]
    times: dict[str, float] = {}
    for kind in kinds:
        clone = copy.deepcopy(model)
        clone.train()
        optimizer = build_optimizer(config, clone)
        wrapped = fd.wrap_ddp(clone)
        estimator = build_estimator(config, wrapped, 10**9, kind=kind, ste_fraction=0.0)
        runner = StepRunner(config, wrapped, data, estimator, optimizer, None, device)
        samples = []
        for index in range(config.calibration_steps + 1):
            _synchronize(device)
            begin = time.perf_counter()
            runner.step()
            _synchronize(device)
            if index > 0:  # the first step warms up caches and allocators
                samples.append(time.perf_counter() - begin)
        times[kind] = _mean_over_ranks([statistics.median(samples)], device)[0]
        del clone, wrapped, optimizer, estimator, runner
    data.stream.load_state_dict(stream_state)
    _set_rng_state(rng, device)
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

    Under torchrun (``WORLD_SIZE`` > 1) this joins the process group (and leaves it joined:
    :func:`fogzo.distributed.cleanup` ends it; the CLI does) and trains with DDP; every rank
    returns the same record. ``log`` is called on rank 0 only.
    """
    world = launch_world_size()
    check_batch_divisible(config, world)  # before any collective: every rank raises alike
    if config.threads is not None:
        torch.set_num_threads(config.threads)
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
    out = config.output_dir()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / CHECKPOINT
    checkpoint = None
    if resume:
        if checkpoint_path.exists():
            checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
            _check_resume_config(checkpoint["config"], config)
            saved_world = int(checkpoint.get("world_size", 1))
            log(
                f"resuming from {checkpoint_path} at step {checkpoint['step']}"
                + (f" (saved by {saved_world} ranks, now {world})" if saved_world != world else "")
            )
        else:
            log(f"--resume: no checkpoint in {out}; starting from scratch")
    if world > 1:
        # Every rank must agree on whether (and from which step) it resumes.
        fd.check_same_on_all_ranks(-1 if checkpoint is None else int(checkpoint["step"]), "the resumed step")

    data = build_data(config, device, log, rank=rank, world_size=world)
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
    if main:
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

    logger = JsonlLogger(out / METRICS) if main else None  # truncates; a resumed run first rewrites the kept records
    for record in kept:
        logger.log(record)

    def write(record: dict[str, Any]) -> None:
        if logger is not None:
            logger.log(record)

    def evaluate() -> dict[str, float]:
        begin = time.perf_counter()
        _broadcast_buffers(model)
        metrics = data.evaluate(model, runner.forward)  # sharded over the ranks
        write({"event": "eval", "step": step, "wall_time": elapsed, **metrics, "eval_time": time.perf_counter() - begin})
        return metrics

    # tqdm on stderr (quiet when stderr is not a terminal, or with progress=false); rank 0 only.
    bar = progress(total_steps, config.name, enabled=None if config.progress and main else False)
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
            # The loss of the global batch (mean of the ranks' shard means) and a step time
            # that every rank agrees on (time budget, divergence: the same decision everywhere).
            loss, seconds = _mean_over_ranks([loss, seconds], device)
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
        if stop_reason == "stop_at":
            log(f"stopped at step {step} (stop_at); resume with --resume")
            _barrier(device)  # the checkpoint is on disk when any rank returns
            return base
        metrics = {} if diverged else evaluate()
        results = {**base, **metrics, "diverged": diverged}
        write({"event": "final", "step": step, **{k: v for k, v in results.items() if not isinstance(v, dict)}})
        if main:
            _write_json(out / RESULTS, results)
        summary = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        log(f"done: {step}/{total_steps} steps ({stop_reason}), {elapsed:.1f} s training; {summary}")
        _barrier(device)
        return results
    finally:
        bar.close()
        if logger is not None:
            logger.close()
