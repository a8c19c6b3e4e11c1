"""The zeroth-order engine: perturbed forward passes, their finite differences and gradient.

:class:`ZerothOrderMeasurement` runs the passes with ``W ± c·ε̄·v_i`` swapped in
(:meth:`fogzo.estimators.perturbed_set.PerturbedSet.shifted`), under a
:class:`fogzo.estimators.state.StateGuard`, returns the ``d_i`` on the device
(:class:`Measured`), reads them on the host once (:class:`Verdict`) and forms
``G_W = (1/n) Σ_i d_i v_i / c`` (docs/method.md §4, §7). FOGZO and n-SPSA are built on it.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .base import NONFINITE_MODES, Closure, checked_loss, loss_value
from .directions import Direction, Guide, ScaleSet
from .perturbed_set import PerturbedSet, PerturbedTensor, _shift_by
from .state import StateGuard

__all__ = ["Measured", "Verdict", "ZerothOrderMeasurement", "eager_compiled_code", "is_distributed"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def eager_compiled_code() -> contextlib.AbstractContextManager:
    """Run code compiled with ``torch.compile`` eagerly inside the block (``torch.compiler.set_stance``;
    torch >= 2.6, else a no-op): for perturbed passes that register hooks or a function mode,
    which a compiled graph would otherwise be recompiled for (and then guard on tensors that
    live for one pass only)."""
    set_stance = getattr(torch.compiler, "set_stance", None) if hasattr(torch, "compiler") else None
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


@dataclass(frozen=True)
class Measured:
    """What :meth:`ZerothOrderMeasurement.measure` returns, on the device (no host sync).

    ``differences``: the ``d_i`` (device scalars); ``losses``: the perturbed losses in pass
    order (float32 device scalars); ``deltas``: the shifts ``δ = c·ε̄·v`` per tensor on the one-direction path
    (``None`` on the regenerated path); ``scales``: the step's :class:`ScaleSet`.
    """

    differences: list[torch.Tensor]
    losses: list[torch.Tensor]
    deltas: list[torch.Tensor] | None
    scales: ScaleSet | None = None


@dataclass(frozen=True)
class Verdict:
    """A step as the host sees it after its one sync (:meth:`ZerothOrderMeasurement.resolve`).

    ``reason`` is ``None`` when every value is finite, else one of :data:`SKIP_REASONS`
    (``message`` says which pass); ``loss`` is ``L(W)`` (``None`` without a loss pass),
    ``norm`` the STE gradient's ``‖g_x‖`` in loss units (``None`` without one)."""

    loss: float | None
    norm: float | None
    losses: list[float]
    differences: tuple[float, ...]
    reason: str | None = None
    message: str | None = None


NONFINITE_ADVICE = (
    "no parameter, buffer or gradient was changed. Lower the learning rate (or eps_bar/eps), "
    "or pass on_nonfinite='skip' to skip such steps (on_nonfinite='keep' with an fp16 loss scaler)"
)


