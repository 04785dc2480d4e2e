"""Time one trilinear warp of a 160³ image by a 160³ field: plain graph, the model's way (an
XLA-compiled function inside a graph, :mod:`tfmlreg.layers`), and the whole function under XLA.

    python benchmarks/warp.py [--size 160] [--repeats 5]
"""

import argparse

import numpy as np
import tensorflow as tf

import tfmlreg
from _timing import median_seconds
from tfmlreg import layers


def _traced(function):
    # a closure, not a default argument: tf.function would take the function as an input
    return lambda image, displacement: function(image, displacement, 1.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n = args.size
    rng = np.random.default_rng(0)
    image = tf.constant(rng.random((1, n, n, n, 1), np.float32))
    displacement = tf.constant(rng.uniform(-5, 5, (1, n, n, n, 3)).astype(np.float32))
    modes = {
        "graph (plain ops)": (tfmlreg.warp, False),
        "graph + compiled geometry (the model)": (layers.warp, False),
        "XLA (whole function)": (tfmlreg.warp, True),
    }
    for name, (function, jit) in modes.items():
        warp = tf.function(_traced(function), jit_compile=jit)
        seconds = median_seconds(lambda: warp(image, displacement).numpy(), args.repeats)
        print(f"warp {n}^3 {name:38s}: {seconds:.3f} s (median of {args.repeats})")


if __name__ == "__main__":
    main()
