"""Reproductions of the paper's studies behind ``fogzo reproduce ...``.

* :mod:`fogzo.reproduce.mnist`: the paper's shallow-network study (784-10-10 MLP on MNIST):
  STE vs FOGZO vs the n-SPSA ladder, learning rates tuned per estimator on one grid. Its
  config is in :mod:`~fogzo.reproduce.mnist_config`, the plan and the loop of one run in
  :mod:`~fogzo.reproduce.mnist_runs`, the analysis, ``summary.md`` and plots in
  :mod:`~fogzo.reproduce.mnist_report`.

Config round trips and overrides, JSON-lines logs, progress bars, Markdown tables, plots and
the compute-ratio helper are the training harness's (:mod:`fogzo.train.config_io`,
:mod:`fogzo.train.records`, :mod:`fogzo.train.summaries`).
"""

from .mnist import reproduce
from .mnist_config import DEFAULT_BITS, FogzoOptions, MnistConfig, quick_config

__all__ = [
    "DEFAULT_BITS",
    "FogzoOptions",
    "MnistConfig",
    "quick_config",
    "reproduce",
]
