"""Where a perturbed tensor is put in place during a perturbed pass, and the check of which
tensors a pass reads (see :meth:`fogzo.estimators.perturbed_set.PerturbedSet.swapped`).

:class:`_ReadPlan` holds, per perturbed tensor, the modules around whose forward its perturbed
value replaces the parameter (``None``: the whole pass); :class:`_ReadCheck` is the ``torch``
function mode that runs on the first perturbed passes (and after a ``train()``/``eval()``
change), replaces any use of an original ``Parameter`` on the spot and widens the plan.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..layers import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear

if TYPE_CHECKING:
    from .perturbed_set import PerturbedTensor


class _ReadPlan:
    """Where each perturbed tensor is put in place during a perturbed pass (see
    :meth:`PerturbedSet.swapped`): ``scopes[i]`` lists the modules around whose forward
    entry ``i`` is in place, ``None`` means the whole pass (eager)."""

    def __init__(self, tensors: list[PerturbedTensor], model: nn.Module | None) -> None:
        self.tensors = tensors
        self.model = model
        attention_of = {}
        if model is not None:
            for module in model.modules():
                if isinstance(module, nn.MultiheadAttention):
                    attention_of[module.out_proj] = module  # its forward reads out_proj.weight
        self.scopes: list[list[nn.Module] | None] = []
        for entry in tensors:
            scope = []
            for module, _ in entry.owners:
                for candidate in (module, attention_of.get(module)):
                    if candidate is not None and candidate not in scope:
                        scope.append(candidate)
            self.scopes.append(scope)
        self.widened = [False] * len(tensors)
        self.checked_mode: bool | None = None
        self._containing: dict[nn.Module, set[int]] | None = None
        self.hooked: dict[nn.Module, list[PerturbedTensor]] = {}
        self.eager: list[PerturbedTensor] = []
        self.fast: list[PerturbedTensor] = []
        self._index()

    def _index(self) -> None:
        self.hooked, self.eager, self.fast = {}, [], []
        for entry, scope in zip(self.tensors, self.scopes):
            if scope is None:
                self.eager.append(entry)
            else:
                for module in scope:
                    self.hooked.setdefault(module, []).append(entry)
                if len(entry.owners) == 1 and scope == [entry.owners[0][0]] and _shifts_itself(*entry.owners[0]):
                    self.fast.append(entry)

    def _mode(self) -> bool:
        return bool(self.model.training) if self.model is not None else True

    def needs_check(self) -> bool:
        return self.checked_mode is None or self.checked_mode != self._mode()

    def containing(self) -> dict[nn.Module, set[int]]:
        """For every module that contains an owner (itself or a descendant), which entries."""
        if self._containing is None:
            parents: dict[nn.Module, list[nn.Module]] = {}
            if self.model is not None:
                for module in self.model.modules():
                    for child in module.children():
                        parents.setdefault(child, []).append(module)
            containing: dict[nn.Module, set[int]] = {}
            for entry in self.tensors:
                pending = [module for module, _ in entry.owners]
                while pending:
                    module = pending.pop()
                    indices = containing.setdefault(module, set())
                    if entry.index not in indices:
                        indices.add(entry.index)
                        pending.extend(parents.get(module, []))
            self._containing = containing
        return self._containing

    def update(self, outside: dict[int, list[nn.Module | None]]) -> None:
        """Widen the plan for the entries read outside their scope in a checked pass."""
        for index, readers in outside.items():
            scope = self.scopes[index]
            if scope is None:
                raise ValueError(
                    f"perturbed parameter {self.tensors[index].name!r} is used in the forward pass through a "
                    "reference held outside the model's modules (e.g. a tensor captured by the closure or stored "
                    "in a list); the perturbation can only replace module attributes: read it as an attribute "
                    "(module.weight) inside the forward"
                )
            if None in readers or self.widened[index] or any(reader in scope for reader in readers):
                self.scopes[index] = None
            else:
                scope.extend(dict.fromkeys(reader for reader in readers if reader is not None))
                self.widened[index] = True
        if outside:
            self._index()
        else:
            self.checked_mode = self._mode()


_SELF_SHIFTING = (QuantLinear, QuantConv1d, QuantConv2d, QuantEmbedding)


def _shifts_itself(module: nn.Module, name: str) -> bool:
    """fogzo's single-weight layers (exact types) add ``_weight_shift`` to ``weight`` themselves."""
    return name == "weight" and type(module) in _SELF_SHIFTING


