"""The state guard: what an ``estimate`` call may change, and how it is put back.

State contract (:class:`CallState`). A call that fails — an exception from the closure, a
non-finite loss with ``on_nonfinite="raise"`` (``FloatingPointError`` saying which pass),
a ``KeyboardInterrupt`` — leaves the model's parameters, buffers and ``.grad``, the
estimator's step counter and the global RNG exactly as they were before the call. A
*skipped* step (``on_nonfinite="skip"``) leaves them as they were too, except that the step
counter advances (the next step draws new noise): ``.grad`` holds nothing an optimizer
would apply, and ``info.skipped``/``info.skip_reason`` say which pass was non-finite. With
``on_nonfinite="keep"`` a skipped step keeps the STE pass's gradient instead, finite or not
(for loss scalers, see :data:`fogzo.estimators.base.NONFINITE_MODES`).

Within a call, :class:`StateGuard` keeps the perturbed passes from changing the model's
buffers or the global RNG (every pass sees the STE pass's dropout masks); both copy tensors
with a :class:`Snapshot` that the estimator keeps between calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..quantizers import ActivationQuantizer, WeightQuantizer
from .base import EstimateInfo
from .noise import derive_seed

__all__ = [
    "CallState",
    "Snapshot",
    "StateGuard",
    "StepCounter",
    "rng_state",
    "run_guarded",
    "set_rng_state",
    "state_buffers",
]


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


class CallState:
    """What one ``estimate`` call may change, captured when it starts (see the module docstring).

    ``params`` (those that may receive a gradient) have their ``.grad`` taken off, so the
    call's passes write fresh tensors; :meth:`commit` adds the previous ones back (as
    ``backward`` accumulates) and advances the step counter; :meth:`restore` puts back the
    gradients, buffers (and the step sizes of activation quantizers, which initialise
    themselves in their first forward), the global RNG and the step counter, and with
    ``advance=True`` (a skipped step) advances the counter. Cost: one copy of the model's
    buffers (running statistics, not its weights; not the fixed ``α`` of fogzo's weight
    quantizers, which no forward writes: :func:`state_buffers`), taken with one operator
    into a :class:`Snapshot` that the estimator keeps between calls (``snapshot``);
    ``model=None`` captures no buffers; ``counter=None`` (an instrument such as
    :func:`fogzo.diagnose`, which has no step counter) restores the rest.
    """

    def __init__(
        self,
        model: nn.Module | None,
        params: Sequence[nn.Parameter],
        counter: StepCounter | None,
        snapshot: Snapshot | None = None,
    ) -> None:
        self.counter = counter
        self.step = 0 if counter is None else counter.step
        self.rng = rng_state()
        targets: list[torch.Tensor] = []
        self.buffers: list[torch.Tensor] = []
        self.modules: list[nn.Module] = []
        if model is not None:
            self.modules = list(model.modules())
            self.buffers = state_buffers(model, self.modules)
            targets = self.buffers + [
                p
                for m in self.modules
                if isinstance(m, ActivationQuantizer)
                for p in m._parameters.values()
                if p is not None
            ]
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
        if self.counter is not None:
            self.counter.step = self.step + 1

    def restore(self, advance: bool = False) -> None:
        """Failure (or, with ``advance``, a skipped step): everything back as it was."""
        for param, previous in zip(self.params, self.previous):
            param.grad = previous
        self.snapshot.restore()
        set_rng_state(self.rng)
        if self.counter is not None:
            self.counter.step = self.step + 1 if advance else self.step


def run_guarded(state: CallState, step: Callable[[], EstimateInfo]) -> EstimateInfo:
    """``step()``; on any exception (``KeyboardInterrupt`` too) ``state.restore()`` and re-raise."""
    try:
        return step()
    except BaseException:
        state.restore()
        raise


class Snapshot:
    """A copy of some tensors, taken with one ``_foreach_copy_`` into storage that is kept
    between calls (reallocated when their shapes, dtypes or devices change), and put back with another.

    Bit-exact (a copy), one operator each way whatever the number of tensors (running
    statistics of every BatchNorm, say); memory: one copy of the tensors, held by the owner
    (an estimator) between steps.
    """

    def __init__(self) -> None:
        self._key: list | None = None
        self._storage: list[torch.Tensor] = []
        self.tensors: list[torch.Tensor] = []

    def take(self, tensors: list[torch.Tensor]) -> None:
        key = [(t.shape, t.dtype, t.device) for t in tensors]  # (storage is reused for any tensors of these)
        if key != self._key:
            self._storage = [torch.empty_like(t, requires_grad=False) for t in tensors]
            self._key = key
        self.tensors = tensors
        if tensors:
            with torch.no_grad():
                torch._foreach_copy_(self._storage, tensors)

    def restore(self) -> None:
        if not self.tensors:
            return
        if torch.is_grad_enabled():
            with torch.no_grad():
                torch._foreach_copy_(self.tensors, self._storage)
        else:
            torch._foreach_copy_(self.tensors, self._storage)


class StateGuard:
    """Keeps perturbed passes from changing the model's buffers or the global RNG.

    ``rewind()`` before a pass puts the global RNG back where it was before the STE pass
    (same dropout masks) and restores any buffer a previous pass wrote; ``close()`` leaves
    buffers as the STE pass left them and the RNG as it was after the STE pass.
    ``snapshot``: a :class:`Snapshot` to reuse (an estimator keeps one between steps);
    ``state``: the call's :class:`CallState`, whose RNG state, module list and buffer list
    (taken when the call began, before the STE pass) the guard uses instead of taking its own.
    """

    def __init__(self, model: nn.Module, snapshot: Snapshot | None = None, state: CallState | None = None) -> None:
        self._model = model
        self._rng_before = rng_state() if state is None else state.rng
        self._modules = None if state is None or not state.modules else state.modules
        self._buffers = None if state is None or self._modules is None else state.buffers
        self._rng_after: tuple | None = None
        self._snapshot = Snapshot() if snapshot is None else snapshot
        self._taken = False
        self._ddp_sync: list[tuple[nn.parallel.DistributedDataParallel, bool]] = []

    def after_first_pass(self) -> None:
        """Call after the unperturbed (STE) pass: snapshot its buffers and RNG state.

        DistributedDataParallel wrappers stop broadcasting buffers at each forward until
        :meth:`close`, so perturbed passes issue no collective of their own.
        """
        self._rng_after = rng_state()
        modules = list(self._model.modules()) if self._modules is None else self._modules
        self._snapshot.take(state_buffers(self._model, modules) if self._buffers is None else self._buffers)
        self._taken = True
        for module in modules:
            if isinstance(module, nn.parallel.DistributedDataParallel):
                self._ddp_sync.append((module, module.require_forward_param_sync))
                module.require_forward_param_sync = False

    def rewind(self) -> None:
        set_rng_state(self._rng_before)
        self._restore_buffers()

    def close(self) -> None:
        self._restore_buffers()
        if self._rng_after is not None:
            set_rng_state(self._rng_after)
        for module, sync in self._ddp_sync:
            module.require_forward_param_sync = sync
        self._ddp_sync = []

    def watch_side_effects(self, exclude: Sequence[torch.Tensor] = ()) -> Callable[[], list[str]]:
        """Record the version of every parameter (but those in ``exclude``: the perturbed ones, which
        the perturbed passes write and restore) and the plain (int/float/bool) attributes of every
        module now; the returned function lists those that changed since: a forward that writes a
        parameter or counts its own calls (a calibration step) changes the run it is measured on,
        which restoring buffers and the RNG cannot undo."""
        excluded = {id(tensor) for tensor in exclude}
        params = [(name, p) for name, p in self._model.named_parameters() if id(p) not in excluded]
        versions = [param._version for _, param in params]
        modules = list(self._model.named_modules())
        attributes = [{k: v for k, v in vars(module).items() if type(v) in (int, float, bool)} for _, module in modules]

        def changed() -> list[str]:
            written = [
                f"parameter {name!r}" for (name, param), version in zip(params, versions) if param._version != version
            ]
            for (name, module), before in zip(modules, attributes):
                written += [
                    f"{type(module).__name__} {name or '(the model)'!r}.{key} ({value} -> {vars(module).get(key)})"
                    for key, value in before.items()
                    if vars(module).get(key) != value
                ]
            return written

        return changed

    def _restore_buffers(self) -> None:
        # Always copy: kernels such as batch_norm update running statistics in place
        # without bumping the tensor's version counter, so a "changed?" check is unreliable.
        if self._taken:
            self._snapshot.restore()


def state_buffers(model: nn.Module, modules: list[nn.Module] | None = None) -> list[torch.Tensor]:
    """The buffers of ``model`` that a call may change: all but the fixed step sizes ``α`` of
    fogzo's weight quantizers, which a forward pass only reads (their values are the
    hot path's, see :class:`fogzo.WeightQuantizer`), so snapshots skip them. One pass over
    ``modules`` (default ``list(model.modules())``)."""
    seen: set[int] = set()
    buffers = []
    for module in model.modules() if modules is None else modules:
        fixed = (
            module.alpha if isinstance(module, WeightQuantizer) and not isinstance(module.alpha, nn.Parameter) else None
        )
        for buffer in module._buffers.values():
            if buffer is None or buffer is fixed or id(buffer) in seen:
                continue
            seen.add(id(buffer))
            buffers.append(buffer)
    return buffers


def rng_state() -> tuple:
    """The global RNG state: the CPU generator's and, once CUDA is in use, every GPU's."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple) -> None:
    """Put back a state from :func:`rng_state`."""
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
