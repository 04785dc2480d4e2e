"""Orientation-correct I/O on the real-CT crop: canonical reading (RAS, LPS, RAI, oblique), the
moving image in the fixed frame, outputs on the fixed affine, the ITK displacement field applied by
SimpleITK, DICOM/NRRD/MetaImage through SimpleITK, and the DIR-LAB orientation."""

import locale
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tfmlreg import commands
from tfmlreg.geometry import grid_points_numpy
from tfmlreg.data import io
from tfmlreg.data.io import DataError
from tfmlreg.inference import warp_moving

sitk = pytest.importorskip("SimpleITK")

CROP = Path(__file__).parent / "data" / "ct_crop.nii.gz"  # RAS+, 3 mm, 64x64x48, int16 HU
OFFSET_MM = np.array([12.3, -7.1, 5.5])


@pytest.fixture(scope="module")
def crop():
    image = nib.load(CROP)
    return np.asarray(image.dataobj).astype(np.float32), image.affine


def stored_as(array, affine, codes):
    """The same voxels and world geometry stored in orientation ``codes`` (nibabel axis codes)."""
    transform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                                nib.orientations.axcodes2ornt(codes))
    stored = nib.orientations.apply_orientation(array, transform)
    return stored, affine @ nib.orientations.inv_ornt_aff(transform, array.shape)


