"""``fogzo train`` under data parallelism (DDP, gloo on CPU, 2 local processes).

* Equivalence: a 2-rank run (each rank half of every global batch) follows the 1-process
  run for STE and FOGZO: same losses, same final weights up to float32 summation order,
  and the sharded evaluation gives bit-identical metrics for the same weights.
* Rank-aware outputs: only rank 0 prints, shows a progress bar and writes files.
* Resume across world sizes: 2 ranks stopped with ``stop_at`` resume in 1 process, and a
  1-process checkpoint resumes on 2 ranks, both ending where an uninterrupted run ends.
* A global batch that does not split into equal shards is a clear error.
* The real launcher: ``torchrun --standalone --nproc-per-node 2 --no-python fogzo train``.

The model is an MLP without BatchNorm or dropout (``skip_first_last=false``: both layers
quantized, 2-bit), trained with plain SGD (no momentum, no weight decay) at a constant
learning rate, so parameter errors add up linearly (see ``_weight_tolerance``). The data
are 64 + 32 random 28x28 "Fashion-MNIST" images written as IDX files (no download).

The 2-rank runs go through :func:`fogzo.distributed.spawn_local` (file rendezvous,
collective timeout, wall-clock deadline); the processes are forked where possible, as in
``tests/test_distributed.py``. All 2-rank jobs share one launch (module fixture).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.optim.optimizer as optim_hooks

from fogzo import distributed as fd
from fogzo.data import write_idx
from fogzo.train import ConfigError, load_config, train
from fogzo.train import data as train_data
from fogzo.train.cli import main as train_main
from fogzo.train.trainer import build_quantized_model

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
WORLD = 2
STEPS = 4
STOP = 2
LR = 0.05
BATCH = 8
WALL_TIMEOUT = 120.0
COLLECTIVE_TIMEOUT = 30.0
U32 = 2.0**-24  # float32 unit roundoff
# Per-step gradient error from summation order, relative to the gradient's scale, as
# derived in tests/test_distributed.py: STE 1e-5 (observed ~1e-7); FOGZO 1e-3 (the finite
# differences divide a loss difference carrying ~8·u·|L| by 2·ε̄; observed ~1e-5).
GRAD_RTOL = {"ste": 1e-5, "fogzo": 1e-3}


def _write_fake_fashion_mnist(folder: Path, train: int = 64, test: int = 32) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for split, count in (("train", train), ("t10k", test)):
        write_idx(folder / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, count).astype(np.uint8))


def _values(data_dir: Path, out: Path, **overrides) -> dict:
    values = {
        "model": "mlp", "model_args": {"hidden": [16]}, "dataset": "fashion_mnist", "data_dir": str(data_dir),
        "batch_size": BATCH, "augment": True, "eval_size": 32, "train_eval_size": 16, "eval_batch_size": 8,
        "bits": 2, "alpha_init": "max", "skip_first_last": False, "estimator": "fogzo", "n": 2,
        "optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0, "lr": LR, "warmup_steps": 0, "min_lr_ratio": 1.0,
        "steps": STEPS, "log_every": 1, "eval_every": 2, "threads": 1, "progress": False, "out": str(out),
    }
    values.update(overrides)
    return values


def _config(values: dict):
    return load_config(None, values)


def _quiet(message: str) -> None:
    pass


def _records(out: Path, event: str = "train") -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in (json.loads(line) for line in lines if line.strip()) if r["event"] == event]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


# ---------------------------------------------------------------- in the child processes


class _WriteSpy:
    """Records every file-system write under ``base`` made by this process.

    Covers ``open``/``io.open`` in a writing mode (``Path.write_text``, ``Path.open``,
    ``JsonlLogger``), ``torch.save`` (its C++ writer bypasses ``open``), ``os.replace``,
    ``os.mkdir`` and ``os.unlink``.
    """

    def __init__(self, base: str) -> None:
        self.base, self.events, self._saved = base, [], []

    def _mine(self, path) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.abspath(os.fspath(path)).startswith(self.base)

    def _patch(self, owner, name, wrapper) -> None:
        original = getattr(owner, name)
        self._saved.append((owner, name, original))
        setattr(owner, name, wrapper(original))

    def __enter__(self) -> _WriteSpy:
        def opener(original):
            def spied(file, mode="r", *args, **kwargs):
                if self._mine(file) and any(flag in mode for flag in "wax+"):
                    self.events.append(("open", os.fspath(file), mode))
                return original(file, mode, *args, **kwargs)
            return spied

        def path_call(what):
            def wrapper(original):
                def spied(path, *args, **kwargs):
                    if self._mine(path):
                        paths = [a for a in args if isinstance(a, (str, os.PathLike))]
                        self.events.append((what, *map(os.fspath, [path, *paths])))
                    return original(path, *args, **kwargs)
                return spied
            return wrapper

        def saver(original):
            def spied(obj, f, *args, **kwargs):
                if self._mine(f):
                    self.events.append(("torch.save", os.fspath(f)))
                return original(obj, f, *args, **kwargs)
            return spied

        self._patch(builtins, "open", opener)
        self._patch(io, "open", opener)
        self._patch(torch, "save", saver)
        for name in ("replace", "mkdir", "unlink"):
            self._patch(os, name, path_call(f"os.{name}"))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)


class _Terminal(io.TextIOWrapper):
    """A stderr that claims to be a terminal, so the trainer's tqdm bar would be shown."""

    def isatty(self) -> bool:
        return True


