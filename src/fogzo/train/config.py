"""The training configuration: one flat dataclass, TOML/JSON files, ``--key=value`` overrides.

A config file is TOML (or JSON) whose keys are :class:`TrainConfig` fields. Keys may sit at
the top level or inside the section tables ``[model]``, ``[data]``, ``[quant]``,
``[estimator]``, ``[optim]`` and ``[run]`` (the section is for reading only: every key is
unique across sections). A ``[quick]`` table holds overrides applied by ``--quick``::

    [model]
    model = "resnet20"

    [optim]
    lr = 1e-3

    [quick]
    steps = 20
    eval_size = 200

Resolution order: defaults < file < ``[quick]`` (with ``--quick``) < command-line overrides.
Overrides use the syntax shared with ``fogzo reproduce`` (:func:`fogzo.train.config_io.parse_command_line`):
``--key=value``, ``--key value``, ``--flag`` / ``--no-flag`` for booleans, the key bare
(``--lr``) or with its section (``--optim.lr``); ``-`` and ``_`` are interchangeable. Values
are parsed and type-checked against the field's type; an unknown key raises
:class:`ConfigError` listing the valid keys.

The ``[estimator]`` section is the estimator's keyword arguments: :func:`estimator_options`
passes it to ``fogzo.FOGZO`` (or the subset ``fogzo.SPSA`` takes) unchanged, apart from
``estimator`` (which class) and the arguments the run fixes (``total_steps``, ``seed``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config_io
from .config_io import (  # noqa: F401  (toml_parser: re-exported, tests hide tomllib through it)
    ConfigError,  # a config file or override is wrong (unknown key, bad type, bad value)
    _members,
    toml_parser,
)
from .config_io import type_name as _type_name

__all__ = [
    "ConfigError",
    "RUN_CONTROL_KEYS",
    "SECTIONS",
    "TrainConfig",
    "config_from_dict",
    "estimator_options",
    "load_config",
    "parse_overrides",
    "parse_value",
]


def _f(default: Any, section: str, help: str, choices: tuple | None = None) -> Any:
    metadata = {"section": section, "help": help, "choices": choices}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=metadata)
    return field(default=default, metadata=metadata)


DATASETS = ("fashion_mnist", "mnist", "shakespeare", "text", "image_folder")


@dataclass
class TrainConfig:
    """Every setting of a training run (see the field metadata for help texts)."""

    # ------------------------------------------------------------------ model
    model: str = _f("resnet20", "model", "model name from fogzo.models.list_models()")
    model_args: dict = _f({}, "model", "extra constructor arguments (LlamaConfig fields for llama-*)")
    dropout: float | None = _f(None, "model", "dropout rate (ViT / LLaMA only; None = model default)")
    # ------------------------------------------------------------------- data
    dataset: str = _f("fashion_mnist", "data", "data set", DATASETS)
    data_dir: str | None = _f(None, "data", "IDX folder (MNIST-like) or image-folder root (train/, val/)")
    text_file: str | None = _f(None, "data", "UTF-8 text file for dataset=text (implies dataset=text)")
    tokenizer: str = _f("char", "data", "text tokenizer", ("char", "bpe"))
    vocab_size: int | None = _f(None, "data", "BPE vocabulary size (char: derived from the text)")
    num_classes: int | None = _f(None, "data", "classes (image_folder: checked against the folder)")
    image_size: int = _f(32, "data", "image side fed to the model (MNIST-like data is padded to 32)")
    augment: bool = _f(True, "data", "random crop + horizontal flip on training batches")
    crop_padding: int = _f(4, "data", "zero padding of the random crop (MNIST-like data)")
    flip: bool = _f(True, "data", "random horizontal flips when augment=true")
    batch_size: int = _f(128, "data", "training batch size")
    seq_len: int = _f(128, "data", "text: tokens per training window")
    val_fraction: float = _f(0.1, "data", "text: last fraction of the tokens used for validation")
    eval_size: int = _f(2000, "data", "eval examples (images) or validation tokens (text); 0 = all")
    train_eval_size: int = _f(2000, "data", "same, from the training split, for the final train loss; 0 = off")
    eval_batch_size: int = _f(500, "data", "batch size of evaluation passes (images; text: windows)")
    num_workers: int = _f(4, "data", "image_folder: DataLoader worker processes")
    # ------------------------------------------------------------------ quant
    bits: int | str = _f(2, "quant", "1 (sign), 'ternary', or 2..8")
    ste: str = _f("identity", "quant", "STE surrogate", ("identity", "hardtanh", "tanh", "approxsign"))
    noise: str | None = _f(None, "quant", "override the STE's noise law (uniform, logistic, triangular, gaussian)")
    eps_bar: float | None = _f(None, "quant", "override the STE's smoothing scale (units of alpha)")
    step_size: str = _f("fixed", "quant", "fixed alpha or learned (LSQ)", ("fixed", "lsq"))
    alpha_init: str = _f("lsq", "quant", "alpha initialisation", ("mse", "lsq", "max"))
    per_channel: bool = _f(False, "quant", "one alpha per output channel")
    activation_bits: int | str | None = _f(None, "quant", "also LSQ-quantize layer inputs to these bits")
    skip_first_last: bool = _f(True, "quant", "keep the first and last quantizable layers in full precision")
    skip: tuple[str, ...] = _f((), "quant", "fnmatch patterns of module names to keep in full precision")
    # -------------------------------------------------------------- estimator
    estimator: str = _f("fogzo", "estimator", "gradient estimator (ste-sr: smoothed-forward STE, ste-noise: "
                        "noise-matched STE)", ("ste", "fogzo", "spsa", "ste-sr", "ste-noise"))
    n: int = _f(1, "estimator", "perturbation samples per step (fogzo, spsa)")
    beta_min: float = _f(0.999, "estimator", "fogzo: beta at the last step of the linear schedule")
    beta: float | None = _f(None, "estimator", "fogzo: constant beta instead of the linear schedule")
    ste_fraction: float = _f(0.0, "estimator", "fogzo: plain STE for this first fraction of the steps")
    one_sided: bool = _f(False, "estimator", "one-sided finite differences (reuse L0)")
    perturb: str = _f("quantized", "estimator", "perturbed tensors", ("quantized", "all"))
    eps: float = _f(1e-3, "estimator", "perturbation step for tensors without a quantizer")
    guide_norm: float = _f(1.0, "estimator", "fogzo: norm of the guide direction")
    normalize: str = _f("global", "estimator", "fogzo: guide normalisation", ("global", "tensor"))
    on_nonfinite: str = _f("raise", "estimator", "on a non-finite loss or STE gradient: raise, skip the step, "
                           "or keep the STE gradient (for --autocast fp16's loss scaler)", ("raise", "skip", "keep"))
    vectorize: int | None = _f(None, "estimator", "perturbed passes per vmap forward (None: one by one)")
    noise_stream: str = _f(
        "blocks", "estimator", "noise generator: per-block torch generators, or counter-based (docs/performance.md)",
        ("blocks", "counter"),
    )
    compile_noise: bool = _f(False, "estimator", "noise_stream=counter: draw the noise in torch.compile kernels")
    # ------------------------------------------------------------------ optim
    optimizer: str = _f("adamw", "optim", "optimizer", ("adamw", "sgd"))
    lr: float = _f(1e-3, "optim", "peak learning rate")
    weight_decay: float = _f(0.01, "optim", "decoupled weight decay (weights of Linear/Conv/Embedding only)")
    adam_beta1: float = _f(0.9, "optim", "AdamW beta1")
    adam_beta2: float = _f(0.999, "optim", "AdamW beta2")
    momentum: float = _f(0.9, "optim", "SGD momentum")
    warmup_fraction: float = _f(0.05, "optim", "linear warm-up length as a fraction of total steps")
    warmup_steps: int | None = _f(None, "optim", "linear warm-up length in steps (overrides the fraction)")
    min_lr_ratio: float = _f(0.0, "optim", "cosine decays to lr * min_lr_ratio")
    grad_clip: float | None = _f(None, "optim", "clip the global gradient norm (None: off)")
    # -------------------------------------------------------------------- run
    steps: int = _f(1000, "run", "total steps T (LR, beta and ste_fraction schedules)")
    seed: int = _f(0, "run", "seed of the init, data order, augmentation and estimator noise")
    time_budget: float | None = _f(None, "run", "stop when this many seconds of training are spent")
    budget_steps: str = _f(
        "measure", "run", "with time_budget: T from measured step times, or T = steps", ("measure", "given")
    )
    calibration_steps: int = _f(4, "run", "timed steps per estimator when budget_steps=measure")
    stop_at: int | None = _f(None, "run", "save a checkpoint and exit after this step (resume later)")
    eval_every: int = _f(0, "run", "evaluate every this many steps (0: only at the end)")
    log_every: int = _f(10, "run", "write a train record every this many steps")
    checkpoint_every: int = _f(0, "run", "checkpoint every this many steps (0: only at the end)")
    device: str = _f("cpu", "run", "device", ("cpu", "cuda", "auto"))
    autocast: str = _f("none", "run", "autocast dtype of the forward", ("none", "bf16", "fp16"))
    deterministic: bool = _f(
        False, "run", "torch.use_deterministic_algorithms(True) for the run: bit-reproducible CUDA runs (docs/reproducibility.md)"
    )
    threads: int | None = _f(None, "run", "torch.set_num_threads (None: leave as is)")
    out: str | None = _f(None, "run", "output folder (None: runs/<name>-<estimator>-lr<lr>-seed<seed>)")
    name: str = _f("run", "run", "run name (defaults to the config file's stem)")
    progress: bool = _f(True, "run", "progress on stderr: a tqdm bar on a terminal, else a line every progress_every steps")
    progress_every: int = _f(0, "run", "steps between progress lines when stderr is not a terminal (0: about 20 a run)")
    diagnose_every: int = _f(
        0, "run", "every this many steps, compare the STE with the exact smoothed gradient (fogzo.diagnose; 0: off)"
    )
    diagnose_coordinates: int = _f(64, "run", "diagnose_every: coordinates sampled per quantized tensor")
    diagnose_draws: int = _f(4, "run", "diagnose_every: stochastic-rounding draws of the smoothed gradient")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples become lists), as saved in ``config.json`` and checkpoints."""
        return config_io.config_to_dict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return config_from_dict({**self.to_dict(), **changes})

    def output_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        return Path("runs") / f"{self.name}-{self.estimator}-lr{self.lr:g}-seed{self.seed}"


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)
SECTIONS = ("model", "data", "quant", "estimator", "optim", "run")

