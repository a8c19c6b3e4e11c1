"""STE, n-SPSA and FOGZO against docs/method.md §4 (the step) and §7 (noise, and what a step may change)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fogzo
from fogzo.estimators import reference
from fogzo.smoothing import Smoothing


def _mlp(bits=2, seed=0, hidden=12):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 4))
    return fogzo.quantize(model, fogzo.QuantConfig(bits=bits))


def _batch(seed=0, size=32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 8, generator=generator), torch.randint(0, 4, (size,), generator=generator)


def _counting_closure(model, x, y):
    calls = {"forward": 0}

    def closure():
        calls["forward"] += 1
        return F.cross_entropy(model(x), y)

    return closure, calls


def _grads(model):
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


# ---------------------------------------------------------------- pass counts


@pytest.mark.parametrize("n", [1, 3])
def test_pass_counts(n):
    x, y = _batch()
    model = _mlp()
    cases = [
        (fogzo.STE(model), 1, 1, 0),
        (fogzo.SPSA(model, n=n), 1 + 2 * n, 0, 0),
        # the first step's one-time check that the loss uses every perturbed tensor: one more forward
        (fogzo.SPSA(model, n=n, report_loss=False), 2 * n, 0, 1),
        (fogzo.FOGZO(model, total_steps=10, n=n), 1 + 2 * n, 1, 0),
        (fogzo.FOGZO(model, total_steps=10, n=n, one_sided=True), 1 + n, 1, 0),
    ]
    for estimator, forwards, backwards, check in cases:
        closure, calls = _counting_closure(model, x, y)
        model.zero_grad(set_to_none=True)
        info = estimator.estimate(closure)
        assert (info.forward_passes, info.backward_passes) == (forwards, backwards), type(estimator)
        assert calls["forward"] == forwards + check
        assert info.compute_units == forwards + 2 * backwards


def test_ste_fraction_runs_plain_ste_first():
    x, y = _batch()
    model = _mlp()
    estimator = fogzo.FOGZO(model, total_steps=10, ste_fraction=0.3)
    infos = []
    for _ in range(5):
        model.zero_grad(set_to_none=True)
        infos.append(estimator.estimate(lambda: F.cross_entropy(model(x), y)))
    assert [i.forward_passes for i in infos] == [1, 1, 1, 3, 3]
    assert [i.beta is None for i in infos] == [True, True, True, False, False]


# ------------------------------------------------------- special cases of β


def test_fogzo_beta_zero_equals_spsa_with_same_noise():
    x, y = _batch()
    model_a, model_b = _mlp(), _mlp()
    for n in (1, 4):
        model_a.zero_grad(set_to_none=True)
        model_b.zero_grad(set_to_none=True)
        fogzo.FOGZO(model_a, total_steps=10, beta=0.0, n=n, seed=7).estimate(lambda: F.cross_entropy(model_a(x), y))
        fogzo.SPSA(model_b, n=n, seed=7).estimate(lambda: F.cross_entropy(model_b(x), y))
        for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
            if name.endswith("weight"):  # the perturbed set; biases keep FOGZO's STE gradient
                assert torch.equal(a.grad, b.grad), name


def _with_weights(model, weights):
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for layer, w in zip([clone[0], clone[2]], weights):
            layer.weight.copy_(w)
    return clone


def test_fogzo_beta_one_is_directional_difference_along_ste_direction():
    x, y = _batch()
    model = _mlp()
    eps_bar = fogzo.smoothing_for("identity").eps_bar
    layers = [model[0], model[2]]
    # The STE direction ĝ = c·g_W / ‖c·g_W‖ computed by hand.
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    scales = [layer.weight_quantizer.alpha for layer in layers]
    g_x = [c * layer.weight.grad for c, layer in zip(scales, layers)]
    norm = torch.sqrt(sum(g.square().sum() for g in g_x))
    direction = [g / norm for g in g_x]
    shifted = [
        [layer.weight.detach() + sign * c * eps_bar * d for layer, c, d in zip(layers, scales, direction)]
        for sign in (1, -1)
    ]
    with torch.no_grad():
        plus = F.cross_entropy(_with_weights(model, shifted[0])(x), y)
        minus = F.cross_entropy(_with_weights(model, shifted[1])(x), y)
    derivative = (plus - minus) / (2 * eps_bar)
    model.zero_grad(set_to_none=True)
    info = fogzo.FOGZO(model, total_steps=10, beta=1.0, seed=3).estimate(lambda: F.cross_entropy(model(x), y))
    assert info.differences[0] == pytest.approx(derivative.item(), rel=1e-4, abs=1e-7)
    for layer, c, d in zip(layers, scales, direction):
        torch.testing.assert_close(layer.weight.grad, derivative * d / c, rtol=1e-4, atol=1e-8)


# ------------------------------------------------------------- unbiasedness


class _Probe(nn.Module):
    """L(W) = Σ_k r_k Q(W)_k through a quantized layer's own forward."""

    def __init__(self, weights, noise, r):
        super().__init__()
        self.layer = fogzo.quantize(
            nn.Sequential(nn.Linear(1, weights.numel(), bias=False)), fogzo.QuantConfig(bits=2, noise=noise)
        )[0]
        with torch.no_grad():
            self.layer.weight.copy_(weights.reshape(-1, 1))
            self.layer.weight_quantizer.alpha.fill_(1.0)
        self.register_buffer("r", r)

    def forward(self):
        return (self.layer(torch.ones(1, 1))[0] * self.r).sum()