def rotation(degrees, centre):
    """A 4x4 world rotation about the z axis through ``centre``."""
    angle = np.deg2rad(degrees)
    turn = np.eye(4)
    turn[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    shift, back = np.eye(4), np.eye(4)
    shift[:3, 3], back[:3, 3] = -centre, centre
    return back @ turn @ shift


def centre_of(affine, shape):
    return (affine @ np.r_[(np.array(shape) - 1) / 2.0, 1.0])[:3]


def save(path, array, affine):
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return str(path)


def geometry(crop, kind):
    """The crop's voxels on a non-trivial geometry: ``ras`` (as committed), ``lps`` (stored LPS,
    origin moved), ``oblique`` (rotated 5 degrees and stored LPS, origin moved)."""
    array, affine = crop
    if kind == "ras":
        return array, affine
    if kind == "oblique":
        affine = rotation(5.0, centre_of(affine, array.shape)) @ affine
    stored, stored_affine = stored_as(array, affine, ("L", "P", "S"))
    stored_affine = stored_affine.copy()
    stored_affine[:3, 3] += OFFSET_MM
    return stored, stored_affine


# --- canonical reading ---------------------------------------------------------------------------


@pytest.mark.parametrize("codes", [("R", "A", "S"), ("L", "P", "S"), ("R", "A", "I"), ("P", "S", "L")])
def test_any_axis_order_reads_to_the_ras_array_and_affine(tmp_path, crop, codes):
    array, affine = crop
    stored, stored_affine = stored_as(array, affine, codes)
    assert nib.aff2axcodes(stored_affine) == codes
    image, spacing, canonical = io.read_image(save(tmp_path / "x.nii.gz", stored.astype(np.int16), stored_affine))
    np.testing.assert_array_equal(image, array)
    np.testing.assert_allclose(canonical, affine, atol=1e-5)
    np.testing.assert_allclose(spacing, [3.0, 3.0, 3.0])


@pytest.mark.parametrize("codes", [("L", "P", "S"), ("R", "A", "I")])
def test_moving_stored_otherwise_beside_a_ras_fixed_is_used_untouched(tmp_path, crop, codes):
    array, affine = crop
    fixed = save(tmp_path / "fixed.nii.gz", array.astype(np.int16), affine)
    stored, stored_affine = stored_as(array, affine, codes)
    pair = io.load_images(fixed, save(tmp_path / "moving.nii.gz", stored.astype(np.int16), stored_affine))
    np.testing.assert_array_equal(pair["moving"], pair["fixed"])  # no interpolation: bit-identical
    np.testing.assert_array_equal(pair["spacing_moving"], pair["spacing_fixed"])
    np.testing.assert_allclose(pair["affine_fixed"], affine, atol=1e-5)


def test_lps_moving_with_another_field_of_view_lands_on_the_fixed_grid(tmp_path, crop):
    """The same anatomy, the moving image cropped (corner 4, 2, 3 voxels in) and stored LPS: it is
    resampled onto the fixed grid exactly where it has data (no silent shift), air elsewhere, and
    its landmarks (indices of its own stored file) meet the fixed ones in the fixed frame."""
    array, affine = crop
    block = (slice(4, 60), slice(2, 62), slice(3, 45))
    shifted = affine.copy()
    shifted[:3, 3] = (affine @ [4, 2, 3, 1])[:3]
    stored, stored_affine = stored_as(array[block], shifted, ("L", "P", "S"))
    point = np.array([30, 20, 25])  # a voxel of the fixed (RAS) crop
    stored_point = (np.linalg.solve(stored_affine, affine @ np.r_[point, 1.0]))[:3]
    (tmp_path / "f.txt").write_text("\t".join(str(v + 1) for v in point) + "\n")
    (tmp_path / "m.txt").write_text("\t".join(f"{v + 1:.0f}" for v in stored_point) + "\n")
    pair = io.load_images(save(tmp_path / "fixed.nii.gz", array, affine),
                          save(tmp_path / "moving.nii.gz", stored, stored_affine),
                          fixed_landmarks=str(tmp_path / "f.txt"), moving_landmarks=str(tmp_path / "m.txt"))
    assert pair["moving"].shape == array.shape
    np.testing.assert_allclose(pair["moving"][block], array[block], atol=1e-2)
    outside = np.ones(array.shape, bool)
    outside[4:60, 2:62, 3:45] = False
    assert np.all(pair["moving"][outside] == io.AIR_HU)
    np.testing.assert_allclose(pair["fixed_landmarks"], [(point + 0.5) * 3.0], atol=1e-4)
    np.testing.assert_allclose(pair["moving_landmarks"], pair["fixed_landmarks"], atol=1e-4)


def linear_world_function(points):
    """A linear function of world position: trilinear interpolation reproduces it exactly, so any
    geometric error of the alignment shows up as an error in value."""
    return points @ np.array([2.0, -3.0, 1.5]) + 100.0


def sampled_on(affine, shape):
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = (affine @ np.c_[index, np.ones(len(index))].T)[:3].T
    return linear_world_function(world).reshape(shape).astype(np.float32)


def test_oblique_moving_is_resampled_exactly_where_defined(tmp_path, crop):
    array, affine = crop
    oblique = rotation(5.0, centre_of(affine, array.shape)) @ affine
    stored, stored_affine = stored_as(sampled_on(oblique, array.shape), oblique, ("L", "P", "S"))
    fixed = save(tmp_path / "fixed.nii.gz", sampled_on(affine, array.shape), affine)
    pair = io.load_images(fixed, save(tmp_path / "moving.nii.gz", stored, stored_affine))
    # fixed voxels whose centres lie at least one voxel inside the oblique grid
    index = np.stack(np.meshgrid(*[np.arange(n) for n in array.shape], indexing="ij"), -1)
    source = np.einsum("ab,xyzb->xyza", np.linalg.solve(oblique, affine), np.concatenate(
        [index, np.ones(array.shape + (1,))], -1))[..., :3]
    inside = np.all((source >= 1.0) & (source <= np.array(array.shape) - 2.0), axis=-1)
    assert inside.mean() > 0.7
    np.testing.assert_allclose(pair["moving"][inside], pair["fixed"][inside], atol=0.05)
    assert np.all(pair["moving"][~np.all((source >= -0.5) & (source <= np.array(array.shape) - 0.5), -1)]
                  == io.AIR_HU)


def test_oblique_ct_equals_the_ras_ct_to_interpolation_accuracy(tmp_path, crop):
    """The crop resampled by SimpleITK onto a 5-degree oblique grid, read back and aligned to the
    RAS crop: close to it in the body, and far closer than the same voxels taken as axis-aligned."""
    array, affine = crop
    oblique = rotation(5.0, centre_of(affine, array.shape)) @ affine
    reference = sitk.ReadImage(save(tmp_path / "grid.nii.gz", np.zeros(array.shape, np.float32), oblique))
    resampled = sitk.Resample(sitk.ReadImage(str(CROP), sitk.sitkFloat32), reference,
                              sitk.Transform(), sitk.sitkLinear, io.AIR_HU, sitk.sitkFloat32)
    sitk.WriteImage(resampled, str(tmp_path / "oblique.nii.gz"))
    pair = io.load_images(str(CROP), str(tmp_path / "oblique.nii.gz"))
    body = (array > -500) & (pair["moving"] > io.AIR_HU)
    error = np.abs(pair["moving"] - array)[body].mean()
    ignored = np.abs(nib.load(tmp_path / "oblique.nii.gz").get_fdata() - array)[body].mean()
    assert error < 40.0 and error < 0.4 * ignored, (error, ignored)


# --- outputs overlay on the input ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lps", "oblique"])
def test_outputs_written_on_the_fixed_affine_overlay_on_the_input(tmp_path, crop, kind):
    """Read with ITK (an independent reader), an output and its input give every voxel the same
    world position: resampling the output onto the input grid with the identity gives the input."""
    stored, stored_affine = geometry(crop, kind)
    fixed = save(tmp_path / "fixed.nii.gz", stored, stored_affine)
    pair = io.load_images(fixed, fixed)
    io.write_image(str(tmp_path / "out.nii.gz"), pair["fixed"], pair["spacing_fixed"], pair["affine_fixed"])
    io.write_labels(str(tmp_path / "labels.nii.gz"), pair["fixed"] > -500, pair["spacing_fixed"],
                    pair["affine_fixed"])
    source = sitk.ReadImage(fixed, sitk.sitkFloat32)
    for name, expected in (("out.nii.gz", stored), ("labels.nii.gz", stored > -500)):
        written = sitk.ReadImage(str(tmp_path / name), sitk.sitkFloat32)
        overlaid = sitk.Resample(written, source, sitk.Transform(), sitk.sitkNearestNeighbor, -5.0)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(overlaid).transpose(2, 1, 0), expected)


