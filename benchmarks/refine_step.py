"""Where one refinement step's time goes, term by term, and what tracing and compiling it cost.

    python benchmarks/refine_step.py [--shape 90 75 83] [--spacing 2.0] [--repeats 20]

One Adam step of :mod:`tfmlreg.refinement` on one level: the control grid is prolongated to the
level grid, the moving image sampled at ``x + u(x)``, and ``NGF + α·curvature + folding``
evaluated, forward and backward, as one XLA function. The default grid is the finest level of
``benchmarks/register_time.py``'s pair (a 180×150×165 mm box refined at 2 mm). Random images and
fields: the time does not depend on the values. Prints, as XLA functions of the control grid
(forward and backward, median of ``--repeats``), each objective cumulatively (prolongation alone,
then + sampling, + NGF, + curvature, + folding: the whole objective), the project's own compiled
step, and the seconds to trace the step into a graph (Python) and to compile it (XLA), which a new
process pays once per level shape (the compile only with an empty persistent cache:
``tfmlreg.compilation_cache``).
"""

import argparse
import time

import numpy as np
import tensorflow as tf

from _timing import median_seconds
from tfmlreg import geometry, losses, refinement


def objectives(level, shape, config):
    """The step's objective built up term by term, with ``config``'s weights (the refinement's
    finest level): ``{name: f(total field) -> (B,)}``."""
    points = geometry.grid_points(shape, level["spacing"])

    def warped(total):
        return geometry.sample(level["moving"], points + total, level["moving_spacing"])

    def ngf(total):  # weighted as in the refinement: voxels mapped outside the moving scan leave
        seen = geometry.domain_weight(points + total, geometry.spatial_shape(level["moving"]),
                                      level["moving_spacing"])
        return losses.ngf(level["fixed"], warped(total), level["spacing"], config.epsilon, seen)

    def with_curvature(total):
        return ngf(total) + config.alpha * losses.curvature(total, level["spacing"])

    return {
        "prolongation": lambda total: tf.reduce_mean(tf.square(total), axis=(1, 2, 3, 4)),
        "+ sampling the moving image": lambda total: tf.reduce_mean(warped(total), axis=(1, 2, 3, 4)),
        "+ NGF": ngf,
        "+ curvature": with_curvature,
        "+ folding (the whole objective)": lambda total: (
            with_curvature(total) + config.folding * losses.folding(total, level["spacing"])),
    }


def gradient_function(objective, level, shape):
    @tf.function(jit_compile=True)
    def value_and_gradient(control):
        with tf.GradientTape() as tape:
            tape.watch(control)
            value = tf.reduce_sum(objective(level["offset"] + refinement.prolongate(control, shape)))
        return value, tape.gradient(value, control)

    return value_and_gradient


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(90, 75, 83))
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    shape = tuple(args.shape)
    config = refinement.RefineConfig()
    rng = np.random.default_rng(0)
    spacing = tf.constant([[args.spacing] * 3], tf.float32)
    level = {
        "fixed": tf.constant(rng.random((1, *shape, 1), np.float32)),
        "moving": tf.constant(rng.random((1, *shape, 1), np.float32)),
        "spacing": spacing, "moving_spacing": spacing,
        "offset": tf.constant(rng.normal(0, 2, (1, *shape, 3)).astype(np.float32)),
    }
    control = tf.constant(rng.normal(0, 1, (1, *refinement.control_shape(shape, config), 3))
                          .astype(np.float32))
    print(f"level grid {shape} ({np.prod(shape)} cells) at {args.spacing} mm, control grid "
          f"{tuple(control.shape[1:4])}; forward + backward, XLA, median of {args.repeats}:")
    for name, objective in objectives(level, shape, config).items():
        function = gradient_function(objective, level, shape)
        seconds = median_seconds(lambda f=function: f(control)[0].numpy(), args.repeats)
        print(f"  {name:34s} {1000 * seconds:6.1f} ms")

    step = tf.function(refinement._adam_step, jit_compile=True, autograph=False)  # a fresh trace
    constants = [tf.constant(x, tf.float32) for x in (config.learning_rate, config.alpha,
                                                      config.epsilon, config.folding)]
    state = (control, tf.zeros_like(control), tf.zeros_like(control), tf.constant(1.0))
    start = time.perf_counter()
    concrete = step.get_concrete_function(*state, *constants, level)
    traced = time.perf_counter() - start
    start = time.perf_counter()
    concrete(*state, *constants, level)[3].numpy()
    compiled = time.perf_counter() - start
    seconds = median_seconds(lambda: concrete(*state, *constants, level)[3].numpy(), args.repeats)
    print(f"  {'the refinement step (Adam update)':34s} {1000 * seconds:6.1f} ms")
    print(f"tracing the step into a graph: {traced:.2f} s; its first call (XLA compile): "
          f"{compiled:.2f} s")


if __name__ == "__main__":
    main()
