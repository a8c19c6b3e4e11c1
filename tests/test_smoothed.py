"""The smoothed-gradient oracle against brute force, n-SPSA, and the estimator contract."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fogzo
from fogzo.estimators.noise import derive_seed
from fogzo.estimators.state import StateGuard
from fogzo.estimators.smoothed import smoothed_partials
from fogzo.smoothing import Smoothing

SQRT3, SQRT6 = math.sqrt(3.0), math.sqrt(6.0)


def _cdf(noise: str, z: float) -> float:
    """CDF of the unit-variance noise laws, written out independently of fogzo.smoothing."""
    if noise == "uniform":
        return min(1.0, max(0.0, (z + SQRT3) / (2 * SQRT3)))
    if noise == "logistic":
        return 1.0 / (1.0 + math.exp(-z * math.pi / SQRT3))
    if noise == "triangular":
        if z <= -SQRT6:
            return 0.0
        if z >= SQRT6:
            return 1.0
        return (z + SQRT6) ** 2 / 12 if z <= 0 else 1 - (SQRT6 - z) ** 2 / 12
    if noise == "gaussian":
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))
    raise AssertionError(noise)


def _tiny(bits, ste, noise=None, seed=0):
    """A 2→2 quantized layer (4 weights, x spread over and beyond the levels) + a float head."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 3))
    fogzo.quantize(model, fogzo.QuantConfig(bits=bits, ste=ste, noise=noise), skip=["2"])
    layer = model[0]
    levels = layer.weight_quantizer.levels
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.empty(2, 2).uniform_(levels.low - 0.4, levels.high + 0.4, generator=generator)
    with torch.no_grad():
        layer.weight_quantizer.alpha.fill_(0.7)
        layer.weight.copy_(x * 0.7)
    data = torch.randn(8, 2, generator=generator), torch.randint(0, 3, (8,), generator=generator)
    return model, data


def _brute_force_gradient(model, data):
    """∂L_s/∂x by central differences of L_s(x), with L_s summed over every level combination."""
    layer = model[0]
    quantizer = layer.weight_quantizer
    levels, smoothing = quantizer.levels, quantizer.smoothing
    values = [float(v) for v in levels.from_codes(torch.arange(levels.num_levels, dtype=torch.uint8))]
    thresholds = [levels.first_threshold + k for k in range(levels.num_thresholds)]
    x0 = (layer.weight.detach() / quantizer.alpha).reshape(-1).double().tolist()
    alpha = quantizer.alpha.detach().clone()
    inputs, targets = data
    table = {}
    saved = layer.weight.detach().clone()
    with torch.no_grad():
        for combo in itertools.product(range(len(values)), repeat=len(x0)):
            layer.weight.copy_(torch.tensor([values[i] for i in combo]).reshape(2, 2) * alpha)
            table[combo] = float(F.cross_entropy(model(inputs), targets))
        layer.weight.copy_(saved)

    def probabilities(x):
        edges = [-math.inf] + thresholds + [math.inf]
        cdf = [0.0 if e == -math.inf else 1.0 if e == math.inf else _cdf(smoothing.noise, (e - x) / smoothing.eps_bar) for e in edges]
        return [cdf[i + 1] - cdf[i] for i in range(len(values))]

    def smoothed_loss(xs):
        probs = [probabilities(x) for x in xs]
        return sum(loss * math.prod(probs[j][c] for j, c in enumerate(combo)) for combo, loss in table.items())

    h = 1e-6
    gradient = []
    for j in range(len(x0)):
        plus, minus = list(x0), list(x0)
        plus[j] += h
        minus[j] -= h
        gradient.append((smoothed_loss(plus) - smoothed_loss(minus)) / (2 * h))
    return torch.tensor(gradient, dtype=torch.float64)


def _oracle_draws(model, closure, draws, fast=True, seed=0):
    estimator = fogzo.SmoothedGradient(model, fast=fast)
    guard = StateGuard(model)
    closure()
    guard.after_first_pass()
    coordinates = [torch.arange(entry.param.numel()) for entry in estimator.perturbed.tensors]
    return smoothed_partials(estimator.perturbed, closure, guard, seed=seed, coordinates=coordinates, draws=draws, fast=fast)


SETUPS = [
    (2, "identity", None),
    ("ternary", "identity", None),
    (1, "identity", None),
    (1, "hardtanh", None),
    (1, "tanh", None),
    (1, "approxsign", None),
    (2, "identity", "gaussian"),
    (2, "tanh", None),  # logistic noise on 4 levels: every threshold in reach, 3 moves per weight
]


