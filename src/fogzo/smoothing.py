"""Smoothings: one object defines both the STE backward and the zeroth-order noise.

Every straight-through estimator is the derivative of a *smoothed* quantizer (docs/method.md §2)::

    h_s(x) = E_u[ h(x + ε̄ u) ],      u ~ p,  E[u] = 0,  Var[u] = 1,

where ``h`` is the hard quantizer in normalised coordinates ``x = W / α`` (levels one unit
apart, thresholds ``t_k`` between them, jumps ``J_k``). Its derivative — the STE surrogate
slope — is::

    h_s'(x) = Σ_k J_k · p_ε̄(t_k − x),        p_ε̄(z) = p(z / ε̄) / ε̄.

A :class:`Smoothing` is the pair (noise law ``p``, scale ``ε̄``). The STE uses its slope in
the backward pass; n-SPSA and FOGZO perturb along noise drawn from the same ``p`` with the
same ``ε̄``. So all three estimators estimate the gradient of the *same* smoothed loss.

=============  ==================  ==================================  =====================
STE            ε̄                   unit-variance noise                 surrogate
=============  ==================  ==================================  =====================
identity       1/(2√3) ≈ 0.2887    Uniform(−√3, √3)                    clipped identity
hardtanh       1/√3 ≈ 0.5774       Uniform(−√3, √3)                    clip(x, −1, 1) (sign)
tanh           π/√12 ≈ 0.9069      logistic (sech² density)            tanh(x) (sign)
approxsign     1/√6 ≈ 0.4082       triangular on [−√6, √6]             slope 2 − 2|x| (sign)
=============  ==================  ==================================  =====================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["NOISE_LAWS", "STE_KINDS", "NoiseLaw", "Smoothing", "smoothing_for"]

_SQRT3 = math.sqrt(3.0)
_SQRT6 = math.sqrt(6.0)
_LOGISTIC_SCALE = _SQRT3 / math.pi  # logistic scale s with variance s²π²/3 = 1


@dataclass(frozen=True)
class NoiseLaw:
    """A zero-mean, unit-variance noise law on the real line.

    ``support`` is the half-width of the support (``inf`` for unbounded laws); ``tail`` is a
    radius beyond which the density is negligible (< 1e-7 relative), used to truncate sums.
    """

    name: str
    support: float
    tail: float

    def pdf(self, u: torch.Tensor) -> torch.Tensor:
        """Density of the unit-variance law at ``u``."""
        if self.name == "uniform":
            # Half-open support [−√3, √3), as drawn by fill_: adjacent edges never both count.
            return ((u >= -_SQRT3) & (u < _SQRT3)).to(u.dtype) / (2 * _SQRT3)
        if self.name == "logistic":
            z = u / (2 * _LOGISTIC_SCALE)
            return 1.0 / (4 * _LOGISTIC_SCALE * torch.cosh(z).square())
        if self.name == "triangular":
            return (_SQRT6 - u.abs()).clamp_min(0.0) / 6.0
        if self.name == "gaussian":
            return torch.exp(-0.5 * u.square()) / math.sqrt(2 * math.pi)
        raise AssertionError(self.name)

    def zero_bias_pdf(self, u: torch.Tensor) -> torch.Tensor:
        """The zero-bias transform ``ψ(u) = ∫_u^∞ t·p(t) dt`` (a density: ``∫ψ = Var = 1``).

        Two-point SPSA along this law is unbiased for the loss smoothed with ``ψ``, not
        with ``p``: ``E[f(x+εu)·u]/ε = E[f'(x + ε·w)]`` with ``w ~ ψ`` (Stein's identity,
        by parts). Only the Gaussian is its own zero-bias transform; for the uniform law
        ``ψ`` is the Epanechnikov kernel ``(3 − u²)/(4√3)`` on ``[−√3, √3]``.
        """
        if self.name == "uniform":
            return (3.0 - u.square()).clamp_min(0.0) / (4 * _SQRT3)
        if self.name == "gaussian":
            return self.pdf(u)
        if self.name == "logistic":
            a = u.abs()
            s = _LOGISTIC_SCALE
            return a * torch.sigmoid(-a / s) + s * torch.nn.functional.softplus(-a / s)
        if self.name == "triangular":
            a = u.abs().clamp_max(_SQRT6)
            return (_SQRT6**3 / 6 - _SQRT6 * a.square() / 2 + a.pow(3) / 3) / 6.0
        raise AssertionError(self.name)

    def sample(
        self,
        shape: torch.Size | tuple[int, ...],
        generator: torch.Generator,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Draw i.i.d. unit-variance noise of ``shape`` from the private ``generator``."""
        return self.fill_(torch.empty(shape, device=device, dtype=dtype), generator)

    def fill_(self, out: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Overwrite ``out`` with i.i.d. unit-variance noise from ``generator``; returns ``out``."""
        if self.name == "gaussian":
            return out.normal_(generator=generator)
        if self.name == "uniform":
            # One pass: the kernel maps its uniform draw to [−√3, √3) itself.
            return out.uniform_(-_SQRT3, _SQRT3, generator=generator)
        if self.name == "logistic":
            # Inverse CDF s·log(u / (1 − u)); the bounds keep log finite.
            return out.uniform_(1e-7, 1 - 1e-7, generator=generator).logit_().mul_(_LOGISTIC_SCALE)
        if self.name == "triangular":
            out.uniform_(generator=generator)
            second = torch.empty_like(out).uniform_(generator=generator)
            return out.add_(second).sub_(1.0).mul_(_SQRT6)
        raise AssertionError(self.name)


NOISE_LAWS: dict[str, NoiseLaw] = {
    "uniform": NoiseLaw("uniform", support=_SQRT3, tail=_SQRT3),
    "logistic": NoiseLaw("logistic", support=math.inf, tail=10.0),
    "triangular": NoiseLaw("triangular", support=_SQRT6, tail=_SQRT6),
    "gaussian": NoiseLaw("gaussian", support=math.inf, tail=6.0),
}

# STE kind -> (noise law, ε̄ in units of the quantizer step).
STE_KINDS: dict[str, tuple[str, float]] = {
    "identity": ("uniform", 1.0 / (2.0 * _SQRT3)),
    "hardtanh": ("uniform", 1.0 / _SQRT3),
    "tanh": ("logistic", math.pi / math.sqrt(12.0)),
    "approxsign": ("triangular", 1.0 / _SQRT6),
}


@dataclass(frozen=True)
class Smoothing:
    """Noise law ``p`` and scale ``ε̄``: the smoothed quantizer ``E[h(x + ε̄u)]``.

    ``surrogate_slope`` is the STE backward; ``sample`` is the ZO perturbation noise.
    """

    noise: str
    eps_bar: float

    def __post_init__(self) -> None:
        if self.noise not in NOISE_LAWS:
            raise ValueError(f"unknown noise law {self.noise!r}; choose one of {sorted(NOISE_LAWS)}")
        if not (self.eps_bar > 0 and math.isfinite(self.eps_bar)):
            raise ValueError(f"eps_bar must be a positive finite number, got {self.eps_bar!r}")

    @property
    def law(self) -> NoiseLaw:
        return NOISE_LAWS[self.noise]

    @property
    def half_width(self) -> float:
        """``a = ε̄·support``: the scaled noise lives in ``[−a, a)`` (``inf`` if unbounded)."""
        return self.law.support * self.eps_bar

    def density(self, z: torch.Tensor) -> torch.Tensor:
        """Density of the scaled noise ``ε̄u`` at ``z``: ``p(z/ε̄)/ε̄``.

        Uniform noise: ``1/(2a)`` on the half-open ``[−a, a)``, compared in ``z`` itself
        (``z/ε̄`` against ``√3`` would put the edges at the mercy of rounding).
        """
        if self.noise == "uniform":
            a = self.half_width
            return ((z >= -a) & (z < a)).to(z.dtype) / (2 * a)
        return self.law.pdf(z / self.eps_bar) / self.eps_bar

    def sample(
        self,
        shape: torch.Size | tuple[int, ...],
        generator: torch.Generator,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Unit-variance noise ``u`` (not yet multiplied by ``ε̄``)."""
        return self.law.sample(shape, generator, device=device, dtype=dtype)

    def fill_(self, out: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Overwrite ``out`` with unit-variance noise ``u``."""
        return self.law.fill_(out, generator)

    def reach(self) -> float:
        """Distance beyond which a threshold no longer contributes to the slope."""
        return self.law.tail * self.eps_bar

    def surrogate_gradient(
        self, grad: torch.Tensor, x: torch.Tensor, first_threshold: float, num_thresholds: int, jump: float
    ) -> torch.Tensor:
        """``grad · h_s'(x)``: the STE backward (same numbers as ``grad * surrogate_slope(x, ...)``).

        For the clipped identity (uniform noise, ``a = ε̄√3 = ½``, the default STE) the slope
        is ``J`` on ``(first − ½, last + ½]`` and 0 elsewhere, so the product is one
        ``hardtanh_backward`` (which passes ``grad`` where ``lower < x < upper``) with
        ``upper`` just above ``last + ½`` in ``x``'s dtype: one operator instead of five (the
        same numbers for every finite ``x``; where ``x`` is NaN the gradient passes).
        """
        if self.noise == "uniform" and self.half_width == 0.5 and x.dtype in _MANTISSA_BITS:
            lower = first_threshold - 0.5
            upper = first_threshold + num_thresholds - 0.5
            if upper > 0:
                masked = torch.ops.aten.hardtanh_backward(grad, x, lower, _just_above(upper, x.dtype))
                return masked if jump == 1.0 else masked.mul_(jump)
        return grad * self.surrogate_slope(x, first_threshold, num_thresholds, jump)

    def surrogate_slope(
        self, x: torch.Tensor, first_threshold: float, num_thresholds: int, jump: float
    ) -> torch.Tensor:
        """``Σ_k J · p_ε̄(t_k − x)`` for thresholds ``t_k = first_threshold + k``, k < K.

        Only the thresholds within :meth:`reach` of ``x`` are summed, so the cost is
        O(reach) element-wise passes, independent of the number of levels.

        Edges of uniform noise: a threshold counts when ``t_k − x ∈ [−a, a)`` (the support
        of the sampled noise, ``a = ε̄√3``), so the slope is the derivative of the smoothed
        quantizer ``E[h(x + ε̄u)]`` *from the left* everywhere, kinks included. Where two
        ramps meet (thresholds ``2a`` apart, e.g. x = 0 with the identity STE) exactly one
        counts and the slope is 1, not 0 or 2; at the top of the range (x = Q_p, the largest
        weight under ``alpha_init="max"``) the slope is the inner one, 1, so that weight
        can move; at x = low, the bottom of the range, it is 0 (slope 1 only above it).
        """
        if self.noise == "uniform" and self.half_width <= 0.5:
            # At most one threshold lies in [x − a, x + a): an indicator, the fast path.
            a = self.half_width
            height = jump / (2 * a)
            if a == 0.5:
                # The ramps (t_k − a, t_k + a] tile (first − ½, last + ½]: the clipped
                # identity STE (the default), two comparisons and exact at every edge.
                last_threshold = first_threshold + num_thresholds - 1
                inside = (x > first_threshold - a) & (x <= last_threshold + a)
                return inside.to(x.dtype) * height
            # Gaps between the ramps: the candidate is the lowest threshold ≥ x − a.
            index = (x - (first_threshold + a)).ceil_().clamp_(0, num_thresholds - 1)
            offset = index.add_(first_threshold).sub_(x)  # t − x for that threshold
            inside = (offset >= -a) & (offset < a)
            return inside.to(x.dtype) * height
        last_threshold = first_threshold + num_thresholds - 1
        radius = math.ceil(self.reach()) + 1
        base = torch.floor(x - first_threshold) + first_threshold  # threshold just below x
        slope = torch.zeros_like(x)
        for shift in range(-radius + 1, radius + 1):
            threshold = base + shift
            valid = (threshold >= first_threshold) & (threshold <= last_threshold)
            slope += torch.where(valid, self.density(threshold - x), 0.0)
        return slope * jump


_MANTISSA_BITS = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def _just_above(value: float, dtype: torch.dtype) -> float:
    """A float in ``(value, next(value)]`` that rounds to ``next(value)`` in ``dtype`` (``value > 0``).

    ``next(value)`` is the next representable number of ``dtype`` above ``value``; the
    result is ``value`` plus three quarters of ``dtype``'s spacing at ``value``, so a kernel
    comparing in ``dtype`` or in float32/64 sees the same open bound.
    """
    return value + 0.75 * 2.0 ** (math.floor(math.log2(value)) - _MANTISSA_BITS[dtype])


def smoothing_for(ste: str, noise: str | None = None, eps_bar: float | None = None) -> Smoothing:
    """The :class:`Smoothing` of an STE kind, optionally overriding its noise law or ``ε̄``."""
    if ste not in STE_KINDS:
        raise ValueError(f"unknown STE {ste!r}; choose one of {sorted(STE_KINDS)}")
    default_noise, default_eps_bar = STE_KINDS[ste]
    return Smoothing(noise or default_noise, default_eps_bar if eps_bar is None else eps_bar)
