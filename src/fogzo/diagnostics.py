"""How wrong is the STE here? Compare it, layer by layer, with the exact smoothed gradient.

:func:`diagnose` runs one STE pass (forward + backward, gradients returned, nothing written to
``.grad``) and the smoothed-gradient oracle (:mod:`fogzo.estimators.smoothed`) on a random
subset of coordinates of every quantized layer, with the same smoothing the STE stands for,
and reports per layer, in normalised coordinates ``x = W/c``:

* ``cosine``: between the STE gradient ``g_x`` and the exact smoothed gradient ``∇L_s`` on the
  subset (1: the STE points exactly along the smoothed gradient; 0: orthogonal);
* ``reliability`` (``draws ≥ 2``): the cosine between the oracle's estimates from two halves of
  the draws, a measure of the oracle's own noise; ``cosine_corrected`` divides that noise out
  (``cosine·√((1 + 1/ρ)/2)``, the attenuation correction for independent draws), an estimate of
  the cosine with the noise-free ``∇L_s``;
* ``sign_agreement``: the fraction of coordinates with a non-zero smoothed gradient whose STE
  gradient has the same sign;
* ``blind_slope``: the fraction of coordinates whose STE surrogate slope is zero although the
  smoothed gradient is not (weights beyond the clip range or saturated). For the STE's own
  smoothing the slope and the smoothed gradient share their support, so this is zero unless
  ``smoothing=`` names a wider one;
* ``blind_gradient``: the fraction whose STE gradient is exactly zero although the smoothed
  gradient is not (also catches weights feeding dead units, where the single rounded point sees
  nothing and the stochastic roundings do);
* ``norm_ratio``: ``‖g_x‖ / ‖∇L_s‖`` on the subset.

Parameters, buffers, ``.grad``, the global RNG and the model's training mode are left exactly as
they were. Cost: one forward and one backward, then ``draws`` × (1 + moves) forwards, where
moves ≈ ``coordinates`` × layers (see :class:`fogzo.SmoothedGradient`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .estimators.base import Closure, checked_loss
from .estimators.noise import derive_seed
from .estimators.perturbed_set import PerturbedSet
from .estimators.smoothed import COORDINATE_STREAM, broadcast_scale, quantizer_levels, smoothed_partials
from .estimators.state import CallState, StateGuard
from .smoothing import Smoothing

__all__ = ["Diagnosis", "LayerDiagnosis", "diagnose"]


@dataclass(frozen=True)
class LayerDiagnosis:
    """The STE against the exact smoothed gradient on one tensor's sampled coordinates."""

    name: str
    coordinates: int
    numel: int
    cosine: float
    cosine_corrected: float | None
    reliability: float | None
    sign_agreement: float
    blind_slope: float
    blind_gradient: float
    norm_ratio: float
    ste_norm: float
    smoothed_norm: float


@dataclass(frozen=True)
class Diagnosis:
    """What :func:`diagnose` measured: one row per quantized tensor, and all of them pooled."""

    loss: float
    draws: int
    moves: int
    layers: tuple[LayerDiagnosis, ...]
    overall: LayerDiagnosis

    def as_dict(self) -> dict:
        """Plain JSON-ready values (``None`` where a figure is undefined)."""
        return {
            "loss": self.loss,
            "draws": self.draws,
            "moves": self.moves,
            "overall": asdict(self.overall),
            "layers": [asdict(layer) for layer in self.layers],
        }

    def table(self) -> str:
        """A Markdown table, one row per layer and one for all layers pooled."""
        header = (
            "| tensor | coords | cosine | cosine (noise-corrected) | sign agreement | blind (slope 0) "
            "| blind (grad 0) | ‖STE‖/‖∇L_s‖ |\n|---|---|---|---|---|---|---|---|"
        )
        rows = [header]
        for layer in (*self.layers, self.overall):
            rows.append(
                f"| {layer.name} | {layer.coordinates}/{layer.numel} | {_fmt(layer.cosine)} | "
                f"{_fmt(layer.cosine_corrected)} | {_fmt(layer.sign_agreement)} | {_fmt(layer.blind_slope)} | "
                f"{_fmt(layer.blind_gradient)} | {_fmt(layer.norm_ratio)} |"
            )
        return "\n".join(rows)


