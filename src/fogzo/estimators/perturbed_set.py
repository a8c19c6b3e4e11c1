"""The perturbed tensor set, deterministic noise, and perturbed forward passes.

Coordinates. Each perturbed tensor ``W`` lives in normalised coordinates ``x = W / c``:
``c = α`` (the quantizer's step, per tensor or per channel) for a quantized layer's latent
weight, and ``c = ε / ε̄`` for a tensor without a quantizer (a bias, a norm gain), where
``ε`` is a user step. A step ``ε̄·v`` in ``x`` is ``c·ε̄·v`` in ``W``; one finite difference
``(L₊ − L₋)/2ε̄`` is shared by every tensor (docs/method.md §1, §4).

Noise. ``u`` for tensor ``k`` and sample ``i`` at step seed ``s`` is drawn, block by block of
``NOISE_BLOCK`` flattened elements, from private ``torch.Generator`` s seeded with
``derive_seed(s, 0, k, i, block)``: reproducible, independent of the global RNG, different
for every tensor, defined by global coordinates (a shard draws only its own blocks), and
regenerated rather than stored where an estimator needs it again (docs/method.md §7).

Perturbed passes never write to a parameter: ``W + δ`` is put in the parameter's place at
the module-attribute level (``module._parameters[name]``, in every module that holds it, as
``torch.func.functional_call`` does), so the shifted tensor is what any code reading the
attribute sees — the owner's forward, a parent's ``F.linear(x, child.weight)``, torch's
``nn.MultiheadAttention`` reading ``out_proj.weight``, a tied weight — and the original
``Parameter`` object is put back afterwards. When and for how long is the plan of
:meth:`PerturbedSet.swapped` (memory: one perturbed tensor at a time for weights read only
inside their owner's forward). Buffers that a forward writes (BatchNorm running statistics)
are restored from a snapshot, and the global RNG is rewound so that every pass sees the
same dropout masks as the STE pass.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..adapters import QuantizerView, quantizer_parameters, quantizer_views
from ..layers import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear
from ..quantizers import WeightQuantizer
from ..smoothing import Smoothing

__all__ = [
    "NOISE_BLOCK", "NOISE_STREAMS", "PerturbedSet", "PerturbedTensor", "Snapshot", "StateGuard", "block_noise",
    "counter_bits",
    "counter_noise", "derive_seed", "state_buffers",
]

_MASK64 = (1 << 64) - 1
_SQRT3 = math.sqrt(3.0)
_SQRT6 = math.sqrt(6.0)
_LOGISTIC_SCALE = _SQRT3 / math.pi
NOISE_STREAM = 0
SIGN_STREAM = 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


NOISE_BLOCK = 1 << 18
"""Elements per noise block: the flattened noise of a tensor is a sequence of blocks, each
drawn from its own generator, so any contiguous range (a shard) can be drawn on its own."""


def block_noise(
    smoothing: Smoothing,
    key: tuple[int, ...],
    shape: torch.Size | tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
    start: int = 0,
    total: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Elements ``[start, start + prod(shape))`` of the flattened noise of a tensor of
    ``total`` elements (default: the whole tensor, ``start = 0``), reshaped to ``shape``.

    Block ``b`` covers flat indices ``[b·B, min((b+1)·B, total))`` (``B = NOISE_BLOCK``) and is
    ``smoothing.fill_`` of a fresh tensor of that length, from a generator seeded with
    ``derive_seed(*key, b)``. Blocks that the range covers entirely are drawn in place; a
    block cut by the range (a shard boundary) is drawn whole and sliced, so every range of
    every tensor sees the same numbers whatever the kernel's draw order. ``generator``: a
    private generator on ``device`` to reseed (default: a new one).
    """
    out = torch.empty(shape, device=device, dtype=dtype)
    count = out.numel()
    total = count if total is None else total
    stop = start + count
    if not 0 <= start <= stop <= total:
        raise ValueError(f"noise range [{start}, {stop}) lies outside a tensor of {total} elements")
    if generator is None:
        generator = torch.Generator(device=device)
    if start == 0 and stop == total <= NOISE_BLOCK:  # one whole block: drawn in place, no views
        if count:
            generator.manual_seed(derive_seed(*key, 0))
            smoothing.fill_(out, generator)
        return out
    flat = out.view(-1)
    if start == 0 and stop == total:  # the whole tensor: its blocks as views of one split
        for block, view in enumerate(flat.split(NOISE_BLOCK)):
            generator.manual_seed(derive_seed(*key, block))
            smoothing.fill_(view, generator)
        return out
    block = start // NOISE_BLOCK
    while block * NOISE_BLOCK < stop:
        first, last = block * NOISE_BLOCK, min((block + 1) * NOISE_BLOCK, total)
        low, high = max(first, start), min(last, stop)
        generator.manual_seed(derive_seed(*key, block))
        if (low, high) == (first, last):
            smoothing.fill_(flat[low - start : high - start], generator)
        else:
            whole = smoothing.fill_(torch.empty(last - first, device=device, dtype=dtype), generator)
            flat[low - start : high - start].copy_(whole[low - first : high - first])
        block += 1
    return out


