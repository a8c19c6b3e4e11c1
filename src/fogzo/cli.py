"""The ``fogzo`` command line.

Usage::

    fogzo reproduce mnist [--quick] [--config FILE] [--out DIR] [--key=value ...] [--dry-run]
                          [--resume | --overwrite] [--resummarize] [--help-keys]
    fogzo train ...           (see fogzo.train.cli)
    fogzo --version

Both commands take the same options for their config, derived from its dataclass
(:mod:`fogzo.train.config_io`): every key of the config is an option, ``--key=value`` or ``--key value``, ``--flag`` /
``--no-flag`` for booleans, ``-`` and ``_`` interchangeable; a key is its path in the config
file, dotted (``fogzo reproduce mnist --fogzo.beta-min=0.99``, ``fogzo train --optim.lr=3e-3``),
or its last part alone where that is unique (``--beta-min=0.99``, ``--lr=3e-3``). Both read a
TOML or JSON file with ``--config`` (a run's saved ``config.json`` is one) and save the
resolved config with every run; ``--help-keys`` lists the keys with their defaults.

``fogzo reproduce mnist --dry-run`` prints the resolved config and the planned runs without
training; ``--resummarize`` rewrites ``summary.md`` and the plots of an existing ``--out``
folder from its ``config.json`` and ``runs.jsonl``. An output folder that holds files needs
``--resume`` (keep its finished runs; same config) or ``--overwrite``.

Exit status: 0 done, 1 a ``fogzo train`` run diverged, 2 usage or config error (one line on
stderr, nothing written), 130 interrupted by Ctrl-C (what was finished is saved; ``--resume``
continues), 141 the output pipe was closed (``fogzo train --print-config | head``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]

EXIT_USAGE = 2  # as argparse: a bad option, config or output folder
EXIT_INTERRUPTED = 130  # 128 + SIGINT

_KEYS_HELP = """\
Config keys (--key=value or --key value; dotted for the FOGZO options, or their last part
alone; tuples are comma-separated, 'none' clears an optional field). Examples:
  --bits ternary   --seeds 0,1,2   --lrs 1e-3,3e-3   --iterations 500
  --fogzo.beta-min=0.99   --guide-norm 10   --fogzo.perturb=quantized   --one-sided
  --spsa-n 1,64,512   --spsa-iterations 2000,300,50   --eval-every 50   --workers 2
--help-keys lists every key with its type and default."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fogzo",
        description="FOGZO: first-order-guided zeroth-order gradients for low-bit quantization-aware training.",
    )
    from .train.cli import version_text

    parser.add_argument("--version", action="version", version=version_text())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    reproduce = commands.add_parser(
        "reproduce",
        help="reproduce one of the paper's experiments",
        description="Reproduce one of the paper's experiments and write tables, logs and plots.",
    )
    experiments = reproduce.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    _add_mnist(experiments)
    from .train.cli import add_train_parser

    add_train_parser(commands)
    return parser


def _add_mnist(experiments: argparse._SubParsersAction) -> None:
    mnist = experiments.add_parser(
        "mnist",
        help="784-10-10 MLP on MNIST: STE vs FOGZO vs the n-SPSA ladder",
        description=(
            "Train MLP(784, 10, 10) with quantized weights on MNIST with STE, FOGZO and n-SPSA "
            "(n on a ladder up to every parameter), tune the learning rate per estimator (one grid, "
            "extended past a winning edge), train the runs in parallel worker processes (--workers, "
            "default: one per CPU core), and write config.json, runs.jsonl, summary.md, "
            "loss_vs_iterations.png and loss_vs_compute.png."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Note: on a machine busy with other jobs, --threads 1 can be many times faster than 2 "
            "(this model's matrices are tiny; OpenMP threads then mostly wait for each other).\n\n" + _KEYS_HELP
        ),
        allow_abbrev=False,
    )
    from .train.cli import KeepUnknownOptions

    mnist.__class__ = KeepUnknownOptions
    mnist.add_argument(
        "--quick", action="store_true", help="sub-minute smoke run (60 iterations, 1 seed, 2 lrs, ladder 1,16)"
    )
    mnist.add_argument(
        "--config", metavar="FILE", help="TOML or JSON config file ([fogzo] table; a study's config.json works)"
    )
    mnist.add_argument("--out", metavar="DIR", help="output folder (default: results/mnist-<bits>[-quick])")
    mnist.add_argument(
        "--help-keys", action="store_true", help="list every config key with its type and default, then exit"
    )
    mnist.add_argument(
        "--dry-run", action="store_true", help="check the config, print it and the planned runs, then exit"
    )
    mnist.add_argument(
        "--resume",
        action="store_true",
        help="finish the study in --out: keep its finished runs (same config required), run the rest",
    )
    mnist.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier study in --out (its config.json, runs.jsonl, summary.md and plots)",
    )
    mnist.add_argument(
        "--resummarize",
        action="store_true",
        help="no training: rewrite summary.md and the plots from --out's config.json and runs.jsonl",
    )
    mnist.set_defaults(handler=_run_mnist)


def _run_mnist(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .reproduce.mnist import reproduce, resummarize, validate
    from .reproduce.mnist_config import SCHEMA, MnistConfig, resolve_config
    from .reproduce.mnist_runs import plan_runs
    from .train.config_io import ConfigError, format_config
    from .train.records import RunInterrupted

    def error(message: str) -> int:
        print(f"fogzo reproduce mnist: error: {message}", file=sys.stderr)
        return EXIT_USAGE

    if args.help_keys:
        print(SCHEMA.help(MnistConfig()))
        return 0
    try:
        config = resolve_config(getattr(args, "extra", []), config_file=args.config, quick=args.quick)
    except ConfigError as problem:
        return error(str(problem))
    out = args.out or f"results/mnist-{config.bits}{'-quick' if args.quick else ''}"
    if args.resummarize:
        missing = [name for name in ("config.json", "runs.jsonl") if not (Path(out) / name).is_file()]
        if missing:
            return error(f"--resummarize: {out} holds no {' or '.join(missing)} of an earlier run")
        resummarize(out)
        return 0
    try:
        validate(config)
    except ConfigError as problem:
        return error(str(problem))
    if args.dry_run:
        print(format_config(config))
        plan = plan_runs(config)
        for spec in plan:
            print(f"  {spec.label:<14} lr {spec.lr:<8g} seed {spec.seed} iterations {spec.iterations}")
        print(
            f"{len(plan)} runs to start with (STE and FOGZO add runs as their results come in: the grid "
            f"extended past a winning edge, the best lr with the other seeds); output folder {out}"
        )
        return 0
    try:
        reproduce(config, out, command="fogzo " + shlex.join(argv), resume=args.resume, overwrite=args.overwrite)
    except ConfigError as problem:
        return error(str(problem))
    except FileNotFoundError as problem:  # the data set is not installed
        return error(str(problem))
    except RunInterrupted as interrupted:
        print(f"fogzo reproduce mnist: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fogzo`` console script; returns the exit status.

    Exit status: 0 done, 1 a ``fogzo train`` run diverged, 2 usage or config error (one
    line on stderr), 130 interrupted (Ctrl-C), 141 output pipe closed (``... | head``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    from .train.cli import guarded

    return guarded(lambda: int(args.handler(args, argv) or 0), "fogzo")


if __name__ == "__main__":
    raise SystemExit(main())
