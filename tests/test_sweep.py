"""The sweep driver (fogzo.train.sweep): the shared learning-rate procedure, parallel workers
that give the records of one process, resume from the archive, and Ctrl-C that keeps the
finished runs."""

from __future__ import annotations

import json

import pytest
import torch

from fogzo.train.sweep import LADDER, best_lr, needed, read_archive, run_sweep, tried_lrs

# ----------------------------------------------------------------------------- the lr procedure


def simulate(grid, seeds, loss):
    """Run the procedure to the end with ``loss(lr, seed)``; return the runs in the order asked."""
    scores: dict[tuple[float, int], float] = {}
    order = []
    while todo := needed(grid, seeds, lambda lr, seed: scores.get((lr, seed))):
        for lr, seed in todo:
            order.append((lr, seed))
            scores[(lr, seed)] = loss(lr, seed)
    return order, scores


def test_an_interior_best_needs_the_grid_then_the_best_with_the_other_seeds():
    order, scores = simulate([1e-3, 3e-3, 1e-2], [0, 1, 2], lambda lr, seed: abs(lr - 3e-3) + seed)
    assert order == [(1e-3, 0), (3e-3, 0), (1e-2, 0), (3e-3, 1), (3e-3, 2)]
    assert best_lr([1e-3, 3e-3, 1e-2], 0, lambda lr, seed: scores.get((lr, seed))) == 3e-3


def test_a_winning_edge_is_extended_along_the_ladder_at_most_twice_per_side():
    order, scores = simulate([1e-3, 3e-3], [0, 1], lambda lr, seed: lr)  # the smaller the better
    assert [lr for lr, seed in order if seed == 0] == [1e-3, 3e-3, 3e-4, 1e-4]
    assert order[-1] == (1e-4, 1)
    assert tried_lrs([1e-3, 3e-3], 0, lambda lr, seed: scores.get((lr, seed))) == [1e-4, 3e-4, 1e-3, 3e-3]
    order, _ = simulate([1e-2, 3e-2], [0], lambda lr, seed: -lr)  # the larger the better: stops at the ladder's top
    assert [lr for lr, _ in order] == [1e-2, 3e-2, 1e-1, 3e-1]
    assert LADDER[-1] == 3e-1


def test_nothing_more_is_asked_while_a_first_seed_run_is_missing_or_when_all_diverged():
    assert needed([1e-3, 3e-3], [0, 1], lambda lr, seed: 1.0 if lr == 1e-3 else None) == [(3e-3, 0)]
    assert best_lr([1e-3, 3e-3], 0, lambda lr, seed: 1.0 if lr == 1e-3 else None) is None
    order, _ = simulate([1e-3, 3e-3], [0, 1], lambda lr, seed: float("inf"))
    assert order == [(1e-3, 0), (3e-3, 0), (1e-3, 1)]


# ----------------------------------------------------------------------------- the driver

# Module-level, so that worker processes can unpickle them.
_STATE: dict[str, float] = {}


def _start(scale: float) -> None:
    _STATE["scale"] = scale


def _train(task: int) -> dict:
    """A tiny deterministic training run: a seeded linear model, a few SGD steps."""
    generator = torch.Generator().manual_seed(task)
    x, y = torch.randn(64, 8, generator=generator), torch.randn(64, 1, generator=generator)
    model = torch.nn.Linear(8, 1)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 8, generator=generator))
        model.bias.zero_()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1 * _STATE["scale"])
    for _ in range(5):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
    return {"task": task, "loss": loss.item(), "weight": model.weight.detach().flatten().tolist(), "threads": torch.get_num_threads()}


def _key(task: int) -> str:
    return f"task {task}"


def sweep(archive, tasks, *, workers=1, run=_train, echo=None):
    return run_sweep(lambda done: tasks, run, archive, key=_key, workers=workers, initializer=_start, initargs=(0.5,),
                     echo=echo or (lambda line: None))