class ZerothOrderMeasurement:
    """Finite differences of the loss along directions ``v_i``, and their gradient.

    ``measure`` runs the perturbed passes with ``W ± c·ε̄·v_i`` swapped in (two-sided) or
    ``W + c·ε̄·v_i`` (one-sided, reusing ``L0``), all on the same batch, the same dropout
    masks and without changing any parameter, buffer or the global RNG, and returns

        d_i = (L(x + ε̄v_i) − L(x − ε̄v_i)) / 2ε̄        or        (L(x + ε̄v_i) − L0) / ε̄.

    ``gradients`` turns them into ``G_W = (1/n) Σ_i d_i v_i / c`` for every tensor, and
    ``resolve`` reads the step's losses on the host (the step's only host sync) and says
    whether they were finite. Everything before ``resolve`` stays on the device, so a GPU
    runs the whole step from one queue of kernels.

    Two ways to get the perturbation, same numbers up to float rounding:

    * **one direction** (n = 1, not vectorized; the common case): the shift
      ``δ = c·ε̄·v`` is built *once* per tensor before the passes, in the STE gradient's own
      buffer when there is one (``g_W`` is not needed afterwards: ``G_W = d·δ/(ε̄·c²)``
      contains the guided part, and a skipped step discards this call's gradients). One
      noise draw per step and no extra memory; each pass only adds ``W ± δ`` where the
      parameter is read (:meth:`PerturbedSet.shifted`, with the layers of :mod:`fogzo.layers`
      adding it in their own forward). Per-tensor coefficients are formed with ``torch._foreach_*``
      operators, one operator for all tensors.
    * **regenerated** (n > 1 or vectorized): ``u_i`` is drawn again in every pass and once
      more for the gradient, so the extra memory stays one tensor at a time whatever n is.

    Under FSDP every tensor here is the rank's shard (see :meth:`PerturbedSet.shifted`).
    """

    def __init__(
        self, perturbed: PerturbedSet, one_sided: bool, on_nonfinite: str, vectorize: int | None = None
    ) -> None:
        if on_nonfinite not in NONFINITE_MODES:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_MODES}, got {on_nonfinite!r}")
        if vectorize is not None and (not isinstance(vectorize, int) or vectorize < 1):
            raise ValueError(f"vectorize must be None or an int >= 1, got {vectorize!r}")
        if vectorize is not None and perturbed.sharded:
            raise ValueError("vectorize is not supported for FSDP-sharded models: use vectorize=None")
        self.perturbed = perturbed
        self.one_sided = one_sided
        self.on_nonfinite = on_nonfinite
        self.vectorize = vectorize
        self._vmap_checked = False  # the first vectorized chunk is checked against one looped pass
        self._shifts_checked = False  # the first measured step checks that every tensor's shift survives

    @property
    def passes_per_sample(self) -> int:
        return 1 if self.one_sided else 2

    def measure(
        self,
        closure: Closure,
        guard: StateGuard,
        step_seed: int,
        directions: Sequence[Direction],
        guides: Sequence[Guide | None],
        loss0: torch.Tensor | None,
        reuse_guide: bool = True,
        scales: ScaleSet | None = None,
    ) -> Measured:
        """The ``d_i``, the perturbed losses and the shifts, all on the device.

        ``reuse_guide=False`` builds the one-direction shifts in new buffers and leaves the
        guides' gradients as they are (``on_nonfinite="keep"`` may still need them).
        ``scales``: the step's :class:`ScaleSet` if the caller already made one.
        """
        eps_bar = self.perturbed.smoothing.eps_bar
        scales = ScaleSet(self.perturbed) if scales is None else scales
        passes = [(direction, sign) for direction in directions for sign in (1.0, -1.0)[: self.passes_per_sample]]
        deltas: list[torch.Tensor] | None = None
        if self.vectorize is None and len(directions) == 1:
            deltas = self._deltas(scales, guides, step_seed, directions[0], reuse_guide)

        def shift(entry: PerturbedTensor, direction: Direction, sign: float) -> tuple[torch.Tensor, float]:
            """``(t, a)`` with ``a·t = sign·c·ε̄·v`` for this entry (its local part)."""
            if deltas is not None:
                return deltas[entry.index], sign
            delta = self._delta(entry, scales.values[entry.index], guides[entry.index], step_seed, direction)
            return delta, sign

        side_effects = None
        if not self._shifts_checked:  # the first measured step: checks that run once
            self.check_shifts(scales, step_seed)
            self._shifts_checked = True
            if not self.perturbed.sharded:  # (FSDP shifts its shards in place by design)
                side_effects = guard.watch_side_effects()
        # FSDP's forward sets version counters, which inference tensors do not have.
        no_autograd = torch.no_grad if self.perturbed.sharded else torch.inference_mode
        losses: list[torch.Tensor] = []
        try:
            if self.vectorize is None:
                ready = deltas is not None
                for direction, sign in passes:
                    guard.rewind()
                    # A pass with hooks or the read check runs a compiled model eagerly.
                    compiled = contextlib.nullcontext() if self.perturbed.hook_free(ready) else eager_compiled_code()
                    with no_autograd(), compiled, self.perturbed.shifted(lambda e: shift(e, direction, sign), ready=ready):
                        losses.append(loss_value(checked_loss(closure())))
            else:
                for start in range(0, len(passes), self.vectorize):
                    chunk = passes[start : start + self.vectorize]
                    stacks = [
                        torch.stack([_shift_by(entry.param.detach(), shift(entry, d, s)) for d, s in chunk])
                        for entry in self.perturbed.tensors
                    ]
                    guard.rewind()
                    vectorized = loss_value(self._vectorized_losses(closure, stacks))
                    if not self._vmap_checked:
                        # Once: the first pass again, one by one. vmap reproduces nn.Dropout's
                        # masks but not every random op (attention under vmap's fallback).
                        direction, sign = chunk[0]
                        guard.rewind()
                        with no_autograd(), eager_compiled_code(), self.perturbed.shifted(
                            lambda e: shift(e, direction, sign), ready=False
                        ):
                            looped = loss_value(checked_loss(closure()))
                        self._check_vectorized(float(vectorized[0]), float(looped), vectorized.dtype)
                        self._vmap_checked = True
                    losses.extend(vectorized.unbind())
        finally:
            guard.close()
        if side_effects is not None and (changed := side_effects()):
            warnings.warn(
                f"the perturbed forward passes changed the model beyond its buffers: {'; '.join(changed[:5])}. "
                "A forward that writes a parameter or counts its own calls (e.g. an activation calibration) makes "
                "every pass see a different model; finish such calibration before training with a zeroth-order "
                "estimator", stacklevel=4,
            )
        if self.one_sided:
            assert loss0 is not None
            reference = loss_value(loss0)
            differences = [torch.sub(loss, reference).div_(eps_bar) for loss in losses]
        else:
            differences = [torch.sub(plus, minus).div_(2 * eps_bar) for plus, minus in zip(losses[0::2], losses[1::2])]
        if is_distributed():
            stacked = torch.stack(differences)
            if loss0 is not None:  # every rank must skip or raise together: NaN spreads in the sum
                stacked = torch.where(torch.isfinite(loss0), stacked, float("nan"))
            # The only communication of the ZO part: one all-reduce of n scalars. Averaging
            # the differences equals differencing the rank-averaged losses.
            dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
            differences = list(stacked.div_(dist.get_world_size()).unbind())
        return Measured(differences, losses, deltas, scales)

    def resolve(
        self, measured: Measured, loss0: torch.Tensor | None, norm: torch.Tensor | None = None
    ) -> Verdict:
        """Read ``L0``, ``‖g_x‖``, the losses and the ``d_i`` on the host (one sync) and check
        them; raises ``FloatingPointError`` for ``on_nonfinite="raise"``."""
        head = [loss_value(t) for t in (loss0, norm) if t is not None]
        host = torch.stack([*head, *measured.losses, *measured.differences]).tolist()
        loss = host.pop(0) if loss0 is not None else None
        norm_value = host.pop(0) if norm is not None else None
        count = len(measured.losses)
        losses, differences = host[:count], tuple(host[count:])
        verdict = Verdict(loss, norm_value, losses, differences)
        loss_text = "" if loss is None else f"L(W) = {loss}"
        if loss is not None and not math.isfinite(loss):
            reason = "loss"
            message = f"non-finite loss in the unperturbed {'(STE) ' if norm is not None else ''}forward pass: {loss_text}"
        elif norm_value is not None and not math.isfinite(norm_value):
            reason = "ste_gradient"
            message = f"non-finite STE gradient (‖g_x‖ = {norm_value}) with {loss_text}"
        elif not all(math.isfinite(d) for d in differences):
            reason = "perturbed_loss"
            where = "" if not all(math.isfinite(value) for value in losses) else " of another rank (here finite)"
            message = (
                f"non-finite loss in a perturbed forward pass{where} (losses {losses}"
                f"{'; the unperturbed ' + loss_text + ' is finite' if loss_text else ''})"
            )
        else:
            return verdict
        if self.on_nonfinite == "raise":
            raise FloatingPointError(f"{message}; {NONFINITE_ADVICE}")
        return Verdict(loss, norm_value, losses, differences, reason, message)

    def check_shifts(self, scales: ScaleSet, step_seed: int) -> None:
        """Raise ``ValueError`` if a full-size noise shift ``c·ε̄·u`` rounds back to ``W`` on most
        coordinates of a tensor, in the precision the pass adds it in: such a tensor's finite
        differences measure nothing and its noise gradient ``d·u/c`` would be pure noise (a bf16
        bias of 4 has spacing 1/32; ``eps=1e-3`` moves it by nothing). Run once, on the first
        measured step (one noise draw, a few operators and one host read per tensor). The
        guided part of a tensor with a small share of ``ĝ`` may still round away; its gradient
        ``d·ĝ/c`` stays the measured directional derivative along the STE direction.

        fogzo's own layers add the shift to a bf16/fp16 weight in float32 (in their forward:
        :meth:`fogzo.QuantizedLayer.latent_weight`), so a quantized weight stored in low
        precision loses nothing; other tensors are shifted in their own dtype.
        """
        eps_bar = self.perturbed.smoothing.eps_bar
        lost = []
        for entry in self.perturbed.tensors:
            tensor, alpha = self.perturbed.noise(entry, step_seed, 0), eps_bar
            tensor.mul_(scales.values[entry.index])  # c·u, shifted by ε̄·c·u
            weight = entry.local_param()
            if entry.upcast_shift:
                weight, tensor = weight.float(), tensor.float()
            with torch.no_grad():
                moving = tensor != 0
                stuck = (torch.add(weight, tensor, alpha=alpha) == weight) & moving
                count, stuck_count = int(moving.sum()), int(stuck.sum())
            if count and stuck_count > count // 2:
                spacing = torch.finfo(weight.dtype).eps * torch.frexp(weight[stuck].float()).exponent.sub(1).exp2()
                needed = float((spacing / (tensor[stuck].float() * alpha).abs()).median())
                if entry.quantizer is None:
                    fix = f"use eps >= {2 * needed * (entry.eps or 0.0):.2g} (now {entry.eps:g})"
                else:
                    fix = "keep the latent weights in float32 (use autocast for a low-precision forward)"
                lost.append(f"{entry.name!r} ({weight.dtype}, {stuck_count} of {count} shifts lost: {fix})")
        if lost:
            raise ValueError(
                "the perturbation rounds away: W ± shift == W in the tensor's own precision for most coordinates of "
                + "; ".join(lost[:5]) + ". Its finite differences would measure nothing"
            )

    @staticmethod
    def _check_vectorized(vectorized: float, looped: float, dtype: torch.dtype) -> None:
        """Refuse ``vectorize`` when vmap does not reproduce the one-by-one pass: summation
        order may differ by a few hundred ulps of the loss, a different dropout mask by far more."""
        if not (math.isfinite(vectorized) and math.isfinite(looped)):
            return  # the non-finite handling reports these
        tolerance = 256 * torch.finfo(dtype).eps * max(abs(vectorized), abs(looped), 1e-30)
        if abs(vectorized - looped) > tolerance:
            raise ValueError(
                f"vectorize: the vmapped perturbed pass gives loss {vectorized!r}, the same pass run "
                f"alone {looped!r}: the model draws random numbers that torch.func.vmap does not "
                "reproduce (e.g. dropout after attention in training mode); use vectorize=None"
            )

    def _vectorized_losses(self, closure: Closure, stacks: list[torch.Tensor]) -> torch.Tensor:
        """Losses of a stack of perturbed weight sets in one ``torch.func.vmap`` forward."""

        def loss_of(*weights: torch.Tensor) -> torch.Tensor:
            with self.perturbed.swapped(lambda entry: weights[entry.index]):
                return checked_loss(closure())

        try:
            with torch.no_grad():
                return torch.func.vmap(loss_of, randomness="same")(*stacks)
        except RuntimeError as error:
            raise RuntimeError(
                f"vectorized perturbed passes failed under torch.func.vmap ({error}). Models that "
                "write buffers in the forward (BatchNorm in training mode) cannot be vmapped: "
                "use vectorize=None"
            ) from error

    def _deltas(
        self,
        scales: ScaleSet,
        guides: Sequence[Guide | None],
        step_seed: int,
        direction: Direction,
        reuse_guide: bool,
    ) -> list[torch.Tensor]:
        """``δ = c·ε̄·v`` for every tensor, ``v = guide_weight·norm_factor·(c·g_W) + noise_weight·u``.

        The guided part ``g_W·c²·ε̄·guide_weight·norm_factor`` is formed in the guides' buffers
        (``reuse_guide``) or new ones; the noise is drawn tensor by tensor and added in
        place (one draw per tensor, never more than one noise tensor alive). The
        per-tensor coefficients come from :meth:`ScaleSet.per_tensor` (a few kernels for
        all tensors).
        """
        eps_bar = self.perturbed.smoothing.eps_bar
        tensors = self.perturbed.tensors
        deltas: list[torch.Tensor | None] = [None] * len(tensors)
        guided = [e.index for e in tensors if guides[e.index] is not None] if direction.guide_weight != 0.0 else []
        # δ = guide_coefficients·g_W + noise_coefficients·u, per tensor:
        #   guide_coefficient = c²·ε̄·guide_weight·norm_factor,  noise_coefficient = c·ε̄·noise_weight.
        noise_coefficients: list[torch.Tensor | float] = []
        if direction.noise_weight != 0.0:
            noise_step = eps_bar * direction.noise_weight
            noise_coefficients = scales.per_tensor(lambda c: c * noise_step)
        # compile_noise: g·a + u·b in one compiled kernel per tensor (tensor coefficients only:
        # a Python float would be baked into the compiled graph).
        fused = set()
        if noise_coefficients and self.perturbed.compile_noise:
            fused = {i for i in guided if isinstance(noise_coefficients[i], torch.Tensor)}
        if guided:
            guide_step = eps_bar * direction.guide_weight
            norm_factors = [guides[i].norm_factor for i in guided]  # type: ignore[union-attr]
            if all(f is norm_factors[0] for f in norm_factors):  # global normalisation: one factor
                shared = norm_factors[0] * guide_step
                guide_coefficients = scales.squares().per_tensor(lambda square: square * shared)
            else:
                squares = scales.squares().per_tensor(lambda square: square * guide_step)
                guide_coefficients = [None] * len(tensors)  # type: ignore[list-item]
                for i, norm_factor in zip(guided, norm_factors):
                    guide_coefficients[i] = squares[i] * norm_factor  # type: ignore[operator]
            gradients = [guides[i].gradient for i in guided]  # type: ignore[union-attr]
            buffers = gradients if reuse_guide else torch._foreach_mul(gradients, 1.0)
            plain = [j for j, i in enumerate(guided) if i not in fused]
            if plain:
                torch._foreach_mul_([buffers[j] for j in plain],
                                    [guide_coefficients[guided[j]] for j in plain])  # type: ignore[misc]
            offsets = None
            if fused:
                order = sorted(fused)
                offsets = dict(zip(order, self.perturbed.noise_offsets([tensors[i] for i in order], step_seed,
                                                                        direction.sample).unbind()))
            for j, i in enumerate(guided):
                deltas[i] = buffers[j]
                if offsets is not None and i in offsets:
                    self.perturbed.noise_shift_(tensors[i], offsets[i], buffers[j], guide_coefficients[i],
                                                noise_coefficients[i])  # type: ignore[arg-type]
        if noise_coefficients:
            for entry in tensors:
                i = entry.index
                if i in fused:
                    continue
                noise = self.perturbed.noise(entry, step_seed, direction.sample)
                if deltas[i] is None:
                    deltas[i] = noise.mul_(noise_coefficients[i])
                else:
                    _add_scaled(deltas[i], noise, noise_coefficients[i])  # type: ignore[arg-type]
        for entry in tensors:
            if deltas[entry.index] is None:
                deltas[entry.index] = torch.zeros(entry.local_shape, device=entry.param.device, dtype=entry.param.dtype)
        return deltas  # type: ignore[return-value]

    def _delta(
        self,
        entry: PerturbedTensor,
        c: torch.Tensor | float,
        guide: Guide | None,
        step_seed: int,
        direction: Direction,
    ) -> torch.Tensor:
        """``δ = c·ε̄·v`` for one tensor (``c`` its coordinate scale) in a new buffer (the regenerated path)."""
        eps_bar = self.perturbed.smoothing.eps_bar
        guided = direction.guide_weight != 0.0 and guide is not None
        if direction.noise_weight != 0.0:
            noise = self.perturbed.noise(entry, step_seed, direction.sample)
            delta = noise.mul_(c * (eps_bar * direction.noise_weight))
        else:
            delta = torch.zeros(entry.local_shape, device=entry.param.device, dtype=entry.param.dtype)
        if guided:
            assert guide is not None
            guide_coefficient = guide.norm_factor * (c * c * (eps_bar * direction.guide_weight))
            _add_scaled(delta, guide.gradient, guide_coefficient)
        return delta

    def gradients(
        self,
        step_seed: int,
        directions: Sequence[Direction],
        measured: Measured,
        guides: Sequence[Guide | None],
    ) -> list[torch.Tensor]:
        """``G_W = (1/n) Σ_i d_i·v_i / c`` for every perturbed tensor (consumes ``guides``), on the device.

        One direction: ``G_W = d·δ/(ε̄·c²)``, in δ's buffer. Regenerated: the guided part
        ``[(1/n) Σ_i d_i·guide_weight_i·norm_factor]·g_W`` (the ``c`` cancels) plus the noise
        part ``(1/n) Σ_i d_i·noise_weight_i·u_i / c`` with ``u_i`` drawn again.
        """
        eps_bar = self.perturbed.smoothing.eps_bar
        tensors = self.perturbed.tensors
        if measured.deltas is not None:
            assert measured.scales is not None
            deltas = measured.deltas
            factor = measured.differences[0] / eps_bar  # d/ε̄, a device scalar
            coefficients = measured.scales.squares().per_tensor(lambda square: factor / square)  # d/(ε̄c²)
            torch._foreach_mul_(deltas, coefficients)  # type: ignore[arg-type]
            return list(deltas)
        count = len(directions)
        differences = measured.differences
        guide_sum = None
        for d, direction in zip(differences, directions):  # Σ d_i·guide_weight_i / n
            if direction.guide_weight != 0.0:
                term = d * (direction.guide_weight / count)
                guide_sum = term if guide_sum is None else guide_sum.add_(term)
        result = []
        for entry, guide in zip(tensors, guides):
            gradient = self.noise_gradient(entry, step_seed, directions, differences)
            if guide is not None and guide_sum is not None:
                guided_part = guide.gradient.mul_(guide_sum * guide.norm_factor)
                gradient = guided_part if gradient is None else gradient.add_(guided_part)
            if gradient is None:
                gradient = torch.zeros(entry.local_shape, device=entry.param.device, dtype=entry.param.dtype)
            result.append(gradient)
        return result

    def noise_gradient(
        self,
        entry: PerturbedTensor,
        step_seed: int,
        directions: Sequence[Direction],
        differences: torch.Tensor | Sequence[float],
    ) -> torch.Tensor | None:
        """``(1/n) Σ_i d_i · noise_weight_i · u_i / c`` for one tensor (``u_i`` regenerated)."""
        total = None
        count = len(directions)
        for i, direction in enumerate(directions):
            if direction.noise_weight == 0.0:
                continue
            weight = differences[i] * (direction.noise_weight / count)
            noise = self.perturbed.noise(entry, step_seed, direction.sample)
            total = noise.mul_(weight) if total is None else _add_scaled(total, noise, weight)
        if total is None:
            return None
        return total.div_(entry.coordinate_scale(self.perturbed.smoothing.eps_bar))


def _add_scaled(target: torch.Tensor, tensor: torch.Tensor, coefficient: torch.Tensor | float) -> torch.Tensor:
    """``target += coefficient·tensor`` in place; ``coefficient`` may be a broadcastable tensor (α)."""
    if isinstance(coefficient, torch.Tensor):
        return target.addcmul_(tensor, coefficient)
    return target.add_(tensor, alpha=coefficient)
