"""The command line as a user meets it: one-line errors, exit codes, never losing a result.

``fogzo train`` and ``fogzo reproduce mnist`` (and ``python -m fogzo.train``): a bad config,
file or value is one line on stderr and exit status 2, before any data is read or folder
made; an existing run folder is never overwritten without ``--resume`` or ``--overwrite``;
Ctrl-C leaves a checkpoint; metrics files are strict JSON; output survives a closed pipe.
"""

from __future__ import annotations

import json
import math
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
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the real tomli stands in for itself
        import tomli as tomllib

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


def test_text_file_implies_dataset_text(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("to be or not to be " * 100)
    assert load_config(None, {"model": "llama-1m", "text_file": str(text)}).dataset == "text"
    assert load_config(None, {"model": "llama-1m", "dataset": "shakespeare", "text_file": str(text)}).dataset == "text"


# ------------------------------------------------------------------ a tiny run to work with



@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory, write_fake_fashion_mnist) -> Path:
    """A JSON config of a 4-step MLP run on 64 random 28x28 images (a fraction of a second)."""
    base = tmp_path_factory.mktemp("cli")
    write_fake_fashion_mnist(base / "data")
    values = {
        "model": "mlp", "model_args": {"hidden": [16]}, "dataset": "fashion_mnist", "data_dir": str(base / "data"),
        "batch_size": 8, "eval_size": 16, "train_eval_size": 16, "eval_batch_size": 8, "bits": 2,
        "alpha_init": "max", "skip_first_last": False, "estimator": "fogzo", "n": 1, "optimizer": "sgd",
        "momentum": 0.0, "weight_decay": 0.0, "lr": 0.05, "warmup_steps": 0, "min_lr_ratio": 1.0, "steps": 4,
        "log_every": 1,
        "threads": 1, "progress": False,
    }
    path = base / "tiny.json"
    path.write_text(json.dumps(values))
    return path


def run_train(config: Path, out: Path, *options: str) -> int:
    return fogzo_main(["train", "--config", str(config), f"--out={out}", *options])


def strict_lines(path: Path) -> list[dict]:
    """The records of a JSON-lines file, parsed as strict JSON (a bare NaN/Infinity raises)."""

    def refuse(constant: str):
        raise ValueError(f"non-standard JSON constant {constant} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines() if line.strip()]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


# ------------------------------------------------------------------ divergence (item 7)


@pytest.mark.parametrize(("estimator", "perturb"), [("ste", "quantized"), ("fogzo", "quantized"), ("spsa", "all")])
def test_divergence_is_a_clean_stop_for_every_estimator(tiny_config, tmp_path, capsys, estimator, perturb):
    # SGD at lr 1e38 drives the (unquantized) biases to inf within a few steps; n-SPSA moves
    # them only with perturb=all. STE sees an infinite training loss; FOGZO and n-SPSA raise
    # FloatingPointError on a non-finite perturbed loss (and change no weight).
    out = tmp_path / "run"
    code = run_train(tiny_config, out, f"--estimator={estimator}", f"--perturb={perturb}", "--lr=1e38")
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err
    assert "stopping (diverged)" in captured.out
    results = json.loads((out / "results.json").read_text())
    assert results["diverged"] is True and results["stop_reason"] == "diverged"
    assert results["steps_done"] < 4 and not (out / "checkpoint.pt").exists()
    records = strict_lines(out / "metrics.jsonl")  # strict JSON, NaN written as null and flagged
    last_train = [r for r in records if r["event"] == "train"][-1]
    assert last_train["step"] == results["steps_done"] and last_train["loss"] is None
    assert last_train["nonfinite"]["loss"] in ("nan", "inf")
    assert records[-1]["event"] == "final" and records[-1]["diverged"] is True
    if estimator != "ste":  # the estimator refused the step: its message is kept
        assert "non-finite loss" in results["error"]
    from fogzo.train.records import read_jsonl

    restored = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "train"][-1]["loss"]
    assert not math.isfinite(restored)  # read_jsonl puts the float back


# ------------------------------------------------------------------ never lose a result (item 8)


