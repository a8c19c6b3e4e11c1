"""The estimator protocol: ``estimate(closure) -> EstimateInfo``, its info record, and the
closure and ``backward=`` hook contracts.

An estimator turns a loss closure into gradients in ``.grad``::

    info = estimator.estimate(lambda: F.cross_entropy(model(x), y))
    optimizer.step()

The closure runs a *forward pass only* and returns a scalar tensor; the estimator calls it
as often as it needs (with the perturbed weights shifted in place), calls ``backward`` itself where
it needs a first-order gradient, and fills ``.grad`` so that any ``torch.optim`` optimizer,
scheduler, gradient clipping or AMP scaler works unchanged. Gradients accumulate into an
existing ``.grad`` as ``backward`` would.

What a failed or skipped call leaves behind: :mod:`fogzo.estimators.state`. The
zeroth-order passes: :mod:`fogzo.estimators.engine`.

Cost accounting (docs/method.md §5): a forward pass is 1 unit, a backward pass 2 units.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

__all__ = [
    "Backward",
    "BetaSchedule",
    "Closure",
    "EstimateInfo",
    "Estimator",
    "NONFINITE_MODES",
    "SKIP_REASONS",
    "beta_schedule",
    "check_beta",
    "constant_beta",
    "linear_beta",
    "run_backward",
]


SKIP_REASONS = ("loss", "ste_gradient", "perturbed_loss")
NONFINITE_MODES = ("raise", "skip", "keep")
"""``on_nonfinite``: raise ``FloatingPointError``; skip the step (nothing changes but the step
counter); or keep the STE pass's gradient as back-propagated, finite or not, and flag the step
skipped — what a loss scaler (``torch.amp.GradScaler``) needs to see an fp16 overflow, skip the
optimizer step and lower its scale (n-SPSA has no STE gradient: there "keep" is "skip")."""
"""Values of ``EstimateInfo.skip_reason``: the unperturbed loss ``L(W)`` (the STE pass, or
n-SPSA's loss pass) was non-finite; the STE gradient was; a perturbed loss was."""

Closure = Callable[[], torch.Tensor]
Backward = Callable[[torch.Tensor], object]
"""A ``backward=`` hook: called with the loss, back-propagates it (default ``loss.backward()``).

Training frameworks pass their own: ``accelerator.backward`` (Hugging Face), Lightning's
``manual_backward``, or ``lambda loss: scaler.scale(loss).backward()`` (AMP). Such a hook may
scale the loss by a factor ``k`` (loss scaling ``S``, ``1/N`` for gradient accumulation):
:func:`run_backward` measures ``k`` and the estimators multiply their zeroth-order
gradients by it, so every ``.grad`` is in the units the optimizer step expects."""


@dataclass(frozen=True)
class EstimateInfo:
    """What one ``estimate`` call did.

    Attributes:
        loss: the unperturbed loss ``L(W)`` (for n-SPSA without a loss pass: the mean of
            the perturbed losses, an estimate of the smoothed loss).
        forward_passes, backward_passes: passes run by this call.
        beta: the mixing weight ``β_t`` (``None`` for a plain STE step, 0 for n-SPSA).
        seed: the step seed from which all noise of this call was derived.
        step: the estimator's step counter before this call.
        differences: the finite differences ``d_i`` (empty for STE).
        zero_differences: how many ``d_i`` are exactly 0 (typically: no quantized weight
            changed level in the perturbed passes).
        ste_grad_norm: ``‖g_x‖``, the STE gradient's norm in normalised coordinates.
        skipped: ``on_nonfinite="skip"`` skipped this step: ``.grad``, parameters and
            buffers are as before the call (only the step counter advanced).
        skip_reason: why (one of :data:`SKIP_REASONS`), ``None`` for a step not skipped.
        measured: ``False`` when every finite difference was exactly 0: the perturbed passes
            did not change the loss, so the step measured nothing (a warning says so, once
            per estimator). FOGZO then keeps the STE gradient for the step instead of
            replacing it with 0; n-SPSA, which has no other gradient, leaves 0.

    ``loss`` is a float for the zeroth-order estimators, read in the one host sync their step
    makes anyway. The STE step makes none: its ``loss`` is the detached 0-d loss tensor
    (``float(info.loss)`` reads it, a host sync on a GPU).
    """

    loss: float | torch.Tensor
    forward_passes: int
    backward_passes: int
    beta: float | None
    seed: int | None
    step: int
    differences: tuple[float, ...] = ()
    zero_differences: int = 0
    ste_grad_norm: float | None = None
    skipped: bool = False
    skip_reason: str | None = None
    measured: bool = True

    @property
    def compute_units(self) -> int:
        """Forward = 1 unit, backward = 2 units."""
        return self.forward_passes + 2 * self.backward_passes


@runtime_checkable
class Estimator(Protocol):
    """``estimate(closure) -> EstimateInfo`` plus a resumable step counter."""

    def estimate(self, closure: Closure) -> EstimateInfo: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def run_backward(loss: torch.Tensor, backward: Backward | None) -> float:
    """Back-propagate ``loss`` through ``backward`` (``None``: ``loss.backward()``); return ``k``.

    ``k`` is the factor by which the hook scales the gradients it produces: the hook gets
    ``loss + p`` for a float32 zero scalar ``p`` that requires grad (same value, same graph
    plus one addition), and ``k = p.grad``. Without a hook ``k = 1`` and nothing is added.
    """
    if backward is None:
        loss.backward()
        return 1.0
    probe = torch.zeros((), device=loss.device, dtype=torch.float32, requires_grad=True)
    backward(loss + probe)
    return _probe_factor(probe)


def gradient_scale(backward: Backward | None, device: torch.device) -> float:
    """``k`` of a ``backward`` hook for an estimator without a backward pass (n-SPSA).

    The hook back-propagates a zero scalar that no parameter contributes to, so it only
    measures ``k`` (for example the loss scale of an AMP ``GradScaler``).
    """
    if backward is None:
        return 1.0
    probe = torch.zeros((), device=device, dtype=torch.float32, requires_grad=True)
    backward(probe * 1.0)  # a non-leaf root, as a loss would be
    return _probe_factor(probe)


def _probe_factor(probe: torch.Tensor) -> float:
    if probe.grad is None:
        raise RuntimeError(
            "the backward= hook did not back-propagate the loss it was given; it must call "
            "backward on that tensor (for example accelerator.backward(loss) or loss.backward())"
        )
    factor = float(probe.grad)
    if not math.isfinite(factor) or factor == 0.0:
        raise RuntimeError(f"the backward= hook scales gradients by {factor}; expected a finite non-zero factor")
    return factor


def nothing_measured_message(estimator: str, model: torch.nn.Module, perturbed: list, action: str) -> str:
    """The warning for a step whose finite differences were all exactly 0 (``info.measured``)."""
    zero = [entry.name for entry in perturbed if not bool(entry.param.detach().any())]
    where = f" All-zero perturbed tensors (they sit exactly on a level): {zero[:5]}." if zero else ""
    return (
        f"{estimator}: every finite difference of this step was exactly 0, so the step measured nothing: "
        "no perturbed pass changed the loss (no quantized weight crossed a level, or the loss does not depend on "
        f"the perturbed weights, e.g. a LoRA B matrix initialised to zero).{where} {action} "
        "info.measured is False for such steps; this warning is shown once per estimator."
    )


def checked_loss(value: object) -> torch.Tensor:
    """The closure's return value, which must be a scalar tensor."""
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"the closure must return a scalar loss tensor, got {shape}")
    return value if value.dim() == 0 else value.reshape(())


