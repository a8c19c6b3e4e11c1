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
import copy
import json
import math
import os
import signal
import statistics
import sys
import threading
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
from .records import JsonlLogger, RunInterrupted, progress, read_json, read_jsonl, write_json
from ..models import build_model, count_parameters
from ..diagnostics import diagnose as fogzo_diagnose
from .config import RUN_CONTROL_KEYS, ConfigError, TrainConfig
from .data import TaskData, build_data, data_dimensions, is_text_model
from .diagnosis_log import DIAGNOSE_STREAM, diagnosis_record, write_diagnostics_report

__all__ = [
    "TrainingInterrupted",
    "build_estimator",
    "build_optimizer",
    "build_quantized_model",
    "build_scheduler",
    "check_config",
    "lr_factor",
    "plan_model",
    "prepare_output",
    "text_tokens_needed",
    "train",
]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
CONFIG = "config.json"
#: The files a run writes into its folder (``--overwrite`` removes these, and nothing else).
OUTPUT_FILES = (CONFIG, METRICS, RESULTS, CHECKPOINT)
#: Keys every checkpoint of :func:`train` holds.
CHECKPOINT_KEYS = frozenset({"config", "step", "total_steps", "model", "optimizer", "scheduler", "estimator", "data"})
#: Vocabulary size and class count of a planned (meta) model before the data is read.
PLAN_VOCAB_SIZE = 256
PLAN_NUM_CLASSES = 2


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


def _planning_dims(config: TrainConfig) -> dict[str, int]:
    """:func:`data_dimensions`, with placeholders for what only the data can tell: the
    character vocabulary of a text, the class count of an image folder."""
    if config.dataset == "image_folder" and config.num_classes is None and not is_text_model(config.model):
        return {"in_channels": 3, "num_classes": PLAN_NUM_CLASSES, "image_size": config.image_size}
    dims = data_dimensions(config)
    if is_text_model(config.model) and "vocab_size" not in dims:
        dims = {**dims, "vocab_size": PLAN_VOCAB_SIZE}
    return dims


def plan_model(config: TrainConfig) -> nn.Module:
    """The quantized model on the ``meta`` device (shapes only, no data read, no memory).

    α is initialised with the cheap ``"max"`` rule here (meta tensors hold no values).
    """
    dims = _planning_dims(config)
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
    write_json(path, obj)  # strict JSON (non-finite floats as null + "nonfinite"), atomic


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

    def step(self, batch: tuple[torch.Tensor, torch.Tensor] | None = None):
        x, y = self.data.stream.next_batch() if batch is None else batch
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


# --------------------------------------------------------------------------- validation


def text_tokens_needed(seq_len: int, val_fraction: float) -> int:
    """The fewest tokens a text may have: ``seq_len + 1`` for a training window and as many
    for one validation window, after the split (the last ``floor(N·val_fraction)`` tokens)."""
    need = seq_len + 1
    total = max(2 * need, math.ceil(need / val_fraction))
    while int(total * val_fraction) < need or total - int(total * val_fraction) < need:
        total += 1
    return total


def _text_too_short(where: str, count: int, config: TrainConfig, unit: str = "tokens") -> ConfigError:
    need = text_tokens_needed(config.seq_len, config.val_fraction)
    return ConfigError(
        f"{where} is too short: {count} {unit}, but seq_len={config.seq_len} with val_fraction="
        f"{config.val_fraction:g} needs at least {need} (seq_len + 1 for a training window and "
        f"seq_len + 1 for validation); use a longer text or a smaller --seq-len"
    )


def check_text_tokens(tokens: int, where: str, config: TrainConfig) -> None:
    """Raise :class:`ConfigError` if ``tokens`` cannot make one training and one validation window."""
    if tokens < text_tokens_needed(config.seq_len, config.val_fraction):
        raise _text_too_short(where, tokens, config)


def _message(error: BaseException) -> str:
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


def check_config(config: TrainConfig, world_size: int = 1) -> None:
    """Check everything a run needs that can be checked without reading data.

    The device; the model, its arguments and the quantization (built on the ``meta``
    device, so a typo in a model name, a model argument or ``bits`` fails here); the
    estimator, constructed with the run's options exactly as :func:`train` will construct
    it (so ``n=0``, ``beta_min=2`` or ``vectorize=0`` fail with the estimator's own
    message); the data source (``text_file`` / ``data_dir`` exist; a text file has enough
    bytes for one training and one validation window). Raises :class:`ConfigError`.
    """
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but CUDA is not available here (torch.cuda.is_available() is False); use --device=cpu")
    check_batch_divisible(config, world_size)
    if config.diagnose_every and world_size > 1:
        raise ConfigError("diagnose_every works in one process only (it runs fogzo.diagnose on rank 0's model)")
    if config.text_file:
        path = Path(config.text_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"text_file {path} {'is a folder' if path.is_dir() else 'does not exist'}; pass a UTF-8 text file")
        size = path.stat().st_size  # characters and tokens <= bytes
        if size < text_tokens_needed(config.seq_len, config.val_fraction):
            raise _text_too_short(f"text_file {path}", size, config, unit="bytes")
    elif config.dataset == "text":
        raise ConfigError("dataset=text needs text_file=PATH (a UTF-8 text file)")
    if config.data_dir and not Path(config.data_dir).expanduser().is_dir():
        raise ConfigError(f"data_dir {config.data_dir} does not exist or is not a folder")
    try:
        model = plan_model(config)
        build_estimator(config, model, config.steps)
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(_message(error)) from None


