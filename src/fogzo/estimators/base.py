"""The estimator protocol, its info record, and the passes every estimator is made of.

An estimator turns a loss closure into gradients in ``.grad``::

    info = estimator.estimate(lambda: F.cross_entropy(model(x), y))
    optimizer.step()

The closure runs a *forward pass only* and returns a scalar tensor; the estimator calls it
as often as it needs (with different weights swapped in), calls ``backward`` itself where
it needs a first-order gradient, and fills ``.grad`` so that any ``torch.optim`` optimizer,
scheduler, gradient clipping or AMP scaler works unchanged. Gradients accumulate into an
existing ``.grad`` as ``backward`` would.

State contract (:class:`CallState`). A call that fails — an exception from the closure, a
non-finite loss with ``on_nonfinite="raise"`` (``FloatingPointError`` saying which pass),
a ``KeyboardInterrupt`` — leaves the model's parameters, buffers and ``.grad``, the
estimator's step counter and the global RNG exactly as they were before the call. A
*skipped* step (``on_nonfinite="skip"``) leaves them as they were too, except that the step
counter advances (the next step draws new noise): ``.grad`` holds nothing an optimizer
would apply, and ``info.skipped``/``info.skip_reason`` say which pass was non-finite. With
``on_nonfinite="keep"`` a skipped step keeps the STE pass's gradient instead, finite or not
(for loss scalers, see :data:`NONFINITE_MODES`).

Cost accounting (docs/method.md §5): a forward pass is 1 unit, a backward pass 2 units.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn

from ..quantizers import ActivationQuantizer
from .perturbation import (
    PerturbedSet,
    PerturbedTensor,
    StateGuard,
    _is_dtensor,
    _rng_state,
    _set_rng_state,
    _shift_by,
    derive_seed,
)

__all__ = [
    "Backward",
    "CallState",
    "Closure",
    "Direction",
    "EstimateInfo",
    "Estimator",
    "Guide",
    "Measured",
    "SKIP_REASONS",
    "ZerothOrderMeasurement",
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
    """

    loss: float
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


def checked_loss(value: object) -> torch.Tensor:
    """The closure's return value, which must be a scalar tensor."""
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"the closure must return a scalar loss tensor, got {shape}")
    return value.reshape(())


class StepCounter:
    """A step counter and base seed that round-trip through ``state_dict``."""

    def __init__(self, seed: int) -> None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.step = 0

    def step_seed(self) -> int:
        return derive_seed(self.seed, self.step)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])


def stash_gradients(params: Sequence[nn.Parameter]) -> list[torch.Tensor | None]:
    """Take existing ``.grad`` off ``params`` so a backward pass leaves only this step's."""
    # Under DDP(gradient_as_bucket_view=True) a .grad is a view of a communication bucket
    # that the next backward overwrites: keep a copy of such gradients.
    previous = [g.clone() if g is not None and g._base is not None else g for g in (p.grad for p in params)]
    for p in params:
        p.grad = None
    return previous


def set_gradient(param: nn.Parameter, gradient: torch.Tensor, previous: torch.Tensor | None) -> None:
    """``param.grad = gradient + previous`` (accumulation semantics of ``backward``).

    The sum is formed in ``gradient`` (this call's tensor), so ``previous`` stays intact
    until the assignment. For an FSDP parameter ``gradient`` may be the rank's local part;
    it becomes a ``DTensor`` with the parameter's layout (no copy).
    """
    if _is_dtensor(param) and not _is_dtensor(gradient):
        from torch.distributed.tensor import DTensor

        gradient = DTensor.from_local(
            gradient, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        )
    param.grad = gradient if previous is None else gradient.add_(previous)


