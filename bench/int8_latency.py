"""Benchmark: is int8 faster than fp32 TFLite on MobileNetV2? By delegate, thread count and block.

MobileNetV2 (alpha 0.35, 32x32, random init: no download) converted to fp32 and
full-integer int8 TFLite, each pair timed interleaved in one process
(:func:`kfopt.evaluate.compare_latency`, batch 1):

1. the whole model with TFLite's default XNNPACK delegate and without it, on 1 and 2 threads;
2. which operators the XNNPACK delegate takes (one DELEGATE node means all of them);
3. a per-block profile: every prefix of the network (input to the end of block k) timed
   int8 against fp32, and the differences between consecutive prefixes (the Python
   interpreter has no op profiler and TFLite's benchmark_model is not installed here).

Usage: .venv/bin/python bench/int8_latency.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections import Counter

import numpy as np
from rich.console import Console
from rich.table import Table

from kfopt import _tf
from kfopt.convert import to_tflite
from kfopt.evaluate import compare_latency


class Interpreted:
    """A TFLite model in an interpreter with a chosen op resolver and thread count, ready to time."""

    def __init__(self, content: bytes, threads: int, xnnpack: bool):
        tf = _tf.tf()
        resolver = tf.lite.experimental.OpResolverType
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.interpreter = tf.lite.Interpreter(
                model_content=content,
                num_threads=threads,
                experimental_op_resolver_type=resolver.AUTO if xnnpack else resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
            )
        self.interpreter.allocate_tensors()

    def prepared(self, sample: np.ndarray):
        detail = self.interpreter.get_input_details()[0]
        if detail["dtype"] == np.int8:
            scale, zero = detail["quantization"]
            sample = np.clip(np.round(sample / scale + zero), -128, 127).astype(np.int8)
        self.interpreter.set_tensor(detail["index"], sample)
        return self.interpreter.invoke

    def ops(self) -> Counter:
        return Counter(op["op_name"] for op in self.interpreter._get_ops_details())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time cap per comparison")
    args = parser.parse_args()
    keras = _tf.keras()
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10)
    x = np.random.default_rng(0).normal(size=(32, 32, 32, 3)).astype(np.float32)

    def representative():
        for row in x:
            yield [row[None]]

    def pair(keras_model) -> tuple[bytes, bytes]:
        return to_tflite(keras_model, "fp32"), to_tflite(keras_model, "int8", representative)

    console = Console(width=max(Console().width, 130))
    fp32, int8 = pair(model)
    table = Table(title="MobileNetV2 0.35 32x32, batch 1: int8 against fp32 TFLite, timed interleaved")
    for column in ("delegate", "threads", "fp32 p50 ms", "int8 p50 ms", "int8 speedup [95% interval]", "pairs"):
        table.add_column(column, justify="right")
    for xnnpack in (True, False):
        for threads in (1, 2):
            t = compare_latency(
                Interpreted(int8, threads, xnnpack),
                Interpreted(fp32, threads, xnnpack),
                x[:1],
                max_seconds=args.seconds,
            )
            table.add_row(
                "XNNPACK (default)" if xnnpack else "builtin kernels",
                str(threads),
                f"{t.baseline_p50_ms:.4f}",
                f"{t.p50_ms:.4f}",
                f"{t.speedup:.2f}x [{t.speedup_low:.2f}, {t.speedup_high:.2f}]",
                str(t.pairs),
            )
    console.print(table)
    for name, content in (("fp32", fp32), ("int8", int8)):
        console.print(f"{name} operators after XNNPACK took its share: {dict(Interpreted(content, 1, True).ops())}")

    names = {layer.name for layer in model.layers}
    cuts = ["Conv1_relu", "expanded_conv_project_BN"]
    cuts += [f"block_{i}_add" if f"block_{i}_add" in names else f"block_{i}_project_BN" for i in range(1, 17)]
    cuts += ["out_relu", "predictions"]
    profile = Table(title="Per block (XNNPACK, 1 thread): prefixes timed interleaved, segments by difference of p50")
    for column in ("prefix ends at", "fp32 ms", "int8 ms", "segment fp32 ms", "segment int8 ms", "segment int8 gain"):
        profile.add_column(column, justify="left" if column == "prefix ends at" else "right")
    before = (0.0, 0.0)
    for cut in cuts:
        fp32_part, int8_part = pair(keras.Model(model.input, model.get_layer(cut).output))
        t = compare_latency(
            Interpreted(int8_part, 1, True), Interpreted(fp32_part, 1, True), x[:1], max_seconds=args.seconds
        )
        segment = (t.baseline_p50_ms - before[0], t.p50_ms - before[1])
        # Consecutive prefixes are separate comparisons: under load a tiny segment can come out negative.
        gain = f"{segment[0] / segment[1]:.1f}x" if min(segment) > 0 else "-"
        profile.add_row(
            cut, f"{t.baseline_p50_ms:.4f}", f"{t.p50_ms:.4f}", f"{segment[0]:.4f}", f"{segment[1]:.4f}", gain
        )
        before = (t.baseline_p50_ms, t.p50_ms)
    console.print(profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