NOISE_STREAMS = ("blocks", "counter")
"""How ``u`` is generated: ``"blocks"`` (default): :func:`block_noise`, torch's generators
seeded per block of ``NOISE_BLOCK`` elements; ``"counter"``: :func:`counter_noise`, a
counter-based generator, a pure function of (seed, global coordinate)."""

_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
COUNTER_CHUNK = 1 << 22
"""Elements generated per chunk by :func:`counter_noise` (bounds its int64 temporaries)."""


def _as_int64(value: int) -> int:
    """``value mod 2^64`` as a two's-complement int64."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def counter_bits(key: int, start: int, count: int, device: torch.device | str | None = None) -> torch.Tensor:
    """64 random bits per coordinate ``j`` in ``[start, start + count)``: ``mix(key + (j+1)·γ)``.

    This is the ``(j+1)``-th output of SplitMix64 (Steele, Lea & Flood 2014) seeded with
    ``key``, i.e. :func:`_splitmix64` of ``key + j·γ``, as int64 (two's complement) computed
    with wrapping int64 arithmetic and masked right shifts; a counter-based generator: any
    coordinate range, on any device, yields the same bits, and no state is kept.
    """
    z = torch.arange(start, start + count, dtype=torch.int64, device=device)
    return _mix(z.mul_(_as_int64(_GAMMA)).add_(_as_int64(key + _GAMMA)))


def _mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function on int64 (in place)."""
    z.bitwise_xor_((z >> 30).bitwise_and_((1 << 34) - 1))
    z.mul_(_as_int64(_MIX1))
    z.bitwise_xor_((z >> 27).bitwise_and_((1 << 37) - 1))
    z.mul_(_as_int64(_MIX2))
    return z.bitwise_xor_((z >> 31).bitwise_and_((1 << 33) - 1))


def _counter_sample(offset: torch.Tensor, start: int, count: int, law: str, dtype: torch.dtype) -> torch.Tensor:
    """:func:`counter_bits` then the law, with ``offset = key + γ`` a device int64 scalar, so that
    one compiled graph serves every key (:func:`compiled_counter`)."""
    z = torch.arange(start, start + count, dtype=torch.int64, device=offset.device)
    return _counter_law(law, _mix(z.mul_(_as_int64(_GAMMA)).add_(offset)), dtype)


def _counter_shift(
    target: torch.Tensor, target_coefficient: torch.Tensor | float, noise_coefficient: torch.Tensor | float,
    offset: torch.Tensor, start: int, law: str,
) -> torch.Tensor:
    """``target·target_coefficient + noise_coefficient·u`` in place, ``u`` the counter noise of
    ``target``'s coordinates."""
    noise = _counter_sample(offset, start, target.numel(), law, target.dtype).view(target.shape)
    return target.mul_(target_coefficient).add_(noise.mul_(noise_coefficient))


_COMPILED: dict[str, Callable] = {}


def compiled_counter(name: str) -> Callable:
    """``torch.compile(dynamic=True)`` of ``_counter_sample`` (``"sample"``) or ``_counter_shift``
    (``"shift"``), made once per process: the hash, the law and the scaling fuse into one
    kernel (C++ on a CPU, Triton on a GPU) that works for any size."""
    function = _COMPILED.get(name)
    if function is None:
        function = _COMPILED[name] = torch.compile(
            {"sample": _counter_sample, "shift": _counter_shift}[name], dynamic=True
        )
    return function


def _counter_law(name: str, bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Unit-variance noise of law ``name`` from 64 random bits per element.

    ``s1`` = bits 40..63 and ``s2`` = bits 16..39, each a signed 24-bit integer, so
    ``s·2⁻²⁴ + ½`` is uniform on the 2²⁴-point grid of ``[0, 1)`` (torch's ``uniform_``
    resolution). uniform: ``√3·s1·2⁻²³`` on ``[−√3, √3)``; triangular: ``√6·(s1 + s2)·2⁻²⁴``
    (the sum of two uniforms); logistic: ``s·logit(U)`` with ``U = (2·s3 + 1)·2⁻²⁴ + ½`` in
    ``(0, 1)`` (``s3`` = bits 41..63); Gaussian: Box–Muller, ``√(−2 ln U1)·cos(2π·s2·2⁻²⁴)``
    with ``U1 = (s1 + 2²³ + 1)·2⁻²⁴`` in ``(0, 1]``.
    """
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if name == "uniform":
        return (bits >> 40).to(compute).mul_(_SQRT3 * 2.0**-23).to(dtype)
    if name == "triangular":
        return ((bits >> 40) + ((bits << 24) >> 40)).to(compute).mul_(_SQRT6 * 2.0**-24).to(dtype)
    if name == "logistic":
        uniform = ((bits >> 41) * 2 + 1).to(compute).mul_(2.0**-24).add_(0.5)
        return uniform.logit_().mul_(_LOGISTIC_SCALE).to(dtype)
    if name == "gaussian":
        radius = ((bits >> 40) + (2**23 + 1)).to(compute).mul_(2.0**-24).log_().mul_(-2.0).sqrt_()
        angle = ((bits << 24) >> 40).to(compute).mul_(2.0 * math.pi * 2.0**-24)
        return radius.mul_(angle.cos_()).to(dtype)
    raise AssertionError(name)


def counter_noise(
    smoothing: Smoothing,
    key: tuple[int, ...],
    shape: torch.Size | tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
    start: int = 0,
    total: int | None = None,
    compiled: bool = False,
) -> torch.Tensor:
    """Elements ``[start, start + prod(shape))`` of the counter-based noise of a tensor of
    ``total`` elements, reshaped to ``shape`` (the ``"counter"`` stream; same contract as
    :func:`block_noise`).

    Element ``j`` is ``_counter_law(law, counter_bits(derive_seed(*key), j, 1))``: a pure
    function of the seed and the global coordinate, so a shard, a chunk or another device
    regenerates exactly its part (bit for bit for the uniform and triangular laws, which
    use integer arithmetic and one exact multiply; the logistic and Gaussian laws go through
    ``log``/``cos``, whose last bit may differ between CPU and GPU libraries). In eager mode it
    is about 17 operators (on a CPU core several times slower than ``uniform_``); with
    ``compiled=True`` they run as one kernel made by ``torch.compile`` (:func:`compiled_counter`;
    faster than ``uniform_``, see docs/performance.md; bit for bit the eager numbers for the
    uniform and triangular laws, within the last bit of ``log``/``cos`` for the others).
    """
    out = torch.empty(shape, device=device, dtype=dtype)
    count = out.numel()
    total = count if total is None else total
    stop = start + count
    if not 0 <= start <= stop <= total:
        raise ValueError(f"noise range [{start}, {stop}) lies outside a tensor of {total} elements")
    seed = derive_seed(*key)
    if compiled:
        offset = torch.tensor(_as_int64(seed + _GAMMA), dtype=torch.int64, device=device)
        return compiled_counter("sample")(offset, start, count, smoothing.noise, dtype).view(shape)
    if count <= COUNTER_CHUNK:
        return _counter_law(smoothing.noise, counter_bits(seed, start, count, device), dtype).view(shape)
    flat = out.view(-1)
    for first in range(0, count, COUNTER_CHUNK):
        size = min(COUNTER_CHUNK, count - first)
        flat[first : first + size] = _counter_law(smoothing.noise, counter_bits(seed, start + first, size, device), dtype)
    return out


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that mixes integer ``parts`` (order matters) with SplitMix64."""
    state = 0
    for part in parts:
        state = _splitmix64(state ^ (int(part) & _MASK64))
    return state >> 1


def _is_dtensor(tensor: object) -> bool:
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "to_local")


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own shard of a ``DTensor`` (a view: writes reach the DTensor), else ``tensor``."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _shard_rows(param: torch.Tensor) -> tuple[int, int]:
    """``(first row, rows)`` of this rank's shard of a dim-0-sharded ``DTensor``."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tuple(param.placements)  # type: ignore[attr-defined]
    if param.device_mesh.ndim != 1 or placements != (Shard(0),):  # type: ignore[attr-defined]
        raise ValueError(
            f"sharded parameters must be DTensors sharded on dim 0 over a 1-D mesh (FSDP2's default); "
            f"got placements {placements}"
        )
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, placements)  # type: ignore[attr-defined]
    return int(offset[0]), int(shape[0])


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

    def __post_init__(self) -> None:
        if _is_dtensor(self.param):
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
                    by_id[id(param)].owners.append((module, name))
                    owners.setdefault(module, []).append((name, by_id[id(param)]))
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
                   compile_noise=compile_noise)

    def check_trainable(self) -> None:
        """Raise if a perturbed parameter was frozen (``requires_grad=False``) since."""
        frozen = [entry.name for entry in self.tensors if not entry.param.requires_grad]
        if frozen:
            raise ValueError(
                f"perturbed parameters {frozen[:5]} were frozen (requires_grad=False) after the estimator was "
                "built; a frozen parameter must get no gradient: build a new estimator"
            )

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

        FSDP: ``t`` is the rank's local part; it is added to the local shard in place (after
        a copy of the shard is kept) and FSDP modules are resharded, so the forward
        all-gathers the shifted shards; on exit each shard is copied back bit for bit and
        resharded again.
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
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        records = _fsdp_forward_records(self._fsdp_modules)
        try:
            with torch.no_grad():
                self._reshard()
                for entry in self.tensors:
                    local = entry.local_param()
                    saved.append((local, local.clone()))
                    tensor, alpha = shift(entry)
                    local.add_(tensor, alpha=alpha)
            yield
        finally:
            with torch.no_grad():
                for local, original in saved:
                    local.copy_(original)
                self._reshard()
            # FSDP2 records the order of forwards to pick what to prefetch in the next
            # backward; the perturbed forwards have no backward, so forget them (otherwise
            # the next backward prefetches a module it does not need: one wasted all-gather).
            for log, length in records:
                del log[length:]

    def hook_free(self, ready: bool) -> bool:
        """True when a :meth:`shifted` pass with ``ready`` registers no hook and no function mode:
        every tensor is added inside its own layer (what a compiled model can run as is)."""
        plan = self._plan
        assert plan is not None
        return self.sharded or (ready and not plan.needs_check() and len(plan.fast) == len(self.tensors))

    def _reshard(self) -> None:
        for module in self._fsdp_modules:
            module.reshard()  # type: ignore[operator]

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


def eager_compiled_code() -> contextlib.AbstractContextManager:
    """Run code compiled with ``torch.compile`` eagerly inside the block (``torch.compiler.set_stance``;
    torch >= 2.6, else a no-op): for perturbed passes that register hooks or a function mode,
    which a compiled graph would otherwise be recompiled for (and then guard on tensors that
    live for one pass only)."""
    set_stance = getattr(torch.compiler, "set_stance", None) if hasattr(torch, "compiler") else None
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def _shift_by(weight: torch.Tensor, shift: tuple[torch.Tensor, float]) -> torch.Tensor:
    """``weight + alpha·tensor`` in a new tensor."""
    tensor, alpha = shift
    return torch.add(weight, tensor, alpha=alpha)


def _fsdp_forward_records(modules: list[nn.Module]) -> list[tuple[list, int]]:
    """FSDP2's forward-order logs (private attributes; skipped where a version lacks them)."""
    logs: dict[int, list] = {}
    for module in modules:
        get_state = getattr(module, "_get_fsdp_state", None)
        state = get_state() if callable(get_state) else None
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            group = getattr(state, "_fsdp_param_group", None)
            groups = [] if group is None else [group]
        for group in groups:
            for log in (getattr(group, "_post_forward_indices", None),
                        getattr(getattr(group, "comm_ctx", None), "post_forward_order", None)):
                if isinstance(log, list):
                    logs[id(log)] = log
    return [(log, len(log)) for log in logs.values()]


def _is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


class Snapshot:
    """A copy of some tensors, taken with one ``_foreach_copy_`` into storage that is kept
    between calls (reallocated when the tensors change), and put back with another.

    Bit-exact (a copy), one operator each way whatever the number of tensors (running
    statistics of every BatchNorm, say); memory: one copy of the tensors, held by the owner
    (an estimator) between steps.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._storage: list[torch.Tensor] = []
        self.tensors: list[torch.Tensor] = []

    def take(self, tensors: list[torch.Tensor]) -> None:
        key = tuple((id(t), t.shape, t.dtype, t.device) for t in tensors)
        if key != self._key:
            self._storage = [torch.empty_like(t, requires_grad=False) for t in tensors]
            self._key = key
        self.tensors = tensors
        if tensors:
            with torch.no_grad():
                torch._foreach_copy_(self._storage, tensors)

    def restore(self) -> None:
        if self.tensors:
            with torch.no_grad():
                torch._foreach_copy_(self.tensors, self._storage)


class StateGuard:
    """Keeps perturbed passes from changing the model's buffers or the global RNG.

    ``rewind()`` before a pass puts the global RNG back where it was before the STE pass
    (same dropout masks) and restores any buffer a previous pass wrote; ``close()`` leaves
    buffers as the STE pass left them and the RNG as it was after the STE pass.
    ``snapshot``: a :class:`Snapshot` to reuse (an estimator keeps one between steps).
    """

    def __init__(self, model: nn.Module, snapshot: Snapshot | None = None) -> None:
        self._model = model
        self._rng_before = _rng_state()
        self._rng_after: tuple | None = None
        self._snapshot = Snapshot() if snapshot is None else snapshot
        self._taken = False
        self._ddp_sync: list[tuple[nn.Module, bool]] = []

    def after_first_pass(self) -> None:
        """Call after the unperturbed (STE) pass: snapshot its buffers and RNG state.

        DistributedDataParallel wrappers stop broadcasting buffers at each forward until
        :meth:`close`, so perturbed passes issue no collective of their own.
        """
        self._rng_after = _rng_state()
        modules = list(self._model.modules())
        self._snapshot.take(state_buffers(self._model, modules))
        self._taken = True
        for module in modules:
            if isinstance(module, nn.parallel.DistributedDataParallel):
                self._ddp_sync.append((module, module.require_forward_param_sync))
                module.require_forward_param_sync = False

    def rewind(self) -> None:
        _set_rng_state(self._rng_before)
        self._restore_buffers()

    def close(self) -> None:
        self._restore_buffers()
        if self._rng_after is not None:
            _set_rng_state(self._rng_after)
        for module, sync in self._ddp_sync:
            module.require_forward_param_sync = sync
        self._ddp_sync = []

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
        fixed = module.alpha if isinstance(module, WeightQuantizer) and not isinstance(module.alpha, nn.Parameter) else None
        for buffer in module._buffers.values():
            if buffer is None or buffer is fixed or id(buffer) in seen:
                continue
            seen.add(id(buffer))
            buffers.append(buffer)
    return buffers


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
