"""The command line as a user meets it: one-line errors, exit codes, never losing a result.

``fogzo train`` and ``fogzo reproduce mnist`` (and ``python -m fogzo.train``): a bad config,
file or value is one line on stderr and exit status 2, before any data is read or folder
made; an existing run folder is never overwritten without ``--resume`` or ``--overwrite``;
Ctrl-C leaves a checkpoint; metrics files are strict JSON; output survives a closed pipe.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from fogzo.cli import main as fogzo_main
from fogzo.train import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"
RESNET = str(CONFIGS / "resnet20_fmnist.toml")


def one_line_error(capsys, prefix: str = "fogzo train: error: ") -> str:
    """The stderr of a failed command: exactly one line, starting with ``prefix``, no traceback."""
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert captured.err.startswith(prefix) and captured.err.count("\n") == 1, captured.err
    return captured.err


# ------------------------------------------------------------------ config files (item 9)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("bad.json", b'{"lr": 1e-3,\n', "not valid JSON: .*line 2, column 1"),
        ("bad.toml", b"lr = \n", "not valid TOML"),
        ("latin1.toml", b'name = "caf\xe9"\n', "not UTF-8"),
        ("list.json", b"[1, 2]", "must hold a table of keys"),
        ("folder.toml", None, "is a folder"),
    ],
)
def test_unreadable_config_file_is_one_line(tmp_path, capsys, name, content, expected):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    assert fogzo_main(["train", "--config", str(path), "--print-config"]) == 2
    assert re.search(expected, one_line_error(capsys))


def test_toml_falls_back_to_tomli_without_tomllib(tmp_path, monkeypatch):
    """Python 3.10 has no tomllib: the same parser comes from tomli (a dependency there)."""
    import tomllib

    monkeypatch.setitem(sys.modules, "tomllib", None)  # "import tomllib" now fails, as on 3.10
    monkeypatch.setitem(sys.modules, "tomli", tomllib)  # stands in for the tomli package
    path = tmp_path / "run.toml"
    path.write_text("[optim]\nlr = 0.25\n")
    assert load_config(path).lr == 0.25
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(ConfigError, match="pip install 'tomli"):
        load_config(path)
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert "\"tomli>=1.1; python_version < '3.11'\"" in pyproject
