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


# ------------------------------------------------------- torch's own attention layers


def _quantized_copy(module, weights):
    """A float deep copy of ``module`` whose named parameters are replaced by ``weights``."""
    clone = copy.deepcopy(module)
    with torch.no_grad():
        for name, value in weights.items():
            clone.get_parameter(name).copy_(value)
    return clone


def _fake_quantized(model):
    """``{parameter name: Q(W)}`` for every quantized weight of ``model``."""
    result = {}
    for layer_name, layer in fogzo.quantized_layers(model):
        for name, quantizer in layer.quantized_weights():
            full = f"{layer_name}.{name}" if layer_name else name
            result[full] = quantizer(layer.get_parameter(name)).detach()
    return result


def _encoder_layer():
    torch.manual_seed(0)
    return nn.Sequential(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True))


def test_transformer_encoder_layer_attention_is_quantized_on_every_path():
    model = _encoder_layer()
    float_model = copy.deepcopy(model)
    fogzo.quantize(model, fogzo.QuantConfig(bits=2))
    attention = model[0].self_attn
    assert isinstance(attention, fogzo.QuantMultiheadAttention)
    assert isinstance(attention.out_proj, fogzo.QuantLinear)
    weights = _fake_quantized(model)
    assert sorted(weights) == ["0.linear1.weight", "0.linear2.weight", "0.self_attn.in_proj_weight",
                               "0.self_attn.out_proj.weight"]
    reference = _quantized_copy(float_model, weights)  # a float model computing with Q(W)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    expected = reference(x)  # training mode, autograd on: torch's regular path
    torch.testing.assert_close(model(x), expected)
    # Eval mode without autograd: where torch would take its fused kernels
    # (_transformer_encoder_layer_fwd, _native_multi_head_attention), which read weights
    # directly, the quantized model must still compute with Q(W).
    model.eval()
    for context in (torch.inference_mode, torch.no_grad):
        with context():
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    with fogzo.full_precision(model), torch.inference_mode():
        torch.testing.assert_close(model(x), float_model.eval()(x), rtol=1e-5, atol=1e-5)