_VALUE_PROPERTIES = frozenset({"T", "mT", "H", "mH", "data", "real", "imag"})
_METADATA_METHODS = frozenset({
    "size", "dim", "ndimension", "numel", "nelement", "stride", "storage_offset", "element_size",
    "is_contiguous", "is_floating_point", "is_complex", "is_signed", "get_device", "data_ptr",
    "__len__", "__hash__", "__repr__", "__format__", "has_names", "is_inference",
})


def _is_metadata(func: Callable) -> bool:
    """A ``torch`` function that reads a tensor's metadata (shape, dtype, ...), not its values."""
    name = getattr(func, "__name__", None)
    if name == "__get__":  # a Tensor property: .shape, .dtype, .requires_grad ... but .T, .data
        return getattr(getattr(func, "__self__", None), "__name__", None) not in _VALUE_PROPERTIES
    return name in _METADATA_METHODS


class _ReadCheck(TorchFunctionMode):
    """One checked perturbed pass: which perturbed tensors the ``torch`` functions see.

    A use of an original perturbed ``Parameter`` is replaced by its perturbed tensor (built
    once for the pass) and recorded with the innermost running module that contains one of
    its owners (``None``: no such module was running).
    """

    def __init__(self, plan: _ReadPlan, replacement: Callable[[PerturbedTensor], torch.Tensor]) -> None:
        super().__init__()
        self.plan = plan
        self.replacement = replacement
        self.originals = {id(entry.param): entry for entry in plan.tensors}
        self.handed: dict[int, tuple[weakref.ref, PerturbedTensor]] = {}
        self.read: set[int] = set()
        self.outside: dict[int, list[nn.Module | None]] = {}
        self.substitutes: dict[int, torch.Tensor] = {}
        self.running: list[nn.Module] = []
        self.suspended = 0

    def handed_out(self, tensor: torch.Tensor, entry: PerturbedTensor) -> None:
        self.handed[id(tensor)] = (weakref.ref(tensor), entry)

    def track_modules(self) -> list:
        """Hooks that keep ``running``, the stack of modules whose forward is running."""
        handles = []

        def push(module: nn.Module, args: object) -> None:
            self.running.append(module)

        def pop(module: nn.Module, args: object, output: object) -> None:
            if self.running and self.running[-1] is module:
                self.running.pop()

        for module in self.plan.containing():
            handles.append(module.register_forward_pre_hook(push, prepend=True))
            handles.append(module.register_forward_hook(pop, always_call=True))
        return handles

    def _reader(self, entry: PerturbedTensor) -> nn.Module | None:
        containing = self.plan.containing()
        for module in reversed(self.running):
            if entry.index in containing.get(module, ()):
                return module
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if not self.suspended and not _is_metadata(func):
            flat, spec = tree_flatten((args, kwargs))
            replaced = False
            for position, value in enumerate(flat):
                if not isinstance(value, torch.Tensor):
                    continue
                entry = self.originals.get(id(value))
                if entry is not None and value is entry.param:
                    substitute = self.substitutes.get(entry.index)
                    if substitute is None:
                        substitute = self.substitutes[entry.index] = self.replacement(entry)
                    flat[position] = substitute
                    self.outside.setdefault(entry.index, []).append(self._reader(entry))
                    replaced = True
                    continue
                handed = self.handed.get(id(value))
                if handed is not None and handed[0]() is value:
                    self.read.add(handed[1].index)
            if replaced:
                args, kwargs = tree_unflatten(flat, spec)
        return func(*args, **kwargs)

    def conclude(self) -> None:
        """After a pass that completed: raise for unread tensors, else update the plan."""
        unread = [entry.name for entry in self.plan.tensors if entry.index not in self.read | set(self.outside)]
        if unread:
            raise ValueError(
                f"perturbed parameters {unread[:5]} were not read in the perturbed forward pass: their finite "
                "differences would be exactly zero and their gradient pure noise. Leave them out of perturb= "
                "(pass the parameters the loss uses), or check that the closure runs the modules that use them"
            )
        self.plan.update(self.outside)
