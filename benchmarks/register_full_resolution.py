"""`tfmlreg register` on a whole chest CT at its own voxel size: a pure shift, full resolution.

    python benchmarks/register_full_resolution.py [--ct ../shared/data/ct/lidc-idri-0001.nii.gz]
                                                  [--shift 6] [--axis 2] [--repeats 2]

The scan as stored (its own voxels, no crop: 512×512×133 at 0.70×0.70×2.5 mm for the default) is
the fixed image; the moving image is the same scan shifted by ``--shift`` mm along canonical
array axis ``--axis`` (``moving(x) = fixed(x + s)``, air where it comes from beyond the scan), so
the true field is ``u = -s``: the refinement issue's case at the resolution a scanner writes. Runs
the command as installed (JAX hidden, as ``register_time.py``) with its defaults, ``--repeats``
times (the first with an empty XLA cache), and prints per run the wall time, the parts of
``metrics.json``, the mean ``|u - u_true|`` in the body (:func:`tfmlreg.data.synthetic.
body_and_lung_masks`) read back from the written ITK field, and the largest resident memory
of the runs so far (``ru_maxrss`` of the child processes).
"""

import argparse
import os
import resource
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from register_time import time_register  # noqa: E402  (one way to run the command)


def shifted_pair(path, shift_mm, axis, folder):
    """Write ``fixed.nii.gz`` (the scan, canonical) and ``moving.nii.gz`` (shifted); returns
    ``(fixed array, spacing, u_true (3,))``."""
    from tfmlreg import geometry
    from tfmlreg.ct import AIR_HU
    from tfmlreg.data import io

    volume = io.read_volume(path)
    offset = np.zeros(3)
    offset[axis] = shift_mm
    moving = geometry.sample_axes(volume.array[..., None].astype(np.float32),
                                  geometry.axis_centres(volume.array.shape, volume.spacing, offset),
                                  volume.spacing, AIR_HU)[..., 0]
    io.write_image(os.path.join(folder, "fixed.nii.gz"), volume.array, volume.spacing, volume.affine)
    io.write_image(os.path.join(folder, "moving.nii.gz"), moving, volume.spacing, volume.affine)
    return np.asarray(volume.array, np.float32), volume.spacing, -offset


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", default=os.path.join("..", "shared", "data", "ct",
                                                     "lidc-idri-0001.nii.gz"))
    parser.add_argument("--shift", type=float, default=6.0)
    parser.add_argument("--axis", type=int, choices=(0, 1, 2), default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default=os.path.join("tfmlreg", "models", "chest_ct"))
    args = parser.parse_args()

    from tfmlreg.commands import PART_TIMES
    from tfmlreg.data import io, synthetic

    with tempfile.TemporaryDirectory() as folder:
        fixed, spacing, u_true = shifted_pair(args.ct, args.shift, args.axis, folder)
        body, _ = synthetic.body_and_lung_masks(fixed, spacing)
        print(f"pair: {args.ct}, {fixed.shape} voxels of {np.round(spacing, 3).tolist()} mm, "
              f"shifted {args.shift} mm along axis {args.axis}; body {body.mean():.0%} of the grid")
        for run in range(args.repeats):
            seconds, registered, field = time_register(folder, args.model, run)
            u = io.read_displacement(field)[0]
            error = float(np.linalg.norm(u[body] - u_true, axis=-1).mean())
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
            parts = ", ".join(f"{key.removeprefix('seconds_')} {registered[key]:.1f} s"
                              for key in PART_TIMES)
            print(f"run {run}{' (empty XLA cache)' if run == 0 else ''}: tfmlreg register "
                  f"{seconds:.1f} s ({parts}); body error {error:.2f} mm; peak memory so far "
                  f"{peak:.1f} GB", flush=True)


if __name__ == "__main__":
    main()
