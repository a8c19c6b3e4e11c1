"""Everything a run needs that can be checked before any data is read (:func:`check_config`),
and the text-length checks (:func:`text_tokens_needed`) that run again once the text is loaded."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .build import build_estimator, plan_model
from .config import ConfigError, TrainConfig

__all__ = [
    "check_batch_divisible",
    "check_config",
    "check_text_tokens",
    "text_tokens_needed",
]


def check_batch_divisible(config: TrainConfig, world: int) -> None:
    if config.batch_size % world:
        lower = config.batch_size - config.batch_size % world
        raise ConfigError(
            f"batch_size={config.batch_size} is the global batch and must be divisible by the world "
            f"size {world} (each rank trains on batch_size / world_size examples): use e.g. "
            f"--batch-size={lower or world} or --batch-size={lower + world}"
        )


def text_tokens_needed(seq_len: int, val_fraction: float) -> int:
    """The fewest tokens a text may have: ``seq_len + 1`` for a training window and as many
    for one validation window, after the split (the last ``floor(N·val_fraction)`` tokens)."""
    need = seq_len + 1
    total = max(2 * need, math.ceil(need / val_fraction))
    while int(total * val_fraction) < need or total - int(total * val_fraction) < need:
        total += 1
    return total


def _text_too_short(where: str, count: int, config: TrainConfig, unit: str = "tokens") -> ConfigError:
    need = text_tokens_needed(config.seq_len, config.val_fraction)
    return ConfigError(
        f"{where} is too short: {count} {unit}, but seq_len={config.seq_len} with val_fraction="
        f"{config.val_fraction:g} needs at least {need} (seq_len + 1 for a training window and "
        f"seq_len + 1 for validation); use a longer text or a smaller --seq-len"
    )


def check_text_tokens(tokens: int, where: str, config: TrainConfig) -> None:
    """Raise :class:`ConfigError` if ``tokens`` cannot make one training and one validation window."""
    if tokens < text_tokens_needed(config.seq_len, config.val_fraction):
        raise _text_too_short(where, tokens, config)


def _message(error: BaseException) -> str:
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


def check_config(config: TrainConfig, world_size: int = 1) -> None:
    """Check everything a run needs that can be checked without reading data.

    The device; the model, its arguments and the quantization (built on the ``meta``
    device, so a typo in a model name, a model argument or ``bits`` fails here); the
    estimator, constructed with the run's options exactly as
    :func:`~fogzo.train.trainer.train` will construct it (so ``n=0``, ``beta_min=2`` or
    ``vectorize=0`` fail with the estimator's own message); the data source (``text_file`` / ``data_dir`` exist; a text file has enough
    bytes for one training and one validation window). Raises :class:`ConfigError`.
    """
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device=cuda but CUDA is not available here (torch.cuda.is_available() is False); use --device=cpu"
        )
    check_batch_divisible(config, world_size)
    if config.diagnose_every and world_size > 1:
        raise ConfigError("diagnose_every works in one process only (it runs fogzo.diagnose on rank 0's model)")
    if config.text_file:
        path = Path(config.text_file).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"text_file {path} {'is a folder' if path.is_dir() else 'does not exist'}; pass a UTF-8 text file"
            )
        size = path.stat().st_size  # characters and tokens <= bytes
        if size < text_tokens_needed(config.seq_len, config.val_fraction):
            raise _text_too_short(f"text_file {path}", size, config, unit="bytes")
    elif config.dataset == "text":
        raise ConfigError("dataset=text needs text_file=PATH (a UTF-8 text file)")
    if config.data_dir and not Path(config.data_dir).expanduser().is_dir():
        raise ConfigError(f"data_dir {config.data_dir} does not exist or is not a folder")
    try:
        model = plan_model(config)
        build_estimator(config, model, config.steps)
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(_message(error)) from None