def differentiable_loss(value: object, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The closure's return value for a pass the estimator back-propagates: a scalar tensor
    that requires grad, from a closure that did not call ``backward`` itself (the estimator's
    ``params`` have no ``.grad`` during a call, see :class:`fogzo.estimators.state.CallState`)."""
    loss = checked_loss(value)
    if not loss.requires_grad:
        if not torch.is_grad_enabled():
            raise RuntimeError(
                "estimate() was called under torch.no_grad() or torch.inference_mode(): the STE pass "
                "needs autograd; call it with gradients enabled"
            )
        raise ValueError(
            "the closure's loss does not require grad: it is detached from the model (.detach(), "
            "torch.no_grad() inside the closure, or a tensor made from .item()); return the loss as "
            "computed from the model's output"
        )
    if any(param.grad is not None for param in params):
        raise ValueError(
            "the closure called backward() itself: it must only run the forward pass and return the "
            "loss, the estimator back-propagates it (with retain_graph=True the gradient would be "
            "counted twice)"
        )
    return loss


def loss_value(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` detached, in float32, or float64 for a float64 loss (no operator where it
    already is): the finite differences of a float64 model keep its precision."""
    if loss.requires_grad:
        loss = loss.detach()
    return loss if loss.dtype in (torch.float32, torch.float64) else loss.float()


# β schedules (FOGZO's mixing weight; the noise-matched STE follows the same schedule).

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


def beta_schedule(beta: float | BetaSchedule | None, total_steps: int, beta_min: float) -> BetaSchedule:
    """The schedule of ``beta=`` (a constant or a callable ``step -> β``), or the linear one from 1
    to ``beta_min`` over ``total_steps`` when ``beta`` is None (both are validated either way)."""
    linear = linear_beta(total_steps, beta_min)
    if beta is None:
        return linear
    if isinstance(beta, (int, float)) and not isinstance(beta, bool):
        return constant_beta(beta)
    if callable(beta):
        return beta
    raise ValueError(f"beta must be a number in [0, 1] or a callable step -> beta, got {beta!r}")


def check_beta(value: float, name: str = "beta") -> float:
    """``value`` if it lies in [0, 1], else ``ValueError`` naming it."""
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return float(value)
