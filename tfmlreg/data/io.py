"""Reading and writing images, label maps, displacements and landmarks (DESIGN.md section 2;
users' guide: docs/DATA.md).

Orientation. World coordinates are nibabel's RAS+ millimetres. Every image is read into RAS+
closest-canonical array order (nibabel's orientation tools), and its affine is reordered with it
(an oblique affine keeps its obliquity). Inside the package an image's voxel ``i`` sits at
``(i + 0.5) * h`` in its grid's mm frame, whose origin is the grid's corner, world point
``affine @ (-0.5, -0.5, -0.5, 1)``. The moving image of a pair is brought into the fixed image's
frame by :func:`align_to_fixed`. Outputs are written on the fixed image's (canonical) affine, so
they overlay on the input; a writer given no affine uses ``diag(spacing)``, which puts voxel
``i``'s centre at world ``i * h`` and the grid corner at ``-h / 2``.

Formats:

* NIfTI (``.nii``/``.nii.gz``, and what else nibabel reads) through nibabel.
* DICOM series (a folder), NRRD (``.nrrd``/``.nhdr``) and MetaImage (``.mha``/``.mhd``) through
  SimpleITK (the ``formats`` extra); ITK's LPS direction and origin become a RAS affine.
* DIR-LAB 4DCT ``.img``: header-less int16 little-endian, x fastest, values HU + 1024; case 1–10
  sizes and spacings are built in; the orientation assumed is :func:`dirlab_affine`'s.
* Displacements: ITK displacement fields, NIfTI vector images ``(X, Y, Z, 1, 3)`` (intent
  "vector") whose vectors are in ITK's LPS world millimetres (see :func:`write_displacement`).
* Landmarks: DIR-LAB text, one point a row, tab-separated **1-based** voxel indices ``x y z`` of
  the image file as stored; in mm ``(i - 1 + 0.5) * h``. Real DIR-LAB files hold integers; the
  phantom writes fractional indices (exact positions), which this reader accepts too.

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

from __future__ import annotations

import contextlib
import gzip
import itertools
import locale
import os
from collections import namedtuple
from collections.abc import Iterator, Mapping
from typing import Any

import nibabel as nib
import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

from tfmlreg import geometry
from tfmlreg.ct import AIR_HU  # what the moving image holds outside its field of view
from tfmlreg.types import Array, PathLike, Shape, Spacing

FRAME_TOLERANCE_MM = 1e-3  # grids whose voxel positions agree this well share a frame
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])  # nibabel's world (RAS+) to ITK's (LPS), and back
SIMPLEITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
DISPLACEMENT_DESCRIPTION = "ITK displacement field: y(x) = x + u(x), u in LPS world mm"
# The displacement's .nii.gz is a gzip container without compression (deflate's stored blocks,
# readable by every gzip reader): a field's float32 values are noise to deflate, whose fastest
# level saves 8 % of a full-resolution CT's field (418 -> 383 MB) for 10.7 s of one core.
DISPLACEMENT_COMPRESSLEVEL = 0
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


SPACING_RANGE_MM = (0.05, 20.0)  # voxel sizes outside are a header error, not an image


class DataError(ValueError):
    """Unreadable or invalid input; the message is one line and names the file or argument."""


# --- checks -----------------------------------------------------------------------------------


def _exists(path: PathLike) -> None:
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")


def check_volume(array: ArrayLike, name: PathLike) -> Array:
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


def check_spacing(spacing: Spacing, name: PathLike) -> Array:
    """3 voxel sizes (mm) from a scalar or 3 values, float32: :func:`tfmlreg.geometry.check_spacing`'s
    rule (finite, > 0) and plausible for a medical image (``SPACING_RANGE_MM``: a wrong header,
    e.g. metres or 1e38, is refused, not used); a :class:`DataError` naming ``name``."""
    try:
        return geometry.check_spacing(spacing, name, plausible_mm=SPACING_RANGE_MM).astype(np.float32)
    except ValueError as error:
        raise DataError(str(error)) from None


# --- orientation and frames -------------------------------------------------------------------


Volume = namedtuple("Volume", "array spacing affine stored_affine")
Volume.__doc__ = """An image read into canonical order: ``array``, ``spacing`` (3,) mm and ``affine``
(canonical), with ``stored_affine``, the affine of the file's own voxel order (for landmarks)."""


