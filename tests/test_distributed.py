"""Data-parallel training (DDP, gloo on CPU, 2 local processes) against docs/method.md §7
(the same noise on every rank, one all-reduce of the differences).

* Equivalence: 2 ranks × half batch give the gradients of 1 process × full batch for STE,
  n-SPSA and FOGZO, and every rank ends with bit-identical gradients.
* Communication: the ZO part of a step adds exactly one Python-level collective, an
  ``all_reduce`` of the n finite differences, and no buffer broadcast in perturbed passes.
* Failure: a rank that raises makes the run stop with an error instead of hanging.
* FSDP2 (``fully_shard``): the same equivalence with sharded parameters (noise by global
  coordinates), per-channel α on uneven shards, and the collectives the ZO part adds.

Every multi-process run goes through :func:`fogzo.train.distributed.spawn_local`, which bounds
it by a wall-clock deadline and a collective timeout. Processes start with
:func:`fogzo.train.distributed.safe_start_method`: forked on a CPU-only machine (starting a spawned
interpreter and importing torch costs ~10 s on a loaded 2-core machine; a fork costs
milliseconds), from a forkserver where a GPU is present (a forked child could not run
autograd or CUDA there). Everything runs on the CPU with gloo, also on a GPU machine: the
FSDP meshes are built on "cpu" explicitly (FSDP's default mesh takes the accelerator), and
the workers pretend that CUDA is the accelerator (:func:`_pretend_gpu_machine`), so a CPU
machine checks that nothing falls back to a default device.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fogzo
from fogzo.train import distributed as fd

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

START_METHOD = fd.safe_start_method()
WORLD = 2
BATCH = 16
STEPS = 3
N = 2
SEED = 3
WALL_TIMEOUT = 60.0
COLLECTIVE_TIMEOUT = 20.0
U32 = 2.0**-24  # float32 unit roundoff

# name -> (estimator factory kwargs); the model argument is filled in by _estimator.
CASES = {
    "ste": {},
    "spsa": {"n": N},
    "fogzo_beta05": {"n": N, "beta": 0.5},
    "fogzo_default": {"n": N},  # linear β from 1 (step 0: pure guided direction) to 0.999
    "fogzo_one_sided": {"n": N, "beta": 0.5, "one_sided": True},
}
ZO_CASES = [name for name in CASES if name != "ste"]
# FSDP-only cases: per-channel α, 13 hidden rows (uneven shards 7 + 6), FOGZO β = 0.5; the
# counter-based noise stream too (each shard generates its own coordinates' noise).
PER_CHANNEL_CASES = {
    "per_channel_n1": {"n": 1, "beta": 0.5},
    "per_channel_n2": {"n": 2, "beta": 0.5},
    "per_channel_counter": {"n": 1, "beta": 0.5, "noise_stream": "counter"},
}


@contextlib.contextmanager
def _pretend_gpu_machine():
    """Make torch believe CUDA is the accelerator (as on a GPU machine), on any machine.

    Code that picks its device by default (FSDP's default mesh, ``init_from_env()``)
    then asks for CUDA and fails on a CPU machine, as it would misplace tensors on a GPU
    one; the tests must name the CPU wherever they mean it.
    """
    saved = torch._C._get_accelerator, torch.cuda.is_available
    torch._C._get_accelerator = lambda: torch.device("cuda")
    torch.cuda.is_available = lambda: True
    try:
        yield
    finally:
        torch._C._get_accelerator, torch.cuda.is_available = saved


def _mlp(per_channel: bool = False, hidden: int = 16) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 4))
    return fogzo.quantize(model, fogzo.QuantConfig(bits=2, per_channel=per_channel))


@contextlib.contextmanager
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 8, generator=generator), torch.randint(0, 4, (BATCH,), generator=generator)


def _estimator(name: str, model: nn.Module):
    kwargs = CASES[name] if name in CASES else PER_CHANNEL_CASES[name]
    if name == "ste":
        return fogzo.STE(model)
    if name == "spsa":
        return fogzo.SPSA(model, seed=SEED, **kwargs)
    return fogzo.FOGZO(model, total_steps=STEPS, seed=SEED, **kwargs)


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        name.removeprefix("module."): None if p.grad is None else p.grad.detach().clone()
        for name, p in model.named_parameters()
    }


class CollectiveLog:
    """Monkeypatches the Python-level collectives of ``torch.distributed`` and logs them.

    DDP's gradient all-reduce runs inside its C++ reducer and is *not* seen here; its
    per-forward buffer broadcast goes through ``dist._broadcast_coalesced`` and is.
    Each event is ``(name, pass_index, numel)``; ``pass_index`` is set by the closure.
    """

    NAMES = ("all_reduce", "broadcast", "_broadcast_coalesced", "all_gather", "all_gather_object",
             "reduce_scatter", "reduce", "barrier", "all_to_all", "scatter", "gather",
             # FSDP2's parameter all-gather and gradient reduce-scatter (newer and older names;
             # only the outermost call is logged, in case one is implemented with the other).
             "all_gather_single", "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor")
    # For these the logged size is the full tensor: the all-gather's output, the reduce-scatter's input.
    FULL_SIZE_ARG = {"all_gather_single": 0, "all_gather_into_tensor": 0, "reduce_scatter_single": 1,
                     "reduce_scatter_tensor": 1}

    def __init__(self) -> None:
        self.events: list[tuple[str, int, int]] = []
        self.pass_index = -1
        self._saved: dict[str, object] = {}
        self._depth = 0

    def _wrap(self, name: str, original):
        def logged(*args, **kwargs):
            if self._depth == 0:
                if name in self.FULL_SIZE_ARG:
                    tensors = [(list(args) + list(kwargs.values()))[self.FULL_SIZE_ARG[name]]]
                else:
                    tensors = [a for a in args if isinstance(a, torch.Tensor)]
                    for a in args:
                        if isinstance(a, (list, tuple)):
                            tensors += [t for t in a if isinstance(t, torch.Tensor)]
                self.events.append((name, self.pass_index, sum(t.numel() for t in tensors)))
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        return logged

    def __enter__(self) -> CollectiveLog:
        self.events.clear()
        self.pass_index = -1
        for name in self.NAMES:
            if hasattr(dist, name):
                self._saved[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name, self._saved[name]))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)
        self._saved.clear()


def _train(name: str, model: nn.Module, call: nn.Module, x, y, log: CollectiveLog | None = None, grads=None):
    """STEPS estimator steps with SGD in between; per step (gradients, info, collectives)."""
    grads = grads or _grads
    estimator = _estimator(name, model)
    optimizer = torch.optim.SGD(call.parameters(), lr=0.05)
    records = []
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)

        def closure():
            if log is not None:
                log.pass_index += 1
            return F.cross_entropy(call(x), y)

        if log is None:
            info = estimator.estimate(closure)
            events = []
        else:
            with log:
                info = estimator.estimate(closure)
            events = list(log.events)
        records.append({"grads": grads(model), "info": info, "events": events})
        optimizer.step()
    return records


# ---------------------------------------------------------------- workers (run in children)


def _ddp_worker(rank: int, world: int, out_dir: str) -> None:
    with _pretend_gpu_machine():
        _ddp_cases(rank, world, out_dir)


def _ddp_cases(rank: int, world: int, out_dir: str) -> None:
    x, y = fd.shard_batch(*_batch())
    assert x.shape[0] == BATCH // world
    results = {}
    for name in CASES:
        model = _mlp()
        ddp = nn.parallel.DistributedDataParallel(model)
        results[name] = _train(name, ddp, ddp, x, y, CollectiveLog())
    # The estimator given the *inner* module: DDP's buffer broadcast is not switched off.
    model = _mlp()
    ddp = nn.parallel.DistributedDataParallel(model)
    results["fogzo_inner"] = _train("fogzo_beta05", model, ddp, x, y, CollectiveLog())
    # Seed check helper: equal seeds pass, different seeds raise on every rank.
    fd.check_same_on_all_ranks(SEED, "estimator seed")
    try:
        fd.check_same_on_all_ranks(SEED + rank, "estimator seed")
        results["seed_mismatch_raised"] = False
    except RuntimeError as error:
        results["seed_mismatch_raised"] = "differs between ranks" in str(error)
    results["mean_loss"] = fd.all_reduce_mean(float(rank))
    results["is_main"] = fd.is_main_process()
    results["world_size"] = fd.world_size()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _failing_worker(rank: int, world: int, mode: str) -> None:
    x, y = fd.shard_batch(*_batch())
    ddp = nn.parallel.DistributedDataParallel(_mlp())
    estimator = fogzo.FOGZO(ddp, total_steps=STEPS, n=N, beta=0.5, seed=SEED)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        if rank == 1 and calls["n"] == 2:  # the first perturbed pass
            raise RuntimeError("injected failure on rank 1")
        return F.cross_entropy(ddp(x), y)

    try:
        estimator.estimate(closure)
    except RuntimeError as error:
        if mode == "raise" or "injected" not in str(error):
            raise
        # mode == "stall": rank 1 swallows its error and stays alive without taking part
        # in the collective; rank 0 must fail on the collective timeout by itself.
        time.sleep(3 * WALL_TIMEOUT)



def _bucket_view_worker(rank: int, world: int, out_dir: str) -> None:
    """3 plain STE steps, then one FOGZO step, with ``zero_grad(set_to_none=False)``.

    (The "r % STE, then FOGZO" recipe done by switching estimators.) After a plain
    backward under ``gradient_as_bucket_view=True``, ``.grad`` *is* a view of DDP's current
    bucket; zeroing it in place keeps it one.
    """
    x, y = fd.shard_batch(*_batch())
    grads = {}
    for as_view in (False, True):
        model = _mlp()
        ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=as_view)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.0)  # lr 0: the same weights every step
        ste = fogzo.STE(ddp)
        for _ in range(3):  # DDP rebuilds its buckets after the first iteration
            optimizer.zero_grad(set_to_none=False)
            ste.estimate(lambda: F.cross_entropy(ddp(x), y))
        optimizer.zero_grad(set_to_none=False)
        fogzo.FOGZO(ddp, total_steps=4, n=N, beta=0.5, seed=SEED).estimate(lambda: F.cross_entropy(ddp(x), y))
        grads[as_view] = _grads(model)
    torch.save(grads, os.path.join(out_dir, f"bucket{rank}.pt"))


def _fsdp_model(per_channel: bool = False, hidden: int = 16) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # gloo and CPU tensors: the mesh must be on "cpu" (the default mesh takes the accelerator).
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = _mlp(per_channel, hidden)
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {name: None if p.grad is None else p.grad.full_tensor().detach().clone() for name, p in model.named_parameters()}


def _fsdp_worker(rank: int, world: int, out_dir: str) -> None:
    """Every case of CASES on an FSDP2 (fully_shard) model, plus per-channel α on uneven shards."""
    with _pretend_gpu_machine():
        _fsdp_cases(rank, out_dir)


def _fsdp_cases(rank: int, out_dir: str) -> None:
    x, y = fd.shard_batch(*_batch())
    results = {}
    for name in CASES:
        model = _fsdp_model()
        results[name] = _train(name, model, model, x, y, CollectiveLog(), grads=_full_grads)
    # per_channel_n1: the shift built in the gradient's shard; _n2: regenerated; _counter: the
    # counter-based noise stream (each shard generates the noise of its own coordinates).
    for name in PER_CHANNEL_CASES:
        model = _fsdp_model(per_channel=True, hidden=13)  # 13 rows: shards of 7 and 6
        results[name] = _train(name, model, model, x, y, CollectiveLog(), grads=_full_grads)
    results["shard_rows"] = [(e.first_row, e.rows, e.start) for e in fogzo.PerturbedSet.from_model(model).tensors]
    results["mesh_device"] = model[0].weight.device_mesh.device_type
    torch.save(results, os.path.join(out_dir, f"fsdp{rank}.pt"))


def _env_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    torch.set_num_threads(1)
    # CPU and gloo because we say so, not because there is no GPU.
    with _pretend_gpu_machine():
        device = fd.init_from_env(timeout=timedelta(seconds=COLLECTIVE_TIMEOUT), device="cpu")
        try:
            assert device == torch.device("cpu") and dist.get_backend() == "gloo"
            again = fd.init_from_env()  # idempotent: the joined group's device, not the accelerator
            torch.save((fd.rank(), fd.world_size(), str(again), fd.all_reduce_mean(rank + 1.0)),
                       os.path.join(out_dir, f"env{rank}.pt"))
        finally:
            fd.cleanup()


def _launch(fn, args, *, collective_timeout: float = COLLECTIVE_TIMEOUT, tmpdir: str | None = None) -> None:
    fd.spawn_local(fn, WORLD, args, timeout=WALL_TIMEOUT, collective_timeout=collective_timeout,
                   start_method=START_METHOD, tmpdir=tmpdir)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-rank DDP run of every case, and the 1-process full-batch reference."""
    out = tmp_path_factory.mktemp("ddp")
    with _one_thread():
        _launch(_ddp_worker, (str(out),), tmpdir=str(out))
        ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
        x, y = _batch()
        reference = {}
        for name in CASES:
            model = _mlp()
            reference[name] = _train(name, model, model, x, y)
    return ranks, reference


# ---------------------------------------------------------------- 1. equivalence


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_half_batch_equal_one_process_full_batch(runs, name):
    ranks, reference = runs
    _assert_equivalent(ranks, reference, name)


def _assert_equivalent(ranks, reference, name: str) -> None:
    """Rank 0's gradients over STEPS steps equal the 1-process full-batch reference."""
    kwargs = CASES[name] if name in CASES else PER_CHANNEL_CASES[name]
    for step, (got, ref) in enumerate(zip(ranks[0][name], reference[name])):
        info, ref_info = got["info"], ref["info"]
        assert info.beta == ref_info.beta and info.seed == ref_info.seed
        # The per-rank mean losses over two equal halves average to the full-batch mean;
        # the two computations differ only in float32 summation order, so the losses agree
        # to a few units of roundoff: |δL| <= 8·u·|L| (u = 2^-24; generous for a 16-term
        # mean and a 4-way log-softmax).
        loss_tol = 8 * U32 * max(abs(ref_info.loss), 1.0)
        assert abs(_mean_loss_of_ranks(ranks, name, step) - ref_info.loss) <= loss_tol
        if name == "ste":
            # STE: DDP averages the two half-batch gradients; the difference from the
            # full-batch gradient is summation order only, so 1e-5 relative to the
            # gradient's scale (observed ~1e-7) is a bound with a wide margin.
            rtol = 1e-5
        else:
            # ZO: d_i = (L+ − L−)/2ε̄ divides a difference of two losses, each carrying an
            # absolute error |δL| <= 8·u·|L|, by 2ε̄ (ε̄ = 1/(2√3) for the identity STE):
            # |δd| <= 8·u·|L|/ε̄ ≈ 2e-6 at |L| ≈ 1.3 (one-sided, (L+ − L0)/ε̄: twice that).
            # That bounds each d_i absolutely; the gradient G = (1/n)Σ d_i v_i / c inherits
            # the relative error |δd|/|d|, which at the |d| ≈ 4e-3 … 9e-2 of this problem
            # is <= 5e-4, so rtol 1e-3 of the gradient's scale; observed ~1e-5.
            eps_bar = fogzo.QuantConfig(bits=2).smoothing.eps_bar
            factor = 16 if kwargs.get("one_sided") else 8
            d_tol = factor * U32 * max(abs(ref_info.loss), 1.0) / eps_bar
            assert len(info.differences) == len(ref_info.differences) == kwargs["n"]
            for d, d_ref in zip(info.differences, ref_info.differences):
                assert abs(d - d_ref) <= d_tol, (step, info.differences, ref_info.differences)
            rtol = 1e-3
        for param, ref_grad in ref["grads"].items():
            grad = got["grads"][param]
            if ref_grad is None:
                assert grad is None, (name, param)  # SPSA leaves unperturbed biases alone
                continue
            scale = ref_grad.abs().max().item()
            error = (grad - ref_grad).abs().max().item()
            assert error <= rtol * scale + 1e-12, (name, step, param, error, scale)


def _mean_loss_of_ranks(ranks, name: str, step: int) -> float:
    """``info.loss`` is each rank's local L0; average it the way all_reduce_mean would."""
    return sum(r[name][step]["info"].loss for r in ranks) / len(ranks)


@pytest.mark.parametrize("name", list(CASES) + ["fogzo_inner"])
def test_every_rank_ends_with_identical_gradients(runs, name):
    ranks, _ = runs
    for step, (a, b) in enumerate(zip(ranks[0][name], ranks[1][name])):
        assert a["grads"].keys() == b["grads"].keys()
        for param in a["grads"]:
            ga, gb = a["grads"][param], b["grads"][param]
            assert (ga is None) == (gb is None)
            if ga is not None:
                assert torch.equal(ga, gb), (name, step, param)
        assert a["info"].differences == b["info"].differences


def test_inner_module_gives_the_same_gradients(runs):
    ranks, _ = runs
    for a, b in zip(ranks[0]["fogzo_inner"], ranks[0]["fogzo_beta05"]):
        for param in a["grads"]:
            assert torch.equal(a["grads"][param], b["grads"][param])


# ---------------------------------------------------------------- 2. communication


@pytest.mark.parametrize("name", ZO_CASES)
def test_zo_part_is_one_all_reduce_of_n_scalars(runs, name):
    ranks, _ = runs
    one_sided = CASES[name].get("one_sided", False)
    loss_pass = 0  # pass 0: SPSA's report_loss pass / FOGZO's STE pass
    last_pass = loss_pass + N * (1 if one_sided else 2)  # the all-reduce follows the last pass
    for rank_results in ranks:
        for step, record in enumerate(rank_results[name]):
            events = record["events"]
            reduces = [e for e in events if e[0] == "all_reduce"]
            # n differences, also one-sided: the differences are reduced, not the losses.
            assert reduces == [("all_reduce", last_pass, N)], (name, step, events)
            others = [e for e in events if e[0] != "all_reduce"]
            # The only other Python-level collective is DDP's buffer broadcast (the two
            # fixed α buffers), and only in the unperturbed pass 0, never in a perturbed one.
            assert all(e[0] == "_broadcast_coalesced" and e[1] == loss_pass for e in others), (name, step, events)
            if name != "spsa":
                # After a grad-enabled forward DDP re-arms its buffer sync: one per step.
                assert len(others) == 1 and others[0][2] == 2, events


def test_ste_issues_no_python_all_reduce(runs):
    ranks, _ = runs
    for record in ranks[0]["ste"]:
        # Its gradient all-reduce runs in DDP's C++ reducer (counted by the benchmark's
        # comm hook instead); at Python level only the α-buffer broadcast of the forward.
        assert record["events"] == [("_broadcast_coalesced", 0, 2)]


def test_inner_module_lets_ddp_broadcast_in_a_perturbed_pass(runs):
    # Why the estimator should get the DDP module: given the inner module it cannot see
    # the wrapper, so DDP broadcasts buffers in the first perturbed pass (the log sees it,
    # which also shows that the "no broadcast" assertions above are not vacuous).
    ranks, _ = runs
    for record in ranks[0]["fogzo_inner"]:
        broadcasts = [e for e in record["events"] if e[0] == "_broadcast_coalesced"]
        assert any(e[1] > 0 for e in broadcasts), record["events"]


def test_helpers_inside_a_process_group(runs):
    ranks, _ = runs
    assert [r["is_main"] for r in ranks] == [True, False]
    assert all(r["world_size"] == WORLD for r in ranks)
    assert all(r["mean_loss"] == 0.5 for r in ranks)
    assert all(r["seed_mismatch_raised"] for r in ranks)



def test_gradient_as_bucket_view_with_set_to_none_false(tmp_path):
    """FOGZO must copy a previous .grad that is a view of a DDP bucket (overwritten by backward)."""
    _launch(_bucket_view_worker, (str(tmp_path),), tmpdir=str(tmp_path))
    grads = torch.load(tmp_path / "bucket0.pt", weights_only=False)
    for param, expected in grads[False].items():
        assert torch.equal(grads[True][param], expected), param


# ---------------------------------------------------------------- 3. failures


def test_rank_that_raises_stops_the_run(tmp_path):
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException, match="injected failure on rank 1"):
        _launch(_failing_worker, ("raise",), tmpdir=str(tmp_path))
    assert time.monotonic() - start < WALL_TIMEOUT


