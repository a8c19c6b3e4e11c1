"""The learning-rate procedure shared by the experiment drivers (same for every estimator).

1. Every learning rate of the shared grid with the first seed.
2. If the best lies at an edge of what was tried, the next rate of the ladder 1e-4, 3e-4, …,
   3e-1 beyond it is added (at most ``MAX_EXTENSIONS`` per side), again with the first seed.
3. The best rate with the remaining seeds.

Runs are identified by ``(lr, seed)``; ``score(lr, seed)`` returns the finished run's score
(lower is better; ``inf`` for a diverged run) or ``None`` while it has not run. The procedure
is a pure function of the scores so far, so a driver can call it again after every finished
run and resume from whatever is on disk.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
MAX_EXTENSIONS = 2

Score = Callable[[float, int], "float | None"]


def tried_lrs(grid: Sequence[float], first_seed: int, score: Score) -> list[float]:
    """The grid's learning rates plus the edge extensions the first-seed scores call for."""
    lrs = sorted(grid)
    for _ in range(2 * MAX_EXTENSIONS):
        done = {lr: score(lr, first_seed) for lr in lrs}
        if any(value is None for value in done.values()):
            return lrs
        best = min(done, key=lambda lr: (done[lr], lr))
        if math.isinf(done[best]) or best not in LADDER:
            return lrs
        position = LADDER.index(best)
        below = sum(lr < min(grid) for lr in lrs)
        above = sum(lr > max(grid) for lr in lrs)
        if best == lrs[0] and position > 0 and below < MAX_EXTENSIONS:
            lrs.insert(0, LADDER[position - 1])
        elif best == lrs[-1] and position + 1 < len(LADDER) and above < MAX_EXTENSIONS:
            lrs.append(LADDER[position + 1])
        else:
            return lrs
    return lrs


def best_lr(grid: Sequence[float], first_seed: int, score: Score) -> float | None:
    """The best first-seed learning rate once every tried rate has run, else ``None``."""
    lrs = tried_lrs(grid, first_seed, score)
    done = {lr: score(lr, first_seed) for lr in lrs}
    if any(value is None for value in done.values()):
        return None
    return min(done, key=lambda lr: (done[lr], lr))


def needed(grid: Sequence[float], seeds: Sequence[int], score: Score) -> list[tuple[float, int]]:
    """The ``(lr, seed)`` runs still needed (steps 1–3 of the module docstring)."""
    first, rest = seeds[0], seeds[1:]
    lrs = tried_lrs(grid, first, score)
    missing = [(lr, first) for lr in lrs if score(lr, first) is None]
    if missing:
        return missing
    best = best_lr(grid, first, score)
    assert best is not None
    return [(best, seed) for seed in rest if score(best, seed) is None]