def spacing_of(affine: ArrayLike, name: PathLike) -> Array:
    """Voxel size (3,) mm per array axis: the lengths of the affine's columns."""
    return check_spacing(np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0), name)


def default_affine(spacing: Spacing) -> Array:
    """``diag(spacing)``: voxel ``i`` centred at world ``i * h``, the grid corner at ``-h / 2``."""
    return np.diag(list(check_spacing(spacing, "spacing").astype(np.float64)) + [1.0])


def corner(affine: ArrayLike) -> Array:
    """World position (3,) of a grid's corner, the origin of its internal mm frame."""
    return (np.asarray(affine, np.float64) @ [-0.5, -0.5, -0.5, 1.0])[:3]


def grid_affine(affine: ArrayLike, spacing: Spacing) -> Array:
    """The affine of a grid with ``spacing`` that shares ``affine``'s corner and axis directions
    (where a pair's moving image lies when it keeps its own spacing)."""
    affine = np.asarray(affine, np.float64)
    spacing = np.broadcast_to(np.asarray(spacing, np.float64), (3,))
    out = np.eye(4)
    out[:3, :3] = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0) * spacing
    out[:3, 3] = corner(affine) + out[:3, :3] @ [0.5, 0.5, 0.5]
    return out


def to_canonical(array: ArrayLike, affine: ArrayLike) -> tuple[Array, Array]:
    """``(array, affine)`` reordered into RAS+ closest-canonical order by flips and axis
    permutations only (no interpolation; an oblique affine keeps its obliquity). Axes after the
    first three (vector components) are left alone."""
    affine = np.asarray(affine, np.float64)
    orientation = nib.orientations.io_orientation(affine)
    reordered = np.ascontiguousarray(nib.orientations.apply_orientation(array, orientation))
    return reordered, affine @ nib.orientations.inv_ornt_aff(orientation, np.shape(array)[:3])


