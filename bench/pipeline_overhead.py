"""Benchmark: what running a search through the kfp.local pipeline costs over running it in-process.

Runs the same small search twice, each in a fresh Python process so both pay
for interpreter start-up and imports: in-process (prepare, then run_recipe per
recipe, then select: what `kfopt optimize` does, recipe after recipe) and through
`kfopt run` (every step a kfp.local subprocess, recipes two at a time, plus the
HTML report and MLflow registration). Prints wall time, the time spent inside
the recipes, and the ratio.

Usage: .venv/bin/python bench/pipeline_overhead.py [--recipes R ...] [--epochs 5] [--out runs/bench-pipeline]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

RECIPES = [
    "quantize(mode=dynamic)",
    "quantize(mode=int8)",
    "prune(target_sparsity=0.5,epochs=1)>quantize(mode=int8)",
]


def in_process(recipes: list[str], epochs: int, out: Path) -> dict:
    """The search without the pipeline: one process, recipes one after another."""
    from kfopt.engine import finish_result, prepare, run_recipe, start_result
    from kfopt.evaluate import Evaluator
    from kfopt.plugins.manager import registry
    from kfopt.recipe import parse_recipe, plan
    from kfopt.rundir import slug, writable_dir

    techniques = registry()
    planned = [(parse_recipe(r), plan(parse_recipe(r), techniques)) for r in recipes]
    out = writable_dir(out)
    baseline, data = prepare("demo:mlp", "digits", epochs=epochs, workdir=out)
    baseline.save(out / "baseline")
    evaluator = Evaluator(data, baseline, out / "baseline")
    result = start_result("demo:mlp", "digits", 0, baseline, evaluator)
    for recipe, steps in planned:
        result.candidates.append(run_recipe(recipe, steps, baseline, data, evaluator, out / slug(recipe.label)))
    finish_result(result, evaluator, max_accuracy_drop=0.05, objective="size")
    result.save(out)
    return result.to_dict()


def timed(command: list[str]) -> tuple[float, dict]:
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, json.loads(proc.stdout[proc.stdout.index("{") :])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument(
        "--default-search", action="store_true", help="Use kfopt's built-in search (11 recipes) instead."
    )
    parser.add_argument("--epochs", type=int, default=5, help="Epochs of the demo:mlp baseline.")
    parser.add_argument("--out", default="runs/bench-pipeline")
    parser.add_argument("--in-process-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    if args.default_search:
        from kfopt.recipe_search import load_search

        args.recipes = [str(r.recipe) for r in load_search()]
    if args.in_process_only:
        from kfopt.rundir import jsonable

        print(json.dumps(in_process(args.recipes, args.epochs, out / "in-process"), default=jsonable))
        return 0

    search = out / "search.yaml"
    out.mkdir(parents=True, exist_ok=True)
    search.write_text("".join(f"- {json.dumps(r)}\n" for r in args.recipes))
    kfopt = str(Path(sys.executable).with_name("kfopt"))
    runs = {
        "in-process (run_recipe)": timed(
            [
                sys.executable,
                __file__,
                "--in-process-only",
                "--recipes",
                *args.recipes,
                "--epochs",
                str(args.epochs),
                "--out",
                str(out),
            ]
        ),
        "kfopt run (kfp.local)": timed(
            [
                kfopt,
                "run",
                "--search",
                str(search),
                "--epochs",
                str(args.epochs),
                "--max-accuracy-drop",
                "0.05",
                "--out",
                str(out / "pipeline"),
                "--tracking-uri",
                f"sqlite:///{out / 'mlflow.db'}",
                "--json",
            ]
        ),
    }
    table = Table(
        title=f"{len(args.recipes)} recipes on demo:mlp / digits (baseline {args.epochs} epochs), "
        "each mode in a fresh process"
    )
    for column in ("mode", "wall s", "inside recipes s", "everything else s", "ratio", "ok", "winner"):
        table.add_column(column, justify="left" if column in ("mode", "winner") else "right")
    base = next(iter(runs.values()))[0]
    for mode, (seconds, result) in runs.items():
        work = sum(c.get("seconds", 0) for c in result["candidates"])
        ok = sum(c["status"] == "ok" for c in result["candidates"])
        table.add_row(
            mode,
            f"{seconds:.1f}",
            f"{work:.1f}",
            f"{seconds - work:.1f}",
            f"{seconds / base:.2f}x",
            f"{ok}/{len(result['candidates'])}",
            str(result.get("winner")),
        )
    console = Console()
    if not console.is_terminal:  # rich would squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)
    print(
        "'everything else': interpreter start-up, imports, baseline training and measuring; for kfopt run also one "
        "Python process per step (each imports TensorFlow), artifact copies, the HTML report and MLflow registration."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
