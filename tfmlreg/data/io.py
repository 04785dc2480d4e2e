"""Reading and writing images, label maps, displacements and landmarks (DESIGN.md section 2).

Formats:

* NIfTI (``.nii``/``.nii.gz``) through nibabel: arrays keep the file's array order; the spacing
  is the length of the affine's columns. Written files get the affine ``diag(spacing)``.
  Displacements are written as NIfTI vector images ``(D, H, W, 1, 3)`` (intent "vector") in mm
  along the array axes.
* DIR-LAB 4DCT ``.img``: header-less int16 little-endian, x fastest, values HU + 1024; case 1–10
  sizes and spacings are built in. Read as ``(z, y, x)`` in C order and transposed to array axes
  ``(x, y, z)``.
* Landmarks: DIR-LAB text, one point a row, tab-separated **1-based** voxel indices ``x y z``; in mm
  ``(i - 1 + 0.5) * h``. Real DIR-LAB files hold integers; the phantom writes fractional indices
  (exact positions), which this reader accepts too.

Pair folders (what ``tfmlreg train`` and ``tfmlreg evaluate`` read)::

    DIR/<case>/fixed.nii.gz            required: the fixed image (exhale), HU
    DIR/<case>/moving.nii.gz           required: the moving image (inhale), HU
    DIR/<case>/fixed_labels.nii.gz     optional: label map on the fixed grid (lobes 1..5)
    DIR/<case>/moving_labels.nii.gz    optional: label map on the moving grid
    DIR/<case>/fixed_landmarks.txt     optional: DIR-LAB landmarks of the fixed image
    DIR/<case>/moving_landmarks.txt    optional: the corresponding moving landmarks
    DIR/<case>/displacement.nii.gz     optional: ground-truth displacement (phantoms)

Every read error is a :class:`DataError` whose one-line message names the file.
"""

import os

import nibabel as nib
import numpy as np

DIRLAB_SLICE_MM = 2.5
DIRLAB_CASES = {  # case: ((x, y, z) voxels, in-plane spacing mm)
    1: ((256, 256, 94), 0.97), 2: ((256, 256, 112), 1.16), 3: ((256, 256, 104), 1.15),
    4: ((256, 256, 99), 1.13), 5: ((256, 256, 106), 1.10), 6: ((512, 512, 128), 0.97),
    7: ((512, 512, 136), 0.97), 8: ((512, 512, 128), 0.97), 9: ((512, 512, 128), 0.97),
    10: ((512, 512, 120), 0.97),
}
DIRLAB_OFFSET = 1024  # stored value = HU + 1024
PAIR_FILES = {
    "fixed": "fixed.nii.gz", "moving": "moving.nii.gz",
    "fixed_labels": "fixed_labels.nii.gz", "moving_labels": "moving_labels.nii.gz",
    "fixed_landmarks": "fixed_landmarks.txt", "moving_landmarks": "moving_landmarks.txt",
    "displacement": "displacement.nii.gz",
}


class DataError(ValueError):
    """Unreadable or invalid input; the message is one line and names the file or argument."""


# --- checks -----------------------------------------------------------------------------------


def _exists(path):
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")


def check_volume(array, name):
    """A finite 3-D float32 array (a trailing channel of 1 is dropped), else DataError."""
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise DataError(f"{name}: expected a 3-D image, got shape {array.shape}")
    if min(array.shape) < 1:
        raise DataError(f"{name}: empty image, shape {array.shape}")
    array = array.astype(np.float32, copy=False)
    if not np.all(np.isfinite(array)):
        raise DataError(f"{name}: contains NaN or infinite values")
    return array


def check_spacing(spacing, name):
    spacing = np.asarray(spacing, np.float64).reshape(-1)
    if spacing.size == 1:
        spacing = np.repeat(spacing, 3)
    if spacing.size != 3 or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise DataError(f"{name}: spacing must be 3 positive finite values in mm, got {spacing.tolist()}")
    return spacing.astype(np.float32)


# --- NIfTI ------------------------------------------------------------------------------------


def _load_nifti(path):
    _exists(path)
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises many types for corrupt files
        raise DataError(f"{path}: cannot read as NIfTI ({type(error).__name__}: {error})".splitlines()[0]) from None
    spacing = check_spacing(np.linalg.norm(image.affine[:3, :3], axis=0), path)
    return data, spacing, image.affine


def read_image(path):
    """``(image float32 (D, H, W), spacing (3,) mm, affine)`` of a NIfTI file."""
    data, spacing, affine = _load_nifti(path)
    return check_volume(data, path), spacing, affine


def read_labels(path):
    """``(labels int32 (D, H, W), spacing, affine)``; labels must be non-negative integers."""
    data, spacing, affine = _load_nifti(path)
    data = check_volume(data, path)
    labels = np.rint(data)
    if np.any(labels < 0) or np.any(np.abs(labels - data) > 1e-3):
        raise DataError(f"{path}: a label map must hold non-negative integers")
    return labels.astype(np.int32), spacing, affine


def _affine(spacing):
    return np.diag(list(check_spacing(spacing, "spacing").astype(np.float64)) + [1.0])


def write_image(path, image, spacing):
    nib.save(nib.Nifti1Image(np.asarray(image, np.float32), _affine(spacing)), path)


def write_labels(path, labels, spacing):
    nib.save(nib.Nifti1Image(np.asarray(labels, np.int16), _affine(spacing)), path)