def _check_affine(affine: ArrayLike, name: str) -> Array:
    affine = np.asarray(affine, np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise DataError(f"{name}: expected a finite 4x4 affine, got shape {affine.shape}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{name}: the affine is singular")
    return affine


def _box(shape: Shape) -> Array:
    """The 8 corners of a grid's index box ``[-0.5, n - 0.5]``, homogeneous ``(8, 4)``."""
    corners = itertools.product(*[(-0.5, n - 0.5) for n in shape])
    return np.array([list(c) + [1.0] for c in corners])


def same_frame(moving_affine: ArrayLike, moving_shape: Shape, fixed_affine: ArrayLike,
               tolerance_mm: float = FRAME_TOLERANCE_MM) -> bool:
    """True when the moving grid has the fixed grid's corner and axis directions, i.e. its voxel
    ``i`` lies at ``(i + 0.5) * h_moving`` in the fixed frame (every voxel within ``tolerance_mm``)."""
    moving_affine = np.asarray(moving_affine, np.float64)
    expected = grid_affine(fixed_affine, np.linalg.norm(moving_affine[:3, :3], axis=0))
    return np.abs(_box(moving_shape) @ (moving_affine - expected).T).max() <= tolerance_mm


def align_to_fixed(moving: Array, moving_affine: ArrayLike, fixed_shape: Shape,
                   fixed_affine: ArrayLike, labels: bool = False) -> tuple[Array, Array]:
    """``(moving array, spacing_moving)`` in the fixed image's frame (DESIGN.md section 2).

    Both affines are canonical ones (as :func:`read_image` returns). When the moving grid shares
    the fixed grid's corner and directions (:func:`same_frame`), the moving image is returned
    untouched with its own spacing: no interpolation, so the same anatomy stored RAS, LPS or RAI
    gives bit-identical arrays. Otherwise it is resampled onto the fixed grid (fixed shape and
    spacing) through world coordinates: trilinear with air (-1000 HU) outside its field of view,
    or, for ``labels``, the nearest label with 0 outside.
    """
    moving_affine = _check_affine(moving_affine, "moving affine")
    if same_frame(moving_affine, np.shape(moving), fixed_affine):
        return moving, spacing_of(moving_affine, "moving affine")
    resampled = resample_to_grid(moving, moving_affine, fixed_shape, fixed_affine, labels)
    return resampled, spacing_of(fixed_affine, "fixed affine")


def resample_to_grid(volume: ArrayLike, affine: ArrayLike, shape: Shape, target_affine: ArrayLike,
                     labels: bool = False, chunk: int = 16) -> Array:
    """``volume`` (on ``affine``) sampled at the voxel centres of the grid ``(shape, target_affine)``.

    Trilinear (clamped to the border value within half a voxel of the edge, as
    :func:`tfmlreg.geometry.sample`), ``AIR_HU`` outside; ``labels``: nearest, 0 outside. Works
    ``chunk`` slices at a time so a full-size CT needs little memory.
    """
    volume = np.asarray(volume)
    target_to_source = np.linalg.solve(_check_affine(affine, "affine"),
                                       _check_affine(target_affine, "target affine"))
    fill = 0 if labels else AIR_HU
    out = np.empty(tuple(shape), np.int32 if labels else np.float32)
    upper = np.array(volume.shape, np.float64)[:, None, None, None] - 0.5
    for start in range(0, shape[0], chunk):
        index = np.stack(np.meshgrid(np.arange(start, min(start + chunk, shape[0])),
                                     np.arange(shape[1]), np.arange(shape[2]), indexing="ij"))
        source = (np.tensordot(target_to_source[:3, :3], index, axes=1)
                  + target_to_source[:3, 3, None, None, None])
        values = ndimage.map_coordinates(volume, source, order=0 if labels else 1,
                                         mode="nearest", prefilter=False)
        inside = np.all((source >= -0.5) & (source <= upper), axis=0)
        out[start:start + chunk] = np.where(inside, values, fill)
    return out


def world_to_frame(points: ArrayLike, affine: ArrayLike) -> Array:
    """World points ``(N, 3)`` as mm in the internal frame of the grid with ``affine``."""
    points = np.asarray(points, np.float64)
    index = np.linalg.solve(np.asarray(affine, np.float64), np.c_[points, np.ones(len(points))].T)
    return geometry.cell_centres(index[:3].T, np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))


# --- reading images -----------------------------------------------------------------------------


def _has_no_voxel_size(path: PathLike) -> bool:
    """True for a NIfTI header with a zero pixdim and neither qform nor sform: nibabel would read
    it as 1 mm (logging a line), a size the file never stated."""
    try:
        with nib.openers.ImageOpener(os.fspath(path)) as handle:
            raw = handle.read(540)
    except Exception:  # unreadable: nibabel's own error names it below
        return False
    for dtype in (nib.Nifti1Header.template_dtype, nib.Nifti2Header.template_dtype):
        for order in (dtype, dtype.newbyteorder()):
            if len(raw) < order.itemsize:
                continue
            fields = np.frombuffer(raw[:order.itemsize], order)[0]
            if int(fields["sizeof_hdr"]) == order.itemsize:
                return bool(fields["qform_code"] == 0 and fields["sform_code"] == 0
                            and np.any(fields["pixdim"][1:4] == 0))
    return False


def _load_nifti(path: PathLike) -> tuple[Array, Array, Any]:
    """``(data, affine, header)`` of a file nibabel reads, as stored."""
    _exists(path)
    if _has_no_voxel_size(path):
        raise DataError(f"{path}: the header states no voxel size (pixdim 0, no qform or sform)")
    try:
        image: Any = nib.load(path)  # a spatial image (typed as nibabel's FileBasedImage)
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises many types for corrupt files
        raise DataError(f"{path}: cannot read as NIfTI ({type(error).__name__}: {error})".splitlines()[0]) from None
    return data, image.affine, image.header