def _worker(rank: int, world: int, jobs: list[dict], base: str, results_dir: str) -> None:
    # This rank's stdout and stderr, at the file-descriptor level, into files of its own.
    stdout = open(os.path.join(results_dir, f"stdout{rank}.txt"), "w", buffering=1)
    stderr = _Terminal(open(os.path.join(results_dir, f"stderr{rank}.txt"), "wb"), line_buffering=True)
    os.dup2(stdout.fileno(), 1)
    os.dup2(stderr.fileno(), 2)
    sys.stdout, sys.stderr = stdout, stderr
    returned = {}
    with _WriteSpy(base) as spy:
        for job in jobs:
            if job["kind"] == "train":
                returned[job["name"]] = train(_config(job["values"]), resume=job.get("resume", False))
            elif job["kind"] == "batches":  # this rank's share of the first global batches
                data = train_data.build_data(_config(job["values"]), torch.device("cpu"), _quiet)
                returned[job["name"]] = [data.stream.next_batch() for _ in range(job["count"])]
            else:  # evaluate given weights with this rank's share of the evaluation
                config = _config(job["values"])
                data = train_data.build_data(config, torch.device("cpu"), _quiet)
                model = build_quantized_model(config, data.dims)
                model.load_state_dict(torch.load(job["weights"], weights_only=True)["model"])
                returned[job["name"]] = data.evaluate(model, contextlib.nullcontext)
    torch.save({"returned": returned, "writes": spy.events}, os.path.join(results_dir, f"rank{rank}.pt"))
    sys.stdout.flush()
    sys.stderr.flush()


# ---------------------------------------------------------------- the runs (module fixture)