class CallState:
    """What one ``estimate`` call may change, captured when it starts (see the module docstring).

    ``params`` (those that may receive a gradient) have their ``.grad`` taken off, so the
    call's passes write fresh tensors; :meth:`commit` adds the previous ones back (as
    ``backward`` accumulates) and advances the step counter; :meth:`restore` puts back the
    gradients, buffers (and the step sizes of activation quantizers, which initialise
    themselves in their first forward), the global RNG and the step counter, and with
    ``advance=True`` (a skipped step) advances the counter. Cost: one copy of the model's
    buffers (running statistics, not its weights) per call; ``model=None`` captures no
    buffers.
    """

    def __init__(self, model: nn.Module | None, params: Sequence[nn.Parameter], counter: StepCounter) -> None:
        self.counter = counter
        self.step = counter.step
        self.rng = _rng_state()
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        if model is not None:
            self.saved = [(b, b.detach().clone()) for b in model.buffers()]
            self.saved += [
                (p, p.detach().clone())
                for m in model.modules()
                if isinstance(m, ActivationQuantizer)
                for p in m.parameters(recurse=False)
            ]
        self.params = list(params)
        self.previous = stash_gradients(self.params)

    def commit(self) -> None:
        """Success: ``.grad = this call's gradient + the previous one``; the counter advances."""
        totals = []
        for param, previous in zip(self.params, self.previous):
            gradient = param.grad
            totals.append(previous if gradient is None else gradient if previous is None else gradient.add_(previous))
        for param, total in zip(self.params, totals):
            param.grad = total
        self.counter.step = self.step + 1

    def restore(self, advance: bool = False) -> None:
        """Failure (or, with ``advance``, a skipped step): everything back as it was."""
        for param, previous in zip(self.params, self.previous):
            param.grad = previous
        with torch.no_grad():
            for tensor, saved in self.saved:
                tensor.copy_(saved)
        _set_rng_state(self.rng)
        self.counter.step = self.step + 1 if advance else self.step


def run_guarded(state: CallState, step: Callable[[], EstimateInfo]) -> EstimateInfo:
    """``step()``; on any exception (``KeyboardInterrupt`` too) ``state.restore()`` and re-raise."""
    try:
        return step()
    except BaseException:
        state.restore()
        raise


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass(frozen=True)
class Direction:
    """Sample ``i`` of the perturbation ``v_i = guided · ĝ + noise · u_i``.

    ``guided = √β·s_i`` and ``noise = √(1−β)``; ``ĝ`` for one tensor is
    ``Guide.scale · c · g_W``.
    """

    sample: int
    guided: float
    noise: float


@dataclass(frozen=True)
class Guide:
    """The STE direction of one tensor: ``ĝ = scale · c · gradient`` (``gradient = g_W``)."""

    gradient: torch.Tensor
    scale: float