class ZeroPredictor:
    """A stand-in network that returns no motion (the written files are what is tested)."""
    shape = (16, 16, 16)

    def __call__(self, fixed, moving, spacing):
        return {"displacement": np.zeros((1,) + self.shape + (3,), np.float32)}


def test_register_and_write_puts_every_output_on_the_fixed_affine(tmp_path, crop):
    stored, stored_affine = geometry(crop, "lps")
    fixed = save(tmp_path / "fixed.nii.gz", stored, stored_affine)
    pair = io.load_images(fixed, fixed)
    commands.register_and_write(ZeroPredictor(), pair, str(tmp_path))
    canonical = nib.as_closest_canonical(nib.load(fixed)).affine
    for name in ("warped.nii.gz", "displacement.nii.gz", "jacobian_determinant.nii.gz"):
        np.testing.assert_allclose(nib.load(tmp_path / name).affine, canonical, atol=1e-5)
    np.testing.assert_allclose(io.read_image(str(tmp_path / "warped.nii.gz"))[0], pair["fixed"], atol=1e-3)


# --- the ITK displacement field ------------------------------------------------------------------


def smooth_field(shape, spacing):
    """A smooth, non-trivial displacement (mm along the array axes), up to 5 mm per component."""
    x, y, z = np.moveaxis(grid_points_numpy(shape, spacing), -1, 0)
    extent = np.array(shape) * spacing
    return np.stack([4.0 * np.sin(2 * np.pi * y / extent[1]),
                     -3.0 * np.cos(2 * np.pi * z / extent[2]),
                     5.0 * np.sin(np.pi * x / extent[0])], -1).astype(np.float32)


def simpleitk_warp(field_path, moving_path, fixed_path, out_path):
    """What an ITK user does with our displacement file; the result read back in canonical order."""
    transform = sitk.DisplacementFieldTransform(sitk.ReadImage(field_path, sitk.sitkVectorFloat64))
    warped = sitk.Resample(sitk.ReadImage(moving_path, sitk.sitkFloat32),
                           sitk.ReadImage(fixed_path, sitk.sitkFloat32), transform, sitk.sitkLinear,
                           io.AIR_HU, sitk.sitkFloat32)
    sitk.WriteImage(warped, out_path)
    return io.read_image(out_path)[0]


