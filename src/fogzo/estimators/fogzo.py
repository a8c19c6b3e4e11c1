"""FOGZO: first-order-guided zeroth-order gradient estimation (Yang & Aamodt, NeurIPS 2025).

One step (docs/method.md §4), for the perturbed tensors in normalised coordinates ``x = W/c``
(the same step written plainly, for checking by eye and by the tests: :mod:`fogzo.estimators.reference`):

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
:class:`~fogzo.estimators.engine.ZerothOrderMeasurement`). The shifted weights exist one at a
time, around the forward that reads each; a weight read outside every module's forward
(e.g. in the closure) is shifted for the whole pass (:meth:`PerturbedSet.swapped`).

β = 0 is n-SPSA with the STE's noise law; β = 1 gives ``G = (directional derivative along
ĝ)·ĝ``. Cost: 1 forward + 1 backward + 2n forwards (n forwards one-sided).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..smoothing import Smoothing
from .base import (
    Backward, Closure, EstimateInfo, checked_loss, differentiable_loss, nothing_measured_message, run_backward,
)
from .directions import Direction, Guide, ScaleSet
from .engine import NONFINITE_ADVICE, ZerothOrderMeasurement, is_distributed
from .noise import SIGN_STREAM, derive_seed
from .perturbed_set import PerturbedSet
from .sharding import local_part
from .state import CallState, Snapshot, StateGuard, StepCounter, run_guarded, set_gradient
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
        noise_stream: ``"blocks"`` (default: torch generators seeded per block) or
            ``"counter"`` (a counter-based generator of the global coordinate: the same
            numbers on CPU and GPU and for any sharding; slower in eager mode on a CPU, see
            docs/performance.md). Same noise law and equations either way, other numbers.
        compile_noise: with ``noise_stream="counter"``, generate the noise (and for n = 1
            the whole shift ``c·ε̄·v``) in kernels made by ``torch.compile`` on first use
            (the eager numbers for the uniform and triangular laws; no noise tensor; faster
            than ``"blocks"``, see docs/performance.md).

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
        noise_stream: str = "blocks",
        compile_noise: bool = False,
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
        self.perturbed = PerturbedSet.from_model(
            model, perturb, eps, smoothing, noise_stream=noise_stream, compile_noise=compile_noise
        )
        self.measurement = ZerothOrderMeasurement(self.perturbed, one_sided, on_nonfinite, vectorize)
        self.counter = StepCounter(seed)
        self._snapshots = (Snapshot(), Snapshot())  # reused by every call (CallState, StateGuard)
        self._warned_unmeasured = False

    def estimate(self, closure: Closure) -> EstimateInfo:
        """One step: fills ``.grad`` (see the module docstring); state contract in
        :mod:`fogzo.estimators.state`: on failure nothing changes, a skipped step changes
        nothing but the step counter."""
        self.perturbed.check_trainable()
        params = [p for p in self.model.parameters() if p.requires_grad]  # the STE backward writes these
        state = CallState(self.model, params, self.counter, self._snapshots[0])
        return run_guarded(state, lambda: self._step(closure, state))

    def _step(self, closure: Closure, state: CallState) -> EstimateInfo:
        step, step_seed = self.counter.step, self.counter.step_seed()
        guard = StateGuard(self.model, self._snapshots[1])
        keep = self.measurement.on_nonfinite == "keep"

        # 1. STE pass: L0 and g_W; the guides hold g_W and norm_factor = r/‖c·g_W‖, standing
        # for ĝ = norm_factor·c·g_W (c is applied where ĝ is used).
        loss0 = differentiable_loss(closure(), state.params)
        if keep and not is_distributed() and not bool(torch.isfinite(loss0.detach())):
            # (keep: a loss scaler's overflow is common, so check before any more work;
            # otherwise the one host sync at the end of the step checks everything.)
            return self._nonfinite(state, step_seed, step, loss0, "loss", "non-finite loss in the unperturbed (STE) "
                                   f"forward pass: L(W) = {float(loss0.detach())}")
        hook_factor = run_backward(loss0, self.backward)  # k: .grad holds k·g_W (k = 1 without a hook)
        if step < self.ste_steps:
            loss: float | torch.Tensor = loss0.detach()
            if not keep and not is_distributed():
                loss = float(loss)  # the step's one host sync
                if not math.isfinite(loss):
                    return self._nonfinite(state, step_seed, step, loss0, "loss", "non-finite loss in the unperturbed "
                                           f"(STE) forward pass: L(W) = {loss}")
            state.commit()
            return EstimateInfo(loss, 1, 1, None, step_seed, step)  # type: ignore[arg-type]
        scales = ScaleSet(self.perturbed)
        guides, total = self._guides([entry.param.grad for entry in self.perturbed.tensors], scales,
                                     wide=abs(hook_factor) >= 2.0**32)
        norm = total if hook_factor == 1.0 else total / abs(hook_factor)  # ‖g_x‖ in loss units, a device scalar
        if keep:
            host_norm = float(norm)
            if not math.isfinite(host_norm):
                # E.g. an fp16 loss-scaling overflow: no direction to follow.
                finite_loss = bool(torch.isfinite(loss0.detach()))
                return self._nonfinite(
                    state, step_seed, step, loss0, "ste_gradient" if finite_loss else "loss",
                    f"non-finite STE gradient (‖g_x‖ = {host_norm}) with L(W) = {float(loss0.detach())}", host_norm,
                )

        # 2. β_t.
        beta = check_beta(self.schedule(step), f"beta at step {step}")
        guard.after_first_pass()  # from here on, measure() restores all state on exit

        # 3. v_i = √β·s_i·ĝ + √(1−β)·u_i;  d_i from the perturbed passes.
        directions = [
            Direction(sample, guide_weight=math.sqrt(beta) * self._sign(step_seed, sample),
                      noise_weight=math.sqrt(1.0 - beta))
            for sample in range(self.n)
        ]
        measured = self.measurement.measure(
            closure, guard, step_seed, directions, guides, loss0, reuse_guide=not keep, scales=scales
        )
        forward_passes = 1 + self.n * self.measurement.passes_per_sample

        # 4. G_W = (1/n) Σ_i d_i·v_i / c  =  [(1/n) Σ_i d_i·√β·s_i]·norm_factor·g_W
        #                                  + (1/n) Σ_i d_i·√(1−β)·u_i / c, queued
        # on the device before the step's one host sync (resolve), which checks every value.
        gradients = None if keep else self.measurement.gradients(step_seed, directions, measured, guides)
        verdict = self.measurement.resolve(measured, loss0, norm)  # raises for on_nonfinite="raise"
        if verdict.reason is not None:  # on_nonfinite="skip" or "keep"
            if keep:
                state.commit()  # the STE pass's gradient stays
            else:
                state.restore(advance=True)
            return EstimateInfo(verdict.loss, forward_passes, 1, beta, step_seed, step, ste_grad_norm=verdict.norm,
                                skipped=True, skip_reason=verdict.reason)
        differences = verdict.differences
        if not any(differences):  # every d_i is exactly 0: nothing measured, keep the STE gradient
            if not self._warned_unmeasured:
                warnings.warn(nothing_measured_message("FOGZO", self.model, self.perturbed.tensors,
                              "The STE gradient was kept for such steps (not replaced by 0)."), stacklevel=3)
                self._warned_unmeasured = True
            self._redo_ste_pass(closure, guard, state)
            state.commit()
            return EstimateInfo(verdict.loss, forward_passes + 1, 2, beta, step_seed, step, differences=differences,
                                zero_differences=len(differences), ste_grad_norm=verdict.norm, measured=False)
        if gradients is None:
            gradients = self.measurement.gradients(step_seed, directions, measured, guides)
        if hook_factor != 1.0:
            torch._foreach_mul_(gradients, hook_factor)
        self.perturbed.mask_padding_rows(gradients)
        for entry, gradient in zip(self.perturbed.tensors, gradients):
            entry.param.grad = None
            set_gradient(entry.param, gradient, None)  # replaces this call's STE gradient
        state.commit()  # adds the gradients from before the call, as backward would
        return EstimateInfo(
            loss=verdict.loss,  # type: ignore[arg-type]
            forward_passes=forward_passes,
            backward_passes=1,
            beta=beta,
            seed=step_seed,
            step=step,
            differences=differences,
            zero_differences=sum(d == 0.0 for d in differences),
            ste_grad_norm=verdict.norm,
        )

    def _redo_ste_pass(self, closure: Closure, guard: StateGuard, state: CallState) -> None:
        """The STE pass again, with its dropout masks, for a step that measured nothing (the
        one-direction path built the shift in the STE gradient's buffer); buffers and the
        global RNG end as after the first STE pass."""
        for param in state.params:
            param.grad = None
        guard.rewind()
        try:
            run_backward(checked_loss(closure()), self.backward)
        finally:
            guard.close()

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

    def _guides(
        self, gradients: list[torch.Tensor | None], scales: ScaleSet, wide: bool = False
    ) -> tuple[list[Guide | None], torch.Tensor]:
        """Per tensor ``Guide(g_W, norm_factor)``, standing for ``ĝ = norm_factor·c·g_W``
        (``norm_factor = r/‖g_x‖``, or ``r/(‖g_x,k‖·√K)`` per tensor; a device scalar); and
        ``‖g_x‖`` (device). ``wide``: compute the norms in float64.

        No host sync: a tensor whose ``g_x`` is zero gets ``norm_factor = 0`` (no guided direction), as
        does every tensor when ``g_x = 0`` altogether. The norms of the tensors with one
        ``c`` each are one ``_foreach_norm`` times the stacked scales."""
        tensors = self.perturbed.tensors
        gradients = [None if g is None else local_part(g) for g in gradients]  # FSDP: this rank's shard
        device = tensors[0].param.device
        # Norms in float32 (bf16/fp16/fp32 gradients), in float64 for a float64 model or when a
        # backward hook scales the gradients by |k| >= 2^32 (wide): ‖k·g‖² overflows float32
        # once ‖k·g‖ > 1.8e19 (an fp16 loss scaler starts at 2^16).
        wide = wide or any(g is not None and g.dtype == torch.float64 for g in gradients)
        dtype = torch.float64 if wide else torch.float32
        parts: list[torch.Tensor] = []
        order: list[int] = []  # entry index of each norm in the concatenated parts
        stacked = [i for i in scales.stacked if gradients[i] is not None]
        if stacked:
            plain = torch.stack(torch._foreach_norm([gradients[i] for i in stacked], 2, dtype=dtype))  # type: ignore[misc]
            assert scales.vector is not None
            weights = scales.vector if len(stacked) == len(scales.stacked) else torch.stack(
                [scales.values[i] for i in stacked]  # type: ignore[misc]
            )
            parts.append(plain * weights)  # ‖c·g‖ = c·‖g‖
            order += stacked
        singles = []
        for i in scales.others:
            gradient, c = gradients[i], scales.values[i]
            if gradient is None:
                continue
            if not isinstance(c, torch.Tensor):
                singles.append(torch.linalg.vector_norm(gradient, dtype=dtype) * abs(c))
            elif c.numel() == 1:
                singles.append(torch.linalg.vector_norm(gradient, dtype=dtype) * c.reshape(()))
            elif c.numel() == gradient.shape[0]:  # per-channel c: √Σ_rows (c_r·‖g_r‖)²
                rows = torch.linalg.vector_norm(gradient.reshape(gradient.shape[0], -1), dim=1, dtype=dtype)
                singles.append(torch.linalg.vector_norm(rows * c.reshape(-1)))
            else:  # per group (torchao): c of W's shape
                singles.append(torch.linalg.vector_norm(gradient * c, dtype=dtype))
            order.append(i)
        if singles:
            parts.append(torch.stack([n if n.device == device else n.to(device) for n in singles]))
        norms = parts[0] if len(parts) == 1 else torch.cat(parts) if parts else torch.zeros(0, device=device)
        if self.perturbed.sharded and dist.is_initialized():
            # Squared norms of the shards add up to those of the tensors: one all-reduce of
            # K scalars (K perturbed tensors), the only collective FSDP adds to the ZO part.
            squared = norms.square()
            dist.all_reduce(squared, op=dist.ReduceOp.SUM)
            norms = squared.sqrt()
        total = torch.linalg.vector_norm(norms)
        # norm_factor = r/‖·‖, and 0 where the norm is 0 (1/0 = inf becomes 0: no guided direction).
        norm_factors: list[torch.Tensor | None] = [None] * len(tensors)
        if self.normalize == "global":
            norm_factor = torch.nan_to_num_(total.reciprocal(), posinf=0.0)
            if self.guide_norm != 1.0:
                norm_factor.mul_(self.guide_norm)
            for i in order:
                norm_factors[i] = norm_factor
        else:
            nonzero = (norms > 0).sum().to(norms.dtype)  # K, in the norms' dtype (an int64 sqrt is float32)
            per_tensor = torch.nan_to_num_((norms * nonzero.sqrt()).reciprocal_(), posinf=0.0).mul_(self.guide_norm)
            for i, norm_factor in zip(order, per_tensor.unbind()):
                norm_factors[i] = norm_factor
        guides: list[Guide | None] = [
            None if gradient is None or norm_factor is None else Guide(gradient, norm_factor)
            for gradient, norm_factor in zip(gradients, norm_factors)
        ]
        return guides, total

    @staticmethod
    def _sign(step_seed: int, sample: int) -> float:
        """``s_i ∈ {±1}`` from its own stream, independent of the noise ``u_i``."""
        return 1.0 if derive_seed(step_seed, SIGN_STREAM, sample) & 1 else -1.0

    def state_dict(self) -> dict:
        return self.counter.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.counter.load_state_dict(state)
