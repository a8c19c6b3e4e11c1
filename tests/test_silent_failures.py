"""No silent no-ops (issue 21): every estimate measures something or says why not, and the
estimators give the gradients backward would (padding rows, frozen parameters, failed calls)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fogzo


def _batch(n=32, features=8, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=generator), torch.randint(0, classes, (n,), generator=generator)


# ------------------------------------------------------------------ shifts lost to the dtype


def test_a_shift_below_bf16_spacing_is_refused_naming_the_tensor_and_an_eps_that_works():
    """A bf16 bias of ±4 has spacing 1/32: W ± 1e-3·u == W, every difference would be 0."""
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(4.0)
    model = model.to(torch.bfloat16)
    x = torch.linspace(-1, 1, 16, dtype=torch.bfloat16).unsqueeze(1)
    closure = lambda: (model(x).float() - 2.0).square().mean()
    spsa = fogzo.SPSA(model, n=8, perturb="all", eps=1e-3, seed=0)
    with pytest.raises(ValueError, match=r"'bias' \(torch.bfloat16, 8? ?\d* of 1 shifts lost: use eps >= ") as error:
        spsa.estimate(closure)
    assert model.bias.grad is None and spsa.counter.step == 0  # nothing changed
    suggested = float(str(error.value).split("use eps >= ")[1].split(" ")[0])
    spsa = fogzo.SPSA(model, n=8, perturb="all", eps=suggested, seed=0)
    info = spsa.estimate(closure)
    assert info.zero_differences < 8 and model.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("make", [lambda m: fogzo.FOGZO(m, total_steps=10), lambda m: fogzo.SPSA(m)])
def test_a_bf16_latent_weight_is_refused_naming_it_and_float32_with_autocast_works(make):
    """A perturbed pass writes W + c·ε̄·v into the weight: bf16 cannot hold a shift of a small
    fraction of a quantization step (the guided part is ~ε̄·c/√d per coordinate), so a bf16
    latent weight is refused when the estimator is built; float32 latent weights with a bf16
    autocast forward measure the differences."""
    model = fogzo.quantize(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), fogzo.QuantConfig(bits=2))
    with pytest.raises(ValueError, match=r"quantized weight '0.weight' is stored in torch.bfloat16.*float32 "
                                         r"\(model.float\(\)\).*torch.autocast"):
        make(model.to(torch.bfloat16))
    model = model.float()
    x, y = _batch()
    estimator = make(model)

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.cross_entropy(model(x).float(), y)

    info = estimator.estimate(closure)
    assert info.zero_differences == 0
    assert all(p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in estimator.perturbed.params)


# ------------------------------------------------------------------ steps that measure nothing


def test_lora_quantized_after_get_peft_model_keeps_the_ste_gradient_and_warns_once():
    """peft then quantize: B = 0 sits on a level and A's output is multiplied by B, so every finite
    difference is 0; FOGZO keeps the STE gradient (B trains) and says so once."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["0", "2"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize warns that B's weights are all zero
        model = fogzo.quantize(model, fogzo.QuantConfig(bits=2))
    x, y = _batch()
    closure = lambda: F.cross_entropy(model(x), y)
    ste_model_grads = {}
    loss = closure()
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            ste_model_grads[name] = param.grad.clone()
            param.grad = None
    estimator = fogzo.FOGZO(model, total_steps=10, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = estimator.estimate(closure)
        second = estimator.estimate(closure)  # .grad accumulates, as backward's would
    messages = [str(w.message) for w in caught if "measured nothing" in str(w.message)]
    assert len(messages) == 1 and "lora_B" in messages[0]
    assert not first.measured and not second.measured and first.differences == (0.0,)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, 2 * ste_model_grads[name], rtol=0, atol=0)
    assert any(ste_model_grads[n].abs().sum() > 0 for n in ste_model_grads if "lora_B" in n)


def test_spsa_that_measures_nothing_warns_and_says_so_in_info():
    torch.manual_seed(0)
    model = fogzo.quantize(nn.Sequential(nn.Linear(8, 3)), fogzo.QuantConfig(bits=2))
    with torch.no_grad():
        model[0].weight.zero_()  # every weight on level 0, far from the thresholds at ±α/2
    x, y = _batch()
    spsa = fogzo.SPSA(model, n=2, seed=0)
    with pytest.warns(UserWarning, match="measured nothing"):
        info = spsa.estimate(lambda: F.cross_entropy(model(x), y))
    assert not info.measured and info.zero_differences == 2


