"""Tests of the two STE controls (docs/method.md §8): the smoothed-forward (stochastic-rounding)
STE and the noise-matched STE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fogzo
from fogzo.train.build import build_estimator
from fogzo.train.config import TrainConfig

# Standard errors allowed between a Monte-Carlo estimate and its expectation: with fixed seeds the
# tests are deterministic; 5 SE would be exceeded by chance with probability ~6e-7 per coordinate.
Z = 5.0


def _linear_model(eps_bar: float) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 1-bit (sign) 6→4 layer with Gaussian smoothing, and a loss *linear* in ``Q(W)``."""
    torch.manual_seed(0)
    model = fogzo.quantize(
        nn.Sequential(nn.Linear(6, 4)),
        fogzo.QuantConfig(bits=1, ste="tanh", noise="gaussian", eps_bar=eps_bar, alpha_init="max"),
    )
    x, weights = torch.randn(8, 6), torch.randn(8, 4)
    return model, x, weights


def test_smoothed_forward_ste_expects_the_twice_smoothed_gradient_not_grad_ls():
    """For a loss linear in ``Q(W)``, ``∂L/∂Q = a`` is constant, so the STE at the drawn point is
    ``a·h_s'(x + ε̄u)`` and its mean over ``u`` is ``a·(h' ∗ p_ε̄ ∗ p_ε̄)(x)``: with Gaussian noise the
    derivative of the loss smoothed at ``√2·ε̄`` — exactly what SmoothedGradient computes with that
    smoothing — while ``∇L_s`` (smoothing at ``ε̄``) is ``a·(h' ∗ p_ε̄)(x)``, a different vector."""
    eps_bar = 0.5
    model, x, a = _linear_model(eps_bar)
    closure = lambda: (model(x) * a).sum()
    weight = model[0].weight
    alpha = model[0].weight_quantizer.coordinate_scale()

    def oracle(smoothing: fogzo.Smoothing) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        fogzo.SmoothedGradient(model, smoothing=smoothing, seed=0).estimate(closure)
        return weight.grad.clone()

    twice = oracle(fogzo.Smoothing("gaussian", math.sqrt(2.0) * eps_bar))
    once = oracle(fogzo.Smoothing("gaussian", eps_bar))  # ∇L_s
    estimator = fogzo.SmoothedForwardSTE(model, seed=0)
    draws = 2000
    samples = []
    for _ in range(draws):
        model.zero_grad(set_to_none=True)
        estimator.estimate(closure)
        samples.append(weight.grad.clone())
    samples = torch.stack(samples)
    mean, standard_error = samples.mean(0), samples.std(0) / math.sqrt(draws)
    # The oracle's finite differences are float32 losses of size ~|a·x|·α: a few ulps.
    float_error = 1e-4 * float(alpha) * (a.abs().sum(0)[:, None] * x.abs().sum(0)[None, :])
    assert torch.all((mean - twice).abs() <= Z * standard_error + float_error)
    # Not ∇L_s: far outside the same tolerance on most coordinates (without the shift, the STE at x
    # would give ∇L_s exactly and the first assertion would fail).
    assert ((mean - once).abs() > Z * standard_error + float_error).float().mean() > 0.5


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return fogzo.quantize(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)),
                          fogzo.QuantConfig(bits=1, ste="tanh", alpha_init="max", per_channel=True))


def test_smoothed_forward_ste_leaves_parameters_bit_identical():
    model = _mlp()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    closure = lambda: F.cross_entropy(model(x), y)
    fogzo.SmoothedForwardSTE(model, seed=3).estimate(closure)
    shifted = {name: p.grad.clone() for name, p in model.named_parameters()}
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    model.zero_grad(set_to_none=True)
    fogzo.STE(model).estimate(closure)
    # The gradient is taken at the shifted weights: not the plain STE's.
    assert not torch.equal(model[0].weight.grad, shifted["0.weight"])

    def failing() -> torch.Tensor:
        loss = F.cross_entropy(model(x), y)
        raise RuntimeError("closure failed after its forward")

    estimator = fogzo.SmoothedForwardSTE(model, seed=3)
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="closure failed"):
        estimator.estimate(failing)
    assert all(torch.equal(p, before[name]) and p.grad is None for name, p in model.named_parameters())
    assert estimator.state_dict() == {"seed": 3, "step": 0}


