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
    for key in ("fogzo.closure", "fogzo.perturbation", "fogzo.noise", "fogzo.guide", "fogzo.guard", "fogzo.resolve",
                "ste.closure", "ste.estimate", "forward_inference"):
        assert median[key] > 0, key
    assert "ratio" in capsys.readouterr().out
    # The wrappers are removed afterwards.
    import fogzo.estimators.fogzo as fogzo_module

    assert fogzo_module.FOGZO._perturbation.__name__ == "_perturbation"


def test_operator_counts_and_targets_in_the_json(step_cost, tmp_path):
    """--ops-only: deterministic operator counts per variant, their ratios and issue 12's targets."""
    path = tmp_path / "ops.json"
    step_cost.main(["--ops-only", "--models", "tiny", "--json", str(path)])
    (result,) = json.loads(path.read_text())
    counts = result["op_counts"]
    assert set(counts) == set(step_cost.OP_VARIANTS) & set(step_cost.VARIANTS)  # the noise-stream variants are opt-in
    for variant, count in counts.items():
        assert count["ops"] >= count["kernels"] > 0 and count["estimator_syncs"] >= 0, variant
    # The float step reads nothing on the host; FOGZO reads its step's values once.
    assert counts["float_step"]["estimator_syncs"] == 0 and counts["fogzo"]["estimator_syncs"] == 1
    assert counts["fogzo"]["ops"] > counts["ste"]["ops"] + 2 * counts["forward_inference"]["ops"]
    ratios, targets = result["op_ratios"], result["op_targets"]
    assert ratios["ste_over_float_ops"] == pytest.approx(counts["ste"]["ops"] / counts["float_step"]["ops"])
    for name, target in targets.items():
        assert target["met"] == (target["value"] <= target["bound"]), name
    assert result["times_ms"] == {} and result["memory"] == {}


def test_gpu_suite_dry_run_exercises_every_path(step_cost, tmp_path):
    """The --gpu-suite preset on a CPU (--dry-run): quick sizes, one round, op counts, in-process
    memory, kernel/wall profiles and, for llama-30m, the compiled variants (aot_eager here: no
    code generation, which takes minutes on a CPU); JSON after each model."""
    path = tmp_path / "suite.json"
    results = step_cost.main(["--gpu-suite", "--dry-run", "--models", "tiny,llama-30m", "--compile-backend",
                              "aot_eager", "--json", str(path)])
    assert [r["model"] for r in json.loads(path.read_text())] == ["tiny", "llama-30m"] == [r["model"] for r in results]
    tiny, lm = results
    assert tiny["settings"]["gpu_suite"] and tiny["settings"]["dry_run"] and tiny["machine"]["device"] == "cpu"
    assert set(tiny["times_ms"]) == set(step_cost.SUITE_VARIANTS)
    assert set(tiny["memory"]) == {"ste", "fogzo"} and tiny["memory"]["fogzo"]["delta_mb"] >= 0
    assert set(tiny["kernel_profile"]) == {"ste", "fogzo"} and tiny["kernel_profile"]["fogzo"]["wall_ms_per_step"] > 0
    assert lm["workload"]["autocast"] == "bfloat16" and lm["workload"]["n_layers"] == 2
    compiled = lm["compile"]
    assert set(compiled["seconds"]) == {"ste_compiled", "forward_compiled", "fogzo_compiled", "float_compiled"}
    assert compiled["graph_breaks"] == 0 and compiled["explain"]["graph_break_count"] == 0
    assert lm["times_ms"]["fogzo_compiled"] > 0 and lm["op_counts"]["fogzo_compiled"]["ops"] > 0


