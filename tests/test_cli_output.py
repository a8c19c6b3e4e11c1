"""Where the commands write and what they print (issue 21, items 10 and 13).

An ``--out`` that cannot be a folder is one line and exit 2 before any data is read; the
progress and final lines say what was measured; data and text errors name the data set and
say what to do on the command line.
"""

from __future__ import annotations

import json
import re
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



@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory, write_fake_fashion_mnist) -> Path:
    """A JSON config of a 6-step MLP run on 64 random 28x28 images (a fraction of a second)."""
    base = tmp_path_factory.mktemp("output")
    write_fake_fashion_mnist(base / "data")
    values = {
        "model": "mlp", "model_args": {"hidden": [16]}, "dataset": "fashion_mnist", "data_dir": str(base / "data"),
        "batch_size": 8, "eval_size": 16, "train_eval_size": 16, "eval_batch_size": 8, "bits": 2, "n": 1,
        "skip_first_last": False, "optimizer": "sgd", "lr": 0.05, "warmup_steps": 0, "min_lr_ratio": 1.0, "steps": 6,
        "threads": 1, "progress": True,
    }
    path = base / "tiny.json"
    path.write_text(json.dumps(values))
    return path


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


# ------------------------------------------------------------------ progress and final lines (item 13)


def test_a_progress_line_between_log_steps_says_which_step_its_values_are_from(tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert fogzo_main(["train", "--config", str(tiny_config), f"--out={out}", "--log-every=3", "--progress-every=2"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tiny: ")]
    assert re.fullmatch(r"tiny: 2/6 \(33%\), \d+ s", lines[0]), lines
    assert re.fullmatch(r"tiny: 4/6 \(67%\), \d+ s, at 3/6: loss=[\d.]+, lr=5\.00e-02, beta=0\.99\d\d", lines[1]), lines
    assert re.fullmatch(r"tiny: 6/6 \(100%\), \d+ s, loss=[\d.]+, lr=5\.00e-02, beta=0\.99\d\d", lines[2]), lines
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    logged = [record for record in records if record.get("event") == "train"]
    assert [record["step"] for record in logged] == [3, 6]
    assert f"loss={logged[0]['loss']:.4f}" in lines[1]


@pytest.mark.parametrize("estimator", ["ste", "spsa"])
def test_no_beta_for_ste_and_spsa_and_the_last_line_reads_plainly(tiny_config, tmp_path, capsys, estimator):
    out = tmp_path / "run"
    args = ["train", "--config", str(tiny_config), f"--out={out}", f"--estimator={estimator}", "--progress-every=3"]
    assert fogzo_main(args) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("tiny: ")]
    assert len(lines) == 2 and all("beta" not in line for line in lines), lines
    assert re.search(r"^done: 6/6 steps, [\d.]+ s training; eval_loss=", captured.out, re.MULTILINE), captured.out


# ------------------------------------------------------------------ data errors (item 13)


def test_a_data_dir_without_fashion_mnist_names_fashion_mnist(tiny_config, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = ["train", "--config", str(tiny_config), f"--data-dir={tmp_path / 'empty'}", f"--out={tmp_path / 'run'}"]
    assert fogzo_main(args) == 2
    message = one_line_error(capsys, "fogzo train: error: ")
    assert f"data_dir {tmp_path / 'empty'} does not hold Fashion-MNIST" in message and "fashion-mnist" in message
    assert message.endswith("(nor MNIST, the fallback)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["train", "reproduce"])
def test_a_fogzo_data_dir_that_does_not_exist_is_one_line(tiny_config, tmp_path, capsys, monkeypatch, command):
    from fogzo.reproduce import mnist

    monkeypatch.setattr(mnist, "train_run", lambda *a, **k: pytest.fail("a run started"))
    monkeypatch.setenv("FOGZO_DATA_DIR", str(tmp_path / "missing"))
    out = tmp_path / "run"
    if command == "train":
        code = fogzo_main(["train", "--config", str(tiny_config), "--data-dir=none", f"--out={out}"])
        prefix = "fogzo train: error: cannot load the data: "
    else:
        code, prefix = fogzo_main(["reproduce", "mnist", "--quick", "--out", str(out)]), "fogzo reproduce mnist: error: "
    assert code == 2
    assert one_line_error(capsys, prefix) == (
        f"FOGZO_DATA_DIR={tmp_path / 'missing'} does not exist or is not a folder; point it at a folder or unset it"
    )
    assert not out.exists()


def test_a_text_file_that_is_not_utf8_says_what_to_do_on_the_command_line(tmp_path, capsys):
    text = tmp_path / "latin1.txt"
    text.write_bytes("café au lait. ".encode("latin-1") * 100)
    llama = str(Path(RESNET).with_name("llama1m_shakespeare.toml"))
    args = ["train", "--config", llama, "--quick", f"--text-file={text}", "--seq-len=8", f"--out={tmp_path / 'run'}"]
    assert fogzo_main(args) == 2
    message = one_line_error(capsys, "fogzo train: error: cannot load the data: ")
    assert message.startswith(f"{text} is not valid utf-8 text: bad byte(s) at offset 3")
    assert f"iconv -f latin1 -t utf-8 {text} > converted.txt" in message and "pass the right encoding=" not in message
