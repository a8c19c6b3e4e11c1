"""The zeroth-order passes: ``W ± c·ε̄·v_i`` in place, the losses, the ``d_i`` and ``Σ_i d_i·v_i``.

How a shifted weight is put in place (one mechanism): each perturbed tensor's own storage
(its local shard under FSDP) holds ``W + s·c·ε̄·v`` during a perturbed pass, written in place
under ``torch.no_grad()``; a backup of the perturbed tensors, taken once per step into
storage kept between steps (:class:`~fogzo.estimators.state.Snapshot`), restores them
bit-exactly before the other pass and at the end — in a ``finally``, so an exception or
Ctrl-C restores them too. Wherever the model reads the weight (its owner, a parent's
``F.linear(x, child.weight)``, a tied weight, ``nn.MultiheadAttention``, the closure, a
reference captured outside the model) it reads the shifted values, with no hooks. With
``torch._foreach_*`` over the perturbed list a step costs one backup copy, per pass one copy
(not before the first) and one ``addcmul``, and one final copy. The exception is a pass
under ``torch.func.vmap`` (``vectorize``), whose weights are batched:
:meth:`~fogzo.estimators.perturbed_set.PerturbedSet.swapped`.

Every pass runs on the same batch, with the dropout masks and buffers of the STE pass (a
:class:`~fogzo.estimators.state.StateGuard`), and the differences stay on the device until
the step's one host read (:meth:`ZerothOrderMeasurement.resolve`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from .base import NONFINITE_MODES, Closure, checked_loss, loss_value
from .perturbed_set import PerturbedSet
from .state import Snapshot, StateGuard

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

__all__ = ["NONFINITE_ADVICE", "Passes", "Verdict", "ZerothOrderMeasurement", "is_distributed"]

NONFINITE_ADVICE = (
    "no parameter, buffer or gradient was changed. Lower the learning rate (or eps_bar/eps), "
    "or pass on_nonfinite='skip' to skip such steps (on_nonfinite='keep' with an fp16 loss scaler)"
)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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


class Passes:
    """The perturbed passes of one step, a context manager (made by :meth:`ZerothOrderMeasurement.passes`).

    On entry the perturbed tensors are backed up (one copy) and autograd is switched off; on exit
    (also on an exception) they are restored bit-exactly, FSDP's unsharded parameters are freed,
    ``guard`` is closed and the grad mode is put back. Inside, :meth:`measure` runs the passes of one direction ``v`` (normalised coordinates, one tensor
    per perturbed tensor, local parts) and records ``d = (L(x + ε̄v) − L(x − ε̄v)) / 2ε̄`` (or
    ``(L(x + ε̄v) − L0) / ε̄`` one-sided). ``gradient`` is ``Σ_i d_i·v_i``, formed on the device
    in the first ``v``'s buffer (``v`` is consumed). Under DDP the ``d_i`` are averaged over the
    ranks by one all-reduce of n scalars after the last pass, so the ``v_i`` are kept until then.
    """

    def __init__(
        self,
        engine: ZerothOrderMeasurement,
        closure: Closure,
        guard: StateGuard,
        step_seed: int,
        loss0: torch.Tensor | None,
    ) -> None:
        self.engine, self.closure, self.guard, self.step_seed, self.loss0 = engine, closure, guard, step_seed, loss0
        self.weights = engine.perturbed.local_params()
        self.scales = engine.perturbed.scales()
        self.losses: list[torch.Tensor] = []
        self.differences: list[torch.Tensor] = []
        self.gradient: list[torch.Tensor] | None = None
        self._written = False  # the weights differ from the backup
        self._waiting: list[list[torch.Tensor]] = []  # directions not yet measured (vectorize)
        self._kept: list[list[torch.Tensor]] = []  # measured directions kept for the DDP average
        self._distributed = is_distributed()
        self._grad_mode = True
        self._logs: list[tuple[list, int]] = []
        self._side_effects: Callable[[], list[str]] | None = None

    def __enter__(self) -> Passes:
        engine, perturbed = self.engine, self.engine.perturbed
        if engine.first:  # the first measured step: checks that run once
            engine.check_shifts(self.step_seed)
            self._side_effects = self.guard.watch_side_effects(exclude=perturbed.params)
        engine.backup.take(self.weights)  # one copy per step, into storage kept between steps
        self._grad_mode = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        if perturbed.sharded:
            self._logs = fsdp_forward_logs(perturbed.fsdp_modules)
        return self

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        perturbed = self.engine.perturbed
        try:
            if kind is None:
                self.flush()
        finally:
            if self._written:
                self.engine.backup.restore()  # W, bit for bit
            if perturbed.sharded:
                reshard(perturbed.fsdp_modules)
                for log, length in self._logs:  # the perturbed forwards have no backward
                    del log[length:]
            self.guard.close()
            torch.set_grad_enabled(self._grad_mode)
        if kind is not None:
            return
        self.engine.first = False
        if self._side_effects is not None and (changed := self._side_effects()):
            warnings.warn(
                f"the perturbed forward passes changed the model beyond its buffers: {'; '.join(changed[:5])}. "
                "A forward that writes a parameter or counts its own calls (e.g. an activation calibration) makes "
                "every pass see a different model; finish such calibration before training with a zeroth-order "
                "estimator",
                stacklevel=3,
            )
        self.finish()

    def measure(self, v: list[torch.Tensor]) -> None:
        """The passes at ``W ± c·ε̄·v`` (``vectorize``: once K passes are waiting, in one vmap)."""
        engine = self.engine
        if engine.vectorize is None:
            losses = [self._loss_at(v, sign) for sign in engine.signs]
            self._record(v, losses)
            return
        self._waiting.append(v)
        if len(self._waiting) * len(engine.signs) >= engine.vectorize:
            self.flush()

    def flush(self) -> None:
        """Measure the directions still waiting for a vectorized pass."""
        if self._waiting:
            waiting, self._waiting = self._waiting, []
            losses = self.engine.vectorized_losses(self, waiting)
            per = len(self.engine.signs)
            for i, v in enumerate(waiting):
                self._record(v, losses[i * per : (i + 1) * per])

    def _loss_at(self, v: list[torch.Tensor], sign: float) -> torch.Tensor:
        """``L(W + sign·c·ε̄·v)``, the shift written into the weights' storage (autograd is off)."""
        perturbed = self.engine.perturbed
        if self._written:
            self.engine.backup.restore()
        self._written = True
        torch._foreach_addcmul_(self.weights, v, self.scales, value=sign * perturbed.smoothing.eps_bar)
        self.guard.rewind()
        if perturbed.sharded:  # (FSDP's forward sets version counters, which inference tensors lack)
            reshard(perturbed.fsdp_modules)  # the forward all-gathers the shifted shards
            return loss_value(checked_loss(self.closure()))
        with torch.inference_mode():
            return loss_value(checked_loss(self.closure()))

    def _record(self, v: list[torch.Tensor], losses: list[torch.Tensor]) -> None:
        eps_bar = self.engine.perturbed.smoothing.eps_bar
        self.losses.extend(losses)
        if len(losses) == 2:
            d = torch.sub(losses[0], losses[1]).div_(2 * eps_bar)
        else:
            assert self.loss0 is not None
            d = torch.sub(losses[0], loss_value(self.loss0)).div_(eps_bar)
        self.differences.append(d)
        if self._distributed:
            self._kept.append(v)
        else:
            self._accumulate(v, d)

    def _accumulate(self, v: list[torch.Tensor], d: torch.Tensor) -> None:
        torch._foreach_mul_(v, d)
        if self.gradient is None:
            self.gradient = v
        else:
            torch._foreach_add_(self.gradient, v)

    def finish(self) -> None:
        """Under DDP: average the ``d_i`` over the ranks (one all-reduce of n scalars), then ``Σ_i d_i·v_i``."""
        if not self._distributed or not self.differences:
            return
        stacked = torch.stack(self.differences)
        if self.loss0 is not None:  # every rank must skip or raise together: NaN spreads in the sum
            stacked = torch.where(torch.isfinite(self.loss0), stacked, float("nan"))
        # The only communication of the ZO part. Averaging the differences equals differencing
        # the rank-averaged losses.
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        self.differences = list(stacked.div_(dist.get_world_size()).unbind())
        for v, d in zip(self._kept, self.differences):
            self._accumulate(v, d)
        self._kept = []


