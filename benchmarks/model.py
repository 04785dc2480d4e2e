"""Inference time and peak memory of the 3-level model, and the time of one training step.

    python benchmarks/model.py [--inference 96 160] [--train 64 96] [--repeats 3] [--xla]
                               [--policy mixed_bfloat16]

Each configuration runs in its own process, which reports its own peak resident memory
(ru_maxrss). Untrained weights: the speed does not depend on them.
"""

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys
import numpy as np, tensorflow as tf, keras
sys.path.insert(0, "benchmarks")
from _timing import median_seconds
from tfmlreg.model import MultilevelRegistration
mode, n, repeats, xla, filters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5])
keras.mixed_precision.set_global_policy(sys.argv[6])
rng = np.random.default_rng(0)
batch = {"fixed": rng.uniform(-1000, 0, (1, n, n, n, 1)).astype("float32"),
         "moving": rng.uniform(-1000, 0, (1, n, n, n, 1)).astype("float32"),
         "spacing": np.full((1, 3), 320.0 / n, "float32")}
model = MultilevelRegistration((n, n, n), levels=3, base_filters=filters)
if mode == "inference":
    predict = tf.function(lambda x: model(x, training=False)["displacement"], jit_compile=xla)
    seconds = median_seconds(lambda: predict(batch).numpy(), repeats)
else:
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=xla)
    data = tf.data.Dataset.from_tensors({k: v[0] for k, v in batch.items()}).repeat().batch(1)
    iterator = iter(data)
    step = lambda: model.train_on_batch(next(iterator))
    seconds = median_seconds(step, repeats)
import resource
print(json.dumps({"seconds": seconds, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def run(mode, size, repeats, xla, filters, policy):
    result = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(size), str(repeats), "1" if xla else "0", str(filters),
         policy],
        capture_output=True, text=True, check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report["seconds"], report["peak_kib"] / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inference", type=int, nargs="*", default=[96, 160])
    parser.add_argument("--train", type=int, nargs="*", default=[64, 96])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--base-filters", type=int, default=16)
    parser.add_argument("--xla", action="store_true", help="compile with XLA (jit_compile=True)")
    parser.add_argument("--policy", default="float32",
                        help="Keras dtype policy, e.g. mixed_bfloat16 (CPU) or mixed_float16 (GPU)")
    args = parser.parse_args()
    print(f"3-level model, base_filters={args.base_filters}, XLA={'on' if args.xla else 'off'}, "
          f"policy={args.policy}, median of {args.repeats}")
    for mode, sizes in (("inference", args.inference), ("train step", args.train)):
        for size in sizes:
            seconds, peak = run(mode.split()[0] if mode == "inference" else "train", size,
                                args.repeats, args.xla, args.base_filters, args.policy)
            print(f"{mode:10s} {size}^3: {seconds:7.3f} s   peak RSS {peak:5.2f} GiB")


if __name__ == "__main__":
    main()
