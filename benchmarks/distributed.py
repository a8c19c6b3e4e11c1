#!/usr/bin/env python
"""Data-parallel and sharded cost of FOGZO against STE: bytes communicated per step, step time.

Command lines (from the repository root, with the project's virtual environment)::

    python benchmarks/distributed.py                    # both MLPs, CPU, 2 local processes
    python benchmarks/distributed.py --quick            # smoke run (seconds)
    python benchmarks/distributed.py --n 1,4 --repeats 30 --json distributed.json

Models: ``fogzo.quantize(MLP, QuantConfig(bits=2))`` (every Linear quantized, fixed α
buffers), trained on one fixed random batch with SGD:

=======  =====================  ============  ======================
name     layers                 parameters    global batch
=======  =====================  ============  ======================
tiny     32-64-10               2,762         64
larger   784-512-512-10         669,706       256
=======  =====================  ============  ======================

Bytes per step (2 ranks, gloo, ``DistributedDataParallel``), three sources counted apart:

* ``grad_allreduce``: DDP's gradient all-reduce, measured with a DDP communication hook
  (``register_comm_hook``) that adds up the size of every bucket it is handed and then
  runs the default all-reduce hook. Expected: 4 bytes × number of parameters.
* ``zo_allreduce``: Python-level ``torch.distributed.all_reduce`` calls made by the
  estimator (``torch.distributed.all_reduce`` is wrapped for the duration of the step;
  calls made from inside the comm hook are not counted here). Expected: 4·n bytes for
  FOGZO, 0 for STE.
* ``buffer_broadcast``: DDP's per-forward buffer broadcast (``dist._broadcast_coalesced``,
  wrapped the same way): the fixed α of each quantized layer, 4 bytes per layer, once per
  step (the estimator switches it off for the perturbed passes).

With ``--engines fsdp`` (default ``ddp,fsdp``) the same models run under FSDP2
(``fully_shard`` on every Linear, then on the root), counted by wrapping
``torch.distributed.all_gather_into_tensor`` (``param_allgather``: output size, once per
forward of each sharded module: 1 + 2n forwards per FOGZO step) and
``torch.distributed.reduce_scatter_tensor`` (``grad_reducescatter``: input size, once per
backward); ``zo_allreduce`` then holds the estimator's two all-reduces, K squared norms
(K quantized layers) and n differences.

These are payload bytes handed to the collectives; what a ring all-reduce puts on the wire
is about ``2·(w−1)/w`` times that per rank.

Step time (``zero_grad`` + ``estimate`` + ``optimizer.step``; median of ``--repeats``
after ``--warmup`` untimed steps, variants interleaved) for

* ``1 proc × 1 thr``: one process, no process group, the full global batch, 1 thread;
* ``1 proc × 2 thr``: the same with 2 intra-op threads (same core count as the next one);
* ``2 proc × 1 thr``: 2 DDP ranks, half the batch each, 1 thread each (rank 0's time,
  after a barrier that is not timed);
* ``ZO AR ms``: time rank 0 spends blocked in the estimator's all-reduce of the ``d_i``
  (includes waiting for the slower rank, so it bounds the ZO part's communication cost).

On a machine whose cores are shared with other jobs the timings are noisy: compare them
within one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fogzo
from fogzo.train import distributed as fd

MODELS = {
    "tiny": {"layers": (32, 64, 10), "batch": 64},
    "larger": {"layers": (784, 512, 512, 10), "batch": 256},
}
QUICK = {
    "tiny": {"layers": (32, 64, 10), "batch": 64},
    "larger": {"layers": (784, 128, 10), "batch": 64},
}


def build_model(layers: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    modules: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(layers[:-1], layers[1:])):
        if i:
            modules.append(nn.ReLU())
        modules.append(nn.Linear(fan_in, fan_out))
    return fogzo.quantize(nn.Sequential(*modules), fogzo.QuantConfig(bits=2))


def make_batch(layers: tuple[int, ...], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, layers[0], generator=generator), torch.randint(0, layers[-1], (batch,), generator=generator)


def variants(ns: list[int]) -> list[str]:
    return ["ste"] + [f"fogzo_n{n}" for n in ns]


def make_estimator(name: str, model: nn.Module):
    if name == "ste":
        return fogzo.STE(model)
    n = int(name.removeprefix("fogzo_n"))
    return fogzo.FOGZO(model, total_steps=10_000, n=n, beta_min=0.999, seed=0)


class Counter:
    """Bytes handed to collectives, by source (see the module docstring)."""

    def __init__(self) -> None:
        self.bytes = {"grad_allreduce": 0, "zo_allreduce": 0, "buffer_broadcast": 0,
                      "param_allgather": 0, "grad_reducescatter": 0}
        self.calls = {key: 0 for key in self.bytes}
        self.zo_seconds = 0.0
        self.in_hook = False
        self.active = False
        self.collective_depth = 0
        self._originals: dict[str, object] = {}

    def reset(self) -> None:
        for key in self.bytes:
            self.bytes[key] = 0
            self.calls[key] = 0
        self.zo_seconds = 0.0

    def comm_hook(self, state, bucket):  # unannotated: DDP rejects string annotations
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        buffer = bucket.buffer()
        if self.active:
            self.bytes["grad_allreduce"] += buffer.numel() * buffer.element_size()
            self.calls["grad_allreduce"] += 1
        self.in_hook = True
        try:
            return default_hooks.allreduce_hook(None, bucket)
        finally:
            self.in_hook = False

    def install(self) -> None:
        counter = self
        all_reduce, broadcast = dist.all_reduce, dist._broadcast_coalesced

        def counted_all_reduce(tensor, *args, **kwargs):
            if not counter.active or counter.in_hook:
                return all_reduce(tensor, *args, **kwargs)
            counter.bytes["zo_allreduce"] += tensor.numel() * tensor.element_size()
            counter.calls["zo_allreduce"] += 1
            start = time.perf_counter()
            try:
                return all_reduce(tensor, *args, **kwargs)
            finally:  # blocking call: includes waiting for the slower rank
                counter.zo_seconds += time.perf_counter() - start

        def counted_broadcast(group, tensors, *args, **kwargs):
            if counter.active:
                counter.bytes["buffer_broadcast"] += sum(t.numel() * t.element_size() for t in tensors)
                counter.calls["buffer_broadcast"] += 1
            return broadcast(group, tensors, *args, **kwargs)

        self._originals = {"all_reduce": all_reduce, "_broadcast_coalesced": broadcast}
        dist.all_reduce = counted_all_reduce
        dist._broadcast_coalesced = counted_broadcast
        # FSDP2's collectives: torch 2.13 calls all_gather_single / reduce_scatter_single,
        # older versions all_gather_into_tensor / reduce_scatter_tensor. Count the outermost
        # call only, in case one name is implemented with the other.
        sizes = {"all_gather_single": ("param_allgather", 0), "all_gather_into_tensor": ("param_allgather", 0),
                 "reduce_scatter_single": ("grad_reducescatter", 1), "reduce_scatter_tensor": ("grad_reducescatter", 1)}
        for name, (key, which) in sizes.items():
            original = getattr(dist, name, None)
            if original is None:
                continue

            def counted(*args, _original=original, _key=key, _which=which, **kwargs):
                # (output, input) positionally or as keywords; the all-gather's output and
                # the reduce-scatter's input are the full-size tensors.
                tensors = list(args[:2]) + [kwargs[k] for k in ("output_tensor", "input_tensor", "output", "input")
                                            if k in kwargs]
                if counter.active and counter.collective_depth == 0 and len(tensors) >= 2:
                    tensor = tensors[_which]
                    counter.bytes[_key] += tensor.numel() * tensor.element_size()
                    counter.calls[_key] += 1
                counter.collective_depth += 1
                try:
                    return _original(*args, **kwargs)
                finally:
                    counter.collective_depth -= 1

            self._originals[name] = original
            setattr(dist, name, counted)

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)


def timed_steps(names, models, estimators, optimizers, x, y, warmup, repeats, before_step=None, counter=None):
    """Interleaved timing; returns {name: [seconds]} and, with a counter, bytes of the last step."""
    order_rng = torch.Generator().manual_seed(0)
    times = {name: [] for name in names}
    zo_times = {name: [] for name in names}
    per_step = {}
    for round_index in range(warmup + repeats):
        order = [names[i] for i in torch.randperm(len(names), generator=order_rng).tolist()]
        for name in order:
            model, estimator, optimizer = models[name], estimators[name], optimizers[name]
            if before_step is not None:
                before_step()
            if counter is not None:
                counter.reset()
                counter.active = True
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            estimator.estimate(lambda: F.cross_entropy(model(x), y))
            optimizer.step()
            elapsed = time.perf_counter() - start
            if counter is not None:
                counter.active = False
                per_step[name] = {"bytes": dict(counter.bytes), "calls": dict(counter.calls)}
            if round_index >= warmup:
                times[name].append(elapsed)
                if counter is not None:
                    zo_times[name].append(counter.zo_seconds)
    if counter is not None:
        for name in names:
            per_step[name]["zo_allreduce_s"] = zo_times[name]
    return times, per_step


def single_process(spec: dict, names: list[str], threads: int, warmup: int, repeats: int) -> dict:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, y = make_batch(spec["layers"], spec["batch"])
        models = {name: build_model(spec["layers"]) for name in names}
        estimators = {name: make_estimator(name, models[name]) for name in names}
        optimizers = {name: torch.optim.SGD(models[name].parameters(), lr=1e-3) for name in names}
        times, _ = timed_steps(names, models, estimators, optimizers, x, y, warmup, repeats)
    finally:
        torch.set_num_threads(previous)
    return times


def ddp_worker(
    rank: int, world: int, spec: dict, names: list[str], warmup: int, repeats: int, out: str, engine: str = "ddp"
) -> None:
    x, y = fd.shard_batch(*make_batch(spec["layers"], spec["batch"]))
    counter = Counter()
    models, estimators, optimizers = {}, {}, {}
    for name in names:
        if engine == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(build_model(spec["layers"]))
            wrapped.register_comm_hook(None, counter.comm_hook)
        else:  # FSDP2: every Linear sharded on its own, then the root
            from torch.distributed.fsdp import fully_shard

            wrapped = build_model(spec["layers"])
            for module in wrapped:
                if isinstance(module, nn.Linear):
                    fully_shard(module)
            fully_shard(wrapped)
        models[name] = wrapped
        estimators[name] = make_estimator(name, wrapped)
        optimizers[name] = torch.optim.SGD(wrapped.parameters(), lr=1e-3)
    counter.install()
    try:
        times, per_step = timed_steps(
            names, models, estimators, optimizers, x, y, warmup, repeats, before_step=dist.barrier, counter=counter
        )
    finally:
        counter.uninstall()
    if rank == 0:
        with open(out, "w") as handle:
            json.dump({"times": times, "per_step": per_step}, handle)


def median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller models and fewer repeats (smoke run)")
    parser.add_argument("--models", default="tiny,larger")
    parser.add_argument("--n", default="1", help="comma-separated FOGZO sample counts")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600.0, help="wall-clock limit of each 2-process run (s)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument("--engines", default="ddp,fsdp", help="comma-separated: ddp (DistributedDataParallel), "
                        "fsdp (FSDP2 fully_shard on every Linear and the root)")
    args = parser.parse_args(argv)
    table = QUICK if args.quick else MODELS
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 20)
    names = variants([int(n) for n in args.n.split(",")])
    results: dict = {"world_size": 2, "backend": "gloo", "device": "cpu", "torch": torch.__version__,
                     "repeats": repeats, "warmup": args.warmup, "models": {}}
    for model_name in args.models.split(","):
        spec = table[model_name]
        params = sum(p.numel() for p in build_model(spec["layers"]).parameters())
        quantized = len(list(fogzo.quantized_layers(build_model(spec["layers"]))))
        entry = {"layers": list(spec["layers"]), "batch": spec["batch"], "parameters": params,
                 "quantized_layers": quantized, "variants": {}}
        one_thread = single_process(spec, names, 1, args.warmup, repeats)
        two_threads = single_process(spec, names, 2, args.warmup, repeats)
        runs = {}
        for engine in args.engines.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "rank0.json")
                fd.spawn_local(ddp_worker, 2, (spec, names, args.warmup, repeats, out, engine),
                               timeout=args.timeout, collective_timeout=min(args.timeout, 120.0), tmpdir=tmp,
                               start_method="spawn")  # fresh workers, as in the measurements in docs/
                with open(out) as handle:
                    runs[engine] = json.load(handle)
        for engine, run in runs.items():
            for name in names:
                bytes_ = run["per_step"][name]["bytes"]
                n = 0 if name == "ste" else int(name.removeprefix("fogzo_n"))
                if engine == "ddp":
                    expected = {"grad_allreduce": 4 * params, "zo_allreduce": 4 * n, "buffer_broadcast": 4 * quantized}
                else:  # all-gather per forward (1 + 2n of them), reduce-scatter once, K norms + n differences
                    expected = {"param_allgather": 4 * params * (1 + 2 * n), "grad_reducescatter": 4 * params,
                                "zo_allreduce": 4 * (quantized + n) if n else 0}
                key = name if engine == "ddp" else f"{name}_fsdp"
                entry["variants"][key] = {
                    "engine": engine,
                    "bytes_per_step": {**bytes_, "total": sum(bytes_.values())},
                    "calls_per_step": run["per_step"][name]["calls"],
                    "zo_allreduce_ms": median_ms(run["per_step"][name]["zo_allreduce_s"]),
                    "expected_bytes": expected,
                    "time_ms": {
                        "1proc_1thread": median_ms(one_thread[name]),
                        "1proc_2threads": median_ms(two_threads[name]),
                        "2proc_1thread": median_ms(run["times"][name]),
                    },
                    "samples_s": {"1proc_1thread": one_thread[name], "1proc_2threads": two_threads[name],
                                  "2proc_1thread": run["times"][name]},
                }
        results["models"][model_name] = entry
    print_table(results)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"wrote {args.json}")
    return results


def print_table(results: dict) -> None:
    header = (f"{'model':<7} {'params':>8} {'variant':<14} {'grad AR B':>10} {'AG B':>10} {'RS B':>10} "
              f"{'ZO AR B':>8} {'bcast B':>8} {'total B':>10} {'1p×1t ms':>9} {'1p×2t ms':>9} {'2p×1t ms':>9} "
              f"{'ZO AR ms':>9}")
    print(header)
    print("-" * len(header))
    for model_name, entry in results["models"].items():
        for name, row in entry["variants"].items():
            b, t = row["bytes_per_step"], row["time_ms"]
            print(f"{model_name:<7} {entry['parameters']:>8} {name:<14} {b['grad_allreduce']:>10} "
                  f"{b['param_allgather']:>10} {b['grad_reducescatter']:>10} {b['zo_allreduce']:>8} "
                  f"{b['buffer_broadcast']:>8} {b['total']:>10} {t['1proc_1thread']:>9.2f} "
                  f"{t['1proc_2threads']:>9.2f} {t['2proc_1thread']:>9.2f} {row['zo_allreduce_ms']:>9.3f}")
    print("(AG = FSDP2 parameter all-gather, RS = FSDP2 gradient reduce-scatter, output/input sizes; "
          "the 1-process columns are the same runs for both engines)")
    print(f"(median of {results['repeats']} steps; bytes = payload handed to the collectives per step on one rank; "
          "ZO AR ms = time blocked in the estimator's all-reduce, waiting for the slower rank included)")


if __name__ == "__main__":
    main(sys.argv[1:])
