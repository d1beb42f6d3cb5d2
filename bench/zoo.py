"""Benchmark: every built-in technique on the architectures users bring (tests/zoo_models.py).

For each zoo model (random weights, trained an epoch or two on digits or
generated token sequences) one in-process search runs every recipe below
against one baseline. Prints, per model and recipe: the status (with the
one-line reason when a recipe was skipped or failed), the metric drop (test
split), the compression ratio and speedup (against the baseline in the same
format), what the TFLite model runs on, and the wall time; then one summary
table of statuses. Takes several minutes (fine-tuning on EfficientNetB0).

Each model's search runs in a child process: a recipe that crashes the
process (a segfault in TensorFlow) is reported as ``crashed`` and the search
goes on with the recipes after it, from the candidates the child saved.

Usage: .venv/bin/python bench/zoo.py [--models lstm gru ...] [--recipes ...] [--out runs/bench-zoo]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the zoo the tests build

from zoo_models import ZOO  # noqa: E402

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
    """``prune>int8`` for ``prune(target_sparsity=0.5,epochs=1)>quantize(mode=int8)``."""
    first, _, rest = recipe.partition(">")
    if not rest:
        return SHORT.get(recipe, recipe)
    return f"{first.split('(')[0]}>{short(rest)}"


def child(name: str, recipes: list[str], out: Path, latency_runs: int) -> int:
    """Build (once) and search one zoo model; the parent reads ``out/run-N/metrics.json``."""
    import numpy as np

    from kfopt.errors import KfoptError
    from kfopt.recipe_search import search

    zoo = next(z for z in ZOO if z.name == name)
    built = out / "built.json"
    if built.exists():  # an earlier child crashed after building it
        path = json.loads(built.read_text())["model"]
        data = dict(np.load(out / "data.npz"))
    else:
        path, data = zoo.build(out)
        np.savez(out / "data.npz", **data)
        built.write_text(json.dumps({"model": path}))
    run = out / f"run-{len(list(out.glob('run-*'))) + 1}"
    try:
        search(path, data, run, recipes=recipes, rounds=0, sensitivity=None, latency_runs=latency_runs)
    except KfoptError as refused:  # nothing could run: the one line the user would see
        (run / "refused.txt").write_text(refused.one_line())
    return 0


def measure(name: str, recipes: list[str], out: Path, latency_runs: int) -> tuple[dict | None, list[dict], str]:
    """(baseline, candidates, note) of one model, its search retried past any recipe that crashes its process."""
    baseline, candidates, remaining, note = None, [], list(recipes), ""
    while remaining:
        before = set(out.glob("run-*"))
        # faulthandler: a crashed child says where (its Python stack), for the reason in the table.
        command = [sys.executable, "-X", "faulthandler", __file__, "--child", name, "--out", str(out)]
        command += ["--latency-runs", str(latency_runs)]
        done = subprocess.run(command + ["--recipes", *remaining], capture_output=True, text=True)
        (run,) = set(out.glob("run-*")) - before or {None}
        if run is not None and (run / "refused.txt").exists():
            return None, [], (run / "refused.txt").read_text()
        record = json.loads((run / "metrics.json").read_text()) if run and (run / "metrics.json").exists() else {}
        baseline = baseline or record.get("baseline")
        finished = record.get("candidates", [])
        candidates += finished
        if done.returncode == 0:
            break
        if baseline is None and not finished:
            return None, candidates, f"the model could not be built or measured (exit {done.returncode})"
        crashed = remaining[len(finished)]
        why = signal.Signals(-done.returncode).name if done.returncode < 0 else f"exit {done.returncode}"
        where = _crash_site(done.stderr)
        reason = f"the process died ({why}){f' in {where}' if where else ''}"
        candidates.append({"recipe": crashed, "status": "crashed", "reason": reason})
        remaining = remaining[len(finished) + 1 :]
    return baseline, candidates, note


def _crash_site(stderr: str) -> str | None:
    """Where a crashed child was in kfopt's own code (``plugins/distill.py:154 apply``), from faulthandler's dump."""
    _, fatal, dump = stderr.partition("Fatal Python error")
    for line in dump.splitlines() if fatal else []:
        found = re.search(r'File "[^"]*/((?:kfopt|plugins|components|pipelines)/[^"]+)", line (\d+) in (\S+)', line)
        if found:  # the innermost frame comes first
            return f"{found.group(1)}:{found.group(2)} {found.group(3)}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[z.name for z in ZOO], help="zoo names (default: all)")
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--out", default="runs/bench-zoo")
    parser.add_argument("--latency-runs", type=int, default=50)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.recipes, Path(args.out), args.latency_runs)

    console = Console(width=max(Console().width, 160))  # whole tables even when piped to a file
    started = time.perf_counter()
    summary = []
    for zoo in [z for z in ZOO if z.name in args.models]:
        model_start = time.perf_counter()
        out = Path(args.out) / slug(zoo.name)
        out.mkdir(parents=True, exist_ok=True)
        baseline, candidates, note = measure(zoo.name, args.recipes, out, args.latency_runs)
        seconds = time.perf_counter() - model_start
        if baseline is None:
            console.print(f"[bold]{zoo.name}[/]: {note}")
            summary.append((zoo.name, None, {}, seconds))
            continue
        title = f"{zoo.name}: baseline {baseline['metric_name']} {baseline['metric']:.3f} (test split), "
        table = Table(title=title + f"wall time {seconds:.0f} s")
        for column in ("recipe", "status", "metric drop", "compression", "speedup", "runs on", "seconds"):
            table.add_column(column, justify="left" if column in ("recipe", "status", "runs on") else "right")
        for candidate in candidates:
            if candidate["status"] != "ok":
                reason = f"{candidate['status']}: {(candidate.get('reason') or '')[:110]}"
                table.add_row(
                    short(candidate["recipe"]), reason, "", "", "", "", f"{candidate.get('seconds') or 0:.0f}"
                )
                continue
            runs_on = candidate.get("tflite_ops") or candidate["format"]
            if candidate.get("float_ops"):
                runs_on += f"; float: {candidate['float_ops']}"
            table.add_row(
                short(candidate["recipe"]),
                "ok",
                f"{candidate['metric_drop'] * 100:+.1f} pt",
                f"{candidate['compression_ratio']:.1f}x",
                f"{candidate['speedup']:.2f}x",
                runs_on[:60],
                f"{candidate['seconds']:.0f}",
            )
        console.print(table)
        summary.append((zoo.name, baseline["metric"], {short(c["recipe"]): c["status"] for c in candidates}, seconds))

    overview = Table(title="Every built-in technique on the zoo (status per recipe)")
    overview.add_column("model")
    overview.add_column("baseline", justify="right")
    for recipe in args.recipes:
        overview.add_column(short(recipe))
    overview.add_column("wall s", justify="right")
    for name, metric, statuses, seconds in summary:
        cells = (statuses.get(short(r), "-") for r in args.recipes)
        overview.add_row(name, "-" if metric is None else f"{metric:.3f}", *cells, f"{seconds:.0f}")
    console.print(overview)
    console.print(f"total wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