@pytest.mark.parametrize("noise", ["gaussian", "uniform"])
def test_spsa_is_unbiased_for_the_smoothed_loss(noise):
    """E[G] = r_k · Σ_t ψ_ε̄(t − x_k), ψ the zero-bias transform of the noise law (= the
    noise law itself for Gaussian noise, where it equals the STE surrogate slope)."""
    weights = torch.tensor([-2.2, -1.6, -0.9, -0.45, 0.1, 0.5, 0.62, 1.3])
    r = torch.tensor([1.0, -0.5, 2.0, 1.5, -1.0, 0.7, 1.2, -2.0])
    probe = _Probe(weights, noise, r)
    estimator = fogzo.SPSA(probe, n=1, seed=11, report_loss=False)
    samples = []
    for _ in range(3000):
        probe.zero_grad(set_to_none=True)
        estimator.estimate(probe)
        samples.append(probe.layer.weight.grad[:, 0].clone())
    samples = torch.stack(samples).double()
    mean, standard_error = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    smoothing = probe.layer.weight_quantizer.smoothing
    levels = probe.layer.weight_quantizer.levels
    thresholds = torch.tensor([-1.5, -0.5, 0.5], dtype=torch.float64)
    z = (thresholds[:, None] - weights.double()[None]) / smoothing.eps_bar
    expected = r.double() * (smoothing.law.zero_bias_pdf(z) / smoothing.eps_bar).sum(0)
    assert torch.all((mean - expected).abs() < 5 * standard_error), (mean, expected, standard_error)
    if noise == "gaussian":  # Stein: SPSA and the STE estimate the same smoothed gradient
        ste_slope = smoothing.surrogate_slope(weights.double(), levels.first_threshold, levels.num_thresholds, 1.0)
        torch.testing.assert_close(expected, r.double() * ste_slope)


# ----------------------------------------------------------------- state safety


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.norm(self.fc1(x)))))


def _net():
    torch.manual_seed(0)
    return fogzo.quantize(_Net(), fogzo.QuantConfig(bits=2))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "make",
    [
        lambda m: fogzo.FOGZO(m, total_steps=5, n=2, beta=0.5),
        lambda m: fogzo.FOGZO(m, total_steps=5, n=2, one_sided=True, perturb="all"),
        lambda m: fogzo.SPSA(m, n=3, perturb="all"),
    ],
)
def test_parameters_buffers_and_global_rng_match_a_plain_ste_step(make):
    x, y = _batch()
    reference, model = _net(), _net()
    torch.manual_seed(123)
    fogzo.STE(reference).estimate(lambda: F.cross_entropy(reference(x), y))
    rng_after_ste = torch.get_rng_state()
    estimator = make(model)
    torch.manual_seed(123)
    estimator.estimate(lambda: F.cross_entropy(model(x), y))
    assert torch.equal(torch.get_rng_state(), rng_after_ste)
    for (key, expected), actual in zip(_state(reference).items(), _state(model).values()):
        assert torch.equal(expected, actual), key
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        assert type(p) is type(q) is nn.Parameter, name


def test_perturbed_passes_see_the_same_dropout_masks_as_the_ste_pass():
    x, y = _batch()
    model = _net()
    seen = []
    model.drop.register_forward_hook(lambda module, args, out: seen.append((args[0] != 0, out == 0)))
    fogzo.FOGZO(model, total_steps=5, n=2).estimate(lambda: F.cross_entropy(model(x), y))
    assert len(seen) == 5
    reference_nonzero, reference_zero = seen[0]
    assert (reference_nonzero & reference_zero).any()
    for nonzero, zero in seen[1:]:
        # Dropped = zero output from a nonzero input; compare where both inputs are nonzero
        # (ReLU zeros legitimately move with the perturbation).
        both = nonzero & reference_nonzero
        assert both.float().mean() > 0.3
        assert torch.equal(zero[both], reference_zero[both])


def test_same_seed_gives_bit_identical_gradients_and_other_seed_does_not():
    x, y = _batch()
    runs = []
    for seed in (5, 5, 6):
        model = _mlp()
        estimator = fogzo.FOGZO(model, total_steps=10, n=2, beta=0.9, seed=seed, perturb="all")
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            estimator.estimate(lambda: F.cross_entropy(model(x), y))
        runs.append(_grads(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_state_dict_resumes_the_noise_stream():
    x, y = _batch()
    model = _mlp()
    first = fogzo.FOGZO(model, total_steps=10, beta=0.5, seed=1)
    first.estimate(lambda: F.cross_entropy(model(x), y))
    resumed = fogzo.FOGZO(model, total_steps=10, beta=0.5, seed=99)
    resumed.load_state_dict(first.state_dict())
    model.zero_grad(set_to_none=True)
    first.estimate(lambda: F.cross_entropy(model(x), y))
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    resumed.estimate(lambda: F.cross_entropy(model(x), y))
    assert all(torch.equal(expected[k], v) for k, v in _grads(model).items())


def test_gradients_accumulate_like_backward():
    x, y = _batch()
    model = _mlp()
    estimator = fogzo.FOGZO(model, total_steps=10, beta=0.5, seed=2)
    model.zero_grad(set_to_none=True)
    estimator.estimate(lambda: F.cross_entropy(model(x), y))
    single = _grads(model)
    estimator.load_state_dict({"seed": 2, "step": 0})
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    estimator.estimate(lambda: F.cross_entropy(model(x), y))
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, single[name] + 1)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda m: fogzo.FOGZO(m, total_steps=10, beta_min=1.5), "1.5"),
        (lambda m: fogzo.FOGZO(m, total_steps=10, beta=-0.1), "-0.1"),
        (lambda m: fogzo.FOGZO(m, total_steps=0), "total_steps"),
        (lambda m: fogzo.FOGZO(m, total_steps=10, n=0), "n must"),
        (lambda m: fogzo.SPSA(m, n=-2), "-2"),
        (lambda m: fogzo.FOGZO(m, total_steps=10, perturb="all", eps=0.0), "eps"),
        (lambda m: fogzo.FOGZO(m, total_steps=10, perturb="some"), "some"),
        (lambda m: fogzo.FOGZO(m, total_steps=10, ste_fraction=1.2), "1.2"),
        (lambda m: fogzo.FOGZO(m, total_steps=10, on_nonfinite="ignore"), "ignore"),
    ],
)
def test_bad_hyperparameters_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make(_mlp())


def test_schedule_returning_bad_beta_raises_at_estimate():
    x, y = _batch()
    model = _mlp()
    estimator = fogzo.FOGZO(model, total_steps=10, beta=lambda step: 2.0)
    with pytest.raises(ValueError, match="2.0"):
        estimator.estimate(lambda: F.cross_entropy(model(x), y))


