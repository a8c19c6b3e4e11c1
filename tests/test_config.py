"""One config system for ``fogzo train`` and ``fogzo reproduce``: one command-line syntax,
one file reader, and an ``[estimator]`` section that is the estimator's keyword arguments."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re

import pytest
import torch
from torch import nn

import fogzo
from fogzo.cli import main as fogzo_main
from fogzo.reproduce.mnist_config import FogzoOptions, MnistConfig, quick_config, resolve_config
from fogzo.train import ConfigError, TrainConfig, build_estimator, load_config, parse_overrides
from fogzo.train.build import RUN_FIXED_ESTIMATOR_ARGS, estimator_options
from fogzo.train.config import FIELDS
from fogzo.train.config_io import Schema, config_to_dict, option


def _error_line(capsys, prefix: str) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.startswith(prefix) and captured.err.count("\n") == 1, captured.err
    return captured.err


# ------------------------------------------------------------------ the one syntax


@dataclasses.dataclass
class Inner:
    beta_min: float = 0.999
    eps: float = 1.0


@dataclasses.dataclass
class Example:
    """Spellings come from the schema: a flat key with a section, nested keys, their last parts."""

    lr: float = option(1e-3, section="optim")
    one_sided: bool = False
    seeds: tuple[int, ...] = (0,)
    fogzo: Inner = dataclasses.field(default_factory=Inner)
    other: Inner = dataclasses.field(default_factory=Inner)


def test_parse_command_line_reads_every_spelling():
    schema = Schema(Example)
    aliases = schema.spellings
    assert aliases["optim.lr"] == "lr" and aliases["lr"] == "lr" and "quant.lr" not in aliases
    assert "beta_min" not in aliases and aliases["fogzo.beta_min"] == "fogzo.beta_min"  # other.beta_min too
    tokens = ["--optim.lr=3e-3", "--fogzo.beta-min", "0.99", "--one-sided", "--seeds", "0,1", "--lr", "-1"]
    assert schema.parse_command_line(tokens) == {
        "lr": -1.0,  # a later spelling of the same key wins; a negative number is a value
        "fogzo.beta_min": 0.99,
        "one_sided": True,
        "seeds": (0, 1),
    }
    assert schema.parse_command_line(["--no-one-sided"]) == {"one_sided": False}
    with pytest.raises(ConfigError, match=r"--no-lr: lr is not a boolean"):
        schema.parse_command_line(["--no-lr"])
    with pytest.raises(ConfigError, match=r"--lr needs a value \(expected float\)"):
        schema.parse_command_line(["--lr"])
    with pytest.raises(ConfigError, match=r"lr in the command line: expected float, got 'fast'"):
        schema.parse_command_line(["--lr=fast"])
    with pytest.raises(ConfigError, match=r"expected --key=value, got 'lr=3'; valid keys: lr, one_sided"):
        schema.parse_command_line(["lr=3"])


def test_a_last_part_shared_by_two_keys_is_not_a_spelling():
    with pytest.raises(ConfigError, match=r"unknown config key 'eps'.*did you mean fogzo.eps or other.eps\?"):
        Schema(Example).parse_command_line(["--eps=1"])


def test_train_reads_a_key_bare_or_with_its_section():
    bare = parse_overrides(["--lr=3e-3", "--beta-min", "0.99", "--no-augment"])
    with_section = parse_overrides(["--optim.lr", "3e-3", "--estimator.beta_min=0.99", "--data.no-augment"])
    assert bare == with_section == {"lr": 3e-3, "beta_min": 0.99, "augment": False}
    with pytest.raises(ConfigError, match=r"unknown config key 'quant\.lr'"):
        parse_overrides(["--quant.lr=1"])  # a key under another section is not that key


def test_reproduce_takes_the_same_syntax(capsys):
    expected = dataclasses.replace(
        quick_config(),
        bits="ternary",
        seeds=(0, 1),
        fogzo=FogzoOptions(beta_min=0.99, guide_norm=10.0, one_sided=True),
    )
    spellings = [
        ["--bits", "ternary", "--seeds=0,1", "--fogzo.beta-min=0.99", "--fogzo.guide_norm", "10", "--fogzo.one-sided"],
        ["--bits=ternary", "--seeds", "0,1", "--beta-min", "0.99", "--guide-norm=10", "--one-sided"],
    ]
    for spelling in spellings:
        assert fogzo_main(["reproduce", "mnist", "--quick", "--dry-run", *spelling]) == 0, spelling
        printed = capsys.readouterr().out
        assert "bits = 'ternary'" in printed and "beta_min = 0.99" in printed and "one_sided = True" in printed
    assert resolve_config(spellings[0][:-1] + ["--no-fogzo.one-sided", "--fogzo.one-sided"], quick=True) == expected
    assert fogzo_main(["reproduce", "mnist", "--quick", "--dry-run", "--lr=1e-3"]) == 2
    assert "unknown config key 'lr' in the command line (did you mean lrs?)" in _error_line(
        capsys, "fogzo reproduce mnist: error: "
    )
    assert fogzo_main(["reproduce", "mnist", "--dry-run", "--iterations"]) == 2
    assert "--iterations needs a value (expected int)" in _error_line(capsys, "fogzo reproduce mnist: error: ")
    assert fogzo_main(["reproduce", "mnist", "--dry-run", "--set", "bits=1"]) == 2  # the older spelling is gone
    assert "unknown config key 'set'" in _error_line(capsys, "fogzo reproduce mnist: error: ")


def test_help_keys_lists_every_key_of_both_commands(capsys):
    assert fogzo_main(["reproduce", "mnist", "--help-keys"]) == 0
    listed = capsys.readouterr().out
    for key in ("--bits", "--fogzo.beta-min (or --beta-min)", "--spsa-iterations", "--data-dir"):
        assert key in listed, key
    assert len(listed.splitlines()) == len(MnistConfig.__dataclass_fields__) - 1 + len(FogzoOptions.__dataclass_fields__)
    assert fogzo_main(["train", "--help-keys"]) == 0
    listed = capsys.readouterr().out
    assert all(f"--{name.replace('_', '-')} " in listed for name in FIELDS)


# ------------------------------------------------------------------ one file reader


def test_reproduce_reads_a_toml_file_and_its_own_saved_config(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text('bits = 1\nlrs = [1e-3, 1e-2]\nste = "tanh"\n\n[fogzo]\nguide-norm = 10\nn = 2\n')
    config = resolve_config(["--fogzo.n=3"], config_file=path, quick=True)
    assert config == dataclasses.replace(
        quick_config(), bits=1, lrs=(1e-3, 1e-2), ste="tanh", fogzo=FogzoOptions(guide_norm=10.0, n=3)
    )
    saved = tmp_path / "config.json"  # what a study writes: the resolved config
    saved.write_text(json.dumps(config_to_dict(config)))
    assert resolve_config(config_file=saved) == config


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('bits = 2\n[fogzo]\nbeta = 0.9\n', r"unknown config key 'fogzo.beta' in .* \(did you mean fogzo.beta_min\?\)"),
        ('fogzo = 3\n', r"fogzo in .*: expected a table, got 3"),
        ('iterations = "many"\n', r"iterations in .*: expected int, got 'many'"),
        ('optimizer = "adamw"\n', r"optimizer='adamw' is not one of \['adam', 'sgd'\]"),
        ('spsa_n = [1, 8]\nspsa_iterations = [1, 2, 3]\n', r"spsa_iterations must be one value"),
        ("bits = 2\nbits = 3\n", r"not valid TOML"),
    ],
)
def test_a_bad_reproduce_file_is_one_line_before_any_work(tmp_path, capsys, content, expected):
    path = tmp_path / "study.toml"
    path.write_text(content)
    out = tmp_path / "out"
    assert fogzo_main(["reproduce", "mnist", "--config", str(path), "--out", str(out)]) == 2
    assert re.search(expected, _error_line(capsys, "fogzo reproduce mnist: error: "))
    assert not out.exists()


# ------------------------------------------------------- the estimator section = kwargs


def _keyword_options(cls: type) -> set[str]:
    return set(inspect.signature(cls).parameters) - RUN_FIXED_ESTIMATOR_ARGS


def test_the_estimator_section_is_exactly_fogzos_keyword_arguments():
    section = {name for name, f in FIELDS.items() if f.metadata["section"] == "estimator"} - {"estimator"}
    classes = (fogzo.FOGZO, fogzo.SPSA, fogzo.SmoothedForwardSTE, fogzo.NoiseMatchedSTE)
    assert section == set().union(*map(_keyword_options, classes))
    config = TrainConfig(noise_stream="counter", guide_norm=10.0, n=3)
    options = estimator_options(config)
    assert options == {name: getattr(config, name) for name in _keyword_options(fogzo.FOGZO)}
    noise = estimator_options(TrainConfig(estimator="ste-noise", noise_scale=2.0))
    assert set(noise) == _keyword_options(fogzo.NoiseMatchedSTE) and noise["noise_scale"] == 2.0
    with pytest.raises(ConfigError, match=r"noise_scale does not apply to estimator=fogzo"):
        estimator_options(TrainConfig(noise_scale=2.0))
    # and the FOGZO options of fogzo reproduce are FOGZO's keyword arguments too
    assert {f.name for f in dataclasses.fields(FogzoOptions)} <= _keyword_options(fogzo.FOGZO)


def test_build_estimator_passes_the_section_through_unchanged(monkeypatch):
    seen = {}

    class Recorder:
        def __init__(self, model, **kwargs):
            seen.update(kwargs)

    Recorder.__signature__ = inspect.signature(fogzo.FOGZO)  # (the keys FOGZO takes)

    from fogzo.train import build

    monkeypatch.setattr(build, "FOGZO", Recorder)
    config = load_config(None, ["--noise-stream=counter", "--guide-norm=10", "--beta=0.5", "--one-sided", "--seed=7"])
    build_estimator(config, nn.Linear(2, 2), 100)
    assert seen == {**estimator_options(config), "total_steps": 100, "seed": 7}
    assert seen["noise_stream"] == "counter" and seen["beta"] == 0.5 and seen["one_sided"] is True


def test_spsa_refuses_fogzo_only_keys_and_builds_with_the_rest():
    model = fogzo.quantize(nn.Sequential(nn.Linear(4, 4)), fogzo.QuantConfig(bits=2), skip_first_last=False)
    config = load_config(None, ["--estimator=spsa", "--guide-norm=10", "--beta-min=0.9"])
    with pytest.raises(ConfigError, match=r"beta_min, guide_norm do not apply to estimator=spsa"):
        build_estimator(config, model, 10)  # also checked before any work: check_config builds it
    config = load_config(None, ["--estimator=spsa", "--n=3", "--noise-stream=counter", "--eps=0.01"])
    estimator = build_estimator(config, model, 10)
    assert isinstance(estimator, fogzo.SPSA) and estimator.n == 3
    info = estimator.estimate(lambda: model(torch.ones(2, 4)).square().mean())
    assert info.forward_passes == 2 * 3 + 1 and len(info.differences) == 3


def test_the_noise_matched_ste_takes_noise_scale_from_the_command_line():
    model = fogzo.quantize(nn.Sequential(nn.Linear(4, 4)), fogzo.QuantConfig(bits=2), skip_first_last=False)
    config = load_config(None, ["--estimator=ste-noise", "--noise-scale=1.5", "--beta-min=0.99"])
    estimator = build_estimator(config, model, 10)
    assert isinstance(estimator, fogzo.NoiseMatchedSTE) and estimator.noise_scale == 1.5
    with pytest.raises(ConfigError, match="noise_scale does not apply to estimator=spsa"):
        build_estimator(load_config(None, ["--estimator=spsa", "--noise-scale=2"]), model, 10)
