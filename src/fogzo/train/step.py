"""One training step (:class:`StepRunner`: batch, closure, estimate, clip, optimizer step)
and the calibration that times STE and estimator steps to size a time-budgeted run
(:func:`calibrate`; see :mod:`fogzo.train.trainer`)."""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as fd
from .build import build_estimator, build_optimizer
from .checkpoint import _rng_state, _set_rng_state
from .config import TrainConfig
from .data import TaskData
from .parallel import _mean_over_ranks, _synchronize

__all__ = ["StepRunner", "calibrate", "forward_context"]


def forward_context(config: TrainConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the forward's autocast context (fp32 latent weights either way)."""
    if config.autocast == "none":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if config.autocast == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


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
        loss = float(info.loss) / scale  # (the STE step's info.loss is a 0-d tensor)
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
    assert config.time_budget is not None  # (calibrate sizes a time-budgeted run)
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
