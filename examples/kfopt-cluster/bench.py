"""Clustering + int8 on demo:mlp (digits), through `kfopt optimize`: accuracy and compression.

    pip install -e examples/kfopt-cluster
    .venv/bin/python examples/kfopt-cluster/bench.py [--seed 0] [--out runs/bench-cluster]

Each recipe is one `kfopt optimize --json` run, as a user runs it (the seeded
baseline is retrained identically for each); ratios are against the baseline in
the candidate's format (fp32 TFLite for these int8 TFLite candidates). Prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RECIPES = [
    "quantize(mode=int8)",
    "cluster(clusters=16)>quantize(mode=int8)",
    "cluster(clusters=32)>quantize(mode=int8)",
    "prune>quantize(mode=int8)",
    "prune>cluster(clusters=16)>quantize(mode=int8)",
    "prune>cluster(clusters=32)>quantize(mode=int8)",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-cluster")
    args = parser.parse_args()
    kfopt = shutil.which("kfopt", path=os.path.dirname(sys.executable)) or "kfopt"
    # Exactly the built-ins and this plugin, whatever else is installed.
    env = {**os.environ, "KFOPT_PLUGINS": "cluster"}
    print(f"demo:mlp on digits, seed {args.seed}\n")
    print("| recipe | accuracy | accuracy_drop | compression_ratio | gzip KB | sparsity | seconds |")
    print("|---|---|---|---|---|---|---|")
    for index, recipe in enumerate(RECIPES):
        started = time.perf_counter()
        out = Path(args.out) / str(index)
        command = [kfopt, "optimize", "--model", "demo:mlp", "--data", "digits", "--recipe", recipe]
        command += ["--out", str(out), "--seed", str(args.seed), "--json", "--no-tracking"]
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode not in (0, 1):  # 1: the candidate failed, and the JSON says why
            sys.exit(f"{recipe}: {(done.stderr.strip() or f'exit code {done.returncode}').splitlines()[-1]}")
        c = json.loads(done.stdout)["candidates"][0]
        if c["status"] != "ok":
            print(f"| {recipe} | {c['status']}: {c['reason']} | | | | | |")
            continue
        print(
            f"| {recipe} | {c['accuracy']:.4f} | {c['accuracy_drop']:+.4f} | {c['compression_ratio']:.2f}x | "
            f"{c['gzip_bytes'] / 1024:.1f} | {c['sparsity']:.2f} | {time.perf_counter() - started:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