def _fmt(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    norm = float(a.norm() * b.norm())
    return float((a * b).sum()) / norm if norm > 0 else math.nan


def _compare(
    name: str,
    numel: int,
    ste: torch.Tensor,
    slope: torch.Tensor,
    partials: torch.Tensor,
) -> LayerDiagnosis:
    """Figures for one set of coordinates; ``partials`` is ``[draws, m]``."""
    ste, slope, partials = ste.double(), slope.double(), partials.double()
    smoothed = partials.mean(dim=0)
    cosine = _cosine(ste, smoothed)
    reliability = corrected = None
    if len(partials) >= 2:
        reliability = _cosine(partials[0::2].mean(0), partials[1::2].mean(0))
        if math.isfinite(reliability) and reliability > 0 and math.isfinite(cosine):
            corrected = max(-1.0, min(1.0, cosine * math.sqrt((1.0 + 1.0 / reliability) / 2.0)))
    informative = smoothed != 0
    count = int(informative.sum())
    agree = (torch.sign(ste) == torch.sign(smoothed)) & informative
    smoothed_norm = float(smoothed.norm())
    return LayerDiagnosis(
        name=name,
        coordinates=int(smoothed.numel()),
        numel=numel,
        cosine=cosine,
        cosine_corrected=corrected,
        reliability=reliability,
        sign_agreement=int(agree.sum()) / count if count else math.nan,
        blind_slope=int(((slope == 0) & informative).sum()) / smoothed.numel(),
        blind_gradient=int(((ste == 0) & informative).sum()) / smoothed.numel(),
        norm_ratio=float(ste.norm()) / smoothed_norm if smoothed_norm > 0 else math.nan,
        ste_norm=float(ste.norm()),
        smoothed_norm=smoothed_norm,
    )


def diagnose(
    model: nn.Module,
    closure: Closure,
    *,
    coordinates: int | None = 64,
    draws: int = 4,
    seed: int = 0,
    smoothing: Smoothing | None = None,
    fast: bool = True,
    vectorize: bool = True,
    chunk: int | None = None,
) -> Diagnosis:
    """Compare the STE with the exact gradient of the smoothed loss, per quantized tensor.

    Args:
        model: a model quantized with :func:`fogzo.quantize`.
        closure: runs a forward pass on a fixed batch and returns the scalar loss (as for the
            estimators; call it with the batch you train on).
        coordinates: coordinates sampled per tensor (``None``: all of them).
        draws: stochastic-rounding draws of the oracle (≥ 2 gives the noise-corrected cosine).
        seed: seed of the coordinate subsets and of the draws.
        smoothing: the smoothing whose gradient is the reference (default: the STE's own).
        fast, vectorize, chunk: as for :class:`fogzo.SmoothedGradient`.

    Returns:
        A :class:`Diagnosis`; ``print(diagnosis.table())`` shows it.

    Example::

        report = fogzo.diagnose(model, lambda: F.cross_entropy(model(x), y), coordinates=128)
        print(report.table())
    """
    if coordinates is not None and (
        not isinstance(coordinates, int) or isinstance(coordinates, bool) or coordinates < 1
    ):
        raise ValueError(f"coordinates must be None or an int >= 1, got {coordinates!r}")
    if not isinstance(draws, int) or isinstance(draws, bool) or draws < 1:
        raise ValueError(f"draws must be an int >= 1, got {draws!r}")
    perturbed = PerturbedSet.from_model(model, "quantized", smoothing=smoothing)
    params = [entry.param for entry in perturbed.tensors]
    eps_bar = perturbed.smoothing.eps_bar
    chosen = []
    for entry in perturbed.tensors:
        numel = entry.param.numel()
        if coordinates is None or coordinates >= numel:
            chosen.append(torch.arange(numel, device=entry.param.device))
        else:
            generator = torch.Generator().manual_seed(derive_seed(seed, COORDINATE_STREAM, entry.index))
            chosen.append(torch.randperm(numel, generator=generator)[:coordinates].sort().values.to(entry.param.device))
    # The STE pass is a real forward: it would update BatchNorm statistics and advance the
    # global RNG (dropout). Everything it and the oracle's passes change is put back at the end.
    before = CallState(model, [], None)
    try:
        guard = StateGuard(model)
        loss = checked_loss(closure())
        gradients = torch.autograd.grad(loss, params, allow_unused=True)
        guard.after_first_pass()
        results = smoothed_partials(
            perturbed,
            closure,
            guard,
            seed=seed,
            coordinates=chosen,
            draws=draws,
            chunk=chunk,
            fast=fast,
            vectorize=vectorize,
        )
    finally:
        before.restore()
    rows = []
    pooled: dict[str, list[torch.Tensor]] = {"ste": [], "slope": [], "partials": []}
    for entry, coords, gradient, result in zip(perturbed.tensors, chosen, gradients, results):
        scale = broadcast_scale(entry, eps_bar)
        param = entry.local_param()
        grad_x = torch.zeros_like(param) if gradient is None else gradient.detach() * scale  # g_x = c·g_W
        ste = grad_x.reshape(-1)[coords]
        assert entry.quantizer is not None
        levels = quantizer_levels(entry)
        x = (param / scale).reshape(-1)[coords]
        slope = entry.quantizer.smoothing.surrogate_slope(x, levels.first_threshold, levels.num_thresholds, levels.jump)
        rows.append(_compare(entry.name, param.numel(), ste, slope, result.partials))
        pooled["ste"].append(ste)
        pooled["slope"].append(slope)
        pooled["partials"].append(result.partials)
    overall = _compare(
        "all",
        sum(entry.param.numel() for entry in perturbed.tensors),
        torch.cat(pooled["ste"]),
        torch.cat(pooled["slope"]),
        torch.cat(pooled["partials"], dim=1),
    )
    return Diagnosis(
        loss=float(loss.detach()),
        draws=draws,
        moves=sum(result.moves for result in results),
        layers=tuple(rows),
        overall=overall,
    )
