"""The smoothed-forward (stochastic-rounding) STE: the STE at a random point of the smoothing.

Each step draws ``u`` from the quantized weights' own smoothing (the noise law and ``ε̄`` that
define the STE, docs/method.md §2), runs the closure with every quantized layer's latent weight
at ``W + c·ε̄·u`` (``c`` the quantizer's coordinate scale ``α``, per tensor or per channel), and
back-propagates through the STE there::

    G_W = ∇_STE L(W + c·ε̄·u),        u ~ p i.i.d. per coordinate, fresh each step.

The forward therefore sees ``h(x + ε̄u)``, one stochastic rounding of the weights, exactly the
draw that defines the smoothed loss ``L_s(x) = E_u[L(h(x + ε̄u))]``: the estimator descends
``L_s`` one sample at a time, at an STE step's cost plus one noise draw. It is *not* an unbiased
estimate of ``∇L_s`` (docs/method.md §8): the backward is the STE surrogate at the drawn point,
so ``E[G]`` is the STE's gradient averaged over the smoothing — for a loss linear in ``Q(W)``
the gradient of the loss smoothed *twice* (noise ``ε̄(u + u')``), not once.

The shift is written into the parameters' storage under ``no_grad`` and undone by copying a
backup back (bit for bit, also when the closure or the backward raises), so any model and any
quantizer adapter works; the cost is one copy of the quantized weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..smoothing import Smoothing
from .base import Backward, Closure, EstimateInfo, checked_loss
from .perturbed_set import PerturbedSet, PerturbedTensor
from .state import CallState, Snapshot, StepCounter, run_guarded

__all__ = ["SmoothedForwardSTE"]


class SmoothedForwardSTE:
    """``G_W = ∇_STE L(W + c·ε̄·u)`` with a fresh ``u`` from the STE's smoothing each step.

    Args:
        model: a model quantized with :func:`fogzo.quantize` (or by layers a
            :mod:`fogzo.adapters` adapter recognises); its quantized latent weights are shifted.
        seed: base seed; the noise of step ``t`` derives from ``(seed, t, tensor)`` (a private
            ``torch.Generator``, never the global RNG).
        smoothing: override the noise law and ``ε̄`` (default: the quantized layers' own).
        backward: a hook called with the loss instead of ``loss.backward()``.

    Cost: 1 forward + 1 backward (3 units), plus one noise draw and one copy of the quantized
    weights. Every parameter is bit-identical after a call (and after a failed one).

    Example::

        estimator = fogzo.SmoothedForwardSTE(model, seed=0)
        info = estimator.estimate(lambda: F.cross_entropy(model(x), y))  # fills .grad
        optimizer.step()
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        seed: int = 0,
        smoothing: Smoothing | None = None,
        backward: Backward | None = None,
    ) -> None:
        self.model = model
        self.backward = backward
        self.perturbed = PerturbedSet.from_model(model, "quantized", smoothing=smoothing)
        if self.perturbed.sharded:
            raise ValueError("SmoothedForwardSTE does not support FSDP-sharded weights")
        self.counter = StepCounter(seed)
        self._snapshots = (Snapshot(),)

    def estimate(self, closure: Closure) -> EstimateInfo:
        """One step: fills ``.grad`` with the STE gradient at the shifted weights. On failure
        ``.grad``, parameters, buffers, the step counter and the global RNG are as before."""
        self.perturbed.check_trainable()
        params = [p for p in self.model.parameters() if p.requires_grad]
        state = CallState(self.model, params, self.counter, self._snapshots[0])
        return run_guarded(state, lambda: self._step(closure, state))

    def _step(self, closure: Closure, state: CallState) -> EstimateInfo:
        step, step_seed = self.counter.step, self.counter.step_seed()
        eps_bar = self.perturbed.smoothing.eps_bar
        weights = [entry.param for entry in self.perturbed.tensors]
        backups: list[torch.Tensor] = []
        try:
            with torch.no_grad():
                for entry in self.perturbed.tensors:
                    shift = self.perturbed.noise(entry, step_seed, 0).mul_(_scale(entry, eps_bar))
                    backups.append(entry.param.detach().clone())
                    entry.param.add_(shift)
            loss = checked_loss(closure())
            if self.backward is None:
                loss.backward()
            else:
                self.backward(loss)
        finally:
            with torch.no_grad():
                for weight, backup in zip(weights, backups):
                    weight.copy_(backup)
        info = EstimateInfo(  # loss: read on the host only when info.loss is
            loss=loss.detach(), forward_passes=1, backward_passes=1, beta=None, seed=step_seed, step=step  # type: ignore[arg-type]
        )
        state.commit()
        return info

    def state_dict(self) -> dict:
        return self.counter.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.counter.load_state_dict(state)


def _scale(entry: PerturbedTensor, eps_bar: float) -> torch.Tensor | float:
    """``c·ε̄``, broadcastable to the weight (``c`` per tensor, per channel or per group), detached."""
    scale = entry.coordinate_scale(eps_bar)
    if isinstance(scale, torch.Tensor):
        return scale.detach().to(entry.param.dtype) * eps_bar
    return scale * eps_bar