@dataclass(frozen=True)
class Measured:
    """What :meth:`ZerothOrderMeasurement.measure` returns.

    ``differences``: the ``d_i`` (``None`` when a loss was non-finite and the call skips,
    then ``reason`` is one of :data:`SKIP_REASONS` and ``message`` says which pass);
    ``losses``: the perturbed losses in pass order; ``deltas``: the shifts ``δ = c·ε̄·v``
    per tensor on the one-direction path (``None`` on the regenerated path).
    """

    differences: list[float] | None
    losses: torch.Tensor
    deltas: list[torch.Tensor] | None
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

    ``gradients`` turns them into ``G_W = (1/n) Σ_i d_i v_i / c`` for every tensor.

    Two ways to get the perturbation, same numbers up to float rounding:

    * **one direction** (n = 1, not vectorized; the common case): the shift
      ``δ = c·ε̄·v`` is built *once* per tensor before the passes, in the STE gradient's own
      buffer when there is one (``g_W`` is not needed afterwards: ``G_W = d·δ/(ε̄·c²)``
      contains the guided part, and a skipped step discards this call's gradients). One
      noise draw per step and no extra memory; each pass only adds ``W ± δ`` where the
      parameter is read (:meth:`PerturbedSet.swapped`).

    Under FSDP every tensor here is the rank's shard (see :meth:`PerturbedSet.shifted`).
    * **regenerated** (n > 1 or vectorized): ``u_i`` is drawn again in every pass and once
      more for the gradient, so the extra memory stays one tensor at a time whatever n is.
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
    ) -> Measured:
        """The ``d_i`` (``None`` when a loss was non-finite and we skip), losses and shifts."""
        eps_bar = self.perturbed.smoothing.eps_bar
        scales = [entry.coordinate_scale(eps_bar) for entry in self.perturbed.tensors]
        passes = [(direction, sign) for direction in directions for sign in (1.0, -1.0)[: self.passes_per_sample]]
        deltas: list[torch.Tensor] | None = None
        if self.vectorize is None and len(directions) == 1:
            deltas = [
                self._delta(entry, scales[entry.index], guides[entry.index], step_seed, directions[0], True)
                for entry in self.perturbed.tensors
            ]

        def shift(entry: PerturbedTensor, direction: Direction, sign: float) -> tuple[torch.Tensor, float]:
            """``(t, a)`` with ``a·t = sign·c·ε̄·v`` for this entry (its local part)."""
            if deltas is not None:
                return deltas[entry.index], sign
            delta = self._delta(entry, scales[entry.index], guides[entry.index], step_seed, direction, False)
            return delta, sign

        # FSDP's forward sets version counters, which inference tensors do not have.
        no_autograd = torch.no_grad if self.perturbed.sharded else torch.inference_mode
        losses: list[torch.Tensor] = []
        try:
            if self.vectorize is None:
                for direction, sign in passes:
                    guard.rewind()
                    with no_autograd(), self.perturbed.shifted(lambda e: shift(e, direction, sign)):
                        losses.append(checked_loss(closure()).detach().float())
            else:
                for start in range(0, len(passes), self.vectorize):
                    chunk = passes[start : start + self.vectorize]
                    stacks = [
                        torch.stack([_shift_by(entry.param.detach(), shift(entry, d, s)) for d, s in chunk])
                        for entry in self.perturbed.tensors
                    ]
                    guard.rewind()
                    losses.extend(self._vectorized_losses(closure, stacks).float().unbind())
        finally:
            guard.close()
        values = torch.stack(losses)
        if self.one_sided:
            assert loss0 is not None
            differences = (values - loss0.detach().float()) / eps_bar
        else:
            differences = (values[0::2] - values[1::2]) / (2 * eps_bar)
        bad_loss = loss0 is not None and not bool(torch.isfinite(loss0.detach()))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if bad_loss:  # every rank must skip or raise together: NaN spreads in the sum
                differences = torch.full_like(differences, float("nan"))
            # The only communication of the ZO part: one all-reduce of n scalars. Averaging
            # the differences equals differencing the rank-averaged losses.
            dist.all_reduce(differences, op=dist.ReduceOp.SUM)
            differences /= dist.get_world_size()
        if bad_loss or not bool(torch.isfinite(differences).all()):
            loss_text = "" if loss0 is None else f"L(W) = {float(loss0.detach())}"
            if bad_loss:
                reason = "loss"
                message = f"non-finite loss in the unperturbed (STE) forward pass: {loss_text}"
            else:
                reason = "perturbed_loss"
                where = "" if not bool(torch.isfinite(values).all()) else " of another rank (here finite)"
                message = (
                    f"non-finite loss in a perturbed forward pass{where} (losses {values.tolist()}"
                    f"{'; the unperturbed ' + loss_text + ' is finite' if loss_text else ''})"
                )
            if self.on_nonfinite == "raise":
                raise FloatingPointError(f"{message}; {NONFINITE_ADVICE}")
            return Measured(None, values, deltas, reason, message)
        return Measured(differences.tolist(), values, deltas)

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

    def _delta(
        self,
        entry: PerturbedTensor,
        scale: torch.Tensor | float,
        guide: Guide | None,
        step_seed: int,
        direction: Direction,
        reuse_guide: bool,
    ) -> torch.Tensor:
        """``δ = c·ε̄·v`` with ``v = guided·k·(c·g_W) + noise·u``: one noise draw, one buffer.

        With ``reuse_guide`` the buffer is ``guide.gradient`` (overwritten); otherwise the
        freshly drawn noise's, so no weight-sized temporary is made either way.
        """
        eps_bar = self.perturbed.smoothing.eps_bar
        guided = direction.guided != 0.0 and guide is not None
        noise_weight = scale * (eps_bar * direction.noise)
        guide_factor = scale * scale * (eps_bar * direction.guided * guide.scale) if guided else 0.0
        if guided and reuse_guide:
            delta = guide.gradient.mul_(guide_factor)
            if direction.noise != 0.0:
                _add_scaled(delta, self.perturbed.noise(entry, step_seed, direction.sample), noise_weight)
            return delta
        if direction.noise != 0.0:
            delta = self.perturbed.noise(entry, step_seed, direction.sample).mul_(noise_weight)
        else:
            delta = torch.zeros_like(entry.local_param())
        if guided:
            _add_scaled(delta, guide.gradient, guide_factor)
        return delta

    def gradients(
        self,
        step_seed: int,
        directions: Sequence[Direction],
        measured: Measured,
        guides: Sequence[Guide | None],
    ) -> list[torch.Tensor]:
        """``G_W = (1/n) Σ_i d_i·v_i / c`` for every perturbed tensor (consumes ``guides``).

        One direction: ``G_W = d·δ/(ε̄·c²)``, in δ's buffer. Regenerated: the guided part
        ``[(1/n) Σ_i d_i·guided_i·k]·g_W`` (the ``c`` cancels) plus the noise part
        ``(1/n) Σ_i d_i·noise_i·u_i / c`` with ``u_i`` drawn again.
        """
        assert measured.differences is not None
        eps_bar = self.perturbed.smoothing.eps_bar
        result = []
        if measured.deltas is not None:
            (difference,) = measured.differences
            for entry, delta in zip(self.perturbed.tensors, measured.deltas):
                scale = entry.coordinate_scale(eps_bar)
                if isinstance(scale, torch.Tensor):  # one pass: d/(ε̄c²) is a tensor of α's shape
                    result.append(delta.mul_(scale.reciprocal().square_().mul_(difference / eps_bar)))
                else:
                    result.append(delta.mul_(difference / (eps_bar * scale * scale)))
            return result
        count = len(directions)
        guided = sum(d * direction.guided for d, direction in zip(measured.differences, directions)) / count
        for entry, guide in zip(self.perturbed.tensors, guides):
            gradient = self.noise_gradient(entry, step_seed, directions, measured.differences)
            if guide is not None and guided != 0.0:
                guided_part = guide.gradient.mul_(guided * guide.scale)
                gradient = guided_part if gradient is None else gradient.add_(guided_part)
            result.append(torch.zeros_like(entry.local_param()) if gradient is None else gradient)
        return result

    def noise_gradient(
        self, entry: PerturbedTensor, step_seed: int, directions: Sequence[Direction], differences: Sequence[float]
    ) -> torch.Tensor | None:
        """``(1/n) Σ_i d_i · noise_i · u_i / c`` for one tensor (noise regenerated)."""
        total = None
        count = len(directions)
        for direction, difference in zip(directions, differences):
            weight = difference * direction.noise / count
            if weight == 0.0:
                continue
            noise = self.perturbed.noise(entry, step_seed, direction.sample)
            total = noise.mul_(weight) if total is None else total.add_(noise, alpha=weight)
        if total is None:
            return None
        return total.div_(entry.coordinate_scale(self.perturbed.smoothing.eps_bar))


def _add_scaled(target: torch.Tensor, tensor: torch.Tensor, coefficient: torch.Tensor | float) -> torch.Tensor:
    """``target += coefficient·tensor`` in place; ``coefficient`` may be a broadcastable tensor (α)."""
    if isinstance(coefficient, torch.Tensor):
        return target.addcmul_(tensor, coefficient)
    return target.add_(tensor, alpha=coefficient)
