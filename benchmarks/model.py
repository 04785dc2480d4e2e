"""Inference time and peak memory of the 3-level model, and the time of one training step.

    python benchmarks/model.py [--inference 96 160] [--train 64 96] [--repeats 3]
                               [--precision float32|bfloat16|float16] [--unfolded]
                               [--plain-geometry] [--xla]

Inference runs the model as ``tfmlreg`` does (:meth:`MultilevelRegistration.for_inference`:
batch normalisation folded, the U-Nets in ``--precision``, the geometry XLA-compiled inside the
graph); ``--unfolded`` and ``--plain-geometry`` turn those off, ``--xla`` compiles the whole
model. A training step in ``bfloat16`` / ``float16`` uses Keras's ``mixed_*`` policy.

Each configuration runs in its own process, which reports its own peak resident memory
(ru_maxrss). Untrained weights: the speed does not depend on them.
"""

import argparse
import json
import subprocess
import sys

CHILD = r"""
import contextlib, json, resource, sys
import numpy as np, tensorflow as tf, keras
sys.path.insert(0, "benchmarks")
from _timing import median_seconds
from tfmlreg import layers
from tfmlreg.model import PRECISIONS, MultilevelRegistration
c = json.loads(sys.argv[1])
if c["threads"]:
    tf.config.threading.set_intra_op_parallelism_threads(c["threads"])
n = c["size"]
rng = np.random.default_rng(0)
batch = {"fixed": rng.uniform(-1000, 0, (1, n, n, n, 1)).astype("float32"),
         "moving": rng.uniform(-1000, 0, (1, n, n, n, 1)).astype("float32"),
         "spacing": np.full((1, 3), 320.0 / n, "float32")}
geometry = layers.plain_geometry() if c["plain_geometry"] else contextlib.nullcontext()
with geometry:
    if c["mode"] == "inference":
        model = MultilevelRegistration((n, n, n), levels=3, base_filters=c["filters"])
        if c["fold"]:
            model = model.for_inference(c["precision"])
        elif c["precision"] != "float32":
            keras.mixed_precision.set_global_policy(PRECISIONS[c["precision"]])
            model = MultilevelRegistration((n, n, n), levels=3, base_filters=c["filters"])
        predict = tf.function(lambda x: model(x, training=False)["displacement"],
                              jit_compile=c["xla"])
        seconds = median_seconds(lambda: predict(batch).numpy(), c["repeats"])
    else:
        keras.mixed_precision.set_global_policy(PRECISIONS[c["precision"]])
        model = MultilevelRegistration((n, n, n), levels=3, base_filters=c["filters"])
        model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=c["xla"])
        data = tf.data.Dataset.from_tensors({k: v[0] for k, v in batch.items()}).repeat().batch(1)
        iterator = iter(data)
        seconds = median_seconds(lambda: model.train_on_batch(next(iterator)), c["repeats"])
print(json.dumps({"seconds": seconds, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def run(mode, size, repeats=3, precision="float32", filters=16, fold=True, plain_geometry=False,
        xla=False, threads=0):
    """``(median seconds, peak RSS GiB)`` of one configuration, measured in a fresh process
    (``threads``: TensorFlow's intra-op threads, 0 for its default, one per core)."""
    config = {"mode": mode, "size": size, "repeats": repeats, "precision": precision,
              "filters": filters, "fold": fold, "plain_geometry": plain_geometry, "xla": xla,
              "threads": threads}
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{mode} {size}^3 {precision}: child failed: {result.stderr[-2000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report["seconds"], report["peak_kib"] / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inference", type=int, nargs="*", default=[96, 160])
    parser.add_argument("--train", type=int, nargs="*", default=[64, 96])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base-filters", type=int, default=16)
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the U-Nets' precision (float16 needs a GPU: TF's CPU AvgPool3D has none)")
    parser.add_argument("--unfolded", action="store_true", help="keep batch normalisation unfolded")
    parser.add_argument("--plain-geometry", action="store_true",
                        help="geometry as plain graph ops (not XLA-compiled)")
    parser.add_argument("--xla", action="store_true", help="compile the whole model with XLA")
    args = parser.parse_args()
    print(f"3-level model, base_filters={args.base_filters}, precision={args.precision}, "
          f"batch norm {'unfolded' if args.unfolded else 'folded'}, geometry "
          f"{'plain' if args.plain_geometry else 'XLA-compiled'}, whole-model XLA "
          f"{'on' if args.xla else 'off'}, median of {args.repeats}")
    for mode, sizes in (("inference", args.inference), ("train", args.train)):
        for size in sizes:
            seconds, peak = run(mode, size, args.repeats, args.precision, args.base_filters,
                                not args.unfolded, args.plain_geometry, args.xla)
            print(f"{mode:10s} {size}^3: {seconds:7.3f} s   peak RSS {peak:5.2f} GiB")


if __name__ == "__main__":
    main()
