"""Surrogate slopes against Monte-Carlo derivatives of the smoothed quantizer (docs/method.md §2)."""

import math

import pytest
import torch

import fogzo
from fogzo.quantizers import level_set
from fogzo.smoothing import NOISE_LAWS, STE_KINDS, Smoothing, smoothing_for


def _slope(smoothing, levels, x):
    return smoothing.surrogate_slope(x, levels.first_threshold, levels.num_thresholds, levels.jump)


@pytest.mark.parametrize("law", sorted(NOISE_LAWS))
def test_noise_law_has_zero_mean_and_unit_variance(law):
    generator = torch.Generator().manual_seed(0)
    samples = NOISE_LAWS[law].sample((400_000,), generator, dtype=torch.float64)
    count = samples.numel()
    # Standard errors: mean ~ 1/sqrt(N); sample variance ~ sqrt((mu4 - 1)/N), mu4 <= 4.2 here.
    assert abs(samples.mean().item()) < 5 / math.sqrt(count)
    assert abs(samples.var().item() - 1.0) < 5 * math.sqrt(3.2 / count)


@pytest.mark.parametrize("law", sorted(NOISE_LAWS))
def test_density_matches_histogram_of_samples(law):
    generator = torch.Generator().manual_seed(1)
    samples = NOISE_LAWS[law].sample((400_000,), generator, dtype=torch.float64)
    edges = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64)
    for low, high in zip(edges[:-1], edges[1:]):
        grid = torch.linspace(low.item(), high.item(), 2001, dtype=torch.float64)
        probability = torch.trapezoid(NOISE_LAWS[law].pdf(grid), grid).item()
        frequency = ((samples >= low) & (samples < high)).double().mean().item()
        std = math.sqrt(probability * (1 - probability) / samples.numel())
        assert abs(frequency - probability) < 5 * std + 1e-4


@pytest.mark.parametrize("ste", sorted(STE_KINDS))
@pytest.mark.parametrize("bits", [1, "ternary", 2, 4])
def test_surrogate_slope_equals_monte_carlo_derivative(ste, bits):
    """d/dx E[h(x + ε̄u)] by common-random-number finite differences over the noise."""
    smoothing = smoothing_for(ste)
    levels = level_set(bits)
    generator = torch.Generator().manual_seed(2)
    noise = smoothing.sample((1_000_000,), generator, dtype=torch.float64) * smoothing.eps_bar
    delta = 0.05
    for x in [-2.7, -1.3, -0.61, -0.2, 0.0, 0.37, 0.8, 1.45, 2.2]:
        upper = levels.round(x + delta + noise)
        lower = levels.round(x - delta + noise)
        per_sample = (upper - lower) / (2 * delta)
        estimate = per_sample.mean().item()
        standard_error = per_sample.std().item() / math.sqrt(per_sample.numel())
        # The finite difference estimates the slope averaged over [x - δ, x + δ].
        grid = torch.linspace(x - delta, x + delta, 4001, dtype=torch.float64)
        expected = torch.trapezoid(_slope(smoothing, levels, grid), grid).item() / (2 * delta)
        assert abs(estimate - expected) < 5 * standard_error + 1e-3, (x, estimate, expected)


def test_spec_table_closed_forms():
    # Grids avoid the exact support edges (a measure-zero set where ε̄√3 rounds either way).
    x = torch.linspace(-1.8, 1.8, 720, dtype=torch.float64)
    sign, int2 = level_set(1), level_set(2)
    torch.testing.assert_close(_slope(smoothing_for("hardtanh"), sign, x), (x.abs() < 1).double())
    torch.testing.assert_close(_slope(smoothing_for("tanh"), sign, x), 1 / torch.cosh(x) ** 2)
    torch.testing.assert_close(_slope(smoothing_for("approxsign"), sign, x), (2 - 2 * x.abs()).clamp_min(0))
    # identity STE on round-and-clip: the clipped identity, slope 1 on (low, high) = (-2, 1)
    x = torch.linspace(-3.2, 2.2, 540, dtype=torch.float64)
    inside = ((x > -2) & (x < 1)).double()
    torch.testing.assert_close(_slope(smoothing_for("identity"), int2, x), inside)


def test_truncated_slope_sum_equals_full_sum_for_unbounded_laws():
    levels = level_set(4)
    x = torch.linspace(-10, 10, 2001, dtype=torch.float64)
    for noise, eps_bar in [("logistic", 0.9069), ("gaussian", 1.3)]:
        smoothing = Smoothing(noise, eps_bar)
        thresholds = torch.arange(levels.num_thresholds, dtype=torch.float64) + levels.first_threshold
        full = smoothing.density(thresholds[:, None] - x[None, :]).sum(0)
        torch.testing.assert_close(_slope(smoothing, levels, x), full, atol=1e-7, rtol=0)


