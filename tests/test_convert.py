"""quantize(): module swapping, skipping, float mode; quantized layers compute Q(W)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fogzo


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.Identity(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


def test_quantize_swaps_in_place_and_keeps_latent_parameters():
    model = _net()
    before = dict(model.named_parameters())
    reference = copy.deepcopy(model)
    fogzo.quantize(model, fogzo.QuantConfig(bits=2))
    assert isinstance(model[0], fogzo.QuantConv2d) and isinstance(model[4], fogzo.QuantLinear)
    for name, param in model.named_parameters():
        if name in before:
            assert param is before[name]
    x = torch.randn(5, 1, 8, 8)
    with fogzo.full_precision(model):
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert not torch.allclose(model(x), reference(x))
    # the quantized forward equals the reference model run with Q(W) in place of W
    with torch.no_grad():
        for layer, ref in [(model[0], reference[0]), (model[4], reference[4]), (model[6], reference[6])]:
            alpha = layer.weight_quantizer.alpha
            ref.weight.copy_(alpha * layer.weight_quantizer.levels.round(layer.weight / alpha))
    torch.testing.assert_close(model(x), reference(x))


def test_skip_patterns_and_first_last():
    model = fogzo.quantize(_net(), fogzo.QuantConfig(), skip=["6"])
    assert type(model[6]) is nn.Linear and isinstance(model[0], fogzo.QuantConv2d)
    model = fogzo.quantize(_net(), fogzo.QuantConfig(), skip_first_last=True)
    assert type(model[0]) is nn.Conv2d and type(model[6]) is nn.Linear
    assert isinstance(model[4], fogzo.QuantLinear)
    names = [name for name, _ in fogzo.quantized_layers(model)]
    assert names == ["4"]


def test_conv1d_and_embedding():
    torch.manual_seed(0)
    model = nn.ModuleDict({"conv": nn.Conv1d(3, 5, 3), "embed": nn.Embedding(11, 6)})
    fogzo.quantize(model, fogzo.QuantConfig(bits=4, per_channel=True))
    x = torch.randn(2, 3, 9)
    conv = model["conv"]
    expected = F.conv1d(x, conv.weight_quantizer.alpha * conv.weight_quantizer.levels.round(conv.weight / conv.weight_quantizer.alpha), conv.bias)
    torch.testing.assert_close(conv(x), expected)
    embed = model["embed"]
    idx = torch.tensor([[0, 3, 10], [3, 3, 1]])
    alpha = embed.weight_quantizer.alpha
    table = alpha * embed.weight_quantizer.levels.round(embed.weight / alpha)
    torch.testing.assert_close(embed(idx), table[idx])


def test_lsq_alpha_is_a_trainable_parameter_and_gets_gradient():
    model = fogzo.quantize(_net(), fogzo.QuantConfig(bits=2, step_size="lsq", per_channel=True))
    alphas = [name for name, _ in model.named_parameters() if name.endswith("alpha")]
    assert alphas == ["0.weight_quantizer.alpha", "4.weight_quantizer.alpha", "6.weight_quantizer.alpha"]
    model(torch.randn(3, 1, 8, 8)).square().mean().backward()
    assert model[4].weight_quantizer.alpha.grad.shape == (16, 1)


def test_activation_quantization_option():
    model = fogzo.quantize(_net(), fogzo.QuantConfig(bits=2, activation_bits=4))
    assert model[4].input_quantizer is not None
    out = model(torch.randn(3, 1, 8, 8))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 9}, "bits"),
        ({"ste": "magic"}, "magic"),
        ({"noise": "cauchy"}, "cauchy"),
        ({"eps_bar": 0.0}, "eps_bar"),
        ({"step_size": "adaptive"}, "adaptive"),
        ({"alpha_init": "median"}, "median"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fogzo.QuantConfig(**kwargs)