def _check_resume_config(saved: dict[str, Any], config: TrainConfig, what: str = "the checkpoint's") -> None:
    current = config.to_dict()
    # A key the saved config lacks was added later: that run used its default.
    saved = {**TrainConfig().to_dict(), **saved}
    label = "saved" if what == "the checkpoint's" else "folder"
    differing = [
        f"{key}: {label} {saved[key]!r}, now {current[key]!r}"
        for key in current
        if key not in RUN_CONTROL_KEYS and saved[key] != current[key]
    ]
    if differing:
        raise ConfigError(
            f"cannot resume: the config differs from {what} in keys that change the training trajectory "
            f"({'; '.join(differing)}); resume with the same values, or start a new run with "
            "--overwrite or another --out"
        )


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """``torch.load`` (weights only) of a checkpoint, with a clear error for a bad file."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated zip, a garbled pickle, an empty file, ...
        raise ConfigError(
            f"{path} cannot be read: it is corrupted or truncated ({type(error).__name__}), so the run "
            "cannot resume from it; start the run again with --overwrite, or write to a new --out"
        ) from None
    missing = CHECKPOINT_KEYS - set(checkpoint) if isinstance(checkpoint, dict) else CHECKPOINT_KEYS
    if missing:
        raise ConfigError(
            f"{path} is not a checkpoint of fogzo train (no {', '.join(sorted(missing))}); start the run "
            "again with --overwrite, or write to a new --out"
        )
    return checkpoint


def prepare_output(out: Path, config: TrainConfig, *, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Decide what happens to the run folder ``out`` before anything is written (read only).

    * It does not exist or is empty: a new run.
    * ``overwrite``: a new run; :func:`train` removes the earlier run's files
      (:data:`OUTPUT_FILES`; nothing else) once the data is loaded.
    * ``resume`` with a checkpoint: returns it, after checking that the config matches
      (keys outside :data:`~fogzo.train.config.RUN_CONTROL_KEYS` must be equal).
    * ``resume`` without a checkpoint: a new run in the folder, if it holds nothing but an
      unfinished run of the same config (``config.json`` and ``metrics.jsonl`` of a run
      stopped before its first checkpoint); never over a finished run's ``results.json``.
    * Otherwise a non-empty folder is refused: :class:`ConfigError`.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues the run in the folder, --overwrite replaces it")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output folder {out} is a file; choose another --out")
    entries = sorted(entry.name for entry in out.iterdir()) if out.is_dir() else []
    if overwrite or not entries:
        return None
    shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
    if not resume:
        raise ConfigError(
            f"output folder {out} already holds files ({shown}): pass --resume to continue that run, "
            "--overwrite to replace it, or choose another --out"
        )
    if (out / CHECKPOINT).is_file():
        checkpoint = _load_checkpoint(out / CHECKPOINT)
        _check_resume_config(checkpoint["config"], config)
        return checkpoint
    if (out / RESULTS).exists():
        raise ConfigError(
            f"--resume: {out} holds the results.json of a finished run but no checkpoint to continue from "
            "(a diverged run saves none); use --overwrite to run it again, or another --out"
        )
    foreign = [name for name in entries if name not in OUTPUT_FILES and not name.endswith(".tmp")]
    if foreign:
        raise ConfigError(
            f"--resume: {out} has no {CHECKPOINT} and holds files that fogzo train did not write "
            f"({', '.join(foreign[:6])}); choose another --out"
        )
    if (out / CONFIG).is_file():
        try:
            saved = read_json(out / CONFIG)
        except (OSError, ValueError) as error:
            raise ConfigError(f"--resume: {out / CONFIG} is unreadable ({error}); use --overwrite or another --out") from None
        _check_resume_config(saved, config, "the config.json in the folder")
    return None


def _remove_outputs(out: Path) -> list[str]:
    removed = []
    for name in OUTPUT_FILES:
        for path in (out / name, out / (name + ".tmp")):
            if path.is_file():
                path.unlink()
                removed.append(path.name)
    return removed


def _kept_records(path: Path, step: int) -> list[dict[str, Any]]:
    """The metrics records up to the checkpoint's step (later ones are redone after resuming)."""
    if not path.exists():
        return []
    return [
        r for r in read_jsonl(path) if r.get("event") not in ("final", "interrupted") and r.get("step", 0) <= step
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
