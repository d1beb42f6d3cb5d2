"""Benchmark: what running a search through the kfp.local pipeline costs over running it in-process.

Runs the same recipes both ways, each in a fresh Python process so both pay for
interpreter start-up and imports, and does the same work both ways: train and
measure the demo:mlp baseline, run every recipe (no refinement rounds, so both
modes try exactly the same candidates), pick the winner, render the HTML report
and register the winner in MLflow (a fresh SQLite store per mode).

- in-process: one process, one Evaluator, recipe after recipe (what
  ``kfopt optimize`` / ``kfopt search`` do), then the pipeline's own report and
  promote step functions on the result.
- ``kfopt run --rounds 0``: every step a kfp.local subprocess (prepare, fine-tuning
  recipes one per step, post-training recipes grouped, select, report, promote).

Prints wall time, the time spent inside the recipes, in the report and MLflow,
the rest, the ratio, and whether both modes produced the same candidates
(recipes and statuses) and the same winner. CPU contention from other work
on the machine makes the numbers noisy: run it on a quiet machine.

Usage: .venv/bin/python bench/pipeline_overhead.py [--recipes R ...] [--default-search] [--epochs 5]
       [--out runs/bench-pipeline]
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

RECIPES = [
    "quantize(mode=dynamic)",
    "quantize(mode=float16)",
    "quantize(mode=int8)",
    "accelerate(backend=tflite)",
    "prune(target_sparsity=0.5,epochs=1)>quantize(mode=int8)",
]
MAX_DROP = "0.05"


def in_process(recipes: list[str], epochs: int, out: Path) -> dict:
    """The search without the pipeline: one process, one Evaluator, recipes one after another; then the
    pipeline's report and promote step functions, so both modes do the same work."""
    from kfopt.components.steps import promote_step, report_step
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
    finish_result(result, evaluator, max_accuracy_drop=MAX_DROP, objective="size")
    result.save(out)
    started = time.perf_counter()
    report_step(out, out / "report.html")
    promote_step(out, tracking_uri=f"sqlite:///{out / 'mlflow.db'}", max_accuracy_drop=MAX_DROP)
    record = json.loads((out / "metrics.json").read_text())
    record["report_and_mlflow_seconds"] = time.perf_counter() - started
    return record


def pipeline_report_and_mlflow_seconds(run_out: Path) -> float | None:
    """Seconds the pipeline's report and promote steps spent inside their bodies (their status files)."""
    from kfopt.components.status import read_statuses

    statuses = [s for s in read_statuses(run_out / "pipeline-root") if s.step in ("report", "promote")]
    return sum(s.seconds or 0 for s in statuses) if statuses else None


#: kfp.local's lines when a task starts and ends (timestamps first); the bench reads them for the step table only.
_STARTED = re.compile(r"^(?P<time>\d\d:\d\d:\d\d\.\d+) - INFO - Executing task '(?P<task>[^']+)'")
_FINISHED = re.compile(r"^(?P<time>\d\d:\d\d:\d\d\.\d+) - (?:INFO|ERROR) - Task '(?P<task>[^']+)' finished")
#: Steps that run inside the round-1 loop (several at once), reported as one phase.
_LOOP_STEPS = ("optimize", "optimize-group", "evaluate")


def _seconds(clock: str) -> float:
    hours, minutes, seconds = clock.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def pipeline_steps(run_out: Path) -> list[tuple[str, int, float, float]]:
    """(step, processes, wall seconds, seconds inside the step bodies) of a kfp.local run, in the order they ran.

    Wall time from kfp.local's task lines in the run's log; body time from each step's status file (what
    ``step_status`` timed: everything after the interpreter and kfp started, TensorFlow's import included).
    The loop's steps run several at once, so they are one row: its wall is the whole loop's.
    """
    from kfopt.components.status import read_statuses

    text = re.sub(r"\x1b\[[0-9;]*m", "", (run_out / "pipeline.log").read_text())
    phases: dict[str, list] = {}  # step -> [processes, first start, last end]
    for line in text.splitlines():
        started, finished = _STARTED.match(line), _FINISHED.match(line)
        found = started or finished
        if not found:
            continue
        task = re.sub(r"-\d+$", "", found["task"])
        name = "round-1 loop (optimize)" if task in _LOOP_STEPS else task
        phase = phases.setdefault(name, [0, None, None])
        if started:
            phase[0] += 1
            phase[1] = phase[1] if phase[1] is not None else _seconds(found["time"])
        else:
            phase[2] = _seconds(found["time"])
    body: dict[str, float] = {}
    for status in read_statuses(run_out / "pipeline-root"):
        name = "round-1 loop (optimize)" if status.step in _LOOP_STEPS else status.step
        body[name] = body.get(name, 0.0) + (status.seconds or 0.0)
    return [
        (name, count, (end or start) - start, body.get(name, 0.0))
        for name, (count, start, end) in phases.items()
        if start is not None
    ]


