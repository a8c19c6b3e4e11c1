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

import importlib

__all__ = ["require"]


def require(module: str, extra: str, what: str):
    """``importlib.import_module(module)``, or an ``ImportError`` that names the pip extra."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{what} needs the '{module.split('.')[0]}' package: pip install 'fogzo[{extra}]'"
        ) from error