def affine_from_itk(direction: ArrayLike, spacing: ArrayLike, origin: ArrayLike) -> Array:
    """The RAS+ affine of an ITK image (direction, spacing and origin in ITK's LPS world)."""
    lps = np.eye(4)
    lps[:3, :3] = np.reshape(np.asarray(direction, np.float64), (3, 3)) * np.asarray(spacing, np.float64)
    lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _simpleitk(path: PathLike) -> Any:
    try:
        import SimpleITK
    except ImportError:
        raise DataError(f"{path}: reading DICOM, NRRD or MetaImage needs SimpleITK: install the "
                        "`formats` extra (pip install 'tfmlreg[formats]')") from None
    return SimpleITK


@contextlib.contextmanager
def locale_kept() -> Iterator[None]:
    """Restore the C locale after ITK/GDCM calls: GDCM can leave the process in the "C" locale,
    after which Python's ``open()`` writes ASCII and fails on the first non-ASCII character."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _dicom_series(sitk: Any, folder: str) -> Any:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(folder)
    if len(series) != 1:
        raise DataError(f"{folder}: expected a folder holding one DICOM series, found {len(series)}")
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder, series[0]))
    return reader.Execute()


def _load_simpleitk(path: str) -> tuple[Array, Array]:
    """``(data (x, y, z), RAS affine)`` of a DICOM folder, NRRD or MetaImage file, as stored."""
    sitk = _simpleitk(path)
    try:
        with locale_kept():
            image = _dicom_series(sitk, path) if os.path.isdir(path) else sitk.ReadImage(str(path))
    except RuntimeError as error:
        message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise DataError(f"{path}: cannot read with SimpleITK ({message})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{path}: expected a 3-D scalar image, got {image.GetDimension()}-D with "
                        f"{image.GetNumberOfComponentsPerPixel()} components per voxel")
    data = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))  # SimpleITK's arrays are (z, y, x)
    return data, affine_from_itk(image.GetDirection(), image.GetSpacing(), image.GetOrigin())


def _is_dirlab(path: PathLike, dirlab_case: int | None) -> bool:
    """A ``.img`` is DIR-LAB when a case is given or no Analyze ``.hdr`` sits beside it."""
    if not str(path).lower().endswith(".img"):
        return False
    return dirlab_case is not None or not os.path.isfile(str(path)[:-4] + ".hdr")


def _load_stored(path: PathLike, dirlab_case: int | None = None) -> tuple[Array, Array]:
    """``(data, affine)`` of any supported image, in the file's own voxel order."""
    path = str(path)
    if os.path.isdir(path) or path.lower().endswith(SIMPLEITK_SUFFIXES):
        if not os.path.exists(path):
            raise DataError(f"{path}: no such file")
        return _load_simpleitk(path)
    if _is_dirlab(path, dirlab_case):
        if dirlab_case is None:
            raise DataError(f"{path}: a DIR-LAB .img needs dirlab_case 1-10 (it has no header)")
        return read_dirlab_image(path, dirlab_case)[0], dirlab_affine(dirlab_case)
    data, affine, _ = _load_nifti(path)
    return data, affine


def read_volume(path: PathLike, dirlab_case: int | None = None, labels: bool = False) -> Volume:
    """A :class:`Volume` of any supported image (``labels``: a label map), canonical order."""
    data, stored_affine = _load_stored(path, dirlab_case)
    spacing_of(stored_affine, path)  # a zero or absurd voxel size is reported before reordering
    array = _check_labels(data, path) if labels else check_volume(data, path)
    array, affine = to_canonical(array, stored_affine)
    return Volume(array, spacing_of(affine, path), affine, np.asarray(stored_affine, np.float64))


