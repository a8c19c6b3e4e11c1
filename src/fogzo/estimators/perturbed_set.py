"""The perturbed tensor set: which tensors an estimator perturbs, their coordinate scales
``c``, their noise ``u``, and their FSDP shards.

Coordinates. Each perturbed tensor ``W`` lives in normalised coordinates ``x = W / c``:
``c = α`` (the quantizer's step, per tensor or per channel) for a quantized layer's latent
weight, and ``c = ε / ε̄`` for a tensor without a quantizer (a bias, a norm gain), where
``ε`` is a user step. A step ``ε̄·v`` in ``x`` is ``c·ε̄·v`` in ``W``; one finite difference
``(L₊ − L₋)/2ε̄`` is shared by every tensor (docs/method.md §1, §4). The noise ``u`` comes from
:mod:`fogzo.estimators.noise`.

How a perturbed pass puts ``W + c·ε̄·v`` in place: :mod:`fogzo.estimators.engine` (in each
tensor's own storage, restored bit-exactly from a backup). The one exception is a pass under
``torch.func.vmap`` (``vectorize``), whose weights are batched: :meth:`PerturbedSet.swapped`.

FSDP2 (parameters are ``DTensor`` s sharded on dim 0 over a 1-D mesh): every tensor an
estimator builds for a perturbed parameter is the rank's *local* part, rows
``[first_row, first_row + rows)`` that start at flat index ``start`` of the whole tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeGuard

import torch
from torch import nn

from ..adapters import QuantizerView, foreign_quantized_layers, quantizer_parameters, quantizer_views
from ..smoothing import Smoothing
from .noise import NOISE_BLOCK, NOISE_STREAM, NOISE_STREAMS, block_noise, counter_noise

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

__all__ = ["PerturbedSet", "PerturbedTensor", "is_dtensor", "local_part", "set_gradient"]

LOW_PRECISION = (torch.float16, torch.bfloat16)


def is_dtensor(tensor: object) -> TypeGuard[DTensor]:
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "to_local")


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own shard of a ``DTensor`` (a view: writes reach the DTensor), else ``tensor``."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def set_gradient(param: torch.Tensor, gradient: torch.Tensor) -> None:
    """``param.grad = gradient``; for an FSDP parameter ``gradient`` may be the rank's local
    part: it becomes a ``DTensor`` with the parameter's layout (no copy)."""
    if is_dtensor(param) and not is_dtensor(gradient):
        from torch.distributed.tensor import DTensor

        gradient = DTensor.from_local(
            gradient, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        )
    param.grad = gradient


@dataclass(eq=False)
class PerturbedTensor:
    """One perturbed parameter, the modules that own it, and its coordinate scale."""

    index: int
    name: str
    param: nn.Parameter
    owners: list[tuple[nn.Module, str]]
    quantizer: QuantizerView | None = None
    eps: float | None = None
    sharded: bool = False
    first_row: int = 0
    rows: int = 0
    start: int = 0
    padding_row: int | None = None
    """``nn.Embedding(padding_idx=p)``'s weight: row ``p`` never gets a gradient from backward,
    so the zeroth-order estimators give it none either (:meth:`PerturbedSet.mask_padding_rows`)."""

    def __post_init__(self) -> None:
        if is_dtensor(self.param):
            self.sharded = True
            self.first_row, self.rows = _shard_rows(self.param)
            self.start = self.first_row * (self.param[0].numel() if self.param.dim() else 1)
        else:
            self.rows = self.param.shape[0] if self.param.dim() else 1

    def local_param(self) -> torch.Tensor:
        """The (local part of the) detached parameter."""
        return local_part(self.param.detach())

    @property
    def local_shape(self) -> torch.Size:
        """Shape of :meth:`local_param` (no tensor is made)."""
        if not self.sharded:
            return self.param.shape
        return torch.Size((self.rows, *self.param.shape[1:]))

    def coordinate_scale(self, eps_bar: float) -> torch.Tensor:
        """``c``: the quantizer's scale (fogzo's ``α``, torchao's ``s``; see :mod:`fogzo.adapters`)
        for a quantized weight, broadcastable to the weight (rows of the shard under FSDP);
        ``ε/ε̄`` as a 0-d float32 tensor otherwise."""
        if self.quantizer is None:
            assert self.eps is not None
            dtype = torch.float64 if self.param.dtype == torch.float64 else torch.float32
            return torch.tensor(self.eps / eps_bar, dtype=dtype, device=self.param.device)
        scale = self.quantizer.coordinate_scale()
        if is_dtensor(scale):  # a learned per-channel α, sharded like its weight
            return local_part(scale)
        if self.sharded and scale.numel() > 1:  # a per-channel α buffer: this shard's rows
            return scale[self.first_row : self.first_row + self.rows]
        return scale


