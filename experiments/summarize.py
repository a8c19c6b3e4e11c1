"""Summarise ablation JSON lines: mean ± std of the final training loss over seeds per setting.

    python experiments/summarize.py results/grid_alpha.jsonl [--by estimator,alpha_init,lr]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

DEFAULT_KEYS = "estimator,bits,alpha_init,lr,perturb,guide_norm,beta_min,eps_bar,one_sided,n,optimizer,iterations"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("files", nargs="+")
    parser.add_argument("--by", default=DEFAULT_KEYS)
    args = parser.parse_args()
    keys = args.by.split(",")
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for name in args.files:
        for line in open(name):
            if line.strip():
                record = json.loads(line)
                groups[tuple(record.get(k) for k in keys)].append(record)
    print("| " + " | ".join(keys) + " | seeds | train loss | test acc | zero d | wall s |")
    print("|" + "---|" * (len(keys) + 5))
    for key in sorted(groups, key=lambda k: tuple(str(v) for v in k)):
        runs = groups[key]
        losses = [r["train_loss"] for r in runs]
        accuracy = [r["test_accuracy"] for r in runs]
        spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
        print(
            "| " + " | ".join(str(v) for v in key)
            + f" | {len(runs)} | {statistics.mean(losses):.3f} ± {spread:.3f} | {100 * statistics.mean(accuracy):.1f} %"
            + f" | {statistics.mean(r['zero_fraction'] for r in runs):.2f} | {statistics.mean(r['wall_s'] for r in runs):.0f} |"
        )


if __name__ == "__main__":
    main()
