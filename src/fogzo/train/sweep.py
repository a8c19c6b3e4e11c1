"""The sweep driver: independent runs in parallel worker processes, resumed from one archive.

:func:`run_sweep` asks a ``plan`` which runs are still needed given the finished ones, keeps
``workers`` of them running (one process each, one torch thread each by default;
``workers=1`` runs them in this process), appends each finished run's record to a JSON-lines
archive as soon as it finishes (one line per run, keyed by the run's ``key``) and prints one
line per finished run that names the runs in flight and how many are left. Runs already in
the archive are never repeated, so the same call resumes an interrupted sweep: Ctrl-C loses
at most the runs in flight.

The learning-rate procedure shared by the studies (the same for every estimator):

1. Every learning rate of the grid with the first seed.
2. If the best lies at an edge of what was tried, the next rate of the ladder 1e-4, 3e-4, …,
   3e-1 beyond it is added (at most ``MAX_EXTENSIONS`` per side), again with the first seed.
3. The best rate with the remaining seeds.

Runs are identified by ``(lr, seed)``; ``score(lr, seed)`` returns the finished run's score
(lower is better; ``inf`` for a diverged run) or ``None`` while it has not run. The procedure
is a pure function of the scores so far, so a plan can call :func:`needed` again after every
finished run and resume from whatever is in the archive.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from .records import restore_nonfinite, strict_json, write_text_atomic

__all__ = [
    "LADDER",
    "MAX_EXTENSIONS",
    "Score",
    "best_lr",
    "default_workers",
    "needed",
    "read_archive",
    "run_sweep",
    "tried_lrs",
]

LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
MAX_EXTENSIONS = 2

Score = Callable[[float, int], "float | None"]
Task = TypeVar("Task")


# ----------------------------------------------------------------------------- the lr procedure


def tried_lrs(grid: Sequence[float], first_seed: int, score: Score) -> list[float]:
    """The grid's learning rates plus the edge extensions the first-seed scores call for."""
    lrs = sorted(grid)
    for _ in range(2 * MAX_EXTENSIONS):
        done = {lr: score(lr, first_seed) for lr in lrs}
        if any(value is None for value in done.values()):
            return lrs
        scores = {lr: value for lr, value in done.items() if value is not None}  # every one (checked above)
        best = min(scores, key=lambda lr: (scores[lr], lr))
        if math.isinf(scores[best]) or best not in LADDER:
            return lrs
        position = LADDER.index(best)
        below = sum(lr < min(grid) for lr in lrs)
        above = sum(lr > max(grid) for lr in lrs)
        if best == lrs[0] and position > 0 and below < MAX_EXTENSIONS:
            lrs.insert(0, LADDER[position - 1])
        elif best == lrs[-1] and position + 1 < len(LADDER) and above < MAX_EXTENSIONS:
            lrs.append(LADDER[position + 1])
        else:
            return lrs
    return lrs


def best_lr(grid: Sequence[float], first_seed: int, score: Score) -> float | None:
    """The best first-seed learning rate once every tried rate has run, else ``None``."""
    lrs = tried_lrs(grid, first_seed, score)
    done = {lr: score(lr, first_seed) for lr in lrs}
    if any(value is None for value in done.values()):
        return None
    return min(done, key=lambda lr: (done[lr], lr))


def needed(grid: Sequence[float], seeds: Sequence[int], score: Score) -> list[tuple[float, int]]:
    """The ``(lr, seed)`` runs still needed (steps 1–3 of the module docstring)."""
    first, rest = seeds[0], seeds[1:]
    lrs = tried_lrs(grid, first, score)
    missing = [(lr, first) for lr in lrs if score(lr, first) is None]
    if missing:
        return missing
    best = best_lr(grid, first, score)
    assert best is not None
    return [(best, seed) for seed in rest if score(best, seed) is None]


# ----------------------------------------------------------------------------- the archive


def read_archive(path: str | Path) -> dict[str, dict[str, Any]]:
    """``key → record`` of every finished run in a sweep archive (empty if there is none).

    A last line cut short (the process was killed while writing it) is dropped and removed
    from the file; any other unreadable line, or a record without a ``"key"``, is a
    ``ValueError``.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    results: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = restore_nonfinite(json.loads(line))
        except ValueError:
            if number == len(lines) and not text.endswith("\n"):
                write_text_atomic(path, "".join(item + "\n" for item in lines[:-1]))
                break
            raise ValueError(f"{path}, line {number}: not a JSON object") from None
        if not isinstance(record, dict) or not isinstance(record.get("key"), str):
            raise ValueError(f'{path}, line {number}: not a sweep record (no "key"); it was written by another program')
        results[record["key"]] = record
    return results


def default_workers() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- workers


def _start_worker(threads: int | None, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    """A worker process: ``threads`` torch threads; Ctrl-C only interrupts a run (not the idle loop)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if threads is not None:
        torch.set_num_threads(threads)
    if initializer is not None:
        initializer(*initargs)


