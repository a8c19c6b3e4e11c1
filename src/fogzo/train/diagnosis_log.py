"""The STE-bias diagnostic over a training run: records, a table and a plot.

``fogzo train --diagnose-every N`` runs :func:`fogzo.diagnose` on the training batch every
``N`` steps (and on the trained model at the end) and writes a ``{"event": "diagnose", ...}``
record to ``metrics.jsonl``; at the end :func:`write_diagnostics_report` turns them into
``diagnostics.md`` (one row per diagnosis: the pooled figures and each layer's cosine) and
``diagnostics.png`` (the cosine of each layer against the step). docs/diagnostics.md says how
to read them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..diagnostics import Diagnosis
from .records import read_jsonl, write_text_atomic
from .summaries import Curve, markdown_table, plot_curves

__all__ = ["DIAGNOSE_STREAM", "diagnosis_record", "write_diagnostics_report"]

DIAGNOSE_STREAM = 7  # seed stream of the diagnostic's coordinate subsets and draws

_FIGURES = (
    "cosine",
    "cosine_corrected",
    "reliability",
    "sign_agreement",
    "blind_slope",
    "blind_gradient",
    "norm_ratio",
)


def diagnosis_record(report: Diagnosis) -> dict[str, Any]:
    """The JSON fields of one diagnosis: pooled figures, and per layer."""
    overall = report.overall
    return {
        "draws": report.draws,
        "moves": report.moves,
        "coordinates": overall.coordinates,
        **{name: getattr(overall, name) for name in _FIGURES},
        "layers": {layer.name: {name: getattr(layer, name) for name in _FIGURES} for layer in report.layers},
    }


def _fmt(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"


def write_diagnostics_report(out: Path, metrics: str = "metrics.jsonl") -> list[Path]:
    """``diagnostics.md`` (and ``diagnostics.png`` where matplotlib is installed) in ``out``."""
    records = [r for r in read_jsonl(out / metrics) if r.get("event") == "diagnose"]
    if not records:
        return []
    layers = list(records[0]["layers"])
    rows = [
        [
            r["step"],
            _fmt(r["cosine"]),
            _fmt(r["cosine_corrected"]),
            _fmt(r["sign_agreement"]),
            _fmt(r["blind_gradient"]),
            _fmt(r["norm_ratio"]),
            *(_fmt(r["layers"].get(name, {}).get("cosine")) for name in layers),
        ]
        for r in records
    ]
    headers = [
        "step",
        "cosine",
        "noise-corrected",
        "sign agreement",
        "blind (grad 0)",
        "‖STE‖/‖∇L_s‖",
        *(f"cos {name}" for name in layers),
    ]
    text = (
        "# The STE against the exact smoothed gradient during training\n\n"
        f"`fogzo.diagnose` on the training batch every few steps ({records[0]['coordinates']} sampled "
        f"coordinates, {records[0]['draws']} draws); columns 2–6 pool every quantized tensor, the rest are "
        "per tensor. docs/diagnostics.md explains the figures.\n\n" + markdown_table(headers, rows) + "\n"
    )
    written = [write_text_atomic(out / "diagnostics.md", text)]
    try:
        curves = [
            Curve(
                name,
                tuple(float(r["step"]) for r in records),
                tuple(_finite(r["layers"].get(name, {}).get("cosine")) for r in records),
            )
            for name in layers
        ]
        curves.append(
            Curve(
                "all (pooled)", tuple(float(r["step"]) for r in records), tuple(_finite(r["cosine"]) for r in records)
            )
        )
        written.append(
            plot_curves(
                out / "diagnostics.png",
                curves,
                xlabel="step",
                ylabel="cos(STE, ∇L_s)",
                title="STE vs the exact smoothed gradient",
            )
        )
    except ImportError:  # matplotlib missing: the table is enough
        pass
    return written


def _finite(value: Any) -> float:
    return float(value) if value is not None else math.nan