def test_compare_trees_runs_two_packages_side_by_side(tmp_path):
    """compare_trees.py imports another tree's fogzo as fogzo_before (here: this tree again, so
    the two sets of operator counts must be equal) and times both in one interleaved run."""
    spec = importlib.util.spec_from_file_location("compare_trees", SCRIPT.with_name("compare_trees.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    src = Path(__file__).resolve().parents[1] / "src"
    try:
        result = module.main(["--before", str(src), "--ops-models", "tiny", "--time-models", "tiny", "--repeats", "2",
                              "--warmup", "1", "--json", str(tmp_path / "trees.json")])
        assert sys.modules["fogzo_before"].__name__ == "fogzo_before"
    finally:
        for name in [n for n in sys.modules if n == "fogzo_before" or n.startswith("fogzo_before.")]:
            del sys.modules[name]
    ops = result["ops"]["tiny"]
    assert ops["before"]["counts"] == ops["after"]["counts"]
    timing = result["time"]["tiny"]
    assert set(timing["after_over_before"]) == set(module.VARIANTS)
    assert all(value > 0 for value in timing["median_us"].values())


def test_noise_speed_compares_the_three_generators(tmp_path):
    """noise_speed.py times block noise, the eager and the compiled counter stream, and checks
    that the compiled counter noise is the eager one (uniform law: bit for bit)."""
    spec = importlib.util.spec_from_file_location("noise_speed", SCRIPT.with_name("noise_speed.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        result = module.main(["--sizes", "1000", "--laws", "uniform", "--repeats", "2", "--json", str(tmp_path / "n.json")])
    except Exception as error:  # inductor needs a C++ compiler
        pytest.skip(f"torch.compile does not work here: {type(error).__name__}")
    (row,) = result["rows"]
    assert row["counter_compiled_equals_eager"] is True and row["elements"] == 1000
    assert set(row["ns_per_element"]) == {"blocks", "counter_eager", "counter_compiled"}
    assert all(value > 0 for value in row["ns_per_element"].values())


def test_gpu_suite_summary_compares_each_family_at_its_last_common_evaluation(tmp_path, monkeypatch):
    """experiments/gpu_suite.py: runs stopped at the deadline reached different steps; the
    family table takes the last evaluation step all of a family's runs reached, the final
    results count as an evaluation at the run's last step, and timings are not metrics."""
    path = Path(__file__).resolve().parents[1] / "experiments" / "gpu_suite.py"
    spec = importlib.util.spec_from_file_location("gpu_suite", path)
    suite = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_suite", suite)  # its dataclass looks itself up there
    spec.loader.exec_module(suite)
    jobs = suite.jobs()
    assert len(jobs) == len(suite.FAMILIES) * len(suite.ESTIMATORS) * len(suite.SEEDS)
    assert all(job.values["lr"] == suite.LRS[suite.family_of(job.name)][suite.estimator_of(job.name)] for job in jobs)
    for index, job in enumerate(jobs):
        folder = tmp_path / "runs" / job.name
        folder.mkdir(parents=True)
        reached = 3 if index % 2 == 0 else 2  # evaluations 100, 200 (and 300 for every other run)
        records = [{"event": "train", "step": 10 * k, "step_time": 0.5} for k in range(1, 10 * reached + 1)]
        for k in range(1, reached + 1):
            metric = {"eval_ppl": float(index + k)} if "llama" in job.name else {"eval_accuracy": 0.1 * k}
            records.append({"event": "eval", "step": 100 * k, **metric, "eval_time": 9.0})
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    finished = jobs[0].name  # one run finished: its results are an evaluation at step 400
    (tmp_path / "runs" / finished / "results.json").write_text(json.dumps({"steps_done": 400, "eval_ppl": 0.5, "eval_time": 1.0}))
    suite.write_summary(tmp_path, {job.name: 130 for job in jobs}, 1.0, dry_run=False)
    runs = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert runs[0]["evals"]["400"] == {"eval_ppl": 0.5} and runs[0]["steps"] == 300
    assert all("eval_time" not in e for run in runs for e in run["evals"].values())
    summary = (tmp_path / "summary.md").read_text()
    # llama10m-ste-seed0 is job 0 (index + 2 at step 200), seed1 job 1: mean of 2 and 3.
    assert "| llama10m | 200 | ste | eval_ppl 2.5 | [2, 3] | 0.5000 |" in summary
    assert "| resnet20 | 200 | ste | eval_accuracy 0.2 |" in summary

