"""fogzo.diagnose: the STE against the exact smoothed gradient, and the state it must not touch."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fogzo
from fogzo.smoothing import Smoothing


def _model(bits=2, ste="identity", seed=0, dropout=0.0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(dropout), nn.Linear(8, 3))
    return fogzo.quantize(model, fogzo.QuantConfig(bits=bits, ste=ste))


def test_a_loss_linear_in_the_quantized_weights_makes_the_ste_exact():
    """L = Σ a·Q(W): L_s = Σ a·α·h_s(x), whose gradient is the STE's, coordinate for coordinate."""
    torch.manual_seed(0)
    model = fogzo.quantize(nn.Sequential(nn.Linear(5, 4, bias=False)), fogzo.QuantConfig(bits=1, ste="tanh"))
    x, a = torch.randn(7, 5), torch.randn(7, 4)
    report = fogzo.diagnose(model, lambda: (model(x) * a).sum(), coordinates=None, draws=2)
    layer = report.layers[0]
    assert layer.coordinates == layer.numel == 20
    assert layer.cosine == pytest.approx(1.0, abs=1e-6)
    assert layer.reliability == pytest.approx(1.0, abs=1e-6)  # no other weight matters: no noise
    assert layer.norm_ratio == pytest.approx(1.0, abs=1e-5)
    assert layer.sign_agreement == 1.0 and layer.blind_gradient == 0.0


def test_a_nonlinear_loss_shows_ste_bias_and_the_report_is_consistent():
    model = _model(bits=1, ste="hardtanh")
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    report = fogzo.diagnose(model, lambda: F.cross_entropy(model(x), y), coordinates=16, draws=4)
    assert [layer.name for layer in report.layers] == ["0.weight", "3.weight"]
    assert [layer.coordinates for layer in report.layers] == [16, 16]
    assert report.overall.coordinates == 32 and report.overall.numel == 48 + 24
    for layer in (*report.layers, report.overall):
        assert -1.0 <= layer.cosine <= 1.0 and 0.0 <= layer.sign_agreement <= 1.0
        assert layer.cosine_corrected is None or abs(layer.cosine_corrected) >= abs(layer.cosine) - 1e-12
    assert report.overall.cosine < 0.999  # a real network: the STE is not the smoothed gradient
    assert "| all | 32/72 |" in report.table()
    assert report.as_dict()["overall"]["coordinates"] == 32


def test_blind_slope_counts_weights_a_wider_smoothing_sees_and_the_ste_does_not():
    model = _model(bits=2)
    layer = model[0]
    alpha = layer.weight_quantizer.alpha
    # 2-bit levels −2..1: the identity STE's slope is zero for x ≥ 1 and x < −2; a smoothing
    # twice as wide (uniform, half-width 1) still reaches threshold 0.5 from x < 1.5.
    x = torch.full((8, 6), 0.2)
    x[0, :3] = 1.2  # beyond the STE's reach, within the wider smoothing's
    x[1, :2] = 2.0  # beyond both
    with torch.no_grad():
        layer.weight.copy_(x * alpha)
    data = torch.randn(16, 6), torch.randint(0, 3, (16,))
    closure = lambda: F.cross_entropy(model(data[0]), data[1])
    wide = fogzo.diagnose(model, closure, coordinates=None, draws=1, smoothing=Smoothing("uniform", 1 / math.sqrt(3)))
    own = fogzo.diagnose(model, closure, coordinates=None, draws=1)
    assert wide.layers[0].blind_slope == pytest.approx(3 / 48)
    assert own.layers[0].blind_slope == 0.0


def test_diagnose_leaves_parameters_buffers_gradients_rng_and_mode_alone():
    """An instrument changes nothing: BatchNorm statistics, the dropout RNG, .grad (issue 21.1)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
    model = fogzo.quantize(model, fogzo.QuantConfig(bits=2))
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    torch.manual_seed(11)
    rng = torch.get_rng_state()
    fogzo.diagnose(model, lambda: F.cross_entropy(model(x), y), coordinates=8, draws=2)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)


def test_same_seed_same_report_other_seed_other_coordinates():
    model = _model()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    closure = lambda: F.cross_entropy(model(x), y)
    a = fogzo.diagnose(model, closure, coordinates=8, draws=2, seed=1)
    b = fogzo.diagnose(model, closure, coordinates=8, draws=2, seed=1)
    c = fogzo.diagnose(model, closure, coordinates=8, draws=2, seed=2)
    assert a == b
    assert a.overall.cosine != c.overall.cosine


def test_bad_arguments_raise():
    model = _model()
    closure = lambda: model(torch.randn(2, 6)).sum()
    with pytest.raises(ValueError, match="coordinates"):
        fogzo.diagnose(model, closure, coordinates=0)
    with pytest.raises(ValueError, match="draws"):
        fogzo.diagnose(model, closure, draws=0)
