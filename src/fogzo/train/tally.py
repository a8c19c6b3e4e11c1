"""What a training run counts: steps, training time, passes, per-phase step times, the
recent losses, and the ``"train"`` records of ``metrics.jsonl`` (see :mod:`fogzo.train.trainer`).

A :class:`Tally` is saved in every checkpoint (:meth:`Tally.state_dict`) and restored on
resume, so a resumed run continues its counters and its final training loss exactly.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..estimators import EstimateInfo
from .step import _phase

__all__ = ["Tally"]

COUNTERS = ("forward_passes", "backward_passes", "compute_units", "zero_differences", "differences")


@dataclass
class Tally:
    """The run's counters (cumulative) and the current logging interval's (reset by
    :meth:`train_record`). ``recent`` holds the last 50 training losses: their mean is the
    run's ``final_train_loss``."""

    step: int = 0
    elapsed: float = 0.0  # seconds of training steps (no evaluation, no checkpointing)
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    phase_time: dict[str, float] = field(default_factory=dict)
    phase_steps: dict[str, int] = field(default_factory=dict)
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=50))
    _losses: list[float] = field(default_factory=list)
    _time: float = 0.0
    _zero: int = 0
    _differences: int = 0

    def add(self, loss: float, seconds: float, info: EstimateInfo | None) -> None:
        """One finished step: its (global-batch) loss, its time, and what the estimator did
        (``None``: the estimator refused the step)."""
        self.step += 1
        self.elapsed += seconds
        self._losses.append(loss)
        self._time += seconds
        self.recent.append(loss)
        if info is None:
            return
        phase = _phase(info)
        self.phase_time[phase] = self.phase_time.get(phase, 0.0) + seconds
        self.phase_steps[phase] = self.phase_steps.get(phase, 0) + 1
        self.counters["forward_passes"] += info.forward_passes
        self.counters["backward_passes"] += info.backward_passes
        self.counters["compute_units"] += info.compute_units
        self.counters["zero_differences"] += info.zero_differences
        self.counters["differences"] += len(info.differences)
        self._zero += info.zero_differences
        self._differences += len(info.differences)

    def train_record(self, loss: float, lr: float, info: EstimateInfo | None, failure: str | None) -> dict[str, Any]:
        """The ``"train"`` record of the interval since the last one; starts a new interval."""
        record = {
            "event": "train",
            "step": self.step,
            "loss": loss,
            "loss_avg": sum(self._losses) / len(self._losses),
            "lr": lr,
            "beta": info.beta if info is not None else None,
            "phase": _phase(info) if info is not None else None,
            "forward_passes": self.counters["forward_passes"],
            "backward_passes": self.counters["backward_passes"],
            "compute_units": self.counters["compute_units"],
            "wall_time": self.elapsed,
            "step_time": self._time / len(self._losses),
            "zero_difference_fraction": self._zero / self._differences if self._differences else None,
            **({"error": failure} if failure else {}),
        }
        self._losses, self._time, self._zero, self._differences = [], 0.0, 0, 0
        return record

    def summary(self) -> dict[str, Any]:
        """The counters of ``results.json`` (besides ``steps_done`` and ``wall_time``)."""
        return {
            **self.counters,
            "phase_steps": self.phase_steps,
            "phase_step_time": {k: self.phase_time[k] / self.phase_steps[k] for k in self.phase_time},
            "mean_step_time": self.elapsed / self.step if self.step else None,
            "final_train_loss": sum(self.recent) / len(self.recent) if self.recent else None,
        }

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's keys. The logging interval in progress is not saved: after a
        resume, the first ``"train"`` record averages the steps since the resume."""
        return {
            "step": self.step,
            "elapsed": self.elapsed,
            "counters": dict(self.counters),
            "phase_time": dict(self.phase_time),
            "phase_steps": dict(self.phase_steps),
            "recent_losses": list(self.recent),
        }

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        self.step, self.elapsed = int(checkpoint["step"]), float(checkpoint["elapsed"])
        self.counters.update(checkpoint["counters"])
        self.phase_time.update(checkpoint["phase_time"])
        self.phase_steps.update(checkpoint["phase_steps"])
        self.recent.extend(checkpoint["recent_losses"])