def test_closure_must_return_a_scalar():
    x, y = _batch()
    model = _mlp()
    for estimator in (fogzo.STE(model), fogzo.FOGZO(model, total_steps=3), fogzo.SPSA(model)):
        with pytest.raises(ValueError, match="scalar"):
            estimator.estimate(lambda: F.cross_entropy(model(x), y, reduction="none"))


def test_model_with_nothing_to_perturb():
    with pytest.raises(ValueError, match="nothing to perturb"):
        fogzo.FOGZO(nn.Sequential(nn.Linear(3, 3)), total_steps=10)


class _Trap(nn.Module):
    """Returns inf in a perturbed pass (those run without autograd)."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))

    def forward(self, h):
        return h * self.gain if torch.is_grad_enabled() else h * self.gain * float("inf")


def _snapshot(model, estimator):
    """Parameters, buffers, .grad, the estimator's state and the global RNG."""
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    return _state(model), grads, estimator.state_dict(), torch.get_rng_state()


def _assert_unchanged(model, estimator, snapshot):
    state, grads, estimator_state, rng = snapshot
    for key, value in _state(model).items():
        assert torch.equal(value, state[key]), key
    for name, p in model.named_parameters():
        if grads[name] is None:
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.equal(p.grad, grads[name]), name
    assert estimator.state_dict() == estimator_state
    assert torch.equal(torch.get_rng_state(), rng)


def _with_old_gradients(model, *names):
    """Gradients from an earlier micro-batch on some parameters (others None)."""
    generator = torch.Generator().manual_seed(9)
    for name, p in model.named_parameters():
        p.grad = torch.randn(p.shape, generator=generator) if name in names else None


def test_nonfinite_perturbed_loss_raises_or_skips_and_leaves_everything_untouched():
    x, y = _batch()
    model = nn.Sequential(_mlp(), _Trap())
    model[1].__dict__["gain_reference"] = model[1].gain  # a plain attribute, not a second owner
    _with_old_gradients(model, "0.0.weight", "0.2.bias")
    for on_nonfinite in ("raise", "skip"):
        estimator = fogzo.FOGZO(model, total_steps=10, perturb="all", on_nonfinite=on_nonfinite)
        snapshot = _snapshot(model, estimator)
        if on_nonfinite == "raise":
            with pytest.raises(FloatingPointError, match="non-finite loss in a perturbed forward pass.*unperturbed L"):
                estimator.estimate(lambda: F.cross_entropy(model(x), y))
            _assert_unchanged(model, estimator, snapshot)
        else:
            info = estimator.estimate(lambda: F.cross_entropy(model(x), y))
            assert info.skipped and info.skip_reason == "perturbed_loss"
            assert estimator.state_dict()["step"] == 1  # the next step draws new noise
            estimator.load_state_dict(snapshot[2])
            _assert_unchanged(model, estimator, snapshot)  # .grad: only the old gradients
        assert model[1]._parameters["gain"] is model[1].gain_reference


