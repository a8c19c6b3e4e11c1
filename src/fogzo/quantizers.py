"""Quantizers ``Q(W) = α · h(W / α)`` with smoothing-consistent STE backward passes.

``h`` rounds the normalised coordinate ``x = W / α`` to one of a few integer levels:

* ``bits=1``          sign, levels {−1, +1}, one threshold at 0 with jump 2;
* ``bits="ternary"``  levels {−1, 0, 1}, thresholds ±½;
* ``bits=b`` (2..8)   levels −2^(b−1) … 2^(b−1) − 1 (two's-complement range), thresholds at
                      half-integers.

The backward pass of ``Q`` w.r.t. ``W`` is the surrogate slope of the quantizer's
:class:`~fogzo.smoothing.Smoothing` (``∂Q/∂W = h_s'(x)``). With a learned step size (LSQ,
Esser et al. 2020) the gradient w.r.t. ``α`` is ``Σ ∂L/∂Q · (h(x) − x·h_s'(x)) · g`` with
the LSQ gradient scale ``g = 1/√(N·Q_p)`` (``N`` weights share one ``α``, ``Q_p`` is the top
level).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .smoothing import Smoothing

__all__ = [
    "ALPHA_INITS",
    "ActivationQuantizer",
    "LevelSet",
    "WeightQuantizer",
    "fake_quantize",
    "initial_step_size",
    "level_set",
]

ALPHA_INITS = ("mse", "lsq", "max")
_MIN_STEP = 1e-8


@dataclass(frozen=True)
class LevelSet:
    """Integer levels ``low..high`` of a quantizer in normalised coordinates."""

    name: str
    low: int
    high: int

    @property
    def is_sign(self) -> bool:
        return self.name == "sign"

    @property
    def num_levels(self) -> int:
        return 2 if self.is_sign else self.high - self.low + 1

    @property
    def top_level(self) -> int:
        """``Q_p``: the largest positive level."""
        return self.high

    @property
    def first_threshold(self) -> float:
        return 0.0 if self.is_sign else self.low + 0.5

    @property
    def num_thresholds(self) -> int:
        return self.num_levels - 1

    @property
    def jump(self) -> float:
        return 2.0 if self.is_sign else 1.0

    @property
    def code_bits(self) -> int:
        """Bits needed per integer code."""
        return max(1, math.ceil(math.log2(self.num_levels)))

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """The hard quantizer ``h(x)`` (a float tensor holding integer levels)."""
        if self.is_sign:
            return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
        return torch.round(x).clamp(self.low, self.high)

    def to_codes(self, levels: torch.Tensor) -> torch.Tensor:
        """Levels -> unsigned codes ``0..num_levels-1`` (uint8)."""
        if self.is_sign:
            return (levels > 0).to(torch.uint8)
        return (levels - self.low).to(torch.uint8)

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Unsigned codes -> float levels."""
        if self.is_sign:
            return codes.float() * 2.0 - 1.0
        return codes.float() + self.low


