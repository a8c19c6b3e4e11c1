"""Integrations with the training stacks users already have (docs/integrations.md).

* :mod:`fogzo.integrations.torchao`: :func:`~fogzo.integrations.torchao.to_torchao`, a model
  trained with fogzo's quantizers in torchao's converted (post-QAT) form. torchao-prepared
  QAT models train with the estimators as they are (:mod:`fogzo.adapters`).
* :mod:`fogzo.integrations.transformers`: a Hugging Face ``Trainer`` whose training step
  runs a fogzo estimator.
* :mod:`fogzo.integrations.lightning`: a ``LightningModule`` mixin for manual optimization.

Each module imports its framework only when used; ``import fogzo`` imports none of them.
"""

from __future__ import annotations

import math

from ..estimators import EstimateInfo, Estimator

__all__ = ["estimator_logs"]


def estimator_logs(infos: list[EstimateInfo], estimator: Estimator | None = None) -> dict[str, float]:
    """Means over ``infos``: β, the finite differences, zero differences, skipped steps, ``‖g_x‖``."""
    logs: dict[str, float] = {}
    betas = [info.beta for info in infos if info.beta is not None]
    if betas:
        logs["fogzo/beta"] = sum(betas) / len(betas)
    differences = [d for info in infos for d in info.differences]
    if differences:
        logs["fogzo/difference_mean"] = sum(differences) / len(differences)
        logs["fogzo/difference_abs_mean"] = sum(abs(d) for d in differences) / len(differences)
        logs["fogzo/zero_difference_fraction"] = sum(info.zero_differences for info in infos) / len(differences)
    norms = [
        info.ste_grad_norm for info in infos if info.ste_grad_norm is not None and math.isfinite(info.ste_grad_norm)
    ]
    if norms:
        logs["fogzo/ste_grad_norm"] = sum(norms) / len(norms)
    logs["fogzo/skipped"] = float(sum(info.skipped for info in infos))
    if estimator is not None:
        state = estimator.state_dict()
        if "step" in state:
            logs["fogzo/step"] = float(state["step"])
    return logs
