"""torchao in both directions (docs/integrations.md).

**torchao → fogzo.** A model prepared for QAT by torchao::

    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    quantize_(model, QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=32), step="prepare"))
    estimator = fogzo.FOGZO(model, total_steps=10_000)   # unchanged: fogzo.adapters.TorchaoAdapter

trains with :class:`fogzo.STE`, :class:`fogzo.SPSA` and :class:`fogzo.FOGZO` as it is; the
perturbations are in units of torchao's scale (see :class:`fogzo.adapters.TorchaoIntxView`),
and torchao's own ``QATConfig(base_config, step="convert")`` converts it afterwards.

**fogzo → torchao.** :func:`to_torchao` turns a model quantized with :func:`fogzo.quantize`
into torchao's converted form: each quantized ``Linear``/``Conv2d``/``Embedding`` becomes the
plain layer with an ``IntxUnpackedToInt8Tensor`` weight (what ``QATConfig(IntxWeightOnlyConfig
(...), step="convert")`` produces) holding fogzo's integer levels ``h(W/α)`` exactly, the scale
``α`` and a zero point of 0.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
from torch import nn

from .._optional import require
from ..layers import QuantConv2d, QuantEmbedding, QuantizedLayer, QuantLinear
from ..quantizers import LevelSet

__all__ = ["target_dtype", "to_torchao"]

_PLAIN: dict[type[nn.Module], type[nn.Module]] = {
    QuantLinear: nn.Linear,
    QuantConv2d: nn.Conv2d,
    QuantEmbedding: nn.Embedding,
}


def target_dtype(levels: LevelSet) -> torch.dtype:
    """torchao's ``torch.intN`` whose range ``[−2^(N−1), 2^(N−1) − 1]`` holds ``levels``.

    Sign levels {−1, +1} and ternary levels {−1, 0, 1} need ``torch.int2`` (range [−2, 1]);
    ``intN`` levels are ``torch.intN``.
    """
    for bits in range(1, 9):
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        if low <= levels.low and levels.high <= high:
            return torch.int8 if bits == 8 else getattr(torch, f"int{bits}")
    raise ValueError(f"levels {levels.low}..{levels.high} do not fit in 8 bits")


PACKINGS = ("unpacked", "int4_cpu")


def to_torchao(model: nn.Module, *, packing: str = "unpacked", inplace: bool = False) -> nn.Module:
    """The fake-quantized ``model`` in torchao's converted form (inference).

    Every layer of :func:`fogzo.quantize` (``QuantLinear``, ``QuantConv2d``,
    ``QuantEmbedding``) becomes its plain torch class with a frozen torchao weight holding
    fogzo's integer levels ``q = h(W/α)`` and its scale ``α`` (zero point 0), per channel or
    per tensor, in the latent weight's dtype. Everything else (biases, norms, unquantized
    layers) is left as it is.

    ``packing``:

    * ``"unpacked"`` (default): ``torchao.quantization.IntxUnpackedToInt8Tensor(target_dtype
      = torch.intN)`` for every layer, what ``QATConfig(IntxWeightOnlyConfig(...),
      step="convert")`` produces (int8 storage, the input of torchao's export and lowering
      paths). It dequantizes to ``(q − 0)·α``, the same product of the same two numbers the
      fake-quantized forward computes, so the outputs equal the fake-quantized model's.
    * ``"int4_cpu"``: ``Linear`` layers get torchao's ``Int4OpaqueTensor`` (prototype), which
      runs torch's int4 CPU kernel ``_weight_int4pack_mm_for_cpu`` on packed 4-bit codes
      ``q + 8`` with scale ``α`` per group of input columns and zero 0. Needs levels within
      int4 (sign, ternary, 2-4 bits), ``in_features`` divisible by 32, ``out_features``
      by 16, and a CPU model;
      embeddings and convolutions get the unpacked format. The kernel sums in its own order,
      so outputs agree within floating-point summation error (``tests/test_torchao.py``).

    ``inplace=False`` (default) converts a deep copy. :func:`fogzo.export` writes packed
    codes to a file instead.

    Raises:
        ImportError: torchao is not installed (``pip install 'fogzo[torchao]'``).
        ValueError: no quantized layer; a ``QuantConv1d`` (torchao's tensors have no conv1d);
            a layer that quantizes its input (fogzo's learned activation quantizer has no
            torchao equivalent); a ``Linear`` layer ``"int4_cpu"`` cannot hold.
    """
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
    quantization = require("torchao.quantization", "torchao", "fogzo.to_torchao")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantizedLayer)]
    if not layers:
        raise ValueError("to_torchao() found no quantized layer; prepare the model with fogzo.quantize first")
    for name, layer in layers:
        if type(layer) not in _PLAIN:
            raise ValueError(
                f"{name!r}: {type(layer).__name__} has no torchao equivalent (supported: "
                f"{sorted(cls.__name__ for cls in _PLAIN)})"
            )
        if layer.input_quantizer is not None:
            raise ValueError(
                f"{name!r} quantizes its input (activation_bits); fogzo's learned activation quantizer "
                "has no torchao equivalent"
            )
        if packing == "int4_cpu" and isinstance(layer, QuantLinear):
            _check_int4_cpu(name, layer)
    opaque = None
    if packing == "int4_cpu":
        opaque = require("torchao.prototype.quantization.int4", "torchao", "to_torchao(packing='int4_cpu')")
    if not inplace:
        model = copy.deepcopy(model)
    converted: dict[int, nn.Parameter] = {}
    for module in list(model.modules()):
        if not isinstance(module, QuantizedLayer):
            continue
        quantizer = module.weight_quantizer
        weight = module.weight.detach()
        with torch.no_grad():
            alpha = quantizer.coordinate_scale()  # α clamped positive, as in the forward
            qdata = quantizer.levels.round(weight / alpha).to(torch.int8)
        if opaque is not None and isinstance(module, QuantLinear):
            tensor = _int4_cpu(opaque.Int4OpaqueTensor, qdata, alpha, weight)
        else:
            tensor = _unpacked(quantization.IntxUnpackedToInt8Tensor, qdata, alpha, weight, quantizer.levels)
        source = id(module.weight)
        parameter = nn.Parameter(tensor, requires_grad=False)
        shared = converted.get(source)
        if shared is not None and _same(shared.data, tensor):
            parameter = shared  # a tied weight quantized alike by both layers stays tied
        converted.setdefault(source, parameter)
        cast(nn.Module, module).__class__ = _PLAIN[type(module)]  # no longer a QuantizedLayer
        for attribute in ("weight_quantizer", "input_quantizer", "quantization_enabled"):
            module.__dict__.pop(attribute, None)
            module._modules.pop(attribute, None)
        module.weight = parameter
    return model


def _unpacked(cls, qdata: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor, levels: LevelSet):
    """``IntxUnpackedToInt8Tensor``: one block per output row (per-channel α) or one block."""
    blocks = (1,) * weight.dim()
    if alpha.dim() == 0:
        block_size, scale = tuple(weight.shape), alpha.reshape(blocks)
    else:
        block_size, scale = (1, *weight.shape[1:]), alpha.reshape(weight.shape[0], *blocks[1:])
    return cls(
        qdata=qdata,
        scale=scale.to(weight.dtype).contiguous(),
        zero_point=torch.zeros_like(scale, dtype=torch.int8),
        target_dtype=target_dtype(levels),
        block_size=block_size,
        dtype=weight.dtype,
        activation_quantization=None,
    )


def _int4_group_size(in_features: int) -> int:
    return next(size for size in (128, 64, 32) if in_features % size == 0)


def _check_int4_cpu(name: str, layer: QuantLinear) -> None:
    levels, weight = layer.weight_quantizer.levels, layer.weight
    problems = []
    if levels.low < -8 or levels.high > 7:
        problems.append(f"levels {levels.low}..{levels.high} exceed int4's -8..7")
    if weight.shape[1] % 32:
        problems.append(f"in_features {weight.shape[1]} is not divisible by 32")
    if weight.shape[0] % 16:
        problems.append(f"out_features {weight.shape[0]} is not divisible by 16")
    if weight.device.type != "cpu":
        problems.append(f"the weight is on {weight.device}, not the CPU")
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        problems.append(f"dtype {weight.dtype} is not float32, bfloat16 or float16")
    if problems:
        raise ValueError(f"{name!r} cannot use packing='int4_cpu': {'; '.join(problems)}; use packing='unpacked'")


def _int4_cpu(cls, qdata: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor):
    """``Int4OpaqueTensor``: codes ``q + 8`` (tinygemm's ``(code − 8)·scale + zero``), zero 0."""
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

    rows, columns = weight.shape
    group = _int4_group_size(columns)
    codes = (qdata.to(torch.int32) + 8).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scale = alpha.reshape(-1, 1).expand(rows, columns // group).to(weight.dtype).contiguous()
    scale_and_zero = pack_tinygemm_scales_and_zeros(scale, torch.zeros_like(scale), weight.dtype)
    return cls(qdata=packed, scale_and_zero=scale_and_zero, block_size=[1, group], shape=weight.shape)


def _same(a, b) -> bool:
    if type(a) is not type(b) or a.block_size != b.block_size:
        return False
    names = [name for name in ("qdata", "scale", "zero_point", "scale_and_zero") if hasattr(a, name)]
    return all(torch.equal(getattr(a, name), getattr(b, name)) for name in names)
