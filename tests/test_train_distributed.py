"""``fogzo train`` under data parallelism (DDP, gloo on CPU, 2 local processes).

* Equivalence: a 2-rank run (each rank half of every global batch) follows the 1-process
  run for STE and FOGZO: same losses, same final weights up to float32 summation order,
  and the sharded evaluation gives bit-identical metrics for the same weights.
* Rank-aware outputs: only rank 0 prints, shows a progress bar and writes files.
* Resume across world sizes: 2 ranks stopped with ``stop_at`` resume in 1 process, and a
  1-process checkpoint resumes on 2 ranks, both ending where an uninterrupted run ends.
* A global batch that does not split into equal shards is a clear error.
* The real launcher: ``torchrun --standalone --nproc-per-node 2 --no-python fogzo train``.

The model is an MLP without biases, BatchNorm or dropout (``skip_first_last=false``: both
layers quantized, 2-bit, fixed α), with tanh between the layers: every parameter is a
quantized weight, so the loss depends on the weights only through their integer codes, and
the STE gradient has no ReLU kink that a roundoff-sized difference of a pre-activation
could flip. It is trained with FOGZO (n = 1)
or STE and plain SGD (no momentum, no weight decay) at a constant learning rate, so the
runs differ only by float32 summation order and parameter differences add up linearly.
How far apart the runs may drift is derived step by step from what each run recorded
(:class:`_StepLog`, :func:`_trajectory_bound`): roundoff of the finite difference
(8·u·|L|/ε̄ relative to |d|) and of the STE guide per step, unless a weight sits so close
to a rounding boundary that it rounds to another level in one run only (a discrete jump,
which the test finds in the recorded codes and checks to be within reach of the boundary).
The data are 64 + 32 random 28x28 "Fashion-MNIST" images written as IDX files.

The 2-rank runs go through :func:`fogzo.train.distributed.spawn_local` (file rendezvous,
collective timeout, wall-clock deadline) with its safe start method (forked on a CPU-only
machine, forkserver where a GPU is present), on the CPU with gloo also on a GPU machine.
All 2-rank jobs share one launch (module fixture).
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

import pytest
import torch
import torch.distributed as dist
import torch.optim.optimizer as optim_hooks

import fogzo
from fogzo.train import distributed as fd
from fogzo.train import ConfigError, load_config, train
from fogzo.train import data as train_data
from fogzo.train.cli import main as train_main
from fogzo.train.build import build_quantized_model

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

START_METHOD = fd.safe_start_method()
WORLD = 2
STEPS = 4
STOP = 2
LR = 0.05
BATCH = 8
WALL_TIMEOUT = 120.0
COLLECTIVE_TIMEOUT = 30.0
U32 = 2.0**-24  # float32 unit roundoff
# Relative error of a back-propagated gradient from summation order (the batch split in two,
# DDP's all-reduce), against the gradient's largest element: 1e-5 (observed ~1e-7; as in
# tests/test_distributed.py). It bounds the STE gradient, and FOGZO's guide direction.
GRAD_RTOL = 1e-5



def _values(data_dir: Path, out: Path, **overrides) -> dict:
    values = {
        "model": "mlp", "model_args": {"hidden": [16], "bias": False, "activation": "tanh"}, "dataset": "fashion_mnist", "data_dir": str(data_dir),
        "batch_size": BATCH, "augment": True, "eval_size": 32, "train_eval_size": 16, "eval_batch_size": 8,
        "bits": 2, "alpha_init": "max", "skip_first_last": False, "estimator": "fogzo", "n": 1,
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


# ---------------------------------------------------------------- per-step records


class _StepLog:
    """What every training step of every run did, for :func:`_trajectory_bound`.

    Around :func:`train` calls in one process (the 1-process runs in the test process, the
    2-rank runs on each rank): forward hooks on the model's weight quantizers record the
    weight each training-mode pass quantized (the STE pass, then the perturbed passes) and
    its integer codes; a wrapper around ``estimate`` records the step's loss and finite
    differences; an optimizer pre-step hook records the parameters before the step and the
    gradients it applies. ``runs[name]`` is one dict per step.
    """

    def __init__(self) -> None:
        self.runs: dict[str, list[dict]] = {}
        self.meta: dict[str, dict] = {}
        self.current: str | None = None
        self._passes: list = []
        self._names: dict[int, str] = {}

    def start(self, name: str) -> None:
        self.current = name
        self.runs[name] = []

    def __enter__(self) -> _StepLog:
        from fogzo.train import trainer

        self._trainer = trainer
        self._saved = (trainer.build_quantized_model, trainer.build_estimator)
        build_model, build_estimator = self._saved

        def built_model(config, dims):
            model = build_model(config, dims)
            self._names = {id(p): name for name, p in model.named_parameters()}
            alphas = {}
            for name, module in model.named_modules():
                if isinstance(module, fogzo.WeightQuantizer):
                    module.register_forward_hook(self._hook(name.rsplit(".", 1)[0]))
                    alphas[name.rsplit(".", 1)[0]] = float(module.alpha)
                    eps_bar = module.smoothing.eps_bar
            self.meta[self.current] = {"alphas": alphas, "eps_bar": eps_bar}
            return model

        def built_estimator(*args, **kwargs):
            estimator = build_estimator(*args, **kwargs)
            estimate = estimator.estimate

            def recorded(closure):
                self._passes = []
                info = estimate(closure)
                self.runs[self.current].append(
                    {"loss": info.loss, "d": list(info.differences), "passes": self._passes}
                )
                return info

            estimator.estimate = recorded
            return estimator

        trainer.build_quantized_model, trainer.build_estimator = built_model, built_estimator

        def before_step(optimizer, args, kwargs):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            self.runs[self.current][-1]["params"] = {self._names[id(p)]: p.detach().clone() for p in params}
            self.runs[self.current][-1]["grads"] = {self._names[id(p)]: p.grad.detach().clone() for p in params}

        self._handle = optim_hooks.register_optimizer_step_pre_hook(before_step)
        return self

    def _hook(self, layer: str):
        def hook(module, inputs, output):
            if module.training:  # not the evaluation passes
                weight = inputs[0].detach()
                self._passes.append((layer, weight.clone(), module.codes(weight)))
        return hook

    def __exit__(self, *exc) -> None:
        self._trainer.build_quantized_model, self._trainer.build_estimator = self._saved
        self._handle.remove()


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


@contextlib.contextmanager
def _wrong_share():
    """A bug to catch: every rank trains on the first half of the global batch."""
    original = train_data.Shard.block
    train_data.Shard.block = lambda self, total: slice(0, total // self.world_size)
    try:
        yield
    finally:
        train_data.Shard.block = original


@contextlib.contextmanager
def _pretend_gpu_machine():
    """Make torch believe CUDA is the accelerator (as on a GPU machine), on any machine, so
    that code which picks a device by default would ask for CUDA (as in tests/test_distributed.py)."""
    saved = torch._C._get_accelerator, torch.cuda.is_available
    torch._C._get_accelerator = lambda: torch.device("cuda")
    torch.cuda.is_available = lambda: True
    try:
        yield
    finally:
        torch._C._get_accelerator, torch.cuda.is_available = saved


def _worker(rank: int, world: int, jobs: list[dict], base: str, results_dir: str) -> None:
    # This rank's stdout and stderr, at the file-descriptor level, into files of its own.
    stdout = open(os.path.join(results_dir, f"stdout{rank}.txt"), "w", buffering=1)
    stderr = _Terminal(open(os.path.join(results_dir, f"stderr{rank}.txt"), "wb"), line_buffering=True)
    os.dup2(stdout.fileno(), 1)
    os.dup2(stderr.fileno(), 2)
    sys.stdout, sys.stderr = stdout, stderr
    returned = {}
    with _pretend_gpu_machine(), _StepLog() as steps, _WriteSpy(base) as spy:
        for job in jobs:
            if job["kind"] == "train":
                steps.start(job["name"])
                with _wrong_share() if job.get("wrong_share") else contextlib.nullcontext():
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
    torch.save({"returned": returned, "writes": spy.events, "steps": steps.runs, "meta": steps.meta},
               os.path.join(results_dir, f"rank{rank}.pt"))
    sys.stdout.flush()
    sys.stderr.flush()


# ---------------------------------------------------------------- the runs (module fixture)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, write_fake_fashion_mnist):
    base = tmp_path_factory.mktemp("train_ddp")
    data_dir = base / "data"
    write_fake_fashion_mnist(data_dir)
    runs_dir, results_dir = base / "runs", base / "results"
    runs_dir.mkdir()
    results_dir.mkdir()
    previous = torch.get_num_threads()
    out = {name: runs_dir / name for name in (
        "one_ste", "one_fogzo", "one_stop", "two_ste", "two_fogzo", "two_stop", "eval_weights")}
    try:
        with _StepLog() as steps:
            # 1 process: the references, and a run stopped at STOP for the 1 -> 2 resume.
            for estimator in ("ste", "fogzo"):
                steps.start(f"one_{estimator}")
                train(_config(_values(data_dir, out[f"one_{estimator}"], estimator=estimator)), log=_quiet)
            steps.start("one_stop")
            train(_config(_values(data_dir, out["one_stop"], stop_at=STOP)), log=_quiet)
            shutil.copytree(out["one_stop"], runs_dir / "one_stop_then_two")
            # 2 ranks: one launch runs every job in turn.
            jobs = [
                {"kind": "train", "name": "two_ste", "values": _values(data_dir, out["two_ste"], estimator="ste")},
                {"kind": "train", "name": "two_fogzo", "values": _values(data_dir, out["two_fogzo"], progress=True)},
                {"kind": "train", "name": "two_stop", "values": _values(data_dir, out["two_stop"], stop_at=STOP)},
                {"kind": "train", "name": "two_wrong_share", "wrong_share": True,
                 "values": _values(data_dir, runs_dir / "two_wrong_share")},
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
            steps.start("two_stop_then_one")
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
        "dirs": runs_dir, "results": results_dir, "ranks": ranks, "steps": {**steps.runs, **ranks[0]["steps"]},
        "meta": steps.meta["one_fogzo"], "one_process_eval": one_process_eval,
        "one_process_batches": one_process_batches, "data_dir": data_dir,
    }


def _crossings(a: torch.Tensor, b: torch.Tensor, alpha: float) -> tuple[int, float]:
    """Weights whose positions x = w/α in two runs lie on either side of a multiple of 1/2.

    Half-integers are the rounding boundaries (the code changes); integers are where the
    smoothed quantizer's slope, hence the STE gradient, may jump (uniform noise of width 1
    around each level; the clip range ends at the outermost levels). x is computed as the
    quantizer computes it, in float32: a weight within float32 rounding of a boundary is
    placed where the quantizer places it. Returns how many, and the largest |x_a − x_b|.
    """
    scale = torch.tensor(alpha, dtype=a.dtype)  # float32 division, as the quantizer computes x
    xa, xb = a / scale, b / scale
    cell_a, cell_b = torch.floor(2 * xa), torch.floor(2 * xb)  # 2·x is exact in floating point
    # Either side, or exactly on a boundary (where rounding breaks ties): 0.5 and 0.50000006
    # round to different levels, yet lie in the same cell.
    on_boundary = (2 * xa == cell_a) | (2 * xb == cell_b)
    crossed = (cell_a != cell_b) | (on_boundary & (xa != xb))
    gap = (xa.double() - xb.double()).abs()[crossed]
    return int(crossed.sum()), float(gap.max()) if gap.numel() else 0.0


def _trajectory_bound(runs, reference: str, other: list[str], estimator: str) -> dict:
    """Follow two runs of the same config step by step; bound how far apart roundoff takes them.

    ``reference`` names the 1-process run; ``other`` the runs whose steps, in order, make up
    the other trajectory (a resumed run continues a stopped one). Step t starts from the
    weights w_t (w_1 the same in both: same seed) and applies G_t with plain SGD:
    w_{t+1} = w_t − η·G_t. With D_t the bound on max|w_t^a − w_t^b| (D_1 = 0):

    * Every weight of every forward pass (the STE pass; FOGZO's passes at w ± δ) is
      compared in units of α (x = w/α). If its two positions lie on either side of a
      multiple of 1/2 (:func:`_crossings`), the two runs quantize it differently, or take a
      different STE slope: a discrete change that no roundoff bound covers. Each such
      crossing must be within reach: |x_a − x_b| <= D_t/α, plus in a perturbed pass the
      guide's share ε̄·GRAD_RTOL·max|v| (unless the STE pass crossed too, which changes the
      guide), plus 4·u·max|x| for the float32 rounding of w ± δ.
    * No crossing in the STE pass: both runs quantize the same weights, so the losses differ
      by summation order only, |δL| <= 8·u·|L| (the loss of a batch of 8 summed in one
      process, or as two halves of 4), and so does the STE gradient: relative GRAD_RTOL.
      FOGZO (n = 1): G = d·v/α, so the direction v = α·G/d is the guide's (√β·s·ĝ +
      √(1−β)·u, u the same noise in both runs) and differs by <= GRAD_RTOL·max|v|.
    * No crossing at all: d = (L₊ − L₋)/2ε̄ differs by <= R_t = 8·u·|L|/ε̄ (two losses, each
      off by <= 4·u·|L|), and G = d·v/α by <= max|G|·(R_t/|d| + GRAD_RTOL) elementwise. A
      perturbed pass that crossed allows the measured |δd| instead of R_t.
    * D_{t+1} = D_t + η·(the allowed max|δG_t|) + 2·u·max|w| (each run rounds its update).

    Asserts every step's checks; returns ``{"bound": D_{T+1}, "crossings": [...], ...}``.
    """
    meta = runs["meta"]
    alphas, eps_bar = meta["alphas"], meta["eps_bar"]
    ref = runs["steps"][reference]
    oth = [step for name in other for step in runs["steps"][name]]
    losses_a = [r["loss"] for r in _records(runs["dirs"] / reference)]
    losses_b = [r["loss"] for r in _records(runs["dirs"] / other[-1])]
    assert len(ref) == len(oth) == len(losses_a) == len(losses_b) == STEPS
    passes_per_step = 1 + 2 * (estimator == "fogzo")
    bound, crossings, checked = 0.0, [], []
    for t, (a, b) in enumerate(zip(ref, oth), 1):
        where = f"step {t} of {reference} vs {other}"
        difference = _max_difference(a["params"], b["params"])
        assert difference <= bound, (where, difference, bound)
        assert len(a["passes"]) == len(b["passes"]) == passes_per_step * len(alphas), where
        gmax = max(g.abs().max().item() for g in a["grads"].values())
        dG = _max_difference(a["grads"], b["grads"])
        if estimator == "fogzo":
            (da,), (db,) = a["d"], b["d"]
            v = {name: alphas[name.rsplit(".", 1)[0]] * a["grads"][name].double() / da for name in a["grads"]}
            v_b = {name: alphas[name.rsplit(".", 1)[0]] * b["grads"][name].double() / db for name in b["grads"]}
            vmax = max(x.abs().max().item() for x in v.values())
        crossed = {"ste": False, "perturbed": False}
        for index, ((layer, wa, _), (layer_b, wb, _)) in enumerate(zip(a["passes"], b["passes"])):
            assert layer == layer_b, where
            count, gap = _crossings(wa, wb, alphas[layer])
            if not count:
                continue
            kind = "ste" if index < len(alphas) else "perturbed"
            crossed[kind] = True
            crossings.append((t, index // len(alphas), layer, count, gap))
            if kind == "perturbed" and crossed["ste"]:
                continue  # the guide itself changed: the perturbed positions may differ freely
            reach = bound / alphas[layer] + 4 * U32 * (wa.abs().max().item() / alphas[layer] + 1)
            if kind == "perturbed":
                reach += eps_bar * GRAD_RTOL * vmax
            assert gap <= reach, (where, "a crossing out of reach", layer, gap, reach)
        if not crossed["ste"]:
            assert abs(losses_b[t - 1] - losses_a[t - 1]) <= 8 * U32 * abs(losses_a[t - 1]), (where, "loss")
        if estimator == "ste":
            allowed = dG if crossed["ste"] else GRAD_RTOL * gmax
        elif crossed["ste"]:
            allowed = dG
        else:
            dv = max((v[name] - v_b[name]).abs().max().item() for name in v)
            assert dv <= GRAD_RTOL * vmax, (where, "guide", dv, vmax)
            rounding = 8 * U32 * abs(losses_a[t - 1]) / eps_bar
            if crossed["perturbed"]:
                dd = abs(db - da)
            else:
                dd = rounding
                assert abs(db - da) <= rounding, (where, "finite difference", abs(db - da), rounding)
            allowed = gmax * (dd / abs(da) + GRAD_RTOL)
        assert dG <= allowed * (1 + 1e-6), (where, "gradient", dG, allowed)
        wmax = max(w.abs().max().item() for w in a["params"].values())
        bound += LR * allowed + 2 * U32 * (wmax + LR * gmax)
        checked.append({"step": t, "dG": dG, "allowed": allowed, "weights": difference, "crossed": dict(crossed)})
    return {"bound": bound, "crossings": crossings, "steps": checked}


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _final_codes(runs, folder: Path) -> dict[str, torch.Tensor]:
    """The integer codes of a run's final weights (what the evaluation computes with)."""
    config = _config(_values(runs["data_dir"], folder))
    model = build_quantized_model(config, train_data.data_dimensions(config))
    weights = _weights(folder)
    return {
        name: module.codes(weights[name.rsplit(".", 1)[0] + ".weight"])
        for name, module in model.named_modules()
        if isinstance(module, fogzo.WeightQuantizer)
    }


