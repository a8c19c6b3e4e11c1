"""Quantizers: levels, STE gradients equal the surrogate rule, LSQ step-size gradient."""

import math
import warnings

import pytest
import torch

from fogzo.quantizers import ActivationQuantizer, WeightQuantizer, fake_quantize, initial_step_size, level_set
from fogzo.smoothing import Smoothing, smoothing_for


@pytest.mark.parametrize(
    "bits, low, high",
    [(1, -1, 1), ("ternary", -1, 1), (2, -2, 1), (3, -4, 3), (4, -8, 7), (8, -128, 127)],
)
def test_level_sets(bits, low, high):
    levels = level_set(bits)
    x = torch.linspace(-300, 300, 6001)
    q = levels.round(x)
    assert q.min().item() == low and q.max().item() == high
    if bits == 1:
        assert set(q.unique().tolist()) == {-1.0, 1.0}
    else:
        assert torch.equal(q, torch.round(x).clamp(low, high))
    assert torch.equal(levels.from_codes(levels.to_codes(q)), q)


@pytest.mark.parametrize("bits", [0, 9, 1.5, "two", True, None])
def test_unsupported_bits_raise(bits):
    with pytest.raises(ValueError, match="bits"):
        level_set(bits)


# Closed forms of the STE rules, written independently of Smoothing.surrogate_slope.
def _identity_rule(x, levels):  # clipped identity on (low, high)
    return ((x > levels.low) & (x < levels.high)).double()


_RULES = {
    ("identity", "int2"): _identity_rule,
    ("identity", "int4"): _identity_rule,
    ("identity", "ternary"): _identity_rule,
    ("hardtanh", "sign"): lambda x, levels: (x.abs() < 1).double(),
    ("tanh", "sign"): lambda x, levels: 1 / torch.cosh(x) ** 2,
    ("approxsign", "sign"): lambda x, levels: (2 - 2 * x.abs()).clamp_min(0),
}


@pytest.mark.parametrize("ste, level_name", sorted(_RULES))
def test_ste_gradient_equals_surrogate_rule(ste, level_name):
    bits = {"int2": 2, "int4": 4, "ternary": "ternary", "sign": 1}[level_name]
    levels = level_set(bits)
    alpha = torch.tensor(0.37, dtype=torch.float64)
    weight = (torch.linspace(-10, 10, 1999, dtype=torch.float64) * alpha).requires_grad_()
    upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = fake_quantize(weight, alpha, levels, smoothing_for(ste))
    torch.testing.assert_close(out.detach(), alpha * levels.round(weight.detach() / alpha))
    (out * upstream).sum().backward()
    expected = upstream * _RULES[(ste, level_name)](weight.detach() / alpha, levels)
    torch.testing.assert_close(weight.grad, expected)


