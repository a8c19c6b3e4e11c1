"""The benchmark workloads: models, their fixed batches and the step variants timed on them.

Shared by ``step_cost.py``, ``step_phases.py`` and ``compare_trees.py``. Every builder takes
the fogzo package to use as ``lib`` (``compare_trees.py`` passes an older copy of the
library imported under another name, so that both run on identical workloads).
:func:`compiled_factory` and :func:`explain_forward` serve the ``torch.compile`` variants.

=================  ==========================================  ==============================
name               model                                       batch (full / ``quick``)
=================  ==========================================  ==============================
mlp                MLP 784-256-10                              256 / 256
resnet20           CIFAR ResNet-20 (BatchNorm, training mode)  128×3×32×32 / 8×3×16×16, width 4
vit_tiny_cifar     DeiT-style ViT, D=96, 6 blocks, patch 4     128×3×32×32 / 8, D=48, 2 blocks
llama-1m           LLaMA-style LM, 1.0 M parameters            16 × 128 tokens / 4 × 32
llama-10m          LLaMA-style LM, 10.7 M parameters           16 × 128 tokens / 2 × 32, 1 block
llama-30m          paper-size LM, 30.4 M, bf16 autocast        8 × 512 tokens / 1 × 32, 2 blocks, vocab 512
llama-95m          paper-size LM, 95.5 M, bf16 autocast        8 × 512 tokens / 1 × 32, 2 blocks, vocab 512
tiny               MLP 32-64-10 (Python/dispatch overhead)     8 / 8
=================  ==========================================  ==============================

``llama-30m`` and ``llama-95m`` are opt-in (never in the default model list): they run the
forward under ``torch.autocast(dtype=torch.bfloat16)`` and use a fused AdamW where torch
has one for the device. ``tiny`` is the Python-time workload: its tensors are so small that
a step's wall time is the library's Python and dispatcher overhead.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fogzo

MODELS = ("mlp", "resnet20", "vit_tiny_cifar", "llama-1m", "llama-10m")
OPT_IN_MODELS = ("llama-30m", "llama-95m", "tiny")
ALL_MODELS = MODELS + OPT_IN_MODELS
QUICK_MODELS = ("mlp", "resnet20", "llama-1m")
VARIANTS = (
    "ste",
    "forward_inference",
    "forward_no_grad",
    "fogzo",
    "fogzo_one_sided",
    "spsa_n1",
    "spsa_looped",
    "spsa_batched",
    "float_step",
)
COMPILED_VARIANTS = ("ste_compiled", "forward_compiled", "fogzo_compiled", "float_compiled")
NOISE_VARIANTS = ("fogzo_counter", "fogzo_counter_compiled")
"""Opt-in (``--variants``): FOGZO with ``noise_stream="counter"``, eager or with ``compile_noise=True``."""
EXPENSIVE = ("spsa_looped", "spsa_batched")
LEARNING_RATE = 1e-4  # small: the shared model drifts little over the timed steps
FOGZO_TOTAL_STEPS = 10_000


@dataclass
class Workload:
    """A model (quantized and float copies), one fixed batch and its loss."""

    name: str
    quantized: nn.Module | None
    float_model: nn.Module | None
    inputs: torch.Tensor
    targets: torch.Tensor
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    description: dict[str, Any] = field(default_factory=dict)
    autocast: torch.dtype | None = None
    fused_optimizer: bool = False

    def closure(self, model: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], torch.Tensor]:
        inputs, targets, loss = self.inputs, self.targets, self.loss
        if self.autocast is None:
            return lambda: loss(model(inputs), targets)
        device_type, dtype = inputs.device.type, self.autocast

        def closure() -> torch.Tensor:
            with torch.autocast(device_type, dtype=dtype):
                logits = model(inputs)
            return loss(logits.float(), targets)

        return closure

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """AdamW (fused for the paper-size LMs where torch has a fused kernel for the device)."""
        if self.fused_optimizer:
            with contextlib.suppress(RuntimeError, TypeError):
                return torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, fused=True)
        return torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)


def _models(lib: ModuleType) -> ModuleType:
    return importlib.import_module(lib.__name__ + ".models")


def _classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets)


def _language_model_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _mlp(lib: ModuleType, quick: bool, sizes: dict[str, int]) -> tuple[nn.Module, dict[str, Any]]:
    return _models(lib).MLP((784, 256, 10)), {"kind": "image", "batch": 256, "shape": (784,), "classes": 10}


def _tiny(lib: ModuleType, quick: bool, sizes: dict[str, int]) -> tuple[nn.Module, dict[str, Any]]:
    return _models(lib).MLP((32, 64, 10)), {"kind": "image", "batch": 8, "shape": (32,), "classes": 10}


def _resnet20(lib: ModuleType, quick: bool, sizes: dict[str, int]) -> tuple[nn.Module, dict[str, Any]]:
    width = 4 if quick else 16
    size = 16 if quick else 32
    model = _models(lib).build_model("resnet20", width=width)
    return model, {"kind": "image", "batch": 8 if quick else 128, "shape": (3, size, size), "classes": 10, "width": width}


def _vit_tiny_cifar(lib: ModuleType, quick: bool, sizes: dict[str, int]) -> tuple[nn.Module, dict[str, Any]]:
    overrides = {"dim": 48, "depth": 2} if quick else {}
    model = _models(lib).build_model("vit_tiny_cifar", **overrides)
    return model, {"kind": "image", "batch": 8 if quick else 128, "shape": (3, 32, 32), "classes": 10, **overrides}


def _llama(name: str) -> Callable[[ModuleType, bool, dict[str, int]], tuple[nn.Module, dict[str, Any]]]:
    paper_size = name in ("llama-30m", "llama-95m")

    def build(lib: ModuleType, quick: bool, sizes: dict[str, int]) -> tuple[nn.Module, dict[str, Any]]:
        overrides: dict[str, Any] = {}
        if quick and name == "llama-10m":
            overrides["n_layers"] = 1
        if quick and paper_size:  # (bf16 matmuls are slow on most CPUs: a small vocabulary)
            overrides.update(n_layers=2, vocab_size=512)
        model = _models(lib).build_model(name, **overrides)
        if paper_size:
            batch, seq = (1, 32) if quick else (8, 512)
        elif quick:
            batch, seq = (4, 32) if name == "llama-1m" else (2, 32)
        else:
            batch, seq = 16, 128
        batch, seq = sizes.get("batch", batch), sizes.get("seq_len", seq)
        info = {"kind": "tokens", "batch": batch, "seq_len": seq, "vocab": model.config.vocab_size, **overrides}
        if paper_size:
            info["autocast"] = "bfloat16"
        return model, info

    return build


BUILDERS: dict[str, Callable[[ModuleType, bool, dict[str, int]], tuple[nn.Module, dict[str, Any]]]] = {
    "mlp": _mlp,
    "resnet20": _resnet20,
    "vit_tiny_cifar": _vit_tiny_cifar,
    **{name: _llama(name) for name in ("llama-1m", "llama-10m", "llama-30m", "llama-95m")},
    "tiny": _tiny,
}


def build_workload(
    name: str,
    *,
    quick: bool,
    device: torch.device,
    seed: int,
    quantized: bool = True,
    float_copy: bool = True,
    lib: ModuleType = fogzo,
    sizes: dict[str, int] | None = None,
) -> Workload:
    """The model ``name`` (2-bit quantized and/or its float copy) and one fixed batch.

    ``sizes`` may override the LMs' ``batch`` and ``seq_len``.
    """
    torch.manual_seed(seed)
    model, info = BUILDERS[name](lib, quick, dict(sizes or {}))
    model.to(device).train()
    generator = torch.Generator().manual_seed(seed + 1)
    if info["kind"] == "tokens":
        tokens = torch.randint(0, info["vocab"], (info["batch"], info["seq_len"] + 1), generator=generator)
        inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        loss = _language_model_loss
    else:
        inputs = torch.randn(info["batch"], *info["shape"], generator=generator)
        targets = torch.randint(0, info["classes"], (info["batch"],), generator=generator)
        loss = _classification_loss
    float_model = copy.deepcopy(model) if float_copy else None
    whole = name in ("mlp", "tiny")  # quantized whole; the others keep the first and last layer float
    quantized_model = None
    if quantized:
        quantized_model = lib.quantize(model, lib.QuantConfig(bits=2), skip_first_last=not whole)
    info = {key: list(value) if isinstance(value, tuple) else value for key, value in info.items()}
    info["parameters"] = sum(p.numel() for p in model.parameters())
    if quantized_model is not None:
        info["quantized_layers"] = sum(1 for _ in lib.quantized_layers(quantized_model))
        info["perturbed_coordinates"] = lib.PerturbedSet.from_model(quantized_model).num_coordinates
    info["skip_first_last"] = not whole
    autocast = torch.bfloat16 if info.get("autocast") == "bfloat16" else None
    return Workload(
        name, quantized_model, float_model, inputs.to(device), targets.to(device), loss, info,
        autocast=autocast, fused_optimizer=autocast is not None,
    )


def has_training_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


@dataclass
class Steps:
    """The callables of one model's variants (absent: not measured, with a reason)."""

    calls: dict[str, Callable[[], object]]
    skipped: dict[str, str]
    warmup_step: Callable[[], object] | None = None
    compile_seconds: dict[str, float] = field(default_factory=dict)