def test_two_workers_give_the_records_of_one_process(tmp_path):
    threads = torch.get_num_threads()
    lines: list[str] = []
    one = sweep(tmp_path / "one.jsonl", list(range(6)))
    two = sweep(tmp_path / "two.jsonl", list(range(6)), workers=2, echo=lines.append)
    assert torch.get_num_threads() == threads  # the in-process sweep put the threads back
    assert set(one) == set(two) == {f"task {t}" for t in range(6)}
    assert all(record.pop("cpu_s") >= 0 for record in [*one.values(), *two.values()])
    assert one == two
    assert [{k: v for k, v in r.items() if k != "cpu_s"} for r in read_archive(tmp_path / "two.jsonl").values()] == list(
        two.values())
    assert {record["threads"] for record in two.values()} == {1}
    assert len({record["loss"] for record in one.values()}) == 6  # each task its own run
    # Progress: both workers busy, and what is left.
    assert "6 runs to do; 2 workers of 1 thread" in lines[0]
    assert "[1 done, 5 to go" in lines[1] and "running 2/2: " in lines[1]
    assert "[6 done, 0 to go" in lines[-1]


def test_resume_runs_only_what_the_archive_lacks_and_a_plan_may_grow(tmp_path):
    archive = tmp_path / "runs.jsonl"
    sweep(archive, [0, 1, 2])
    calls: list[int] = []

    def counted(task: int) -> dict:
        calls.append(task)
        return _train(task)

    results = sweep(archive, [0, 1, 2, 3], run=counted)
    assert calls == [3]
    assert len(archive.read_text().splitlines()) == 4
    # A plan that asks for task t + 1 once task t is finished (as the lr procedure does).
    calls.clear()
    results = {key: {k: v for k, v in record.items() if k != "cpu_s"} for key, record in results.items()}
    grown = run_sweep(lambda done: [len(done)] if len(done) < 6 else [], counted, archive, key=_key, workers=1,
                      initializer=_start, initargs=(0.5,), echo=lambda line: None)
    assert calls == [4, 5]
    assert {key: {k: v for k, v in grown[key].items() if k != "cpu_s"} for key in results} == results


def test_an_interrupted_sweep_keeps_its_finished_runs(tmp_path):
    archive = tmp_path / "runs.jsonl"

    def interrupted(task: int) -> dict:
        if task == 2:
            raise KeyboardInterrupt
        return _train(task)

    with pytest.raises(KeyboardInterrupt):
        sweep(archive, [0, 1, 2, 3], run=interrupted)
    assert set(read_archive(archive)) == {"task 0", "task 1"}
    calls: list[int] = []
    resumed = sweep(archive, [0, 1, 2, 3], run=lambda task: calls.append(task) or _train(task))
    assert calls == [2, 3]
    straight = sweep(tmp_path / "straight.jsonl", [0, 1, 2, 3])
    assert {k: r["loss"] for k, r in resumed.items()} == {k: r["loss"] for k, r in straight.items()}


def _fail_on_3(task: int) -> dict:
    if task == 3:
        raise RuntimeError("run 3 failed")
    return _train(task)


def test_a_failing_run_in_a_worker_propagates_and_keeps_the_finished_runs(tmp_path):
    archive = tmp_path / "runs.jsonl"
    with pytest.raises(RuntimeError, match="run 3 failed"):
        sweep(archive, [0, 1, 2, 3], run=_fail_on_3, workers=2)
    kept = set(read_archive(archive))
    assert kept == {"task 0", "task 1", "task 2"}  # the run in flight when run 3 failed ended and was kept


def test_a_last_line_cut_short_is_dropped_and_other_damage_is_an_error(tmp_path):
    archive = tmp_path / "runs.jsonl"
    sweep(archive, [0, 1])
    whole = archive.read_text()
    archive.write_text(whole + '{"key": "task 2", "loss')
    assert set(read_archive(archive)) == {"task 0", "task 1"}
    assert archive.read_text() == whole
    archive.write_text(whole + json.dumps({"loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="line 3: not a sweep record"):
        read_archive(archive)
    archive.write_text("not json\n" + whole)
    with pytest.raises(ValueError, match="line 1: not a JSON object"):
        read_archive(archive)
