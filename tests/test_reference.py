"""The fast estimators against the plain reference step (fogzo.estimators.reference,
docs/method.md §4): same noise, same signs, same batch, the same G_W to float64 rounding.

The noise u_i and the signs s_i are captured as the fast estimator draws them (by wrapping
``PerturbedSet.noise`` and ``FOGZO.sign`` for the duration of a test), and every draw of
the same (tensor, sample) within a step must be the same tensor: the engine regenerates u_i
for each pass and once more for the gradient, and the test checks it gets it back each time.
The perturbed set and the coordinate scales c are derived here from the model (the
quantizers' α, ε/ε̄ for tensors without one), not taken from the estimator.

Tolerance. The fast path and the reference compute the same numbers in another order (e.g.
the shift as ``g_W·(c²·ε̄·√β·s·r/‖g_x‖) + u·(c·ε̄·√(1−β))`` against ``c·ε̄·v``, and
``G_W = d·δ/(ε̄·c²)`` against ``Σ d·v/c/n``), all in the model's dtype. With unit roundoff
``u`` (2⁻⁵³ in float64):

* the weights ``W ± c·ε̄·v`` of the two paths differ by a few ``u`` relative; the quantized
  forward rounds both to the same levels (a flip needs a weight within a few ``u`` of a
  threshold), so each loss differs by at most ``κ·u·|L|``, ``κ`` covering the error growth of
  the small forward passes here;
* hence ``|Δd_i| ≤ κ·u·(|L₊| + |L₋|)/(2ε̄) + κ·u·|d_i|`` (one-sided: ``(|L₊| + |L0|)/ε̄``),
* and per element ``|ΔG_W| ≤ (1/n)·Σ_i (|Δd_i|·|v_i| + κ·u·|d_i|·(√β|ĝ| + √(1−β)|u_i|)) / |c|``.

``κ = 2¹⁰`` leaves ample room (the largest observed error is 0.2 % of its bound) and keeps
the float64 check within about 1e-13 of the reference: a wrong factor, sign, scale or noise
shows up as an error of order 1, some 10¹² times the tolerance (a relative error of 1e-7 in
one coefficient of the engine already fails). One float32 case (``u = 2⁻²⁴``) shows the same
agreement at the precision models train in.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fogzo
from fogzo.estimators import reference
from fogzo.estimators.fogzo import FOGZO
from fogzo.estimators.perturbed_set import PerturbedSet

KAPPA = 2.0**10
EPS = 1e-2  # step ε of tensors without a quantizer (perturb="all")


# ------------------------------------------------------------------------ models


class _Conv(nn.Module):
    """Conv2d -> BatchNorm (buffers written by every forward) -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.norm = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1))


