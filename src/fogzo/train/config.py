"""``fogzo train``'s config: :class:`TrainConfig`; its files and command line (:mod:`.config_io`) derive from it.

File keys sit at the top level or in sections ``[model] [data] [quant] [estimator] [optim] [run]``; a
``[quick]`` table holds ``--quick``'s overrides. Defaults < file < ``[quick]`` < command line. The
``[estimator]`` section is the estimator's keyword arguments (:func:`fogzo.train.build.estimator_options`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config_io import ConfigError, Schema, config_to_dict, option, read_table

__all__ = ["FIELDS", "SCHEMA", "ConfigError", "TrainConfig", "load_config", "parse_overrides"]


_model, _data, _quant, _est, _optim, _run = (
    functools.partial(option, section=s) for s in ("model", "data", "quant", "estimator", "optim", "run")
)


@dataclass
class TrainConfig:
    """Every setting of a training run; each field's metadata holds its file section, help text and choices."""

    model: str = _model("resnet20", "model name from fogzo.models.list_models()")
    model_args: dict = _model({}, "extra constructor arguments (LlamaConfig fields for llama-*)")
    dropout: float | None = _model(None, "dropout rate (ViT / LLaMA only; None = model default)")
    dataset: str = _data("fashion_mnist", "data set", ("fashion_mnist", "mnist", "shakespeare", "text", "image_folder"))
    data_dir: str | None = _data(None, "IDX folder (MNIST-like) or image-folder root (train/, val/)")
    text_file: str | None = _data(None, "UTF-8 text file for dataset=text (implies dataset=text)")
    tokenizer: str = _data("char", "text tokenizer", ("char", "bpe"))
    vocab_size: int | None = _data(None, "BPE vocabulary size (char: derived from the text)")
    num_classes: int | None = _data(None, "classes (image_folder: checked against the folder)")
    image_size: int = _data(32, "image side fed to the model (MNIST-like data is padded to 32)")
    augment: bool = _data(True, "random crop + horizontal flip on training batches")
    crop_padding: int = _data(4, "zero padding of the random crop (MNIST-like data)")
    flip: bool = _data(True, "random horizontal flips when augment=true")
    batch_size: int = _data(128, "training batch size", low=1)
    seq_len: int = _data(128, "text: tokens per training window", low=1)
    val_fraction: float = _data(0.1, "text: last fraction of the tokens used for validation")
    eval_size: int = _data(2000, "eval examples (images) or validation tokens (text); 0 = all", low=0)
    train_eval_size: int = _data(2000, "same, from the training split, for the final train loss; 0 = off", low=0)
    eval_batch_size: int = _data(500, "batch size of evaluation passes (images; text: windows)", low=1)
    num_workers: int = _data(4, "image_folder: DataLoader worker processes", low=0)
    bits: int | str = _quant(2, "1 (sign), 'ternary', or 2..8")
    ste: str = _quant("identity", "STE surrogate", ("identity", "hardtanh", "tanh", "approxsign"))
    noise: str | None = _quant(None, "override the STE's noise law (uniform, logistic, triangular, gaussian)")
    eps_bar: float | None = _quant(None, "override the STE's smoothing scale (units of alpha)")
    step_size: str = _quant("fixed", "fixed alpha or learned (LSQ)", ("fixed", "lsq"))
    alpha_init: str = _quant("lsq", "alpha initialisation", ("mse", "lsq", "max"))
    per_channel: bool = _quant(False, "one alpha per output channel")
    activation_bits: int | str | None = _quant(None, "also LSQ-quantize layer inputs to these bits")
    skip_first_last: bool = _quant(True, "keep the first and last quantizable layers in full precision")
    skip: tuple[str, ...] = _quant((), "fnmatch patterns of module names to keep in full precision")
    estimator: str = _est(
        "fogzo",
        "gradient estimator (ste-sr: smoothed-forward STE, ste-noise: noise-matched STE)",
        ("ste", "fogzo", "spsa", "ste-sr", "ste-noise"),
    )
    n: int = _est(1, "perturbation samples per step (fogzo, spsa)", low=1)
    beta_min: float = _est(0.999, "fogzo: beta at the last step of the linear schedule")
    beta: float | None = _est(None, "fogzo: constant beta instead of the linear schedule")
    ste_fraction: float = _est(0.0, "fogzo: plain STE for this first fraction of the steps")
    one_sided: bool = _est(False, "one-sided finite differences (reuse L0)")
    perturb: str = _est("quantized", "perturbed tensors", ("quantized", "all"))
    eps: float = _est(1e-3, "perturbation step for tensors without a quantizer")
    guide_norm: float = _est(1.0, "fogzo: norm of the guide direction")
    normalize: str = _est("global", "fogzo: guide normalisation", ("global", "tensor"))
    noise_scale: float = _est(1.0, "ste-noise: factor on the matched noise's size (variance x k^2)")
    on_nonfinite: str = _est(
        "raise",
        "on a non-finite loss or STE gradient: raise, skip the step, or keep the STE gradient (for --autocast fp16's loss scaler)",
        ("raise", "skip", "keep"),
    )
    vectorize: int | None = _est(None, "perturbed passes per vmap forward (None: one by one)")
    noise_stream: str = _est(
        "blocks",
        "noise generator: per-block torch generators, or counter-based (docs/performance.md)",
        ("blocks", "counter"),
    )
    compile_noise: bool = _est(False, "noise_stream=counter: draw the noise in torch.compile kernels")
    optimizer: str = _optim("adamw", "optimizer", ("adamw", "sgd"))
    lr: float = _optim(1e-3, "peak learning rate")
    weight_decay: float = _optim(0.01, "decoupled weight decay (weights of Linear/Conv/Embedding only)")
    adam_beta1: float = _optim(0.9, "AdamW beta1")
    adam_beta2: float = _optim(0.999, "AdamW beta2")
    momentum: float = _optim(0.9, "SGD momentum")
    warmup_fraction: float = _optim(0.05, "linear warm-up length as a fraction of total steps")
    warmup_steps: int | None = _optim(None, "linear warm-up length in steps (overrides the fraction)")
    min_lr_ratio: float = _optim(0.0, "cosine decays to lr * min_lr_ratio")
    grad_clip: float | None = _optim(None, "clip the global gradient norm (None: off)")
    steps: int = _run(1000, "total steps T (LR, beta and ste_fraction schedules)", low=1)
    seed: int = _run(0, "seed of the init, data order, augmentation and estimator noise")
    time_budget: float | None = _run(None, "stop when this many seconds of training are spent")
    budget_steps: str = _run(
        "measure", "with time_budget: T from measured step times, or T = steps", ("measure", "given")
    )
    calibration_steps: int = _run(4, "timed steps per estimator when budget_steps=measure", low=1)
    stop_at: int | None = _run(None, "save a checkpoint and exit after this step (resume later)", low=1)
    eval_every: int = _run(0, "evaluate every this many steps (0: only at the end)", low=0)
    log_every: int = _run(10, "write a train record every this many steps", low=1)
    checkpoint_every: int = _run(0, "checkpoint every this many steps (0: only at the end)", low=0)
    device: str = _run("cpu", "device", ("cpu", "cuda", "auto"))
    autocast: str = _run("none", "autocast dtype of the forward", ("none", "bf16", "fp16"))
    deterministic: bool = _run(
        False,
        "torch.use_deterministic_algorithms(True) for the run: bit-reproducible CUDA runs (docs/reproducibility.md)",
    )
    threads: int | None = _run(None, "torch.set_num_threads (None: leave as is)", low=1)
    out: str | None = _run(None, "output folder (None: runs/<name>-<estimator>-lr<lr>-seed<seed>)")
    name: str = _run("run", "run name (defaults to the config file's stem)")
    progress: bool = _run(True, "progress on stderr: a tqdm bar on a terminal, else a line every progress_every steps")
    progress_every: int = _run(
        0, "steps between progress lines when stderr is not a terminal (0: about 20 a run)", low=0
    )
    diagnose_every: int = _run(
        0, "every this many steps, compare the STE with the exact smoothed gradient (fogzo.diagnose; 0: off)", low=0
    )
    diagnose_coordinates: int = _run(64, "diagnose_every: coordinates sampled per quantized tensor", low=1)
    diagnose_draws: int = _run(4, "diagnose_every: stochastic-rounding draws of the smoothed gradient", low=1)

    to_dict = config_to_dict  # JSON-ready (tuples become lists), as saved in config.json and checkpoints

    def output_dir(self) -> Path:
        return Path(self.out or f"runs/{self.name}-{self.estimator}-lr{self.lr:g}-seed{self.seed}")

    def __post_init__(self) -> None:
        if self.text_file:  # text_file implies dataset=text
            self.dataset = "text"
        SCHEMA.check(self)  # choices and least values (field metadata)
        for name, ok, rule in [
            ("bits", not isinstance(self.bits, str) or self.bits == "ternary", "be an int or 'ternary'"),
            ("lr", 0 < self.lr < math.inf, "be a positive number"),
            ("ste_fraction", 0 <= self.ste_fraction <= 1, "lie in [0, 1]"),
            ("warmup_fraction", 0 <= self.warmup_fraction < 1, "lie in [0, 1)"),
            ("time_budget", self.time_budget is None or self.time_budget > 0, "be > 0 seconds"),
            ("dropout", self.dropout is None or 0 <= self.dropout < 1, "lie in [0, 1)"),
        ]:
            if not ok:
                raise ConfigError(f"{name} must {rule}, got {getattr(self, name)!r}")
        if self.on_nonfinite == "keep" and self.autocast != "fp16":
            raise ConfigError(
                "on_nonfinite='keep' hands an overflowing STE gradient to the fp16 loss scaler, which skips that step: it needs --autocast=fp16 (without a scaler use 'skip')"
            )


