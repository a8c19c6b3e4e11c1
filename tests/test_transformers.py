"""fogzo.integrations.transformers: a tiny LlamaForCausalLM trained through Hugging Face's Trainer."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fogzo

pytest.importorskip(
    "transformers", reason="transformers is an optional extra (pip install 'fogzo[transformers]'); `make test` installs it"
)
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from fogzo.integrations.transformers import ESTIMATOR_STATE_NAME, FogzoTrainer  # noqa: E402


def _llama(seed=0):
    """A 2-layer LLaMA with a 32-token vocabulary, built from a config (nothing downloaded)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    model = LlamaForCausalLM(config)
    return fogzo.quantize(model, fogzo.QuantConfig(bits=2), skip=["lm_head"])


def _data():
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 32, (48, 12), generator=generator)]


def _args(out, **overrides):
    settings = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        save_steps=2,
        logging_steps=1,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def _fogzo(model, total_steps):
    return fogzo.FOGZO(model, total_steps=total_steps, beta_min=0.9, seed=3)


def _params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ste_through_the_trainer_is_the_trainers_own_step(tmp_path, precision):
    """STE's closure + accelerator.backward reproduce Trainer.training_step bit for bit
    (loss scaling by the accumulated token count, gradient accumulation over 2 micro-batches,
    bf16 autocast where asked)."""
    extra = {"save_strategy": "no", "bf16": precision == "bf16"}
    plain = _llama()
    Trainer(model=plain, args=_args(tmp_path / "plain", **extra), train_dataset=_data()).train()
    ours = _llama()
    trainer = FogzoTrainer(model=ours, args=_args(tmp_path / "ours", **extra), train_dataset=_data(), estimator=fogzo.STE())
    trainer.train()
    assert trainer.estimator.state_dict()["step"] == 4 * 2  # one estimate per micro-batch
    expected = _params(plain)
    assert any(not torch.equal(p, q) for p, q in zip(expected.values(), _params(_llama()).values()))  # it trained
    for name, value in _params(ours).items():
        assert torch.equal(value, expected[name]), name


def test_fogzo_trains_checkpoints_logs_and_resumes_exactly(tmp_path):
    data = _data()
    model = _llama()
    trainer = FogzoTrainer(model=model, args=_args(tmp_path / "run"), train_dataset=data, estimator=_fogzo)
    trainer.train()
    estimator = trainer.estimator
    assert isinstance(estimator, fogzo.FOGZO) and estimator.total_steps == 4 * 2  # max_steps × accumulation
    assert estimator.backward == trainer._fogzo_backward  # the STE pass goes through accelerator.backward
    assert estimator.state_dict() == {"seed": 3, "step": 8}
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4]
    for entry, step in zip(logs, (2, 4, 6, 8)):
        assert entry["fogzo/step"] == step
        # β decays linearly over the 8 estimate calls; the log holds the mean of the interval's two
        first, second = (1 - 0.1 * s / 8 for s in (step - 2, step - 1))
        assert entry["fogzo/beta"] == pytest.approx((first + second) / 2)
        assert math.isfinite(entry["fogzo/difference_mean"]) and entry["fogzo/difference_abs_mean"] > 0
        assert entry["fogzo/skipped"] == 0
    saved = json.loads((tmp_path / "run" / "checkpoint-2" / ESTIMATOR_STATE_NAME).read_text())
    assert saved == {"estimator": "FOGZO", "state": {"seed": 3, "step": 4}}
    finished = _params(model)

    # Resume from step 2 in a fresh process-like setting: new model, new trainer, same factory.
    resumed_model = _llama(seed=1)  # different initial weights: the checkpoint must overwrite them
    resumed = FogzoTrainer(model=resumed_model, args=_args(tmp_path / "run"), train_dataset=data, estimator=_fogzo)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.estimator.state_dict() == {"seed": 3, "step": 8}
    # Same data order, RNG, optimizer state and noise stream: the same weights, bit for bit.
    for name, value in _params(resumed_model).items():
        assert torch.equal(value, finished[name]), name


def test_resume_true_picks_the_last_checkpoint_and_a_given_estimator_keeps_its_identity(tmp_path):
    data = _data()
    model = _llama()
    FogzoTrainer(model=model, args=_args(tmp_path / "run", max_steps=2), train_dataset=data, estimator=_fogzo).train()
    fresh = _llama()
    estimator = fogzo.FOGZO(fresh, total_steps=8, beta_min=0.9, seed=3)  # an instance, not a factory
    trainer = FogzoTrainer(model=fresh, args=_args(tmp_path / "run"), train_dataset=data, estimator=estimator)
    assert estimator.backward == trainer._fogzo_backward
    trainer.train(resume_from_checkpoint=True)
    assert trainer.estimator is estimator and estimator.state_dict() == {"seed": 3, "step": 8}


def test_the_estimator_argument_is_checked_before_training(tmp_path):
    with pytest.raises(TypeError, match="factory"):
        FogzoTrainer(model=_llama(), args=_args(tmp_path), train_dataset=_data(), estimator=fogzo.FOGZO)
    with pytest.raises(TypeError, match="factory"):
        FogzoTrainer(model=_llama(), args=_args(tmp_path), train_dataset=_data(), estimator="fogzo")
    with pytest.raises(ValueError, match="lomo"):
        FogzoTrainer(model=_llama(), args=_args(tmp_path, optim="lomo"), train_dataset=_data(), estimator=fogzo.STE())


def test_the_example_script_runs_and_resumes(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer.py"
    spec = importlib.util.spec_from_file_location("hf_trainer_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    text = tmp_path / "text.txt"
    text.write_text("to be, or not to be, that is the question: " * 40, encoding="utf-8")
    common = ["--text-file", str(text), "--output-dir", str(tmp_path / "out"), "--hidden", "16", "--context", "16"]
    example.main([*common, "--max-steps", "4"])
    assert "step 4: loss" in capsys.readouterr().out
    example.main([*common, "--max-steps", "6", "--resume"])  # continues from checkpoint-4
    assert "step 6: loss" in (out := capsys.readouterr().out) and "estimator state {'seed': 0, 'step': 6}" in out