class _NaNAbove(nn.Module):
    """Returns NaN for inputs whose norm exceeds ``limit`` (a diverging model)."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit

    def forward(self, h):
        return h * float("nan") if h.norm() > self.limit else h


@pytest.mark.parametrize("make, reason", [
    (lambda m, s: fogzo.FOGZO(m, total_steps=10, on_nonfinite=s), "loss"),
    (lambda m, s: fogzo.FOGZO(m, total_steps=10, ste_fraction=0.5, on_nonfinite=s), "loss"),
    (lambda m, s: fogzo.SPSA(m, n=2, on_nonfinite=s), "loss"),
])
def test_nonfinite_unperturbed_loss_is_reported_as_such_and_a_skip_leaves_no_gradient(make, reason):
    x, y = _batch()
    model = nn.Sequential(_net(), _NaNAbove(0.0))  # every pass is NaN, the STE pass first
    _with_old_gradients(model, "0.fc1.weight", "0.norm.weight")
    estimator = make(model, "raise")
    snapshot = _snapshot(model, estimator)
    with pytest.raises(FloatingPointError, match=r"unperturbed .*forward pass.*L\(W\) = nan"):
        estimator.estimate(lambda: F.cross_entropy(model(x), y))
    _assert_unchanged(model, estimator, snapshot)
    estimator = make(model, "skip")
    snapshot = _snapshot(model, estimator)
    info = estimator.estimate(lambda: F.cross_entropy(model(x), y))
    assert info.skipped and info.skip_reason == reason
    estimator.load_state_dict(snapshot[2])
    _assert_unchanged(model, estimator, snapshot)
    # An optimizer step after the skipped step applies only the old gradients: no NaN.
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("error", [_Interrupt, KeyboardInterrupt])
@pytest.mark.parametrize("make, fail_at", [
    (lambda m: fogzo.STE(m), 1),
    (lambda m: fogzo.FOGZO(m, total_steps=5, n=2, beta=0.5), 1),
    (lambda m: fogzo.FOGZO(m, total_steps=5, n=2, beta=0.5), 3),
    (lambda m: fogzo.FOGZO(m, total_steps=5, beta=0.5, perturb="all"), 3),
    (lambda m: fogzo.SPSA(m, n=2, perturb="all"), 2),
])
def test_an_exception_inside_estimate_changes_nothing(make, fail_at, error):
    """Failing in the STE pass or a perturbed pass (after the STE gradient, the shift and
    BatchNorm statistics were computed): parameters, buffers, .grad, the step counter and
    the global RNG are as before, and the next call gives what the failed one would have."""
    x, y = _batch()
    model = _net()
    _with_old_gradients(model, "fc1.weight", "norm.bias")
    estimator = make(model)
    estimator.load_state_dict({"seed": 0, "step": 1})
    calls = []

    def failing():
        calls.append(1)
        loss = F.cross_entropy(model(x), y)
        if len(calls) == fail_at:
            raise error("stop")
        return loss

    torch.manual_seed(5)
    snapshot = _snapshot(model, estimator)
    with pytest.raises(error):
        estimator.estimate(failing)
    _assert_unchanged(model, estimator, snapshot)
    estimator.estimate(lambda: F.cross_entropy(model(x), y))
    result = _grads(model), _state(model)
    reference = _net()
    _with_old_gradients(reference, "fc1.weight", "norm.bias")
    reference_estimator = make(reference)
    reference_estimator.load_state_dict({"seed": 0, "step": 1})
    torch.manual_seed(5)
    reference_estimator.estimate(lambda: F.cross_entropy(reference(x), y))
    for name, value in _grads(reference).items():
        assert torch.equal(result[0][name], value), name
    for key, value in _state(reference).items():
        assert torch.equal(result[1][key], value), key


# ------------------------------------------------------------------- training


@pytest.mark.parametrize(
    "make, lr, steps",
    [
        (lambda m: fogzo.STE(m), 1e-2, 150),
        (lambda m: fogzo.FOGZO(m, total_steps=150, beta_min=0.99), 1e-2, 150),
        (lambda m: fogzo.FOGZO(m, total_steps=150, beta_min=0.99, one_sided=True), 1e-2, 150),
        (lambda m: fogzo.SPSA(m, n=16, perturb="all"), 1e-2, 150),
    ],
)
def test_training_a_quantized_mlp_lowers_the_loss(make, lr, steps):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=generator)
    teacher = torch.randn(8, 4, generator=generator)
    y = (x @ teacher).argmax(1)
    model = _mlp(hidden=16)
    estimator = make(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    with torch.no_grad():
        initial = F.cross_entropy(model(x), y).item()
    for step in range(steps):
        batch = torch.randint(0, 512, (64,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        estimator.estimate(lambda: F.cross_entropy(model(x[batch]), y[batch]))
        optimizer.step()
    with torch.no_grad():
        final = F.cross_entropy(model(x), y).item()
    assert final < 0.8 * initial, (initial, final)


# ------------------------------------------------------------------ vectorize


@pytest.mark.parametrize(
    "make",
    [
        lambda m, v: fogzo.SPSA(m, n=6, seed=4, perturb="all", vectorize=v),
        lambda m, v: fogzo.FOGZO(m, total_steps=10, n=3, beta=0.7, seed=4, vectorize=v),
        lambda m, v: fogzo.FOGZO(m, total_steps=10, n=3, beta=0.7, seed=4, one_sided=True, vectorize=v),
    ],
)
def test_vectorized_passes_equal_the_loop(make):
    x, y = _batch()
    results = []
    for vectorize in (None, 4):
        model = _mlp()
        info = make(model, vectorize).estimate(lambda: F.cross_entropy(model(x), y))
        results.append((info, _grads(model)))
    (loop_info, loop), (vector_info, vector) = results
    assert loop_info.forward_passes == vector_info.forward_passes
    # Same noise and weights; only the matmul summation order differs (batched vs single).
    torch.testing.assert_close(torch.tensor(vector_info.differences), torch.tensor(loop_info.differences), rtol=1e-4, atol=1e-5)
    for name in loop:
        torch.testing.assert_close(vector[name], loop[name], rtol=1e-3, atol=1e-5)


def test_perturb_all_covers_every_trainable_tensor_except_step_sizes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.LayerNorm(12), nn.Linear(12, 4))
    fogzo.quantize(model, fogzo.QuantConfig(bits=2, step_size="lsq", activation_bits=4))
    perturbed = fogzo.PerturbedSet.from_model(model, "all", eps=1e-2)
    names = [entry.name for entry in perturbed.tensors]
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]
    assert perturbed.num_coordinates == 8 * 12 + 12 + 12 + 12 + 12 * 4 + 4
    scales = [entry.coordinate_scale(perturbed.smoothing.eps_bar) for entry in perturbed.tensors]
    assert scales[1] == pytest.approx(1e-2 / perturbed.smoothing.eps_bar)  # c = ε/ε̄ for a bias
    assert torch.equal(scales[0], model[0].weight_quantizer.alpha.detach())


# ------------------------------------------------- the step against its equations


def _reference_fogzo(model, x, y, *, n, beta, one_sided, seed, guide_norm=1.0, step=0, noise_stream="blocks",
                     perturb="all"):
    """G_W of docs/method.md §4 from the plain reference step (fogzo.estimators.reference):
    explicit v_i, weights written, losses, d_i; the noise u_i from the eager generator of the
    stream, regenerated from the estimator's seed."""
    estimator = fogzo.FOGZO(model, total_steps=10, n=n, beta=beta, seed=seed, perturb=perturb, eps=1e-2,
                            one_sided=one_sided, guide_norm=guide_norm, noise_stream=noise_stream)
    estimator.load_state_dict({"seed": seed, "step": step})
    entries = estimator.perturbed.tensors
    eps_bar = estimator.perturbed.smoothing.eps_bar
    step_seed = estimator.counter.step_seed()
    result = reference.fogzo_step(
        lambda: F.cross_entropy(model(x), y),
        [entry.param for entry in entries],
        [entry.coordinate_scale(eps_bar) for entry in entries],
        [estimator.perturbed.noises(step_seed, i) for i in range(n)],
        [estimator.sign(step_seed, i) for i in range(n)],
        beta=beta, eps_bar=eps_bar, guide_norm=guide_norm, one_sided=one_sided, model=model,
    )
    model.zero_grad(set_to_none=True)
    return {entry.name: gradient for entry, gradient in zip(entries, result.gradients)}


@pytest.mark.parametrize("n", [1, 3])  # n = 1: shift built once in the gradient buffer; n = 3: regenerated
@pytest.mark.parametrize("one_sided", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("noise_stream", ["blocks", "counter"])
def test_fogzo_gradient_matches_the_equations(n, one_sided, per_channel, noise_stream):
    x, y = _batch(seed=3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))
    fogzo.quantize(model, fogzo.QuantConfig(bits=2, per_channel=per_channel))
    expected = _reference_fogzo(model, x, y, n=n, beta=0.6, one_sided=one_sided, seed=11, guide_norm=3.0,
                                noise_stream=noise_stream)
    estimator = fogzo.FOGZO(model, total_steps=10, n=n, beta=0.6, seed=11, perturb="all", eps=1e-2,
                            one_sided=one_sided, guide_norm=3.0, noise_stream=noise_stream)
    estimator.estimate(lambda: F.cross_entropy(model(x), y))
    for name, param in model.named_parameters():
        if name in expected:
            # Same noise, same weights; the estimator forms W ± c·ε̄·v and G = d·v/c in another
            # order (e.g. d·δ/(ε̄c²)), so agreement is to a few float32 ulps of the loss
            # differences, which ε̄ divides: rtol 1e-4 on d·v, atol for entries near 0.
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-5 * expected[name].abs().max().item())


