"""The step-cost benchmark runs end to end and writes the documented JSON schema.

Only the schema is checked: speed goals are measured by ``benchmarks/step_cost.py``,
never asserted in tests (timings depend on the machine and its load).
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_cost.py"
RATIO_KEYS = ("fogzo_over_limit", "one_sided_over_limit", "fogzo_over_ste", "peak_memory_ratio", "spsa_batched_speedup")


@pytest.fixture(scope="module")
def step_cost():
    spec = importlib.util.spec_from_file_location("step_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["step_cost"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("step_cost", None)


def _positive_finite_or_none(value):
    return value is None or (isinstance(value, float) and math.isfinite(value) and value > 0)


def test_quick_mlp_json_schema(step_cost, tmp_path):
    path = tmp_path / "out" / "step_cost.json"
    argv = ["--quick", "--models", "mlp", "--repeats", "2", "--spsa-n", "4", "--json", str(path)]
    returned = step_cost.main(argv)

    results = json.loads(path.read_text())
    assert isinstance(results, list) and len(results) == 1
    assert returned == results
    result = results[0]
    assert result["model"] == "mlp"
    for key in step_cost.REQUIRED_KEYS:
        assert key in result
    for key in RATIO_KEYS + ("one_sided_over_ste", "quantizer_overhead", "fogzo_over_limit_no_grad"):
        assert _positive_finite_or_none(result[key]), (key, result[key])
    # On the MLP every variant runs, so every ratio is measured (values are not checked).
    for key in RATIO_KEYS:
        assert result[key] is not None, key

    assert set(result["times_ms"]) == set(step_cost.VARIANTS)
    for variant, median in result["times_ms"].items():
        assert _positive_finite_or_none(median) and median is not None, variant
        samples = result["times_ms_samples"][variant]
        expected = 1 if variant in step_cost.EXPENSIVE else 2
        assert len(samples) == expected and all(s > 0 for s in samples)

    assert set(result["memory"]) == {"ste", "fogzo"}  # quick default
    for variant, record in result["memory"].items():
        assert "error" not in record, record
        assert record["delta_mb"] >= 0 and record["peak_mb"] >= record["baseline_mb"] > 0
    assert result["settings"]["spsa_n"] == 4 and result["settings"]["repeats"] == 2
    machine = result["machine"]
    assert machine["torch"] and machine["threads"] >= 1 and machine["cpu_model"]


def test_batchnorm_model_skips_batched_spsa(step_cost):
    workload = step_cost.build_workload(
        "resnet20", quick=True, device=step_cost.torch.device("cpu"), seed=0, float_copy=False
    )
    steps = step_cost.make_steps(workload, step_cost.VARIANTS, spsa_n=2, seed=0)
    assert "spsa_batched" not in steps.calls and "spsa_batched" in steps.skipped
    assert "spsa_looped" in steps.calls
    result = step_cost.summarize(
        "resnet20",
        {"spsa_looped": [0.5], "ste": [0.1], "fogzo": [0.2]},
        {},
        steps.skipped,
        workload.description,
        {"spsa_n": 2},
        {},
        [],
    )
    assert result["spsa_batched_speedup"] is None and result["peak_memory_ratio"] is None
    assert result["fogzo_over_limit"] is None  # no forward time: the limit is unknown
    assert result["fogzo_over_ste"] == pytest.approx(2.0)


def test_ratio_rejects_missing_and_nonpositive(step_cost):
    assert step_cost.ratio(2.0, 1.0) == 2.0
    assert step_cost.ratio(None, 1.0) is None
    assert step_cost.ratio(1.0, 0.0) is None
    assert step_cost.ratio(1.0, float("nan")) is None
    assert step_cost.participation(10, 3) == {0, 3, 6}
    assert step_cost.participation(2, 5) == {0, 1}


def test_step_phases_reports_every_phase(step_cost, capsys):
    """The phase breakdown runs on the MLP and times every phase it names (values unchecked)."""
    path = SCRIPT.with_name("step_phases.py")
    spec = importlib.util.spec_from_file_location("step_phases", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    median = module.main(["--model", "mlp", "--steps", "3", "--warmup", "1", "--one-sided"])
    for key in ("fogzo.closure", "fogzo.delta", "fogzo.noise", "fogzo.guides", "fogzo.guard", "fogzo.gradients",
                "ste.closure", "ste.estimate", "forward_inference"):
        assert median[key] > 0, key
    assert "ratio" in capsys.readouterr().out
    # The wrappers are removed afterwards.
    import fogzo.estimators.base as base

    assert base.ZerothOrderMeasurement._delta.__name__ == "_delta"
