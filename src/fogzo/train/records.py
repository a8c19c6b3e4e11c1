"""What a run leaves behind and shows while it runs: strict-JSON files and progress.

Shared by ``fogzo train`` (:mod:`fogzo.train.trainer`) and ``fogzo reproduce``
(:mod:`fogzo.reproduce`).

* Files: :class:`JsonlLogger` (one JSON object a line, flushed at once), :func:`read_jsonl`,
  :func:`write_json` / :func:`read_json` (atomic), :func:`write_text_atomic`. Every file is
  strict JSON (RFC 8259): a NaN or infinite float is written as ``null`` and named in the
  record's ``"nonfinite"`` field (``{"loss": "nan"}``; dotted paths for nested values);
  :func:`read_jsonl` and :func:`read_json` put the floats back.
* Progress: :func:`progress` (tqdm on a terminal; one line every N updates when stderr is
  redirected), :class:`LineProgress`.
* :class:`RunInterrupted`: Ctrl-C after what was done is saved.
* :func:`check_output_folder`: an ``--out`` that cannot be a folder, refused before any work.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .._optional import require
from .config_io import ConfigError

__all__ = [
    "NONFINITE",
    "JsonlLogger",
    "LineProgress",
    "RunInterrupted",
    "check_output_folder",
    "progress",
    "read_json",
    "read_jsonl",
    "restore_nonfinite",
    "strict_json",
    "write_json",
    "write_text_atomic",
]


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run after what it had done was saved; the message says how to continue."""


# ----------------------------------------------------------------------------- logging


NONFINITE = "nonfinite"
"""The record field that names the values written as ``null`` because they were NaN or ±inf."""