@dataclass(eq=False)
class PerturbedSet:
    """The tensors an estimator perturbs, with their owners, scales and shared smoothing.

    Args:
        model: the (quantized) model.
        perturb: ``"quantized"`` (the default: latent weights of quantized layers, found by
            :mod:`fogzo.adapters`), ``"all"`` (every trainable parameter except quantizer
            step sizes, which keep their back-propagated gradient; tensors without a
            quantizer use step ``eps``), or an iterable of parameters. Only parameters that
            require grad are perturbed (a frozen quantized weight is left alone); an explicit
            frozen one raises. A quantized weight stored in bf16/fp16 raises: a perturbed
            pass writes ``W + c·ε̄·v`` into it, and that format cannot hold a shift of a small
            fraction of a quantization step (keep latent weights in float32 and use
            ``torch.autocast`` for a low-precision forward).
        eps: step ``ε`` (in weight units) for perturbed tensors without a quantizer.
        smoothing: the noise law and ``ε̄``; by default the one of the quantized layers
            (they must agree). A model without quantized layers defaults to Gaussian noise
            with ``ε̄ = 1`` (then ``ε̄`` cancels and each tensor moves by ``ε·u``).
        noise_stream: ``"blocks"`` (default) or ``"counter"``: how ``u`` is generated
            (:data:`~fogzo.estimators.noise.NOISE_STREAMS`); same law and equations, other numbers.
        compile_noise: with ``noise_stream="counter"``, generate ``u`` in one kernel made by
            ``torch.compile`` on first use (the eager numbers for the uniform and triangular laws).
    """

    tensors: list[PerturbedTensor]
    smoothing: Smoothing
    fsdp_modules: list[FSDPModule] = field(default_factory=list, repr=False)
    noise_stream: str = "blocks"
    compile_noise: bool = False
    left_frozen: list[tuple[str, nn.Parameter]] = field(default_factory=list, repr=False)
    _generators: dict[torch.device, torch.Generator] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.noise_stream not in NOISE_STREAMS:
            raise ValueError(f"noise_stream must be one of {NOISE_STREAMS}, got {self.noise_stream!r}")
        if self.compile_noise and self.noise_stream != "counter":
            raise ValueError("compile_noise=True needs noise_stream='counter' (torch's generators cannot be compiled)")
        self.params: list[torch.Tensor] = [entry.param for entry in self.tensors]
        self.sharded = self.tensors[0].sharded
        """True when the perturbed tensors are FSDP shards (``DTensor``)."""
        self.padded = [entry for entry in self.tensors if entry.padding_row is not None]
        self._scales: list[torch.Tensor] | None = None
        self._scales_key: tuple | None = None
        sizes = [entry.param.numel() for entry in self.tensors]
        self.num_coordinates = sum(sizes)
        """``d``: the number of perturbed scalars."""
        self._offsets = [sum(sizes[:k]) for k in range(len(sizes))]  # tensor k's first coordinate of u
        one_place = len({(p.device, p.dtype) for p in self.params}) == 1
        self._flat_sizes = sizes if not self.sharded and self.num_coordinates <= NOISE_BLOCK and one_place else None

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        perturb: str | Iterable[nn.Parameter] = "quantized",
        eps: float = 1e-3,
        smoothing: Smoothing | None = None,
        noise_stream: str = "blocks",
        compile_noise: bool = False,
    ) -> PerturbedSet:
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        # Quantized weights and quantizer parameters, whoever quantized them (fogzo.adapters).
        quantizer_of = {pid: view for pid, (_, view) in quantizer_views(model).items()}
        quantizer_params = {id(p) for p in quantizer_parameters(model)}
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        frozen: list[str] = []
        if perturb == "quantized":
            chosen = {pid for pid in quantizer_of if pid in trainable}
            frozen = [name for name, p in model.named_parameters() if id(p) in quantizer_of and not p.requires_grad]
        elif perturb == "all":
            chosen = {pid for pid in trainable if pid not in quantizer_params}
            foreign = foreign_quantized_layers(model)
            if foreign:
                raise ValueError(
                    "perturb='all' would perturb the weights of quantized layers as if they were float: "
                    f"{'; '.join(foreign[:5])} are quantized by a library fogzo has no adapter for, so their step "
                    "size is unknown. Register one with fogzo.adapters.register_adapter (docs/integrations.md), or "
                    "pass perturb= the float parameters to perturb"
                )
        elif isinstance(perturb, str):
            raise ValueError(f"perturb must be 'quantized', 'all' or an iterable of parameters, got {perturb!r}")
        else:
            perturb = list(perturb)
            chosen = {id(p) for p in perturb}
            explicit_frozen = [name for name, p in model.named_parameters() if id(p) in chosen and not p.requires_grad]
            if explicit_frozen:
                raise ValueError(
                    f"perturb contains frozen parameters (requires_grad=False): {explicit_frozen[:5]}; a frozen "
                    "parameter gets no gradient, so leave it out of perturb (or set requires_grad=True)"
                )
        tensors: list[PerturbedTensor] = []
        by_id: dict[int, PerturbedTensor] = {}
        for name, param in model.named_parameters(remove_duplicate=True):
            if id(param) in chosen and id(param) not in by_id:
                quantizer = quantizer_of.get(id(param))
                if quantizer is not None and param.dtype in LOW_PRECISION:
                    raise ValueError(
                        f"the quantized weight {name!r} is stored in {param.dtype}, which cannot hold a perturbation "
                        "of a small fraction of a quantization step: keep latent weights in float32 (model.float()) "
                        "and use torch.autocast for a low-precision forward"
                    )
                entry = PerturbedTensor(len(tensors), name, param, [], quantizer, None if quantizer else eps)
                by_id[id(param)] = entry
                tensors.append(entry)
        if not tensors:
            why = f" (its quantized weights are frozen: {frozen[:3]})" if frozen else ""
            foreign = foreign_quantized_layers(model) if perturb == "quantized" else []
            if foreign:
                raise ValueError(
                    f"nothing to perturb in {type(model).__name__}: no registered adapter recognises its quantized "
                    f"layers {'; '.join(foreign[:5])}; write one for that quantizer with fogzo.adapters.register_adapter "
                    "(docs/integrations.md), or quantize the model with fogzo.quantize or a torchao QAT prepare step"
                )
            raise ValueError(
                f"nothing to perturb in {type(model).__name__} with perturb={perturb!r}{why}: "
                "quantize the model first (fogzo.quantize or a torchao QAT prepare step) or pass perturb='all'"
            )
        if len(by_id) != len(chosen):
            raise ValueError("perturb contains parameters that are not in the model")
        for module in model.modules():
            for name, value in module._parameters.items():
                if value is not None and id(value) in by_id:
                    entry = by_id[id(value)]
                    entry.owners.append((module, name))
                    if isinstance(module, nn.Embedding) and name == "weight" and module.padding_idx is not None:
                        entry.padding_row = module.padding_idx % module.num_embeddings
        # Parameters left out because they were frozen, which perturb would otherwise take: one
        # unfrozen later must not silently get no gradient (n-SPSA) or the plain STE's (FOGZO).
        if perturb == "quantized":
            candidates = set(quantizer_of)
        elif perturb == "all":
            candidates = {id(p) for p in model.parameters()} - quantizer_params
        else:
            candidates = set()
        left_frozen = [(name, p) for name, p in model.named_parameters() if id(p) in candidates and not p.requires_grad]
        smoothings = {entry.quantizer.smoothing for entry in tensors if entry.quantizer is not None}
        if smoothing is None:
            if len(smoothings) > 1:
                raise ValueError(
                    f"perturbed quantized layers use different smoothings {sorted(map(str, smoothings))}; "
                    "one ε̄ must serve the whole perturbation: pass smoothing= explicitly"
                )
            smoothing = smoothings.pop() if smoothings else Smoothing("gaussian", 1.0)
        if len({entry.sharded for entry in tensors}) > 1:
            mixed = [entry.name for entry in tensors if not entry.sharded][:3]
            raise ValueError(
                f"some perturbed tensors are FSDP shards (DTensor) and some are not (e.g. {mixed}): "
                "apply fully_shard so that it covers every perturbed parameter"
            )
        fsdp_modules = [m for m in model.modules() if callable(getattr(m, "reshard", None)) and _is_fsdp(m)]
        return cls(tensors, smoothing, fsdp_modules, noise_stream, compile_noise, left_frozen)

    def check_trainable(self) -> None:
        """Raise if a perturbed parameter was frozen (``requires_grad=False``) since, or one that
        ``perturb`` left out because it was frozen has been unfrozen: either way the estimator
        would give it the wrong gradient."""
        if all(param.requires_grad for param in self.params) and not any(p.requires_grad for _, p in self.left_frozen):
            return
        frozen = [entry.name for entry in self.tensors if not entry.param.requires_grad]
        if frozen:
            raise ValueError(
                f"perturbed parameters {frozen[:5]} were frozen (requires_grad=False) after the estimator was "
                "built; a frozen parameter must get no gradient: build a new estimator"
            )
        unfrozen = [name for name, param in self.left_frozen if param.requires_grad]
        raise ValueError(
            f"parameters {unfrozen[:5]} were frozen when the estimator was built and have been unfrozen "
            "since; the estimator does not perturb them, so they would get no zeroth-order gradient: "
            "build a new estimator after changing requires_grad"
        )

    def local_params(self) -> list[torch.Tensor]:
        """The perturbed parameters (their local shards under FSDP), whose storage a perturbed pass writes."""
        return [local_part(param.detach()) for param in self.params] if self.sharded else self.params

    def scales(self) -> list[torch.Tensor]:
        """``c`` of every tensor, a tensor broadcastable to its local part (:meth:`PerturbedTensor.coordinate_scale`).

        Kept between steps where each ``c`` is the same tensor object whenever it is asked for (a
        fixed ``α`` buffer; ``ε/ε̄``), whose value a kernel reads when it runs; read again each
        step where it is computed (a learned ``α``, torchao's dynamic scales) and after the
        model moved to another device or dtype."""
        key = (self.params[0].device, self.params[0].dtype)
        if self._scales is not None and key == self._scales_key:
            return self._scales
        eps_bar = self.smoothing.eps_bar
        scales = [entry.coordinate_scale(eps_bar) for entry in self.tensors]
        again = [e.coordinate_scale(eps_bar) if e.quantizer is not None else c for e, c in zip(self.tensors, scales)]
        if all(a is b for a, b in zip(scales, again)):
            self._scales, self._scales_key = scales, key
        return scales

    def noises(self, step_seed: int, sample: int) -> list[torch.Tensor]:
        """Unit-variance noise ``u`` of every perturbed tensor (its local part) for ``sample``.

        ``u`` is one vector over the perturbed tensors laid end to end (tensor ``k`` holds
        coordinates ``[offset_k, offset_k + numel_k)`` of ``d``), drawn from the key
        ``(step_seed, NOISE_STREAM, sample)`` by :mod:`fogzo.estimators.noise`, whose streams give
        any coordinate range on its own (a shard draws only its part). Where the whole vector fits
        one noise block (``d <= NOISE_BLOCK``, unsharded, one device and dtype: every small model)
        it is one draw, split into views; else one draw per tensor, the same numbers."""
        key = (step_seed, NOISE_STREAM, sample)
        if self._flat_sizes is not None:
            flat = self._draw(key, (self.num_coordinates,), self.params[0], 0)
            return [u.view(entry.local_shape) for entry, u in zip(self.tensors, flat.split(self._flat_sizes))]
        return [self._part(key, entry, offset) for entry, offset in zip(self.tensors, self._offsets)]

    def add_noise_(self, tensors: list[torch.Tensor], step_seed: int, sample: int, alpha: float) -> None:
        """``tensors[k] += alpha·u_k`` (:meth:`noises`), one noise tensor alive at a time where ``u``
        is more than one draw."""
        if self._flat_sizes is not None:
            torch._foreach_add_(tensors, self.noises(step_seed, sample), alpha=alpha)
            return
        key = (step_seed, NOISE_STREAM, sample)
        for entry, offset, tensor in zip(self.tensors, self._offsets, tensors):
            tensor.add_(self._part(key, entry, offset), alpha=alpha)

    def _part(self, key: tuple[int, ...], entry: PerturbedTensor, offset: int) -> torch.Tensor:
        """``entry``'s part of ``u`` (its local part under FSDP); ``offset``: the tensor's first coordinate."""
        return self._draw(key, entry.local_shape, entry.param, offset + entry.start)

    def _draw(self, key: tuple[int, ...], shape, like: torch.Tensor, start: int) -> torch.Tensor:
        """Coordinates ``[start, start + numel)`` of ``u``, shaped ``shape``, on ``like``'s device and in its dtype."""
        args = (self.smoothing, key, shape, like.device, like.dtype)
        if self.noise_stream == "counter":
            return counter_noise(*args, start=start, total=self.num_coordinates, compiled=self.compile_noise)
        generator = self._generators.get(like.device)
        if generator is None:
            generator = self._generators[like.device] = torch.Generator(device=like.device)
        return block_noise(*args, start=start, total=self.num_coordinates, generator=generator)

    def mask_padding_rows(self, gradients: list[torch.Tensor]) -> None:
        """Zero the padding row of every ``nn.Embedding(padding_idx=…)`` weight's gradient in
        place (this rank's rows under FSDP), as backward leaves it."""
        for entry in self.padded:
            row = entry.padding_row
            if row is not None and entry.first_row <= row < entry.first_row + entry.rows:
                gradients[entry.index][row - entry.first_row] = 0.0

    @contextlib.contextmanager
    def swapped(self, replacement: Callable[[PerturbedTensor], torch.Tensor]) -> Iterator[None]:
        """Inside the block every module holding a perturbed parameter holds ``replacement(entry)``
        in its place (``module._parameters[name]``, as ``torch.func.functional_call`` does);
        the ``Parameter`` objects are put back on exit. For passes under ``torch.func.vmap``,
        whose weights are batched tensors that no parameter's storage can hold (``vectorize``,
        the smoothed-gradient oracle); a weight read through a reference held outside the
        model's modules is not replaced here."""
        try:
            for entry in self.tensors:
                tensor = replacement(entry)
                for module, name in entry.owners:
                    module._parameters[name] = tensor  # type: ignore[assignment]
            yield
        finally:
            for entry in self.tensors:
                for module, name in entry.owners:
                    module._parameters[name] = entry.param


def _shard_rows(param: DTensor) -> tuple[int, int]:
    """``(first row, rows)`` of this rank's shard of a dim-0-sharded ``DTensor``."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tuple(param.placements)
    if param.device_mesh.ndim != 1 or placements != (Shard(0),):
        raise ValueError(
            f"sharded parameters must be DTensors sharded on dim 0 over a 1-D mesh (FSDP2's default); "
            f"got placements {placements}"
        )
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, placements)
    return int(offset[0]), int(shape[0])


def _is_fsdp(module: nn.Module) -> TypeGuard[FSDPModule]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(module, FSDPModule)