class ZerothOrderMeasurement:
    """Finite differences of the loss along directions ``v_i`` (see the module docstring)."""

    def __init__(
        self, perturbed: PerturbedSet, one_sided: bool, on_nonfinite: str, vectorize: int | None = None
    ) -> None:
        if on_nonfinite not in NONFINITE_MODES:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_MODES}, got {on_nonfinite!r}")
        if vectorize is not None and (not isinstance(vectorize, int) or isinstance(vectorize, bool) or vectorize < 1):
            raise ValueError(f"vectorize must be None or an int >= 1, got {vectorize!r}")
        if vectorize is not None and perturbed.sharded:
            raise ValueError("vectorize is not supported for FSDP-sharded models: use vectorize=None")
        self.perturbed = perturbed
        self.one_sided = one_sided
        self.signs = (1.0,) if one_sided else (1.0, -1.0)
        self.on_nonfinite = on_nonfinite
        self.vectorize = vectorize
        self.backup = Snapshot()  # W of the perturbed tensors, kept between steps
        self.first = True  # the first measured step checks that the shifts survive the dtype
        self._vmap_checked = False  # the first vectorized chunk is checked against one looped pass

    @property
    def passes_per_sample(self) -> int:
        return len(self.signs)

    def passes(self, closure: Closure, guard: StateGuard, step_seed: int, loss0: torch.Tensor | None) -> Passes:
        """The perturbed passes of one step, a context manager (:class:`Passes`): inside the block
        :meth:`Passes.measure` writes ``W ± c·ε̄·v`` into the perturbed tensors; on exit (also on an
        exception) they are restored bit-exactly from the backup and ``guard`` is closed."""
        return Passes(self, closure, guard, step_seed, loss0)

    def resolve(self, passes: Passes, loss0: torch.Tensor | None, norm: torch.Tensor | None = None) -> Verdict:
        """Read ``L0``, ``‖g_x‖``, the losses and the ``d_i`` on the host (one sync) and check
        them; raises ``FloatingPointError`` for ``on_nonfinite="raise"``."""
        head = [loss_value(t) for t in (loss0, norm) if t is not None]
        host = torch.stack([*head, *passes.losses, *passes.differences]).tolist()
        loss = host.pop(0) if loss0 is not None else None
        norm_value = host.pop(0) if norm is not None else None
        count = len(passes.losses)
        losses, differences = host[:count], tuple(host[count:])
        verdict = Verdict(loss, norm_value, losses, differences)
        loss_text = "" if loss is None else f"L(W) = {loss}"
        if loss is not None and not math.isfinite(loss):
            reason = "loss"
            message = (
                f"non-finite loss in the unperturbed {'(STE) ' if norm is not None else ''}forward pass: {loss_text}"
            )
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

    def check_shifts(self, step_seed: int) -> None:
        """Raise ``ValueError`` if a full-size noise shift ``c·ε̄·u`` rounds back to ``W`` on most
        coordinates of a tensor, in the tensor's own precision: such a tensor's finite differences
        measure nothing and its noise gradient ``d·u/c`` would be pure noise (a bf16 bias of 4 has
        spacing 1/32; ``eps=1e-3`` moves it by nothing). Run once, on the first measured step (one
        noise draw, a few operators and one host read per tensor). The guided part of a tensor with
        a small share of ``ĝ`` may still round away; its gradient ``d·ĝ/c`` stays the measured
        directional derivative along the STE direction. (A quantized weight in bf16/fp16 is refused
        when the estimator is built: :class:`~fogzo.estimators.perturbed_set.PerturbedSet`.)
        """
        eps_bar = self.perturbed.smoothing.eps_bar
        lost = []
        for entry, c, u in zip(self.perturbed.tensors, self.perturbed.scales(), self.perturbed.noises(step_seed, 0)):
            shift = u.mul_(c)  # c·u, shifted by ε̄·c·u
            weight = entry.local_param()
            with torch.no_grad():
                moving = shift != 0
                stuck = (torch.add(weight, shift, alpha=eps_bar) == weight) & moving
                count, stuck_count = int(moving.sum()), int(stuck.sum())
            if count and stuck_count > count // 2:
                spacing = torch.finfo(weight.dtype).eps * torch.frexp(weight[stuck].float()).exponent.sub(1).exp2()
                needed = float((spacing / (shift[stuck].float() * eps_bar).abs()).median())
                if entry.quantizer is None:
                    fix = f"use eps >= {2 * needed * (entry.eps or 0.0):.2g} (now {entry.eps:g})"
                else:
                    fix = "its quantization step is below the weight's precision"
                lost.append(f"{entry.name!r} ({weight.dtype}, {stuck_count} of {count} shifts lost: {fix})")
        if lost:
            raise ValueError(
                "the perturbation rounds away: W ± shift == W in the tensor's own precision for most coordinates of "
                + "; ".join(lost[:5])
                + ". Its finite differences would measure nothing"
            )

    def vectorized_losses(self, passes: Passes, directions: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """The losses at ``W ± c·ε̄·v`` for every direction, in one ``torch.func.vmap`` forward over
        the stacked weights (the vmap exception: :meth:`PerturbedSet.swapped`)."""
        eps_bar = self.perturbed.smoothing.eps_bar
        chunk = [(v, sign) for v in directions for sign in self.signs]
        if passes._written:  # by the check of the first chunk
            self.backup.restore()
            passes._written = False
        weights = [entry.local_param() for entry in self.perturbed.tensors]
        stacks = [
            torch.stack([torch.addcmul(w, v[k], passes.scales[k], value=sign * eps_bar) for v, sign in chunk])
            for k, w in enumerate(weights)
        ]

        def loss_of(*batched: torch.Tensor) -> torch.Tensor:
            with self.perturbed.swapped(lambda entry: batched[entry.index]):
                return checked_loss(passes.closure())

        passes.guard.rewind()
        try:
            with torch.no_grad():
                vectorized = loss_value(torch.func.vmap(loss_of, randomness="same")(*stacks))
        except RuntimeError as error:
            raise RuntimeError(
                f"vectorized perturbed passes failed under torch.func.vmap ({error}). Models that "
                "write buffers in the forward (BatchNorm in training mode) cannot be vmapped: "
                "use vectorize=None"
            ) from error
        if not self._vmap_checked:
            # Once: the first pass again, on its own. vmap reproduces nn.Dropout's masks but
            # not every random op (attention under vmap's fallback).
            looped = passes._loss_at(*chunk[0])
            self._check_vectorized(float(vectorized[0]), float(looped), vectorized.dtype)
            self._vmap_checked = True
        return list(vectorized.unbind())

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


def reshard(fsdp_modules: Sequence[FSDPModule]) -> None:
    """Free FSDP's unsharded parameters, so that the next forward all-gathers the (shifted) shards."""
    for module in fsdp_modules:
        module.reshard()


def fsdp_forward_logs(fsdp_modules: Sequence[FSDPModule]) -> list[tuple[list, int]]:
    """FSDP2's forward-order logs and their lengths now (private attributes; skipped where a
    version lacks them): the perturbed forwards have no backward, so the passes cut them off
    again (else the next backward prefetches a module it does not need: a wasted all-gather)."""
    logs: dict[int, list] = {}
    for module in fsdp_modules:
        get_state = getattr(module, "_get_fsdp_state", None)
        state = get_state() if callable(get_state) else None
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            group = getattr(state, "_fsdp_param_group", None)
            groups = [] if group is None else [group]
        for group in groups:
            for log in (
                getattr(group, "_post_forward_indices", None),
                getattr(getattr(group, "comm_ctx", None), "post_forward_order", None),
            ):
                if isinstance(log, list):
                    logs[id(log)] = log
    return [(log, len(log)) for log in logs.values()]