def test_surviving_rank_fails_on_the_collective_timeout(tmp_path):
    # Rank 1 stays alive but never reaches the all-reduce of the differences (the worst
    # case: no process exits). Rank 0 must raise on its own after the collective timeout.
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException, match="(?i)timed out|timeout"):
        _launch(_failing_worker, ("stall",), collective_timeout=5.0, tmpdir=str(tmp_path))
    assert time.monotonic() - start < WALL_TIMEOUT


# ---------------------------------------------------------------- 4. FSDP2


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, runs):
    """One 2-rank FSDP2 run of every case; the 1-process references (DDP's, plus per-channel)."""
    out = tmp_path_factory.mktemp("fsdp")
    with _one_thread():
        _launch(_fsdp_worker, (str(out),), tmpdir=str(out))
        ranks = [torch.load(out / f"fsdp{r}.pt", weights_only=False) for r in range(WORLD)]
        x, y = _batch()
        reference = dict(runs[1])
        for name in PER_CHANNEL_CASES:
            model = _mlp(per_channel=True, hidden=13)
            reference[name] = _train(name, model, model, x, y)
    return ranks, reference


@pytest.mark.parametrize("name", list(CASES) + list(PER_CHANNEL_CASES))
def test_fsdp_two_ranks_equal_one_process_full_batch(fsdp_runs, name):
    """Sharded runs draw the unsharded run's perturbation (noise by global coordinates)."""
    ranks, reference = fsdp_runs
    _assert_equivalent(ranks, reference, name)
    # Both ranks hold the same full gradients (each shard is computed once, on its owner).
    for got0, got1 in zip(ranks[0][name], ranks[1][name]):
        for param, grad in got0["grads"].items():
            assert (grad is None and got1["grads"][param] is None) or torch.equal(grad, got1["grads"][param])