# ------------------------------------------------------------------ padding rows, frozen parameters


@pytest.mark.parametrize("make", [
    lambda m: fogzo.FOGZO(m, total_steps=10, beta=0.5, seed=0),
    lambda m: fogzo.FOGZO(m, total_steps=10, n=2, beta=0.5, seed=0),
    lambda m: fogzo.SPSA(m, n=2, seed=0),
    lambda m: fogzo.SmoothedGradient(m, seed=0),
])
def test_the_padding_row_of_an_embedding_gets_no_gradient(make):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, padding_idx=3), nn.Flatten(), nn.Linear(12, 2))
    model = fogzo.quantize(model, fogzo.QuantConfig(bits=2))
    tokens = torch.tensor([[3, 1, 2], [3, 3, 5], [0, 3, 9], [4, 7, 3]])
    targets = torch.tensor([0, 1, 1, 0])
    make(model).estimate(lambda: F.cross_entropy(model(tokens), targets))
    gradient = model[0].weight.grad
    assert torch.equal(gradient[3], torch.zeros(4)) and gradient.abs().sum() > 0


@pytest.mark.parametrize("make", [
    lambda m: fogzo.FOGZO(m, total_steps=10, seed=0),
    lambda m: fogzo.SPSA(m, n=2, seed=0),
])
def test_a_parameter_unfrozen_after_building_is_refused_like_one_frozen_after(make):
    torch.manual_seed(0)
    model = fogzo.quantize(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)), fogzo.QuantConfig(bits=2))
    model[0].weight.requires_grad_(False)
    estimator = make(model)
    x, y = _batch()
    estimator.estimate(lambda: F.cross_entropy(model(x), y))
    model[0].weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"\['0.weight'\] were frozen when the estimator was built"):
        estimator.estimate(lambda: F.cross_entropy(model(x), y))


# ------------------------------------------------------------------ the oracle's failure contract


@pytest.mark.parametrize("failing_call", [2, 3])
def test_smoothed_gradient_restores_buffers_and_gradients_when_the_closure_fails(failing_call):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    model = fogzo.quantize(model, fogzo.QuantConfig(bits=2))
    for param in model.parameters():
        param.grad = torch.full_like(param, 0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _batch()
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == failing_call:
            raise RuntimeError("data loader died")
        return F.cross_entropy(model(x), y)

    oracle = fogzo.SmoothedGradient(model, seed=0, vectorize=False)
    with pytest.raises(RuntimeError, match="data loader died"):
        oracle.estimate(closure)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())
    assert oracle.counter.step == 0


# ------------------------------------------------------------------ foreign quantizers, side effects


class _ForeignQuantLinear(nn.Linear):
    """A layer quantized by a library fogzo has no adapter for (the shape of Brevitas' layers)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_quant = nn.Identity()


def test_foreign_quantized_layers_are_named_and_not_perturbed_as_float():
    model = nn.Sequential(_ForeignQuantLinear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"no registered adapter recognises its quantized layers 0 "
                                         r"\(_ForeignQuantLinear, weight_quant: Identity\).*register_adapter"):
        fogzo.FOGZO(model, total_steps=10)
    with pytest.raises(ValueError, match=r"perturb='all' would perturb .* 0 \(_ForeignQuantLinear"):
        fogzo.SPSA(model, perturb="all")


def test_brevitas_layers_are_named():
    qnn = pytest.importorskip("brevitas.nn")
    model = nn.Sequential(qnn.QuantLinear(8, 4, bias=True, weight_bit_width=2), nn.ReLU(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"0 \(QuantLinear, weight_quant: WeightQuantProxyFromInjector\)"):
        fogzo.FOGZO(model, total_steps=10, perturb="all")


class _Calibrating(nn.Module):
    """Counts its forward calls and writes a parameter while calibrating, as activation
    calibration does."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        with torch.no_grad():
            self.scale.copy_(x.detach().abs().max())
        return x / self.scale


