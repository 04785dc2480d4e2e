"""Where the refinement's error in the body lies on one real-CT case, and what a body mask changes.

    python benchmarks/body_error.py [--ct ../shared/data/ct/lidc-idri-0001.nii.gz]
        [--case shift|exhale|inhale] [--axis 1] [--shift -6] [--spacing 2.5] [--body-mask-mm 5]

A case of ``benchmarks/real_ct.py`` (the CT at ``--spacing`` mm cropped to its body, the same
seeds): its content moved by ``--shift`` mm along array ``--axis``, or 25 mm synthetic breathing.
Refined from zero with the defaults; prints the landmark TRE, the mean error ``|u - u_true|``
(mm) in the body, by depth below the body surface and by 25 mm bands along ``--axis``; then the
same with the similarity weighted by the fixed body mask dilated by ``--body-mask-mm`` (0: no
second run).
"""

import argparse
import os
import sys

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from real_ct import DIRECTIONS, scan_cases  # noqa: E402  (the benchmark's own cases)

AMPLITUDE_MM = 25.0
BAND_MM = 25.0
DEPTHS_MM = (0.0, 5.0, 10.0, 20.0, 40.0, np.inf)


def make_case(path, spacing, case, axis, shift):
    """The pair of ``benchmarks/real_ct.py`` for ``case`` (its own case maker and seeds)."""
    wanted = case if case != "shift" else f"shift{'+' if shift > 0 else '-'}{axis}"
    for _, pair in scan_cases(path, spacing, AMPLITUDE_MM, abs(shift)):
        if pair["name"].endswith("-" + wanted):
            return pair
    raise ValueError(f"no case {wanted} for {path}")


def report(label, tre, error, body, spacing, axis):
    print(f"{label}: TRE {tre:.3f} mm, body error {error[body].mean():.2f} mm")
    depth = ndimage.distance_transform_edt(body, sampling=spacing)
    for low, high in zip(DEPTHS_MM[:-1], DEPTHS_MM[1:]):
        inside = body & (depth >= low) & (depth < high)
        print(f"  depth {low:4.0f}-{high:<4.0f} mm: {error[inside].mean():6.2f} mm over "
              f"{inside.mean() / body.mean():5.1%} of the body")
    band = (np.indices(body.shape)[axis] + 0.5) * spacing[axis] // BAND_MM
    means = [error[body & (band == k)].mean() for k in range(int(band.max()) + 1)
             if np.any(body & (band == k))]
    print(f"  by {BAND_MM:g} mm bands along axis {axis}: " + " ".join(f"{m:.2f}" for m in means))


def main():
    from tfmlreg import evaluation, refinement
    from tfmlreg.data import synthetic

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ct", default=os.path.join("..", "shared", "data", "ct",
                                                     "lidc-idri-0001.nii.gz"))
    parser.add_argument("--case", choices=("shift",) + DIRECTIONS, default="shift")
    parser.add_argument("--axis", type=int, choices=(0, 1, 2), default=1)
    parser.add_argument("--shift", type=float, default=-6.0)
    parser.add_argument("--spacing", type=float, default=2.5)
    parser.add_argument("--body-mask-mm", type=float, default=5.0)
    args = parser.parse_args()
    pair = make_case(args.ct, args.spacing, args.case, args.axis, args.shift)
    spacing = np.asarray(pair["spacing_fixed"], np.float64)
    body, _ = synthetic.body_and_lung_masks(pair["fixed"], spacing)
    masks = {"defaults": None}
    if args.body_mask_mm > 0:
        outside = ndimage.distance_transform_edt(~body, sampling=spacing)
        masks[f"body mask + {args.body_mask_mm:g} mm"] = outside <= args.body_mask_mm
    print(f"{pair['name']}: grid {'×'.join(map(str, body.shape))} at {args.spacing} mm")
    for label, mask in masks.items():
        result = refinement.refine(pair["fixed"], pair["moving"], spacing, mask=mask)
        error = np.linalg.norm(result["displacement"] - pair["displacement"], axis=-1)
        tre = evaluation.evaluate_displacement(pair, result["displacement"])["tre_mean"]
        report(label, tre, error, body, spacing, args.axis)
        worst = np.abs(result["displacement"] - pair["displacement"])[body].max(axis=0)
        print("  largest error per component in the body (mm): "
              + " ".join(f"{w:.1f}" for w in worst))


if __name__ == "__main__":
    main()
