"""Benchmark: every built-in technique on the architectures users bring (tests/zoo_models.py).

For each zoo model (random weights, trained an epoch or two on digits or
generated token sequences) one in-process search runs every recipe below
against one baseline. Prints, per model and recipe: the status (with the
one-line reason when a recipe was skipped or failed), the metric drop (test
split), the compression ratio and speedup (against the baseline in the same
format), what the TFLite model runs on, and the wall time; then one summary
table of statuses. Takes several minutes (fine-tuning on EfficientNetB0).

Usage: .venv/bin/python bench/zoo.py [--models lstm gru ...] [--recipes ...] [--out runs/bench-zoo]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the zoo the tests build

from zoo_models import ZOO  # noqa: E402

from kfopt.errors import KfoptError  # noqa: E402
from kfopt.progress import Reporter  # noqa: E402
from kfopt.recipe_search import search  # noqa: E402
from kfopt.rundir import slug  # noqa: E402

RECIPES = [
    "quantize(mode=int8)",
    "quantize(mode=dynamic)",
    "prune(target_sparsity=0.5,epochs=1)>quantize(mode=int8)",
    "distill(width=0.5,epochs=2)>quantize(mode=int8)",
    "quantize(mode=qat,epochs=1)",
]
SHORT = {"quantize(mode=int8)": "int8", "quantize(mode=dynamic)": "dynamic", "quantize(mode=qat,epochs=1)": "qat"}


def short(recipe: str) -> str:
    return SHORT.get(recipe) or ("prune>int8" if recipe.startswith("prune") else "distill>int8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[z.name for z in ZOO], help="zoo names (default: all)")
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--out", default="runs/bench-zoo")
    parser.add_argument("--latency-runs", type=int, default=50)
    args = parser.parse_args()

    console = Console(width=max(Console().width, 160))  # whole tables even when piped to a file
    started = time.perf_counter()
    summary: list[tuple[str, float | None, dict[str, str], float]] = []
    for zoo in [z for z in ZOO if z.name in args.models]:
        model_start = time.perf_counter()
        out = Path(args.out) / slug(zoo.name)
        out.mkdir(parents=True, exist_ok=True)
        path, data = zoo.build(out)
        try:
            result = search(
                path,
                data,
                out / "run",
                recipes=list(args.recipes),
                rounds=0,
                sensitivity=None,
                latency_runs=args.latency_runs,
                reporter=Reporter(enabled=False),
            )
        except KfoptError as refused:  # nothing could run: the one line the user would see
            console.print(f"[bold]{zoo.name}[/]: {refused.one_line()}")
            summary.append((zoo.name, None, {short(r): "refused" for r in args.recipes}, 0.0))
            continue
        seconds = time.perf_counter() - model_start
        base = result.baseline
        table = Table(
            title=f"{zoo.name}: baseline {base.metric_name} {base.metric:.3f} (test split), wall time {seconds:.0f} s"
        )
        for column in ("recipe", "status", "metric drop", "compression", "speedup", "runs on", "seconds"):
            table.add_column(column, justify="left" if column in ("recipe", "status", "runs on") else "right")
        statuses = {}
        for candidate in result.candidates:
            statuses[short(candidate.recipe)] = candidate.status
            if candidate.status != "ok":
                table.add_row(
                    short(candidate.recipe),
                    f"{candidate.status}: {(candidate.reason or '')[:110]}",
                    "",
                    "",
                    "",
                    "",
                    f"{candidate.seconds or 0:.0f}",
                )
                continue
            runs_on = candidate.get("tflite_ops") or candidate.format
            if candidate.get("float_ops"):
                runs_on += f"; float: {candidate.float_ops}"
            table.add_row(
                short(candidate.recipe),
                "ok",
                f"{candidate.metric_drop * 100:+.1f} pt",
                f"{candidate.compression_ratio:.1f}x",
                f"{candidate.speedup:.2f}x",
                runs_on[:60],
                f"{candidate.seconds:.0f}",
            )
        console.print(table)
        summary.append((zoo.name, base.metric, statuses, seconds))

    overview = Table(title="Every built-in technique on the zoo (status per recipe)")
    overview.add_column("model")
    overview.add_column("baseline", justify="right")
    for recipe in args.recipes:
        overview.add_column(short(recipe))
    overview.add_column("wall s", justify="right")
    for name, metric, statuses, seconds in summary:
        overview.add_row(
            name,
            "-" if metric is None else f"{metric:.3f}",
            *(statuses.get(short(r), "-") for r in args.recipes),
            f"{seconds:.0f}",
        )
    console.print(overview)
    console.print(f"total wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