@pytest.mark.parametrize("kind", ["ras", "lps", "oblique"])
def test_displacement_file_applied_by_simpleitk_reproduces_our_warp(tmp_path, crop, kind):
    stored, stored_affine = geometry(crop, kind)
    fixed = save(tmp_path / "fixed.nii.gz", stored, stored_affine)
    moving = save(tmp_path / "moving.nii.gz", stored, stored_affine)
    pair = io.load_images(fixed, moving)
    displacement = smooth_field(pair["fixed"].shape, pair["spacing_fixed"])
    warped = warp_moving(pair, displacement)
    field = str(tmp_path / "u.nii.gz")
    io.write_displacement(field, displacement, pair["spacing_fixed"], pair["affine_fixed"])
    theirs = simpleitk_warp(field, moving, fixed, str(tmp_path / "itk.nii.gz"))
    body = pair["fixed"] > -500
    assert np.abs(warped - pair["moving"])[body].mean() > 50.0  # the motion is not trivial
    assert np.abs(theirs - warped)[body].mean() <= 1.0
    # the components as they are inside the package (mm along the array axes) would be wrong
    image = nib.load(field)
    nib.save(nib.Nifti1Image(displacement[:, :, :, None, :], image.affine, image.header), field)
    assert np.abs(simpleitk_warp(field, moving, fixed, str(tmp_path / "bad.nii.gz")) - warped)[body].mean() > 10.0


def test_displacement_file_header_and_round_trip(tmp_path, crop):
    stored, stored_affine = geometry(crop, "oblique")
    pair = io.load_images(save(tmp_path / "f.nii.gz", stored, stored_affine), str(tmp_path / "f.nii.gz"))
    displacement = smooth_field(pair["fixed"].shape, pair["spacing_fixed"])
    io.write_displacement(str(tmp_path / "u.nii.gz"), displacement, pair["spacing_fixed"], pair["affine_fixed"])
    image = nib.load(tmp_path / "u.nii.gz")
    assert image.shape == pair["fixed"].shape + (1, 3) and image.header.get_intent()[0] == "vector"
    assert image.header["descrip"].item().decode() == io.DISPLACEMENT_DESCRIPTION
    assert len(io.DISPLACEMENT_DESCRIPTION) <= 80
    read, spacing = io.read_displacement(str(tmp_path / "u.nii.gz"))
    np.testing.assert_allclose(read, displacement, atol=1e-5)
    np.testing.assert_allclose(spacing, pair["spacing_fixed"])


def test_a_field_written_by_simpleitk_reads_as_its_physical_motion(tmp_path):
    """SimpleITK writes (1, 2, 3) LPS mm on an identity-direction (LPS) grid: that is (-1, -2, 3) mm
    in RAS, i.e. along the canonical (RAS) array axes of the same grid."""
    field = sitk.GetImageFromArray(np.tile([1.0, 2.0, 3.0], (4, 5, 6, 1)), isVector=True)
    field.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(field, str(tmp_path / "ants.nii.gz"))
    read, spacing = io.read_displacement(str(tmp_path / "ants.nii.gz"))
    assert read.shape == (6, 5, 4, 3)
    np.testing.assert_allclose(read, np.broadcast_to([-1.0, -2.0, 3.0], read.shape), atol=1e-6)


# --- SimpleITK formats ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
@pytest.mark.parametrize("kind", ["ras", "oblique"])
def test_nrrd_and_metaimage_read_like_the_nifti(tmp_path, crop, suffix, kind):
    nifti = save(tmp_path / "x.nii.gz", *geometry(crop, kind))
    sitk.WriteImage(sitk.ReadImage(nifti), str(tmp_path / f"x{suffix}"))
    image, spacing, affine = io.read_image(str(tmp_path / f"x{suffix}"))
    expected, expected_spacing, expected_affine = io.read_image(nifti)
    np.testing.assert_array_equal(image, expected)
    np.testing.assert_allclose(affine, expected_affine, atol=1e-4)
    np.testing.assert_allclose(spacing, expected_spacing)


def write_dicom_series(folder, image):
    """One CT slice a file, with the position and orientation tags GDCM orders a series by."""
    os.makedirs(folder)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.12"
    direction = image.GetDirection()
    orientation = "\\".join(f"{direction[i]:.6f}" for i in (0, 3, 6, 1, 4, 7))
    for k in range(image.GetDepth()):
        position = "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))
        tags = {"0008|0060": "CT", "0020|000e": uid + ".1", "0020|000d": uid, "0020|0013": str(k + 1),
                "0008|0018": f"{uid}.2.{k}", "0020|0037": orientation, "0020|0032": position,
                "0028|0030": "3\\3", "0018|0050": "3"}
        piece = image[:, :, k]
        for tag, value in tags.items():
            piece.SetMetaData(tag, value)
        writer.SetFileName(os.path.join(folder, f"{k:03d}.dcm"))
        writer.Execute(piece)


