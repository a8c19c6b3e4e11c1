"""Reproductions of the paper's studies behind ``fogzo reproduce ...``.

* :mod:`fogzo.reproduce.mnist`: the paper's shallow-network study (784-10-10 MLP on MNIST):
  STE vs FOGZO vs the n-SPSA ladder, learning rates tuned per estimator on one grid.
* :mod:`fogzo.reproduce.common`: config round trips and overrides, JSON-lines logs,
  Markdown tables, plots, progress bars and the compute-ratio helper, shared by experiments.
"""

from .common import apply_overrides, compute_ratio, config_from_dict, config_to_dict, first_reach, select_best
from .mnist import DEFAULT_BITS, FogzoOptions, MnistConfig, quick_config, reproduce

__all__ = [
    "DEFAULT_BITS",
    "FogzoOptions",
    "MnistConfig",
    "apply_overrides",
    "compute_ratio",
    "config_from_dict",
    "config_to_dict",
    "first_reach",
    "quick_config",
    "reproduce",
    "select_best",
]
