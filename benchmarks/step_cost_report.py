"""The result of ``step_cost.py`` for one model: ratios, the JSON object and the printed table.

:func:`summarize` turns the timing samples, memory measurements and operator counts of one
model into the object written to the JSON (keys in ``step_cost.py``'s docstring; those always
present are :data:`REQUIRED_KEYS`); :func:`print_summary` prints it as a table.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from typing import Any

from harness import difference, quartiles, ratio, total
from workloads import COMPILED_VARIANTS, NOISE_VARIANTS, VARIANTS

__all__ = ["OP_TARGETS", "REQUIRED_KEYS", "op_summary", "print_summary", "summarize"]

OP_TARGETS = {"ste_over_float": 1.2, "fogzo_over_limit": 1.1}
REQUIRED_KEYS = (
    "model",
    "fogzo_over_limit",
    "one_sided_over_limit",
    "fogzo_over_ste",
    "peak_memory_ratio",
    "spsa_batched_speedup",
)


def op_summary(counts: dict[str, dict[str, Any]]) -> tuple[dict[str, float | None], dict[str, Any]]:
    """Ratios of the operator counts and whether issue 12's targets are met."""
    def get(variant: str, key: str) -> float | None:
        value = counts.get(variant, {}).get(key)
        return None if value is None else float(value)

    ratios: dict[str, float | None] = {}
    for key in ("ops", "kernels"):
        ratios[f"ste_over_float_{key}"] = ratio(get("ste", key), get("float_step", key))
        limit = total(get("ste", key), get("forward_inference", key), get("forward_inference", key))
        ratios[f"fogzo_over_limit_{key}"] = ratio(get("fogzo", key), limit)
        ratios[f"one_sided_over_limit_{key}"] = ratio(
            get("fogzo_one_sided", key), total(get("ste", key), get("forward_inference", key))
        )
        for variant in NOISE_VARIANTS:
            if variant in counts:
                ratios[f"{variant}_over_limit_{key}"] = ratio(get(variant, key), limit)
    targets = {}
    for name, bound in OP_TARGETS.items():
        value = ratios.get(f"{name}_ops")
        targets[name] = {"bound": bound, "value": value, "met": None if value is None else value <= bound}
    return ratios, targets


