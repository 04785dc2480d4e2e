"""The whole ``tfmlreg register`` command against elastix B-spline on one real chest-CT pair.

    python benchmarks/register_time.py [--ct ../shared/data/ct/lung-pet-ct-dx-a0001.nii.gz]
                                       [--spacing 1.5] [--size 120 100 110] [--repeats 2]
                                       [--direction exhale]
                                       [--model tfmlreg/models/chest_ct]

The CT is resampled to ``--spacing`` mm and a box of ``--size`` voxels around the centre of its
lungs is cut out; a 25 mm synthetic breathing pair of it (``--direction``: the moving image
exhaled or inhaled; the box cuts through the lungs) is written as NIfTI. Then, in
turn and ``--repeats`` times: ``tfmlreg register`` as a user runs it (a new process, TensorFlow
start-up, reading, network, refinement, writing every output; JAX hidden, as a user install has
none: see :func:`tensorflow_start_up`), and elastix B-spline in this
process on the same arrays (its wall time, reading excluded). The command's persistent XLA cache
(``tfmlreg.compilation_cache``) starts empty in a temporary folder: run 0 compiles every step,
later runs load them (so would any pair of the same grid shapes). Prints each wall time,
the network's and the refinement's own seconds (from ``metrics.json``), the medians over the
runs after the first, where the command's time goes (the parts ``metrics.json`` records:
:data:`tfmlreg.commands.PART_TIMES`; the rest is start-up and reading), and what a bare
``python -c "import tensorflow"`` takes here (with and without JAX importable: see
:func:`tensorflow_start_up`).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def lung_box(path, spacing, size):
    """``(image, spacing)``: the CT at ``spacing`` mm, the ``size`` box around its lungs' centre."""
    from tfmlreg.data import synthetic

    scan = synthetic.load_scan(path, spacing)
    _, lungs = synthetic.body_and_lung_masks(scan["image"], scan["spacing"])
    centre = np.argwhere(lungs).mean(0).round().astype(int)
    size = np.minimum(size, scan["image"].shape)
    low = np.clip(centre - size // 2, 0, np.asarray(scan["image"].shape) - size)
    box = tuple(slice(a, a + n) for a, n in zip(low, size))
    return np.ascontiguousarray(scan["image"][box]), scan["spacing"]


def write_pair(image, spacing, folder, direction="exhale"):
    import nibabel as nib

    from tfmlreg.data import synthetic

    pair = synthetic.make_pair(image, spacing, seed=0, amplitude_mm=25.0, direction=direction)
    affine = np.diag([*spacing, 1.0])
    for side in ("fixed", "moving"):
        nib.save(nib.Nifti1Image(pair[side].astype(np.float32), affine),
                 os.path.join(folder, f"{side}.nii.gz"))
    return pair


# Makes `import jax` fail at once, as it does in a user install: this project's test environment
# has JAX (tests/test_jax_backend.py), and TensorFlow's import loads it there (~1 s here).
HIDE_JAX = "import sys; sys.modules['jax'] = None; "
AS_INSTALLED = HIDE_JAX + "from tfmlreg.cli import main; sys.exit(main(sys.argv[1:]))"


def time_register(folder, model, run, options=()):
    out = os.path.join(folder, f"out{run}")
    command = [sys.executable, "-c", AS_INSTALLED, "register", "--fixed",
               os.path.join(folder, "fixed.nii.gz"), "--moving", os.path.join(folder, "moving.nii.gz"),
               "--out", out, "--model", model, *options]
    environ = dict(os.environ, TFMLREG_XLA_CACHE=os.path.join(folder, "xla"))
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=environ)
    seconds = time.perf_counter() - start
    with open(os.path.join(out, "metrics.json")) as handle:
        metrics = json.load(handle)
    return seconds, metrics["registered"], os.path.join(out, "displacement.nii.gz")


def tensorflow_start_up(hide_jax=False):
    """Wall seconds of a new Python process that imports TensorFlow and exits. TensorFlow's
    import tries ``import jax`` (its TF Lite converter) and pays for it where JAX is installed,
    as in this project's test environment (tests/test_jax_backend.py) but not a user install:
    ``hide_jax`` makes that import fail at once, as it does without JAX."""
    code = (HIDE_JAX if hide_jax else "") + "import tensorflow"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - start


