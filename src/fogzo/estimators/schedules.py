"""β schedules for FOGZO: ``β_t`` as a function of the step ``t``."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["BetaSchedule", "constant_beta", "linear_beta"]

BetaSchedule = Callable[[int], float]


def linear_beta(total_steps: int, beta_min: float) -> BetaSchedule:
    """``β_t = 1 − (1 − β_min)·min(t/T, 1)``: linear from 1 at t = 0 to ``β_min`` at t = T."""
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    check_beta(beta_min, "beta_min")

    def beta(step: int) -> float:
        return 1.0 - (1.0 - beta_min) * min(step / total_steps, 1.0)

    return beta


def constant_beta(value: float) -> BetaSchedule:
    """``β_t = value`` for every step."""
    check_beta(value, "beta")
    return lambda step: value


def check_beta(value: float, name: str = "beta") -> float:
    """``value`` if it lies in [0, 1], else ``ValueError`` naming it."""
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return float(value)
