"""Benchmark: channel pruning (prune(method=channels)) with and without int8, on conv models, side by side.

For demo:cnn, a small ResNet (BatchNorm, residual adds) and keras.applications
MobileNetV2 (alpha 0.35, 32x32, random init trained briefly on digits
upsampled), each at channel sparsity 0.25, 0.5 and 0.75 (``channels S``: prune(method=channels,
target_sparsity=S, epochs=--epochs), ``> fp32 tflite``: then accelerate(backend=tflite),
``> int8``: then quantize(mode=int8)): the channel-pruned
model (fine-tuned) converted to fp32 TFLite and to int8 TFLite, beside int8 alone, and the floor: channels removed
far beyond any useful accuracy (90%, 95%, down to one per group; not fine-tuned), about the fastest any channel
pruning of the architecture can be. Each sparsity runs
once per ``--allocations`` value (``uniform``: every channel group loses the same fraction;
``sensitivity``: sensitive groups lose fewer, at the same MACs), so the two compare at equal flops.
Prints accuracy drop, params, flops (MACs for one input), gzip compression,
batch-1 TFLite latency speedup against the fp32 TFLite baseline, and wall time.

Each sparsity is pruned and fine-tuned once; both conversions start from that
model (the wall time of a row includes the pruning it started from). Each model
runs in a child process, so a TensorFlow crash is reported as such and the
other models still run. The children run with oneDNN off
(TF_ENABLE_ONEDNN_OPTS=0): TensorFlow 2.21's oneDNN kernels abort the process
(double free) when training some narrow conv shapes, e.g. the small ResNet at
12 channels; TFLite latency does not use oneDNN, so the numbers are unchanged.

Usage: .venv/bin/python bench/channels.py [--models demo:cnn resnet mobilenet_v2] [--epochs 10] [--out runs/bench-channels]
       [--allocations uniform sensitivity] [--no-tflite]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the zoo the tests build

from kfopt.engine import prepare, run_recipe  # noqa: E402
from kfopt.evaluate import Evaluator  # noqa: E402
from kfopt.plugins import ModelHandle  # noqa: E402
from kfopt.plugins.manager import registry  # noqa: E402
from kfopt.progress import Reporter  # noqa: E402
from kfopt.recipe import parse_recipe, plan  # noqa: E402
from kfopt.rundir import write_json  # noqa: E402

SPARSITIES = (0.25, 0.5, 0.75)
#: fp32 TFLite (the like-for-like reference: speedup ~1) and int8 alone, then each sparsity's conversions.
FP32, INT8 = "accelerate(backend=tflite)", "quantize(mode=int8)"
#: The issue's aims: speedup at no more than 1 point of accuracy drop.
AIMS = {"demo:cnn": 4.0, "resnet": 2.5, "mobilenet_v2": 2.5}
MAX_DROP = 0.01
#: The floor rows: channels removed far beyond any useful accuracy, not fine-tuned (their accuracy means nothing),
#: down to one channel per group: the fastest of them is about as fast as channel pruning can make the architecture
#: (the narrowest is not always the fastest: a runtime may take slower kernels for one-channel convolutions).
FLOOR, FLOOR_SPARSITIES = "floor (not fine-tuned)", (0.9, 0.95, 0.999)
COLUMNS = ("model", "recipe", "format", "accuracy", "drop", "params", "flops", "gzip KB", "ratio", "p50 ms")
COLUMNS = (*COLUMNS, "speedup", "seconds")
#: What a child hands the parent for each row.
KEYS = ("recipe", "status", "reason", "format", "accuracy", "accuracy_drop", "params", "flops", "gzip_bytes")
KEYS = (*KEYS, "compression_ratio", "latency_p50_ms", "speedup", "seconds", "notes")


def zoo_baseline(name: str, directory: Path, extra_epochs: int) -> tuple[str, dict]:
    """A zoo model (tests/zoo_models.py) saved as a .keras file, trained ``extra_epochs`` more than the zoo's
    two epochs, so the fine-tuning after pruning does not get credit for finishing the baseline's training."""
    import zoo_models

    from kfopt import _tf
    from kfopt.models import load_keras

    path, data = getattr(zoo_models, name)(directory)
    if extra_epochs:
        keras = _tf.keras()
        model = load_keras(path)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
        model.fit(data["x_train"], data["y_train"], epochs=extra_epochs, batch_size=32, verbose=0)
        model.save(path)
    return path, data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["demo:cnn", "resnet", "mobilenet_v2"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs after removing channels")
    parser.add_argument("--baseline-epochs", type=int, default=8, help="zoo models: epochs beyond the zoo's two")
    parser.add_argument("--out", default="runs/bench-channels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--allocations",
        nargs="+",
        choices=("uniform", "sensitivity"),
        default=["uniform", "sensitivity"],
        help="prune(allocation=...) rows at each sparsity: side by side at the same MACs",
    )
    parser.add_argument("--no-tflite", action="store_true", help="skip the fp32/int8 TFLite rows (accuracy, flops)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # run one model and print its rows as JSON
    args = parser.parse_args()

    if args.child:
        rows = bench_model(args.child, args, registry(), Reporter())
        print(json.dumps(rows))
        return 0

    console = Console(width=max(Console().width, 170))  # whole table even when piped to a file
    started = time.perf_counter()
    table = Table(title="prune(method=channels) on digits: TFLite batch-1 speedup against fp32 TFLite")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("model", "recipe", "format") else "right")
    summary = []
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "0")}
    for model in args.models:
        command = [sys.executable, __file__, "--child", model, *sys.argv[1:]]
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
        if done.returncode:
            why = signal.Signals(-done.returncode).name if done.returncode < 0 else f"exit {done.returncode}"
            table.add_row(model, "-", "-", "crashed", f"the process died ({why})", *[""] * 7)
            table.add_section()
            continue
        rows = json.loads(done.stdout.strip().splitlines()[-1])
        for row in rows:
            add_row(table, model, row)
        summary.append((model, rows[1:]))
        table.add_section()
    console.print(table)
    for model, rows in summary:
        fit = [
            c
            for c in rows
            if c["status"] == "ok"
            and c["format"] == "tflite"
            and c["accuracy_drop"] <= MAX_DROP
            and not c["recipe"].startswith("floor")
        ]
        best = max(fit, key=lambda c: c["speedup"], default=None)
        aim = AIMS.get(model)
        said = (
            f"{best['speedup']:.2f}x ({best['recipe']}, drop {best['accuracy_drop'] * 100:+.2f} pt)" if best else "none"
        )
        verdict = "" if aim is None or best is None else (" meets" if best["speedup"] >= aim else " misses")
        console.print(f"{model}: best TFLite speedup within 1 point: {said}{verdict} the aim of {aim}x")
        limit = [c for c in rows if c["status"] == "ok" and c["recipe"].startswith("floor")]
        if limit:
            fastest = max(limit, key=lambda c: c["speedup"])
            console.print(
                f"  about the most any channel pruning can give it here: {fastest['speedup']:.2f}x "
                f"({fastest['recipe']}, flops {fastest['flops']:,})"
            )
        for row in rows:
            note = next((n for n in row.get("notes") or () if n.startswith("prune(method=channels) removed")), None)
            if row["status"] == "ok" and row["format"] == "keras" and note:
                drop, flops = row["accuracy_drop"] * 100, row["flops"]
                console.print(f"  {row['recipe']}: drop {drop:+.2f} pt, flops {flops:,}; {note.split(': ')[0]}")
    console.print(f"total wall time {time.perf_counter() - started:.0f} s")
    return 0