SCHEMA = Schema(TrainConfig)
FIELDS = {key: f for key, (_, f) in SCHEMA.keys.items()}
#: Command-line tokens → typed values: ``["--lr=3e-3", "--seed", "1", "--no-augment", "--optim.lr=1e-3"]``.
parse_overrides = SCHEMA.parse_command_line


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None, *, quick: bool = False
) -> TrainConfig:
    """Defaults < file < its ``[quick]`` table (if ``quick``) < ``overrides`` (command-line tokens or a dict)."""
    if quick and path is None:
        raise ConfigError(
            "--quick applies the [quick] table of a config file: pass --config FILE as well (e.g. --config experiments/configs/resnet20_fmnist.toml --quick)"
        )
    table = read_table(path) if path is not None else {}
    quick_table = table.pop("quick", None)
    if quick and not quick_table:
        raise ConfigError(f"--quick: {path} has no [quick] table")
    values = {"name": Path(path).stem, **SCHEMA.read(table, str(path))} if path is not None else {}
    if quick:
        values = {**values, "name": f"{values['name']}_quick", **SCHEMA.read(quick_table, f"{path} [quick]")}
    more = SCHEMA.parse_command_line(overrides) if isinstance(overrides, list) else overrides or {}
    return SCHEMA.build({**values, **SCHEMA.read(more, "the overrides")}, str(path or "the overrides"))
