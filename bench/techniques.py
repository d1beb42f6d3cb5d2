"""Benchmark: every built-in technique on demo:mlp and demo:cnn (digits), side by side in one run.

Prints one row per recipe: accuracy, accuracy_drop, gzip_bytes, compression_ratio
(against the baseline in the same format), latency_p50_ms and speedup with its
spread (timed interleaved with the baseline in the same format: the median over
block pairs, ± half its 95% interval), and the wall time.
Usage: .venv/bin/python bench/techniques.py [--models demo:mlp demo:cnn] [--out runs/bench]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kfopt.engine import prepare, run_recipe
from kfopt.evaluate import Evaluator
from kfopt.plugins.manager import registry
from kfopt.progress import Reporter
from kfopt.recipe import parse_recipe, plan
from kfopt.report import speedup_cell
from kfopt.rundir import write_json

RECIPES = [
    "accelerate(backend=tflite)",  # the fp32 TFLite baseline itself: ratio 1 by construction
    "quantize(mode=dynamic)",
    "quantize(mode=float16)",
    "quantize(mode=int8)",
    "quantize(mode=qat)",
    "prune(target_sparsity=0.5)>quantize(mode=int8)",
    "prune(target_sparsity=0.8)>quantize(mode=int8)",
    "prune(target_sparsity=0.9)>quantize(mode=int8)",
    "prune(method=structured)>quantize(mode=int8)",
    "distill(width=0.5)>quantize(mode=int8)",
    "distill(width=0.25)>quantize(mode=int8)",
    "accelerate(backend=xla)",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["demo:mlp", "demo:cnn"])
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    techniques = registry()
    recipes = [(r, plan(parse_recipe(r), techniques)) for r in args.recipes]  # fail before any work
    console = Console(width=max(Console().width, 150))  # whole table even when piped to a file
    reporter = Reporter()
    started = time.perf_counter()
    for model in args.models:
        model_start = time.perf_counter()
        out = Path(args.out) / model.replace(":", "-")
        out.mkdir(parents=True, exist_ok=True)
        baseline, data = prepare(model, "digits", seed=args.seed, workdir=out, reporter=reporter)
        baseline.save(out / "baseline")
        evaluator = Evaluator(data, baseline, out / "baseline")
        base = evaluator.baseline_metrics()
        table = Table(title=f"{model} on digits: baseline keras accuracy {base['accuracy']:.4f}")
        for col in (
            "recipe",
            "format",
            "accuracy",
            "accuracy_drop",
            "gzip_bytes",
            "compression_ratio",
            "latency_p50_ms",
            "speedup",
            "seconds",
        ):
            table.add_column(
                col,
                justify="left" if col in ("recipe", "format") else "right",
                overflow="fold",
                no_wrap=col != "recipe",
            )
        rows = []
        for text, planned in recipes:
            slug = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")
            candidate = run_recipe(
                parse_recipe(text), planned, baseline, data, evaluator, out / slug, seed=args.seed, reporter=reporter
            )
            rows.append(candidate)
            if candidate["status"] != "ok":
                table.add_row(
                    text,
                    "-",
                    candidate["status"],
                    candidate["reason"][:60],
                    "",
                    "",
                    "",
                    "",
                    f"{candidate['seconds']:.1f}",
                )
                continue
            table.add_row(
                text,
                candidate["format"],
                f"{candidate['accuracy']:.4f}",
                f"{candidate['accuracy_drop'] * 100:+.2f} pt",
                f"{candidate['gzip_bytes']:,}",
                f"{candidate['compression_ratio']:.1f}x",
                f"{candidate['latency_p50_ms']:.4f}",
                speedup_cell(candidate),
                f"{candidate['seconds']:.1f}",
            )
        write_json(out / "bench.json", {"baseline": base, "candidates": rows, "references": evaluator.references})
        console.print(table)
        refs = evaluator.references
        console.print(
            "baseline references (like for like): "
            + ", ".join(
                f"{fmt}: {r['gzip_bytes']:,} gzip bytes, p50 {r['latency_p50_ms']:.4f} ms" for fmt, r in refs.items()
            )
        )
        console.print(
            "speedup: each candidate timed interleaved with the baseline in its format (alternating blocks of "
            "batch-1 invocations, one TFLite thread unless the recipe sets threads); ± is half its 95% interval"
        )
        console.print(f"{model}: wall time {time.perf_counter() - model_start:.0f} s\n")
    console.print(f"total wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