class _TokenNet(nn.Module):
    """Embedding -> Conv1d -> Linear: fogzo's three kinds of single-weight layers."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, tokens):
        h = torch.relu(self.conv(self.embed(tokens).transpose(1, 2)))
        return self.head(h.mean(dim=2))


@pytest.mark.parametrize("one_sided", [False, True])
def test_in_place_shift_matches_the_equations_with_no_hook_and_no_parameter_replaced(one_sided, monkeypatch):
    """QuantLinear/Conv/Embedding compute with W + c·ε̄·v written into the weights' storage: the G_W
    of the equations, no forward hook, every Parameter object (and the parameters' order) kept,
    and every parameter bit-identical after the step."""
    torch.manual_seed(0)
    model = fogzo.quantize(_TokenNet(), fogzo.QuantConfig(bits=2))
    tokens = torch.randint(0, 12, (16, 5), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(2))
    estimator = fogzo.FOGZO(model, total_steps=10, beta=0.6, seed=5, one_sided=one_sided, guide_norm=2.0)
    estimator.estimate(lambda: F.cross_entropy(model(tokens), y))  # step 0 (one-time checks)
    expected = _reference_fogzo(model, tokens, y, n=1, beta=0.6, one_sided=one_sided, seed=5, guide_norm=2.0,
                                step=1, perturb="quantized")
    hooks = []
    original = nn.Module.register_forward_pre_hook
    monkeypatch.setattr(nn.Module, "register_forward_pre_hook",
                        lambda self, *a, **k: hooks.append(self) or original(self, *a, **k))
    before = [(name, id(p), p.detach().clone()) for name, p in model.named_parameters()]
    model.zero_grad(set_to_none=True)
    estimator.estimate(lambda: F.cross_entropy(model(tokens), y))
    assert hooks == []
    after = list(model.named_parameters())
    assert [(name, id(p)) for name, p in after] == [(name, pid) for name, pid, _ in before]
    assert all(torch.equal(p, value) for (_, p), (_, _, value) in zip(after, before))
    for name, param in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-4,
                                       atol=1e-5 * expected[name].abs().max().item())


def _host_syncs(call):
    """Host reads of tensor values during ``call``: aten::_local_scalar_dense (item, float(),
    bool()) and Tensor.tolist (which dispatches no aten operator on a CPU)."""
    calls = []
    original = torch.Tensor.tolist

    def tolist(self):
        calls.append(1)
        return original(self)

    torch.Tensor.tolist = tolist
    try:
        with torch.profiler.profile() as prof:
            call()
    finally:
        torch.Tensor.tolist = original
    return len(calls) + sum(e.name == "aten::_local_scalar_dense" for e in prof.events())


@pytest.mark.parametrize("make, syncs", [
    (lambda m: fogzo.STE(m), 0),
    (lambda m: fogzo.FOGZO(m, total_steps=10, beta=0.5), 1),
    (lambda m: fogzo.FOGZO(m, total_steps=10, beta=0.5, one_sided=True, perturb="all"), 1),
    (lambda m: fogzo.FOGZO(m, total_steps=10, n=3, beta=0.5), 1),
    (lambda m: fogzo.SPSA(m, n=2), 1),
    (lambda m: fogzo.FOGZO(m, total_steps=10, beta=0.5, on_nonfinite="keep"), 3),  # checks before the passes
])
def test_host_syncs_per_step(make, syncs):
    """Losses, norms and differences stay on the device until one read at the end of the step
    (the STE step reads nothing: its info.loss is the 0-d loss tensor)."""
    x, y = _batch()
    model = _mlp()
    estimator = make(model)
    estimator.estimate(lambda: F.cross_entropy(model(x), y))
    model.zero_grad(set_to_none=True)
    infos = []
    assert _host_syncs(lambda: infos.append(estimator.estimate(lambda: F.cross_entropy(model(x), y)))) == syncs
    loss = infos[0].loss
    if isinstance(estimator, fogzo.STE):
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and not loss.requires_grad
    else:
        assert isinstance(loss, float)
    assert float(loss) == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-6)


def test_keep_mode_keeps_the_ste_gradient_when_a_perturbed_loss_is_not_finite():
    """on_nonfinite="keep" with a non-finite perturbed loss: .grad is the STE pass's gradient
    (the shift is not built in its buffer), so a loss scaler can apply it or skip."""
    x, y = _batch()
    model = nn.Sequential(_mlp(), _Trap())
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(x), y).backward()
    info = fogzo.FOGZO(model, total_steps=10, perturb="all", on_nonfinite="keep").estimate(
        lambda: F.cross_entropy(model(x), y)
    )
    assert info.skipped and info.skip_reason == "perturbed_loss"
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a.grad, b.grad), name


@pytest.mark.parametrize("n", [1, 3])
def test_noise_is_drawn_once_per_sample_and_step(n, monkeypatch):
    """u_i is drawn once per sample and step (one call for a small model), never regenerated. (The
    first step draws once more: the check that shifts survive the dtype.)"""
    from fogzo.estimators import perturbed_set as perturbed_module

    x, y = _batch()
    model = _mlp()
    estimator = fogzo.FOGZO(model, total_steps=10, n=n, beta=0.5, seed=0)
    estimator.estimate(lambda: F.cross_entropy(model(x), y))
    calls = []
    original = perturbed_module.block_noise

    def counting(smoothing, key, *args, **kwargs):
        calls.append(key)
        return original(smoothing, key, *args, **kwargs)

    monkeypatch.setattr(perturbed_module, "block_noise", counting)
    step_seed = estimator.counter.step_seed()
    estimator.estimate(lambda: F.cross_entropy(model(x), y))
    assert calls == [(step_seed, 0, sample) for sample in range(n)]


# ------------------------------------------------------------ block-seeded noise


@pytest.mark.parametrize("law", ["uniform", "gaussian", "logistic", "triangular"])
def test_block_noise_of_any_range_is_the_slice_of_the_whole(law, monkeypatch):
    """A shard [start, stop) draws exactly the elements the unsharded tensor draws there."""
    from fogzo.estimators import noise

    monkeypatch.setattr(noise, "NOISE_BLOCK", 100)  # many blocks on a small tensor
    smoothing = Smoothing(law, 0.5)
    key = (7, 0, 3, 1)
    whole = noise.block_noise(smoothing, key, (13, 37), torch.device("cpu"), torch.float32)
    flat = whole.view(-1)
    # Ranges cutting blocks at both ends, inside one block, on block edges, odd lengths
    # (the Gaussian kernel draws in groups of 16), and the empty range.
    for start, stop in [(0, 481), (37, 74), (150, 199), (100, 300), (455, 481), (5, 6), (200, 200), (99, 101)]:
        part = noise.block_noise(smoothing, key, (stop - start,), torch.device("cpu"), torch.float32, start, 481)
        assert torch.equal(part, flat[start:stop]), (start, stop)
    # Blocks are not copies of one another, and another key gives other numbers.
    assert not torch.equal(flat[:100], flat[100:200])
    other = noise.block_noise(smoothing, (7, 0, 4, 1), (13, 37), torch.device("cpu"), torch.float32)
    assert not torch.equal(whole, other)
    with pytest.raises(ValueError, match="outside"):
        noise.block_noise(smoothing, key, (10,), torch.device("cpu"), torch.float32, 475, 481)


def test_counter_noise_is_splitmix64_of_the_global_coordinate():
    """counter_bits(key, j) is the (j+1)-th SplitMix64 output seeded with key (wrapping int64)."""
    from fogzo.estimators import noise

    key = noise.derive_seed(7, 0, 3, 1)
    bits = noise.counter_bits(key, 1000, 300)
    expected = [noise._as_int64(noise._splitmix64(key + j * noise._GAMMA))
                for j in range(1000, 1300)]
    assert bits.tolist() == expected


@pytest.mark.parametrize("law", ["uniform", "gaussian", "logistic", "triangular"])
def test_counter_noise_of_any_range_is_the_slice_of_the_whole_and_has_the_law(law, monkeypatch):
    from fogzo.estimators import noise
    from fogzo.smoothing import NOISE_LAWS

    smoothing = Smoothing(law, 0.5)
    monkeypatch.setattr(noise, "COUNTER_CHUNK", 64)  # chunked generation of a small tensor
    whole = noise.counter_noise(smoothing, (7, 0, 3, 1), (13, 37), torch.device("cpu"), torch.float32)
    flat = whole.view(-1)
    for start, stop in [(0, 481), (37, 74), (150, 199), (455, 481), (5, 6), (200, 200)]:
        part = noise.counter_noise(smoothing, (7, 0, 3, 1), (stop - start,), torch.device("cpu"),
                                          torch.float32, start, 481)
        assert torch.equal(part, flat[start:stop]), (start, stop)
    with pytest.raises(ValueError, match="outside"):
        noise.counter_noise(smoothing, (7, 0, 3, 1), (10,), torch.device("cpu"), torch.float32, 475, 481)
    # Zero mean, unit variance: 5 standard errors (Var of u² is E[u⁴] − 1: at most 5 here).
    count = 200_000
    u = noise.counter_noise(smoothing, (1, 2), (count,), torch.device("cpu"), torch.float64)
    assert abs(u.mean().item()) < 5 / math.sqrt(count)
    assert abs(u.square().mean().item() - 1) < 5 * math.sqrt(5 / count)
    support = NOISE_LAWS[law].support
    assert u.abs().max().item() <= support
    # The uniform law's half-open support [−√3, √3), like uniform_: its lowest point is −√3.
    if law == "uniform":
        assert u.min().item() >= -math.sqrt(3) and u.max().item() < math.sqrt(3)


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("per_channel", [False, True])
def test_compiled_counter_noise_gives_the_equations_gradient(n, per_channel):
    """compile_noise=True: u from a kernel made by torch.compile; the same noise as eager mode,
    so the same G_W as the from-scratch reference."""
    from fogzo.estimators import noise

    x, y = _batch(seed=3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))
    fogzo.quantize(model, fogzo.QuantConfig(bits=2, per_channel=per_channel))
    smoothing = fogzo.smoothing_for("identity")
    eager = noise.counter_noise(smoothing, (5, 0, 0, 1), (40, 3), torch.device("cpu"), torch.float32)
    try:
        compiled = noise.counter_noise(smoothing, (5, 0, 0, 1), (40, 3), torch.device("cpu"), torch.float32,
                                              compiled=True)
    except Exception as error:  # inductor needs a C++ compiler
        pytest.skip(f"torch.compile does not work here: {type(error).__name__}")
    assert torch.equal(eager, compiled)
    expected = _reference_fogzo(model, x, y, n=n, beta=0.6, one_sided=False, seed=11, noise_stream="counter",
                                perturb="quantized")
    estimator = fogzo.FOGZO(model, total_steps=10, n=n, beta=0.6, seed=11, noise_stream="counter", compile_noise=True)
    estimator.estimate(lambda: F.cross_entropy(model(x), y))
    for name, param in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-5 * expected[name].abs().max().item())
    with pytest.raises(ValueError, match="compile_noise"):
        fogzo.SPSA(model, compile_noise=True)


def test_counter_noise_stream_is_used_and_reproducible():
    x, y = _batch()
    grads = []
    for stream in ("counter", "counter", "blocks"):
        model = _mlp()
        fogzo.SPSA(model, n=2, seed=4, noise_stream=stream).estimate(lambda: F.cross_entropy(model(x), y))
        grads.append(model[0].weight.grad)
    assert torch.equal(grads[0], grads[1]) and not torch.equal(grads[0], grads[2])
    with pytest.raises(ValueError, match="noise_stream"):
        fogzo.FOGZO(_mlp(), total_steps=10, noise_stream="philox")


# ------------------------------------------- weights read outside their owner's forward


def _explicit_difference(estimator, closure, sample=0):
    """(L(W + c·ε̄·u) − L(W − c·ε̄·u)) / 2ε̄ with the weights written in place (SPSA, n = 1)."""
    perturbed = estimator.perturbed
    eps_bar = perturbed.smoothing.eps_bar
    step_seed = estimator.counter.step_seed()
    originals = [entry.param.detach().clone() for entry in perturbed.tensors]
    shifts = [entry.coordinate_scale(eps_bar) * eps_bar * u
              for entry, u in zip(perturbed.tensors, perturbed.noises(step_seed, sample))]

    def loss_at(sign):
        with torch.no_grad():
            for entry, original, shift in zip(perturbed.tensors, originals, shifts):
                entry.param.copy_(original + sign * shift)
            value = closure().item()
            for entry, original in zip(perturbed.tensors, originals):
                entry.param.copy_(original)
        return value

    return (loss_at(1.0) - loss_at(-1.0)) / (2 * eps_bar)


def _check_spsa_against_explicit(model, closure, steps=2, **kwargs):
    """Every step's finite difference equals the explicit one (first step: checked pass)."""
    estimator = fogzo.SPSA(model, n=1, seed=3, **kwargs)
    for _ in range(steps):
        expected = _explicit_difference(estimator, closure)
        model.zero_grad(set_to_none=True)
        info = estimator.estimate(closure)
        assert expected != 0.0
        assert info.differences[0] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    return estimator


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_attention_output_projection_is_perturbed(mode):
    """nn.MultiheadAttention reads out_proj.weight in its own forward (and in eval mode
    torch's fused kernels read every weight of the layer directly)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True))
    getattr(model, mode)()
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    target = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))

    def closure():
        return F.mse_loss(model(x), target)

    weight = model[0].self_attn.out_proj.weight
    estimator = _check_spsa_against_explicit(model, closure, perturb=[weight], eps=1e-2)
    assert weight.grad is not None and weight.grad.abs().max() > 0


def test_quantized_attention_weights_are_perturbed_with_their_own_step_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True))
    fogzo.quantize(model, fogzo.QuantConfig(bits=2))
    attention = model[0].self_attn
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    target = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))

    def closure():
        return F.mse_loss(model(x), target)

    estimator = _check_spsa_against_explicit(model, closure)
    entries = {entry.name: entry for entry in estimator.perturbed.tensors}
    assert sorted(entries) == ["0.linear1.weight", "0.linear2.weight", "0.self_attn.in_proj_weight",
                               "0.self_attn.out_proj.weight"]
    eps_bar = estimator.perturbed.smoothing.eps_bar
    scale = entries["0.self_attn.in_proj_weight"].coordinate_scale(eps_bar)
    assert torch.equal(scale, attention.weight_quantizers["in_proj_weight"].alpha)
    assert torch.equal(entries["0.self_attn.out_proj.weight"].coordinate_scale(eps_bar),
                       attention.out_proj.weight_quantizer.alpha)
    model.zero_grad(set_to_none=True)
    info = fogzo.FOGZO(model, total_steps=10, beta=0.5, seed=1).estimate(closure)
    assert info.zero_differences == 0
    assert attention.in_proj_weight.grad.abs().max() > 0 and attention.out_proj.weight.grad.abs().max() > 0


class _ParentReadsChild(nn.Module):
    """A parent computing with its child's weight (``F.linear(x, child.weight)``), a weight
    tied between an embedding and an output layer, and a tied head read by the parent."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.child = nn.Linear(8, 8)
        self.out = nn.Linear(8, 10, bias=False)
        self.out.weight = self.embed.weight  # tied: two owners of one Parameter

    def forward(self, tokens):
        h = torch.tanh(F.linear(self.embed(tokens), self.child.weight, self.child.bias))
        return self.out(h) + F.linear(h, self.embed.weight)  # the tied weight, read by the parent too


@pytest.mark.parametrize("vectorize", [None, 2])
def test_weights_read_by_a_parent_and_tied_weights_are_perturbed(vectorize):
    torch.manual_seed(0)
    model = _ParentReadsChild()
    tokens = torch.randint(0, 10, (4, 6), generator=torch.Generator().manual_seed(1))

    def closure():
        return F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())

    estimator = _check_spsa_against_explicit(model, closure, perturb="all", eps=1e-2, vectorize=vectorize)
    assert [entry.name for entry in estimator.perturbed.tensors] == ["embed.weight", "child.weight", "child.bias"]


