"""Tests of the training entry point (fogzo.train): tiny runs of every family, resume, configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fogzo.data import write_idx
from fogzo.train.summaries import is_png
from fogzo.train import ConfigError, load_config, parse_overrides, plan_model, train
from fogzo.train import data as train_data
from fogzo.train.cli import main as train_main
from fogzo.train.compare import main as compare_main
from fogzo.train.compare import parse_estimator

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"
SMALL = {"resnet20": "resnet20_fmnist.toml", "vit": "vit_tiny_fmnist.toml", "llama": "llama1m_shakespeare.toml"}
PAPER_SCALE = sorted(p.name for p in CONFIGS.glob("*.toml") if p.name not in SMALL.values())

# Shrink the quick configs further so the whole file stays well under a minute on one thread.
TINY_IMAGES = {"batch_size": 8, "eval_size": 32, "train_eval_size": 16, "eval_batch_size": 32, "eval_every": 2}
TINY_TEXT = {"batch_size": 4, "seq_len": 32, "eval_size": 256, "train_eval_size": 128, "eval_batch_size": 8, "eval_every": 2}


# Faster settings for the tests that are not about the quick mode itself: a small corpus and
# the cheap alpha rule (the MSE search and tokenizing 5 MB of Shakespeare take ~2 s per run).
FAST = {"alpha_init": "max"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("Shall I compare thee to a summer's day? Thou art more lovely and more temperate.\n" * 400)
    return str(path)


def tiny(family: str, tmp_path: Path, **overrides):
    base = TINY_TEXT if family == "llama" else TINY_IMAGES
    values = {**base, "steps": 3, "log_every": 1, "progress": False, "out": str(tmp_path), **overrides}
    return load_config(CONFIGS / SMALL[family], values, quick=True)


def quiet(message: str) -> None:
    pass


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------- end-to-end runs


@pytest.mark.parametrize("family", ["resnet20", "vit", "llama"])
def test_quick_runs_write_config_and_finite_metrics(family, tmp_path):
    first_losses = {}
    for estimator in ("ste", "fogzo"):
        out = tmp_path / estimator
        results = train(tiny(family, out, estimator=estimator), log=quiet)
        config = json.loads((out / "config.json").read_text())
        assert config["estimator"] == estimator and config["_resolved"]["total_steps"] == 3
        records = read_records(out / "metrics.jsonl")
        steps = [r for r in records if r["event"] == "train"]
        assert [r["step"] for r in steps] == [1, 2, 3]
        assert all(math.isfinite(r["loss"]) for r in steps)
        units = 3 if estimator == "ste" else 5  # forward 1, backward 2; FOGZO adds 2 forwards
        assert [r["compute_units"] for r in steps] == [units, 2 * units, 3 * units]
        assert steps[-1]["beta"] is None if estimator == "ste" else 0.999 < steps[-1]["beta"] < 1.0
        assert any(r["event"] == "eval" and r["step"] == 2 for r in records)  # periodic eval
        assert records[-1]["event"] == "final"
        metric = "eval_ppl" if family == "llama" else "eval_accuracy"
        assert math.isfinite(results[metric]) and math.isfinite(results["final_train_loss"])
        assert (out / "checkpoint.pt").exists() and (out / "results.json").exists()
        first_losses[estimator] = steps[0]["loss"]
    # Same seed: same initial weights and the same first batch, whatever the estimator.
    assert first_losses["ste"] == first_losses["fogzo"]


@pytest.mark.parametrize("estimator", ["ste-sr", "ste-noise"])
def test_the_ste_controls_train(estimator, tmp_path):
    train(tiny("resnet20", tmp_path, estimator=estimator, **FAST), log=quiet)
    steps = [r for r in read_records(tmp_path / "metrics.jsonl") if r["event"] == "train"]
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert [r["compute_units"] for r in steps] == [3, 6, 9]  # an STE step's cost
    assert (steps[-1]["beta"] is None) == (estimator == "ste-sr")  # ste-noise follows FOGZO's β schedule


def test_images_are_one_channel_and_fallback_is_logged(tmp_path, monkeypatch):
    def missing(data_dir=None):
        raise FileNotFoundError("Fashion-MNIST was not found (test)")

    monkeypatch.setattr(train_data, "load_fashion_mnist", missing)
    messages = []
    config = tiny("resnet20", tmp_path, steps=1, eval_every=0)
    data = train_data.build_data(config, torch.device("cpu"), messages.append)
    assert data.name == "MNIST" and "Fashion-MNIST not found" in data.note
    assert any("WARNING" in message for message in messages)
    x, y = data.stream.next_batch()
    assert x.shape == (8, 1, 32, 32) and x.dtype == torch.float32 and y.shape == (8,)


def _write_fake_fashion_mnist(folder: Path, train: int = 64, test: int = 32) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    labels = {"train": rng.integers(0, 10, train), "t10k": rng.integers(0, 10, test)}
    labels["train"][:10] = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]  # not the real first labels of either set
    for split, count in (("train", train), ("t10k", test)):
        write_idx(folder / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels[split].astype(np.uint8))


def test_user_data_dir_of_idx_files(tmp_path):
    _write_fake_fashion_mnist(tmp_path / "data")
    out = tmp_path / "run"
    config = tiny("resnet20", out, estimator="ste", steps=2, data_dir=str(tmp_path / "data"), **FAST)
    train(config, log=quiet)
    resolved = json.loads((out / "config.json").read_text())["_resolved"]
    assert resolved["data"]["name"] == "Fashion-MNIST" and resolved["data"]["note"] == ""
    assert resolved["data"]["train_examples"] == 64 and resolved["data"]["in_channels"] == 1


def test_text_file_option(tmp_path):
    text_file = tmp_path / "corpus.txt"
    text_file.write_text("to be or not to be, that is the question. " * 200, encoding="utf-8")
    out = tmp_path / "run"
    config = tiny("llama", out, estimator="ste", steps=2, text_file=str(text_file), **FAST)
    assert config.dataset == "text"
    train(config, log=quiet)
    resolved = json.loads((out / "config.json").read_text())["_resolved"]
    assert resolved["data"]["name"] == "corpus.txt" and resolved["data"]["vocab_size"] == len(set(text_file.read_text()))


# ------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("family", ["resnet20", "llama"])
def test_resume_is_bit_identical(family, tmp_path, corpus):
    extra = {"estimator": "fogzo", "steps": 6, "eval_every": 0, **FAST}
    if family == "llama":
        extra.update(dropout=0.0, text_file=corpus)
    else:
        extra["augment"] = True
    straight = tiny(family, tmp_path / "straight", **extra)
    train(straight, log=quiet)
    split = tiny(family, tmp_path / "split", **extra, stop_at=3)
    partial = train(split, log=quiet)
    assert partial["stop_reason"] == "stop_at" and partial["steps_done"] == 3
    saved = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "estimator", "data", "rng", "step"} <= set(saved)
    assert saved["step"] == 3 and saved["estimator"]["step"] == 3
    resumed = tiny(family, tmp_path / "split", **extra)
    train(resumed, resume=True, log=quiet)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    losses_a = [r["loss"] for r in read_records(tmp_path / "straight" / "metrics.jsonl") if r["event"] == "train"]
    losses_b = [r["loss"] for r in read_records(tmp_path / "split" / "metrics.jsonl") if r["event"] == "train"]
    assert losses_a == losses_b and len(losses_a) == 6


def test_resume_refuses_a_different_config(tmp_path, corpus):
    train(tiny("llama", tmp_path, estimator="ste", steps=4, stop_at=1, text_file=corpus, **FAST), log=quiet)
    with pytest.raises(ValueError, match="lr"):
        train(tiny("llama", tmp_path, estimator="ste", steps=4, lr=0.5, text_file=corpus, **FAST), resume=True, log=quiet)


# ------------------------------------------------------------------------ time budget


def test_time_budget_stops_a_run(tmp_path, corpus):
    config = tiny(
        "llama", tmp_path, estimator="ste", steps=100_000, time_budget=0.5, budget_steps="given", text_file=corpus, **FAST
    )
    results = train(config, log=quiet)
    assert results["stop_reason"] == "time_budget"
    assert 1 <= results["steps_done"] < 100_000 and results["wall_time"] >= 0.5
    assert results["total_steps"] == 100_000


def test_time_budget_measures_step_times_for_the_schedule(tmp_path, corpus):
    config = tiny(
        "llama", tmp_path, estimator="fogzo", ste_fraction=0.5, time_budget=1.0, calibration_steps=1, steps=7,
        text_file=corpus, **FAST,
    )
    results = train(config, log=quiet)
    calibration = results["calibration"]
    assert calibration["ste_step_s"] > 0 and calibration["fogzo_step_s"] > 0
    expected = 0.5 * calibration["ste_step_s"] + 0.5 * calibration["fogzo_step_s"]
    assert results["total_steps"] == max(1, math.floor(1.0 / expected))
    assert results["stop_reason"] in ("time_budget", "steps")
    resolved = json.loads((tmp_path / "config.json").read_text())["_resolved"]
    assert resolved["ste_steps"] == round(0.5 * results["total_steps"])


# ----------------------------------------------------------------------- configuration


def test_overrides_parse_and_type_check():
    values = parse_overrides(
        ["--estimator=fogzo", "--lr=3e-3", "--seed", "1", "--steps=1e3", "--one-sided", "--no-augment",
         "--time-budget", "30", "--bits=ternary", "--beta=none", "--skip=head,fc"]
    )
    assert values == {
        "estimator": "fogzo", "lr": 3e-3, "seed": 1, "steps": 1000, "one_sided": True, "augment": False,
        "time_budget": 30.0, "bits": "ternary", "beta": None, "skip": ("head", "fc"),
    }
    assert parse_overrides(["--bits=2"]) == {"bits": 2}
    config = load_config(CONFIGS / SMALL["resnet20"], ["--lr=3e-3", "--seed=1", "--estimator=ste"])
    assert (config.lr, config.seed, config.estimator, config.model) == (3e-3, 1, "ste", "resnet20")
    with pytest.raises(ConfigError, match="expected int"):
        parse_overrides(["--steps=many"])
    with pytest.raises(ConfigError, match="expected int"):
        parse_overrides(["--steps=2.5"])
    with pytest.raises(ConfigError, match="not one of"):
        load_config(None, ["--estimator=adam"])
    with pytest.raises(ConfigError, match="ternary"):
        load_config(None, ["--bits=three"])


def test_bad_key_lists_valid_keys(capsys):
    with pytest.raises(ConfigError) as error:
        parse_overrides(["--learning-rate=3e-3"])
    message = str(error.value)
    assert "learning_rate" in message and "valid keys" in message
    assert "lr" in message and "ste_fraction" in message and "time_budget" in message
    code = train_main(["--config", str(CONFIGS / SMALL["resnet20"]), "--bogus=1"])
    assert code == 2 and "valid keys" in capsys.readouterr().err
    from fogzo.cli import main as fogzo_main

    code = fogzo_main(["train", "--config", str(CONFIGS / SMALL["resnet20"]), "--learnig-rate", "1"])
    assert code == 2 and "valid keys" in capsys.readouterr().err
    code = fogzo_main(["train", "--config", str(CONFIGS / SMALL["resnet20"]), "--steps=2.5"])
    assert code == 2 and "expected int" in capsys.readouterr().err


def test_cli_prints_resolved_config(capsys):
    code = train_main(["--config", str(CONFIGS / SMALL["vit"]), "--quick", "--print-config", "--lr", "2e-3"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == "vit_tiny_cifar" and printed["lr"] == 2e-3 and printed["name"] == "vit_tiny_fmnist_quick"
    from fogzo.cli import main as fogzo_main

    argv = ["train", "--config", str(CONFIGS / SMALL["llama"]), "--print-config", "--one-sided", "--no-augment",
            "--time-budget", "60", "--ste_fraction=0.7", "--device", "cpu", "--autocast=bf16", "--threads=1"]
    assert fogzo_main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["one_sided"], printed["augment"], printed["time_budget"], printed["ste_fraction"]) == (
        True, False, 60.0, 0.7
    )
    assert (printed["autocast"], printed["threads"], printed["steps"]) == ("bf16", 1, 400)


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.toml")))
def test_config_files_parse(name):
    config = load_config(CONFIGS / name)
    assert config.name == Path(name).stem
    quick = load_config(CONFIGS / name, quick=True)
    assert quick.steps < config.steps


@pytest.mark.parametrize("name", PAPER_SCALE)
def test_paper_scale_configs_build_on_meta(name):
    config = load_config(CONFIGS / name)
    assert config.device == "cuda"
    model = plan_model(config)
    assert all(p.device.type == "meta" for p in model.parameters())
    from fogzo import quantized_layers

    names = [layer_name for layer_name, _ in quantized_layers(model)]
    first, last = model.boundary_layers
    assert names and first not in names and last not in names


def test_parse_estimator_spec():
    assert parse_estimator("fogzo+ste_fraction=0.7+one_sided=true") == (
        "fogzo", {"estimator": "fogzo", "ste_fraction": 0.7, "one_sided": True}
    )
    with pytest.raises(ConfigError):
        parse_estimator("fogzo+fraction=0.7")


def test_compare_driver_writes_summary(tmp_path, capsys, corpus):
    out = tmp_path / "cmp"
    args = [
        "--config", str(CONFIGS / SMALL["llama"]), "--quick", "--estimators", "ste,fogzo+ste_fraction=0.5",
        "--seeds", "0,1", "--lrs", "1e-3,3e-3", "--out", str(out),
        *[f"--{k}={v}" for k, v in TINY_TEXT.items()], "--steps=2", "--progress=false", "--eval-every=0",
        f"--text-file={corpus}", "--alpha-init=max",
    ]
    assert compare_main([*args, "--workers=2"]) == 0  # two worker processes
    summary = (out / "summary.md").read_text()
    assert "python -m fogzo.train.compare" in summary and "--seeds 0,1" in summary
    assert "| ste | " in summary and "fogzo+ste_fraction=0.5" in summary and "±" in summary
    for name in ("loss_vs_iterations.png", "loss_vs_wall_time.png", "loss_vs_compute.png"):
        assert is_png(out / name)
    runs = read_records(out / "runs.jsonl")
    assert len(runs) == 8 and {r["lr"] for r in runs} == {1e-3, 3e-3}
    # Same seed: the same first batch and weights for both estimators.
    first = {}
    for run in runs:
        records = read_records(Path(run["run_dir"]) / "metrics.jsonl")
        first.setdefault((run["seed"], run["lr"]), set()).add(records[0]["loss"])
    assert all(len(losses) == 1 for losses in first.values())
    # A second call (one worker) reuses the finished runs.
    capsys.readouterr()
    assert compare_main(args) == 0
    assert "0 runs to do (8 finished before, kept)" in capsys.readouterr().err


@pytest.mark.parametrize("num_classes", [2, None])  # None: taken from the folder
def test_image_folder_data(tmp_path, num_classes):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for name in ("cat", "dog"):
            folder = tmp_path / "images" / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (30 + index, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    out = tmp_path / "run"
    values = {
        "model": "vit_tiny_cifar", "dataset": "image_folder", "data_dir": str(tmp_path / "images"),
        "num_classes": num_classes, "image_size": 32, "batch_size": 4, "num_workers": 0, "steps": 4, "eval_size": 0,
        "train_eval_size": 4, "estimator": "fogzo", "progress": False, "out": str(out), "log_every": 1, **FAST,
    }
    results = train(load_config(None, values), log=quiet)
    assert results["steps_done"] == 4 and 0.0 <= results["eval_accuracy"] <= 1.0
    resolved = json.loads((out / "config.json").read_text())["_resolved"]["data"]
    assert resolved["num_classes"] == 2 and resolved["in_channels"] == 3 and resolved["train_examples"] == 12
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["data"]["epoch"] == 1 and saved["data"]["position"] == 4  # 3 batches per epoch


@pytest.mark.parametrize("family", ["llama", "resnet20"])
def test_diagnose_every_logs_the_ste_bias_and_leaves_training_unchanged(family, tmp_path, corpus):
    """The diagnostic runs beside training: the run is bit-identical without it (LLaMA with
    dropout: the global RNG; ResNet-20: BatchNorm statistics; issue 21.1)."""
    common = {"steps": 4, "estimator": "fogzo", **FAST}
    common.update({"text_file": corpus, "dropout": 0.1} if family == "llama" else {})
    plain = train(tiny(family, tmp_path / "plain", **common), log=quiet)
    watched = train(
        tiny(family, tmp_path / "watched", diagnose_every=2, diagnose_coordinates=4, diagnose_draws=2, **common),
        log=quiet,
    )
    metric = "eval_ppl" if family == "llama" else "eval_loss"
    assert plain[metric] == watched[metric]
    a = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "watched" / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    records = [r for r in read_records(tmp_path / "watched" / "metrics.jsonl") if r["event"] == "diagnose"]
    assert [r["step"] for r in records] == [0, 2, 4]  # before steps 0 and 2, and the trained model
    layers = records[0]["layers"]
    assert len(layers) > 1 and all(-1.0 <= v["cosine"] <= 1.0 for v in layers.values())
    assert records[0]["coordinates"] == 4 * len(layers)
    table = (tmp_path / "watched" / "diagnostics.md").read_text()
    assert table.count("\n| 2 |") == 1 and is_png(tmp_path / "watched" / "diagnostics.png")


def test_diagnose_every_is_refused_with_several_ranks():
    from fogzo.train.checks import check_config

    config = load_config(CONFIGS / SMALL["resnet20"], {"diagnose_every": 10, "batch_size": 8}, quick=True)
    with pytest.raises(ConfigError, match="diagnose_every works in one process"):
        check_config(config, world_size=2)
