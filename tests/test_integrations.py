"""Integration helpers that need no optional package: the Lightning mixin's contract without
Lightning, the log summary, the extras' import errors, and what ``import fogzo`` imports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fogzo
from fogzo._optional import require
from fogzo.integrations import estimator_logs
from fogzo.integrations.lightning import CHECKPOINT_KEY, FogzoLightningMixin


class _Module:
    """What the mixin uses of a LightningModule: manual_backward, log_dict and the two hooks."""

    def on_save_checkpoint(self, checkpoint):
        pass

    def on_load_checkpoint(self, checkpoint):
        pass


class _Stub(FogzoLightningMixin, _Module):
    def __init__(self):
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.net = fogzo.quantize(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), fogzo.QuantConfig(bits=2))
        self.backwards, self.logged = [], []

    def manual_backward(self, loss):
        self.backwards.append(float(loss.detach()))
        (loss * 4).backward()  # like a precision plugin's loss scale

    def log_dict(self, values, **kwargs):
        self.logged.append(values)

    def configure_estimator(self):
        return fogzo.FOGZO(self.net, total_steps=4, seed=1)


def test_lightning_mixin_contract_without_lightning():
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    module = _Stub()
    for _ in range(2):
        module.net.zero_grad(set_to_none=True)
        info = module.estimate(lambda: F.cross_entropy(module.net(x), y))
    assert module.estimator.backward == module.manual_backward and len(module.backwards) == 2
    assert module.logged[-1]["fogzo/step"] == 2 and module.logged[-1]["fogzo/beta"] == info.beta
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint[CHECKPOINT_KEY] == {"estimator": "FOGZO", "state": {"seed": 1, "step": 2}}
    fresh = _Stub()
    fresh.on_load_checkpoint(json.loads(json.dumps(checkpoint)))  # before the estimator exists
    again = {}
    fresh.on_save_checkpoint(again)  # a resumed run saved before its first step keeps the state
    assert again == checkpoint
    fresh.estimate(lambda: F.cross_entropy(fresh.net(x), y))
    assert fresh.estimator.state_dict() == {"seed": 1, "step": 3}


def test_estimator_logs_summarise_an_interval():
    infos = [
        fogzo.EstimateInfo(1.0, 3, 1, 0.9, 5, 0, differences=(0.5, -0.25), zero_differences=0, ste_grad_norm=2.0),
        fogzo.EstimateInfo(1.0, 3, 1, 0.7, 6, 1, differences=(0.0,), zero_differences=1, ste_grad_norm=4.0),
        fogzo.EstimateInfo(1.0, 1, 1, None, 7, 2, skipped=True, ste_grad_norm=float("inf")),
    ]
    logs = estimator_logs(infos)
    assert logs == {
        "fogzo/beta": pytest.approx(0.8),
        "fogzo/difference_mean": pytest.approx(0.25 / 3),
        "fogzo/difference_abs_mean": pytest.approx(0.25),
        "fogzo/zero_difference_fraction": pytest.approx(1 / 3),
        "fogzo/ste_grad_norm": pytest.approx(3.0),
        "fogzo/skipped": 1.0,
    }


def test_require_names_the_extra():
    with pytest.raises(ImportError, match=r"fogzo.thing needs the 'no_such_package_xyz' package: pip install 'fogzo\[extra\]'"):
        require("no_such_package_xyz.sub", "extra", "fogzo.thing")


OPTIONAL = ("tqdm", "matplotlib", "transformers", "torchao", "lightning", "pytorch_lightning", "accelerate",
            "PIL", "tokenizers", "zarr", "safetensors")


def test_import_fogzo_imports_no_optional_package():
    """``import fogzo`` works with every optional or CLI-only package unimportable (a ``None``
    entry in ``sys.modules`` makes ``import x`` raise ImportError), and loads none of them."""
    code = (
        f"import sys; [sys.modules.__setitem__(name, None) for name in {OPTIONAL!r}]; "
        "import fogzo, fogzo.estimators, fogzo.adapters, fogzo.integrations.lightning; "
        "print(sorted(name for name in sys.modules if name.split('.')[0] in "
        f"{OPTIONAL!r} and sys.modules[name] is not None))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