def read_image(path: PathLike, dirlab_case: int | None = None) -> tuple[Array, Array, Array]:
    """``(image float32 (X, Y, Z), spacing (3,) mm, affine)`` in RAS+ canonical order, the affine
    the canonical one; any supported format (``dirlab_case`` for a DIR-LAB ``.img``)."""
    volume = read_volume(path, dirlab_case)
    return volume.array, volume.spacing, volume.affine


def _check_labels(data: ArrayLike, path: PathLike) -> Array:
    data = check_volume(data, path)
    labels = np.rint(data)
    if np.any(labels < 0) or np.any(np.abs(labels - data) > 1e-3):
        raise DataError(f"{path}: a label map must hold non-negative integers")
    return labels.astype(np.int32)


def read_labels(path: PathLike) -> tuple[Array, Array, Array]:
    """``(labels int32 (X, Y, Z), spacing, affine)`` in canonical order; non-negative integers."""
    volume = read_volume(path, labels=True)
    return volume.array, volume.spacing, volume.affine


# --- writing ------------------------------------------------------------------------------------


def _nifti(data: Array, spacing: Spacing, affine: ArrayLike | None) -> nib.Nifti1Image:
    """A NIfTI image on ``affine`` (or ``diag(spacing)``), sform and qform both set, so every
    reader (nibabel, ITK, Slicer, ITK-SNAP) places it the same way."""
    affine = default_affine(spacing) if affine is None else _check_affine(affine, "affine")
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    return image


def write_image(path: PathLike, image: ArrayLike, spacing: Spacing,
                affine: ArrayLike | None = None) -> None:
    """Write an ``(X, Y, Z)`` image as float32 NIfTI on ``affine`` (the fixed image's, so it
    overlays on it; it wins over ``spacing``) or, without one, on ``diag(spacing)``."""
    nib.save(_nifti(np.asarray(image, np.float32), spacing, affine), path)


def write_labels(path: PathLike, labels: ArrayLike, spacing: Spacing,
                 affine: ArrayLike | None = None) -> None:
    """Write a label map as int16 NIfTI; ``affine`` as :func:`write_image`."""
    nib.save(_nifti(np.asarray(labels, np.int16), spacing, affine), path)


# --- displacement fields ------------------------------------------------------------------------


def _itk_from_axes(affine: ArrayLike) -> Array:
    """The 3x3 matrix taking a vector in mm along the array axes of the grid ``affine`` into
    ITK's LPS world frame (the axis directions, then RAS -> LPS)."""
    affine = np.asarray(affine, np.float64)
    return LPS_FROM_RAS @ (affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0))


def displacement_to_itk(displacement: ArrayLike, affine: ArrayLike) -> Array:
    """``(..., 3)`` mm along the array axes of the grid ``affine`` -> ITK LPS world vectors,
    float32 as written (a float64 product of a full-resolution CT's field costs seconds)."""
    return np.asarray(displacement, np.float32) @ _itk_from_axes(affine).T.astype(np.float32)


def displacement_from_itk(vectors: ArrayLike, affine: ArrayLike) -> Array:
    """The inverse of :func:`displacement_to_itk`."""
    return np.asarray(vectors, np.float64) @ np.linalg.inv(_itk_from_axes(affine)).T


def write_displacement(path: PathLike, displacement: ArrayLike, spacing: Spacing,
                       affine: ArrayLike | None = None) -> None:
    """Write ``u`` ``(X, Y, Z, 3)`` (mm along the array axes) as an ITK displacement field.

    The file is a NIfTI vector image ``(X, Y, Z, 1, 3)``, intent "vector", on ``affine`` (else
    ``diag(spacing)``), its vectors in ITK's LPS world millimetres: what ITK, SimpleITK, ANTs and
    3D Slicer read with a NIfTI displacement field (ITK takes "vector" components verbatim as
    LPS; checked with SimpleITK's DisplacementFieldTransform in tests/test_orientation.py), and
    what ANTs and SimpleITK write. Applied by ITK, a fixed-image point ``x`` maps to
    ``x + u(x)`` in the moving image (the pull-back of DESIGN.md section 1).
    """
    frame = default_affine(spacing) if affine is None else _check_affine(affine, "affine")
    vectors = displacement_to_itk(displacement, frame)[:, :, :, None, :]
    image = _nifti(vectors, spacing, frame)
    image.header.set_intent("vector")
    image.header["descrip"] = DISPLACEMENT_DESCRIPTION.encode()
    if not os.fspath(path).endswith(".gz"):
        nib.save(image, path)
        return
    with gzip.GzipFile(os.fspath(path), "wb", compresslevel=DISPLACEMENT_COMPRESSLEVEL) as stream:
        image.to_stream(stream)