def _timed(run: Callable[[Any], dict[str, Any]], task: Any) -> dict[str, Any]:
    """``run(task)`` with the CPU seconds this process spent on it, as ``"cpu_s"``."""
    cpu = time.process_time()
    return {**run(task), "cpu_s": round(time.process_time() - cpu, 2)}


def _call(run: Callable[[Any], dict[str, Any]], task: Any) -> dict[str, Any]:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _timed(run, task)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


class _InProcess(Generic[Task]):
    """``workers=1``: each run in this process, at once, in the caller's thread."""

    def submit(self, run: Callable[[Task], dict[str, Any]], task: Task) -> Future[dict[str, Any]]:
        future: Future[dict[str, Any]] = Future()
        future.set_result(_timed(run, task))
        return future


@contextmanager
def _pool(
    workers: int, threads: int | None, initializer: Callable[..., None] | None, initargs: tuple[Any, ...]
) -> Iterator[Any]:
    if workers == 1:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads or previous)
        try:
            if initializer is not None:
                initializer(*initargs)
            yield _InProcess()
        finally:
            torch.set_num_threads(previous)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(
        workers, multiprocessing.get_context(method), _start_worker, (threads, initializer, initargs)
    )
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- the driver


def run_sweep(
    plan: Callable[[Mapping[str, dict[str, Any]]], Sequence[Task]],
    run: Callable[[Task], dict[str, Any]],
    archive: str | Path,
    *,
    key: Callable[[Task], str],
    workers: int | None = None,
    threads: int | None = 1,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
    describe: Callable[[dict[str, Any]], str] | None = None,
    echo: Callable[[str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every task ``plan`` asks for; return ``key → record`` of every finished run.

    ``plan(results)`` lists the tasks still needed given the finished runs so far (``key →
    record``), in the order to start them; it is asked again after every finished run, so a
    plan may grow with the results (the learning-rate procedure). Tasks already finished or
    in flight are skipped. ``run(task)`` returns the run's record (a dict of JSON values; NaN
    and infinities are kept, see :func:`fogzo.train.records.strict_json`); it is stored with
    ``"key": key(task)`` and ``"cpu_s"`` (the CPU seconds of the run's process) added, on one
    line of ``archive``, when the run finishes.

    ``workers`` processes (default :func:`default_workers`), each with ``threads`` torch
    threads (``None``: as they are) and ``initializer(*initargs)`` called once (load the data there); ``run`` and
    the tasks must be picklable (``run`` a module-level function). ``workers=1`` runs
    everything in this process. ``echo`` (default: stderr) gets one line per finished run:
    its result (``describe(record)``), its wall and CPU seconds (CPU well below wall: the
    machine is busy with other work), the runs in flight and the number left. A failing
    run's exception, and Ctrl-C, propagate once the runs in flight have stopped; the archive
    holds every run finished before.
    """
    archive = Path(archive)
    workers = max(1, workers or default_workers())
    say = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    results = read_archive(archive)
    before = len(results)
    todo = [task for task in plan(results) if key(task) not in results]
    say(
        f"{len(todo)} runs to do"
        + (f" ({before} finished before, kept)" if before else "")
        + f"; {workers} worker{'s' * (workers > 1)}"
        + (f" of {threads} thread{'s' * (threads > 1)}" if threads else "")
        + f"; archive {archive}"
    )
    archive.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    running: dict[Future[dict[str, Any]], tuple[str, float]] = {}
    finished: list[tuple[str, float]] = []
    error: BaseException | None = None  # the first failure: no new run starts, those in flight end
    with archive.open("a", encoding="utf-8") as file, _pool(workers, threads, initializer, initargs) as pool:
        submit = pool.submit if workers == 1 else (lambda run, task: pool.submit(_call, run, task))
        while True:
            for task in plan(results) if error is None else ():
                if len(running) >= workers:
                    break
                name = key(task)
                if name not in results and name not in {item for item, _ in running.values()}:
                    running[submit(run, task)] = (name, time.perf_counter())
            for name, seconds in finished:
                left = sum(key(task) not in results for task in plan(results))
                busy = ", ".join(item for item, _ in running.values()) or "none"
                text = describe(results[name]) if describe else ""
                say(
                    f"[{len(results) - before} done, {left} to go, {time.perf_counter() - started:.0f} s] "
                    f"{name}{': ' + text if text else ''} ({seconds:.1f} s, {results[name]['cpu_s']:.1f} s CPU) "
                    f"| running {len(running)}/{workers}: {busy}"
                )
            finished = []
            if not running:
                if error is not None:
                    raise error
                return results
            try:
                done = wait(running, return_when=FIRST_COMPLETED)[0]
            except KeyboardInterrupt as interrupt:  # Ctrl-C reached this process only: let the runs end
                error, done = error or interrupt, set()
            for future in done:
                name, since = running.pop(future)
                try:
                    record = {"key": name, **future.result()}
                except BaseException as failure:  # noqa: BLE001 (raised once the runs in flight end)
                    error = error or failure
                    continue
                file.write(json.dumps(strict_json(record), allow_nan=False, default=str) + "\n")
                file.flush()
                results[name] = record
                finished.append((name, time.perf_counter() - since))
