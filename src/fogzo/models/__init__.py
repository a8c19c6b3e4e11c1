"""Model zoo: MLP, CIFAR/ImageNet ResNets, DeiT-style ViTs and LLaMA-style decoders.

All models are built from plain ``torch.nn`` modules and obey one rule that the
quantizers and gradient estimators rely on: every parameter is read only
inside the ``forward`` of the module that owns it (``nn.Linear``, ``nn.Conv2d``,
``nn.Embedding``, norms, or a small dedicated module such as
:class:`~fogzo.models.vit.ClassTokenAndPosition`). Each model exposes
``boundary_layers``, the names of its input and output layers.

Use :func:`build_model` with a name from :func:`list_models`::

    model = build_model("resnet20", num_classes=100)
    lm = build_model("llama-1m", dropout=0.1)   # overrides LlamaConfig fields
    with torch.device("meta"):                    # shapes only, no memory
        big = build_model("llama-300m")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from .llama import (
    LLAMA_CONFIGS,
    CausalSelfAttention,
    DecoderBlock,
    Llama,
    LlamaConfig,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    apply_rotary,
    rotate_half,
)
from .mlp import ACTIVATIONS, MLP
from .resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    cifar_resnet,
    resnet18,
    resnet20,
    resnet32,
    resnet34,
    resnet44,
    resnet50,
    resnet56,
)
from .utils import count_parameters
from .vit import (
    ClassTokenAndPosition,
    FeedForward,
    SelfAttention,
    TransformerBlock,
    VisionTransformer,
    deit_small,
    deit_tiny,
    vit_tiny_cifar,
)

__all__ = [
    "ACTIVATIONS",
    "LLAMA_CONFIGS",
    "MODEL_REGISTRY",
    "BasicBlock",
    "Bottleneck",
    "CausalSelfAttention",
    "ClassTokenAndPosition",
    "DecoderBlock",
    "FeedForward",
    "Llama",
    "LlamaConfig",
    "MLP",
    "RMSNorm",
    "ResNet",
    "RotaryEmbedding",
    "SelfAttention",
    "SwiGLU",
    "TransformerBlock",
    "VisionTransformer",
    "apply_rotary",
    "build_model",
    "build_llama",
    "cifar_resnet",
    "count_parameters",
    "deit_small",
    "deit_tiny",
    "list_models",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet34",
    "resnet44",
    "resnet50",
    "resnet56",
    "rotate_half",
    "vit_tiny_cifar",
]


def build_llama(preset: str, **overrides: Any) -> Llama:
    """``Llama`` from the preset ``LLAMA_CONFIGS[preset]`` with some fields replaced.

    ``hidden_dim`` is re-derived from ``dim`` unless given explicitly.
    """
    config = LLAMA_CONFIGS[preset]
    if "dim" in overrides and "hidden_dim" not in overrides:
        overrides["hidden_dim"] = None
    return Llama(dataclasses.replace(config, **overrides))


#: Registry of constructor callables; keys are canonical model names.
MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "vit_tiny_cifar": vit_tiny_cifar,
    "deit_tiny": deit_tiny,
    "deit_small": deit_small,
    **{preset: partial(build_llama, preset) for preset in LLAMA_CONFIGS},
}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


_BY_NORMALISED_NAME = {_normalise(name): name for name in MODEL_REGISTRY}


def list_models() -> list[str]:
    """Canonical names accepted by :func:`build_model`."""
    return list(MODEL_REGISTRY)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate a registered model.

    ``name`` is matched case-insensitively with ``-`` and ``_`` interchangeable
    (``"vit-tiny-cifar"``, ``"llama_1m"``). ``kwargs`` go to the constructor;
    for the LLaMA presets they replace :class:`LlamaConfig` fields.
    """
    canonical = _BY_NORMALISED_NAME.get(_normalise(name))
    if canonical is None:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[canonical](**kwargs)