@pytest.mark.parametrize("bits,ste,noise", SETUPS)
def test_oracle_is_unbiased_for_the_brute_force_smoothed_gradient(bits, ste, noise):
    model, data = _tiny(bits, ste, noise)
    closure = lambda: F.cross_entropy(model(data[0]), data[1])
    exact = _brute_force_gradient(model, data)
    draws = 300
    (result,) = _oracle_draws(model, closure, draws)
    samples = result.partials.double()
    mean, std = samples.mean(0), samples.std(0)
    # Each draw is an independent unbiased sample: 5 standard errors, plus float32 roundoff of
    # loss differences (|L| ~ 1, differences of float32 losses carry ~1e-7).
    tolerance = 5 * std / math.sqrt(draws) + 1e-5
    assert torch.all((mean - exact).abs() <= tolerance), (mean, exact, tolerance)
    assert exact.abs().max() > 1e-3  # the check has teeth: the gradient is not all zero


def test_identity_oracle_is_zero_beyond_the_clip_range_and_one_move_per_weight_inside():
    model, data = _tiny(2, "identity")
    layer = model[0]
    x = torch.tensor([-2.7, -1.2, 0.3, 1.6])  # levels −2..1: thresholds in reach for x in [−2, 1)
    with torch.no_grad():
        layer.weight.copy_(x.reshape(2, 2) * layer.weight_quantizer.alpha)
    closure = lambda: F.cross_entropy(model(data[0]), data[1])
    (result,) = _oracle_draws(model, closure, draws=3)
    levels = layer.weight_quantizer.levels
    # A threshold t is in reach when t − x lies in the uniform support [−½, ½).
    in_reach = ((levels.low + 0.5) - x < 0.5) & ((levels.high - 0.5) - x >= -0.5)
    assert in_reach.tolist() == [False, True, True, False]
    assert result.moves == 3 * int(in_reach.sum())
    assert torch.all(result.partials[:, ~in_reach] == 0)