class _GradientLog:
    """Max |grad| over all parameters before each optimizer step (global hook; 1 process)."""

    def __init__(self) -> None:
        self.maxima: list[float] = []

    def __enter__(self) -> _GradientLog:
        def hook(optimizer, args, kwargs):
            grads = [p.grad.abs().max().item() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            self.maxima.append(max(grads))

        self._handle = optim_hooks.register_optimizer_step_pre_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("train_ddp")
    data_dir = base / "data"
    _write_fake_fashion_mnist(data_dir)
    runs_dir, results_dir = base / "runs", base / "results"
    runs_dir.mkdir()
    results_dir.mkdir()
    previous = torch.get_num_threads()
    out = {name: runs_dir / name for name in (
        "one_ste", "one_fogzo", "one_stop", "two_ste", "two_fogzo", "two_stop", "eval_weights")}
    gradient_maxima = {}
    try:
        # 1 process: the references, and a run stopped at STOP for the 1 -> 2 resume.
        for estimator in ("ste", "fogzo"):
            with _GradientLog() as grads:
                train(_config(_values(data_dir, out[f"one_{estimator}"], estimator=estimator)), log=_quiet)
            gradient_maxima[estimator] = grads.maxima
        train(_config(_values(data_dir, out["one_stop"], stop_at=STOP)), log=_quiet)
        shutil.copytree(out["one_stop"], runs_dir / "one_stop_then_two")
        # 2 ranks: one launch runs every job in turn.
        jobs = [
            {"kind": "train", "name": "two_ste", "values": _values(data_dir, out["two_ste"], estimator="ste")},
            {"kind": "train", "name": "two_fogzo", "values": _values(data_dir, out["two_fogzo"], progress=True)},
            {"kind": "train", "name": "two_stop", "values": _values(data_dir, out["two_stop"], stop_at=STOP)},
            {"kind": "train", "name": "one_stop_then_two", "resume": True,
             "values": _values(data_dir, runs_dir / "one_stop_then_two")},
            {"kind": "batches", "name": "batches", "count": 9, "values": _values(data_dir, out["eval_weights"])},
            {"kind": "evaluate", "name": "eval", "values": _values(data_dir, out["eval_weights"]),
             "weights": str(out["one_fogzo"] / "checkpoint.pt")},
        ]
        fd.spawn_local(_worker, WORLD, (jobs, str(runs_dir), str(results_dir)), timeout=WALL_TIMEOUT,
                       collective_timeout=COLLECTIVE_TIMEOUT, start_method=START_METHOD, tmpdir=str(base))
        ranks = [torch.load(results_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
        # 2 ranks stopped at STOP, then 1 process to the end.
        shutil.copytree(out["two_stop"], runs_dir / "two_stop_then_one")
        train(_config(_values(data_dir, runs_dir / "two_stop_then_one")), resume=True, log=_quiet)
        # The same weights evaluated by 1 process.
        config = _config(_values(data_dir, out["eval_weights"]))
        data = train_data.build_data(config, torch.device("cpu"), _quiet)
        model = build_quantized_model(config, data.dims)
        model.load_state_dict(_weights(out["one_fogzo"]))
        one_process_eval = data.evaluate(model, contextlib.nullcontext)
        one_process_batches = [data.stream.next_batch() for _ in range(9)]
    finally:
        torch.set_num_threads(previous)
    return {
        "dirs": runs_dir, "results": results_dir, "ranks": ranks, "gradient_maxima": gradient_maxima,
        "one_process_eval": one_process_eval, "one_process_batches": one_process_batches, "data_dir": data_dir,
    }


def _weight_tolerance(runs, estimator: str) -> float:
    """How far float32 summation order can move the final weights of a 2-rank run.

    Plain SGD at a constant lr: w_T = w_0 − lr·Σ_t g_t, so the weights differ by at most
    lr·Σ_t |δg_t| elementwise. Each step's gradient differs from the 1-process one by
    summation order only: |δg_t| <= GRAD_RTOL·max|g_t| (max over all parameters of the
    1-process run, recorded by an optimizer hook). Earlier weight differences feed back
    into later gradients only through the unquantized biases and the guide's scale (the
    2-bit weights round to the same levels unless a difference of ~1e-8 crosses a rounding
    boundary), which at most doubles the bound over 4 steps: factor 2.
    """
    maxima = runs["gradient_maxima"][estimator]
    assert len(maxima) == STEPS
    return 2 * GRAD_RTOL[estimator] * LR * sum(maxima)


def _loss_tolerance(runs, estimator: str, loss: float) -> float:
    """How far float32 summation order can move a logged training loss of a 2-rank run.

    Summation order of the batch mean: 8·u·|L| (see the step-1 check). Plus the weight
    differences of earlier steps (<= _weight_tolerance): the forward reads the 2-bit
    weights Q(w), which do not change for differences this small, so only the 26 biases
    (16 + 10, not quantized) move the loss, each by at most |∂L/∂b|·δb <= max|g|·δw.
    """
    biases = 16 + 10
    return 8 * U32 * abs(loss) + biases * max(runs["gradient_maxima"][estimator]) * _weight_tolerance(runs, estimator)


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _moved(runs, name: str) -> float:
    """How far training moved the weights (a wrong batch share moves them differently)."""
    config = _config(_values(runs["data_dir"], runs["dirs"] / name))
    initial = build_quantized_model(config, train_data.data_dimensions(config)).state_dict()
    return _max_difference(initial, _weights(runs["dirs"] / name))


# ---------------------------------------------------------------- 1. equivalence


@pytest.mark.parametrize("estimator", ["ste", "fogzo"])
def test_two_ranks_follow_the_one_process_run(runs, estimator):
    one, two = runs["dirs"] / f"one_{estimator}", runs["dirs"] / f"two_{estimator}"
    losses_one = [r["loss"] for r in _records(one)]
    losses_two = [r["loss"] for r in _records(two)]
    assert len(losses_one) == len(losses_two) == STEPS
    # Step 1 (identical weights): the logged 2-rank loss is the mean over ranks of each
    # half's float32 mean loss (all_reduce in float64); the 1-process loss is the float32
    # mean of all 8 per-example losses. They differ by summation order only, a few units
    # of roundoff: |δL| <= 8·u·|L| (as in tests/test_distributed.py).
    assert abs(losses_two[0] - losses_one[0]) <= 8 * U32 * abs(losses_one[0])
    for a, b in zip(losses_one, losses_two):
        assert abs(a - b) <= _loss_tolerance(runs, estimator, a), (losses_one, losses_two)
    tolerance = _weight_tolerance(runs, estimator)
    difference = _max_difference(_weights(one), _weights(two))
    assert difference <= tolerance, (difference, tolerance)
    # The tolerance is small against how far the weights moved: the check has teeth.
    assert tolerance < 0.1 * _moved(runs, f"one_{estimator}")
    # Every rank returned the same record (metrics are means/sums over ranks).
    returned = [r["returned"][f"two_{estimator}"] for r in runs["ranks"]]
    assert returned[0] == returned[1]
    assert returned[0]["world_size"] == WORLD and returned[0]["steps_done"] == STEPS
    one_results = json.loads((one / "results.json").read_text())
    for key in ("eval_loss", "eval_accuracy", "train_eval_loss", "train_eval_accuracy"):
        assert returned[0][key] == pytest.approx(one_results[key], rel=1e-5, abs=1e-7), key
    resolved = json.loads((two / "config.json").read_text())["_resolved"]
    assert (resolved["world_size"], resolved["batch_size_per_rank"], resolved["backend"]) == (WORLD, BATCH // WORLD, "gloo")
    checkpoint = torch.load(two / "checkpoint.pt", weights_only=True)
    assert checkpoint["world_size"] == WORLD
    assert not any(key.startswith("module.") for key in checkpoint["model"])


def test_each_rank_gets_its_slice_of_the_global_batch(runs):
    # 9 batches of 8 from 64 images: crosses an epoch boundary (new permutation), with
    # crop/flip augmentation drawn for the whole global batch.
    for rank, results in enumerate(runs["ranks"]):
        shares = results["returned"]["batches"]
        for (x, y), (x_all, y_all) in zip(shares, runs["one_process_batches"], strict=True):
            half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
            assert x.shape[0] == y.shape[0] == BATCH // WORLD
            assert torch.equal(x, x_all[half]) and torch.equal(y, y_all[half])


def test_sharded_evaluation_is_bit_identical(runs):
    # The same weights evaluated by 2 ranks (each half of the chunks, per-chunk sums
    # gathered and added in chunk order) and by 1 process: exactly the same numbers.
    expected = runs["one_process_eval"]
    assert set(expected) == {"eval_loss", "eval_accuracy", "train_eval_loss", "train_eval_accuracy"}
    for rank in runs["ranks"]:
        assert rank["returned"]["eval"] == expected


# ---------------------------------------------------------------- 2. rank-aware outputs


def test_only_rank_zero_prints_and_writes(runs):
    dirs, results = runs["dirs"], runs["results"]
    rank0, rank1 = runs["ranks"]
    # Rank 1 wrote nothing at all under the run folders; rank 0 wrote every output file.
    assert rank1["writes"] == []
    written = {Path(path).name for event in rank0["writes"] for path in event[1:] if "/" in path}
    assert {"metrics.jsonl", "config.json", "results.json", "checkpoint.pt"} <= written
    # Files that others read are replaced atomically: written as *.tmp, then os.replace.
    replaced = {(Path(e[1]).name, Path(e[2]).name) for e in rank0["writes"] if e[0] == "os.replace"}
    assert {("checkpoint.pt.tmp", "checkpoint.pt"), ("config.json.tmp", "config.json")} <= replaced
    assert not any(Path(e[1]).name == "checkpoint.pt" for e in rank0["writes"] if e[0] != "os.replace")
    for name in ("two_ste", "two_fogzo"):
        assert sorted(p.name for p in (dirs / name).iterdir()) == [
            "checkpoint.pt", "config.json", "metrics.jsonl", "results.json"]
        # One writer: every step logged once, in order, and one final record.
        assert [r["step"] for r in _records(dirs / name)] == list(range(1, STEPS + 1))
        assert len(_records(dirs / name, "final")) == 1
    # Only rank 0 printed; only rank 0 drew the progress bar (stderr "is a terminal" on both).
    stdout0 = (results / "stdout0.txt").read_text()
    assert stdout0.count("resolved config") == 4 and stdout0.count("done:") == 3
    assert (results / "stdout1.txt").read_text() == ""
    assert f"{STEPS}/{STEPS}" in (results / "stderr0.txt").read_text()
    assert "%|" in (results / "stderr0.txt").read_text()
    assert "%|" not in (results / "stderr1.txt").read_text()


# ---------------------------------------------------------------- 3. resume across world sizes


@pytest.mark.parametrize("name", ["two_stop_then_one", "one_stop_then_two"])
def test_resume_with_another_world_size(runs, name):
    dirs = runs["dirs"]
    straight = dirs / "one_fogzo"
    # The 2-rank checkpoint at STOP holds the same global data position and the same
    # estimator state as the 1-process one: the stream state counts global batches.
    two, one = (torch.load(dirs / d / "checkpoint.pt", weights_only=True) for d in ("two_stop", "one_stop"))
    assert (two["step"], two["world_size"], one["world_size"]) == (STOP, WORLD, 1)
    assert two["data"]["position"] == one["data"]["position"] == STOP * BATCH
    assert torch.equal(two["data"]["generator"], one["data"]["generator"])
    assert torch.equal(two["data"]["order"], one["data"]["order"])
    assert two["estimator"] == one["estimator"]
    assert len(two["rng_per_rank"]) == WORLD and one["rng_per_rank"] is None
    # Global RNG (dropout): rank 0 keeps the 1-process stream, rank 1 has its own.
    assert torch.equal(two["rng_per_rank"][0]["cpu"], one["rng"]["cpu"])
    assert not torch.equal(two["rng_per_rank"][1]["cpu"], one["rng"]["cpu"])
    # Resumed with the other world size and run to the end: where the straight run ends.
    resumed = dirs / name
    assert torch.load(resumed / "checkpoint.pt", weights_only=True)["step"] == STEPS
    resolved = json.loads((resumed / "config.json").read_text())["_resolved"]
    assert resolved["resumed_from_step"] == STOP
    assert (resolved["resumed_from_world_size"], resolved["world_size"]) == (
        (WORLD, 1) if name == "two_stop_then_one" else (1, WORLD))
    losses = [r["loss"] for r in _records(resumed)]
    reference = [r["loss"] for r in _records(straight)]
    assert len(losses) == STEPS
    for a, b in zip(reference, losses):
        assert abs(a - b) <= _loss_tolerance(runs, "fogzo", a), (reference, losses)
    difference = _max_difference(_weights(straight), _weights(resumed))
    assert difference <= _weight_tolerance(runs, "fogzo"), difference


# ---------------------------------------------------------------- 4. batch not divisible


def test_batch_size_not_divisible_by_world_size(tmp_path, monkeypatch, capsys):
    values = _values(tmp_path / "no-data", tmp_path / "run", batch_size=9)
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun; checked before joining a group
    with pytest.raises(ConfigError, match=r"batch_size=9 .*divisible by the world size 2"):
        train(_config(values), log=_quiet)
    assert not (tmp_path / "run").exists()
    args = ["--model=mlp", "--batch-size=9", f"--out={tmp_path / 'run'}", "--progress=false"]
    monkeypatch.setenv("RANK", "0")
    assert train_main(args) == 2
    assert "batch_size=9" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")  # the other ranks fail alike, silently
    assert train_main(args) == 2
    assert capsys.readouterr().err == ""
    config = _config(_values(tmp_path, tmp_path / "run", batch_size=9))
    with pytest.raises(ValueError, match="not divisible by the world size 2"):
        train_data.build_data(config, torch.device("cpu"), _quiet, rank=0, world_size=2)


# ---------------------------------------------------------------- 5. the real launcher


def test_torchrun_fogzo_train(runs, tmp_path):
    fogzo_script = Path(sys.executable).parent / "fogzo"
    if not fogzo_script.exists():
        pytest.skip("the fogzo console script is not installed next to the interpreter")
    config_file = tmp_path / "mlp.toml"
    values = _values(runs["data_dir"], tmp_path / "run", estimator="ste", steps=2, eval_every=0, progress=True)
    lines = [f"{key} = {json.dumps(value)}" for key, value in values.items() if not isinstance(value, dict)]
    lines.append('model_args = {hidden = [16]}')
    config_file.write_text("\n".join(lines) + "\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
               "--no-python", str(fogzo_script), "train", "--config", str(config_file)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    environment.pop("WORLD_SIZE", None)
    environment.pop("RANK", None)
    finished = subprocess.run(command, capture_output=True, text=True, timeout=WALL_TIMEOUT, env=environment)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("resolved config") == 1 and finished.stdout.count("done: 2/2 steps") == 1
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["world_size"] == WORLD and results["steps_done"] == 2
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["_resolved"]
    assert resolved["world_size"] == WORLD and resolved["backend"] == "gloo"