def test_a_finished_run_is_never_overwritten_silently(tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(tiny_config, out) == 0
    before = snapshot(out)
    assert {"config.json", "metrics.jsonl", "results.json", "checkpoint.pt"} <= set(before)
    capsys.readouterr()
    # A new run into the same folder: refused, one line, not a byte changed.
    assert run_train(tiny_config, out, "--lr=0.1") == 2
    assert "--resume" in one_line_error(capsys) and snapshot(out) == before
    # --resume with a config that changes the trajectory: refused, naming what differs.
    assert run_train(tiny_config, out, "--resume", "--lr=0.1") == 2
    message = one_line_error(capsys)
    assert "lr: saved 0.05, now 0.1" in message and snapshot(out) == before
    assert run_train(tiny_config, out, "--resume", "--overwrite") == 2
    assert "exclude each other" in one_line_error(capsys)
    # --resume with the same config: the finished run stays finished, results unchanged.
    assert run_train(tiny_config, out, "--resume") == 0
    assert json.loads((out / "results.json").read_text())["eval_loss"] == json.loads(before["results.json"])["eval_loss"]
    # --overwrite: a new run replaces the old one's files (and only those).
    (out / "notes.txt").write_text("mine")
    assert run_train(tiny_config, out, "--overwrite", "--lr=0.1") == 0
    assert json.loads((out / "config.json").read_text())["lr"] == 0.1
    assert (out / "notes.txt").read_text() == "mine"
    assert "removed the earlier run's" in capsys.readouterr().out


def test_a_checkpoint_from_before_a_new_config_key_still_resumes(tiny_config, tmp_path):
    import torch

    out = tmp_path / "run"
    assert run_train(tiny_config, out, "--stop-at=2") == 0
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    del saved["config"]["deterministic"]  # as written before the key existed
    torch.save(saved, out / "checkpoint.pt")
    assert run_train(tiny_config, out, "--resume") == 0


def test_results_and_config_are_replaced_atomically(tiny_config, tmp_path, monkeypatch):
    import os

    replaced = []
    original = os.replace

    def spy(source, target):
        replaced.append((Path(source).name, Path(target).name))
        return original(source, target)

    monkeypatch.setattr(os, "replace", spy)
    out = tmp_path / "run"
    assert run_train(tiny_config, out, "--stop-at=2") == 0
    assert run_train(tiny_config, out, "--resume") == 0
    for name in ("results.json", "config.json", "checkpoint.pt", "metrics.jsonl"):
        assert (name + ".tmp", name) in replaced, name  # metrics.jsonl: the kept records on resume
    assert not list(out.glob("*.tmp"))


def _interrupt_at(monkeypatch, step: int) -> None:
    """Send SIGINT (as Ctrl-C does) to this process during training step ``step``."""
    import signal

    from fogzo.train.step import StepRunner

    original = StepRunner.step
    calls = {"n": 0}

    def step_then_interrupt(self, batch=None):
        result = original(self, batch)
        calls["n"] += 1
        if calls["n"] == step:
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(StepRunner, "step", step_then_interrupt)


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_same_run(tiny_config, tmp_path, monkeypatch, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_train(tiny_config, straight) == 0
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 2)
        try:
            code = run_train(tiny_config, split, "--checkpoint-every=0")
        except KeyboardInterrupt:  # caught here: pytest would take it for the user's Ctrl-C
            pytest.fail("Ctrl-C escaped the command as a KeyboardInterrupt")
    captured = capsys.readouterr()
    assert code == 130 and "Traceback" not in captured.err
    assert "interrupted after step 2 of 4" in captured.err and "--resume" in captured.err
    import torch

    saved = torch.load(split / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 2 and not (split / "results.json").exists()
    assert strict_lines(split / "metrics.jsonl")[-1] == {"event": "interrupted", "step": 2, "wall_time": pytest.approx(saved["elapsed"])}
    assert run_train(tiny_config, split, "--resume") == 0
    a = torch.load(straight / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(split / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)
    losses = [[r["loss"] for r in strict_lines(run / "metrics.jsonl") if r["event"] == "train"] for run in (straight, split)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


# ------------------------------------------------------------------ fail early, in one line (items 9, 11)


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("--n=0", "n must be"),
        ("--beta-min=2", "beta_min must lie in"),
        ("--guide-norm=-1", "guide_norm"),
        ("--vectorize=0", "vectorize"),
        ("--eps=-1", "eps must be"),
        ("--model=resnet99", "unknown model 'resnet99'"),
        ('--model-args={"depth": 3}', "unexpected keyword argument 'depth'"),
        ("--bits=9", "unsupported bits=9"),
        ("--noise=cauchy", "unknown noise='cauchy'"),
        ("--data-dir=/no/such/folder", "data_dir /no/such/folder does not exist"),
        ("--dataset=text", "needs text_file"),
        ("--batch-size=1000", "batch_size 1000 exceeds the 64 training images"),
    ],
)
def test_bad_values_fail_in_one_line_before_any_work(tiny_config, tmp_path, capsys, monkeypatch, option, expected):
    from fogzo.train import trainer

    loaded = []
    original = trainer.build_data
    monkeypatch.setattr(trainer, "build_data", lambda *a, **k: loaded.append(1) or original(*a, **k))
    out = tmp_path / "run"
    assert run_train(tiny_config, out, option) == 2
    assert re.search(expected, one_line_error(capsys))
    assert not out.exists()
    if "batch-size" not in option:  # the only check that needs the data's size
        assert loaded == []


def test_text_file_too_short_for_one_batch(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("x" * 120)  # seq_len 32, val_fraction 0.1: 330 tokens needed
    llama = str(CONFIGS / "llama1m_shakespeare.toml")
    args = ["train", "--config", llama, f"--text-file={short}", "--seq-len=32", f"--out={tmp_path / 'a'}"]
    assert fogzo_main(args) == 2
    assert "too short: 120 bytes" in one_line_error(capsys)
    # Enough bytes, too few characters (2 bytes each): found once the text is read, still
    # before the run folder is made.
    wide = tmp_path / "wide.txt"
    wide.write_text("é" * 300, encoding="utf-8")
    args = ["train", "--config", llama, f"--text-file={wide}", "--seq-len=32", f"--out={tmp_path / 'b'}"]
    assert fogzo_main(args) == 2
    assert "too short: 300 tokens" in one_line_error(capsys)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    from fogzo.train.checks import text_tokens_needed

    assert text_tokens_needed(32, 0.1) == 330  # floor(330 * 0.1) = 33 = seq_len + 1


def test_quick_needs_a_config_and_no_config_says_what_it_runs(capsys, tmp_path, monkeypatch):
    from fogzo.train import trainer

    original = trainer.train

    def no_default_run(config, **kwargs):
        if config.model == "resnet20" and config.steps == 1000:
            pytest.fail("--quick without --config started the default 1000-step ResNet-20")
        return original(config, **kwargs)

    monkeypatch.setattr(trainer, "train", no_default_run)
    assert fogzo_main(["train", "--quick"]) == 2
    assert "--quick applies the [quick] table" in one_line_error(capsys)
    from fogzo.train.cli import main as train_main

    assert train_main(["--quick", "--print-config"]) == 2
    assert "pass --config FILE" in one_line_error(capsys, "fogzo train: error: ")
    # Without --config: one note on stderr naming the model, data and steps (the run itself
    # is stopped before any work by a bad value here).
    assert fogzo_main(["train", "--model=resnet99", f"--out={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "no --config, so this trains the defaults: model resnet99 on fashion_mnist, 1000 steps" in err


def test_reproduce_checks_estimator_options_before_any_run(capsys, monkeypatch, tmp_path):
    from fogzo.reproduce import mnist

    monkeypatch.setattr(mnist, "train_run", lambda *a, **k: pytest.fail("a run started"))
    monkeypatch.setattr(mnist, "load_data", lambda *a, **k: pytest.fail("data was loaded"))
    for option, expected in (("fogzo.n=0", "FOGZO options .*n must be"), ("spsa_n=0,4", "spsa_n"),
                             ("fogzo.beta_min=2", "beta_min"), ("fogzo.normalize=row", "normalize")):
        code = fogzo_main(["reproduce", "mnist", "--quick", f"--{option}", "--out", str(tmp_path / "out")])
        assert code == 2, option
        assert re.search(expected, one_line_error(capsys, "fogzo reproduce mnist: error: ")), option
    assert fogzo_main(["reproduce", "mnist", "--quick", "--dry-run", "--fogzo.n=0"]) == 2
    one_line_error(capsys, "fogzo reproduce mnist: error: ")
    assert not (tmp_path / "out").exists()


def test_reproduce_with_fewer_images_than_a_batch_is_one_line(tmp_path, capsys, monkeypatch, write_fake_fashion_mnist):
    # A user folder (--data-dir, or FOGZO_DATA_DIR) with a handful of images used to make
    # every run loop forever (an epoch held no batch).
    from fogzo.reproduce import mnist

    monkeypatch.setattr(mnist, "train_run", lambda *a, **k: pytest.fail("a run started (and would never end)"))
    write_fake_fashion_mnist(tmp_path / "mnist")
    out = tmp_path / "out"
    code = fogzo_main(["reproduce", "mnist", *TINY_STUDY, "--data-dir", str(tmp_path / "mnist"), "--out", str(out)])
    assert code == 2
    assert "holds 64 images, fewer than batch_size=128" in one_line_error(capsys, "fogzo reproduce mnist: error: ")
    assert not out.exists()


# ------------------------------------------------------------------ a corrupted checkpoint (item 10)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "foreign"])
def test_corrupted_checkpoint_says_so_and_how_to_start_over(tiny_config, tmp_path, capsys, damage):
    import torch

    out = tmp_path / "run"
    assert run_train(tiny_config, out, "--stop-at=2") == 0
    path = out / "checkpoint.pt"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x80\x02not a checkpoint at all" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(2)}, path)
    capsys.readouterr()
    assert run_train(tiny_config, out, "--resume") == 2
    message = one_line_error(capsys)
    assert "weights_only" not in message and "--overwrite" in message
    assert ("corrupted or truncated" if damage != "foreign" else "not a checkpoint of fogzo train") in message
    assert run_train(tiny_config, out, "--overwrite") == 0  # the way out it names works


# ------------------------------------------------------------------ output polish (item 12)


def test_progress_lines_when_stderr_is_not_a_terminal(tiny_config, tmp_path, capsys):
    assert run_train(tiny_config, tmp_path / "run", "--progress", "--steps=6", "--progress-every=2") == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tiny: ")]
    assert [line.split(",")[0] for line in lines] == ["tiny: 2/6 (33%)", "tiny: 4/6 (67%)", "tiny: 6/6 (100%)"]
    assert "loss=" in lines[-1] and "\r" not in err
    assert run_train(tiny_config, tmp_path / "quiet", "--no-progress") == 0
    assert "tiny: " not in capsys.readouterr().err


def test_version(capsys):
    import fogzo

    with pytest.raises(SystemExit) as exit_:
        fogzo_main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"fogzo {fogzo.__version__} (torch ")


def test_closed_output_pipe_is_not_a_traceback(tmp_path):
    """``fogzo train --print-config | head -0``: the reader is gone before the first write."""
    import os
    import subprocess

    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to write_end now fails with EPIPE
    import fogzo

    environment = {**os.environ, "PYTHONPATH": str(Path(fogzo.__file__).resolve().parents[1])}  # this fogzo
    finished = subprocess.run(
        [sys.executable, "-m", "fogzo.cli", "train", "--config", RESNET, "--print-config"],
        stdout=write_end, stderr=subprocess.PIPE, env=environment, timeout=120,
    )
    os.close(write_end)
    assert finished.returncode == 141, finished.stderr.decode()[-2000:]
    assert b"Traceback" not in finished.stderr and b"BrokenPipeError" not in finished.stderr


# ------------------------------------------------------------------ fogzo reproduce mnist (item 8)

TINY_STUDY = ["--quick", "--lrs", "1e-2", "--iterations", "4", "--eval-every=2", "--eval-subset=200",
              "--spsa-n=1", "--spsa-iterations=4", "--spsa-lrs=1e-2", "--spsa-eval-points=2"]


def test_reproduce_resumes_an_interrupted_study_and_never_overwrites_one(tmp_path, monkeypatch, capsys):
    import os

    from fogzo.data import load_mnist
    from fogzo.reproduce import mnist

    try:
        load_mnist()
    except (FileNotFoundError, ImportError) as error:
        pytest.skip(f"MNIST is not available: {error}")

    def study(out: Path, *extra: str) -> int:
        return fogzo_main(["reproduce", "mnist", *TINY_STUDY, "--workers=1", "--out", str(out), *extra])

    def runs(out: Path) -> list[tuple]:  # one archive line per finished run, its points inside
        return [(r["key"], p["iteration"], p["train_loss"], p["test_accuracy"])
                for r in strict_lines(out / "runs.jsonl") for p in r["points"]]

    straight, split = tmp_path / "straight", tmp_path / "split"
    assert study(straight) == 0
    order = [r["label"] for r in strict_lines(straight / "runs.jsonl")]  # one worker: the order they ran in
    assert order[0] == "STE" and set(order) == {"STE", "FOGZO", "SPSA n=1"}
    assert len(order) > 3  # the one-rate grid of STE and FOGZO was extended past its winning edge
    started = []
    original = mnist.train_run

    def train_run(spec, *args, **kwargs):
        started.append(spec.label)
        if len(started) == 2 and interrupt:
            raise KeyboardInterrupt
        return original(spec, *args, **kwargs)

    monkeypatch.setattr(mnist, "train_run", train_run)
    interrupt = True
    capsys.readouterr()
    try:
        code = study(split)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the command as a KeyboardInterrupt")
    assert code == 130
    assert "interrupted: 1 runs are finished and saved" in capsys.readouterr().err
    assert {key for key, *_ in runs(split)} == {"STE lr=0.01 seed=0"}
    # The folder holds a study: a new one is refused, a different config cannot resume it.
    before = snapshot(split)
    assert study(split) == 2
    assert "--resume" in one_line_error(capsys, "fogzo reproduce mnist: error: ")
    assert study(split, "--resume", "--fogzo.beta_min=0.99") == 2
    assert "fogzo: saved" in one_line_error(capsys, "fogzo reproduce mnist: error: ")
    assert snapshot(split) == before
    # --resume runs only the unfinished runs and ends where the straight study ends.
    interrupt, started[:] = False, []
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: replaced.append(Path(b).name) or real_replace(a, b))
    assert study(split, "--resume") == 0
    assert started == order[1:]
    assert sorted(runs(split)) == sorted(runs(straight))
    assert {"summary.md", "config.json", "loss_vs_compute.png"} <= set(replaced)
    assert "resumed: 1 runs finished by an earlier invocation" in (split / "summary.md").read_text()
    # --overwrite starts the study again.
    started[:] = []
    assert study(split, "--overwrite") == 0
    assert started == order and sorted(runs(split)) == sorted(runs(straight))


def test_reproduce_with_two_workers_gives_the_runs_of_one(tmp_path, capsys):
    from fogzo.data import load_mnist

    try:
        load_mnist()
    except (FileNotFoundError, ImportError) as error:
        pytest.skip(f"MNIST is not available: {error}")
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"workers-{workers}"
        assert fogzo_main(["reproduce", "mnist", *TINY_STUDY, f"--workers={workers}", "--out", str(out)]) == 0
        records = strict_lines(out / "runs.jsonl")
        assert len({r["key"] for r in records}) == len(records)  # one line per run
        outputs[workers] = {r["key"]: [{k: v for k, v in p.items() if k != "wall_s"} for p in r["points"]] for r in records}
    assert "running 2/2: " in capsys.readouterr().err  # both workers were busy
    assert outputs[1] == outputs[2]


def test_deterministic_turns_on_deterministic_algorithms_for_the_run(tiny_config, tmp_path, monkeypatch):
    import os

    import torch

    from fogzo.train.step import StepRunner

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # so that the test's end restores the user's value
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    seen = []
    original = StepRunner.step
    monkeypatch.setattr(StepRunner, "step", lambda self, batch=None: seen.append(torch.are_deterministic_algorithms_enabled()) or original(self, batch))
    before = torch.are_deterministic_algorithms_enabled()
    assert run_train(tiny_config, tmp_path / "run", "--deterministic") == 0
    assert seen == [True] * 4 and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled() == before  # restored after the run
