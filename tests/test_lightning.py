"""fogzo.integrations.lightning: the manual-optimization pattern, with Lightning's Trainer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fogzo
from fogzo.integrations.lightning import CHECKPOINT_KEY, FogzoLightningMixin

L = pytest.importorskip(
    "lightning", reason="lightning is an optional extra (pip install 'fogzo[lightning]'); `make test` installs it"
)


def _data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)


class Classifier(FogzoLightningMixin, L.LightningModule):
    def __init__(self, seed=0, estimator="fogzo"):
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(seed)
        self.net = fogzo.quantize(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), fogzo.QuantConfig(bits=2))
        self.kind = estimator
        self.losses = []

    def configure_estimator(self):
        if self.kind == "ste":
            return fogzo.STE(self.net)
        return fogzo.FOGZO(self.net, total_steps=self.trainer.estimated_stepping_batches, beta_min=0.9, seed=7)

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizer = self.optimizers()
        optimizer.zero_grad()
        info = self.estimate(lambda: F.cross_entropy(self.net(x), y))
        optimizer.step()
        self.losses.append(info.loss)
        return torch.tensor(info.loss)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=2e-2)


def _trainer(root, max_steps, **extra):
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=-1)
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoints],
        deterministic=True,
        **extra,
    )


def test_lightning_trains_logs_checkpoints_and_resumes_exactly(tmp_path):
    module = Classifier()
    trainer = _trainer(tmp_path, 12)
    trainer.fit(module, _data())
    assert trainer.global_step == 12
    estimator = module.estimator
    assert isinstance(estimator, fogzo.FOGZO) and estimator.total_steps == 12
    assert estimator.backward == module.manual_backward
    assert estimator.state_dict() == {"seed": 7, "step": 12}
    metrics = trainer.callback_metrics
    assert float(metrics["fogzo/step"]) == 12 and float(metrics["fogzo/beta"]) == pytest.approx(1 - 0.1 * 11 / 12)
    assert math.isfinite(float(metrics["fogzo/difference_mean"]))
    assert sum(module.losses[-3:]) < sum(module.losses[:3])  # it learns
    checkpoint = torch.load(tmp_path / "epoch=0-step=6.ckpt", weights_only=False)
    assert checkpoint[CHECKPOINT_KEY] == {"estimator": "FOGZO", "state": {"seed": 7, "step": 6}}

    resumed = Classifier(seed=1)  # other initial weights: the checkpoint overwrites them
    _trainer(tmp_path / "again", 12).fit(resumed, _data(), ckpt_path=str(tmp_path / "epoch=0-step=6.ckpt"))
    assert resumed.estimator.state_dict() == {"seed": 7, "step": 12}
    for (name, a), b in zip(module.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    wrong = Classifier(estimator="ste")
    with pytest.raises(ValueError, match="holds the state of a FOGZO estimator"):
        _trainer(tmp_path / "wrong", 12).fit(wrong, _data(), ckpt_path=str(tmp_path / "epoch=0-step=6.ckpt"))


def test_automatic_optimization_is_refused():
    module = Classifier()
    module.automatic_optimization = True
    with pytest.raises(RuntimeError, match="automatic_optimization = False"):
        module.estimate(lambda: torch.zeros(()))
