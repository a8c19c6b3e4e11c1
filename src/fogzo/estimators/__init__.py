"""Gradient estimators: STE, n-SPSA and FOGZO, all with ``estimate(closure) -> EstimateInfo``."""

from .base import EstimateInfo, Estimator
from .fogzo import FOGZO
from .perturbation import PerturbedSet, derive_seed
from .schedules import constant_beta, linear_beta
from .spsa import SPSA
from .ste import STE

__all__ = [
    "FOGZO",
    "SPSA",
    "STE",
    "EstimateInfo",
    "Estimator",
    "PerturbedSet",
    "constant_beta",
    "derive_seed",
    "linear_beta",
]