#: Keys a resumed run may change: they do not affect the trajectory of the parameters.
RUN_CONTROL_KEYS = frozenset(
    {
        "stop_at",
        "eval_every",
        "log_every",
        "checkpoint_every",
        "device",
        "threads",
        "progress",
        "progress_every",
        "diagnose_every",
        "diagnose_coordinates",
        "diagnose_draws",
        "out",
        "time_budget",
        "num_workers",
        "eval_batch_size",
        "eval_size",
        "train_eval_size",
        "name",
        "data_dir",
        "text_file",
    }
)


#: The estimator classes' arguments that the run fixes, not the ``[estimator]`` section.
RUN_FIXED_ESTIMATOR_ARGS = frozenset({"model", "total_steps", "seed", "smoothing", "backward", "report_loss"})


def estimator_options(config: TrainConfig, kind: str | None = None) -> dict[str, Any]:
    """The ``[estimator]`` section as keyword arguments of the estimator class ``kind``.

    ``fogzo``: every key of the section but ``estimator``; ``spsa``, ``ste-sr``
    (``fogzo.SmoothedForwardSTE``) and ``ste-noise`` (``fogzo.NoiseMatchedSTE``): the keys that
    class takes (the others must keep their defaults); ``ste``: none (``fogzo.STE`` takes
    no options; the section's values are ignored). The run adds ``total_steps`` and ``seed``.
    """
    kind = kind or config.estimator
    options = {name: getattr(config, name) for name, f in FIELDS.items()
               if f.metadata["section"] == "estimator" and name != "estimator"}
    if kind == "fogzo":
        return options
    if kind == "ste":
        return {}
    import inspect

    from ..estimators import SPSA, NoiseMatchedSTE, SmoothedForwardSTE

    cls = {"spsa": SPSA, "ste-sr": SmoothedForwardSTE, "ste-noise": NoiseMatchedSTE}[kind]
    accepted = set(inspect.signature(cls).parameters)
    ignored = {name: value for name, value in options.items()
               if name not in accepted and value != FIELDS[name].default}
    if ignored:
        raise ConfigError(
            f"{', '.join(sorted(ignored))} appl{'ies' if len(ignored) == 1 else 'y'} to estimator=fogzo only"
            + ("" if kind == "spsa" else f" (not to estimator={kind})")
        )
    return {name: value for name, value in options.items() if name in accepted}