def read_displacement(path: PathLike) -> tuple[Array, Array]:
    """``(u (X, Y, Z, 3) mm along the canonical array axes, spacing)`` of an ITK displacement
    field: :func:`write_displacement`'s files, ANTs' and SimpleITK's (intent "vector", LPS), and
    intent "displacement vector" files, whose components ITK reads as RAS."""
    data, stored_affine, header = _load_nifti(path)
    spacing_of(stored_affine, path)
    data = np.asarray(data, np.float32)
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0]
    if data.ndim != 4 or data.shape[-1] != 3:
        raise DataError(f"{path}: expected a (X, Y, Z, 1, 3) displacement, got {data.shape}")
    data, affine = to_canonical(data, stored_affine)
    if header.get_intent()[0] == "displacement vector":
        data = data @ LPS_FROM_RAS  # stored RAS, as ITK reads this intent
    return displacement_from_itk(data, affine).astype(np.float32), spacing_of(affine, path)


# --- DIR-LAB ----------------------------------------------------------------------------------


def dirlab_geometry(case: int) -> tuple[tuple[int, int, int], Array]:
    """``((x, y, z) voxels, spacing (3,) mm)`` of DIR-LAB case 1–10."""
    if case not in DIRLAB_CASES:
        raise DataError(f"dirlab_case: expected 1-10, got {case}")
    size, in_plane = DIRLAB_CASES[case]
    return size, np.array([in_plane, in_plane, DIRLAB_SLICE_MM], np.float32)


def dirlab_affine(case: int) -> Array:
    """The RAS+ affine given to DIR-LAB case ``case``'s ``.img`` files (they hold no geometry).

    Array axes ``(x, y, z)`` are taken to point to the patient's left, posterior and superior
    (LPS), voxel ``(0, 0, 0)`` centred at the world origin: ``diag(-h_x, -h_y, h_z)``. Why: x and
    y follow DICOM's axial pixel order (columns from the patient's right to left, rows from
    anterior to posterior), which DIR-LAB's slices keep. The slice direction is not recorded and
    sources differ; we take ITK's reading of a header-less raw volume (a MetaImage ``.mhd``
    header or ``GetImageFromArray`` with identity direction and zero origin: +z superior), which
    is how DIR-LAB is usually opened in ITK tools, elastix and 3D Slicer, so outputs overlay on
    such conversions. Were the slices stored head to feet, the world picture would be mirrored
    cranio-caudally, but registration, displacements and TRE would not change: landmark indices
    go through the same mapping as the image (:func:`landmarks_in_frame`).
    """
    _, spacing = dirlab_geometry(case)
    return np.diag([-spacing[0], -spacing[1], spacing[2], 1.0]).astype(np.float64)


def read_dirlab_image(path: PathLike, case: int) -> tuple[Array, Array]:
    """``(HU float32 (x, y, z), spacing (3,) mm)`` of a DIR-LAB case's ``.img`` file, in the
    file's own voxel order; :func:`read_image` with ``dirlab_case`` gives the canonical (RAS+)
    order on :func:`dirlab_affine`, as for every other format."""
    _exists(path)
    size, spacing = dirlab_geometry(case)
    expected = int(np.prod(size)) * 2
    actual = os.path.getsize(path)
    if actual != expected:
        raise DataError(f"{path}: {actual} bytes, but DIR-LAB case {case} "
                        f"({size[0]}x{size[1]}x{size[2]} int16) has {expected}")
    stored = np.fromfile(path, dtype="<i2").reshape(size[::-1])  # (z, y, x), x fastest
    return np.transpose(stored, (2, 1, 0)).astype(np.float32) - DIRLAB_OFFSET, spacing