def test_dicom_series_folder_reads_like_the_nifti(tmp_path):
    with io.locale_kept():  # GDCM's writer can leave the process in the "C" locale
        write_dicom_series(str(tmp_path / "series"), sitk.ReadImage(str(CROP)))
    encoding = locale.getpreferredencoding(False)
    image, spacing, affine = io.read_image(str(tmp_path / "series"))
    expected, _, expected_affine = io.read_image(str(CROP))
    np.testing.assert_array_equal(image, expected)
    np.testing.assert_allclose(affine, expected_affine, atol=1e-4)
    with pytest.raises(DataError, match="one DICOM series, found 0"):
        io.read_image(str(tmp_path))
    assert locale.getpreferredencoding(False) == encoding  # reading leaves the locale alone


def test_simpleitk_formats_fail_with_one_line_errors(tmp_path, monkeypatch):
    bad = tmp_path / "bad.nrrd"
    bad.write_text("NRRD0004\ngarbage\n")
    with pytest.raises(DataError, match="bad.nrrd: cannot read with SimpleITK") as error:
        io.read_image(str(bad))
    assert "\n" not in str(error.value)
    with pytest.raises(DataError, match="missing.mha: no such file"):
        io.read_image(str(tmp_path / "missing.mha"))
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # as if the extra were not installed
    with pytest.raises(DataError, match=r"bad.nrrd: .*install the `formats` extra"):
        io.read_image(str(bad))


# --- DIR-LAB -------------------------------------------------------------------------------------


def test_dirlab_img_reads_like_its_metaimage_header_in_itk(tmp_path):
    """A DIR-LAB .img gets the geometry ITK gives it through a plain .mhd header (identity
    direction, zero origin), and goes through the same canonical path: arrays and affines agree."""
    (nx, ny, nz), in_plane = io.DIRLAB_CASES[1]
    hu = np.random.default_rng(0).integers(-1000, 400, (nx, ny, nz)).astype(np.float32)
    io.write_dirlab_image(str(tmp_path / "case1.img"), hu)
    (tmp_path / "case1.mhd").write_text(
        f"ObjectType = Image\nNDims = 3\nDimSize = {nx} {ny} {nz}\n"
        f"ElementSpacing = {in_plane} {in_plane} 2.5\nElementType = MET_SHORT\n"
        "ElementByteOrderMSB = False\nElementDataFile = case1.img\n")
    image, spacing, affine = io.read_image(str(tmp_path / "case1.img"), dirlab_case=1)
    through_itk, _, itk_affine = io.read_image(str(tmp_path / "case1.mhd"))
    np.testing.assert_array_equal(image + io.DIRLAB_OFFSET, through_itk)
    np.testing.assert_allclose(affine, itk_affine, atol=1e-5)
    np.testing.assert_array_equal(image, hu[::-1, ::-1, :])  # x, y stored towards left, posterior
    assert nib.aff2axcodes(io.dirlab_affine(1)) == ("L", "P", "S")
    with pytest.raises(DataError, match="needs dirlab_case"):
        io.read_image(str(tmp_path / "case1.img"))


def test_dirlab_landmarks_move_with_the_image(tmp_path):
    """A landmark on a marker voxel of a DIR-LAB file lands on that marker after reorientation."""
    (nx, ny, nz), _ = io.DIRLAB_CASES[1]
    hu = np.full((nx, ny, nz), -1000.0, np.float32)
    hu[200, 100, 7] = 300.0
    io.write_dirlab_image(str(tmp_path / "t.img"), hu)
    (tmp_path / "t.txt").write_text("201\t101\t8\n")
    pair = io.load_images(str(tmp_path / "t.img"), str(tmp_path / "t.img"), dirlab_case=1,
                          fixed_landmarks=str(tmp_path / "t.txt"))
    marker = np.argwhere(pair["fixed"] == 300.0)[0]
    np.testing.assert_allclose(pair["fixed_landmarks"][0], (marker + 0.5) * pair["spacing_fixed"], atol=1e-3)