def _moved(runs, name: str) -> float:
    """How far training moved the weights (a wrong batch share moves them differently)."""
    config = _config(_values(runs["data_dir"], runs["dirs"] / name))
    initial = build_quantized_model(config, train_data.data_dimensions(config)).state_dict()
    return _max_difference(initial, _weights(runs["dirs"] / name))


# ---------------------------------------------------------------- 1. equivalence


@pytest.mark.parametrize("estimator", ["ste", "fogzo"])
def test_two_ranks_follow_the_one_process_run(runs, estimator):
    one, two = runs["dirs"] / f"one_{estimator}", runs["dirs"] / f"two_{estimator}"
    # Step by step, within what float32 summation order allows (see _trajectory_bound).
    trajectory = _trajectory_bound(runs, f"one_{estimator}", [f"two_{estimator}"], estimator)
    difference = _max_difference(_weights(one), _weights(two))
    assert difference <= trajectory["bound"], (difference, trajectory)
    # The bound is small against how far the weights moved: a wrong batch share, loss or
    # schedule moves them by as much as training does, and fails here.
    assert trajectory["bound"] < 0.1 * _moved(runs, f"one_{estimator}"), trajectory
    # Every rank returned the same record (metrics are means/sums over ranks).
    returned = [r["returned"][f"two_{estimator}"] for r in runs["ranks"]]
    assert returned[0] == returned[1]
    assert returned[0]["world_size"] == WORLD and returned[0]["steps_done"] == STEPS
    one_results = json.loads((one / "results.json").read_text())
    codes = _final_codes(runs, one), _final_codes(runs, two)
    if all(torch.equal(codes[0][k], codes[1][k]) for k in codes[0]):
        # The same quantized weights: the sharded evaluation gives the very same numbers.
        for key in ("eval_loss", "eval_accuracy", "train_eval_loss", "train_eval_accuracy"):
            assert returned[0][key] == one_results[key], key
    else:  # a final weight lies on the other side of a rounding boundary: it must be within reach
        weights, alphas = (_weights(one), _weights(two)), runs["meta"]["alphas"]
        for layer, alpha in alphas.items():
            count, gap = _crossings(weights[0][f"{layer}.weight"], weights[1][f"{layer}.weight"], alpha)
            assert gap <= trajectory["bound"] / alpha * (1 + 1e-6), (layer, count, gap, trajectory)
    resolved = json.loads((two / "config.json").read_text())["_resolved"]
    assert (resolved["world_size"], resolved["batch_size_per_rank"], resolved["backend"]) == (WORLD, BATCH // WORLD, "gloo")
    checkpoint = torch.load(two / "checkpoint.pt", weights_only=True)
    assert checkpoint["world_size"] == WORLD
    assert not any(key.startswith("module.") for key in checkpoint["model"])


def test_the_bound_fails_a_wrong_batch_share(runs):
    """The bound has teeth: a 2-rank run in which both ranks train on the first half of
    every global batch (recorded in the same launch) fails it at the first step."""
    with pytest.raises(AssertionError, match="step 1 of one_fogzo"):
        _trajectory_bound(runs, "one_fogzo", ["two_wrong_share"], "fogzo")


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
    assert stdout0.count("resolved config") == 5 and stdout0.count("done:") == 4
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
    before = {"two_stop_then_one": ["two_stop", "two_stop_then_one"], "one_stop_then_two": ["one_stop", "one_stop_then_two"]}
    trajectory = _trajectory_bound(runs, "one_fogzo", before[name], "fogzo")
    assert len([r["loss"] for r in _records(resumed)]) == STEPS
    difference = _max_difference(_weights(straight), _weights(resumed))
    assert difference <= trajectory["bound"], (difference, trajectory)
    assert trajectory["bound"] < 0.1 * _moved(runs, "one_fogzo"), trajectory


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
