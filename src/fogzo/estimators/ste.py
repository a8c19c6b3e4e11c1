"""The straight-through estimator, and two controls built on it (docs/method.md §8).

* :class:`STE`: one forward, one backward through the STE surrogates.
* :class:`SmoothedForwardSTE`, the stochastic-rounding STE:

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

* :class:`NoiseMatchedSTE`:

  FOGZO's step (n = 1) is ``G_x = d·v`` with ``v = √β·s·ĝ + √(1−β)·u`` and ``ĝ = r·g_x/‖g_x‖``
  (docs/method.md §4). Under the first-order model ``d ≈ vᵀg_x`` its per-coordinate random part
  ``G_x − E[G_x]`` has variance (docs/method.md §8)::

      Var(G_x,j) = (1−β)·(β·r² + 1 − β)·‖g_x‖²  +  O(g_x,j²),

  dominated by ``d·√(1−β)·u_j`` with ``E[d²] = (β·r² + 1 − β)·‖g_x‖²``. This estimator keeps the
  STE gradient and adds exactly that leading term, with no extra forward pass::

      G_x = g_x + √(1−β_t)·m·u,        m = √(β_t·r² + 1 − β_t)·‖g_x‖,    u ~ p i.i.d.,

  ``u`` from the STE's noise law (the one FOGZO perturbs with), ``β_t`` on FOGZO's schedule, and
  ``G_W = G_x / c`` per perturbed tensor (``c = α``, or ``ε/ε̄`` for a tensor without a quantizer).
  What it leaves out: FOGZO's measured magnitude along ``ĝ`` (its mean is ``(βr² + 1 − β)·g_x``, a
  rescaled STE gradient), the ``O(g_x,j²)`` terms (a ``1/d`` fraction of the variance) and the
  finite difference's departure from ``vᵀg_x`` on a quantized loss.

"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..smoothing import Smoothing
from .base import Backward, BetaSchedule, Closure, EstimateInfo, beta_schedule, check_beta, differentiable_loss
from .perturbed_set import PerturbedSet, PerturbedTensor
from .state import CallState, Snapshot, StepCounter, run_guarded

__all__ = ["STE", "NoiseMatchedSTE", "SmoothedForwardSTE"]


class STE:
    """``G = ∇_W L`` with every quantizer's backward replaced by its surrogate slope.

    Cost: 1 forward + 1 backward (3 units). ``model`` is accepted for the common
    ``Estimator(model, ...)`` signature. ``backward``: a hook called with the loss instead
    of ``loss.backward()`` (see :data:`~fogzo.estimators.base.Backward`). ``seed``: the step
    counter's base seed (the STE draws nothing; the two controls below, built on this class, do).

    Example::

        estimator = fogzo.STE(model)
        info = estimator.estimate(lambda: F.cross_entropy(model(x), y))
    """

    perturbed: PerturbedSet | None = None  # the controls below: the tensors they shift or add noise to

    def __init__(self, model: nn.Module | None = None, *, backward: Backward | None = None, seed: int = 0) -> None:
        self.model = model
        self.backward = backward
        self.counter = StepCounter(seed)
        self._snapshots = (Snapshot(), Snapshot())  # the call state; the controls' backup of W

    def estimate(self, closure: Closure) -> EstimateInfo:
        """``closure().backward()``; on failure (an exception in the closure or the backward,
        ``KeyboardInterrupt`` too) ``.grad``, buffers, the step counter and the global RNG
        are as before the call (``.grad`` and buffers only when ``model`` was given). A
        non-finite loss is not checked: it back-propagates as with plain ``backward``."""
        if self.perturbed is not None:
            self.perturbed.check_trainable()
        params = [] if self.model is None else [p for p in self.model.parameters() if p.requires_grad]
        state = CallState(self.model, params, self.counter, self._snapshots[0])
        return run_guarded(state, lambda: self._step(closure, state))

    def _ste_pass(self, closure: Closure, state: CallState) -> torch.Tensor:
        """``L = closure()`` and its backward (through the ``backward=`` hook if given)."""
        loss = differentiable_loss(closure(), state.params)
        if self.backward is None:
            loss.backward()
        else:
            self.backward(loss)
        return loss

    def _step(self, closure: Closure, state: CallState) -> EstimateInfo:
        loss = self._ste_pass(closure, state)
        info = EstimateInfo(  # loss: the 0-d tensor, no host sync in the step (see EstimateInfo)
            loss=loss.detach(), forward_passes=1, backward_passes=1, beta=None, seed=None, step=self.counter.step
        )
        state.commit()
        return info

    def state_dict(self) -> dict:
        return self.counter.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.counter.load_state_dict(state)


class SmoothedForwardSTE(STE):
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
        super().__init__(model, backward=backward, seed=seed)
        self.perturbed = PerturbedSet.from_model(model, "quantized", smoothing=smoothing)
        if self.perturbed.sharded:
            raise ValueError("SmoothedForwardSTE does not support FSDP-sharded weights")

    def _step(self, closure: Closure, state: CallState) -> EstimateInfo:
        assert self.perturbed is not None
        step, step_seed = self.counter.step, self.counter.step_seed()
        eps_bar = self.perturbed.smoothing.eps_bar
        backup = self._snapshots[1]
        backup.take(self.perturbed.params)  # W, restored bit for bit below
        try:
            with torch.no_grad():
                for entry, u in zip(self.perturbed.tensors, self.perturbed.noises(step_seed, 0)):  # W + c·ε̄·u
                    entry.param.add_(u.mul_(_coordinate_scale(entry, eps_bar)), alpha=eps_bar)
            loss = self._ste_pass(closure, state)
        finally:
            backup.restore()
        info = EstimateInfo(  # loss: read on the host only when info.loss is
            loss=loss.detach(), forward_passes=1, backward_passes=1, beta=None, seed=step_seed, step=step
        )
        state.commit()
        return info


class NoiseMatchedSTE(STE):
    """``G_W = g_W + k·√(1−β_t)·m·u / c`` with ``m = √(β_t·r² + 1 − β_t)·‖c·g_W‖`` and ``k = noise_scale``
    (1: matched; see the module docstring).

    Args:
        model: a quantized model (as for :class:`fogzo.FOGZO`).
        total_steps: ``T`` of the β schedule.
        beta_min: ``β`` at step ``T`` of the linear schedule (FOGZO's default).
        seed: base seed; the noise of step ``t`` derives from ``(seed, t, tensor)``.
        beta: a constant or a callable ``step -> β`` replacing the linear schedule.
        perturb: the tensors that get noise, as FOGZO's ``perturb`` (``"quantized"``, ``"all"``
            or an iterable); the norm ``‖g_x‖`` is taken over the same set.
        eps: step ``ε`` for tensors without a quantizer (``c = ε/ε̄``), as FOGZO's.
        guide_norm: ``r = ‖ĝ‖`` of the FOGZO being matched.
        noise_scale: a factor ``k`` on ``m`` (the noise's variance is ``k²`` times the matched one;
            on the quantized MNIST MLP FOGZO's measured ``E[d²]`` is 1.6–3.1× the first-order
            model's, docs/method.md §8).
        smoothing: override the noise law and ``ε̄``.
        backward: a hook called with the loss instead of ``loss.backward()``; the noise is
            added to ``.grad`` in the hook's units (``m`` is measured from ``.grad``).

    Cost: 1 forward + 1 backward (3 units) plus one noise draw. No host sync.

    Example::

        estimator = fogzo.NoiseMatchedSTE(model, total_steps=10_000, beta_min=0.999, seed=0)
        info = estimator.estimate(lambda: F.cross_entropy(model(x), y))
        optimizer.step()
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        total_steps: int,
        beta_min: float = 0.999,
        seed: int = 0,
        beta: float | BetaSchedule | None = None,
        perturb: str | Iterable[nn.Parameter] = "quantized",
        eps: float = 1e-3,
        guide_norm: float = 1.0,
        noise_scale: float = 1.0,
        smoothing: Smoothing | None = None,
        backward: Backward | None = None,
    ) -> None:
        if not (guide_norm > 0 and math.isfinite(guide_norm)):
            raise ValueError(f"guide_norm must be a positive finite number, got {guide_norm!r}")
        if not (noise_scale >= 0 and math.isfinite(noise_scale)):
            raise ValueError(f"noise_scale must be a finite number >= 0, got {noise_scale!r}")
        super().__init__(model, backward=backward, seed=seed)
        self.schedule: BetaSchedule = beta_schedule(beta, total_steps, beta_min)
        self.total_steps = total_steps
        self.guide_norm = float(guide_norm)
        self.noise_scale = float(noise_scale)
        self.perturbed = PerturbedSet.from_model(model, perturb, eps, smoothing)
        if self.perturbed.sharded:
            raise ValueError("NoiseMatchedSTE does not support FSDP-sharded weights")

    def matched_scale(self, beta: float) -> torch.Tensor:
        """``k·√(1−β)·m`` for the gradients now in ``.grad`` (a device scalar)."""
        assert self.perturbed is not None
        eps_bar = self.perturbed.smoothing.eps_bar
        squares = [
            (entry.param.grad.detach() * _coordinate_scale(entry, eps_bar)).double().square().sum()
            for entry in self.perturbed.tensors
            if entry.param.grad is not None
        ]
        norm_sq = torch.stack(squares).sum() if squares else torch.zeros((), dtype=torch.float64)
        r2 = self.guide_norm**2
        return (norm_sq * ((1.0 - beta) * (beta * r2 + 1.0 - beta) * self.noise_scale**2)).sqrt()

    def _step(self, closure: Closure, state: CallState) -> EstimateInfo:
        assert self.perturbed is not None
        step, step_seed = self.counter.step, self.counter.step_seed()
        loss = self._ste_pass(closure, state)
        beta = check_beta(self.schedule(step), f"beta at step {step}")
        eps_bar = self.perturbed.smoothing.eps_bar
        scale = self.matched_scale(beta)
        with torch.no_grad():
            for entry, noise in zip(self.perturbed.tensors, self.perturbed.noises(step_seed, 0)):
                param = entry.param
                noise.mul_(scale.to(noise.dtype)).div_(_coordinate_scale(entry, eps_bar))
                if param.grad is None:
                    param.grad = noise
                else:
                    param.grad.add_(noise)
        info = EstimateInfo(
            loss=loss.detach(), forward_passes=1, backward_passes=1, beta=beta, seed=step_seed, step=step
        )
        state.commit()
        return info


def _coordinate_scale(entry: PerturbedTensor, eps_bar: float) -> torch.Tensor | float:
    """``c``, broadcastable to the weight (per tensor, per channel or per group), detached."""
    scale = entry.coordinate_scale(eps_bar)
    return scale.detach().to(entry.param.dtype) if isinstance(scale, torch.Tensor) else scale
