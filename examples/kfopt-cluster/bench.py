"""Clustering + int8 on demo:mlp (digits), through kfopt.optimize.optimize: accuracy and compression.

    .venv/bin/python examples/kfopt-cluster/bench.py [--seed 0] [--out runs/bench-cluster]

Each recipe is one `optimize` call (the seeded baseline is retrained identically
for each); ratios are against the baseline in the candidate's format (fp32
TFLite for these int8 TFLite candidates). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import kfopt_cluster

from kfopt.optimize import optimize

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
    # Exactly the built-ins and this plugin (from this checkout), whatever else is installed:
    # registering kfopt_cluster both as an entry point and as an extra plugin would be refused.
    os.environ["KFOPT_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    print(f"demo:mlp on digits, seed {args.seed}\n")
    print("| recipe | accuracy | accuracy_drop | compression_ratio | gzip KB | sparsity | seconds |")
    print("|---|---|---|---|---|---|---|")
    for index, recipe in enumerate(RECIPES):
        started = time.perf_counter()
        result = optimize(
            "demo:mlp",
            "digits",
            recipe,
            Path(args.out) / str(index),
            seed=args.seed,
            extra_plugins=[kfopt_cluster],
            tracking={"tracking": False},
        )
        c = result["candidates"][0]
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