def summarize(
    model: str,
    samples: dict[str, list[float]],
    memory: dict[str, dict[str, Any]],
    skipped: dict[str, str],
    workload: dict[str, Any],
    settings: dict[str, Any],
    machine: dict[str, Any],
    notes: list[str],
    op_counts: dict[str, dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    median = {v: statistics.median(s) * 1e3 for v, s in samples.items() if s}
    t = median.get
    delta = {v: m.get("delta_mb") for v, m in memory.items()}
    peak = {v: m.get("peak_mb") for v, m in memory.items()}
    op_ratios, op_targets = op_summary(op_counts or {})
    limit = total(t("ste"), t("forward_inference"), t("forward_inference"))
    result = {
        "model": model,
        "fogzo_over_limit": ratio(t("fogzo"), limit),
        "one_sided_over_limit": ratio(t("fogzo_one_sided"), total(t("ste"), t("forward_inference"))),
        "fogzo_over_ste": ratio(t("fogzo"), t("ste")),
        "peak_memory_ratio": ratio(delta.get("fogzo"), delta.get("ste")),
        "spsa_batched_speedup": ratio(t("spsa_looped"), t("spsa_batched")),
        "one_sided_over_ste": ratio(t("fogzo_one_sided"), t("ste")),
        "fogzo_over_limit_no_grad": ratio(t("fogzo"), total(t("ste"), t("forward_no_grad"), t("forward_no_grad"))),
        "quantizer_overhead": ratio(t("ste"), t("float_step")),
        "spsa_n1_over_two_forwards": ratio(t("spsa_n1"), total(t("forward_no_grad"), t("forward_no_grad"))),
        "peak_memory_total_ratio": ratio(peak.get("fogzo"), peak.get("ste")),
        "fogzo_over_ste_cost_units": 5 / 3,
        "fogzo_overhead_ms": difference(t("fogzo"), limit),
        "one_sided_overhead_ms": difference(t("fogzo_one_sided"), total(t("ste"), t("forward_inference"))),
        "compiled_ratios": {
            "ste_compiled_over_float_compiled": ratio(t("ste_compiled"), t("float_compiled")),
            "fogzo_compiled_over_limit": ratio(
                t("fogzo_compiled"), total(t("ste_compiled"), t("forward_compiled"), t("forward_compiled"))
            ),
            "fogzo_compiled_over_fogzo": ratio(t("fogzo_compiled"), t("fogzo")),
        },
        "noise_ratios": {
            f"{v}_over_limit": ratio(t(v), limit) for v in NOISE_VARIANTS if t(v) is not None
        },
        "times_ms": {v: median.get(v) for v in (*VARIANTS, *NOISE_VARIANTS, *COMPILED_VARIANTS)
                     if v in samples or v in skipped},
        "times_ms_iqr": {v: [q * 1e3 for q in quartiles(s)] for v, s in samples.items() if s},
        "times_ms_samples": {v: [x * 1e3 for x in s] for v, s in samples.items()},
        "memory": memory,
        "op_counts": op_counts or {},
        "op_ratios": op_ratios,
        "op_targets": op_targets,
        "skipped": skipped,
        "workload": workload,
        "settings": settings,
        "notes": notes,
        "machine": machine,
    }
    result.update(extra or {})
    return result


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def print_summary(result: dict[str, Any], out: Callable[[str], None]) -> None:
    w = result["workload"]
    shape = f"batch {w['batch']} x seq {w['seq_len']}" if "seq_len" in w else f"batch {w['batch']} x {w['shape']}"
    out(
        f"\n== {result['model']}: {w['parameters']:,} parameters, "
        f"{w.get('perturbed_coordinates', 0):,} perturbed, {shape}"
        f"{', autocast ' + w['autocast'] if w.get('autocast') else ''} =="
    )
    counts = result["op_counts"]
    out(f"  {'variant':<18}{'median ms':>12}{'IQR ms':>20}{'n':>4}{'peak Δ MB':>12}{'peak MB':>10}"
        f"{'ops':>7}{'kernels':>9}{'syncs':>7}")
    for variant, value in result["times_ms"].items():
        iqr = result["times_ms_iqr"].get(variant)
        count = len(result["times_ms_samples"].get(variant, []))
        memory = result["memory"].get(variant, {})
        ops = counts.get(variant, {})
        iqr_text = f"{iqr[0]:.2f}-{iqr[1]:.2f}" if iqr else "-"
        median_text = _fmt(value, 2) if value is not None else "skipped"
        out(
            f"  {variant:<18}{median_text:>12}{iqr_text:>20}{count:>4}"
            f"{_fmt(memory.get('delta_mb'), 1):>12}{_fmt(memory.get('peak_mb'), 1):>10}"
            f"{ops.get('ops', '-'):>7}{ops.get('kernels', '-'):>9}{ops.get('estimator_syncs', '-'):>7}"
        )
    for variant in counts:
        if variant not in result["times_ms"]:
            ops = counts[variant]
            out(f"  {variant:<18}{'-':>12}{'-':>20}{0:>4}{'n/a':>12}{'n/a':>10}"
                f"{ops['ops']:>7}{ops['kernels']:>9}{ops['estimator_syncs']:>7}")
    n = result["settings"].get("spsa_n")
    rows = [
        ("FOGZO / (STE + 2·forward)", result["fogzo_over_limit"]),
        ("  FOGZO − (STE + 2·forward), ms", result["fogzo_overhead_ms"]),
        ("one-sided / (STE + forward)", result["one_sided_over_limit"]),
        ("FOGZO / STE  (cost units 5/3 = 1.667)", result["fogzo_over_ste"]),
        ("one-sided / STE  (cost units 4/3 = 1.333)", result["one_sided_over_ste"]),
        ("peak memory Δ FOGZO / STE", result["peak_memory_ratio"]),
        ("peak memory total FOGZO / STE", result["peak_memory_total_ratio"]),
        ("STE quantized / float step", result["quantizer_overhead"]),
        (f"n-SPSA({n}) looped / batched (speed-up)", result["spsa_batched_speedup"]),
    ]
    rows += [(f"compiled: {key}", value) for key, value in result["compiled_ratios"].items() if value is not None]
    rows += [(f"noise stream: {key}", value) for key, value in result.get("noise_ratios", {}).items()]
    for label, value in rows:
        out(f"  {label:<44}{_fmt(value):>8}")
    ratios = result["op_ratios"]
    if counts:
        for key in ("ops", "kernels"):
            out(f"  operator counts ({key}): STE / float {_fmt(ratios[f'ste_over_float_{key}'])}, "
                f"FOGZO / (STE + 2·fwd) {_fmt(ratios[f'fogzo_over_limit_{key}'])}, "
                f"one-sided / (STE + fwd) {_fmt(ratios[f'one_sided_over_limit_{key}'])}"
                + "".join(f", {v} / (STE + 2·fwd) {_fmt(ratios[f'{v}_over_limit_{key}'])}"
                          for v in NOISE_VARIANTS if f"{v}_over_limit_{key}" in ratios))
        for name, target in result["op_targets"].items():
            met = {None: "n/a", True: "met", False: "MISSED"}[target["met"]]
            out(f"  target {name} (ops) <= {target['bound']}: {_fmt(target['value'])} {met}")
    if "compile" in result:
        out(f"  compile: {json.dumps(result['compile'])}")
    if "kernel_profile" in result:
        out(f"  kernel profile: {json.dumps(result['kernel_profile'])}")
    for variant, reason in result["skipped"].items():
        out(f"  note: {variant} not measured: {reason}")
    for note in result["notes"]:
        out(f"  note: {note}")
