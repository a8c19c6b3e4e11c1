"""A quick API smoke test, run by .ci/run from the installed wheel (not the source tree)."""

import math
import pathlib

import torch
import torch.nn.functional as F
from torch import nn

import fogzo

assert "site-packages" in pathlib.Path(fogzo.__file__).parts, f"not the installed wheel: {fogzo.__file__}"
torch.manual_seed(0)
model = fogzo.quantize(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)), fogzo.QuantConfig(bits=2))
x, y = torch.randn(32, 16), torch.randint(0, 3, (32,))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
for estimator in (fogzo.STE(model), fogzo.FOGZO(model, total_steps=5, seed=0), fogzo.SPSA(model, n=2, seed=0)):
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        info = estimator.estimate(lambda: F.cross_entropy(model(x), y))
        optimizer.step()
    assert math.isfinite(info.loss) and model[0].weight.grad is not None, info
exported = fogzo.export(model)
rebuilt = fogzo.rebuild_float_model(model, exported)
assert torch.equal(rebuilt.eval()(x), model.eval()(x))
print(f"smoke test of the installed wheel: ok (fogzo {fogzo.__version__}, torch {torch.__version__})")
