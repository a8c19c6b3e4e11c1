"""fogzo: quantization-aware training with the FOGZO gradient estimator.

Quick start::

    import fogzo
    model = fogzo.quantize(model, fogzo.QuantConfig(bits=2, ste="identity"), skip=["head"])
    estimator = fogzo.FOGZO(model, total_steps=10_000, beta_min=0.999, n=1, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for x, y in loader:
        optimizer.zero_grad(set_to_none=True)
        info = estimator.estimate(lambda: F.cross_entropy(model(x), y))  # fills .grad
        optimizer.step()
"""

from .convert import QuantConfig, QuantizationReport, full_precision, quantization_report, quantize, quantized_layers
from .diagnostics import Diagnosis, LayerDiagnosis, diagnose
from .estimators import (
    FOGZO,
    SPSA,
    STE,
    EstimateInfo,
    Estimator,
    NoiseMatchedSTE,
    PerturbedSet,
    SmoothedForwardSTE,
    SmoothedGradient,
    constant_beta,
    linear_beta,
)
from .export import ExportedModel, QuantizedWeight, export, pack_codes, rebuild_float_model, unpack_codes
from .integrations.torchao import to_torchao
from .layers import QuantConv1d, QuantConv2d, QuantEmbedding, QuantizedLayer, QuantLinear, QuantMultiheadAttention
from .quantizers import ActivationQuantizer, LevelSet, WeightQuantizer, fake_quantize, level_set
from .smoothing import NOISE_LAWS, STE_KINDS, NoiseLaw, Smoothing, smoothing_for

__version__ = "0.1.0"

__all__ = [
    "FOGZO",
    "NOISE_LAWS",
    "SPSA",
    "STE",
    "STE_KINDS",
    "ActivationQuantizer",
    "Diagnosis",
    "EstimateInfo",
    "Estimator",
    "ExportedModel",
    "LayerDiagnosis",
    "LevelSet",
    "NoiseMatchedSTE",
    "NoiseLaw",
    "PerturbedSet",
    "QuantConfig",
    "QuantConv1d",
    "QuantConv2d",
    "QuantEmbedding",
    "QuantLinear",
    "QuantMultiheadAttention",
    "QuantizationReport",
    "QuantizedLayer",
    "QuantizedWeight",
    "SmoothedForwardSTE",
    "Smoothing",
    "SmoothedGradient",
    "WeightQuantizer",
    "constant_beta",
    "diagnose",
    "export",
    "fake_quantize",
    "full_precision",
    "level_set",
    "linear_beta",
    "pack_codes",
    "quantization_report",
    "quantize",
    "quantized_layers",
    "rebuild_float_model",
    "smoothing_for",
    "to_torchao",
    "unpack_codes",
]
