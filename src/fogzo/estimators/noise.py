"""Deterministic noise ``u``: seeds, the block stream and the counter (SplitMix64) stream.

``u`` of sample ``i`` at step seed ``s`` is one vector over the perturbed tensors laid end to
end (:meth:`fogzo.estimators.perturbed_set.PerturbedSet.noises`), drawn block by block of
``NOISE_BLOCK`` elements from private ``torch.Generator`` s seeded with
``derive_seed(s, 0, i, block)`` (:func:`block_noise`, the default ``"blocks"`` stream), or
computed as a pure function of the seed and the global coordinate (:func:`counter_noise`, the
``"counter"`` stream): reproducible, independent of the global RNG, different for every tensor,
defined by global coordinates (a shard draws only its own part), and regenerated rather than
stored where an estimator needs it again (docs/method.md §7).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..smoothing import Smoothing

__all__ = [
    "COUNTER_CHUNK",
    "NOISE_BLOCK",
    "NOISE_STREAMS",
    "block_noise",
    "counter_bits",
    "counter_noise",
    "derive_seed",
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


_COMPILED: dict[str, Callable] = {}


def compiled_counter() -> Callable:
    """``torch.compile(dynamic=True)`` of ``_counter_sample``, made once per process: the hash
    and the law fuse into one kernel (C++ on a CPU, Triton on a GPU) that works for any size."""
    function = _COMPILED.get("sample")
    if function is None:
        function = _COMPILED["sample"] = torch.compile(_counter_sample, dynamic=True)
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
        return compiled_counter()(offset, start, count, smoothing.noise, dtype).view(shape)
    if count <= COUNTER_CHUNK:
        return _counter_law(smoothing.noise, counter_bits(seed, start, count, device), dtype).view(shape)
    flat = out.view(-1)
    for first in range(0, count, COUNTER_CHUNK):
        size = min(COUNTER_CHUNK, count - first)
        flat[first : first + size] = _counter_law(
            smoothing.noise, counter_bits(seed, start + first, size, device), dtype
        )
    return out


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that mixes integer ``parts`` (order matters) with SplitMix64."""
    state = 0
    for part in parts:  # state = _splitmix64(state ^ part), inlined (a few calls per noise tensor and step)
        value = ((state ^ (int(part) & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = value ^ (value >> 31)
    return state >> 1