def level_set(bits: int | str) -> LevelSet:
    """The :class:`LevelSet` for ``bits`` in {1, "ternary", 2, …, 8}."""
    if bits == "ternary" or bits == 1.58:
        return LevelSet("ternary", -1, 1)
    if bits == 1 and not isinstance(bits, bool):
        return LevelSet("sign", -1, 1)
    if isinstance(bits, int) and not isinstance(bits, bool) and 2 <= bits <= 8:
        return LevelSet(f"int{bits}", -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    raise ValueError(f"unsupported bits={bits!r}; use 1 (sign), 'ternary', or an integer 2..8")


class _FakeQuantize(torch.autograd.Function):
    """``α·h(W/α)`` forward; surrogate-slope backward (see module docstring)."""

    @staticmethod
    def forward(ctx, weight, alpha, levels, smoothing, alpha_grad_scale):
        ctx.save_for_backward(weight, alpha)
        ctx.levels, ctx.smoothing, ctx.alpha_grad_scale = levels, smoothing, alpha_grad_scale
        return _quantize(weight, alpha, levels)

    @staticmethod
    def backward(ctx, grad_output):
        weight, alpha = ctx.saved_tensors
        levels, smoothing = ctx.levels, ctx.smoothing
        x = weight / alpha
        grad_weight = grad_alpha = None
        if ctx.needs_input_grad[1]:
            slope = smoothing.surrogate_slope(x, levels.first_threshold, levels.num_thresholds, levels.jump)
            grad_weight = grad_output * slope if ctx.needs_input_grad[0] else None
            per_element = grad_output * (levels.round(x) - x * slope)
            grad_alpha = _sum_to_shape(per_element, alpha.shape) * ctx.alpha_grad_scale
        elif ctx.needs_input_grad[0]:
            grad_weight = smoothing.surrogate_gradient(
                grad_output, x, levels.first_threshold, levels.num_thresholds, levels.jump
            )
        return grad_weight, grad_alpha, None, None, None


def _quantize(weight: torch.Tensor, alpha: torch.Tensor, levels: LevelSet) -> torch.Tensor:
    """``α·h(W/α)`` as four element-wise operators (two of them in place)."""
    if levels.is_sign:
        return levels.round(weight / alpha).mul_(alpha)
    return torch.div(weight, alpha).round_().clamp(levels.low, levels.high).mul_(alpha)  # (clamp_: no vmap rule)


def _sum_to_shape(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``tensor`` over the dimensions that ``shape`` broadcasts."""
    if tensor.shape == shape:
        return tensor
    if len(shape) == 0:
        return tensor.sum()
    lead = tensor.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, size in enumerate(shape) if size == 1]
    return tensor.sum(dim=dims, keepdim=True).reshape(shape)


def fake_quantize(
    weight: torch.Tensor,
    alpha: torch.Tensor,
    levels: LevelSet,
    smoothing: Smoothing,
    alpha_grad_scale: float = 1.0,
) -> torch.Tensor:
    """``α·h(W/α)`` with the surrogate-slope STE; ``α`` broadcasts against ``weight``.

    Without autograd (``torch.no_grad`` or nothing requiring grad) this is a plain
    element-wise expression, so perturbed forward passes skip the autograd machinery and
    can run under ``torch.func.vmap``.
    """
    if torch.is_grad_enabled() and (weight.requires_grad or alpha.requires_grad):
        return _FakeQuantize.apply(weight, alpha, levels, smoothing, alpha_grad_scale)
    return _quantize(weight, alpha, levels)


def initial_step_size(
    weight: torch.Tensor,
    levels: LevelSet,
    rule: str = "lsq",
    per_channel: bool = False,
    *,
    name: str | None = None,
) -> torch.Tensor:
    """A step size ``α`` from weight statistics (per tensor, or per slice along dim 0).

    * ``"max"``: ``max|W| / Q_p``, the whole range representable;
    * ``"lsq"``: ``2·mean|W| / √Q_p`` (the LSQ initialisation);
    * ``"mse"``: ``argmin_α ‖α·h(W/α) − W‖²`` over a grid of 100 candidates in
      ``(0, max|W|/Q_p]`` (closed form ``mean|W|`` for sign).

    A tensor (or, per channel, a slice) whose weights are all zero, e.g. a zero-initialised
    residual branch, has no scale to measure: it gets ``α = 1/(√fan_in·Q_p)`` instead, the
    ``"max"`` rule applied to the range ``±1/√fan_in`` of PyTorch's default initialisation
    of Linear and Conv layers (``fan_in = numel / shape[0]``). A wholly zero tensor also
    warns, naming ``name``; single zero channels (an embedding's padding row) do not.
    Returns a tensor of shape ``()`` or ``(C, 1, …, 1)``.
    """
    if rule not in ALPHA_INITS:
        raise ValueError(f"unknown alpha_init {rule!r}; choose one of {ALPHA_INITS}")
    w = weight.detach().float()
    groups = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    magnitude = groups.abs()
    if rule == "max":
        alpha = magnitude.amax(dim=1) / levels.top_level
    elif rule == "lsq":
        alpha = 2 * magnitude.mean(dim=1) / math.sqrt(levels.top_level)
    elif levels.is_sign:
        alpha = magnitude.mean(dim=1)
    else:
        largest = magnitude.amax(dim=1) / levels.top_level
        best_error = torch.full_like(largest, math.inf)
        alpha = largest.clone()
        for fraction in torch.linspace(0.01, 1.0, 100).tolist():
            candidate = (largest * fraction).clamp_min(_MIN_STEP)[:, None]
            error = (levels.round(groups / candidate) * candidate - groups).square().sum(dim=1)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            alpha = torch.where(better, candidate[:, 0], alpha)
    fan_in = max(w[0].numel(), 1) if w.dim() > 1 else 1
    fallback = 1.0 / (math.sqrt(fan_in) * levels.top_level)
    empty = magnitude.amax(dim=1) == 0
    if not w.is_meta and bool(empty.all()):
        warnings.warn(
            f"{name or 'weight'}: all weights are zero, so alpha_init={rule!r} has no scale to measure; "
            f"using alpha = 1/(sqrt(fan_in)*Q_p) = {fallback:.4g} (fan_in {fan_in}, Q_p {levels.top_level}). "
            "Initialise the weights first, or set the weight quantizer's alpha yourself",
            stacklevel=3,
        )
    alpha = torch.where(empty, torch.full_like(alpha, fallback), alpha).clamp_min(_MIN_STEP)
    if per_channel:
        return alpha.reshape(-1, *([1] * (weight.dim() - 1))).to(weight.dtype)
    return alpha.reshape(()).to(weight.dtype)


class WeightQuantizer(nn.Module):
    """Fake-quantizes a latent weight: ``Q(W) = α·h(W/α)``.

    ``α`` is a buffer (``learned=False``: fixed at initialisation) or a parameter
    (``learned=True``: LSQ, gradient scaled by ``1/√(N·Q_p)``), kept at 1e-8 or more: a
    learned ``α`` is clamped in every forward pass (differentiably); a fixed one is clamped
    where it is set (initialisation, ``load_state_dict``), so the hot path reads the buffer
    as it is (write a positive value if you set it by hand).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        levels: LevelSet,
        smoothing: Smoothing,
        *,
        learned: bool = False,
        per_channel: bool = False,
        alpha_init: str = "lsq",
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.levels = levels
        self.smoothing = smoothing
        self.per_channel = per_channel
        alpha = initial_step_size(weight, levels, alpha_init, per_channel, name=name)
        if learned:
            self.alpha = nn.Parameter(alpha)
        else:
            self.register_buffer("alpha", alpha)
        elements_per_step = weight.numel() // max(alpha.numel(), 1)
        self.alpha_grad_scale = 1.0 / math.sqrt(elements_per_step * levels.top_level)

    @property
    def learned(self) -> bool:
        return isinstance(self.alpha, nn.Parameter)

    def step_size(self) -> torch.Tensor:
        """``α`` clamped positive (differentiable where ``α`` is learned; a fixed ``α`` is the buffer)."""
        if isinstance(self.alpha, nn.Parameter):
            return self.alpha.clamp_min(_MIN_STEP)
        return self.alpha

    def coordinate_scale(self) -> torch.Tensor:
        """The scale ``c`` of the normalised coordinates ``x = W/c`` (detached ``α``; a fixed
        ``α`` is the buffer itself: read it, do not write it)."""
        if isinstance(self.alpha, nn.Parameter):
            return self.alpha.detach().clamp_min(_MIN_STEP)
        return self.alpha

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if not isinstance(self.alpha, nn.Parameter):
            with torch.no_grad():
                self.alpha.clamp_(min=_MIN_STEP)  # what the forward's clamp did before

    def forward(self, weight: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        alpha = self.step_size() if alpha is None else alpha
        return fake_quantize(weight, alpha, self.levels, self.smoothing, self.alpha_grad_scale)

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Unsigned integer codes (uint8) of ``h(W/α)``."""
        with torch.no_grad():
            return self.levels.to_codes(self.levels.round(weight / self.coordinate_scale()))

    def extra_repr(self) -> str:
        kind = "learned" if self.learned else "fixed"
        grain = "per-channel" if self.per_channel else "per-tensor"
        return f"levels={self.levels.name}, {kind} {grain} alpha, smoothing={self.smoothing}"


class ActivationQuantizer(nn.Module):
    """LSQ activation quantizer: learned per-tensor ``α`` initialised from the first batch.

    ``α`` starts at ``2·mean|x| / √Q_p`` on the first forward pass in training mode.
    """

    initialized: torch.Tensor

    def __init__(self, levels: LevelSet, smoothing: Smoothing) -> None:
        super().__init__()
        self.levels = levels
        self.smoothing = smoothing
        self.alpha = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))
        self._seen_initialized = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Until a Python flag has seen it done once, ``α`` is set from this batch where
        # ``initialized`` is False, with ``torch.where`` rather than a host read of the flag:
        # no host sync and no data-dependent branch, so a fresh model compiles with
        # ``fullgraph=True``; later forwards skip the initialisation altogether.
        if not self._seen_initialized:
            with torch.no_grad():
                first = (2 * x.detach().abs().mean() / math.sqrt(self.levels.top_level)).to(self.alpha.dtype)
                self.alpha.copy_(torch.where(self.initialized, self.alpha, first.clamp_min(_MIN_STEP)))
                self.initialized.fill_(True)
            self._seen_initialized = True
        per_example = x.numel() // x.shape[0] if x.dim() and x.shape[0] else x.numel()
        scale = 1.0 / math.sqrt(max(per_example, 1) * self.levels.top_level)
        return fake_quantize(x, self.alpha.clamp_min(_MIN_STEP), self.levels, self.smoothing, scale)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._seen_initialized = False  # read the loaded flag at the next forward

    def extra_repr(self) -> str:
        return f"levels={self.levels.name}, smoothing={self.smoothing}"