def test_transformer_encoder_with_padding_mask_in_eval_mode():
    """nn.TransformerEncoder turns a padded batch into a nested tensor for the fused path."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True))
    float_model = copy.deepcopy(model)
    fogzo.quantize(model, fogzo.QuantConfig(bits=2))
    reference = _quantized_copy(float_model, _fake_quantized(model))
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    expected = reference[0](x, src_key_padding_mask=mask)
    model.eval()
    with torch.inference_mode():
        out = model[0](x, src_key_padding_mask=mask)
    keep = ~mask  # padded positions hold no defined value on the fused path
    torch.testing.assert_close(out[keep], expected[keep], rtol=1e-5, atol=1e-5)


def test_attention_with_separate_key_value_dimensions():
    torch.manual_seed(0)
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2, kdim=6, vdim=5, batch_first=True)})
    float_model = copy.deepcopy(model)
    fogzo.quantize(model, fogzo.QuantConfig(bits=4, per_channel=True))
    attention = model["attn"]
    assert [name for name, _ in attention.quantized_weights()] == ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    assert attention.weight_quantizers["k_proj_weight"].alpha.shape == (8, 1)
    reference = _quantized_copy(float_model, _fake_quantized(model))["attn"]
    generator = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 3, 8, generator=generator), torch.randn(2, 4, 6, generator=generator), torch.randn(2, 4, 5, generator=generator)
    out, weights = attention(q, k, v)
    expected, expected_weights = reference(q, k, v)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weights, expected_weights)
    out.sum().backward()  # gradients reach the latent weights through the STE
    assert attention.k_proj_weight.grad is not None and attention.out_proj.weight.grad is not None


def test_quantization_report_lists_converted_and_float_modules():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 16), nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), nn.Linear(16, 2)
    )
    fogzo.quantize(model, fogzo.QuantConfig(bits=2), skip=["2"])
    report = fogzo.quantization_report(model)
    assert [entry.module for entry in report.quantized] == ["0", "1.self_attn", "1.linear1", "1.linear2"]
    assert report.quantized[1].parameters == ("in_proj_weight",)
    floats = {entry.module: entry.detail for entry in report.float_modules}
    assert set(floats) == {"1.norm1", "1.norm2", "2"}
    assert "by design" in floats["1.norm1"] and "skip" in floats["2"]
    text = str(report)
    assert "1.self_attn" in text and "out_proj.weight (16, 16)" in text and "int2" in text


# ------------------------------------------------------------ misuse of quantize()


def test_quantize_twice_raises_unless_the_quantized_layers_are_skipped():
    model = fogzo.quantize(_net(), fogzo.QuantConfig(bits=2), skip=["6"])
    with pytest.raises(ValueError, match="already quantized.*'0'.*int2"):
        fogzo.quantize(model, fogzo.QuantConfig(bits=4))
    # Quantizing the rest differently: skip what is already quantized.
    fogzo.quantize(model, fogzo.QuantConfig(bits=4), skip=["0", "4"])
    assert model[6].weight_quantizer.levels.name == "int4"
    assert model[0].weight_quantizer.levels.name == "int2"


def test_skip_must_be_a_list_and_patterns_must_match():
    with pytest.raises(TypeError, match=r"skip=\['6'\]"):
        fogzo.quantize(_net(), fogzo.QuantConfig(), skip="6")
    with pytest.warns(UserWarning, match="'head' matches no quantizable layer"):
        model = fogzo.quantize(_net(), fogzo.QuantConfig(), skip=["head"])
    assert isinstance(model[6], fogzo.QuantLinear)


def test_layers_left_in_float_are_named_in_a_warning():
    class MyLinear(nn.Linear):
        pass

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), MyLinear(4, 4), nn.Conv3d(1, 2, 1), nn.LayerNorm(4))
    with pytest.warns(UserWarning, match=r"left 2 layer\(s\).*'1' \(MyLinear: subclass of nn.Linear.*'2' \(Conv3d"):
        fogzo.quantize(model, fogzo.QuantConfig())
    floats = {entry.module: entry.detail for entry in fogzo.quantization_report(model).float_modules}
    assert "subclass" in floats["1"] and "not supported" in floats["2"] and "by design" in floats["3"]


def test_export_refuses_quantized_attention_by_name():
    model = _encoder_layer()
    fogzo.quantize(model, fogzo.QuantConfig(bits=2))
    with pytest.raises(ValueError, match="'0.self_attn'.*QuantMultiheadAttention"):
        fogzo.export(model)


# ------------------------------------------------------------ parametrized weights (issue 21, item 8)


class _Scale(nn.Module):
    def forward(self, weight):
        return 2 * weight


def _parametrize(layer, how):
    if how == "weight_norm":
        return torch.nn.utils.parametrizations.weight_norm(layer)
    return torch.nn.utils.parametrize.register_parametrization(layer, "weight", _Scale())


@pytest.mark.parametrize("how", ["weight_norm", "register_parametrization"])
def test_weight_parametrized_before_quantize_stays_float_and_the_warning_names_the_layer(how):
    torch.manual_seed(0)
    model = nn.Sequential(_parametrize(nn.Linear(4, 3), how), nn.ReLU(), nn.Linear(3, 2))
    with pytest.warns(UserWarning, match=r"left 1 layer\(s\).*: '0' \(ParametrizedLinear: weight parametrized") as record:
        fogzo.quantize(model, fogzo.QuantConfig(bits=2))
    assert "parametrizations" not in str(record[0].message)
    floats = {entry.module: entry.detail for entry in fogzo.quantization_report(model).float_modules}
    assert "quantize() converts plain weights only" in floats["0"]
    assert floats["0.parametrizations.weight"] == "holds the parametrized weight of layer '0' (see that layer)"


@pytest.mark.parametrize("how", ["weight_norm", "register_parametrization"])
def test_weight_parametrized_after_quantize_is_refused_in_one_line_naming_the_layer(how):
    torch.manual_seed(0)
    model = fogzo.quantize(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), fogzo.QuantConfig(bits=2))
    _parametrize(model[0], how)
    report = fogzo.quantization_report(model)
    assert [(e.module, e.parameters) for e in report.quantized] == [("0", ("weight",)), ("2", ("weight",))]
    assert "parametrized (torch.nn.utils.parametrize) after quantize(): not supported" in report.quantized[0].detail
    expected = r"^layer '0' \(ParametrizedQuantLinear\): its quantized weight 'weight' is parametrized"
    for make in (lambda: fogzo.FOGZO(model, total_steps=3), lambda: fogzo.SPSA(model, n=1)):
        with pytest.raises(ValueError, match=expected) as error:
            make()
        assert "\n" not in str(error.value)
