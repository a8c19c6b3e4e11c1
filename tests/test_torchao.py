"""torchao in both directions: torchao QAT models under fogzo's estimators, fogzo models to torchao."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fogzo
from fogzo.adapters import TorchaoIntxView, quantizer_views
from fogzo.smoothing import smoothing_for

torchao = pytest.importorskip(
    "torchao", reason="torchao is an optional extra (pip install 'fogzo[torchao]'); `make test` installs it"
)
from torchao.quantization import IntxWeightOnlyConfig, quantize_  # noqa: E402
from torchao.quantization.granularity import PerGroup  # noqa: E402
from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig, initialize_fake_quantizers  # noqa: E402


def _prepare(model, weight_config, embeddings=False):
    # Exact types: fogzo's QuantLinear is an nn.Linear too, and torchao would re-wrap it.
    types = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    quantize_(model, QATConfig(weight_config=weight_config, step="prepare"), filter_fn=lambda m, name: type(m) in types)
    return model


def _classifier(seed=0, dtype=torch.float32):
    """Embedding(16, 16) of 4 tokens -> 64 -> Linear -> 64 -> ReLU -> Linear -> 4 classes."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Embedding(16, 16), nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)
    ).to(dtype)


def _tokens(seed=0, size=128):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 16, (size, 4), generator=generator)
    return x, (x[:, 0] + x[:, 3]) % 4  # a target the model can learn


CONFIGS = {
    "int4-group16": lambda: IntxFakeQuantizeConfig(torch.int4, group_size=16),
    "int4-per-channel": lambda: IntxFakeQuantizeConfig(torch.int4, "per_channel"),
    "int2-group8-asymmetric": lambda: IntxFakeQuantizeConfig(torch.int2, group_size=8, is_symmetric=False),
}


# ------------------------------------------------------------ torchao -> fogzo