def make_steps(
    workload: Workload,
    variants: Sequence[str],
    *,
    spsa_n: int,
    seed: int,
    lib: ModuleType = fogzo,
    compiled: Callable[[nn.Module], Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> Steps:
    """One shared AdamW for the quantized model, one for the float copy; estimators built once.

    The ``*_compiled`` variants run the same steps with the closure calling
    ``compiled(model)`` (e.g. ``torch.compile``) instead of the model; the estimators see the
    uncompiled module (same parameters).
    """
    calls: dict[str, Callable[[], object]] = {}
    skipped: dict[str, str] = {}
    model = workload.quantized
    warmup_step = None
    if model is not None:
        optimizer = workload.optimizer(model)
        closure = workload.closure(model)
        compiled_closure = None
        if compiled is not None and any(v in COMPILED_VARIANTS for v in variants):
            compiled_closure = workload.closure(compiled(model))

        def training_step(estimator: Any, step_closure: Callable[[], torch.Tensor]) -> Callable[[], object]:
            def step() -> object:
                optimizer.zero_grad()
                info = estimator.estimate(step_closure)
                optimizer.step()
                return info

            return step

        def forward(context: Callable[[], contextlib.AbstractContextManager], run_closure=closure) -> Callable[[], object]:
            def run() -> object:
                with context():
                    return run_closure()

            return run

        def fogzo_step(step_closure: Callable[[], torch.Tensor], **kwargs: Any) -> Callable[[], object]:
            return training_step(lib.FOGZO(model, total_steps=FOGZO_TOTAL_STEPS, n=1, seed=seed, **kwargs), step_closure)

        factories: dict[str, Callable[[], Callable[[], object]]] = {
            "ste": lambda: training_step(lib.STE(model), closure),
            "forward_inference": lambda: forward(torch.inference_mode),
            "forward_no_grad": lambda: forward(torch.no_grad),
            "fogzo": lambda: fogzo_step(closure),
            "fogzo_one_sided": lambda: fogzo_step(closure, one_sided=True),
            "fogzo_counter": lambda: fogzo_step(closure, noise_stream="counter"),
            "fogzo_counter_compiled": lambda: fogzo_step(closure, noise_stream="counter", compile_noise=True),
            "spsa_n1": lambda: training_step(lib.SPSA(model, n=1, seed=seed, report_loss=False), closure),
            "spsa_looped": lambda: training_step(lib.SPSA(model, n=spsa_n, seed=seed, report_loss=False), closure),
            "spsa_batched": lambda: training_step(
                lib.SPSA(model, n=spsa_n, seed=seed, report_loss=False, vectorize=spsa_n), closure
            ),
        }
        if compiled_closure is not None:
            factories["ste_compiled"] = lambda: training_step(lib.STE(model), compiled_closure)
            factories["forward_compiled"] = lambda: forward(torch.inference_mode, compiled_closure)
            factories["fogzo_compiled"] = lambda: fogzo_step(compiled_closure)
        for variant in variants:
            if variant == "spsa_batched" and has_training_batchnorm(model):
                skipped[variant] = "BatchNorm in training mode writes buffers in the forward: not vmappable"
            elif variant in factories:
                calls[variant] = factories[variant]()
        warmup_step = calls.get("ste") or factories["ste"]()
    if workload.float_model is not None and ("float_step" in variants or "float_compiled" in variants):
        float_model = workload.float_model
        float_optimizer = workload.optimizer(float_model)

        def float_step(float_closure: Callable[[], torch.Tensor]) -> Callable[[], object]:
            def step() -> object:
                float_optimizer.zero_grad()
                loss = float_closure()
                loss.backward()
                float_optimizer.step()
                return loss

            return step

        if "float_step" in variants:
            calls["float_step"] = float_step(workload.closure(float_model))
        if "float_compiled" in variants and compiled is not None:
            calls["float_compiled"] = float_step(workload.closure(compiled(float_model)))
        if warmup_step is None:
            warmup_step = calls.get("float_step") or calls.get("float_compiled")
    ordered = {variant: calls[variant] for variant in variants if variant in calls}
    return Steps(ordered, skipped, warmup_step)


# ---------------------------------------------------------------------- compiled variants


def compiled_factory(backend: str = "inductor") -> Callable[[torch.nn.Module], Callable]:
    """``compiled(model)``: ``torch.compile(model, backend=backend)``, once per model (for :func:`make_steps`)."""
    cache: dict[int, Callable] = {}

    def compiled(model: torch.nn.Module) -> Callable:
        if id(model) not in cache:
            cache[id(model)] = torch.compile(model, backend=backend)
        return cache[id(model)]

    return compiled


def explain_forward(workload: Workload) -> dict[str, Any]:
    """``torch._dynamo.explain`` of the quantized model's forward on the workload's batch."""
    import torch._dynamo

    model = workload.quantized
    assert model is not None
    torch._dynamo.reset()
    context = (
        torch.autocast(workload.inputs.device.type, dtype=workload.autocast)
        if workload.autocast is not None else contextlib.nullcontext()
    )
    with context:
        explanation = torch._dynamo.explain(model)(workload.inputs)
    torch._dynamo.reset()
    return {
        "graph_count": explanation.graph_count,
        "graph_break_count": explanation.graph_break_count,
        "break_reasons": [str(getattr(r, "reason", r)).splitlines()[0] for r in explanation.break_reasons][:10],
    }