def test_oracle_matches_the_mean_of_many_spsa_draws_with_gaussian_noise():
    """n-SPSA with Gaussian noise is unbiased for the same smoothed loss (Stein's identity)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    fogzo.quantize(model, fogzo.QuantConfig(bits=2, noise="gaussian", alpha_init="lsq"))
    x, y = torch.randn(16, 3), torch.randint(0, 3, (16,))
    closure = lambda: F.cross_entropy(model(x), y)
    draws = 200
    results = _oracle_draws(model, closure, draws)
    scales = [layer.weight_quantizer.alpha for _, layer in fogzo.quantized_layers(model)]
    oracle = torch.cat([(r.partials / s).reshape(draws, -1) for r, s in zip(results, scales)], dim=1).double()
    spsa = fogzo.SPSA(model, n=256, seed=0, vectorize=256, report_loss=False)
    samples = []
    for _ in range(40):
        model.zero_grad(set_to_none=True)
        spsa.estimate(closure)
        samples.append(torch.cat([layer.weight.grad.reshape(-1) for _, layer in fogzo.quantized_layers(model)]))
    spsa_samples = torch.stack(samples).double()  # each row: the mean of 256 two-point estimates
    difference = oracle.mean(0) - spsa_samples.mean(0)
    standard_error = (oracle.var(0) / draws + spsa_samples.var(0) / len(samples)).sqrt()
    assert torch.all(difference.abs() <= 5 * standard_error + 1e-5), (difference, standard_error)
    assert oracle.mean(0).abs().max() > 10 * standard_error.max()  # the means are resolved


@pytest.mark.parametrize("bits,ste", [(2, "identity"), (1, "tanh")])
def test_linear_fast_path_equals_full_forwards(bits, ste):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    fogzo.quantize(model, fogzo.QuantConfig(bits=bits, ste=ste))
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    closure = lambda: F.cross_entropy(model(x), y)
    fast = _oracle_draws(model, closure, draws=2, fast=True)
    generic = _oracle_draws(model, closure, draws=2, fast=False)
    for a, b in zip(fast, generic):
        assert a.moves == b.moves
        # The same loss differences, summed in another order: float32 roundoff of |L| ~ 1.
        torch.testing.assert_close(a.partials, b.partials, rtol=0, atol=2e-5)


def _mlp(seed=0, **config):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.BatchNorm1d(12), nn.Dropout(0.2), nn.Linear(12, 4))
    return fogzo.quantize(model, fogzo.QuantConfig(bits=2, **config))


def test_estimate_keeps_parameters_buffers_rng_and_fills_gradients():
    model = _mlp()
    model.train()
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        return F.cross_entropy(model(x), y)

    reference = _mlp()
    reference.load_state_dict(model.state_dict())
    torch.manual_seed(7)
    F.cross_entropy(reference(x), y).backward()  # a plain STE step: the state to match
    rng_after_ste = torch.get_rng_state()
    torch.manual_seed(7)
    oracle = fogzo.SmoothedGradient(model, seed=0)
    with pytest.warns(UserWarning, match="one at a time"):  # BatchNorm in training mode: no vmap
        info = oracle.estimate(closure)
    assert torch.equal(torch.get_rng_state(), rng_after_ste)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    # Biases and BatchNorm keep the STE pass's gradient; quantized weights get the oracle's.
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if name.endswith("weight") and name in ("0.weight", "4.weight"):
            assert not torch.equal(p.grad, q.grad), name
        else:
            assert torch.equal(p.grad, q.grad), name
    moves = info.forward_passes - 2
    assert moves > 0 and info.backward_passes == 1 and oracle.state_dict()["step"] == 1
    calls["n"] = 0  # after the first call's one-time fast-path check and vmap attempt:
    info = oracle.estimate(closure)
    assert calls["n"] == info.forward_passes  # STE pass, drawn weights, one forward per move


def test_coordinate_sampling_is_unbiased_and_local():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    fogzo.quantize(model, fogzo.QuantConfig(bits=2))
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    closure = lambda: F.cross_entropy(model(x), y)
    full = fogzo.SmoothedGradient(model, seed=5)
    sampled = fogzo.SmoothedGradient(model, seed=5, coordinates=7)
    full.estimate(closure)
    full_grads = {id(p): p.grad.clone() for p in model.parameters()}
    model.zero_grad(set_to_none=True)
    sampled.estimate(closure)
    chosen_at = [sampled.select_coordinates(derive_seed(5, step)) for step in (0, 1)]
    for entry, chosen in zip(sampled.perturbed.tensors, chosen_at[0]):
        grad = entry.param.grad.reshape(-1)
        mask = torch.zeros_like(grad, dtype=torch.bool)
        mask[chosen] = True
        assert len(chosen) == 7 and torch.all(grad[~mask] == 0)
        # The same draw as the full oracle (it depends on the step seed only), scaled by
        # numel/m so that E[G] over the subsets is the full gradient.
        reference = full_grads[id(entry.param)].reshape(-1)
        torch.testing.assert_close(grad[mask], reference[mask] * (entry.param.numel() / 7), rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(*chosen_at))  # a new subset every step


def test_descending_the_smoothed_loss_lowers_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    fogzo.quantize(model, fogzo.QuantConfig(bits=2))
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 8, generator=generator), torch.randint(0, 4, (128,), generator=generator)
    closure = lambda: F.cross_entropy(model(x), y)
    oracle = fogzo.SmoothedGradient(model, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    with torch.no_grad():
        before = float(closure())
    for _ in range(60):
        optimizer.zero_grad(set_to_none=True)
        oracle.estimate(closure)
        optimizer.step()
    with torch.no_grad():
        after = float(closure())
    assert after < before - 0.15, (before, after)


def test_bad_arguments_raise():
    model = _mlp()
    with pytest.raises(ValueError, match="draws"):
        fogzo.SmoothedGradient(model, draws=0)
    with pytest.raises(ValueError, match="coordinates"):
        fogzo.SmoothedGradient(model, coordinates=0)
    with pytest.raises(ValueError, match="nothing to perturb"):
        fogzo.SmoothedGradient(nn.Sequential(nn.Linear(2, 2)))


def test_failure_leaves_gradients_and_step_as_they_were():
    model = _mlp()
    model.eval()
    x, y = torch.randn(4, 8), torch.randint(0, 4, (4,))
    oracle = fogzo.SmoothedGradient(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return F.cross_entropy(model(x), y)

    with pytest.raises(RuntimeError, match="boom"):
        oracle.estimate(closure)
    assert oracle.state_dict()["step"] == 0
    for name, p in model.named_parameters():
        if name in ("0.weight", "4.weight"):
            assert torch.equal(p.grad, torch.ones_like(p)), name


class _ParentReadsChild(nn.Module):
    """A parent that runs its child's weight itself: the child's forward never runs."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(F.linear(x, self.inner.quantized_weight(), self.inner.bias)))


@pytest.mark.parametrize("make", ["attention", "parent"])
def test_weights_read_outside_their_layer_fall_back_to_full_forwards(make):
    torch.manual_seed(0)
    if make == "attention":
        model = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        x, target = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
        loss_of = lambda: (model(x) - target).square().mean()  # (a plain mean square is ~1 after LayerNorm)
    else:
        model = _ParentReadsChild()
        x = torch.randn(6, 5)
        loss_of = lambda: model(x).square().mean()
    fogzo.quantize(model, fogzo.QuantConfig(bits=2))
    fast = fogzo.SmoothedGradient(model, seed=3)
    generic = fogzo.SmoothedGradient(model, seed=3, fast=False)
    info = fast.estimate(loss_of)
    fast_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    generic.estimate(loss_of)
    # The same moves evaluated by differently batched float32 forwards: each loss carries a
    # few ulps of |L|, and G_W = (difference of two losses)/α.
    smallest_alpha = min(float(w.quantizer.coordinate_scale().min()) for w in fast.perturbed.tensors)
    atol = 8 * 2.0**-24 * abs(info.loss) / smallest_alpha
    for p, g in zip(model.parameters(), fast_grads):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=atol)
    assert fast._engine is not None and fast._engine.slow  # the check caught the outside read
    assert any(p.grad.abs().sum() > 0 for name, p in model.named_parameters() if "out_proj.weight" in name or "inner.weight" in name)
