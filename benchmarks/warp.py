"""Time one trilinear warp of a 160³ image by a 160³ field, as a graph and under XLA.

    python benchmarks/warp.py [--size 160] [--repeats 5]
"""

import argparse

import numpy as np
import tensorflow as tf

import tfmlreg
from _timing import median_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n = args.size
    rng = np.random.default_rng(0)
    image = tf.constant(rng.random((1, n, n, n, 1), np.float32))
    displacement = tf.constant(rng.uniform(-5, 5, (1, n, n, n, 3)).astype(np.float32))
    for jit in (False, True):
        warp = tf.function(lambda i, u: tfmlreg.warp(i, u, 1.0), jit_compile=jit)
        seconds = median_seconds(lambda: warp(image, displacement).numpy(), args.repeats)
        print(f"warp {n}^3 {'XLA  ' if jit else 'graph'}: {seconds:.3f} s (median of {args.repeats})")


if __name__ == "__main__":
    main()