class _Attention(nn.Module):
    """A transformer encoder layer (attention reads out_proj.weight in its own forward) with
    dropout, then a linear head."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(dim=1))


def _model(kind, dtype, per_channel=False):
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Dropout(0.2), nn.Linear(10, 3))
        shape = (16, 6)
    elif kind == "conv":
        model, shape = _Conv(), (8, 1, 6, 6)
    else:
        model, shape = _Attention(), (4, 5, 8)
    model = fogzo.quantize(model.to(dtype), fogzo.QuantConfig(bits=2, per_channel=per_channel))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=generator, dtype=dtype)
    y = torch.randint(0, 3, (shape[0],), generator=generator)
    return model, x, y


def _quantizers(model):
    """``{id(weight): its quantizer}`` from the layers themselves."""
    found = {}
    for module in model.modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if quantizer is not None:
            found[id(module.weight)] = quantizer
        for name, quantizer in getattr(module, "weight_quantizers", {}).items():  # nn.MultiheadAttention
            found[id(getattr(module, name))] = quantizer
    return found


def _perturbed(model, perturb, eps_bar):
    """The perturbed parameters ``[(name, param, c)]`` and the other trainable ones."""
    quantizers = _quantizers(model)
    step_sizes = {id(p) for q in quantizers.values() for p in q.parameters()}
    chosen, others = [], []
    for name, param in model.named_parameters():
        if perturb == "quantized" and id(param) in quantizers or perturb == "all" and id(param) not in step_sizes:
            c = quantizers[id(param)].alpha.detach().clone() if id(param) in quantizers else EPS / eps_bar
            chosen.append((name, param, c))
        else:
            others.append((name, param))
    return chosen, others


# ------------------------------------------------------------------ captured draws


class _Draws:
    """The noise tensors and signs the fast estimator draws (wrapped, not changed)."""

    def __init__(self, monkeypatch):
        self.noise = {}
        self.signs = {}
        noises, add_noise, sign = PerturbedSet.noises, PerturbedSet.add_noise_, FOGZO.sign

        def record(perturbed, step_seed, sample):
            us = noises(perturbed, step_seed, sample)
            for entry, u in zip(perturbed.tensors, us):
                self.noise.setdefault((entry.name, sample), []).append(u.clone())  # the caller scales u in place
            return us

        def recorded_add(perturbed, tensors, step_seed, sample, alpha):
            record(perturbed, step_seed, sample)  # (u is a pure function of its key: what add_noise_ adds)
            add_noise(perturbed, tensors, step_seed, sample, alpha)

        def recorded_sign(step_seed, sample):
            s = sign(step_seed, sample)
            self.signs.setdefault(sample, []).append(s)
            return s

        monkeypatch.setattr(PerturbedSet, "noises", record)
        monkeypatch.setattr(PerturbedSet, "add_noise_", recorded_add)
        monkeypatch.setattr(FOGZO, "sign", staticmethod(recorded_sign))

    def clear(self):
        self.noise.clear()
        self.signs.clear()

    def u(self, name, sample, like):
        """u of ``name``, sample ``sample`` (zeros if never drawn: its weight √(1−β) was 0)."""
        draws = self.noise.get((name, sample))
        if draws is None:
            return torch.zeros_like(like)
        for again in draws[1:]:
            assert torch.equal(again, draws[0]), f"u of {name}, sample {sample} differs between draws"
        return draws[0]

    def s(self, sample):
        (first, *rest) = self.signs[sample]
        assert all(s == first for s in rest)
        return first


# ------------------------------------------------------------------------ checks


def _bounds(ref, noises, scales, eps_bar, one_sided, beta, unit):
    """Per-sample ``|Δd_i|`` and per-tensor ``|ΔG_W|`` bounds (module docstring)."""
    n = len(ref.differences)
    if one_sided:
        d_err = [KAPPA * unit * ((abs(plus) + abs(ref.loss0)) / eps_bar + abs(d))
                 for plus, d in zip(ref.losses, ref.differences)]
    else:
        d_err = [KAPPA * unit * ((abs(plus) + abs(minus)) / (2 * eps_bar) + abs(d))
                 for plus, minus, d in zip(ref.losses[0::2], ref.losses[1::2], ref.differences)]
    g_err = []
    for k, c in enumerate(scales):
        total = 0.0
        for i in range(n):
            v = ref.directions[i][k]
            guided = math.sqrt(beta) * ref.guide[k].abs() if ref.guide is not None else 0.0
            noisy = math.sqrt(1.0 - beta) * noises[i][k].abs()
            total = total + (d_err[i] * v.abs() + KAPPA * unit * abs(ref.differences[i]) * (guided + noisy)) / n
        g_err.append(total / (c.abs() if isinstance(c, torch.Tensor) else abs(c)))
    return d_err, g_err


def _assert_within(actual, expected, bound, what):
    error = (actual - expected).abs()
    worst = (error - bound).max()
    assert worst <= 0, f"{what}: |error| exceeds the bound by {worst.item():.3g} (max error {error.max().item():.3g})"


def _buffers_and_rng(model):
    return [b.clone() for b in model.buffers()], torch.get_rng_state()


# ------------------------------------------------------------------------- FOGZO

FOGZO_CASES = [
    # kind, dtype, n, beta, options
    pytest.param("mlp", torch.float64, 1, None, {}, id="mlp-n1-linear-beta"),
    pytest.param("mlp", torch.float64, 3, None, {}, id="mlp-n3-linear-beta"),
    pytest.param("mlp", torch.float64, 1, 0.7, {"perturb": "all", "guide_norm": 3.0}, id="mlp-n1-all-r3"),
    pytest.param("mlp", torch.float64, 4, 0.5, {"perturb": "all", "normalize": "tensor", "guide_norm": 2.0},
                 id="mlp-n4-all-tensor"),
    pytest.param("mlp", torch.float64, 2, 0.6, {"one_sided": True, "per_channel": True}, id="mlp-n2-onesided-pc"),
    pytest.param("mlp", torch.float64, 1, 0.8, {"normalize": "tensor", "zero_guide": True}, id="mlp-n1-zero-guide"),
    pytest.param("mlp", torch.float64, 2, 0.5, {"noise_stream": "counter"}, id="mlp-n2-counter"),
    pytest.param("mlp", torch.float64, 2, 0.5, {"vectorize": 3}, id="mlp-n2-vectorized"),
    pytest.param("mlp", torch.float64, 1, 0.0, {"perturb": "all"}, id="mlp-n1-beta0"),
    pytest.param("conv", torch.float64, 1, None, {"perturb": "all"}, id="conv-n1-all-linear-beta"),
    pytest.param("conv", torch.float64, 3, 0.4, {"normalize": "tensor", "per_channel": True},
                 id="conv-n3-tensor-pc"),
    pytest.param("attention", torch.float64, 1, 0.6, {"guide_norm": 0.5}, id="attention-n1"),
    pytest.param("attention", torch.float64, 2, None, {"perturb": "all", "one_sided": True},
                 id="attention-n2-all-onesided"),
    pytest.param("mlp", torch.float32, 2, 0.6, {"perturb": "all"}, id="mlp-n2-all-float32"),
]


@pytest.mark.parametrize("kind,dtype,n,beta,options", FOGZO_CASES)
def test_fogzo_matches_the_reference_step(kind, dtype, n, beta, options, monkeypatch):
    """Three consecutive steps (the first checks where weights are read, the later ones shift
    the weights inside the layers); with the linear schedule (T = 2, β_min = 0.3) they run at
    β = 1, 0.65 and 0.3."""
    options = dict(options)
    per_channel = options.pop("per_channel", False)
    zero_guide = options.pop("zero_guide", False)
    perturb = options.setdefault("perturb", "quantized")
    normalize = options.get("normalize", "global")
    guide_norm = options.get("guide_norm", 1.0)
    one_sided = options.get("one_sided", False)
    model, x, y = _model(kind, dtype, per_channel)
    if zero_guide:  # every weight of the first layer clipped: its STE gradient is exactly 0
        with torch.no_grad():
            model[0].weight.fill_(100.0)
    estimator = fogzo.FOGZO(model, total_steps=2, beta_min=0.3, beta=beta, n=n, seed=3, eps=EPS, **options)
    eps_bar = estimator.perturbed.smoothing.eps_bar
    unit = torch.finfo(dtype).eps / 2
    draws = _Draws(monkeypatch)
    for step in range(3):
        chosen, others = _perturbed(model, perturb, eps_bar)
        assert [name for name, _, _ in chosen] == [entry.name for entry in estimator.perturbed.tensors]
        twin = copy.deepcopy(model)
        twin_params = dict(twin.named_parameters())
        draws.clear()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(100 + step)
        info = estimator.estimate(lambda: F.cross_entropy(model(x), y))
        fast_state = _buffers_and_rng(model)

        beta_t = reference.beta_at(step, 2, 0.3) if beta is None else beta
        assert info.beta == beta_t
        noises = [[draws.u(name, i, p) for name, p, _ in chosen] for i in range(n)]
        signs = [draws.s(i) if beta_t > 0 else 1.0 for i in range(n)]
        torch.manual_seed(100 + step)
        ref = reference.fogzo_step(
            lambda: F.cross_entropy(twin(x), y), [twin_params[name] for name, _, _ in chosen],
            [c for _, _, c in chosen], noises, signs, beta=beta_t, eps_bar=eps_bar, guide_norm=guide_norm,
            normalize=normalize, one_sided=one_sided, model=twin, others=[twin_params[name] for name, _ in others],
        )
        ref_state = _buffers_and_rng(twin)

        assert info.loss == ref.loss0
        if zero_guide:
            assert ref.guide[0].abs().max() == 0 and ref.guide[1].abs().max() > 0
        d_err, g_err = _bounds(ref, noises, [c for _, _, c in chosen], eps_bar, one_sided, beta_t, unit)
        for i, (fast, slow) in enumerate(zip(info.differences, ref.differences)):
            assert abs(fast - slow) <= d_err[i], f"step {step}: d_{i} = {fast} vs {slow}"
        for (name, param, _), expected, bound in zip(chosen, ref.gradients, g_err):
            _assert_within(param.grad, expected, bound, f"step {step}: G_W of {name}")
        for (name, param), expected in zip(others, ref.ste_gradients[len(chosen):]):  # keep the STE gradient
            if expected is None:
                assert param.grad is None, name
            else:
                _assert_within(param.grad, expected, KAPPA * unit * expected.abs().max(), f"step {step}: g_W of {name}")
        # Afterwards: buffers as the STE pass left them, the RNG as after the STE pass.
        assert all(torch.equal(a, b) for a, b in zip(fast_state[0], ref_state[0]))
        assert torch.equal(fast_state[1], ref_state[1])
        with torch.no_grad():  # move on, so the next step sees other weights
            for param in model.parameters():
                if param.grad is not None:
                    param.sub_(0.05 * param.grad)


# -------------------------------------------------------------------------- SPSA

SPSA_CASES = [
    pytest.param("mlp", 1, {}, id="mlp-n1"),
    pytest.param("mlp", 3, {"perturb": "all", "report_loss": False}, id="mlp-n3-all-noloss"),
    pytest.param("mlp", 2, {"one_sided": True, "per_channel": True}, id="mlp-n2-onesided-pc"),
    pytest.param("conv", 2, {"perturb": "all"}, id="conv-n2-all"),
    pytest.param("mlp", 3, {"vectorize": 2, "report_loss": False}, id="mlp-n3-vectorized"),
    pytest.param("attention", 3, {"report_loss": False}, id="attention-n3"),
]


@pytest.mark.parametrize("kind,n,options", SPSA_CASES)
def test_spsa_matches_the_reference_step(kind, n, options, monkeypatch):
    options = dict(options)
    per_channel = options.pop("per_channel", False)
    perturb = options.setdefault("perturb", "quantized")
    one_sided = options.get("one_sided", False)
    report_loss = options.get("report_loss", True)
    dtype = torch.float64
    model, x, y = _model(kind, dtype, per_channel)
    estimator = fogzo.SPSA(model, n=n, seed=5, eps=EPS, **options)
    eps_bar = estimator.perturbed.smoothing.eps_bar
    unit = torch.finfo(dtype).eps / 2
    draws = _Draws(monkeypatch)
    for step in range(2):
        chosen, _ = _perturbed(model, perturb, eps_bar)
        assert [name for name, _, _ in chosen] == [entry.name for entry in estimator.perturbed.tensors]
        twin = copy.deepcopy(model)
        twin_params = dict(twin.named_parameters())
        draws.clear()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(200 + step)
        info = estimator.estimate(lambda: F.cross_entropy(model(x), y))
        noises = [[draws.u(name, i, p) for name, p, _ in chosen] for i in range(n)]
        assert all((name, i) in draws.noise for name, _, _ in chosen for i in range(n))
        torch.manual_seed(200 + step)
        ref = reference.spsa_step(
            lambda: F.cross_entropy(twin(x), y), [twin_params[name] for name, _, _ in chosen],
            [c for _, _, c in chosen], noises, eps_bar=eps_bar, one_sided=one_sided, report_loss=report_loss,
            model=twin,
        )
        if report_loss:
            assert info.loss == ref.loss0
        d_err, g_err = _bounds(ref, noises, [c for _, _, c in chosen], eps_bar, one_sided, 0.0, unit)
        for i, (fast, slow) in enumerate(zip(info.differences, ref.differences)):
            assert abs(fast - slow) <= d_err[i], f"step {step}: d_{i} = {fast} vs {slow}"
        for (name, param, _), expected, bound in zip(chosen, ref.gradients, g_err):
            _assert_within(param.grad, expected, bound, f"step {step}: G_W of {name}")
        with torch.no_grad():
            for param in model.parameters():
                if param.grad is not None:
                    param.sub_(0.05 * param.grad)


# ------------------------------------------------------------ the reference itself


def test_reference_guide_and_schedule_follow_the_equations():
    """ĝ has norm r (global) or r/√K per nonzero tensor ("tensor"); β_t is linear to β_min."""
    g = [torch.tensor([3.0, 4.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
         torch.tensor([[1.0], [0.0]], dtype=torch.float64)]
    c = [2.0, 1.0, torch.tensor([[0.5], [1.0]], dtype=torch.float64)]
    global_guide = reference.guide(g, c, guide_norm=3.0)
    assert math.isclose(math.sqrt(sum(float((t * t).sum()) for t in global_guide)), 3.0)
    torch.testing.assert_close(global_guide[0], 3.0 * torch.tensor([6.0, 8.0], dtype=torch.float64) / math.sqrt(100.25))
    per_tensor = reference.guide(g, c, guide_norm=2.0, normalize="tensor")  # K = 2 nonzero tensors
    assert [float(t.norm()) for t in per_tensor] == pytest.approx([2 / math.sqrt(2), 0.0, 2 / math.sqrt(2)])
    assert [reference.beta_at(t, 4, 0.2) for t in (0, 2, 4, 9)] == [1.0, 0.6, pytest.approx(0.2), pytest.approx(0.2)]