def test_a_forward_that_writes_a_parameter_or_counts_its_calls_is_reported():
    torch.manual_seed(0)
    model = fogzo.quantize(nn.Sequential(nn.Linear(8, 6), _Calibrating(), nn.Linear(6, 3)), fogzo.QuantConfig(bits=2))
    x, y = _batch()
    with pytest.warns(UserWarning, match=r"changed the model beyond its buffers: parameter '1.scale'; "
                                         r"_Calibrating '1'.calls \(1 -> 3\)"):
        fogzo.FOGZO(model, total_steps=10, seed=0).estimate(lambda: F.cross_entropy(model(x), y))


# ------------------------------------------------------------------ closure misuse


_ESTIMATORS_WITH_A_BACKWARD = [
    lambda m: fogzo.STE(m),
    lambda m: fogzo.FOGZO(m, total_steps=10, seed=0),
    lambda m: fogzo.SmoothedGradient(m, seed=0),
]


@pytest.mark.parametrize("make", _ESTIMATORS_WITH_A_BACKWARD)
def test_closure_misuse_gets_one_line_naming_the_cause(make):
    torch.manual_seed(0)
    model = fogzo.quantize(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)), fogzo.QuantConfig(bits=2))
    estimator = make(model)
    x, y = _batch()
    loss = lambda: F.cross_entropy(model(x), y)
    with pytest.raises(ValueError, match="loss does not require grad: it is detached"):
        estimator.estimate(lambda: loss().detach())
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"estimate\(\) was called under torch.no_grad\(\)"):
        estimator.estimate(loss)

    def backward_inside(retain_graph):
        value = loss()
        value.backward(retain_graph=retain_graph)
        return value

    for retain_graph in (False, True):
        with pytest.raises(ValueError, match=r"the closure called backward\(\) itself"):
            estimator.estimate(lambda: backward_inside(retain_graph))
        assert all(p.grad is None for p in model.parameters())  # the failed call left nothing


# ------------------------------------------------------------------ loss scaling


def _scaled_model():
    torch.manual_seed(0)
    return fogzo.quantize(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)), fogzo.QuantConfig(bits=2))


def test_a_huge_loss_scale_does_not_overflow_the_guide_norm():
    """k = 1e20: ‖k·g‖² overflows float32; G_W must still be k times the unscaled one."""
    x, y = _batch()
    gradients = []
    for scale in (None, 1e20):
        model = _scaled_model()
        backward = None if scale is None else (lambda loss, scale=scale: (loss * scale).backward())
        info = fogzo.FOGZO(model, total_steps=10, beta=0.5, seed=0, backward=backward).estimate(
            lambda: F.cross_entropy(model(x), y))
        assert not info.skipped and info.measured
        gradients.append([p.grad.clone() for p in model.parameters()])
    for plain, scaled in zip(*gradients):
        torch.testing.assert_close(scaled, plain * 1e20, rtol=1e-5, atol=0)


def test_the_documented_grad_scaler_recipe_skips_an_overflowing_step():
    """docs/integrations.md: on_nonfinite='keep' hands the inf STE gradient to the scaler."""
    model = _scaled_model()
    x, y = _batch()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)  # the STE gradient overflows float32
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    estimator = fogzo.FOGZO(model, total_steps=10, seed=0, on_nonfinite="keep",
                            backward=lambda loss: scaler.scale(loss).backward())
    before = [p.detach().clone() for p in model.parameters()]
    info = estimator.estimate(lambda: 100 * F.cross_entropy(model(x), y))  # 100·2^127: inf in float32
    scaler.step(optimizer)  # "No inf checks were recorded" if no .grad reached the scaler
    scaler.update()
    assert info.skipped and info.skip_reason == "ste_gradient"
    assert scaler.get_scale() < 2.0 ** 127
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_the_cli_takes_on_nonfinite_keep_with_its_loss_scaler_only():
    from pathlib import Path

    from fogzo.train import ConfigError, load_config

    config = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "resnet20_fmnist.toml"
    assert load_config(config, {"on_nonfinite": "keep", "autocast": "fp16"}, quick=True).on_nonfinite == "keep"
    with pytest.raises(ConfigError, match="needs --autocast=fp16"):
        load_config(config, {"on_nonfinite": "keep"}, quick=True)