def write_dirlab_image(path: PathLike, hu: ArrayLike) -> None:
    """Write ``(x, y, z)`` HU in the DIR-LAB layout (int16 LE, x fastest, HU + 1024)."""
    stored = np.rint(np.asarray(hu, np.float64) + DIRLAB_OFFSET).astype("<i2")
    np.transpose(stored, (2, 1, 0)).tofile(path)


def read_landmarks(path: PathLike, spacing: Spacing) -> Array:
    """``(N, 3)`` landmark positions in mm from a DIR-LAB file of 1-based voxel indices."""
    _exists(path)
    try:
        indices = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as error:
        raise DataError(f"{path}: not a landmark file of numbers ({error})".splitlines()[0]) from None
    if indices.shape[0] == 0 or indices.shape[1] != 3 or not np.all(np.isfinite(indices)):
        raise DataError(f"{path}: expected rows of 3 voxel indices x y z, got shape {indices.shape}")
    spacing = check_spacing(spacing, path)
    return geometry.cell_centres(indices - 1.0, spacing).astype(np.float32)  # 1-based indices


def write_landmarks(path: PathLike, points_mm: ArrayLike, spacing: Spacing,
                    decimals: int = 3) -> None:
    """Write mm positions as DIR-LAB 1-based voxel indices (``decimals=0`` gives integers)."""
    indices = geometry.voxel_index(points_mm, check_spacing(spacing, path)) + 1.0  # 1-based
    fmt = "%d" if decimals == 0 else f"%.{decimals}f"
    np.savetxt(path, np.round(indices, decimals), fmt=fmt, delimiter="\t")


def landmarks_in_frame(path: PathLike, stored_affine: ArrayLike, frame_affine: ArrayLike) -> Array:
    """``(N, 3)`` mm in the internal frame of the grid ``frame_affine`` (a pair's fixed image)
    of a landmark file whose indices refer to an image file stored on ``stored_affine``: through
    world coordinates, so reorientation and resampling move the landmarks with the image."""
    stored_affine = np.asarray(stored_affine, np.float64)
    stored_spacing = spacing_of(stored_affine, path)
    index = geometry.voxel_index(read_landmarks(path, stored_spacing), stored_spacing)
    world = (stored_affine @ np.c_[index, np.ones(len(index))].T)[:3].T
    return world_to_frame(world, frame_affine).astype(np.float32)


# --- pair folders -----------------------------------------------------------------------------


