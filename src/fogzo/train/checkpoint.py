"""A run's folder and checkpoint: the file names, the checks before anything is written
(:func:`prepare_output`: refuse, resume or overwrite), reading a checkpoint with a clear
message for a corrupted one, atomic writes, and the global RNG state a checkpoint holds.

What a checkpoint holds is listed in :mod:`fogzo.train.trainer`, whose
:func:`~fogzo.train.trainer.train` writes it with :func:`_atomic_save`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..estimators import derive_seed
from . import distributed as fd
from .config import ConfigError, TrainConfig
from .records import check_output_folder, read_json, read_jsonl, write_json

__all__ = [
    "CHECKPOINT",
    "CHECKPOINT_KEYS",
    "CONFIG",
    "METRICS",
    "OUTPUT_FILES",
    "RESULTS",
    "RUN_CONTROL_KEYS",
    "prepare_output",
]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
CONFIG = "config.json"
#: The files a run writes into its folder (``--overwrite`` removes these, and nothing else).
OUTPUT_FILES = (CONFIG, METRICS, RESULTS, CHECKPOINT)
#: Keys every checkpoint of :func:`~fogzo.train.trainer.train` holds.
CHECKPOINT_KEYS = frozenset({"config", "step", "total_steps", "model", "optimizer", "scheduler", "estimator", "data"})
#: Config keys a resumed run may change: they do not affect the trajectory of the parameters.
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


def _check_resume_config(saved: dict[str, Any], config: TrainConfig, what: str = "the checkpoint's") -> None:
    current = config.to_dict()
    # A key the saved config lacks was added later: that run used its default.
    saved = {**TrainConfig().to_dict(), **saved}
    label = "saved" if what == "the checkpoint's" else "folder"
    differing = [
        f"{key}: {label} {saved[key]!r}, now {current[key]!r}"
        for key in current
        if key not in RUN_CONTROL_KEYS and saved[key] != current[key]
    ]
    if differing:
        raise ConfigError(
            f"cannot resume: the config differs from {what} in keys that change the training trajectory "
            f"({'; '.join(differing)}); resume with the same values, or start a new run with "
            "--overwrite or another --out"
        )


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """``torch.load`` (weights only) of a checkpoint, with a clear error for a bad file."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated zip, a garbled pickle, an empty file, ...
        raise ConfigError(
            f"{path} cannot be read: it is corrupted or truncated ({type(error).__name__}), so the run "
            "cannot resume from it; start the run again with --overwrite, or write to a new --out"
        ) from None
    missing = CHECKPOINT_KEYS - set(checkpoint) if isinstance(checkpoint, dict) else CHECKPOINT_KEYS
    if missing:
        raise ConfigError(
            f"{path} is not a checkpoint of fogzo train (no {', '.join(sorted(missing))}); start the run "
            "again with --overwrite, or write to a new --out"
        )
    return checkpoint


def prepare_output(out: Path, config: TrainConfig, *, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Decide what happens to the run folder ``out`` before anything is written (read only).

    * It does not exist or is empty: a new run.
    * ``overwrite``: a new run; :func:`~fogzo.train.trainer.train` removes the earlier run's
      files (:data:`OUTPUT_FILES`; nothing else) once the data is loaded.
    * ``resume`` with a checkpoint: returns it, after checking that the config matches
      (keys outside :data:`RUN_CONTROL_KEYS` must be equal).
    * ``resume`` without a checkpoint: a new run in the folder, if it holds nothing but an
      unfinished run of the same config (``config.json`` and ``metrics.jsonl`` of a run
      stopped before its first checkpoint); never over a finished run's ``results.json``.
    * Otherwise a non-empty folder is refused: :class:`ConfigError`.
    """
    if resume and overwrite:
        raise ConfigError(
            "--resume and --overwrite exclude each other: --resume continues the run in the folder, --overwrite replaces it"
        )
    check_output_folder(out)
    entries = sorted(entry.name for entry in out.iterdir()) if out.is_dir() else []
    if overwrite or not entries:
        return None
    shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
    if not resume:
        raise ConfigError(
            f"output folder {out} already holds files ({shown}): pass --resume to continue that run, "
            "--overwrite to replace it, or choose another --out"
        )
    if (out / CHECKPOINT).is_file():
        checkpoint = _load_checkpoint(out / CHECKPOINT)
        _check_resume_config(checkpoint["config"], config)
        return checkpoint
    if (out / RESULTS).exists():
        raise ConfigError(
            f"--resume: {out} holds the results.json of a finished run but no checkpoint to continue from "
            "(a diverged run saves none); use --overwrite to run it again, or another --out"
        )
    foreign = [name for name in entries if name not in OUTPUT_FILES and not name.endswith(".tmp")]
    if foreign:
        raise ConfigError(
            f"--resume: {out} has no {CHECKPOINT} and holds files that fogzo train did not write "
            f"({', '.join(foreign[:6])}); choose another --out"
        )
    if (out / CONFIG).is_file():
        try:
            saved = read_json(out / CONFIG)
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"--resume: {out / CONFIG} is unreadable ({error}); use --overwrite or another --out"
            ) from None
        _check_resume_config(saved, config, "the config.json in the folder")
    return None


def _remove_outputs(out: Path) -> list[str]:
    removed = []
    for name in OUTPUT_FILES:
        for path in (out / name, out / (name + ".tmp")):
            if path.is_file():
                path.unlink()
                removed.append(path.name)
    return removed


def _kept_records(path: Path, step: int) -> list[dict[str, Any]]:
    """The metrics records up to the checkpoint's step (later ones are redone after resuming)."""
    if not path.exists():
        return []
    return [r for r in read_jsonl(path) if r.get("event") not in ("final", "interrupted") and r.get("step", 0) <= step]


def _atomic_save(obj: Any, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def _write_json(path: Path, obj: Any) -> None:
    write_json(path, obj)  # strict JSON (non-finite floats as null + "nonfinite"), atomic


def _rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The global RNG state: CPU, and CUDA (every device; under DDP only this rank's device)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device is not None and device.type == "cuda" and fd.is_distributed():
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    elif torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda_device" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_device"], device)
    elif "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_rank_rng(seed: int, step: int, rank: int, device: torch.device) -> None:
    """Seed this rank's global RNG (dropout) from ``(seed, step, rank)``."""
    value = derive_seed(seed, 0x5EED, step, rank)
    torch.manual_seed(value)
    if device.type == "cuda":
        torch.cuda.manual_seed(value)
