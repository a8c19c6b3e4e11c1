"""Gradient estimators: STE, n-SPSA, FOGZO, the smoothed-gradient oracle and two STE controls
(noise-matched, smoothed-forward), all with ``estimate(closure) -> EstimateInfo``."""

from .base import EstimateInfo, Estimator, constant_beta, linear_beta
from .fogzo import FOGZO
from .noise import derive_seed
from .perturbed_set import PerturbedSet
from .smoothed import LevelMoves, SmoothedGradient, smoothed_partials
from .spsa import SPSA
from .ste import STE, NoiseMatchedSTE, SmoothedForwardSTE

__all__ = [
    "FOGZO",
    "SPSA",
    "STE",
    "EstimateInfo",
    "Estimator",
    "LevelMoves",
    "NoiseMatchedSTE",
    "PerturbedSet",
    "SmoothedForwardSTE",
    "SmoothedGradient",
    "constant_beta",
    "derive_seed",
    "linear_beta",
    "smoothed_partials",
]
