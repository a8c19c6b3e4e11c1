"""torch.compile: quantized forwards trace without graph breaks and compute what eager mode does.

``torch._dynamo.explain`` traces without generating code (cheap); the equality checks use
the ``aot_eager`` backend (dynamo + AOTAutograd, eager kernels) for whole estimator steps and
inductor once for a forward (the backend users get from ``torch.compile(model)``).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fogzo
from fogzo.models import build_model

dynamo = pytest.importorskip("torch._dynamo")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def _mlp(**config):
    torch.manual_seed(0)
    return fogzo.quantize(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), fogzo.QuantConfig(bits=2, **config))


def _breaks(model, *inputs):
    explanation = dynamo.explain(model)(*inputs)
    return explanation.graph_break_count, [str(reason.reason).splitlines()[0] for reason in explanation.break_reasons]


@pytest.mark.parametrize("config", [{}, {"per_channel": True, "step_size": "lsq"}, {"activation_bits": 4}])
def test_quantized_mlp_forward_has_no_graph_break(config):
    model = _mlp(**config)
    x = torch.randn(8, 16)
    model(x)  # an activation quantizer initialises itself in its first forward (a traced where)
    assert _breaks(model, x) == (0, [])


def test_quantized_llama_forward_has_no_graph_break():
    model = fogzo.quantize(build_model("llama-1m", n_layers=2), fogzo.QuantConfig(bits=2), skip_first_last=True)
    tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    assert _breaks(model, tokens) == (0, [])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _breaks(model, tokens) == (0, [])


@pytest.mark.parametrize("make", [
    lambda m: fogzo.STE(m),
    lambda m: fogzo.FOGZO(m, total_steps=10, beta=0.5, seed=3),
    lambda m: fogzo.FOGZO(m, total_steps=10, beta=0.5, seed=3, one_sided=True, noise_stream="counter"),
    lambda m: fogzo.SPSA(m, n=2, seed=3),
])
def test_estimator_steps_through_a_compiled_model_equal_eager_steps(make):
    """The estimators see the module; the closure calls torch.compile(model). Same differences
    and gradients as eager steps, no graph break, and a few graphs that do not grow with the
    steps (the STE pass and the perturbed passes: the shift is written into the weights'
    storage, which a compiled graph reads like any parameter)."""
    from torch._dynamo.utils import counters

    eager = _mlp()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(2))
    estimators = make(eager), make(compiled_model)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled_model)]
    counters.clear()
    for _ in range(3):
        infos = []
        for estimator, optimizer, forward in zip(estimators, optimizers, (eager, compiled)):
            optimizer.zero_grad(set_to_none=True)
            infos.append(estimator.estimate(lambda: F.cross_entropy(forward(x), y)))
        assert infos[0].differences == pytest.approx(infos[1].differences, rel=1e-5, abs=1e-7)
        for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters()):
            assert (a.grad is None) == (b.grad is None), name
            if a.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
        for optimizer in optimizers:
            optimizer.step()
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] <= 4


def test_inductor_compiled_forward_equals_eager():
    model = _mlp()
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model)
    try:
        out = compiled(x)
    except Exception as error:  # no C++ compiler on this machine: nothing to compare
        pytest.skip(f"inductor cannot compile here: {type(error).__name__}")
    torch.testing.assert_close(out, model(x), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)


def test_fresh_model_with_activation_quantizers_compiles_with_fullgraph():
    """The activation quantizers' first-batch initialisation is traced (no host read of
    ``initialized``): a fresh model compiles with ``fullgraph=True`` and its steps equal eager ones."""
    eager = _mlp(activation_bits=4)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(2))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled_model)]
    for _ in range(2):
        for forward, optimizer in zip((eager, compiled), optimizers):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(forward(x), y).backward()
            optimizer.step()
        for (name, a), b in zip(eager.state_dict().items(), compiled_model.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert bool(compiled_model[0].input_quantizer.initialized)