def tre(pair, field):
    """Mean landmark error (mm) of a displacement array or of the written ITK field file."""
    from tfmlreg import evaluation

    if isinstance(field, str):
        from tfmlreg.data import io

        field = io.read_displacement(field)[0]
    return evaluation.evaluate_displacement(pair, field)["tre_mean"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", default=os.path.join("..", "shared", "data", "ct",
                                                     "lung-pet-ct-dx-a0001.nii.gz"))
    parser.add_argument("--spacing", type=float, default=1.5)
    parser.add_argument("--size", type=int, nargs=3, default=(120, 100, 110))
    parser.add_argument("--direction", choices=("exhale", "inhale"), default="exhale")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--options", default="",
                        help='more `tfmlreg register` options, e.g. "--refine-spacing 2"')
    parser.add_argument("--model", default=os.path.join("tfmlreg", "models", "chest_ct"))
    args = parser.parse_args()

    from tfmlreg.baselines import elastix_register
    from tfmlreg.commands import PART_TIMES

    image, spacing = lung_box(args.ct, args.spacing, np.asarray(args.size))
    print(f"pair: {args.ct} at {args.spacing} mm, {image.shape} voxels")
    register, elastix = [], []
    parts: dict[str, list[float]] = {key: [] for key in PART_TIMES}
    network, refinement = parts["seconds_network"], parts["seconds_refinement"]
    with tempfile.TemporaryDirectory() as folder:
        pair = write_pair(image, spacing, folder, args.direction)
        for run in range(args.repeats):
            seconds, registered, field = time_register(folder, args.model, run,
                                                       args.options.split())
            register.append(seconds)
            for key, values in parts.items():
                values.append(registered.get(key, float("nan")))
            result = elastix_register(pair["fixed"], pair["moving"], spacing)
            elastix.append(result["seconds"])
            print(f"run {run}{' (empty XLA cache)' if run == 0 else ''}: tfmlreg register "
                  f"{seconds:.1f} s (network {network[-1]:.1f} s, refinement {refinement[-1]:.1f} s, "
                  f"TRE {tre(pair, field):.2f} mm), elastix {result['seconds']:.1f} s "
                  f"(TRE {tre(pair, result['displacement']):.2f} mm)", flush=True)
    warm = slice(1, None) if args.repeats > 1 else slice(None)
    median = {name: float(np.median(values[warm])) for name, values in
              [("register", register), ("network", network), ("refinement", refinement)]}
    median_elastix = float(np.median(elastix))
    print(f"median{' of runs 1-' + str(args.repeats - 1) if args.repeats > 1 else ''}: tfmlreg "
          f"register {median['register']:.1f} s (network {median['network']:.1f} s, refinement "
          f"{median['refinement']:.1f} s), elastix {median_elastix:.1f} s (all runs); ratio "
          f"{median['register'] / median_elastix:.2f}; empty-cache run 0: {register[0]:.1f} s, "
          f"ratio {register[0] / median_elastix:.2f}")
    print(breakdown(register[warm], {key: values[warm] for key, values in parts.items()}))
    print(f"a bare `python -c \"import tensorflow\"`: {tensorflow_start_up():.1f} s "
          f"({tensorflow_start_up(hide_jax=True):.1f} s without JAX importable)")


def breakdown(walls, parts):
    """One line: the median of each part of the command's time and of the rest (start-up,
    reading), over the runs of ``walls`` (seconds) and ``parts`` ({name: seconds per run})."""
    rest = np.asarray(walls) - np.sum(list(parts.values()), axis=0)
    items = [(name.removeprefix("seconds_"), values) for name, values in parts.items()]
    items.append(("start-up and reading (the rest)", rest))
    return "where the time goes (medians of the same runs): " + ", ".join(
        f"{name} {np.median(values):.1f} s" for name, values in items)


if __name__ == "__main__":
    main()