def test_noise_matched_ste_variance_matches_fogzos_random_part():
    """FOGZO's ``G_x = d·v`` with ``d = vᵀg_x`` (exact to O(ε²) on smooth parameters) has
    per-coordinate variance ``(1−β)(βr² + 1 − β)‖g_x‖² + (1−β)(3βr² + (1−β)(κ−2))·g_x,j²``
    (κ = E[u⁴]; docs/method.md §8); the noise-matched STE adds noise of exactly the first term.

    The model: the perturbed tensors are a full-precision first layer (84 coordinates, tanh, a
    quantized head), so the STE gradient is the exact gradient and the linearisation holds; β = 0.9
    makes the noise large against float64 rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    config = fogzo.QuantConfig(bits=2, ste="identity", alpha_init="max")
    fogzo.quantize(model, config, skip=["0"])
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    closure = lambda: F.cross_entropy(model(x), y)
    params = list(model[0].parameters())
    beta, eps, r = 0.9, 1e-5, 1.0
    smoothing = config.smoothing  # the identity STE's uniform noise: κ = 9/5
    kurtosis = 1.8
    c = eps / smoothing.eps_bar

    def flat_grad() -> torch.Tensor:
        return torch.cat([p.grad.reshape(-1) for p in params])

    model.zero_grad(set_to_none=True)
    fogzo.STE(model).estimate(closure)
    g_x = c * flat_grad()
    common = (1 - beta) * (beta * r**2 + 1 - beta) * float(g_x.square().sum()) / c**2
    fogzo_predicted = common + (1 - beta) * (3 * beta * r**2 + (1 - beta) * (kurtosis - 2)) * g_x.square() / c**2

    def samples(estimator, draws: int) -> torch.Tensor:
        out = []
        for _ in range(draws):
            model.zero_grad(set_to_none=True)
            estimator.estimate(closure)
            out.append(flat_grad())
        return torch.stack(out)

    draws = 2000
    options = dict(total_steps=10, beta=beta, perturb=params, eps=eps, smoothing=smoothing, seed=1)
    fogzo_g = samples(fogzo.FOGZO(model, **options), draws)
    control = samples(fogzo.NoiseMatchedSTE(model, **options), draws) - g_x / c

    def variance_and_error(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centred = values - values.mean(0)
        variance = centred.square().mean(0)
        fourth = centred.pow(4).mean(0)
        return variance, ((fourth - variance.square()) / draws).sqrt()  # SE of a sample variance

    var_f, se_f = variance_and_error(fogzo_g)
    var_c, se_c = variance_and_error(control)
    assert torch.all((var_c - common).abs() <= Z * se_c)  # the control's noise is what it says
    assert torch.all((var_f - fogzo_predicted).abs() <= Z * se_f)  # FOGZO's variance is the formula
    # The match: the two differ only by the O(g_x,j²) term, a 1/d fraction of the variance.
    assert torch.all((var_f - var_c - (fogzo_predicted - common)).abs() <= Z * (se_f + se_c))
    assert torch.all(control.mean(0).abs() <= Z * control.std(0) / math.sqrt(draws))  # zero mean


def test_noise_matched_ste_is_reproducible_and_resumable():
    model = _mlp()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    closure = lambda: F.cross_entropy(model(x), y)

    def grads(estimator) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        info = estimator.estimate(closure)
        assert info.compute_units == 3 and 0.999 <= info.beta <= 1.0
        return [p.grad.clone() for p in model.parameters()]

    first = fogzo.NoiseMatchedSTE(model, total_steps=100, seed=5)
    grads(first)
    state = first.state_dict()
    expected = grads(first)
    second = fogzo.NoiseMatchedSTE(model, total_steps=100, seed=5)
    second.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, grads(second)))
    model.zero_grad(set_to_none=True)
    fogzo.STE(model).estimate(closure)
    ste = [p.grad.clone() for p in model.parameters()]
    assert not torch.equal(ste[0], expected[0])  # noise was added
    doubled = fogzo.NoiseMatchedSTE(model, total_steps=100, seed=5, noise_scale=2.0)
    doubled.load_state_dict(state)
    for s, e, d in zip(ste, expected, grads(doubled)):  # the same noise, twice as large
        torch.testing.assert_close(d - s, 2 * (e - s), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind, cls", [("ste-sr", fogzo.SmoothedForwardSTE), ("ste-noise", fogzo.NoiseMatchedSTE)])
def test_train_builds_the_controls(kind, cls):
    estimator = build_estimator(TrainConfig(estimator=kind, seed=2), _mlp(), 50)
    assert isinstance(estimator, cls) and estimator.state_dict() == {"seed": 2, "step": 0}