def valid_keys_message() -> str:
    lines = []
    for section in SECTIONS:
        keys = [name for name, f in FIELDS.items() if f.metadata["section"] == section]
        lines.append(f"  [{section}] " + ", ".join(keys))
    return "valid keys:\n" + "\n".join(lines)


def _unknown_key(key: str, where: str) -> ConfigError:
    return config_io.unknown_key_error(key, where, list(ALIASES), valid_keys_message())


def _normalise_key(key: str) -> str:
    return config_io.normalise_key(key)


# ---------------------------------------------------------------------------- values
# Type coercion and the command-line syntax are :mod:`fogzo.train.config_io`'s (shared
# with ``fogzo reproduce``).

#: Every spelling of a key: ``lr`` and ``optim.lr``.
ALIASES = config_io.key_aliases(FIELDS, {name: f.metadata["section"] for name, f in FIELDS.items()})


def parse_value(key: str, text: str) -> Any:
    """Parse the command-line string ``text`` for field ``key`` (type-checked)."""
    key = _normalise_key(key)
    key = ALIASES.get(key, key)
    if key not in FIELDS:
        raise _unknown_key(key, "the command line")
    hint = _HINTS[key]
    if hint is dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"--{key}={text!r}: expected a JSON object ({error})") from None
        if not isinstance(value, dict):
            raise ConfigError(f"--{key}={text!r}: expected a JSON object")
        return value
    try:
        return getattr(config_io.apply_overrides(TrainConfig(), [f"{key}={text}"]), key)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"--{key}={text!r}: expected {_type_name(hint)} ({error})") from None