def write_displacement(path, displacement, spacing):
    """A ``(D, H, W, 3)`` field in mm as a NIfTI vector image ``(D, H, W, 1, 3)``."""
    field = np.asarray(displacement, np.float32)[:, :, :, None, :]
    image = nib.Nifti1Image(field, _affine(spacing))
    image.header.set_intent("vector")
    nib.save(image, path)


def read_displacement(path):
    """``(displacement (D, H, W, 3) mm, spacing)`` from :func:`write_displacement`'s layout."""
    data, spacing, _ = _load_nifti(path)
    data = np.asarray(data, np.float32)
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0]
    if data.ndim != 4 or data.shape[-1] != 3:
        raise DataError(f"{path}: expected a (D, H, W, 1, 3) displacement, got {data.shape}")
    return data, spacing


# --- DIR-LAB ----------------------------------------------------------------------------------


def dirlab_geometry(case):
    """``((x, y, z) voxels, spacing (3,) mm)`` of DIR-LAB case 1–10."""
    if case not in DIRLAB_CASES:
        raise DataError(f"--dirlab-case: expected 1-10, got {case}")
    size, in_plane = DIRLAB_CASES[case]
    return size, np.array([in_plane, in_plane, DIRLAB_SLICE_MM], np.float32)


def read_dirlab_image(path, case):
    """``(HU float32 (x, y, z), spacing (3,) mm)`` of a DIR-LAB case's ``.img`` file."""
    _exists(path)
    size, spacing = dirlab_geometry(case)
    expected = int(np.prod(size)) * 2
    actual = os.path.getsize(path)
    if actual != expected:
        raise DataError(f"{path}: {actual} bytes, but DIR-LAB case {case} ({size[0]}x{size[1]}x{size[2]} int16) has {expected}")
    stored = np.fromfile(path, dtype="<i2").reshape(size[::-1])  # (z, y, x), x fastest
    return np.transpose(stored, (2, 1, 0)).astype(np.float32) - DIRLAB_OFFSET, spacing


def write_dirlab_image(path, hu):
    """Write ``(x, y, z)`` HU in the DIR-LAB layout (int16 LE, x fastest, HU + 1024)."""
    stored = np.rint(np.asarray(hu, np.float64) + DIRLAB_OFFSET).astype("<i2")
    np.transpose(stored, (2, 1, 0)).tofile(path)


def read_landmarks(path, spacing):
    """``(N, 3)`` landmark positions in mm from a DIR-LAB file of 1-based voxel indices."""
    _exists(path)
    try:
        indices = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as error:
        raise DataError(f"{path}: not a landmark file of numbers ({error})".splitlines()[0]) from None
    if indices.shape[0] == 0 or indices.shape[1] != 3 or not np.all(np.isfinite(indices)):
        raise DataError(f"{path}: expected rows of 3 voxel indices x y z, got shape {indices.shape}")
    spacing = check_spacing(spacing, path)
    return ((indices - 1.0 + 0.5) * spacing).astype(np.float32)


def write_landmarks(path, points_mm, spacing, decimals=3):
    """Write mm positions as DIR-LAB 1-based voxel indices (``decimals=0`` gives integers)."""
    indices = np.asarray(points_mm, np.float64) / check_spacing(spacing, path) - 0.5 + 1.0
    fmt = "%d" if decimals == 0 else f"%.{decimals}f"
    np.savetxt(path, np.round(indices, decimals), fmt=fmt, delimiter="\t")


# --- pair folders -----------------------------------------------------------------------------


def list_pairs(root):
    """Sorted case folders under ``root`` holding a fixed and a moving image."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such folder")
    cases = [os.path.join(root, name) for name in sorted(os.listdir(root))]
    return [case for case in cases
            if all(os.path.isfile(os.path.join(case, PAIR_FILES[k])) for k in ("fixed", "moving"))]


def load_pair(case_dir):
    """A pair dict: ``name, fixed, moving, spacing_fixed, spacing_moving`` and, when present,
    ``fixed_labels, moving_labels, fixed_landmarks, moving_landmarks`` (mm), ``displacement``."""
    def path(key):
        return os.path.join(case_dir, PAIR_FILES[key])

    pair = {"name": os.path.basename(os.path.normpath(case_dir))}
    pair["fixed"], pair["spacing_fixed"], _ = read_image(path("fixed"))
    pair["moving"], pair["spacing_moving"], _ = read_image(path("moving"))
    for side in ("fixed", "moving"):
        if os.path.isfile(path(f"{side}_labels")):
            pair[f"{side}_labels"] = read_labels(path(f"{side}_labels"))[0]
        if os.path.isfile(path(f"{side}_landmarks")):
            pair[f"{side}_landmarks"] = read_landmarks(path(f"{side}_landmarks"), pair[f"spacing_{side}"])
    if os.path.isfile(path("displacement")):
        pair["displacement"] = read_displacement(path("displacement"))[0]
    return pair


def write_pair(case_dir, pair):
    """Write a pair dict (keys as :func:`load_pair` returns) in the pair layout."""
    os.makedirs(case_dir, exist_ok=True)

    def path(key):
        return os.path.join(case_dir, PAIR_FILES[key])

    for side in ("fixed", "moving"):
        spacing = pair[f"spacing_{side}"]
        write_image(path(side), pair[side], spacing)
        if f"{side}_labels" in pair:
            write_labels(path(f"{side}_labels"), pair[f"{side}_labels"], spacing)
        if f"{side}_landmarks" in pair:
            write_landmarks(path(f"{side}_landmarks"), pair[f"{side}_landmarks"], spacing)
    if "displacement" in pair:
        write_displacement(path("displacement"), pair["displacement"], pair["spacing_fixed"])
