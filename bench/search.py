"""Benchmark: the in-process accuracy-aware search (`kfopt search`) on demo:mlp and demo:cnn (digits).

Round 1 is the built-in search space (kfopt/recipe_search/default.yaml); the layer
sensitivity pass (each layer alone pruned to 90%) feeds refinement, which can
keep the most sensitive layers dense. For each model and objective prints the
winner over all rounds beside the best round-1 recipe (both picked by
kfopt.select on the test split within the budget): compression_ratio,
accuracy_drop, speedup, and the wall time.
Usage: .venv/bin/python bench/search.py [--models demo:mlp demo:cnn] [--objectives size latency]
       [--rounds 3] [--max-trials 4] [--max-time 480] [--sensitivity 0.9] [--out runs/bench-search]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kfopt.engine import prepare
from kfopt.progress import Reporter
from kfopt.recipe_search import best_of_round, search
from kfopt.report import search_table, sensitivity_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["demo:mlp", "demo:cnn"])
    parser.add_argument("--objectives", nargs="+", default=["size", "latency"], choices=["size", "latency"])
    parser.add_argument("--recipes", nargs="+", default=None, help="Round 1 [default: the built-in search space].")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-trials", type=int, default=4)
    parser.add_argument("--sensitivity", type=float, default=0.9, help="Layer sensitivity sparsity (0 = skip).")
    parser.add_argument("--max-time", type=float, default=480, help="Seconds per search after which no recipe starts.")
    parser.add_argument("--max-accuracy-drop", type=float, default=0.01)
    parser.add_argument("--out", default="runs/bench-search")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    console = Console(width=max(Console().width, 170))
    summary = Table(
        title=f"kfopt search: winner vs best round-1 recipe (budget {args.max_accuracy_drop * 100:g} pt, test split)"
    )
    for col in (
        "model",
        "objective",
        "which",
        "recipe",
        "round",
        "compression",
        "test drop",
        "val drop",
        "speedup",
        "wall s",
    ):
        summary.add_column(col, justify="left" if col in ("model", "objective", "which", "recipe") else "right")
    started = time.perf_counter()
    for model in args.models:
        out = Path(args.out) / model.replace(":", "-")
        prepared = prepare(model, "digits", seed=args.seed, workdir=out, reporter=Reporter())
        for objective in args.objectives:
            search_start = time.perf_counter()
            result = search(
                model,
                "digits",
                out / objective,
                recipes=args.recipes,
                rounds=args.rounds,
                max_trials=args.max_trials,
                max_time=args.max_time,
                max_accuracy_drop=args.max_accuracy_drop,
                objective=objective,
                seed=args.seed,
                reporter=Reporter(),
                baseline=prepared,
                sensitivity=args.sensitivity or None,
            )
            wall = time.perf_counter() - search_start
            if objective == args.objectives[0] and result.get("layer_sensitivity"):
                console.print(sensitivity_table(result["layer_sensitivity"]))
            console.print(search_table(result))
            console.print(f"stopped: {result['search']['stopped']}")
            winner = next((c for c in result["candidates"] if c["recipe"] == result["winner"]), None)
            for which, row in (("round-1 best", best_of_round(result, 1)), ("search winner", winner)):
                if row is None:
                    summary.add_row(model, objective, which, "none within budget", *[""] * 5, f"{wall:.0f}")
                    continue
                summary.add_row(
                    model,
                    objective,
                    which,
                    row["recipe"],
                    str(row["round"]),
                    f"{row['compression_ratio']:.1f}x",
                    f"{row['accuracy_drop'] * 100:+.2f} pt",
                    f"{row['val_accuracy_drop'] * 100:+.2f} pt",
                    f"{row['speedup']:.2f}x",
                    f"{wall:.0f}",
                )
    console.print(summary)
    console.print(f"total wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
