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

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn

from ..quantizers import ActivationQuantizer
from .perturbed_set import (
    PerturbedSet,
    PerturbedTensor,
    Snapshot,
    StateGuard,
    _is_dtensor,
    _rng_state,
    _set_rng_state,
    _shift_by,
    derive_seed,
    eager_compiled_code,
    state_buffers,
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
    "ScaleSet",
    "SKIP_REASONS",
    "Verdict",
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

    ``loss`` and ``ste_grad_norm`` may be filled in lazily: an estimator that had no reason
    to read them on the host (the STE step) stores the device scalar, and the first read of
    the attribute turns it into a float (one host sync then, none in the step).
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

    def __getattribute__(self, name: str) -> object:
        value = object.__getattribute__(self, name)
        if name in _LAZY_FIELDS and isinstance(value, torch.Tensor):
            value = float(value)
            object.__setattr__(self, name, value)
        return value


_LAZY_FIELDS = frozenset({"loss", "ste_grad_norm"})


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
    return value if value.dim() == 0 else value.reshape(())


def loss_value(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` detached, in float32, or float64 for a float64 loss (no operator where it
    already is): the finite differences of a float64 model keep its precision."""
    if loss.requires_grad:
        loss = loss.detach()
    return loss if loss.dtype in (torch.float32, torch.float64) else loss.float()


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
    buffers (running statistics, not its weights; not the fixed ``α`` of fogzo's weight
    quantizers, which no forward writes: :func:`~fogzo.estimators.perturbation.state_buffers`),
    taken with one operator into a :class:`~fogzo.estimators.perturbation.Snapshot` that the
    estimator keeps between calls (``snapshot``); ``model=None`` captures no buffers.
    """

    def __init__(
        self,
        model: nn.Module | None,
        params: Sequence[nn.Parameter],
        counter: StepCounter,
        snapshot: Snapshot | None = None,
    ) -> None:
        self.counter = counter
        self.step = counter.step
        self.rng = _rng_state()
        targets: list[torch.Tensor] = []
        if model is not None:
            modules = list(model.modules())
            targets = state_buffers(model, modules)
            targets += [p for m in modules if isinstance(m, ActivationQuantizer) for p in m._parameters.values()
                        if p is not None]
        self.snapshot = Snapshot() if snapshot is None else snapshot
        self.snapshot.take(targets)
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
        self.snapshot.restore()
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
    """Sample ``i`` of the perturbation ``v_i = guide_weight · ĝ + noise_weight · u_i``.

    ``guide_weight = √β·s_i`` and ``noise_weight = √(1−β)`` are numbers (the noise tensor
    ``u_i`` itself comes from :meth:`PerturbedSet.noise`); ``ĝ`` for one tensor is
    ``Guide.norm_factor · c · g_W``.
    """

    sample: int
    guide_weight: float
    noise_weight: float


@dataclass(frozen=True)
class Guide:
    """The STE direction of one tensor: ``ĝ = norm_factor · c · gradient`` (``gradient = g_W``).

    ``norm_factor`` is ``r/‖g_x‖`` (``normalize="global"``) or ``r/(‖g_x,k‖·√K)``
    (``"tensor"``), 0 where that norm is 0; a device scalar (no host sync). The guide holds
    ``g_W`` and this factor, not ``ĝ``: ``c`` is applied where ``ĝ`` is used."""

    gradient: torch.Tensor
    norm_factor: torch.Tensor | float


class ScaleSet:
    """The coordinate scales ``c`` of the perturbed tensors for one step, arranged so that a
    per-tensor coefficient ``f(c)`` costs a few operators for all tensors together.

    ``values[k]`` is ``c`` of tensor ``k``: a 0-d tensor (one ``α`` per tensor), a tensor
    broadcastable to the weight (per-channel/per-group ``α``) or a Python float
    (``c = ε/ε̄``). The 0-d ones are stacked into one vector, so :meth:`per_tensor` evaluates
    ``f`` once on the vector (one kernel per operator of ``f``, whatever the number of
    tensors) and hands each tensor a view of its element; the others get ``f(c)`` one by one.
    """

    def __init__(self, perturbed: PerturbedSet) -> None:
        eps_bar = perturbed.smoothing.eps_bar
        self.values: list[torch.Tensor | float] = [entry.coordinate_scale(eps_bar) for entry in perturbed.tensors]
        self.stacked = [i for i, c in enumerate(self.values) if isinstance(c, torch.Tensor) and c.dim() == 0]
        self.others = [i for i in range(len(self.values)) if i not in set(self.stacked)]
        self.vector = torch.stack([self.values[i] for i in self.stacked]) if self.stacked else None  # type: ignore[misc]
        self._squares: ScaleSet | None = None

    def squares(self) -> ScaleSet:
        """``c²`` per tensor, as a :class:`ScaleSet` (computed once per step)."""
        if self._squares is None:
            squares = ScaleSet.__new__(ScaleSet)
            squares.stacked, squares.others, squares._squares = self.stacked, self.others, None
            squares.vector = None if self.vector is None else self.vector * self.vector
            squares.values = [0.0 if i in set(self.stacked) else c * c for i, c in enumerate(self.values)]  # type: ignore[operator]
            self._squares = squares
        return self._squares

    def per_tensor(self, f: Callable[[torch.Tensor | float], torch.Tensor | float]) -> list[torch.Tensor | float]:
        """``[f(c_k) for every tensor k]`` (elementwise ``f``; the stacked scales in one call)."""
        out: list[torch.Tensor | float] = [0.0] * len(self.values)
        if self.vector is not None:
            for i, value in zip(self.stacked, f(self.vector).unbind()):  # type: ignore[union-attr]
                out[i] = value
        for i in self.others:
            out[i] = f(self.values[i])
        return out


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
                    losses.extend(loss_value(self._vectorized_losses(closure, stacks)).unbind())
        finally:
            guard.close()
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