@pytest.mark.parametrize("name", ZO_CASES + list(PER_CHANNEL_CASES))
def test_fsdp_zo_part_adds_one_norm_and_one_difference_all_reduce(fsdp_runs, name):
    """FSDP: FOGZO adds an all-reduce of K squared norms (K = 2 quantized tensors) and one
    of the n differences; SPSA only the latter. FSDP's own all-gathers and reduce-scatters
    are not Python-level calls of the names logged here."""
    ranks, _ = fsdp_runs
    kwargs = CASES[name] if name in CASES else PER_CHANNEL_CASES[name]
    n = kwargs["n"]
    for record in ranks[0][name]:
        reduces = [(event, numel) for event, _, numel in record["events"] if event == "all_reduce"]
        expected = [("all_reduce", n)] if name == "spsa" else [("all_reduce", 2), ("all_reduce", n)]
        assert reduces == expected, (name, record["events"])
        assert {event for event, _, _ in record["events"]} <= {"all_reduce", "all_gather_single",
                                                                "all_gather_into_tensor", "reduce_scatter_single",
                                                                "reduce_scatter_tensor"}, record["events"]


@pytest.mark.parametrize("name", list(CASES))
def test_fsdp_all_gathers_once_per_module_and_pass(fsdp_runs, name):
    """Each forward all-gathers every module's parameters once and the backward once more
    (reshard after forward); nothing else. In particular the perturbed forwards must not
    leave FSDP2 prefetching an extra module in the next backward (they are not in the
    forward order it records). The 16-row layers split evenly: no padding."""
    ranks, _ = fsdp_runs
    parameters = 8 * 16 + 16 + 16 * 4 + 4
    kwargs = CASES[name]
    perturbed_passes = 0 if name == "ste" else kwargs["n"] * (1 if kwargs.get("one_sided") else 2)
    backward = 0 if name == "spsa" else 1  # n-SPSA: an unperturbed loss pass, no backward
    for step, record in enumerate(ranks[0][name]):
        gathered = sum(numel for event, _, numel in record["events"] if event.startswith("all_gather"))
        scattered = sum(numel for event, _, numel in record["events"] if event.startswith("reduce_scatter"))
        # 1 unperturbed forward + the perturbed forwards + the backward's re-gather.
        assert gathered == parameters * (1 + perturbed_passes + backward), (step, record["events"])
        assert scattered == parameters * backward, (step, record["events"])