def test_multilevel_logistic_gradient_is_sum_of_sech2_bumps():
    levels = level_set(3)
    smoothing = smoothing_for("tanh")  # logistic noise, ε̄u ~ logistic(scale 1/2)
    weight = torch.linspace(-6, 6, 1201, dtype=torch.float64).requires_grad_()
    fake_quantize(weight, torch.tensor(1.0, dtype=torch.float64), levels, smoothing).sum().backward()
    thresholds = torch.arange(-3.5, 3.0, 1.0, dtype=torch.float64)
    # density of logistic(scale 1/2) is sech²(z)/2, so each threshold contributes sech²(t - x)/2
    expected = (1 / torch.cosh(thresholds[:, None] - weight.detach()[None]) ** 2 / 2).sum(0)
    torch.testing.assert_close(weight.grad, expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_step_size_gradient(per_channel):
    levels = level_set(2)
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    quantizer = WeightQuantizer(latent, levels, smoothing_for("identity"), learned=True, per_channel=per_channel)
    upstream = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    (quantizer(latent) * upstream).sum().backward()
    alpha = quantizer.alpha.detach()
    x = latent / alpha
    inside = ((x > -2) & (x < 1)).double()
    per_element = upstream * (levels.round(x) - x * inside)
    group = 5 if per_channel else 30
    expected = per_element.sum(1, keepdim=True) if per_channel else per_element.sum()
    torch.testing.assert_close(quantizer.alpha.grad, expected / math.sqrt(group * levels.top_level))


def test_step_size_rules():
    weight = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    sign, int2 = level_set(1), level_set(2)
    torch.testing.assert_close(initial_step_size(weight, sign, "mse"), weight.abs().mean())
    torch.testing.assert_close(initial_step_size(weight, int2, "max"), weight.abs().max() / 1)
    torch.testing.assert_close(initial_step_size(weight, int2, "lsq"), 2 * weight.abs().mean())

    def error(alpha):
        return (int2.round(weight / alpha) * alpha - weight).square().sum()

    mse = initial_step_size(weight, int2, "mse")
    assert error(mse) <= error(initial_step_size(weight, int2, "max"))
    assert error(mse) <= error(initial_step_size(weight, int2, "lsq"))
    per_channel = initial_step_size(weight, int2, "mse", per_channel=True)
    assert per_channel.shape == (64, 1)
    assert error(per_channel) <= error(mse)
    with pytest.raises(ValueError, match="median"):
        initial_step_size(weight, int2, "median")


def test_activation_quantizer_initialises_from_first_batch_and_learns():
    quantizer = ActivationQuantizer(level_set(4), Smoothing("uniform", 1 / (2 * math.sqrt(3))))
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    out = quantizer(x)
    assert bool(quantizer.initialized)
    torch.testing.assert_close(quantizer.alpha.detach(), 2 * x.abs().mean() / math.sqrt(7))
    levels = (out / quantizer.alpha.detach()).round()
    torch.testing.assert_close(out, levels * quantizer.alpha.detach())
    out.sum().backward()
    assert quantizer.alpha.grad is not None and torch.isfinite(quantizer.alpha.grad)


# ------------------------------------------- zero weights and the edges of the range


@pytest.mark.parametrize("per_channel", [False, True])
def test_all_zero_weights_warn_and_get_a_usable_step_size(per_channel):
    weight = torch.zeros(6, 5)
    with pytest.warns(UserWarning, match="layer7: all weights are zero"):
        alpha = initial_step_size(weight, level_set(2), "lsq", per_channel, name="layer7")
    fallback = 1 / (math.sqrt(5) * 1)  # 1/(√fan_in·Q_p), Q_p = 1 for 2 bits
    torch.testing.assert_close(alpha, torch.full((6, 1) if per_channel else (), fallback))
    if per_channel:  # one zero row (an embedding's padding row): that row falls back, silently
        weight[1:] = torch.linspace(-1.0, 1.0, 25).reshape(5, 5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            alpha = initial_step_size(weight, level_set(2), "lsq", per_channel, name="layer7")
        assert alpha[0, 0].item() == pytest.approx(fallback)
        torch.testing.assert_close(alpha[1:, 0], 2 * weight[1:].abs().mean(1))


def test_zero_initialised_layer_moves_under_ste_training():
    """x = W/α = 0 sits where two ramps of the identity STE meet: slope 1, not 0."""
    from torch import nn

    import fogzo

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    nn.init.zeros_(model[2].weight)
    with pytest.warns(UserWarning, match="'?2'?.*zero"):
        fogzo.quantize(model, fogzo.QuantConfig(bits=2))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    estimator = fogzo.STE(model)
    for _ in range(5):
        optimizer.zero_grad(set_to_none=True)
        estimator.estimate(lambda: torch.nn.functional.cross_entropy(model(x), y))
        optimizer.step()
    assert model[2].weight.abs().max() > 0
    quantized = model[2].weight_quantizer(model[2].weight)
    assert quantized.abs().max() > 0  # some weights changed level: the layer now computes


def test_largest_weight_under_max_rule_gets_a_gradient():
    """alpha_init="max" puts the largest weight at x = Q_p exactly, the top of the range."""
    levels = level_set(2)
    weight = torch.tensor([[-0.3, 0.1, 0.7, 0.25]], requires_grad=True)
    quantizer = WeightQuantizer(weight.detach(), levels, smoothing_for("identity"), alpha_init="max")
    assert (weight.detach() / quantizer.alpha).max().item() == 1.0
    quantizer(weight).sum().backward()
    assert weight.grad[0, 2].item() == 1.0


# ------------------------------------------------------------------- the hot path


def _neighbours(x):
    """``x`` and the next representable numbers below and above it, in ``x``'s dtype (finite ones)."""
    if x.dtype in (torch.bfloat16, torch.float16):
        bits = x.view(torch.int16).int()
        step = torch.where(x >= 0, 1, -1)
        moved = [((bits + sign * step) & 0xFFFF).to(torch.int32) for sign in (1, -1)]
        out = torch.cat([x, *[torch.where(m >= 2**15, m - 2**16, m).to(torch.int16).view(x.dtype) for m in moved]])
    else:
        out = torch.cat([x, torch.nextafter(x, torch.full_like(x, math.inf)),
                         torch.nextafter(x, torch.full_like(x, -math.inf))])
    return out[torch.isfinite(out)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [1, "ternary", 2, 4, 8])
def test_one_operator_ste_backward_equals_grad_times_slope_at_every_edge(bits, dtype):
    """The identity STE's backward is one hardtanh_backward with its upper bound just above the
    last ramp's end: the same numbers as grad · h_s'(x), on the half-open edges too (for every
    finite x; a NaN weight passes its gradient through instead of zeroing it)."""
    levels, smoothing = level_set(bits), smoothing_for("identity")
    low_edge = levels.first_threshold - 0.5
    edges = torch.tensor([low_edge + k / 2 for k in range(-3, 2 * levels.num_thresholds + 4)], dtype=torch.float64)
    x = _neighbours(torch.cat([torch.linspace(-300, 300, 6001, dtype=torch.float64), edges]).to(dtype))
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    args = (levels.first_threshold, levels.num_thresholds, levels.jump)
    fast = smoothing.surrogate_gradient(grad, x, *args)
    assert torch.equal(fast, grad * smoothing.surrogate_slope(x, *args))
    assert fast.dtype == dtype
    # At the ends of the range: x = low gets no gradient, x = high does (left derivatives).
    ends = torch.tensor([levels.first_threshold - 0.5, levels.first_threshold + levels.num_thresholds - 0.5], dtype=dtype)
    assert smoothing.surrogate_gradient(torch.ones(2, dtype=dtype), ends, *args).tolist() == [0.0, levels.jump]


def test_fixed_step_size_is_read_as_is_and_clamped_when_loaded():
    """A fixed α is the buffer itself in the forward (no clamp per call); loading a state dict
    clamps it as the forward's clamp did; a learned α is still clamped in every forward."""
    levels, smoothing = level_set(2), smoothing_for("identity")
    weight = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    fixed = WeightQuantizer(weight, levels, smoothing)
    assert fixed.step_size() is fixed.alpha and fixed.coordinate_scale() is fixed.alpha
    fixed.load_state_dict({"alpha": torch.tensor(-1.0)})
    assert fixed.alpha.item() == pytest.approx(1e-8)
    learned = WeightQuantizer(weight, levels, smoothing, learned=True)
    with torch.no_grad():
        learned.alpha.fill_(-1.0)
    assert learned.step_size().item() == pytest.approx(1e-8) and learned.coordinate_scale().item() == pytest.approx(1e-8)


def test_activation_quantizer_reads_its_flag_on_the_host_once():
    """After the first forward the initialised flag is a Python attribute (no host sync, no graph
    break); a loaded state dict is read again at the next forward."""
    quantizer = ActivationQuantizer(level_set(4), smoothing_for("identity"))
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    quantizer(x)
    alpha = quantizer.alpha.detach().clone()
    state = quantizer.state_dict()
    fresh = ActivationQuantizer(level_set(4), smoothing_for("identity"))
    fresh.load_state_dict(state)
    fresh(2 * x)  # initialised: α stays the loaded one
    torch.testing.assert_close(fresh.alpha.detach(), alpha)
    with torch.profiler.profile() as prof:
        quantizer(x)
    assert not [e for e in prof.events() if e.name in ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero")]


def test_activation_quantizer_first_forward_sets_alpha_only_where_not_initialized():
    """The eager initialisation (branch-free since it compiles with fullgraph=True) sets
    ``α = max(2·mean|x|/√Q_p, 1e-8)`` on a fresh quantizer, keeps a loaded ``α``, and runs once."""
    smoothing = Smoothing("uniform", 1 / (2 * math.sqrt(3)))
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    fresh = ActivationQuantizer(level_set(4), smoothing)
    fresh(x)
    assert torch.equal(fresh.alpha.detach(), (2 * x.abs().mean() / math.sqrt(7)).clamp_min(1e-8))
    fresh(3 * x)  # later batches do not move α
    assert torch.equal(fresh.alpha.detach(), (2 * x.abs().mean() / math.sqrt(7)).clamp_min(1e-8))
    zeros = ActivationQuantizer(level_set(4), smoothing)
    zeros(torch.zeros(4, 3))
    assert zeros.alpha.item() == pytest.approx(1e-8)
    loaded = ActivationQuantizer(level_set(4), smoothing)
    loaded.load_state_dict({"alpha": torch.tensor(0.25), "initialized": torch.tensor(True)})
    loaded(x)
    assert loaded.alpha.item() == 0.25 and bool(loaded.initialized)