def list_pairs(root: PathLike) -> list[str]:
    """Sorted case folders under ``root`` holding a fixed and a moving image."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such folder")
    cases = [os.path.join(root, name) for name in sorted(os.listdir(root))]
    return [case for case in cases
            if all(os.path.isfile(os.path.join(case, PAIR_FILES[k])) for k in ("fixed", "moving"))]


def load_images(fixed: PathLike, moving: PathLike, fixed_labels: PathLike | None = None,
                moving_labels: PathLike | None = None, fixed_landmarks: PathLike | None = None,
                moving_landmarks: PathLike | None = None, displacement: PathLike | None = None,
                dirlab_case: int | None = None, name: str | None = None) -> dict[str, Any]:
    """A pair dict from image files of any supported format (see :func:`load_pair` for the keys).

    Every image is read in canonical order; the moving image (and its labels) is brought into the
    fixed image's frame by :func:`align_to_fixed`; landmarks (indices of their image file as
    stored) become mm in that frame; ``affine_fixed`` is the fixed image's canonical affine, the
    one outputs are written on.
    """
    fixed_volume = read_volume(fixed, dirlab_case)
    moving_volume = read_volume(moving, dirlab_case)
    frame, fixed_shape = fixed_volume.affine, fixed_volume.array.shape
    pair = {"name": name or os.path.basename(os.path.normpath(str(fixed))),
            "fixed": fixed_volume.array, "spacing_fixed": fixed_volume.spacing, "affine_fixed": frame}
    pair["moving"], pair["spacing_moving"] = align_to_fixed(moving_volume.array, moving_volume.affine,
                                                            fixed_shape, frame)
    grids = {"fixed": (fixed_shape, frame),
             "moving": (pair["moving"].shape, grid_affine(frame, pair["spacing_moving"]))}
    for side, labels, landmarks, volume in (("fixed", fixed_labels, fixed_landmarks, fixed_volume),
                                            ("moving", moving_labels, moving_landmarks, moving_volume)):
        if labels:
            pair[f"{side}_labels"] = _labels_on_grid(labels, *grids[side], side)
        if landmarks:
            pair[f"{side}_landmarks"] = landmarks_in_frame(landmarks, volume.stored_affine, frame)
    if displacement:
        pair["displacement"] = read_displacement(displacement)[0]
        if pair["displacement"].shape[:3] != fixed_shape:
            raise DataError(f"{displacement}: displacement grid {pair['displacement'].shape[:3]} "
                            f"differs from the fixed image {fixed_shape}")
    return pair


def _labels_on_grid(path: PathLike, shape: Shape, affine: ArrayLike, side: str) -> Array:
    """A label map carried onto its image's grid in the fixed frame (untouched when it is there)."""
    volume = read_volume(path, labels=True)
    labels, _ = align_to_fixed(volume.array, volume.affine, shape, affine, labels=True)
    if labels.shape != tuple(shape):
        raise DataError(f"{path}: label map shape {labels.shape} differs from the {side} image "
                        f"{tuple(shape)}")
    return labels


def load_pair(case_dir: PathLike) -> dict[str, Any]:
    """A pair dict: ``name, fixed, moving, spacing_fixed, spacing_moving, affine_fixed`` and,
    when present, ``fixed_labels, moving_labels, fixed_landmarks, moving_landmarks`` (mm in the
    fixed frame), ``displacement``; the moving image in the fixed image's frame."""
    def path(key: str) -> str | None:
        name = os.path.join(case_dir, PAIR_FILES[key])
        return name if os.path.isfile(name) else None

    optional: dict[str, Any] = {key: path(key) for key in PAIR_FILES
                                if key not in ("fixed", "moving")}
    return load_images(os.path.join(case_dir, PAIR_FILES["fixed"]),
                       os.path.join(case_dir, PAIR_FILES["moving"]), **optional,
                       name=os.path.basename(os.path.normpath(case_dir)))


def write_pair(case_dir: PathLike, pair: Mapping[str, Any]) -> None:
    """Write a pair dict (keys as :func:`load_pair` returns) in the pair layout, on the fixed
    image's affine (``affine_fixed``, else ``diag(spacing_fixed)``); the moving image's grid
    shares its corner and directions, so :func:`load_pair` reads the pair back unchanged."""
    os.makedirs(case_dir, exist_ok=True)

    def path(key: str) -> str:
        return os.path.join(case_dir, PAIR_FILES[key])

    frame = pair.get("affine_fixed")
    if frame is None:
        frame = default_affine(pair["spacing_fixed"])
    for side in ("fixed", "moving"):
        spacing = pair[f"spacing_{side}"]
        affine = frame if side == "fixed" else grid_affine(frame, spacing)
        write_image(path(side), pair[side], spacing, affine)
        if f"{side}_labels" in pair:
            write_labels(path(f"{side}_labels"), pair[f"{side}_labels"], spacing, affine)
        if f"{side}_landmarks" in pair:
            write_landmarks(path(f"{side}_landmarks"), pair[f"{side}_landmarks"], spacing)
    if "displacement" in pair:
        write_displacement(path("displacement"), pair["displacement"], pair["spacing_fixed"], frame)