def _nonfinite_name(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def strict_json(record: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``record`` that strict JSON can hold.

    A NaN or ±inf float (at any depth, in dicts and lists) becomes ``None``, and
    ``record["nonfinite"]`` maps its path (``"loss"``, ``"calibration.fogzo_step_s"``,
    ``"differences.1"``) to ``"nan"``, ``"inf"`` or ``"-inf"``. :func:`restore_nonfinite`
    undoes it.
    """
    flags: dict[str, str] = {}

    def clean(value: Any, path: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            flags[path] = _nonfinite_name(value)
            return None
        if isinstance(value, Mapping):
            return {key: clean(item, f"{path}.{key}" if path else str(key)) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(item, f"{path}.{index}" if path else str(index)) for index, item in enumerate(value)]
        return value

    cleaned = clean({k: v for k, v in record.items() if k != NONFINITE}, "")
    if flags:
        cleaned[NONFINITE] = flags
    return cleaned


def restore_nonfinite(record: dict[str, Any]) -> dict[str, Any]:
    """Put back the NaN/±inf floats that :func:`strict_json` wrote as ``null`` (in place)."""
    flags = record.pop(NONFINITE, None)
    if not isinstance(flags, dict):
        return record
    for path, name in flags.items():
        parts = path.split(".")
        node: Any = record
        try:
            for part in parts[:-1]:
                node = node[int(part)] if isinstance(node, list) else node[part]
            last = parts[-1]
            if isinstance(node, list):
                node[int(last)] = float(name)
            else:
                node[last] = float(name)
        except (KeyError, IndexError, ValueError, TypeError):
            continue  # a path that no longer fits (the record was edited by hand): leave it
    return record


def _dumps(record: Any, **kwargs: Any) -> str:
    if isinstance(record, Mapping):
        record = strict_json(record)
    return json.dumps(record, allow_nan=False, **kwargs)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``.

    A reader (or a crash) sees the old file or the new one, never a half-written one.
    """
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path


def write_json(path: str | Path, record: Mapping[str, Any]) -> Path:
    """Write ``record`` as indented strict JSON (see :func:`strict_json`), atomically."""
    return write_text_atomic(path, _dumps(record, indent=2, default=str) + "\n")


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object written by :func:`write_json` (non-finite floats restored)."""
    return restore_nonfinite(json.loads(Path(path).read_text(encoding="utf-8")))


def check_output_folder(out: str | Path) -> None:
    """Raise :class:`ConfigError` if ``out`` cannot be a folder: it, or the nearest of its
    parents that exists, is a file (``--out some_file/run``). Reads only."""
    out = Path(out)
    for path in (out, *out.parents):
        if not path.exists():
            continue
        if not path.is_dir():
            where = "is a file" if path == out else f"cannot be made: {path} is a file"
            raise ConfigError(f"output folder {out} {where}; choose another --out")
        return


class JsonlLogger:
    """Write one strict-JSON object a line to ``path``, flushed per record.

    ``mode="w"`` (default) starts a new file; ``"a"`` appends. ``keep`` records are written
    first, through a temporary file and ``os.replace`` (a resumed run keeps the records up
    to its checkpoint without a moment in which the file is empty or cut short).
    """

    def __init__(self, path: str | Path, *, keep: Iterable[Mapping[str, Any]] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep is not None:
            write_text_atomic(self.path, "".join(_dumps(record, default=str) + "\n" for record in keep))
            self._file = self.path.open("a", encoding="utf-8")
        else:
            self._file = self.path.open("w", encoding="utf-8")

    def log(self, record: Mapping[str, Any]) -> None:
        self._file.write(_dumps(record, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a JSON-lines file (blank lines skipped; non-finite floats restored)."""
    with Path(path).open(encoding="utf-8") as file:
        return [restore_nonfinite(json.loads(line)) for line in file if line.strip()]


class LineProgress:
    """A progress report for logs: one line on ``stream`` every ``every`` updates, and at the end.

    The same calls as a tqdm bar (``update``, ``set_postfix``, ``close``, context manager),
    for when stderr is redirected to a file, where a bar would be invisible or garbled.
    A postfix describes the unit that the next ``update`` completes (``set_postfix``, then
    ``update``, as a loop does); a line printed at a later unit says which one it is from
    (``run: 4/6 (67%), 1 s, at 3/6: loss=0.5``).
    """

    def __init__(self, total: int, description: str, every: int, stream: Any = None) -> None:
        self.total, self.description, self.every = total, description, max(1, int(every))
        self.stream = stream
        self.n = 0
        self.postfix = ""
        self._postfix_at = 0
        self._started = time.perf_counter()
        self._reported = 0
        self._closed = False

    def update(self, count: int = 1) -> None:
        before, self.n = self.n, self.n + count
        if self.n // self.every > before // self.every and self.n < self.total:
            self._emit()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())
        self._postfix_at = self.n + 1

    def close(self) -> None:
        if not self._closed and self.n > self._reported:
            self._emit()
        self._closed = True

    def _emit(self) -> None:
        self._reported = self.n
        percent = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        seconds = time.perf_counter() - self._started
        postfix = self.postfix if self._postfix_at == self.n else f"at {self._postfix_at}/{self.total}: {self.postfix}"
        line = f"{self.description}: {self.n}/{self.total}{percent}, {seconds:.0f} s" + (
            f", {postfix}" if self.postfix else ""
        )
        print(line, file=self.stream or sys.stderr, flush=True)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int, description: str, *, enabled: bool | None = None, every: int | None = None) -> Any:
    """A progress bar over ``total`` units on stderr.

    ``enabled=None``: a tqdm bar when stderr is a terminal; otherwise, with ``every``, a
    :class:`LineProgress` (one line every ``every`` updates, so a redirected log still shows
    progress), else nothing. ``enabled=True`` forces the bar, ``False`` silences both.
    Returns an object with ``update``, ``set_postfix`` and ``close`` (a context manager).
    """
    tqdm = require("tqdm.auto", "cli", "the progress bar").tqdm
    if enabled is None:
        enabled = sys.stderr.isatty()
        if not enabled and every is not None:
            return LineProgress(total, description, every)
    return tqdm(total=total, desc=description, disable=not enabled, dynamic_ncols=True, leave=True)
