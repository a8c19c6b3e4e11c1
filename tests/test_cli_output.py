"""Where the commands write and what they print (issue 21, items 10 and 13).

An ``--out`` that cannot be a folder is one line and exit 2 before any data is read; the
progress and final lines say what was measured; data and text errors name the data set and
say what to do on the command line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fogzo.cli import main as fogzo_main
from fogzo.train.compare import main as compare_main

RESNET = str(Path(__file__).resolve().parents[1] / "experiments" / "configs" / "resnet20_fmnist.toml")


def one_line_error(capsys, prefix: str) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert captured.err.startswith(prefix) and captured.err.count("\n") == 1, captured.err
    return captured.err[len(prefix):].strip()


# ------------------------------------------------------------------ --out under a file (item 10)


@pytest.mark.parametrize("command", ["train", "reproduce", "compare"])
def test_out_under_a_file_is_one_line_before_any_data(tmp_path, capsys, monkeypatch, command):
    from fogzo.reproduce import mnist
    from fogzo.train import trainer

    monkeypatch.setattr(trainer, "build_data", lambda *a, **k: pytest.fail("the data was read"))
    monkeypatch.setattr(mnist, "load_data", lambda *a, **k: pytest.fail("the data was read"))
    file = tmp_path / "notes.txt"
    file.write_text("not a folder\n")
    out = file / "run"
    if command == "train":
        code, prefix = fogzo_main(["train", "--config", RESNET, "--quick", f"--out={out}"]), "fogzo train: error: "
    elif command == "reproduce":
        code, prefix = fogzo_main(["reproduce", "mnist", "--quick", "--out", str(out)]), "fogzo reproduce mnist: error: "
    else:
        code = compare_main(["--config", RESNET, "--quick", "--estimators", "ste", "--seeds", "0", "--out", str(out)])
        prefix = "compare: error: "
    assert code == 2
    assert one_line_error(capsys, prefix) == f"output folder {out} cannot be made: {file} is a file; choose another --out"
    assert file.read_text() == "not a folder\n"
