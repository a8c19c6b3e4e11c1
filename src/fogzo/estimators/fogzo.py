"""FOGZO: first-order-guided zeroth-order gradient estimation (Yang & Aamodt, NeurIPS 2025).

One step (SPEC §3), for the perturbed tensors in normalised coordinates ``x = W/c``:

1. STE pass: ``L0 = closure()``, ``backward()`` → ``g_W`` for every parameter;
   ``g_x = c·g_W``;  ``ĝ = r·g_x / ‖g_x‖`` (global norm over the perturbed set, r = 1).
2. ``β_t``: linear from 1 at t = 0 to ``β_min`` at t = T (or a user schedule).
3. For i = 1..n: sign ``s_i ∈ {±1}``, noise ``u_i ~ p`` (the STE's smoothing);
   ``v_i = √β_t·s_i·ĝ + √(1−β_t)·u_i``;
   ``d_i = (L(x + ε̄v_i) − L(x − ε̄v_i)) / 2ε̄``  (one-sided: ``(L(x + ε̄v_i) − L0) / ε̄``).
4. ``G_x = (1/n) Σ_i d_i·v_i``;  ``G_W = G_x / c`` replaces the STE gradient of the
   perturbed tensors; every other parameter keeps its back-propagated gradient.

Memory: no model-sized buffer beyond the STE gradient. For n = 1 the shift ``c·ε̄·v`` is
built once, in the STE gradient's buffer, and ``G_W = d·(c·ε̄·v)/(ε̄·c²)`` reuses it (one
noise draw per step). For n > 1 nothing is stored per sample: the guided part of ``G_W`` is
``[(1/n) Σ_i d_i·√β·s_i·r/‖g_x‖]·g_W`` (the ``c`` cancels) and the noise part
``(1/n) Σ_i d_i·√(1−β)·u_i / c`` regenerates ``u_i`` from its seed (see
:class:`~fogzo.estimators.base.ZerothOrderMeasurement`). The shifted weights exist one at a
time, around the forward that reads each; a weight read outside every module's forward
(e.g. in the closure) is shifted for the whole pass (:meth:`PerturbedSet.swapped`).

β = 0 is n-SPSA with the STE's noise law; β = 1 gives ``G = (directional derivative along
ĝ)·ĝ``. Cost: 1 forward + 1 backward + 2n forwards (n forwards one-sided).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..smoothing import Smoothing
from .base import (
    NONFINITE_ADVICE,
    Backward,
    CallState,
    Closure,
    Direction,
    EstimateInfo,
    Guide,
    StepCounter,
    ZerothOrderMeasurement,
    checked_loss,
    is_distributed,
    run_backward,
    run_guarded,
    set_gradient,
)
from .perturbation import SIGN_STREAM, PerturbedSet, StateGuard, derive_seed, local_part
from .schedules import BetaSchedule, check_beta, constant_beta, linear_beta

__all__ = ["FOGZO"]

NORMALIZATIONS = ("global", "tensor")


class FOGZO:
    """The FOGZO gradient estimator (see the module docstring for the equations).

    Args:
        model: a model quantized with :func:`fogzo.quantize`, prepared by torchao QAT, or quantized
            by any layers a :mod:`fogzo.adapters` adapter recognises.
        total_steps: ``T`` of the β schedule (and of ``ste_fraction``).
        beta_min: ``β`` at step ``T`` of the linear schedule.
        n: perturbation samples per step.
        seed: base seed; the noise of step ``t`` derives from ``(seed, t, tensor, sample)``.
        beta: a constant or a callable ``step -> β`` replacing the linear schedule.
        perturb: ``"quantized"`` (default), ``"all"`` trainable parameters, or an iterable.
        eps: step ``ε`` for perturbed tensors without a quantizer (``c = ε/ε̄``).
        smoothing: override the noise law and ``ε̄`` of the quantized layers.
        one_sided: ``d_i = (L(x + ε̄v_i) − L0)/ε̄``: one extra forward per sample instead
            of two. Its bias is O(ε̄) (the two-sided one is O(ε̄²)): the curvature term
            ``ε̄/2 · vᵀ∇²L v`` enters every ``d_i``.
        ste_fraction: run plain STE for the first ``ste_fraction·T`` steps, FOGZO after.
        normalize: ``"global"`` (``ĝ = r·g_x/‖g_x‖``) or ``"tensor"`` (each tensor's
            part normalised on its own, then scaled by ``1/√K`` for K tensors so ``‖ĝ‖ = r``).
        guide_norm: ``r = ‖ĝ‖`` (1 in the paper's reading).
        on_nonfinite: on a non-finite loss (the STE pass's or a perturbed one) or STE
            gradient: ``"raise"`` a ``FloatingPointError`` that says which pass, with
            everything as before the call; or ``"skip"`` the step: ``.grad``, parameters
            and buffers as before the call (nothing for the optimizer to apply), the step
            counter advanced, ``info.skipped`` set and ``info.skip_reason`` saying which; or
            ``"keep"`` the STE pass's gradient as back-propagated, finite or not, and flag
            the step skipped (with a ``torch.amp.GradScaler``: it sees the overflow, skips
            the optimizer step and lowers its scale).
        vectorize: evaluate this many perturbed passes per ``torch.func.vmap`` forward
            (see :class:`~fogzo.SPSA`); ``None`` runs them one by one.
        backward: a hook called with the STE pass's loss instead of ``loss.backward()``
            (``accelerator.backward``, Lightning's ``manual_backward``). If it scales the
            loss by ``k`` (loss scaling, gradient accumulation), ``G_W`` is multiplied by
            the same ``k``; a non-finite STE gradient (a loss-scaling overflow) then follows
            ``on_nonfinite`` — use ``"keep"`` with a loss scaler (see
            :data:`~fogzo.estimators.base.Backward`).

    Example::

        estimator = fogzo.FOGZO(model, total_steps=10_000, beta_min=0.999, n=1, seed=0)
        info = estimator.estimate(lambda: F.cross_entropy(model(x), y))  # fills .grad
        optimizer.step()
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        total_steps: int,
        beta_min: float = 0.999,
        n: int = 1,
        seed: int = 0,
        beta: float | BetaSchedule | None = None,
        perturb: str | Iterable[nn.Parameter] = "quantized",
        eps: float = 1e-3,
        smoothing: Smoothing | None = None,
        one_sided: bool = False,
        ste_fraction: float = 0.0,
        normalize: str = "global",
        guide_norm: float = 1.0,
        on_nonfinite: str = "raise",
        vectorize: int | None = None,
        backward: Backward | None = None,
    ) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if not isinstance(ste_fraction, (int, float)) or not 0.0 <= ste_fraction <= 1.0:
            raise ValueError(f"ste_fraction must lie in [0, 1], got {ste_fraction!r}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if not (guide_norm > 0 and math.isfinite(guide_norm)):
            raise ValueError(f"guide_norm must be a positive finite number, got {guide_norm!r}")
        self.model = model
        self.n = n
        linear = linear_beta(total_steps, beta_min)  # validates total_steps and beta_min
        if beta is None:
            self.schedule: BetaSchedule = linear
        elif isinstance(beta, (int, float)):
            self.schedule = constant_beta(beta)
        elif callable(beta):
            self.schedule = beta
        else:
            raise ValueError(f"beta must be a number in [0, 1] or a callable step -> beta, got {beta!r}")
        self.total_steps = total_steps
        self.ste_steps = round(ste_fraction * total_steps)
        self.normalize = normalize
        self.guide_norm = float(guide_norm)
        self.backward = backward
        self.perturbed = PerturbedSet.from_model(model, perturb, eps, smoothing)
        self.measurement = ZerothOrderMeasurement(self.perturbed, one_sided, on_nonfinite, vectorize)
        self.counter = StepCounter(seed)

    def estimate(self, closure: Closure) -> EstimateInfo:
        """One step: fills ``.grad`` (see the module docstring); state contract in
        :mod:`fogzo.estimators.base`: on failure nothing changes, a skipped step changes
        nothing but the step counter."""
        self.perturbed.check_trainable()
        params = [p for p in self.model.parameters() if p.requires_grad]  # the STE backward writes these
        state = CallState(self.model, params, self.counter)
        return run_guarded(state, lambda: self._step(closure, state))

    def _step(self, closure: Closure, state: CallState) -> EstimateInfo:
        step, step_seed = self.counter.step, self.counter.step_seed()
        guard = StateGuard(self.model)

        # 1. STE pass: L0 and g_W; ĝ = r·c·g_W/‖c·g_W‖.
        loss0 = checked_loss(closure())
        keep = self.measurement.on_nonfinite == "keep"
        if not keep and not is_distributed() and not bool(torch.isfinite(loss0.detach())):
            # (Distributed: every rank runs on, and the flags of measure() decide together.)
            return self._nonfinite(state, step_seed, step, loss0, "loss", "non-finite loss in the unperturbed (STE) "
                                   f"forward pass: L(W) = {float(loss0.detach())}")
        scale = run_backward(loss0, self.backward)  # k: .grad holds k·g_W (k = 1 without a hook)
        if step < self.ste_steps:
            state.commit()
            return EstimateInfo(float(loss0.detach()), 1, 1, None, step_seed, step)
        guides, norm = self._guides([entry.param.grad for entry in self.perturbed.tensors])
        norm /= abs(scale)
        if not math.isfinite(norm):
            # E.g. an fp16 loss-scaling overflow: no direction to follow.
            finite_loss = bool(torch.isfinite(loss0.detach()))
            return self._nonfinite(
                state, step_seed, step, loss0, "ste_gradient" if finite_loss else "loss",
                f"non-finite STE gradient (‖g_x‖ = {norm}) with L(W) = {float(loss0.detach())}", norm,
            )

        # 2. β_t.
        beta = check_beta(self.schedule(step), f"beta at step {step}")
        guard.after_first_pass()  # from here on, measure() restores all state on exit

        # 3. v_i = √β·s_i·ĝ + √(1−β)·u_i;  d_i from the perturbed passes.
        directions = [
            Direction(sample, guided=math.sqrt(beta) * self._sign(step_seed, sample), noise=math.sqrt(1.0 - beta))
            for sample in range(self.n)
        ]
        measured = self.measurement.measure(closure, guard, step_seed, directions, guides, loss0)
        differences = measured.differences
        forward_passes = 1 + self.n * self.measurement.passes_per_sample
        if differences is None:  # on_nonfinite="skip" or "keep"
            assert measured.reason is not None
            if keep:
                state.commit()  # the STE pass's gradient stays
            else:
                state.restore(advance=True)
            return EstimateInfo(float(loss0.detach()), forward_passes, 1, beta, step_seed, step, skipped=True,
                                skip_reason=measured.reason)

        # 4. G_W = (1/n) Σ_i d_i·v_i / c  =  guided·g_W  +  (1/n) Σ_i d_i·√(1−β)·u_i / c.
        gradients = self.measurement.gradients(step_seed, directions, measured, guides)
        for entry, gradient in zip(self.perturbed.tensors, gradients):
            if scale != 1.0:
                gradient.mul_(scale)
            entry.param.grad = None
            set_gradient(entry.param, gradient, None)  # replaces this call's STE gradient
        state.commit()  # adds the gradients from before the call, as backward would
        return EstimateInfo(
            loss=float(loss0.detach()),
            forward_passes=forward_passes,
            backward_passes=1,
            beta=beta,
            seed=step_seed,
            step=step,
            differences=tuple(differences),
            zero_differences=sum(d == 0.0 for d in differences),
            ste_grad_norm=norm,
        )

    def _nonfinite(
        self,
        state: CallState,
        step_seed: int,
        step: int,
        loss0: torch.Tensor,
        reason: str,
        message: str,
        norm: float | None = None,
    ) -> EstimateInfo:
        """Raise ``FloatingPointError`` (state restored by the caller), skip the step, or keep
        the STE pass's gradient as it is (``"keep"``, for loss scalers)."""
        if self.measurement.on_nonfinite == "raise":
            raise FloatingPointError(f"{message}; {NONFINITE_ADVICE}")
        if self.measurement.on_nonfinite == "keep":
            state.commit()
        else:
            state.restore(advance=True)
        backward = int(norm is not None)
        return EstimateInfo(
            float(loss0.detach()), 1, backward, None, step_seed, step, ste_grad_norm=norm, skipped=True,
            skip_reason=reason,
        )

    def _guides(self, gradients: list[torch.Tensor | None]) -> tuple[list[Guide | None], float]:
        """Per tensor, the factor k with ``ĝ = k·c·g_W``; and the global ``‖g_x‖``."""
        eps_bar = self.perturbed.smoothing.eps_bar
        gradients = [None if g is None else local_part(g) for g in gradients]  # FSDP: this rank's shard
        squared_norms = []
        for entry, gradient in zip(self.perturbed.tensors, gradients):
            if gradient is None:
                squared_norms.append(torch.zeros((), device=entry.local_param().device))
                continue
            scale = entry.coordinate_scale(eps_bar)
            if isinstance(scale, torch.Tensor) and scale.numel() == gradient.shape[0] > 1:  # per-channel c
                rows = gradient.reshape(gradient.shape[0], -1).float().square().sum(dim=1)  # Σ_rows c²·‖g_row‖²
                squared_norms.append((rows * scale.reshape(-1).float().square()).sum().reshape(()))
            elif isinstance(scale, torch.Tensor) and scale.numel() > 1:  # per group (torchao): c of W's shape
                squared_norms.append(torch.linalg.vector_norm(gradient.float() * scale.float()).square().reshape(()))
            else:  # one pass over the gradient: ‖c·g‖² = c²·‖g‖²
                squared_norms.append((torch.linalg.vector_norm(gradient.float()).square() * (scale * scale)).reshape(()))
        stacked = torch.stack([s.to(squared_norms[0].device) for s in squared_norms])
        if self.perturbed.sharded and dist.is_initialized():
            # Squared norms of the shards add up to those of the tensors: one all-reduce of
            # K scalars (K perturbed tensors), the only collective FSDP adds to the ZO part.
            dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        norms = stacked.sqrt().tolist()
        total = math.sqrt(sum(n * n for n in norms))
        nonzero = sum(n > 0 for n in norms)
        guides: list[Guide | None] = []
        for gradient, norm in zip(gradients, norms):
            if gradient is None or norm == 0.0:
                guides.append(None)  # a zero STE gradient gives no guided direction
            elif self.normalize == "global":
                guides.append(Guide(gradient, self.guide_norm / total))
            else:
                guides.append(Guide(gradient, self.guide_norm / (norm * math.sqrt(nonzero))))
        return guides, total

    @staticmethod
    def _sign(step_seed: int, sample: int) -> float:
        """``s_i ∈ {±1}`` from its own stream, independent of the noise ``u_i``."""
        return 1.0 if derive_seed(step_seed, SIGN_STREAM, sample) & 1 else -1.0

    def state_dict(self) -> dict:
        return self.counter.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.counter.load_state_dict(state)
