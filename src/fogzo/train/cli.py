"""Command line of the training entry point: ``fogzo train`` / ``python -m fogzo.train``.

    fogzo train --config experiments/configs/resnet20_fmnist.toml [--quick] [--resume]
                [--print-config] [--key=value ...]

Every config key is an option: ``--estimator=fogzo --lr=3e-3 --seed=1 --steps=500``,
``--time-budget 120``, ``--device cuda``, ``--autocast bf16``, ``--threads 1``,
``--data-dir PATH``, ``--text-file PATH``, ``--one-sided`` / ``--no-augment``
(``-`` and ``_`` are interchangeable). ``--help-keys`` lists them with their defaults.

Data-parallel (DDP) training on one machine with 2 processes (``batch_size`` stays the
global batch; see ``docs/distributed.md``)::

    torchrun --standalone --nproc-per-node 2 -m fogzo.train --config FILE [--key=value ...]
    torchrun --standalone --nproc-per-node 2 --no-python fogzo train --config FILE [...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import _HINTS, FIELDS, SECTIONS, ConfigError, _members, _type_name, load_config, parse_overrides, parse_value

__all__ = ["add_train_parser", "main", "run_from_args"]

DESCRIPTION = "Train a quantized model with the STE, FOGZO or n-SPSA gradient estimator."
EPILOG = (
    "Every config key is an option (--key=value or --key value; --flag / --no-flag for "
    "booleans; - and _ are interchangeable). --help-keys lists the keys with their defaults."
)
_PREFIX = "set_"


def keys_help() -> str:
    lines = []
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for name, f in FIELDS.items():
            if f.metadata["section"] != section:
                continue
            choices = f.metadata["choices"]
            extra = f" (one of: {', '.join(map(str, choices))})" if choices else ""
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            lines.append(f"  --{name.replace('_', '-')}  default {default!r}: {f.metadata['help']}{extra}")
    return "\n".join(lines)


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", help="TOML or JSON config file (experiments/configs/*.toml)")
    parser.add_argument("--quick", action="store_true", help="apply the config's [quick] table (a run of seconds)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt if it exists")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--help-keys", action="store_true", help="list every config key with its default and exit")
    for section in SECTIONS:
        group = parser.add_argument_group(f"[{section}] config keys")
        for name, f in FIELDS.items():
            if f.metadata["section"] != section:
                continue
            flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
            hint = _HINTS[name]
            choices = f.metadata["choices"]
            text = f"{f.metadata['help']} ({'|'.join(map(str, choices)) if choices else _type_name(hint)})"
            if bool in _members(hint):
                group.add_argument(*flags, dest=_PREFIX + name, nargs="?", const="true", metavar="BOOL", help=text)
                negations = [f"--no-{name.replace('_', '-')}"] + ([f"--no_{name}"] if "_" in name else [])
                group.add_argument(*negations, dest=_PREFIX + name, action="store_const", const="false", help=argparse.SUPPRESS)
            else:
                group.add_argument(*flags, dest=_PREFIX + name, metavar="VALUE", help=text)
    parser.set_defaults(func=run_from_args, handler=_handler)
    return parser


class _TrainParser(argparse.ArgumentParser):
    """Keeps unrecognised arguments (``extra``) so that a wrong key gets the config's error
    message (with the valid keys and a did-you-mean) instead of argparse's generic one."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
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
    parser.__class__ = _TrainParser
    return _configure(parser)


def _overrides(args: argparse.Namespace) -> dict:
    values = {}
    for name in FIELDS:
        text = getattr(args, _PREFIX + name, None)
        if text is not None:
            values[name] = parse_value(name, text)
    return values


def _main_rank() -> bool:
    """Rank 0 (or no torchrun): the process that prints. Read from the environment, so it
    also holds before the process group exists."""
    return os.environ.get("RANK", "0") in ("", "0")


def _print(*args, **kwargs) -> None:
    if _main_rank():
        print(*args, **kwargs)


def run_from_args(args: argparse.Namespace, extra: Sequence[str] = (), command: list[str] | None = None) -> int:
    if args.help_keys:
        _print(keys_help())
        return 0
    try:
        overrides = _overrides(args)
        overrides.update(parse_overrides(list(extra)))  # unknown keys end up here: a clear error
        config = load_config(args.config, overrides, quick=args.quick)
    except ConfigError as error:
        _print(f"fogzo train: error: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        _print(json.dumps(config.to_dict(), indent=2))
        return 0
    from .. import distributed as fd
    from .trainer import train

    command = command or [Path(sys.argv[0]).name, *sys.argv[1:]]
    try:
        results = train(config, resume=args.resume, command=command)
    except ConfigError as error:  # e.g. --resume with a config that differs from the checkpoint's
        # The same error on every rank (config checks come before any collective): rank 0 says it.
        _print(f"fogzo train: error: {error}", file=sys.stderr)
        return 2
    fd.cleanup()  # under torchrun: leave the process group (after a failure, exiting does)
    return 1 if results.get("diverged") else 0


def _handler(args: argparse.Namespace, argv: Sequence[str]) -> int:
    return run_from_args(args, getattr(args, "extra", ()), ["fogzo", *argv])


def main(argv: list[str] | None = None) -> int:
    parser = _configure(
        argparse.ArgumentParser(prog="python -m fogzo.train", description=DESCRIPTION, epilog=EPILOG, allow_abbrev=False)
    )
    args, extra = parser.parse_known_args(argv)
    return run_from_args(args, extra)


if __name__ == "__main__":
    raise SystemExit(main())