def _validate(config: TrainConfig) -> None:
    for name, f in FIELDS.items():
        choices = f.metadata["choices"]
        value = getattr(config, name)
        if choices and value not in choices:
            raise ConfigError(f"{name}={value!r} is not one of {list(choices)}")
    if isinstance(config.bits, str) and config.bits != "ternary":
        raise ConfigError(f"bits must be an int or 'ternary', got {config.bits!r}")
    positive = (
        "steps", "batch_size", "seq_len", "n", "log_every", "eval_batch_size", "calibration_steps",
        "diagnose_coordinates", "diagnose_draws",
    )
    for name in positive:
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(config, name)}")
    for name in ("eval_every", "checkpoint_every", "eval_size", "train_eval_size", "num_workers", "progress_every",
                 "diagnose_every"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(config, name)}")
    if not config.lr > 0 or not math.isfinite(config.lr):
        raise ConfigError(f"lr must be a positive number, got {config.lr}")
    if not 0.0 <= config.ste_fraction <= 1.0:
        raise ConfigError(f"ste_fraction must lie in [0, 1], got {config.ste_fraction}")
    if not 0.0 <= config.warmup_fraction < 1.0:
        raise ConfigError(f"warmup_fraction must lie in [0, 1), got {config.warmup_fraction}")
    if config.time_budget is not None and not config.time_budget > 0:
        raise ConfigError(f"time_budget must be > 0 seconds, got {config.time_budget}")
    if config.stop_at is not None and config.stop_at < 1:
        raise ConfigError(f"stop_at must be >= 1, got {config.stop_at}")
    if config.threads is not None and config.threads < 1:
        raise ConfigError(f"threads must be >= 1, got {config.threads}")
    if config.dropout is not None and not 0.0 <= config.dropout < 1.0:
        raise ConfigError(f"dropout must lie in [0, 1), got {config.dropout}")
    if config.on_nonfinite == "keep" and config.autocast != "fp16":
        raise ConfigError("on_nonfinite='keep' hands an overflowing STE gradient to the fp16 loss scaler, which skips "
                          "that step: it needs --autocast=fp16 (without a scaler use 'skip')")
    if config.estimator not in ("ste", "fogzo"):
        estimator_options(config)  # FOGZO-only keys changed for SPSA or an STE control