def test_smoothing_rejects_bad_values():
    with pytest.raises(ValueError, match="noise"):
        Smoothing("cauchy", 1.0)
    with pytest.raises(ValueError, match="-0.5"):
        Smoothing("uniform", -0.5)
    with pytest.raises(ValueError, match="nope"):
        fogzo.smoothing_for("nope")


# ------------------------------------------------ edges: integer and half-integer x

_LOGISTIC_SCALE = math.sqrt(3.0) / math.pi


def _unit_cdf(law, u):
    """CDF of the unit-variance noise laws, in closed form (independent of ``NoiseLaw``)."""
    if law == "uniform":
        return ((u + math.sqrt(3.0)) / (2 * math.sqrt(3.0))).clamp(0.0, 1.0)
    if law == "logistic":
        return torch.sigmoid(u / _LOGISTIC_SCALE)
    if law == "triangular":
        r = math.sqrt(6.0)
        low = (u + r).clamp(min=0.0).square() / 12
        high = 1 - (r - u).clamp(min=0.0).square() / 12
        return torch.where(u < 0, low, high).clamp(0.0, 1.0)
    if law == "gaussian":
        return 0.5 * (1 + torch.erf(u / math.sqrt(2.0)))
    raise AssertionError(law)


def _smoothed_quantizer(smoothing, levels, x):
    """``E[h(x + ε̄u)] = h(−∞) + Σ_k J·P(ε̄u ≥ t_k − x)`` in closed form."""
    thresholds = levels.first_threshold + torch.arange(levels.num_thresholds, dtype=torch.float64)
    above = 1 - _unit_cdf(smoothing.noise, (thresholds[:, None] - x[None, :]) / smoothing.eps_bar)
    return -1.0 + 2 * above.sum(0) if levels.is_sign else levels.low + above.sum(0)


@pytest.mark.parametrize("ste", sorted(STE_KINDS))
@pytest.mark.parametrize("bits", [1, "ternary", 2, 4])
def test_slope_at_whole_and_half_points_is_the_left_derivative_of_the_smoothed_quantizer(ste, bits):
    """At x = k and k + ½ (ramp edges of the uniform STEs, the zero-initialised weight x = 0,
    the largest weight x = Q_p under alpha_init="max") the slope is the one-sided derivative
    of E[h(x + ε̄u)] from the left: noise support [−a, a), each edge counted once."""
    smoothing = smoothing_for(ste)
    levels = level_set(bits)
    x = torch.arange(levels.low - 3, levels.high + 3.5, 0.5, dtype=torch.float64)
    delta = 1e-6  # uniform: h_s is linear on [x − δ, x] (its kinks are at multiples of ½), so exact
    left = (_smoothed_quantizer(smoothing, levels, x) - _smoothed_quantizer(smoothing, levels, x - delta)) / delta
    # Truncation error ≤ δ·max|p'|/2 < 1e-6 for the smooth laws; rounding ≈ 1e-16/δ.
    torch.testing.assert_close(_slope(smoothing, levels, x), left, atol=1e-5, rtol=0)
    # The same in float32 (the dtype of weights): the edge decisions do not depend on rounding.
    torch.testing.assert_close(_slope(smoothing, levels, x.float()).double(), left, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ste", sorted(STE_KINDS))
@pytest.mark.parametrize("bits", [1, "ternary", 2, 4])
def test_slope_integrates_to_the_jumps(ste, bits):
    smoothing = smoothing_for(ste)
    levels = level_set(bits)
    reach = smoothing.reach() + 1
    step = 1e-4
    grid = torch.arange(levels.first_threshold - reach, levels.first_threshold + levels.num_thresholds + reach, step,
                        dtype=torch.float64)
    total = torch.trapezoid(_slope(smoothing, levels, grid), grid).item()
    # Each jump of the slope (at most 2 per threshold) costs the trapezoid rule ≤ step·max slope.
    jumps = levels.jump * levels.num_thresholds
    assert abs(total - jumps) < 2 * levels.num_thresholds * step * 2 + 1e-6, (total, jumps)


@pytest.mark.parametrize("half_width", [0.3, 0.5, 1.0, 1.5])
def test_uniform_slope_is_the_full_threshold_sum_on_the_edges(half_width):
    """a ≤ ½ takes the indicator fast path, a > ½ the windowed sum; both equal the plain
    sum Σ_k J·density(t_k − x) over every threshold, on a grid of edges t_k ± a."""
    levels = level_set(3)
    smoothing = Smoothing("uniform", half_width / math.sqrt(3.0))
    assert smoothing.half_width == half_width
    x = torch.arange(-6.0, 6.0, 0.1, dtype=torch.float64)
    x = torch.cat([x, torch.arange(-6.0, 6.0, 0.5, dtype=torch.float64) + half_width % 0.5])
    thresholds = levels.first_threshold + torch.arange(levels.num_thresholds, dtype=torch.float64)
    full = smoothing.density(thresholds[:, None] - x[None, :]).sum(0)
    torch.testing.assert_close(_slope(smoothing, levels, x), full, atol=1e-12, rtol=0)
