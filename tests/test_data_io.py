"""NIfTI and DIR-LAB I/O: byte-level format, orientation, spacing, landmarks, bad input."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from tfmlreg.data import io
from tfmlreg.data.io import DataError


def test_dirlab_bytes_read_back_with_orientation_hu_and_spacing(tmp_path):
    (nx, ny, nz), in_plane = io.DIRLAB_CASES[1]
    stored = np.full((nz, ny, nx), 24, "<i2")  # (z, y, x) in C order: x fastest; HU -1000
    stored[7, 100, 200] = 1024 + 300  # a marker at x=200, y=100, z=7 of 300 HU
    path = tmp_path / "case1_T00.img"
    path.write_bytes(stored.tobytes())
    hu, spacing = io.read_dirlab_image(str(path), case=1)
    assert hu.shape == (nx, ny, nz)
    assert hu[200, 100, 7] == 300.0 and hu[0, 0, 0] == -1000.0
    assert np.argwhere(hu == 300.0).tolist() == [[200, 100, 7]]
    np.testing.assert_allclose(spacing, [in_plane, in_plane, 2.5])
    io.write_dirlab_image(str(tmp_path / "copy.img"), hu)
    assert (tmp_path / "copy.img").read_bytes() == path.read_bytes()


def test_dirlab_wrong_size_names_the_file(tmp_path):
    path = tmp_path / "short.img"
    path.write_bytes(b"\0" * 1000)
    with pytest.raises(DataError, match="short.img: 1000 bytes"):
        io.read_dirlab_image(str(path), case=2)
    with pytest.raises(DataError, match="^dirlab_case: expected 1-10, got 11"):
        io.read_dirlab_image(str(path), case=11)


def test_landmark_indices_map_to_cell_centres_in_mm(tmp_path):
    path = tmp_path / "landmarks.txt"
    path.write_text("1\t1\t1\n10\t20\t30\n")
    points = io.read_landmarks(str(path), [0.97, 0.97, 2.5])
    np.testing.assert_allclose(points, [[0.485, 0.485, 1.25], [9.5 * 0.97, 19.5 * 0.97, 29.5 * 2.5]],
                               rtol=1e-6)
    io.write_landmarks(str(tmp_path / "out.txt"), points, [0.97, 0.97, 2.5], decimals=0)
    assert (tmp_path / "out.txt").read_text().split() == ["1", "1", "1", "10", "20", "30"]


def test_nifti_round_trip_keeps_data_spacing_and_affine(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(7, 6, 5)).astype(np.float32)
    path = str(tmp_path / "image.nii.gz")
    io.write_image(path, image, [0.8, 1.2, 2.5])
    read, spacing, affine = io.read_image(path)
    np.testing.assert_array_equal(read, image)
    np.testing.assert_allclose(spacing, [0.8, 1.2, 2.5])
    np.testing.assert_allclose(affine, np.diag([0.8, 1.2, 2.5, 1.0]))
    field = rng.normal(size=(7, 6, 5, 3)).astype(np.float32)
    io.write_displacement(str(tmp_path / "u.nii.gz"), field, [0.8, 1.2, 2.5])
    np.testing.assert_array_equal(io.read_displacement(str(tmp_path / "u.nii.gz"))[0], field)
    assert nib.load(str(tmp_path / "u.nii.gz")).header.get_intent()[0] == "vector"


def save_with_zero_spacing(path):
    """A NIfTI whose sform gives axis 1 a voxel size of 0 (nibabel would refuse to write it
    from an affine, and resets a zero pixdim on reading, so the header is set directly)."""
    header = nib.Nifti1Header()
    header.set_data_shape((4, 4, 4))
    header.set_data_dtype(np.float32)
    header["sform_code"], header["qform_code"] = 1, 0
    header["srow_x"], header["srow_y"], header["srow_z"] = [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]
    nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), None, header=header).to_filename(path)


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_bytes(gzip.compress(b"not a nifti")), "cannot read as NIfTI"),
    (lambda p: nib.save(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)), p), "3-D"),
    (lambda p: nib.save(nib.Nifti1Image(np.full((4, 4, 4), np.nan, np.float32), np.eye(4)), p), "NaN"),
    (save_with_zero_spacing, "spacing"),
])
def test_bad_images_raise_one_line_errors_naming_the_file(tmp_path, make, message):
    path = tmp_path / "bad.nii.gz"
    make(path)
    with pytest.raises(DataError, match=message) as error:
        io.read_image(str(path))
    assert "bad.nii.gz" in str(error.value) and "\n" not in str(error.value)


def test_pair_folder_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    pair = {"fixed": rng.normal(size=(6, 6, 6)).astype(np.float32),
            "moving": rng.normal(size=(6, 6, 6)).astype(np.float32),
            "spacing_fixed": np.array([1.0, 2.0, 3.0], np.float32),
            "spacing_moving": np.array([1.0, 2.0, 3.0], np.float32),
            "fixed_labels": rng.integers(0, 6, (6, 6, 6)), "moving_labels": rng.integers(0, 6, (6, 6, 6)),
            "fixed_landmarks": np.array([[1.25, 2.5, 4.0]], np.float32),
            "moving_landmarks": np.array([[2.0, 3.0, 7.5]], np.float32)}
    io.write_pair(str(tmp_path / "case1"), pair)
    assert io.list_pairs(str(tmp_path)) == [str(tmp_path / "case1")]
    loaded = io.load_pair(str(tmp_path / "case1"))
    for key in ("fixed", "moving", "fixed_labels", "moving_labels"):
        np.testing.assert_array_equal(loaded[key], pair[key])
    np.testing.assert_allclose(loaded["fixed_landmarks"], pair["fixed_landmarks"], atol=1e-3)


def test_writers_use_the_given_affine_and_fall_back_to_diag_spacing(tmp_path):
    affine = np.array([[0.0, 0.0, -2.0, 40.0], [1.5, 0.0, 0.0, -10.0], [0.0, 2.5, 0.0, 7.0], [0, 0, 0, 1]])
    io.write_image(str(tmp_path / "a.nii.gz"), np.zeros((5, 4, 3)), [9.0, 9.0, 9.0], affine)
    io.write_labels(str(tmp_path / "l.nii.gz"), np.ones((5, 4, 3), int), [9.0, 9.0, 9.0], affine)
    for name in ("a.nii.gz", "l.nii.gz"):
        written = nib.load(str(tmp_path / name))
        np.testing.assert_allclose(written.affine, affine)  # the affine wins over the spacing
        assert written.header["sform_code"] == 1 and written.header["qform_code"] == 1
    # read back in canonical order: axes permuted, spacing with them
    image, spacing, canonical = io.read_image(str(tmp_path / "a.nii.gz"))
    assert image.shape == (3, 5, 4) and nib.aff2axcodes(canonical) == ("R", "A", "S")
    np.testing.assert_allclose(spacing, [2.0, 1.5, 2.5])


def test_grid_affine_keeps_corner_and_directions():
    affine = np.array([[0.0, 0.0, -2.0, 40.0], [1.5, 0.0, 0.0, -10.0], [0.0, 2.5, 0.0, 7.0], [0, 0, 0, 1]])
    finer = io.grid_affine(affine, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(io.corner(finer), io.corner(affine))
    np.testing.assert_allclose(np.linalg.norm(finer[:3, :3], axis=0), [0.5, 0.5, 1.0])
    assert io.same_frame(finer, (30, 20, 10), affine)
    moved = finer.copy()
    moved[0, 3] += 0.01
    assert not io.same_frame(moved, (30, 20, 10), affine)
    np.testing.assert_allclose(io.corner(io.default_affine([2.0, 3.0, 4.0])), [-1.0, -1.5, -2.0])


def test_align_to_fixed_resamples_labels_by_nearest_with_zero_outside():
    fixed_affine = io.default_affine([1.0, 1.0, 1.0])
    labels = np.arange(1, 9).reshape(2, 2, 2)
    moving_affine = io.default_affine([2.0, 2.0, 2.0])  # corner at -1 mm: another frame
    aligned, spacing = io.align_to_fixed(labels, moving_affine, (5, 5, 5), fixed_affine, labels=True)
    np.testing.assert_array_equal(spacing, [1.0, 1.0, 1.0])
    assert aligned.dtype == np.int32 and aligned[0, 0, 0] == 1 and aligned[3, 3, 3] == 8
    assert aligned[4, 0, 0] == 0  # world 4 mm is beyond the moving grid's edge (3 mm)
    image, _ = io.align_to_fixed(labels.astype(np.float32), moving_affine, (5, 5, 5), fixed_affine)
    assert image[4, 4, 4] == io.AIR_HU and image[1, 1, 1] == pytest.approx(4.5)  # all 8 blended


def test_displacement_vectors_are_stored_in_itk_lps(tmp_path):
    field = np.zeros((4, 4, 4, 3), np.float32)
    field[...] = [1.0, 2.0, 3.0]  # mm along the RAS array axes of diag(spacing)
    io.write_displacement(str(tmp_path / "u.nii.gz"), field, [2.0, 2.0, 2.0])
    stored = np.asarray(nib.load(str(tmp_path / "u.nii.gz")).dataobj)
    np.testing.assert_array_equal(stored[0, 0, 0, 0], [-1.0, -2.0, 3.0])
    header = nib.load(str(tmp_path / "u.nii.gz")).header
    header.set_intent("displacement vector")  # ITK reads this intent's components as RAS
    nib.save(nib.Nifti1Image(field[:, :, :, None], np.diag([2.0, 2.0, 2.0, 1.0]), header), str(tmp_path / "r.nii.gz"))
    np.testing.assert_allclose(io.read_displacement(str(tmp_path / "r.nii.gz"))[0], field)


def test_pair_with_affine_and_finer_moving_grid_round_trips(tmp_path):
    rng = np.random.default_rng(2)
    affine = np.array([[-2.0, 0, 0, 30.0], [0, -2.0, 0, 12.0], [0, 0, 2.0, -50.0], [0, 0, 0, 1]])
    _, canonical = io.to_canonical(np.zeros((6, 6, 6)), affine)
    pair = {"fixed": rng.normal(size=(6, 6, 6)).astype(np.float32),
            "moving": rng.normal(size=(12, 12, 12)).astype(np.float32),
            "spacing_fixed": np.array([2.0, 2.0, 2.0], np.float32),
            "spacing_moving": np.array([1.0, 1.0, 1.0], np.float32), "affine_fixed": canonical,
            "moving_labels": rng.integers(0, 6, (12, 12, 12)),
            "moving_landmarks": np.array([[1.25, 2.5, 4.0]], np.float32),
            "displacement": rng.normal(size=(6, 6, 6, 3)).astype(np.float32)}
    io.write_pair(str(tmp_path / "c"), pair)
    loaded = io.load_pair(str(tmp_path / "c"))
    for key in ("fixed", "moving", "moving_labels", "spacing_moving", "affine_fixed"):
        np.testing.assert_allclose(loaded[key], pair[key], atol=1e-5)  # the moving grid kept as is
    np.testing.assert_allclose(loaded["displacement"], pair["displacement"], atol=1e-6)
    np.testing.assert_allclose(loaded["moving_landmarks"], pair["moving_landmarks"], atol=1e-3)


def test_label_map_on_another_grid_and_wrong_displacement_grid_raise(tmp_path):
    io.write_image(str(tmp_path / "f.nii.gz"), np.zeros((6, 6, 6)), 2.0)
    io.write_labels(str(tmp_path / "l.nii.gz"), np.zeros((5, 6, 6), int), 2.0)
    with pytest.raises(DataError, match="l.nii.gz: label map shape"):
        io.load_images(str(tmp_path / "f.nii.gz"), str(tmp_path / "f.nii.gz"),
                       fixed_labels=str(tmp_path / "l.nii.gz"))
    io.write_displacement(str(tmp_path / "u.nii.gz"), np.zeros((6, 6, 5, 3)), 2.0)
    with pytest.raises(DataError, match="u.nii.gz: displacement grid"):
        io.load_images(str(tmp_path / "f.nii.gz"), str(tmp_path / "f.nii.gz"),
                       displacement=str(tmp_path / "u.nii.gz"))
