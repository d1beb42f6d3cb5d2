"""Benchmark: the in-process accuracy-aware search (`kfopt search`) on demo:mlp and demo:cnn (digits).

Round 1 is the built-in search space (kfopt/recipe_search/default.yaml); the layer
sensitivity pass (each layer alone pruned to 90%) feeds refinement, which can
keep the most sensitive layers dense. For each model, objective and setting of
--rounds (default: the plain default search, which refines while a round gains
within its time budget, and a fixed 3 rounds) prints the winner over all rounds
beside the best round-1 recipe (both picked by kfopt.select on the test split
within the budget): compression_ratio, accuracy_drop, speedup, the best candidate
that keeps the architecture, the rounds run, why the search stopped, the search's
wall time and the summed seconds of its candidates (on a busy machine the wall
time inflates; the candidates' sum says what the recipes cost).
Usage: .venv/bin/python bench/search.py [--models demo:mlp demo:cnn] [--objectives size latency]
       [--rounds auto 3] [--max-trials 4] [--time-budget S] [--sensitivity 0.9] [--out runs/bench-search]
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
from kfopt.recipe_search import best_of_round, optimization_seconds, search
from kfopt.report import search_table, sensitivity_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["demo:mlp", "demo:cnn"])
    parser.add_argument("--objectives", nargs="+", default=["size", "latency"], choices=["size", "latency"])
    parser.add_argument("--recipes", nargs="+", default=None, help="Round 1 [default: the built-in search space].")
    parser.add_argument(
        "--rounds", nargs="+", default=["auto", "3"], help="Settings to compare: auto (the default search) or N."
    )
    parser.add_argument("--max-trials", type=int, default=4)
    parser.add_argument("--sensitivity", type=float, default=0.9, help="Layer sensitivity sparsity (0 = skip).")
    parser.add_argument("--time-budget", type=float, default=None, help="Wall seconds per search [default: auto].")
    parser.add_argument("--max-accuracy-drop", type=float, default=0.01)
    parser.add_argument("--out", default="runs/bench-search")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    console = Console(width=max(Console().width, 220))
    summary = Table(
        title=f"kfopt search: winner vs best round-1 recipe (budget {args.max_accuracy_drop * 100:g} pt, test split)"
    )
    for col in (
        "model",
        "objective",
        "rounds",
        "which",
        "recipe",
        "round",
        "compression",
        "test drop",
        "val drop",
        "speedup",
        "ran",
        "stopped",
        "wall s",
        "cand s",
    ):
        left = col in ("model", "objective", "rounds", "which", "recipe", "stopped")
        summary.add_column(col, justify="left" if left else "right", overflow="fold")
    started = time.perf_counter()
    for model in args.models:
        out = Path(args.out) / model.replace(":", "-")
        prepared = prepare(model, "digits", seed=args.seed, workdir=out, reporter=Reporter())
        for objective in args.objectives:
            for setting in args.rounds:
                rounds = None if setting == "auto" else int(setting)
                search_start = time.perf_counter()
                result = search(
                    model,
                    "digits",
                    out / f"{objective}-rounds-{setting}",
                    recipes=args.recipes,
                    rounds=rounds,
                    max_trials=args.max_trials,
                    time_budget=args.time_budget,
                    max_accuracy_drop=args.max_accuracy_drop,
                    objective=objective,
                    seed=args.seed,
                    reporter=Reporter(),
                    baseline=prepared,
                    sensitivity=args.sensitivity or None,
                )
                wall = time.perf_counter() - search_start
                if objective == args.objectives[0] and setting == args.rounds[0] and result.get("layer_sensitivity"):
                    console.print(sensitivity_table(result["layer_sensitivity"]))
                console.print(search_table(result))
                console.print(f"stopped: {result['search']['stopped']}")
                ran = max((c.round or 1 for c in result.candidates), default=1) - 1
                spent = f"{optimization_seconds(result.candidates):.0f}"
                rows = [("round-1 best", best_of_round(result, 1)), ("search winner", result.winning_candidate)]
                if result.best_same_architecture != result.winner:
                    rows.append(("same architecture", result.candidate(result.best_same_architecture)))
                for which, row in rows:
                    head = [model, objective, setting, which]
                    tail = [f"{ran}", result["search"]["stopped"], f"{wall:.0f}", spent]
                    if row is None:
                        summary.add_row(*head, "none within budget", *[""] * 5, *tail)
                        continue
                    summary.add_row(
                        *head,
                        row["recipe"],
                        str(row["round"]),
                        f"{row['compression_ratio']:.1f}x",
                        f"{row['accuracy_drop'] * 100:+.2f} pt",
                        f"{row['val_accuracy_drop'] * 100:+.2f} pt",
                        f"{row['speedup']:.2f}x",
                        *tail,
                    )
    console.print(summary)
    console.print(f"total wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
