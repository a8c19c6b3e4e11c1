"""n-SPSA: zeroth-order gradients from random two-point finite differences."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from ..smoothing import Smoothing
from .base import Backward, Closure, EstimateInfo, checked_loss, gradient_scale, nothing_measured_message
from .engine import ZerothOrderMeasurement
from .perturbed_set import PerturbedSet, set_gradient
from .state import CallState, Snapshot, StateGuard, StepCounter, run_guarded

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

    ``on_nonfinite``: on a non-finite loss (``L(W)`` or a perturbed one), ``"raise"`` a
    ``FloatingPointError`` that says which pass (everything as before the call), or
    ``"skip"`` the step (``.grad``, parameters and buffers as before the call, the step
    counter advanced, ``info.skipped``/``info.skip_reason`` set); ``"keep"`` is the same here
    (there is no STE gradient to keep).

    ``vectorize=K`` evaluates K perturbed passes at a time in one ``torch.func.vmap``
    forward (same noise, same result up to float summation order): much faster for large
    ``n`` on small models, at K times the memory of the perturbed weights. The model must
    be vmappable (no in-place buffer writes in the forward, e.g. no BatchNorm in training).
    vmap reproduces ``nn.Dropout``'s masks but not every random op's (``nn.TransformerEncoderLayer``
    in training mode: attention runs through vmap's fallback and the later masks differ), so
    the first vectorized step runs its first pass once more on its own and raises a
    ``ValueError`` (nothing changed) if the two losses differ beyond summation order.

    ``backward``: n-SPSA runs no backward pass; a hook (``accelerator.backward``, an AMP
    scaler's ``scale(loss).backward()``) is called once per step on a zero scalar no
    parameter contributes to, only to learn the factor ``k`` it scales gradients by, and
    ``G_W`` is multiplied by ``k`` (see :data:`~fogzo.estimators.base.Backward`).

    ``noise_stream``: ``"blocks"`` (default) or ``"counter"``, and ``compile_noise``, as for
    :class:`~fogzo.FOGZO`.

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
        noise_stream: str = "blocks",
        compile_noise: bool = False,
    ) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if one_sided and not report_loss:
            raise ValueError("one_sided=True reuses the unperturbed loss: it needs report_loss=True")
        self.model = model
        self.n = n
        self.report_loss = report_loss
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
        """One step: fills the perturbed parameters' ``.grad``; state contract in
        :mod:`fogzo.estimators.state`: on failure nothing changes, a skipped step changes
        nothing but the step counter."""
        self.perturbed.check_trainable()
        params = [entry.param for entry in self.perturbed.tensors]
        state = CallState(self.model, params, self.counter, self._snapshots[0])
        return run_guarded(state, lambda: self._step(closure, state))

    def _step(self, closure: Closure, state: CallState) -> EstimateInfo:
        step, step_seed = self.counter.step, self.counter.step_seed()
        guard = StateGuard(self.model, self._snapshots[1], state)
        forward_passes = int(self.report_loss) + self.n * self.measurement.passes_per_sample
        loss0 = None
        if self.report_loss:
            if self._checked_reads:
                with torch.no_grad():
                    loss0 = checked_loss(closure())
            else:  # the first step: the loss pass with autograd, for the check
                loss0 = self._check_reads(checked_loss(closure()))
        guard.after_first_pass()
        if not self._checked_reads:  # (without a loss pass: one more pass on the first step)
            guard.rewind()
            self._check_reads(checked_loss(closure()))  # (a one-time check: not in info.forward_passes)
        # v_i = u_i, and d_i from the passes at W ± c·ε̄·u_i; then G_W = (1/n) Σ_i d_i·u_i / c,
        # queued on the device before the step's one host sync (resolve).
        with self.measurement.passes(closure, guard, step_seed, loss0) as passes:
            for sample in range(self.n):
                passes.measure(self.perturbed.noises(step_seed, sample))
        gradients = passes.gradient
        assert gradients is not None  # set by the n >= 1 measured directions
        torch._foreach_div_(gradients, passes.scales)
        if self.n != 1:
            torch._foreach_mul_(gradients, 1.0 / self.n)
        verdict = self.measurement.resolve(passes, loss0)  # raises for on_nonfinite="raise"
        if verdict.reason is not None:
            state.restore(advance=True)
            loss = verdict.loss if verdict.loss is not None else float("nan")
            return EstimateInfo(loss, forward_passes, 0, 0.0, step_seed, step, skipped=True, skip_reason=verdict.reason)
        hook_factor = gradient_scale(self.backward, self.perturbed.tensors[0].param.device)  # k of the backward hook
        if hook_factor != 1.0:
            torch._foreach_mul_(gradients, hook_factor)
        self.perturbed.mask_padding_rows(gradients)
        for param, gradient in zip(self.perturbed.params, gradients):
            set_gradient(param, gradient)
        state.commit()  # adds the gradients from before the call
        loss = verdict.loss if verdict.loss is not None else sum(verdict.losses) / len(verdict.losses)
        differences = verdict.differences
        measured_something = any(differences)
        if not measured_something and not self._warned_unmeasured:
            warnings.warn(
                nothing_measured_message(
                    "SPSA", self.model, self.perturbed.tensors, "The perturbed tensors' gradient is 0 for such steps."
                ),
                stacklevel=3,
            )
            self._warned_unmeasured = True
        return EstimateInfo(
            loss=loss,
            forward_passes=forward_passes,
            backward_passes=0,
            beta=0.0,
            seed=step_seed,
            step=step,
            differences=differences,
            zero_differences=sum(d == 0.0 for d in differences),
            measured=measured_something,
        )

    def _check_reads(self, loss: torch.Tensor) -> torch.Tensor:
        """Once, on the first step: raise ``ValueError`` naming the perturbed tensors the loss does
        not use (no gradient reaches them; their finite differences would be exactly 0 and their
        gradient pure noise). Returns ``loss`` detached. A loss without autograd (the closure runs
        under ``torch.no_grad()``) and FSDP shards are not checked."""
        if loss.requires_grad and not self.perturbed.sharded:
            gradients = torch.autograd.grad(loss, self.perturbed.params, allow_unused=True)
            unused = [entry.name for entry, g in zip(self.perturbed.tensors, gradients) if g is None]
            if unused:
                raise ValueError(
                    f"perturbed parameters {unused[:5]} are not used by the loss: their finite differences would "
                    "be exactly zero and their gradient pure noise. Leave them out of perturb= (pass the "
                    "parameters the loss uses), or check that the closure runs the modules that use them"
                )
        self._checked_reads = True
        return loss.detach()

    def state_dict(self) -> dict:
        return self.counter.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.counter.load_state_dict(state)
