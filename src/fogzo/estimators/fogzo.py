"""FOGZO: first-order-guided zeroth-order gradient estimation (Yang & Aamodt, NeurIPS 2025).

One step (docs/method.md §4), for the perturbed tensors in normalised coordinates ``x = W/c``;
:meth:`FOGZO._step` is written in this order, with these names (the same step written
plainly, for checking by eye and by the tests: :mod:`fogzo.estimators.reference`):

1. STE pass: ``L0 = closure()``, ``backward()`` → ``g_W`` for every parameter;
   ``g_x = c·g_W``;  ``guide``: ``ĝ = r·g_x / ‖g_x‖`` (global norm over the perturbed set, r = 1).
2. ``β_t``: linear from 1 at t = 0 to ``β_min`` at t = T (or a user schedule).
3. For i = 1..n: sign ``s_i ∈ {±1}``, noise ``u_i ~ p`` (the STE's smoothing);
   ``perturbation``: ``v_i = √β_t·s_i·ĝ + √(1−β_t)·u_i``;
   ``finite_differences``: ``d_i = (L(x + ε̄v_i) − L(x − ε̄v_i)) / 2ε̄``  (one-sided: ``(L(x + ε̄v_i) − L0) / ε̄``).
4. ``gradient``: ``G_W = (1/n) Σ_i d_i·v_i / c`` replaces the STE gradient of the perturbed
   tensors; every other parameter keeps its back-propagated gradient.

Memory: ``ĝ`` is built in the STE gradient's buffer, and for n = 1 so is ``v`` and then
``G_W``: beyond an STE step, one backup copy of the perturbed tensors (kept between steps,
:mod:`fogzo.estimators.engine`), and one noise tensor at a time. For n > 1 each ``v_i`` is a
new buffer (one noise draw per sample), consumed into ``Σ_i d_i·v_i`` after its passes (under
DDP after the last pass: n buffers). ``L(x ± ε̄v)``: the perturbed tensors hold ``W ± c·ε̄·v``
in their own storage during the pass and are restored bit-exactly (:mod:`fogzo.estimators.engine`).

β = 0 is n-SPSA with the STE's noise law; β = 1 gives ``G = (directional derivative along
ĝ)·ĝ``. Cost: 1 forward + 1 backward + 2n forwards (n forwards one-sided).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from ..smoothing import Smoothing
from .base import (
    Backward,
    BetaSchedule,
    Closure,
    EstimateInfo,
    beta_schedule,
    check_beta,
    checked_loss,
    differentiable_loss,
    nothing_measured_message,
    run_backward,
)
from .engine import NONFINITE_ADVICE, ZerothOrderMeasurement, is_distributed
from .noise import SIGN_STREAM, derive_seed
from .perturbed_set import PerturbedSet, local_part, set_gradient
from .state import CallState, Snapshot, StateGuard, StepCounter, run_guarded

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
        compile_noise: with ``noise_stream="counter"``, generate the noise in one kernel made
            by ``torch.compile`` on first use (the eager numbers for the uniform and triangular
            laws; faster than ``"blocks"``, see docs/performance.md).

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
        self.schedule = beta_schedule(beta, total_steps, beta_min)
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
        self._checked_reads = False  # the first step checks that the loss uses every perturbed tensor

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
        guard = StateGuard(self.model, self._snapshots[1], state)
        keep = self.measurement.on_nonfinite == "keep"

        # 1. STE pass: L0, g_W (.grad holds k·g_W for a backward hook that scales by k), ĝ.
        loss0 = differentiable_loss(closure(), state.params)
        if keep and not is_distributed() and not bool(torch.isfinite(loss0.detach())):
            # (keep: a loss scaler's overflow is common, so check before any more work;
            # otherwise the one host sync at the end of the step checks everything.)
            return self._nonfinite(state, loss0)
        hook_factor = run_backward(loss0, self.backward)
        if step < self.ste_steps:
            loss = float(loss0.detach())  # the step's one host sync
            if not keep and not math.isfinite(loss):
                return self._nonfinite(state, loss0)
            state.commit()
            return EstimateInfo(loss, 1, 1, None, step_seed, step)
        # 2. β_t (here: for n = 1, ĝ is formed already scaled by v's guided weight √β·s, see _guide).
        beta = check_beta(self.schedule(step), f"beta at step {step}")
        # 1. (continued) ĝ = r·g_x/‖g_x‖, g_x = c·g_W; norm = ‖g_x‖ (device).
        weight = math.sqrt(beta) * self.sign(step_seed, 0) if self.n == 1 else 1.0
        guide, norm = self._guide(self._ste_gradients(), hook_factor, in_place=not keep, weight=weight)
        if keep:
            host_norm = float(norm)
            if not math.isfinite(host_norm):  # e.g. an fp16 loss-scaling overflow: no direction to follow
                return self._nonfinite(state, loss0, host_norm)

        guard.after_first_pass()  # from here on the passes restore buffers and RNG

        # 3. For i = 1..n: v_i = √β·s_i·ĝ + √(1−β)·u_i, and d_i from the passes at W ± c·ε̄·v_i.
        with self.measurement.passes(closure, guard, step_seed, loss0) as passes:
            for sample in range(self.n):
                perturbation = self._perturbation(guide, beta, step_seed, sample)
                passes.measure(perturbation)
        finite_differences = passes.differences  # d_i, device scalars
        forward_passes = 1 + len(finite_differences) * self.measurement.passes_per_sample

        # 4. G_W = (1/n) Σ_i d_i·v_i / c (times k), queued on the device before the step's one
        # host sync (resolve), which checks every value.
        gradient = passes.gradient  # Σ_i d_i·v_i
        assert gradient is not None  # set by the n >= 1 measured directions
        torch._foreach_div_(gradient, passes.scales)
        if hook_factor / self.n != 1.0:
            torch._foreach_mul_(gradient, hook_factor / self.n)
        verdict = self.measurement.resolve(passes, loss0, norm)  # raises for on_nonfinite="raise"
        assert verdict.loss is not None  # read from loss0: FOGZO always makes the STE pass
        if verdict.reason is not None:  # on_nonfinite="skip" or "keep"
            info = EstimateInfo(verdict.loss, forward_passes, 1, beta, step_seed, step, ste_grad_norm=verdict.norm)
            return self._skip(state, info, verdict.reason)
        differences = verdict.differences
        zeros = sum(d == 0.0 for d in differences)
        info = EstimateInfo(verdict.loss, forward_passes, 1, beta, step_seed, step, differences, zeros, verdict.norm)
        if not any(differences):  # every d_i is exactly 0: nothing measured, keep the STE gradient
            if not self._warned_unmeasured:
                kept = "The STE gradient was kept for such steps (not replaced by 0)."
                warnings.warn(nothing_measured_message("FOGZO", self.model, self.perturbed.tensors, kept), stacklevel=3)
                self._warned_unmeasured = True
            self._redo_ste_pass(closure, guard, state)
            state.commit()
            return replace(info, forward_passes=forward_passes + 1, backward_passes=2, measured=False)
        self.perturbed.mask_padding_rows(gradient)
        if self.n > 1 or keep:  # (else G_W was formed in the STE gradient's buffer)
            for param, tensor in zip(self.perturbed.params, gradient):
                set_gradient(param, tensor)  # replaces this call's STE gradient
        state.commit()  # adds the gradients from before the call, as backward would
        return info

    def _ste_gradients(self) -> list[torch.Tensor]:
        """``g_W`` of the perturbed tensors (their local parts under FSDP), the ``.grad`` buffers.

        On the first step a perturbed tensor without a gradient raises ``ValueError`` naming it:
        the loss does not use it, so its finite differences would be exactly 0 and its gradient
        pure noise. Later, such a tensor (a branch this batch did not take) gets a zero ``g_W``."""
        gradients = [param.grad for param in self.perturbed.params]
        if any(gradient is None for gradient in gradients):
            unused = [entry.name for entry, gradient in zip(self.perturbed.tensors, gradients) if gradient is None]
            if not self._checked_reads:
                raise ValueError(
                    f"perturbed parameters {unused[:5]} are not used by the loss (the STE pass gave them no "
                    "gradient): their finite differences would be exactly zero and their gradient pure noise. "
                    "Leave them out of perturb= (pass the parameters the loss uses), or check that the closure "
                    "runs the modules that use them"
                )
            for entry, gradient in zip(self.perturbed.tensors, gradients):
                if gradient is None:
                    set_gradient(
                        entry.param, torch.zeros(entry.local_shape, device=entry.param.device, dtype=entry.param.dtype)
                    )
            gradients = [param.grad for param in self.perturbed.params]
        self._checked_reads = True
        ste = [g for g in gradients if g is not None]  # every one by now
        return [local_part(g) for g in ste] if self.perturbed.sharded else ste

    def _guide(
        self, ste_gradients: list[torch.Tensor], hook_factor: float, in_place: bool, weight: float = 1.0
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``ĝ = r·g_x/‖g_x‖`` with ``g_x = c·g_W`` (``normalize="tensor"``: ``r·g_x,k/(‖g_x,k‖·√K)``
        per tensor, K = the tensors with ``g_x,k ≠ 0``), 0 where the norm is 0; in the STE
        gradient's buffers (``in_place``) or new ones. Also ``‖g_x‖`` in loss units (device).
        ``weight``: a factor folded into ``r`` (for n = 1 the guided weight ``√β·s`` of ``v``, so that
        :meth:`_perturbation` has nothing left to scale: one operator fewer over the tensors).

        The norms are float32 (float64 when a perturbed tensor is float64, or when a backward hook scales the
        gradients by ``|k| >= 2^32``: ``‖k·g‖²`` overflows float32 once ``‖k·g‖ > 1.8e19``)."""
        scales = self.perturbed.scales()
        if in_place:
            torch._foreach_mul_(ste_gradients, scales)
            g_x = ste_gradients
        else:
            g_x = list(torch._foreach_mul(ste_gradients, scales))
        wide = abs(hook_factor) >= 2.0**32 or any(g.dtype == torch.float64 for g in g_x)
        norms = torch.stack(torch._foreach_norm(g_x, 2, dtype=torch.float64 if wide else torch.float32))
        if self.perturbed.sharded and dist.is_initialized():
            # Squared norms of the shards add up to those of the tensors: one all-reduce of
            # K scalars (K perturbed tensors), the only collective FSDP adds to the ZO part.
            squared = norms.square()
            dist.all_reduce(squared, op=dist.ReduceOp.SUM)
            norms = squared.sqrt()
        total = torch.linalg.vector_norm(norms)
        r = self.guide_norm * weight
        if self.normalize == "global":
            factor = torch.nan_to_num_(total.reciprocal(), posinf=0.0)  # 1/0 = inf becomes 0: no direction
            torch._foreach_mul_(g_x, factor if r == 1.0 else factor.mul_(r))
        else:
            nonzero = (norms > 0).sum().to(norms.dtype)  # K, in the norms' dtype (an int64 sqrt is float32)
            factors = torch.nan_to_num_((norms * nonzero.sqrt()).reciprocal_(), posinf=0.0).mul_(r)
            torch._foreach_mul_(g_x, list(factors.unbind()))
        return g_x, total if hook_factor == 1.0 else total / abs(hook_factor)

    def _perturbation(self, guide: list[torch.Tensor], beta: float, step_seed: int, sample: int) -> list[torch.Tensor]:
        """``v_i = √β·s_i·ĝ + √(1−β)·u_i``; for n = 1 in ``ĝ``'s buffer (already scaled by
        ``√β·s``, see :meth:`_guide`), else in a new one. One noise draw per tensor and sample,
        added by :meth:`~fogzo.estimators.perturbed_set.PerturbedSet.add_noise_` (one draw for a small model)."""
        noise_weight = math.sqrt(1.0 - beta)
        if self.n == 1:
            v = guide
        else:
            v = list(torch._foreach_mul(guide, math.sqrt(beta) * self.sign(step_seed, sample)))
        if noise_weight != 0.0:
            self.perturbed.add_noise_(v, step_seed, sample, noise_weight)
        return v

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

    def _nonfinite(self, state: CallState, loss0: torch.Tensor, norm: float | None = None) -> EstimateInfo:
        """A non-finite loss in the STE pass, or (``norm`` given, after its backward) a non-finite
        ``‖g_x‖``: raise ``FloatingPointError`` (state restored by the caller), or :meth:`_skip`."""
        loss = float(loss0.detach())
        if norm is None:
            message = f"non-finite loss in the unperturbed (STE) forward pass: L(W) = {loss}"
        else:
            message = f"non-finite STE gradient (‖g_x‖ = {norm}) with L(W) = {loss}"
        if self.measurement.on_nonfinite == "raise":
            raise FloatingPointError(f"{message}; {NONFINITE_ADVICE}")
        reason = "ste_gradient" if norm is not None and math.isfinite(loss) else "loss"
        step_seed = self.counter.step_seed()  # this call's: the counter advances in _skip
        info = EstimateInfo(loss, 1, int(norm is not None), None, step_seed, state.step, ste_grad_norm=norm)
        return self._skip(state, info, reason)

    def _skip(self, state: CallState, info: EstimateInfo, reason: str) -> EstimateInfo:
        """End a step skipped for ``reason``: ``.grad``, parameters and buffers as before the call
        (``"skip"``), or the STE pass's gradient kept as it is (``"keep"``, for loss scalers)."""
        if self.measurement.on_nonfinite == "keep":
            state.commit()  # the STE pass's gradient stays
        else:
            state.restore(advance=True)
        return replace(info, skipped=True, skip_reason=reason)

    @staticmethod
    def sign(step_seed: int, sample: int) -> float:
        """``s_i ∈ {±1}`` from its own stream, independent of the noise ``u_i``."""
        return 1.0 if derive_seed(step_seed, SIGN_STREAM, sample) & 1 else -1.0

    def state_dict(self) -> dict:
        return self.counter.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.counter.load_state_dict(state)