def test_fsdp_meshes_are_built_on_cpu(fsdp_runs):
    ranks, _ = fsdp_runs
    assert [rank["mesh_device"] for rank in ranks] == ["cpu", "cpu"]


def test_fsdp_shard_offsets(fsdp_runs):
    ranks, _ = fsdp_runs
    # 13×8 weight: rank 0 rows 0..6 (flat start 0), rank 1 rows 7..12 (flat start 56);
    # 4×13 weight: rows 0..1 and 2..3 (flat starts 0 and 26).
    assert ranks[0]["shard_rows"] == [(0, 7, 0), (0, 2, 0)]
    assert ranks[1]["shard_rows"] == [(7, 6, 56), (2, 2, 26)]


# ---------------------------------------------------------------- helpers without a group


def test_init_from_env_with_torchrun_variables(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.start_processes(_env_worker, args=(WORLD, port, str(tmp_path)), nprocs=WORLD,
                                 join=False, start_method=START_METHOD)
    deadline = time.monotonic() + WALL_TIMEOUT
    try:
        while not context.join(timeout=0.2):
            assert time.monotonic() < deadline, "init_from_env run timed out"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    for r in range(WORLD):
        assert torch.load(tmp_path / f"env{r}.pt", weights_only=False) == (r, WORLD, "cpu", 1.5)


def test_start_method_is_not_fork_where_fork_breaks_cuda_or_autograd(monkeypatch):
    monkeypatch.delenv(fd.START_METHOD_ENV_VAR, raising=False)
    methods = mp.get_all_start_methods()
    if "fork" in methods:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
        if hasattr(torch, "accelerator"):
            monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
        assert fd.safe_start_method() == "fork"  # a CPU-only machine: fast and safe
    expected = "forkserver" if "forkserver" in methods else "spawn"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # CUDA started in this process
    assert fd.safe_start_method() == expected
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine: autograd threads
    assert fd.safe_start_method() == expected
    monkeypatch.setenv(fd.START_METHOD_ENV_VAR, "spawn")
    assert fd.safe_start_method() == "spawn"
    monkeypatch.setenv(fd.START_METHOD_ENV_VAR, "teleport")
    with pytest.raises(ValueError, match="teleport"):
        fd.safe_start_method()


def test_single_process_fallbacks(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert fd.init_from_env(device="cpu") == torch.device("cpu")
    assert not dist.is_initialized()
    assert (fd.world_size(), fd.rank(), fd.is_main_process(), fd.is_distributed()) == (1, 0, True, False)
    model = nn.Linear(2, 2)
    assert fd.wrap_ddp(model) is model
    assert fd.all_reduce_mean(torch.tensor(2.5)) == 2.5
    fd.check_same_on_all_ranks(123)  # no-op
    x = torch.arange(6)
    assert torch.equal(fd.shard_batch(x), x)


def test_single_process_init_rejects_partial_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        fd.init_from_env(device="cpu")


def test_shard_indices():
    assert fd.shard_indices(16, 0, 2) == range(0, 8)
    assert fd.shard_indices(16, 1, 2) == range(8, 16)
    assert fd.shard_indices(7, 2, 3, drop_last=True) == range(4, 6)
    with pytest.raises(ValueError, match="equal shards"):
        fd.shard_indices(15, 0, 2)
    with pytest.raises(ValueError, match="rank"):
        fd.shard_indices(16, 2, 2)
    covered = [i for r in range(4) for i in fd.shard_indices(12, r, 4)]
    assert covered == list(range(12))


def test_rank_zero_print(capsys):
    fd.rank_zero_print("hello", 1)
    assert capsys.readouterr().out == "hello 1\n"
