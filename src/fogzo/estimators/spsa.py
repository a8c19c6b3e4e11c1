"""n-SPSA: zeroth-order gradients from random two-point finite differences."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..smoothing import Smoothing
from .base import (
    Backward,
    Closure,
    Direction,
    EstimateInfo,
    StepCounter,
    ZerothOrderMeasurement,
    checked_loss,
    gradient_scale,
    set_gradient,
    stash_gradients,
)
from .perturbation import PerturbedSet, StateGuard

__all__ = ["SPSA"]


class SPSA:
    """``G_x = (1/n) Σ_i [(L(x + ε̄u_i) − L(x − ε̄u_i)) / 2ε̄] · u_i``,  ``G_W = G_x / c``.

    ``u_i`` is drawn i.i.d. per coordinate from the quantizers' smoothing noise, so ``G`` is
    an unbiased estimate of the gradient of the smoothed loss (to second order in ε̄).
    Parameters outside the perturbed set get no gradient (there is no backward pass).

    Cost: ``2n`` forward passes, plus one unperturbed forward when ``report_loss=True``
    (the default) so that ``info.loss`` is ``L(W)``; with ``report_loss=False``,
    ``info.loss`` is the mean perturbed loss. ``one_sided=True`` uses
    ``(L(x + ε̄u_i) − L(x)) / ε̄`` (``n`` + 1 forwards; needs the loss pass).

    ``vectorize=K`` evaluates K perturbed passes at a time in one ``torch.func.vmap``
    forward (same noise, same result up to float summation order): much faster for large
    ``n`` on small models, at K times the memory of the perturbed weights. The model must
    be vmappable (no in-place buffer writes in the forward, e.g. no BatchNorm in training).

    ``backward``: n-SPSA runs no backward pass; a hook (``accelerator.backward``, an AMP
    scaler's ``scale(loss).backward()``) is called once per step on a zero scalar no
    parameter contributes to, only to learn the factor ``k`` it scales gradients by, and
    ``G_W`` is multiplied by ``k`` (see :data:`~fogzo.estimators.base.Backward`).

    Example::

        estimator = fogzo.SPSA(model, n=64, seed=0)
        info = estimator.estimate(lambda: F.cross_entropy(model(x), y))
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        n: int = 1,
        seed: int = 0,
        perturb: str | Iterable[nn.Parameter] = "quantized",
        eps: float = 1e-3,
        smoothing: Smoothing | None = None,
        one_sided: bool = False,
        report_loss: bool = True,
        on_nonfinite: str = "raise",
        vectorize: int | None = None,
        backward: Backward | None = None,
    ) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if one_sided and not report_loss:
            raise ValueError("one_sided=True reuses the unperturbed loss: it needs report_loss=True")
        self.model = model
        self.n = n
        self.report_loss = report_loss
        self.backward = backward
        self.perturbed = PerturbedSet.from_model(model, perturb, eps, smoothing)
        self.measurement = ZerothOrderMeasurement(self.perturbed, one_sided, on_nonfinite, vectorize)
        self.counter = StepCounter(seed)

    def estimate(self, closure: Closure) -> EstimateInfo:
        step, step_seed = self.counter.step, self.counter.step_seed()
        guard = StateGuard(self.model)
        loss0 = None
        if self.report_loss:
            with torch.no_grad():
                loss0 = checked_loss(closure())
        guard.after_first_pass()
        directions = [Direction(sample, guided=0.0, noise=1.0) for sample in range(self.n)]
        guides = [None] * len(self.perturbed.tensors)
        measured = self.measurement.measure(closure, guard, step_seed, directions, guides, loss0)
        differences = measured.differences
        self.counter.step += 1
        forward_passes = int(self.report_loss) + self.n * self.measurement.passes_per_sample
        if differences is None:
            return EstimateInfo(float("nan"), forward_passes, 0, 0.0, step_seed, step, skipped=True)
        gradients = self.measurement.gradients(step_seed, directions, measured, guides)
        scale = gradient_scale(self.backward, self.perturbed.tensors[0].local_param().device)
        for entry, gradient in zip(self.perturbed.tensors, gradients):
            if scale != 1.0:
                gradient.mul_(scale)
            previous = stash_gradients([entry.param])[0]
            set_gradient(entry.param, gradient, previous)
        loss = float(loss0) if loss0 is not None else float(measured.losses.mean())
        return EstimateInfo(
            loss=loss,
            forward_passes=forward_passes,
            backward_passes=0,
            beta=0.0,
            seed=step_seed,
            step=step,
            differences=tuple(differences),
            zero_differences=sum(d == 0.0 for d in differences),
        )

    def state_dict(self) -> dict:
        return self.counter.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.counter.load_state_dict(state)
