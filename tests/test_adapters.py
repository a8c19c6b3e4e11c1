"""The quantizer-adapter protocol (fogzo.adapters) and the estimators' backward= hook."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fogzo
from fogzo.adapters import FogzoAdapter, adapters, quantizer_views, register_adapter
from fogzo.estimators.base import gradient_scale, run_backward
from fogzo.smoothing import smoothing_for


def _mlp(seed=0, bits=2):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))
    return fogzo.quantize(model, fogzo.QuantConfig(bits=bits))


def _batch(seed=0, size=32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 8, generator=generator), torch.randint(0, 4, (size,), generator=generator)


def _grads(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


# ------------------------------------------------------------------ the protocol


def test_fogzo_adapter_reports_alpha_and_the_ste_smoothing():
    model = _mlp()
    views = quantizer_views(model)
    assert [param for param, _ in views.values()] == [model[0].weight, model[2].weight]
    for layer in (model[0], model[2]):
        _, view = views[id(layer.weight)]
        assert view is layer.weight_quantizer
        assert view.smoothing == smoothing_for("identity")
        assert torch.equal(view.coordinate_scale(), layer.weight_quantizer.alpha)
    assert isinstance(adapters()[0], FogzoAdapter)


class _HalfStepQuantizer(nn.Module):
    """A quantizer written outside fogzo: rounds W/s with an identity STE, s = 0.05·max|W|."""

    def forward(self, weight):
        scale = self.scale(weight)
        x = weight / scale
        return (x + (torch.round(x) - x).detach()) * scale

    @staticmethod
    def scale(weight):
        return 0.05 * weight.detach().abs().amax()


class _TheirLinear(nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.quantizer = _HalfStepQuantizer()

    def forward(self, x):
        return F.linear(x, self.quantizer(self.weight), self.bias)


class _TheirView:
    smoothing = smoothing_for("identity")

    def __init__(self, weight):
        self.weight = weight

    def coordinate_scale(self):
        return _HalfStepQuantizer.scale(self.weight)


class _TheirAdapter:
    def quantized_weights(self, module):
        return {"weight": _TheirView(module.weight)} if isinstance(module, _TheirLinear) else {}

    def quantizer_parameters(self, module):
        return []


def test_a_registered_adapter_makes_foreign_quantizers_perturbable():
    torch.manual_seed(0)
    model = nn.Sequential(_TheirLinear(8, 12), nn.ReLU(), _TheirLinear(12, 4))
    with pytest.raises(ValueError, match="nothing to perturb"):
        fogzo.FOGZO(model, total_steps=10)
    adapter = _TheirAdapter()
    register_adapter(adapter)
    try:
        assert register_adapter(adapter) is adapter and adapters().count(adapter) == 1
        estimator = fogzo.FOGZO(model, total_steps=10, seed=0)
        assert [entry.param for entry in estimator.perturbed.tensors] == [model[0].weight, model[2].weight]
        assert estimator.perturbed.smoothing == smoothing_for("identity")
        x, y = _batch()
        info = estimator.estimate(lambda: F.cross_entropy(model(x), y))
        assert info.differences and all(math.isfinite(d) for d in info.differences)
        # c is the foreign quantizer's step: the perturbed pass moved W by c·ε̄·v.
        entry = estimator.perturbed.tensors[0]
        assert torch.equal(entry.coordinate_scale(0.3), _HalfStepQuantizer.scale(model[0].weight))
    finally:
        fogzo.adapters._ADAPTERS.remove(adapter)
    with pytest.raises(TypeError, match="quantized_weights"):
        register_adapter(object())  # type: ignore[arg-type]


# --------------------------------------------------------------- backward= hook


def test_run_backward_measures_the_factor_a_hook_applies():
    weight = torch.ones(3, requires_grad=True)
    assert run_backward((weight * 2).sum(), None) == 1.0
    assert torch.equal(weight.grad, torch.full((3,), 2.0))
    weight.grad = None
    assert run_backward((weight * 2).sum(), lambda loss: (loss * 8).backward()) == 8.0
    assert torch.equal(weight.grad, torch.full((3,), 16.0))
    assert gradient_scale(lambda loss: (loss / 4).backward(), torch.device("cpu")) == 0.25
    assert gradient_scale(None, torch.device("cpu")) == 1.0
    with pytest.raises(RuntimeError, match="did not back-propagate"):
        run_backward((weight * 2).sum(), lambda loss: None)


@pytest.mark.parametrize(
    "make",
    [
        lambda m, hook: fogzo.STE(m, backward=hook),
        lambda m, hook: fogzo.FOGZO(m, total_steps=10, beta_min=0.5, n=1, seed=3, backward=hook),
        lambda m, hook: fogzo.FOGZO(m, total_steps=10, beta_min=0.5, n=3, seed=3, backward=hook),
        lambda m, hook: fogzo.FOGZO(m, total_steps=10, perturb="all", seed=3, backward=hook),
        lambda m, hook: fogzo.SPSA(m, n=2, seed=3, backward=hook),
    ],
    ids=["ste", "fogzo-n1", "fogzo-n3", "fogzo-all", "spsa"],
)
def test_a_loss_scaling_hook_scales_every_gradient_alike(make):
    """``backward=lambda l: (8·l).backward()`` gives 8× the gradients of the plain estimator.

    8 is a power of two, so STE gradients scale exactly; the zeroth-order part is multiplied
    by the measured k = 8 after being computed from the same (unscaled) losses.
    """
    x, y = _batch()
    plain_model, hooked_model = _mlp(), _mlp()
    calls = []

    def hook(loss):
        calls.append(float(loss.detach()))
        (loss * 8).backward()

    plain = make(plain_model, None)
    hooked = make(hooked_model, hook)
    for _ in range(2):  # two steps: accumulation onto existing .grad is scaled too
        a = plain.estimate(lambda: F.cross_entropy(plain_model(x), y))
        b = hooked.estimate(lambda: F.cross_entropy(hooked_model(x), y))
        assert a.differences == b.differences and a.loss == b.loss
    assert len(calls) == 2
    for g_plain, g_hooked in zip(_grads(plain_model), _grads(hooked_model)):
        assert (g_plain is None) == (g_hooked is None)  # n-SPSA: no gradient for the biases
        if g_plain is not None:
            torch.testing.assert_close(g_hooked, 8 * g_plain, rtol=1e-6, atol=0)
    if a.ste_grad_norm is not None:
        assert b.ste_grad_norm == pytest.approx(a.ste_grad_norm, rel=1e-6)  # reported in loss units


def test_fogzo_on_a_non_finite_ste_gradient_raises_or_keeps_it():
    """A loss-scaling overflow (inf in the STE gradient) must not reach the perturbed passes."""
    x, y = _batch()
    model = _mlp()

    def overflowing(loss):  # like a GradScaler whose scale is too large for one weight's gradient
        (loss + model[0].weight.sum() * float("inf")).backward()

    with pytest.raises(FloatingPointError, match="on_nonfinite='skip'"):
        fogzo.FOGZO(model, total_steps=10, backward=overflowing).estimate(lambda: F.cross_entropy(model(x), y))
    model.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in model.parameters()]
    keep = fogzo.FOGZO(model, total_steps=10, backward=overflowing, on_nonfinite="keep")
    info = keep.estimate(lambda: F.cross_entropy(model(x), y))
    assert info.skipped and info.skip_reason == "ste_gradient" and info.forward_passes == 1
    assert not math.isfinite(info.ste_grad_norm)
    assert not torch.isfinite(model[0].weight.grad).all()  # kept: a GradScaler skips this step
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    model.zero_grad(set_to_none=True)
    skip = fogzo.FOGZO(model, total_steps=10, backward=overflowing, on_nonfinite="skip")
    info = skip.estimate(lambda: F.cross_entropy(model(x), y))
    assert info.skipped and all(p.grad is None for p in model.parameters())  # nothing to apply
    with pytest.raises(RuntimeError, match="finite non-zero factor"):
        fogzo.FOGZO(model, total_steps=10, backward=lambda loss: (loss * 0).backward()).estimate(
            lambda: F.cross_entropy(model(x), y)
        )


def test_fogzo_under_an_amp_grad_scaler_takes_the_same_steps():
    """AMP's GradScaler: the STE pass's loss is scaled by S = 2¹⁰, the optimizer step unscales;
    the zeroth-order part is scaled by the measured S too, so the weights follow the unscaled run
    (bit for bit: S is a power of two)."""
    x, y = _batch()
    plain_model, scaled_model = _mlp(), _mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1_000)
    plain = fogzo.FOGZO(plain_model, total_steps=6, beta_min=0.5, seed=2)
    scaled = fogzo.FOGZO(
        scaled_model, total_steps=6, beta_min=0.5, seed=2, backward=lambda loss: scaler.scale(loss).backward()
    )
    plain_optimizer = torch.optim.SGD(plain_model.parameters(), lr=0.1)
    scaled_optimizer = torch.optim.SGD(scaled_model.parameters(), lr=0.1)
    for _ in range(3):
        plain_optimizer.zero_grad(set_to_none=True)
        plain.estimate(lambda: F.cross_entropy(plain_model(x), y))
        plain_optimizer.step()
        scaled_optimizer.zero_grad(set_to_none=True)
        scaled.estimate(lambda: F.cross_entropy(scaled_model(x), y))
        scaler.step(scaled_optimizer)
        scaler.update()
    assert scaler.get_scale() == 2.0**10  # no overflow, no skipped step
    for a, b in zip(plain_model.parameters(), scaled_model.parameters()):
        assert torch.equal(a, b)
