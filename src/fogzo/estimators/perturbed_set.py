"""The perturbed tensor set: which tensors an estimator perturbs, and how a perturbed pass
puts ``W + δ`` in their place.

Coordinates. Each perturbed tensor ``W`` lives in normalised coordinates ``x = W / c``:
``c = α`` (the quantizer's step, per tensor or per channel) for a quantized layer's latent
weight, and ``c = ε / ε̄`` for a tensor without a quantizer (a bias, a norm gain), where
``ε`` is a user step. A step ``ε̄·v`` in ``x`` is ``c·ε̄·v`` in ``W``; one finite difference
``(L₊ − L₋)/2ε̄`` is shared by every tensor (docs/method.md §1, §4). The noise ``u`` comes from
:mod:`fogzo.estimators.noise`.

Perturbed passes never write to a parameter: ``W + δ`` is put in the parameter's place at
the module-attribute level (``module._parameters[name]``, in every module that holds it, as
``torch.func.functional_call`` does), so the shifted tensor is what any code reading the
attribute sees — the owner's forward, a parent's ``F.linear(x, child.weight)``, torch's
``nn.MultiheadAttention`` reading ``out_proj.weight``, a tied weight — and the original
``Parameter`` object is put back afterwards. When and for how long is the plan of
:meth:`PerturbedSet.swapped` (memory: one perturbed tensor at a time for weights read only
inside their owner's forward; the plan and its read check: :mod:`fogzo.estimators.read_plan`).
Buffers that a forward writes (BatchNorm running statistics) are restored from a snapshot,
and the global RNG is rewound so that every pass sees the same dropout masks as the STE pass
(:class:`fogzo.estimators.state.StateGuard`). FSDP shards: :mod:`fogzo.estimators.sharding`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters import QuantizerView, foreign_quantized_layers, quantizer_parameters, quantizer_views
from ..smoothing import Smoothing
from .noise import (
    _GAMMA,
    NOISE_STREAM,
    NOISE_STREAMS,
    _as_int64,
    block_noise,
    compiled_counter,
    counter_noise,
    derive_seed,
)
from .read_plan import _ReadCheck, _ReadPlan, _shifts_itself
from .sharding import _is_dtensor, _is_fsdp, _shard_rows, local_part, shifted_shards

__all__ = ["PerturbedSet", "PerturbedTensor"]


@dataclass(eq=False)
class PerturbedTensor:
    """One perturbed parameter, the modules that own it, and its coordinate scale.

    Under FSDP (``param`` a ``DTensor`` sharded on dim 0) every tensor an estimator builds
    for this entry is the rank's *local* part: rows ``[first_row, first_row + rows)``, which
    start at flat index ``start`` of the unsharded tensor.
    """

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
        if _is_dtensor(self.param):
            self.sharded = True
            self.first_row, self.rows = _shard_rows(self.param)
            self.start = self.first_row * (self.param[0].numel() if self.param.dim() else 1)
        else:
            self.rows = self.param.shape[0] if self.param.dim() else 1

    @property
    def upcast_shift(self) -> bool:
        """True when the owner layer adds the shift in float32 (a bf16/fp16 weight of one of
        fogzo's single-weight layers, see :meth:`fogzo.QuantizedLayer.latent_weight`)."""
        return (
            self.param.dtype in (torch.float16, torch.bfloat16)
            and len(self.owners) == 1
            and _shifts_itself(*self.owners[0])
        )

    def local_param(self) -> torch.Tensor:
        """The (local part of the) detached parameter."""
        return local_part(self.param.detach())

    @property
    def local_shape(self) -> torch.Size:
        """Shape of :meth:`local_param` (no tensor is made)."""
        if not self.sharded:
            return self.param.shape
        return torch.Size((self.rows, *self.param.shape[1:]))

    def coordinate_scale(self, eps_bar: float) -> torch.Tensor | float:
        """``c``: the quantizer's scale (fogzo's ``α``, torchao's ``s``; see :mod:`fogzo.adapters`)
        for a quantized weight, ``ε/ε̄`` otherwise (rows of the shard under FSDP)."""
        if self.quantizer is None:
            assert self.eps is not None
            return self.eps / eps_bar
        scale = self.quantizer.coordinate_scale()
        if _is_dtensor(scale):  # a learned per-channel α, sharded like its weight
            return local_part(scale)
        if self.sharded and scale.numel() > 1:  # a per-channel α buffer: this shard's rows
            return scale[self.first_row : self.first_row + self.rows]
        return scale


@dataclass
class PerturbedSet:
    """The tensors an estimator perturbs, with their owners, scales and shared smoothing.

    Args:
        model: the (quantized) model.
        perturb: ``"quantized"`` (the default: latent weights of quantized layers, found by
            :mod:`fogzo.adapters`), ``"all"`` (every trainable parameter except quantizer
            step sizes, which keep their back-propagated gradient; tensors without a
            quantizer use step ``eps``), or an iterable of parameters. Only parameters that
            require grad are perturbed (a frozen quantized weight is left alone); an explicit
            frozen one raises.
        eps: step ``ε`` (in weight units) for perturbed tensors without a quantizer.
        smoothing: the noise law and ``ε̄``; by default the one of the quantized layers
            (they must agree). A model without quantized layers defaults to Gaussian noise
            with ``ε̄ = 1`` (then ``ε̄`` cancels and each tensor moves by ``ε·u``).
        noise_stream: ``"blocks"`` (default) or ``"counter"``: how ``u`` is generated
            (:data:`NOISE_STREAMS`); the law and every equation are the same, the numbers
            are not.
        compile_noise: with ``noise_stream="counter"``, generate ``u`` (and, for the one
            direction of n = 1, the whole shift ``g·a + u·b``) in kernels made by
            ``torch.compile`` (:func:`compiled_counter`), compiled once per process on first
            use: the same numbers as eager mode for the uniform and triangular laws (the
            compiled ``log``/``cos`` of the logistic and Gaussian laws may differ in the last bit).
    """

    tensors: list[PerturbedTensor]
    smoothing: Smoothing
    _owners: dict[nn.Module, list[tuple[str, PerturbedTensor]]] = field(repr=False)
    _fsdp_modules: list[nn.Module] = field(default_factory=list, repr=False)
    _model: nn.Module | None = field(default=None, repr=False)
    _plan: _ReadPlan | None = field(default=None, repr=False)
    _generators: dict[torch.device, torch.Generator] = field(default_factory=dict, repr=False)
    noise_stream: str = "blocks"
    compile_noise: bool = False
    _left_frozen: list[tuple[str, nn.Parameter]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.noise_stream not in NOISE_STREAMS:
            raise ValueError(f"noise_stream must be one of {NOISE_STREAMS}, got {self.noise_stream!r}")
        if self.compile_noise and self.noise_stream != "counter":
            raise ValueError("compile_noise=True needs noise_stream='counter' (torch's generators cannot be compiled)")
        if self._plan is None:
            self._plan = _ReadPlan(self.tensors, self._model)

    @property
    def sharded(self) -> bool:
        """True when the perturbed tensors are FSDP shards (``DTensor``)."""
        return self.tensors[0].sharded

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
        if noise_stream not in NOISE_STREAMS:
            raise ValueError(f"noise_stream must be one of {NOISE_STREAMS}, got {noise_stream!r}")
        if compile_noise and noise_stream != "counter":
            raise ValueError("compile_noise=True needs noise_stream='counter' (torch's generators cannot be compiled)")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        # Quantized weights and quantizer parameters, whoever quantized them (fogzo.adapters).
        quantizer_of = {pid: view for pid, (_, view) in quantizer_views(model).items()}
        quantizer_params = {id(p) for p in quantizer_parameters(model)}
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        frozen: list[str] = []
        if perturb == "quantized":
            chosen = {pid for pid in quantizer_of if pid in trainable}
            frozen = [name for name, p in model.named_parameters() if id(p) in quantizer_of and id(p) not in trainable]
        elif perturb == "all":
            chosen = {pid for pid in trainable if pid not in quantizer_params}
            foreign = foreign_quantized_layers(model)
            if foreign:
                raise ValueError(
                    "perturb='all' would perturb the weights of quantized layers as if they were float: "
                    f"{'; '.join(foreign[:5])} are quantized by a library fogzo has no adapter for, so their step size is unknown. Register "
                    "one with fogzo.adapters.register_adapter (docs/integrations.md), or pass perturb= the float "
                    "parameters to perturb"
                )
        elif isinstance(perturb, str):
            raise ValueError(f"perturb must be 'quantized', 'all' or an iterable of parameters, got {perturb!r}")
        else:
            perturb = list(perturb)
            chosen = {id(p) for p in perturb}
            explicit_frozen = [name for name, p in model.named_parameters() if id(p) in chosen and id(p) not in trainable]
            if explicit_frozen:
                raise ValueError(
                    f"perturb contains frozen parameters (requires_grad=False): {explicit_frozen[:5]}; a frozen "
                    "parameter gets no gradient, so leave it out of perturb (or set requires_grad=True)"
                )
        tensors: list[PerturbedTensor] = []
        by_id: dict[int, PerturbedTensor] = {}
        for name, param in model.named_parameters(remove_duplicate=True):
            if id(param) in chosen and id(param) not in by_id:
                entry = PerturbedTensor(
                    index=len(tensors),
                    name=name,
                    param=param,
                    owners=[],
                    quantizer=quantizer_of.get(id(param)),
                    eps=None if id(param) in quantizer_of else eps,
                )
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
        owners: dict[nn.Module, list[tuple[str, PerturbedTensor]]] = {}
        for module in model.modules():
            for name, param in module._parameters.items():
                if param is not None and id(param) in by_id:
                    entry = by_id[id(param)]
                    entry.owners.append((module, name))
                    owners.setdefault(module, []).append((name, entry))
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
        left_frozen = [(name, p) for name, p in model.named_parameters() if id(p) in candidates and id(p) not in trainable]
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
        return cls(tensors, smoothing, owners, fsdp_modules, model, noise_stream=noise_stream,
                   compile_noise=compile_noise, _left_frozen=left_frozen)

    def check_trainable(self) -> None:
        """Raise if a perturbed parameter was frozen (``requires_grad=False``) since, or one that
        ``perturb`` left out because it was frozen has been unfrozen: either way the estimator
        would give it the wrong gradient."""
        frozen = [entry.name for entry in self.tensors if not entry.param.requires_grad]
        if frozen:
            raise ValueError(
                f"perturbed parameters {frozen[:5]} were frozen (requires_grad=False) after the estimator was "
                "built; a frozen parameter must get no gradient: build a new estimator"
            )
        unfrozen = [name for name, param in self._left_frozen if param.requires_grad]
        if unfrozen:
            raise ValueError(
                f"parameters {unfrozen[:5]} were frozen when the estimator was built and have been unfrozen "
                "since; the estimator does not perturb them, so they would get no zeroth-order gradient: "
                "build a new estimator after changing requires_grad"
            )

    def mask_padding_rows(self, gradients: list[torch.Tensor]) -> None:
        """Zero the padding row of every ``nn.Embedding(padding_idx=…)`` weight's gradient in
        place (this rank's rows under FSDP), as backward leaves it."""
        for entry, gradient in zip(self.tensors, gradients):
            row = entry.padding_row
            if row is not None and entry.first_row <= row < entry.first_row + entry.rows:
                gradient[row - entry.first_row] = 0.0

    @property
    def num_coordinates(self) -> int:
        """``d``: the number of perturbed scalars."""
        return sum(entry.param.numel() for entry in self.tensors)

    def noise(self, entry: PerturbedTensor, step_seed: int, sample: int) -> torch.Tensor:
        """Unit-variance noise ``u`` for ``entry`` and ``sample``, regenerated on demand."""
        device = entry.param.device
        if self.noise_stream == "counter":
            return counter_noise(
                self.smoothing, (step_seed, NOISE_STREAM, entry.index, sample), entry.local_shape, device,
                entry.param.dtype, start=entry.start, total=entry.param.numel(), compiled=self.compile_noise,
            )
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        return block_noise(
            self.smoothing,
            (step_seed, NOISE_STREAM, entry.index, sample),
            entry.local_shape,
            device,
            entry.param.dtype,
            start=entry.start,
            total=entry.param.numel(),
            generator=generator,
        )

    def noise_offsets(self, entries: list[PerturbedTensor], step_seed: int, sample: int) -> torch.Tensor:
        """The counter offsets ``key + γ`` of ``entries`` for :meth:`noise_shift_`, one device tensor."""
        device = entries[0].param.device
        keys = [_as_int64(derive_seed(step_seed, NOISE_STREAM, e.index, sample) + _GAMMA) for e in entries]
        return torch.tensor(keys, dtype=torch.int64, device=device)

    def noise_shift_(
        self, entry: PerturbedTensor, offset: torch.Tensor, target: torch.Tensor, target_coefficient: torch.Tensor,
        noise_coefficient: torch.Tensor,
    ) -> torch.Tensor:
        """``target·target_coefficient + noise_coefficient·u`` in place with :meth:`noise`'s ``u``, as
        one compiled kernel (``compile_noise=True``: no noise tensor is made); ``offset``: from
        :meth:`noise_offsets`."""
        assert self.compile_noise
        return compiled_counter("shift")(target, target_coefficient, noise_coefficient, offset, entry.start,
                                         self.smoothing.noise)

    @contextlib.contextmanager
    def shifted(
        self, shift: Callable[[PerturbedTensor], tuple[torch.Tensor, float]], *, ready: bool = False
    ) -> Iterator[None]:
        """Inside the block the model computes with ``W + a·t`` for ``(t, a) = shift(entry)``.

        Unsharded: through :meth:`swapped` (no parameter is written). With ``ready=True``
        (``shift`` returns tensors that already exist, so calling it for every entry up front
        costs nothing) the weights of fogzo's single-weight layers (``QuantLinear``,
        ``QuantConv1d/2d``, ``QuantEmbedding``) that are read only inside their own forward
        are handed to the layer as the shift ``(t, a)`` instead: the layer adds it just
        before quantizing (:meth:`fogzo.QuantizedLayer.latent_weight`), the same ``W + a·t``
        with no forward hooks (a compiled model keeps its graphs). Passes whose reads are
        still being checked (:meth:`swapped`) always use the hooks.

        FSDP: :func:`~fogzo.estimators.sharding.shifted_shards` (the shift is added to each
        rank's shard in place and restored bit for bit on exit).
        """
        if not self.sharded:
            plan = self._plan
            assert plan is not None
            fast = plan.fast if ready and not plan.needs_check() else []
            if not fast:
                with self.swapped(lambda entry: _shift_by(entry.local_param(), shift(entry))):
                    yield
                return
            layers = []
            try:
                for entry in fast:
                    layer = entry.owners[0][0]
                    layer._weight_shift = shift(entry)  # type: ignore[assignment]
                    layers.append(layer)
                if len(fast) == len(self.tensors):
                    yield
                else:
                    skip = frozenset(entry.index for entry in fast)
                    with self.swapped(lambda entry: _shift_by(entry.local_param(), shift(entry)), _skip=skip):
                        yield
            finally:
                for layer in layers:
                    layer._weight_shift = None  # type: ignore[assignment]
            return
        with shifted_shards(self._fsdp_modules, self.tensors, shift):
            yield

    def hook_free(self, ready: bool) -> bool:
        """True when a :meth:`shifted` pass with ``ready`` registers no hook and no function mode:
        every tensor is added inside its own layer (what a compiled model can run as is)."""
        plan = self._plan
        assert plan is not None
        return self.sharded or (ready and not plan.needs_check() and len(plan.fast) == len(self.tensors))


    @contextlib.contextmanager
    def swapped(
        self, replacement: Callable[[PerturbedTensor], torch.Tensor], *, _skip: frozenset[int] = frozenset()
    ) -> Iterator[None]:
        """Inside the block, the model computes with ``replacement(entry)`` for every entry,
        wherever the parameter is read; the original ``Parameter`` objects are never written.

        The replacement is put in the parameter's place at the module-attribute level
        (``module._parameters[name]`` of every module holding it), for the forward of a
        *scope* module, and the original put back after it (forward pre-/post-hooks):

        * by default the scope is the module(s) holding the parameter (its owner, all owners
          of a tied weight; for ``out_proj`` of an ``nn.MultiheadAttention``, the attention
          layer, whose forward reads it): the replacement is built just before use and
          dropped after, so the extra memory is one perturbed tensor at a time (plus what
          the model keeps alive itself), as for the STE step;
        * a parameter found read outside its scope gets the innermost module that was
          running when it was read and that contains an owner (e.g. the parent whose
          forward calls ``F.linear(x, child.weight)``);
        * one read outside every module's forward (in the closure itself, e.g. a weight
          penalty) makes it *eager*: its replacement is built when the block starts and
          kept for the whole pass (memory: the sum of the eager tensors).

        Reads are checked on the first perturbed passes (and again after
        ``model.train()``/``eval()`` changes the mode) with a ``torch`` function mode that
        sees every tensor handed to a ``torch`` function: a use of an original
        ``Parameter`` object is replaced by the perturbed tensor on the spot (so that pass
        is right too) and widens the plan as above; the check repeats until a pass shows no
        such use, then it is off (the steady-state step pays nothing). A perturbed tensor
        that no pass reads raises ``ValueError`` naming it (its finite differences would be
        zero and its gradient pure noise), as does a parameter used through a reference
        that even the eager plan cannot replace (a tensor captured outside the model).
        """
        plan = self._plan
        assert plan is not None
        check = _ReadCheck(plan, replacement) if plan.needs_check() else None
        depth = [0] * len(self.tensors)
        handles = []
        hooked = plan.hooked
        if _skip:  # entries another mechanism shifts (see shifted): no hooks for them
            hooked = {m: kept for m, entries in hooked.items() if (kept := [e for e in entries if e.index not in _skip])}

        def put(entry: PerturbedTensor, tensor: torch.Tensor) -> None:
            for module, name in entry.owners:
                module._parameters[name] = tensor  # type: ignore[assignment]

        def build(entry: PerturbedTensor) -> torch.Tensor:
            if check is None:
                return replacement(entry)
            check.suspended += 1  # building W + δ reads W: not a use by the model
            try:
                tensor = replacement(entry)
            finally:
                check.suspended -= 1
            check.handed_out(tensor, entry)
            return tensor

        def enter(module: nn.Module, args: object) -> None:
            for entry in hooked[module]:
                if depth[entry.index] == 0:
                    put(entry, build(entry))
                depth[entry.index] += 1

        def leave(module: nn.Module, args: object, output: object) -> None:
            for entry in hooked[module]:
                depth[entry.index] -= 1
                if depth[entry.index] == 0:
                    put(entry, entry.param)

        try:
            for module in hooked:
                handles.append(module.register_forward_pre_hook(enter, prepend=True))
                handles.append(module.register_forward_hook(leave, always_call=True))
            if check is not None:
                handles.extend(check.track_modules())
            for entry in plan.eager:
                put(entry, build(entry))
            if check is None:
                yield
            else:
                with check:
                    yield
                check.conclude()
        finally:
            for handle in handles:
                handle.remove()
            for entry in self.tensors:
                if entry.index not in _skip:
                    put(entry, entry.param)


def _shift_by(weight: torch.Tensor, shift: tuple[torch.Tensor, float]) -> torch.Tensor:
    """``weight + alpha·tensor`` in a new tensor."""
    tensor, alpha = shift
    return torch.add(weight, tensor, alpha=alpha)