def config_from_dict(values: dict[str, Any], where: str = "a dict") -> TrainConfig:
    """A validated :class:`TrainConfig` from flat ``values`` (keys starting with ``_`` are ignored)."""
    checked = {}
    for key, value in values.items():
        if key.startswith("_"):
            continue
        name = _normalise_key(key)
        if name not in FIELDS:
            raise _unknown_key(key, where)
        if _HINTS[name] is dict and not isinstance(value, dict):
            raise ConfigError(f"{name} in {where}: expected a table, got {value!r}")
        checked[name] = value
    if checked.get("text_file") and checked.get("dataset") != "text":  # text_file implies dataset=text
        checked["dataset"] = "text"
    try:
        config = config_io.config_from_dict(TrainConfig, checked)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None
    _validate(config)
    return config


def _flatten(table: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(flat values, quick overrides) from a parsed file; sections are flattened."""
    flat: dict[str, Any] = {}
    quick: dict[str, Any] = {}

    def put(target: dict[str, Any], key: str, value: Any, place: str) -> None:
        name = _normalise_key(key)
        if name not in FIELDS:
            raise _unknown_key(key, place)
        if name in target:
            raise ConfigError(f"key {name!r} is given twice in {place}")
        target[name] = value

    for key, value in table.items():
        if key.startswith("_"):
            continue
        is_section = key in SECTIONS or key == "quick" or _normalise_key(key) not in FIELDS
        if isinstance(value, dict) and is_section:
            if key == "quick":
                for inner, inner_value in value.items():
                    if isinstance(inner_value, dict) and inner in SECTIONS:
                        for k, v in inner_value.items():
                            put(quick, k, v, f"{where} [quick.{inner}]")
                    else:
                        put(quick, inner, inner_value, f"{where} [quick]")
                continue
            if key not in SECTIONS:
                raise ConfigError(f"unknown section [{key}] in {where}; sections: {', '.join(SECTIONS)}, quick")
            for inner, inner_value in value.items():
                put(flat, inner, inner_value, f"{where} [{key}]")
        else:
            put(flat, key, value, where)
    return flat, quick


def read_config_file(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parse a ``.toml`` or ``.json`` config file into (flat values, quick overrides).

    Unreadable files are :func:`fogzo.train.config_io.read_table`'s one-line errors.
    """
    return _flatten(config_io.read_table(path), str(Path(path)))


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """``["--lr=3e-3", "--seed", "1", "--one-sided", "--no-augment", "--optim.lr=1e-3"]`` → typed values."""
    texts = config_io.parse_command_line(tokens, _HINTS, ALIASES, valid_keys_message())
    return {name: parse_value(name, text) for name, text in texts.items()}


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    *,
    quick: bool = False,
) -> TrainConfig:
    """Defaults < file < ``[quick]`` (if ``quick``) < ``overrides`` (dict or CLI tokens)."""
    values: dict[str, Any] = {}
    quick_values: dict[str, Any] = {}
    where = "the overrides"
    if path is not None:
        values, quick_values = read_config_file(path)
        values.setdefault("name", Path(path).stem)
        where = str(path)
    if quick:
        if path is None:
            raise ConfigError(
                "--quick applies the [quick] table of a config file: pass --config FILE as well "
                "(e.g. --config experiments/configs/resnet20_fmnist.toml --quick)"
            )
        if not quick_values:
            raise ConfigError(f"--quick: {path} has no [quick] table")
        values.update(quick_values)
        if "name" not in quick_values:
            values["name"] = f"{values['name']}_quick"
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        name = _normalise_key(key)
        if name not in FIELDS:
            raise _unknown_key(key, "the overrides")
        values[name] = value
    return config_from_dict(values, where)