def bench_model(model: str, args, techniques, reporter: Reporter) -> list[dict]:
    """The rows of one model: its baseline, fp32 TFLite and int8 alone, then each sparsity pruned once and
    converted twice."""
    out = Path(args.out) / model.replace(":", "-")
    out.mkdir(parents=True, exist_ok=True)
    if model.startswith("demo:"):
        spec, data = model, "digits"
    else:
        spec, data = zoo_baseline(model, out, args.baseline_epochs)
    baseline, dataset = prepare(spec, data, seed=args.seed, workdir=out, reporter=reporter)
    baseline.save(out / "baseline")
    evaluator = Evaluator(dataset, baseline, out / "baseline")
    base = evaluator.baseline_metrics()
    rows: list = [{**base, "recipe": "baseline", "status": "ok", "format": "keras"}]

    def run(text: str, source: ModelHandle, label: str, extra_seconds: float = 0.0):
        planned = plan(parse_recipe(text), techniques)
        slug = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")
        candidate = run_recipe(
            parse_recipe(text), planned, source, dataset, evaluator, out / slug, seed=args.seed, reporter=reporter
        )
        candidate.recipe = label
        candidate.seconds = round((candidate.seconds or 0) + extra_seconds, 2)
        rows.append(candidate.to_dict())
        return candidate

    if not args.no_tflite:
        run(FP32, baseline, "fp32 tflite")
        run(INT8, baseline, "int8")
    for sparsity in args.sparsities:
        for allocation in args.allocations:
            prune = f"prune(method=channels,target_sparsity={sparsity:g},allocation={allocation},epochs={args.epochs})"
            label = f"channels {sparsity:g} {allocation}"
            pruned = run(prune, baseline, label)
            if pruned.status != "ok" or args.no_tflite:
                continue
            smaller = ModelHandle.load(pruned.artifact, info={"notes": pruned.notes, "params": pruned.params})
            run(FP32, smaller, f"{label} > fp32 tflite", pruned.seconds)
            run(INT8, smaller, f"{label} > int8", pruned.seconds)
    if not args.no_tflite:  # the narrowest model channel pruning can make of this architecture: its speed limit
        from kfopt.plugins.channels import plan_channels, remove_channels

        for sparsity in FLOOR_SPARSITIES:
            narrow = remove_channels(baseline.keras(), plan_channels(baseline.keras(), sparsity))
            for text, fmt in ((FP32, "fp32 tflite"), (INT8, "int8")):
                run(text, ModelHandle.from_keras(narrow), f"{FLOOR} {sparsity:g} > {fmt}")
    write_json(out / "bench.json", {"rows": rows, "references": evaluator.references})
    return [{k: row.get(k) for k in KEYS} for row in rows]


def add_row(table: Table, model: str, row: dict) -> None:
    if row["status"] != "ok":
        table.add_row(model, row["recipe"], "-", row["status"], (row.get("reason") or "")[:70], *[""] * 7)
        return

    def cell(key: str, fmt: str) -> str:
        value = row.get(key)
        return "" if value is None else fmt.format(value)

    table.add_row(
        model,
        row["recipe"],
        row["format"],
        cell("accuracy", "{:.4f}"),
        "" if row["recipe"] == "baseline" else f"{row['accuracy_drop'] * 100:+.2f} pt",
        cell("params", "{:,}"),
        cell("flops", "{:,}"),
        f"{row['gzip_bytes'] / 1024:,.1f}",
        "" if row["recipe"] == "baseline" else cell("compression_ratio", "{:.1f}x"),
        cell("latency_p50_ms", "{:.4f}"),
        "" if row["recipe"] == "baseline" else cell("speedup", "{:.2f}x"),
        cell("seconds", "{:.1f}"),
    )


if __name__ == "__main__":
    sys.exit(main())