def timed(command: list[str]) -> tuple[float, dict]:
    """Wall seconds and the JSON a command printed; the record gets ``cpu_seconds``, the CPU time of the command
    and every process under it (user + system): far less moved by other work on a shared machine than wall time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    record = json.loads(proc.stdout[proc.stdout.index("{") :])
    record["cpu_seconds"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument(
        "--default-search", action="store_true", help="Use kfopt's built-in search space (round 1) instead."
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
    in_process_run = timed(
        [sys.executable, __file__, "--in-process-only", "--recipes", *args.recipes, "--epochs", str(args.epochs)]
        + ["--out", str(out)]
    )
    pipeline_run = timed(
        [kfopt, "run", "--search", str(search), "--rounds", "0", "--no-cache", "--epochs", str(args.epochs)]
        + ["--max-accuracy-drop", MAX_DROP, "--out", str(out / "pipeline")]
        + ["--tracking-uri", f"sqlite:///{out / 'pipeline-mlflow.db'}", "--json"]
    )
    pipeline_run[1]["report_and_mlflow_seconds"] = pipeline_report_and_mlflow_seconds(out / "pipeline")
    runs = {"in-process (run_recipe)": in_process_run, "kfopt run --rounds 0 (kfp.local)": pipeline_run}

    table = Table(
        title=f"{len(args.recipes)} recipes on demo:mlp / digits (baseline {args.epochs} epochs, no refinement "
        "rounds), each mode in a fresh process"
    )
    columns = (
        "mode",
        "wall s",
        "inside recipes s",
        "report + MLflow s",
        "everything else s",
        "ratio",
        "CPU s",
        "CPU ratio",
        "ok",
        "winner",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("mode", "winner") else "right")
    base, base_cpu = in_process_run[0], in_process_run[1]["cpu_seconds"]
    for mode, (seconds, result) in runs.items():
        work = sum(c.get("seconds", 0) for c in result["candidates"])
        final = result.get("report_and_mlflow_seconds") or 0.0
        ok = sum(c["status"] == "ok" for c in result["candidates"])
        table.add_row(
            mode,
            f"{seconds:.1f}",
            f"{work:.1f}",
            f"{final:.1f}",
            f"{seconds - work - final:.1f}",
            f"{seconds / base:.2f}x",
            f"{result['cpu_seconds']:.1f}",
            f"{result['cpu_seconds'] / base_cpu:.2f}x",
            f"{ok}/{len(result['candidates'])}",
            str(result.get("winner")),
        )
    console = Console()
    if not console.is_terminal:  # rich would squeeze the table into 80 columns
        console = Console(width=180)
    console.print(table)

    def outcome(result: dict) -> list[tuple[str, str]]:
        return [(c["recipe"], c["status"]) for c in result["candidates"]]

    steps = Table(title="kfopt run, step by step (kfp.local runs top-level steps one after another)")
    for column in ("step", "processes", "wall s", "inside step bodies s"):
        steps.add_column(column, justify="left" if column == "step" else "right")
    for name, count, wall, inside in pipeline_steps(out / "pipeline"):
        steps.add_row(name, str(count), f"{wall:.1f}", f"{inside:.1f}")
    console.print(steps)

    same = outcome(in_process_run[1]) == outcome(pipeline_run[1])
    same_winner = in_process_run[1].get("winner") == pipeline_run[1].get("winner")
    print(
        f"same candidates (recipe, status) both ways: {'yes' if same else 'NO'}; "
        f"same winner: {'yes' if same_winner else 'NO'}"
    )
    print(
        "'everything else': interpreter start-up, imports, baseline training and measuring, select; for kfopt run "
        "also one Python process per step (each imports kfp, most TensorFlow) and artifact copies."
    )
    return 0 if same and same_winner else 1


if __name__ == "__main__":
    raise SystemExit(main())
