"""Gradient estimators: STE, n-SPSA, FOGZO and the smoothed-gradient oracle, all with
``estimate(closure) -> EstimateInfo``."""

from .base import EstimateInfo, Estimator
from .fogzo import FOGZO, constant_beta, linear_beta
from .noise import derive_seed
from .perturbed_set import PerturbedSet
from .smoothed import LevelMoves, SmoothedGradient, smoothed_partials
from .spsa import SPSA
from .ste import STE

__all__ = [
    "FOGZO",
    "SPSA",
    "STE",
    "EstimateInfo",
    "Estimator",
    "LevelMoves",
    "PerturbedSet",
    "SmoothedGradient",
    "constant_beta",
    "derive_seed",
    "linear_beta",
    "smoothed_partials",
]
