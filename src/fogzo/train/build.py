"""Building a run from its :class:`~fogzo.train.config.TrainConfig`: the quantized model
(or its shapes-only plan on the ``meta`` device), the estimator, the optimizer, the LR
schedule (linear warm-up, cosine decay) and the device."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn

from .. import FOGZO, SPSA, STE, NoiseMatchedSTE, QuantConfig, SmoothedForwardSTE, quantize
from ..models import build_model
from .config import FIELDS, ConfigError, TrainConfig
from .data import data_dimensions, is_text_model

__all__ = [
    "build_estimator",
    "build_optimizer",
    "build_quantized_model",
    "build_scheduler",
    "estimator_options",
    "lr_factor",
    "plan_model",
    "quant_config",
    "resolve_device",
    "warmup_length",
]

#: Vocabulary size and class count of a planned (meta) model before the data is read.
PLAN_VOCAB_SIZE = 256
PLAN_NUM_CLASSES = 2


def _model_kwargs(config: TrainConfig, dims: dict[str, int]) -> dict[str, Any]:
    kwargs = dict(config.model_args)
    name = config.model.strip().lower().replace("_", "-")
    if name == "mlp":
        # MLP(sizes): the input and output sizes come from the data; model_args may give
        # the hidden sizes (``hidden = [256]``, the default) or ``sizes`` in full.
        hidden = [int(size) for size in kwargs.pop("hidden", [256])]
        inputs = dims["in_channels"] * dims["image_size"] ** 2
        kwargs.setdefault("sizes", [inputs, *hidden, dims["num_classes"]])
        if config.dropout not in (None, 0.0):
            raise ValueError(f"model {config.model!r} has no dropout; leave dropout unset")
        return kwargs
    if is_text_model(name):
        if "vocab_size" in dims:
            kwargs["vocab_size"] = dims["vocab_size"]
        kwargs.setdefault("max_seq_len", config.seq_len)
        if kwargs["max_seq_len"] < config.seq_len:
            raise ValueError(f"max_seq_len={kwargs['max_seq_len']} < seq_len={config.seq_len}")
    else:
        kwargs["num_classes"] = dims["num_classes"]
        kwargs["in_channels"] = dims["in_channels"]
        if name.startswith(("vit", "deit")):
            kwargs["image_size"] = dims["image_size"]
    if config.dropout is not None:
        if name.startswith(("resnet", "mlp")):
            if config.dropout != 0.0:
                raise ValueError(f"model {config.model!r} has no dropout; leave dropout unset")
        else:
            kwargs["dropout"] = config.dropout
    return kwargs


def quant_config(config: TrainConfig, alpha_init: str | None = None) -> QuantConfig:
    return QuantConfig(
        bits=config.bits,
        ste=config.ste,
        noise=config.noise,
        eps_bar=config.eps_bar,
        step_size=config.step_size,
        alpha_init=alpha_init or config.alpha_init,
        per_channel=config.per_channel,
        activation_bits=config.activation_bits,
    )


def build_quantized_model(config: TrainConfig, dims: dict[str, int]) -> nn.Module:
    """Seed the global RNG with ``config.seed``, build the model on the CPU and quantize it.

    The initialisation depends on the seed only (not on the estimator or the data), so runs
    that differ in the estimator start from the same weights.
    """
    torch.manual_seed(config.seed)
    model = build_model(config.model, **_model_kwargs(config, dims))
    quantize(model, quant_config(config), skip=config.skip, skip_first_last=config.skip_first_last)
    return model


def _planning_dims(config: TrainConfig) -> dict[str, int]:
    """:func:`data_dimensions`, with placeholders for what only the data can tell: the
    character vocabulary of a text, the class count of an image folder."""
    if config.dataset == "image_folder" and config.num_classes is None and not is_text_model(config.model):
        return {"in_channels": 3, "num_classes": PLAN_NUM_CLASSES, "image_size": config.image_size}
    dims = data_dimensions(config)
    if is_text_model(config.model) and "vocab_size" not in dims:
        dims = {**dims, "vocab_size": PLAN_VOCAB_SIZE}
    return dims


def plan_model(config: TrainConfig) -> nn.Module:
    """The quantized model on the ``meta`` device (shapes only, no data read, no memory).

    α is initialised with the cheap ``"max"`` rule here (meta tensors hold no values).
    """
    dims = _planning_dims(config)
    with torch.device("meta"):
        model = build_model(config.model, **_model_kwargs(config, dims))
    quantize(model, quant_config(config, "max"), skip=config.skip, skip_first_last=config.skip_first_last)
    return model


#: The estimator classes' arguments that the run fixes, not the ``[estimator]`` section.
RUN_FIXED_ESTIMATOR_ARGS = frozenset({"model", "total_steps", "seed", "smoothing", "backward", "report_loss"})


def estimator_options(config: TrainConfig, kind: str | None = None) -> dict[str, Any]:
    """The ``[estimator]`` section (but ``estimator``) as keyword arguments of the estimator class ``kind``
    (``fogzo.FOGZO``, ``fogzo.SPSA``, ``ste-sr``: ``fogzo.SmoothedForwardSTE``, ``ste-noise``:
    ``fogzo.NoiseMatchedSTE``): the keys that class takes; a key it does not take must keep its
    default, else a :class:`ConfigError`. ``ste``: none. The run adds ``total_steps`` and ``seed``.
    """
    kind = kind or config.estimator
    if kind == "ste":
        return {}
    options = {
        name: getattr(config, name)
        for name, f in FIELDS.items()
        if f.metadata["section"] == "estimator" and name != "estimator"
    }
    cls = {"fogzo": FOGZO, "spsa": SPSA, "ste-sr": SmoothedForwardSTE, "ste-noise": NoiseMatchedSTE}[kind]
    accepted = set(inspect.signature(cls).parameters)
    ignored = sorted(name for name, value in options.items() if name not in accepted and value != FIELDS[name].default)
    if ignored:
        raise ConfigError(f"{', '.join(ignored)} do{'es' if len(ignored) == 1 else ''} not apply to estimator={kind}")
    return {name: value for name, value in options.items() if name in accepted}


def build_estimator(
    config: TrainConfig,
    model: nn.Module,
    total_steps: int,
    *,
    kind: str | None = None,
    ste_fraction: float | None = None,
):
    """The configured estimator: the ``[estimator]`` section is its keyword arguments
    (:func:`estimator_options`); the run adds ``total_steps`` and ``seed``."""
    kind = kind or config.estimator
    if kind == "ste":
        return STE(model)
    options = estimator_options(config, kind)
    if kind == "spsa":
        return SPSA(model, seed=config.seed, **options)
    if kind == "ste-sr":
        return SmoothedForwardSTE(model, seed=config.seed, **options)
    if kind == "ste-noise":
        return NoiseMatchedSTE(model, total_steps=total_steps, seed=config.seed, **options)
    if ste_fraction is not None:
        options["ste_fraction"] = ste_fraction
    return FOGZO(model, total_steps=total_steps, seed=config.seed, **options)


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (or SGD); weight decay on the ``*.weight`` matrices/kernels only."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if name.endswith("weight") and param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2))


def warmup_length(config: TrainConfig, total_steps: int) -> int:
    if config.warmup_steps is not None:
        return min(config.warmup_steps, total_steps)
    return round(config.warmup_fraction * total_steps)


def lr_factor(step: int, total_steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total_steps``."""
    if step < warmup:
        return (step + 1) / warmup
    fraction = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * fraction))


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    warmup = warmup_length(config, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, config.min_lr_ratio)
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda requested but CUDA is not available (use --device=cpu)")
    return torch.device(name)
