"""Command line of the training entry point: ``fogzo train`` / ``python -m fogzo.train``.

    fogzo train --config experiments/configs/resnet20_fmnist.toml [--quick] [--resume | --overwrite]
                [--print-config] [--key=value ...]

Every config key is an option: ``--estimator=fogzo --lr=3e-3 --seed=1 --steps=500``,
``--time-budget 120``, ``--device cuda``, ``--autocast bf16``, ``--threads 1``,
``--data-dir PATH``, ``--text-file PATH``, ``--one-sided`` / ``--no-augment``
(``-`` and ``_`` are interchangeable), also with its section (``--optim.lr=3e-3``): the
syntax ``fogzo reproduce`` shares, derived from :class:`~fogzo.train.config.TrainConfig`
(:mod:`fogzo.train.config_io`). ``--help-keys`` lists them with their defaults and help texts.

The run folder (``--out``, default ``runs/<name>-<estimator>-lr<lr>-seed<seed>``) is never
overwritten silently: a folder that holds files needs ``--resume`` (continue that run; the
config must match its checkpoint) or ``--overwrite`` (replace it). Exit status (see
:data:`EXIT_CODES`): 0 finished (or stopped at ``stop_at``), 1 diverged, 2 usage or config
error (one line on stderr, nothing written), 130 interrupted by Ctrl-C (a checkpoint was
saved: ``--resume`` continues).

Data-parallel (DDP) training on one machine with 2 processes (``batch_size`` stays the
global batch; see ``docs/distributed.md``)::

    torchrun --standalone --nproc-per-node 2 -m fogzo.train --config FILE [--key=value ...]
    torchrun --standalone --nproc-per-node 2 --no-python fogzo train --config FILE [...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .config import SCHEMA, ConfigError, TrainConfig, load_config

__all__ = ["EXIT_CODES", "KeepUnknownOptions", "add_train_parser", "main", "run_from_args"]

#: Exit status of ``fogzo train`` (and of ``fogzo reproduce``).
EXIT_CODES = {
    "ok": 0,  # finished, or stopped at stop_at
    "diverged": 1,  # non-finite training loss: results.json holds "diverged": true
    "usage": 2,  # bad option, config or data: one line on stderr, nothing written
    "interrupted": 130,  # Ctrl-C: a checkpoint was saved (fogzo train), --resume continues
}

DESCRIPTION = "Train a quantized model with the STE, FOGZO or n-SPSA gradient estimator."
EPILOG = (
    "Every config key is an option (--key=value or --key value; --flag / --no-flag for "
    "booleans; - and _ are interchangeable; the key alone or with its section, --optim.lr=3e-3). --help-keys lists the keys with their defaults. "
    "A run folder that holds files needs --resume or --overwrite. Exit status: 0 done, "
    "1 diverged, 2 usage or config error, 130 interrupted (checkpoint saved; --resume continues)."
)


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", help="TOML or JSON config file (experiments/configs/*.toml)")
    parser.add_argument("--quick", action="store_true", help="apply the config's [quick] table (a run of seconds)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in the output folder from its checkpoint.pt (the config must match)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in the output folder (removes its config.json, metrics.jsonl, "
        "results.json and checkpoint.pt; nothing else)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--help-keys", action="store_true", help="list every config key with its default and exit")
    parser.set_defaults(func=run_from_args, handler=_handler)
    return parser


class KeepUnknownOptions(argparse.ArgumentParser):
    """Keeps unrecognised arguments (``extra``: the config keys) for the config's own parser
    (:func:`fogzo.train.config_io.parse_command_line`), so that a wrong key gets the config's
    error message (with the valid keys and a did-you-mean) instead of argparse's generic one."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extra = super().parse_known_args(args, namespace)
        namespace.extra = list(getattr(namespace, "extra", None) or []) + list(extra)
        return namespace, []


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``train`` subcommand on the ``fogzo`` CLI's subparsers.

    Sets ``handler(args, argv)`` (the convention of :mod:`fogzo.cli`) and ``func(args, extra)``.
    """
    parser = subparsers.add_parser(
        "train",
        help=DESCRIPTION,
        description=DESCRIPTION,
        epilog=EPILOG,
        allow_abbrev=False,
    )
    parser.__class__ = KeepUnknownOptions
    return _configure(parser)


def _main_rank() -> bool:
    """Rank 0 (or no torchrun): the process that prints. Read from the environment, so it
    also holds before the process group exists."""
    return os.environ.get("RANK", "0") in ("", "0")


def _print(*args, **kwargs) -> None:
    if _main_rank():
        print(*args, **kwargs)


def _error(message: str) -> int:
    _print(f"fogzo train: error: {message}", file=sys.stderr)
    return EXIT_CODES["usage"]


def run_from_args(args: argparse.Namespace, extra: Sequence[str] = (), command: list[str] | None = None) -> int:
    if args.help_keys:
        _print(SCHEMA.help(TrainConfig()))
        return 0
    try:
        config = load_config(args.config, list(extra), quick=args.quick)  # every config key is in extra
    except ConfigError as error:
        return _error(str(error))
    if args.print_config:
        _print(json.dumps(config.to_dict(), indent=2))
        return 0
    if args.config is None:
        _print(
            f"fogzo train: note: no --config, so this trains the defaults: model {config.model} on "
            f"{config.dataset}, {config.steps} steps of {config.estimator} (--print-config shows them all)",
            file=sys.stderr,
        )
    from . import distributed as fd
    from .trainer import TrainingInterrupted, train

    command = command or [Path(sys.argv[0]).name, *sys.argv[1:]]
    try:
        results = train(config, resume=args.resume, overwrite=args.overwrite, command=command)
    except ConfigError as error:  # checked before any collective and any write: every rank alike
        return _error(str(error))
    except TrainingInterrupted as interrupted:
        _print(f"fogzo train: {interrupted}", file=sys.stderr)
        return EXIT_CODES["interrupted"]
    fd.cleanup()  # under torchrun: leave the process group (after a failure, exiting does)
    return EXIT_CODES["diverged"] if results.get("diverged") else EXIT_CODES["ok"]


def _handler(args: argparse.Namespace, argv: Sequence[str]) -> int:
    return run_from_args(args, getattr(args, "extra", ()), ["fogzo", *argv])


def main(argv: list[str] | None = None) -> int:
    parser = _configure(
        argparse.ArgumentParser(
            prog="python -m fogzo.train", description=DESCRIPTION, epilog=EPILOG, allow_abbrev=False
        )
    )
    parser.add_argument("--version", action="version", version=version_text())
    args, extra = parser.parse_known_args(argv)
    return guarded(lambda: run_from_args(args, extra), "python -m fogzo.train")


def version_text() -> str:
    import torch

    from .. import __version__

    return f"fogzo {__version__} (torch {torch.__version__}, Python {sys.version.split()[0]})"


def guarded(run: Callable[[], int], program: str) -> int:
    """Run a command; Ctrl-C and a closed output pipe end it quietly with the usual status.

    ``KeyboardInterrupt`` -> 130 with one line on stderr. ``BrokenPipeError`` (``... | head``)
    -> 141 (128 + SIGPIPE), no traceback: stdout is pointed at /dev/null so that the
    interpreter's final flush does not fail again.
    """
    try:
        code = run()
        sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's last flush
        return code
    except KeyboardInterrupt:
        _print(f"{program}: interrupted", file=sys.stderr)
        return EXIT_CODES["interrupted"]
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141


if __name__ == "__main__":
    raise SystemExit(main())