@pytest.mark.parametrize("name", list(CONFIGS))
def test_coordinate_scale_is_torchaos_scale_of_the_current_weight(name):
    model = _prepare(_classifier(), CONFIGS[name](), embeddings=True)
    x, _ = _tokens()
    views = quantizer_views(model)
    layers = [model[0], model[2], model[4]]
    assert [param for param, _ in views.values()] == [layer.weight for layer in layers]
    model(x)  # torchao's forward leaves the scale it used in weight_fake_quantizer.scale
    for layer in layers:
        view = views[id(layer.weight)][1]
        assert isinstance(view, TorchaoIntxView) and view.smoothing == smoothing_for("identity")
        scale = layer.weight_fake_quantizer.scale
        c = view.coordinate_scale()
        rows, columns = layer.weight.shape
        groups = scale.numel() // rows
        # per channel: (rows, 1); per group: each group's scale over its columns
        expected = scale.reshape(rows, groups, 1).expand(rows, groups, columns // groups).reshape(rows, -1)
        assert c.shape == ((rows, 1) if groups == 1 else (rows, columns))
        assert torch.equal(c.expand(rows, columns), expected.expand(rows, columns))
        assert not c.requires_grad and bool((c > 0).all())
    # c follows the weight, not the scale a previous (say, perturbed) forward left behind.
    layer = model[2]
    view = views[id(layer.weight)][1]
    with torch.no_grad():
        layer.weight.mul_(3.0)
        stale = layer.weight_fake_quantizer.scale.clone()
        layer.weight_fake_quantizer(layer.weight * 7.0)
    model(x)
    fresh = layer.weight_fake_quantizer.scale
    assert not torch.equal(stale, fresh)
    torch.testing.assert_close(view.coordinate_scale().amax(), fresh.amax(), rtol=0, atol=0)


def test_perturbations_are_in_units_of_torchaos_scale():
    """n-SPSA's passes compute with ``W ± c·ε̄·u``, ``c`` torchao's per-group scale."""
    model = _prepare(_classifier(), CONFIGS["int4-group16"]())
    x, y = _tokens()
    estimator = fogzo.SPSA(model, n=1, seed=5)
    entry = estimator.perturbed.tensors[0]
    assert entry.param is model[2].weight
    seen = []

    def record(module, args, output):  # runs before the estimator's hook restores W
        seen.append(module.weight.detach().clone())

    handle = model[2].register_forward_hook(record)
    try:
        info = estimator.estimate(lambda: F.cross_entropy(model(x), y))
    finally:
        handle.remove()
    weight, plus, minus = model[2].weight.detach(), seen[1], seen[2]  # seen[0]: the loss pass
    eps_bar = estimator.perturbed.smoothing.eps_bar
    assert eps_bar == pytest.approx(1 / (2 * math.sqrt(3)))
    shift = entry.coordinate_scale(eps_bar) * eps_bar * estimator.perturbed.noises(info.seed, 0)[entry.index]
    torch.testing.assert_close(plus - weight, shift)
    torch.testing.assert_close(minus - weight, -shift)
    # The shift is up to half a quantization step per weight (uniform noise, √3·ε̄ = 1/2).
    ratio = (plus - weight) / entry.coordinate_scale(eps_bar)
    assert 0.45 < float(ratio.abs().max()) <= 0.5 + 1e-6


@pytest.mark.parametrize(
    "name, convert",
    [("int4-group16", True), ("int2-group8-asymmetric", False)],
    ids=["int4-group16", "int2-group8-asymmetric"],
)
def test_fogzo_trains_a_torchao_qat_model_that_torchao_then_converts(name, convert):
    """Asymmetric: training only; torchao's IntxWeightOnlyConfig chooses asymmetric qparams
    differently from its own QAT fake quantizer, so its convert step is not an identity there."""
    model = _prepare(_classifier(), CONFIGS[name](), embeddings=True)
    x, y = _tokens()
    estimator = fogzo.FOGZO(model, total_steps=60, beta_min=0.99, seed=0)
    assert [entry.name for entry in estimator.perturbed.tensors] == ["0.weight", "2.weight", "4.weight"]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        optimizer.zero_grad(set_to_none=True)
        info = estimator.estimate(lambda: F.cross_entropy(model(x), y))
        assert info.differences and all(math.isfinite(d) for d in info.differences)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        losses.append(info.loss)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses[::10]  # log 4 = 1.39 at the start
    if not convert:
        return
    # torchao's own convert step: the converted model computes what the fake-quantized one did
    # (the same scales from the same weights, the same codes), bit for bit.
    with torch.no_grad():
        fake_quantized = model(x)
    granularity = PerGroup(CONFIGS[name]().granularity.group_size)
    config = IntxWeightOnlyConfig(weight_dtype=CONFIGS[name]().dtype, granularity=granularity)
    quantize_(model, QATConfig(config, step="convert"), filter_fn=lambda m, n: isinstance(m, nn.Linear))
    assert type(model[2].weight).__name__ == "IntxUnpackedToInt8Tensor"
    with torch.no_grad():
        assert torch.equal(model(x), fake_quantized)


def test_bf16_torchao_latent_weights_are_refused_and_float32_with_autocast_works():
    """A perturbed pass writes W + c·ε̄·v into the latent weight, which bf16 cannot hold at a small
    fraction of a step: refused when the estimator is built; float32 weights with a bf16 autocast
    forward give finite gradients."""
    model = _prepare(_classifier(dtype=torch.bfloat16), CONFIGS["int4-group16"](), embeddings=True)
    with pytest.raises(ValueError, match="stored in torch.bfloat16.*float32"):
        fogzo.FOGZO(model, total_steps=5, beta_min=0.5, seed=1)
    model = _prepare(_classifier(), CONFIGS["int4-group16"](), embeddings=True)
    x, y = _tokens()
    estimator = fogzo.FOGZO(model, total_steps=5, beta_min=0.5, seed=1)

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.cross_entropy(model(x).float(), y)

    for _ in range(2):
        model.zero_grad(set_to_none=True)
        info = estimator.estimate(closure)
        assert all(math.isfinite(d) for d in info.differences)
    for entry in estimator.perturbed.tensors:
        assert entry.param.grad.dtype == torch.float32 and torch.isfinite(entry.param.grad).all()


def test_fogzo_and_torchao_layers_in_one_model_share_the_identity_smoothing():
    model = _classifier()
    fogzo.quantize(model, fogzo.QuantConfig(bits=2), skip=["2"])
    _prepare(model, CONFIGS["int4-group16"]())  # the still-plain Linear "2"
    estimator = fogzo.FOGZO(model, total_steps=5)
    kinds = [type(entry.quantizer).__name__ for entry in estimator.perturbed.tensors]
    assert kinds == ["WeightQuantizer", "TorchaoIntxView", "WeightQuantizer"]
    model = _classifier()
    fogzo.quantize(model, fogzo.QuantConfig(bits=2, ste="hardtanh"), skip=["2"])
    _prepare(model, CONFIGS["int4-group16"]())
    with pytest.raises(ValueError, match="different smoothings"):
        fogzo.FOGZO(model, total_steps=5)


def test_range_learning_scales_are_back_propagated_not_perturbed():
    model = _prepare(_classifier(), IntxFakeQuantizeConfig(torch.int4, group_size=16, is_dynamic=False, range_learning=True))
    x, y = _tokens()
    initialize_fake_quantizers(model, (x,))
    scale = model[2].weight_fake_quantizer.scale
    assert isinstance(scale, nn.Parameter)
    estimator = fogzo.FOGZO(model, total_steps=5, perturb="all", seed=0)
    perturbed = {entry.name for entry in estimator.perturbed.tensors}
    assert perturbed == {"0.weight", "2.weight", "2.bias", "4.weight", "4.bias"}
    c = estimator.perturbed.tensors[1].coordinate_scale(0.3)
    assert torch.equal(c[:, ::16], scale.detach())
    estimator.estimate(lambda: F.cross_entropy(model(x), y))
    assert scale.grad is not None and torch.isfinite(scale.grad).all()  # from the STE pass


def test_other_torchao_weight_quantizers_are_refused_before_any_work():
    from torchao.quantization.qat.fake_quantize_config import Int4WeightFakeQuantizeConfig

    model = nn.Sequential(nn.Linear(32, 8))
    _prepare(model, Int4WeightFakeQuantizeConfig(group_size=32, activation_dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="supports IntxFakeQuantizer"):
        fogzo.FOGZO(model, total_steps=5)


def test_the_smoothed_gradient_refuses_a_torchao_model_with_a_value_error():
    """torchao's view has no levels, which the oracle and diagnose need (was an AttributeError)."""
    model = _prepare(_classifier(), CONFIGS["int4-per-channel"]())
    x, y = _tokens(size=8)
    closure = lambda: F.cross_entropy(model(x), y)
    with pytest.raises(ValueError, match="needs the quantizer's levels, and its TorchaoIntxView has none"):
        fogzo.diagnose(model, closure, coordinates=2, draws=1)
    with pytest.raises(ValueError, match="needs the quantizer's levels"):
        fogzo.SmoothedGradient(model).estimate(closure)


# ------------------------------------------------------------ fogzo -> torchao


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 64)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(64 * 4, 8)

    def forward(self, tokens):
        h = self.embed(tokens).reshape(-1, 1, 8, 8)  # tokens (B,) -> (B, 1, 8, 8)
        return self.head(torch.relu(self.conv(h)).flatten(1))


@pytest.mark.parametrize("bits", [1, "ternary", 2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_to_torchao_matches_the_fake_quantized_model(bits, per_channel, dtype):
    """Exactly: the dequantized weight ``q·α`` is the product the fake-quantized forward computes
    (one rounding of the same two numbers in the same dtype), and the layers run the same kernels."""
    torch.manual_seed(0)
    model = fogzo.quantize(_ConvNet().to(dtype), fogzo.QuantConfig(bits=bits, per_channel=per_channel, step_size="lsq"))
    with torch.no_grad():  # trained step sizes, not the initial ones
        for _, layer in fogzo.quantized_layers(model):
            layer.weight_quantizer.alpha.mul_(1.1)
    tokens = torch.randint(0, 16, (5,))
    converted = fogzo.to_torchao(model)
    assert not any(isinstance(m, fogzo.QuantizedLayer) for m in converted.modules())
    for name in ("embed", "conv", "head"):
        weight = getattr(converted, name).weight
        assert type(weight).__name__ == "IntxUnpackedToInt8Tensor" and not weight.requires_grad
        with torch.no_grad():
            assert torch.equal(weight.dequantize(), getattr(model, name).quantized_weight())
    assert converted.embed.weight.target_dtype == fogzo.integrations.torchao.target_dtype(fogzo.level_set(bits))
    with torch.no_grad():
        assert torch.equal(converted(tokens), model(tokens))
    assert isinstance(model.head, fogzo.QuantLinear)  # the original is untouched


@pytest.mark.parametrize("bits", [1, "ternary", 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_to_torchao_int4_cpu_kernel_matches_within_summation_error(bits, dtype):
    """The int4 kernel uses the same levels and α but its own arithmetic. Per output, with
    ``s = Σ_j x_j·w_j``, ``m = Σ_j |x_j·w_j|``, ``u`` the unit roundoff of ``dtype`` and
    ``γ_K = K·2⁻²⁴`` (float32 accumulation over ``K`` inputs):

    * both sums are within ``γ_K·m`` of the exact one (two of them: ``2γ_K·m``);
    * the fake-quantized weight is ``l·α`` rounded to ``dtype`` (not exact in bfloat16 for
      levels beyond ±2), the kernel's may not be: ``u·m``;
    * the reference rounds ``s + b`` once, the kernel rounds ``s`` and then ``s + b``:
      ``u·(|y_ref| + |y_kernel| + |s|)``.

    (On this machine the float32 outputs come out bit-identical; the test allows the bound.)
    """
    torch.manual_seed(0)
    model = fogzo.quantize(
        nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 16)).to(dtype), fogzo.QuantConfig(bits=bits)
    )
    x = torch.randn(7, 96, dtype=dtype)
    converted = fogzo.to_torchao(model, packing="int4_cpu")
    assert type(converted[0].weight).__name__ == "Int4OpaqueTensor"
    unit = torch.finfo(dtype).eps / 2
    with torch.no_grad():
        hidden = torch.relu(model[0](x))
        for layer, fresh, inputs in ((model[0], converted[0], x), (model[2], converted[2], hidden)):
            reference, output = layer(inputs).float(), fresh(inputs).float()
            weight = layer.quantized_weight().float()
            total, magnitude = inputs.float() @ weight.t(), inputs.float().abs() @ weight.abs().t()
            gamma = weight.shape[1] * 2.0**-24
            bound = (2 * gamma + unit) * magnitude + unit * (reference.abs() + output.abs() + total.abs())
            excess = (output - reference).abs() - bound
            assert bool((excess <= 0).all()), float(excess.max())


def test_to_torchao_keeps_tied_weights_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(10, 6), nn.Linear(6, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, tokens):
            return self.head(self.embed(tokens))

    torch.manual_seed(0)
    model = fogzo.quantize(Tied(), fogzo.QuantConfig(bits=2))
    converted = fogzo.to_torchao(model)
    assert converted.head.weight is converted.embed.weight
    tokens = torch.randint(0, 10, (3, 4))
    with torch.no_grad():
        assert torch.equal(converted(tokens), model(tokens))


def test_to_torchao_rejects_what_it_cannot_represent():
    with pytest.raises(ValueError, match="no quantized layer"):
        fogzo.to_torchao(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="QuantConv1d has no torchao equivalent"):
        fogzo.to_torchao(fogzo.quantize(nn.Sequential(nn.Conv1d(1, 2, 3))))
    with pytest.raises(ValueError, match="activation quantizer"):
        fogzo.to_torchao(fogzo.quantize(nn.Sequential(nn.Linear(4, 4)), fogzo.QuantConfig(activation_bits=8)))
    model = fogzo.quantize(nn.Sequential(nn.Linear(48, 4)), fogzo.QuantConfig(bits=8))
    with pytest.raises(ValueError, match=r"-128..127 exceed int4's -8..7; in_features 48 .* 32; out_features 4 .* 16"):
        fogzo.to_torchao(model, packing="int4_cpu")
    with pytest.raises(ValueError, match="packing must be one of"):
        fogzo.to_torchao(model, packing="int3")