def test_weight_read_in_the_closure_is_perturbed():
    model = _mlp()
    x, y = _batch()

    def closure():  # a weight penalty outside every module's forward
        return F.cross_entropy(model(x), y) + 0.1 * model[0].weight.square().sum()

    _check_spsa_against_explicit(model, closure)


def test_unread_perturbed_tensor_raises_naming_it():
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(4, 2), "unused": nn.Linear(4, 2)})
    x = torch.randn(5, 4)
    for estimator in (fogzo.SPSA(model, perturb="all"), fogzo.SPSA(model, perturb="all", report_loss=False),
                      fogzo.FOGZO(model, total_steps=10, perturb="all")):
        with pytest.raises(ValueError, match=r"\['unused.weight', 'unused.bias'\] are not used by the loss"):
            estimator.estimate(lambda: model["used"](x).square().mean())
        assert all(p.grad is None for p in model.parameters()) and estimator.counter.step == 0


def test_weight_used_through_a_captured_reference_is_perturbed():
    """A tensor captured outside the model is the parameter itself: its storage holds W + δ too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 2))
    weight = model[0].weight
    x = torch.randn(5, 4)
    _check_spsa_against_explicit(model, lambda: F.linear(x, weight).square().mean(), perturb=[weight])
    assert weight.grad.abs().max() > 0


# ------------------------------------------------------------------ frozen weights


@pytest.mark.parametrize("make", [
    lambda m: fogzo.FOGZO(m, total_steps=10, beta=0.5),
    lambda m: fogzo.FOGZO(m, total_steps=10, beta=0.5, perturb="all"),
    lambda m: fogzo.SPSA(m, n=2),
])
def test_frozen_quantized_weight_is_neither_perturbed_nor_trained(make):
    model = _mlp()
    x, y = _batch()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    estimator = make(model)
    assert "0.weight" not in [entry.name for entry in estimator.perturbed.tensors]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        estimator.estimate(lambda: F.cross_entropy(model(x), y))
        assert model[0].weight.grad is None
        optimizer.step()
    assert torch.equal(model[0].weight, frozen)
    assert not torch.equal(model[2].weight, _mlp()[2].weight)  # the rest trains


def test_explicitly_perturbed_frozen_weight_raises():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"frozen.*\['0.weight'\]"):
        fogzo.SPSA(model, perturb=[model[0].weight, model[2].weight])
    model[2].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to perturb.*frozen"):
        fogzo.FOGZO(model, total_steps=10)


def test_weight_frozen_after_the_estimator_was_built_raises():
    model = _mlp()
    x, y = _batch()
    estimator = fogzo.FOGZO(model, total_steps=10)
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"\['0.weight'\] were frozen"):
        estimator.estimate(lambda: F.cross_entropy(model(x), y))
    assert model[0].weight.grad is None


def test_vectorize_refuses_a_model_whose_random_ops_vmap_does_not_reproduce():
    """nn.TransformerEncoderLayer in training mode: the masks of its dropouts differ under vmap
    (attention runs through vmap's fallback), so vectorized finite differences would carry
    dropout noise. The first vectorized step is checked against one looped pass and refused,
    with nothing changed; the same model in eval mode, and nn.Dropout layers, pass the check."""

    def make(dropout_model: bool):
        torch.manual_seed(0)
        if dropout_model:
            return nn.Sequential(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True))
        return nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.1), nn.Linear(32, 16), nn.Dropout(0.1))

    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    target = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))

    model = make(True).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    estimator = fogzo.SPSA(model, n=3, vectorize=3, seed=0, perturb="all")
    with pytest.raises(ValueError, match="vectorize=None"):
        estimator.estimate(lambda: F.mse_loss(model(x), target))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())

    for dropout_model, mode in ((True, "eval"), (False, "train")):
        model = make(dropout_model)
        getattr(model, mode)()
        loss = float(F.mse_loss(model(x), target))
        estimator = fogzo.SPSA(model, n=3, seed=0, perturb="all")
        torch.manual_seed(1)  # the same dropout masks for both
        looped = estimator.estimate(lambda: F.mse_loss(model(x), target))
        torch.manual_seed(1)
        vectorized = fogzo.SPSA(model, n=3, vectorize=3, seed=0, perturb="all").estimate(
            lambda: F.mse_loss(model(x), target))
        # d = (L₊ − L₋)/(2ε̄): each loss may move by the check's 256 ulps (eval mode runs torch's
        # fused kernels alone, not under vmap), so d by 256·eps·|L|/ε̄ (|L₊| ≈ |L₋| ≈ 2|L| at most)
        bound = 2 * 256 * torch.finfo(torch.float32).eps * loss / estimator.perturbed.smoothing.eps_bar
        assert vectorized.differences == pytest.approx(looped.differences, rel=0, abs=bound)


@pytest.mark.parametrize("stream", ["blocks", "counter"])
def test_one_noise_draw_per_sample_gives_the_numbers_of_the_tensor_by_tensor_draw(stream, monkeypatch):
    """A small model draws u_i in one call (d <= NOISE_BLOCK); a large one tensor by tensor, each
    tensor's range of the same vector: with NOISE_BLOCK shrunk below d the two paths must agree to
    the bit, and distinct tensors and samples must get distinct noise."""
    from fogzo.estimators import noise as noise_module
    from fogzo.estimators import perturbed_set as perturbed_module

    model = _mlp()
    one_draw = fogzo.PerturbedSet.from_model(model, "all", noise_stream=stream)
    assert one_draw._flat_sizes is not None
    monkeypatch.setattr(perturbed_module, "NOISE_BLOCK", 7)  # every block boundary cuts some tensor
    monkeypatch.setattr(noise_module, "NOISE_BLOCK", 7)
    by_tensor = fogzo.PerturbedSet.from_model(model, "all", noise_stream=stream)
    assert by_tensor._flat_sizes is None
    for sample in (0, 1):
        whole, parts = one_draw.noises(11, sample), by_tensor.noises(11, sample)
        assert [u.shape for u in whole] == [p.shape for p in model.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(whole, parts))
        targets = [torch.zeros_like(p) for p in model.parameters()]
        by_tensor.add_noise_(targets, 11, sample, 2.0)
        assert all(torch.equal(t, 2.0 * u) for t, u in zip(targets, parts))
    flat = torch.cat([u.flatten() for u in one_draw.noises(11, 0)])
    assert not torch.equal(flat, torch.cat([u.flatten() for u in one_draw.noises(11, 1)]))
    assert len(set(flat.tolist())) == flat.numel()  # no tensor repeats another's noise


def test_fogzo_on_a_model_with_float32_and_float64_parameters():
    """perturb="all" over a float32 body and a float64 head: the guide's norms are taken in float64
    (a float32 norm of a float64 gradient would narrow it and raised), the noise is drawn tensor by
    tensor in each tensor's dtype, and every gradient keeps its parameter's dtype. The float64 head's
    FOGZO gradient at beta = 1 is d·ĝ/c with d the measured directional derivative: it must point
    along the STE gradient (positive cosine)."""
    torch.manual_seed(0)
    body, head = nn.Linear(6, 8), nn.Linear(8, 3).double()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))

    def loss():
        return F.cross_entropy(head(torch.tanh(body(x)).double()), y)

    model = nn.ModuleDict({"body": body, "head": head})
    loss().backward()
    ste = head.weight.grad.clone()
    model.zero_grad()
    estimator = fogzo.FOGZO(model, total_steps=10, perturb="all", eps=1e-4, beta=1.0)
    assert estimator.perturbed._flat_sizes is None  # two dtypes: tensor by tensor
    info = estimator.estimate(loss)
    assert info.measured and [p.grad.dtype for p in model.parameters()] == [p.dtype for p in model.parameters()]
    assert F.cosine_similarity(head.weight.grad.flatten(), ste.flatten(), dim=0) > 0.99
