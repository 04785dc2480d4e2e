"""Synthetic breathing on real CT: masks, the field, the pair and its ground truth, the CLI."""

import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from conftest import CT_CROP
from tfmlreg import cli, geometry, metrics
from tfmlreg.data import io, synthetic



@pytest.fixture(scope="module")
def anatomy(scan):
    return synthetic.analyse(scan["image"], scan["spacing"])


@pytest.fixture(scope="module")
def pair(scan, anatomy):
    return synthetic.make_pair(scan["image"], scan["spacing"], seed=5, amplitude_mm=20.0,
                               anatomy=anatomy)


@pytest.fixture(scope="module")
def clean_pair(scan, anatomy):
    """Geometry alone: no noise, no density change."""
    return synthetic.make_pair(scan["image"], scan["spacing"], seed=5, amplitude_mm=20.0,
                               anatomy=anatomy, noise_hu=(0.0, 0.0), mass_conservation=False)


def warp(image, displacement, spacing):
    return np.asarray(geometry.warp(image[None, ..., None], displacement[None], spacing,
                                    fill_value=None))[0, ..., 0]


def sample(field, points, spacing):
    return np.asarray(geometry.sample(field[None], np.asarray(points, np.float32)[None],
                                      np.asarray(spacing, np.float32)))[0]


# --- masks ------------------------------------------------------------------------------------


def test_masks_find_both_lungs_in_the_crop(anatomy):
    lungs, labels = anatomy.lungs, anatomy.labels
    assert 0.25 < lungs.mean() < 0.6  # the crop is centred on the lungs
    assert np.all(anatomy.body[lungs])
    left, right = labels == synthetic.LABELS["left lung"], labels == synthetic.LABELS["right lung"]
    assert np.array_equal(left | right, lungs)
    assert min(left.sum(), right.sum()) > 0.3 * lungs.sum()
    # RAS+: the right lung lies towards larger axis-0 indices
    assert np.nonzero(left)[0].mean() < np.nonzero(right)[0].mean()
    # vessels belong to the lungs: most bright voxels surrounded by lung are inside the mask
    assert np.mean(anatomy.image[lungs] > -500) > 0.02


def toy_thorax(shape=(48, 40, 40)):
    """Outside air, an elliptic body with two lungs (parenchyma with vessels) and a gas bubble."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    rng = np.random.default_rng(0)
    image = np.full(shape, -1000.0) + rng.normal(0, 10, shape)
    body = (x / 0.9) ** 2 + (y / 0.7) ** 2 < 1
    image[body] = 40.0
    lungs = np.zeros(shape, bool)
    for side in (-1, 1):
        lungs |= ((x - side * 0.4) / 0.3) ** 2 + (y / 0.45) ** 2 + ((z - 0.1) / 0.7) ** 2 < 1
    image[lungs] = -850.0 + rng.normal(0, 30, shape)[lungs]
    image[lungs & (rng.random(shape) < 0.05)] = 0.0  # vessel voxels
    bubble = (x / 0.15) ** 2 + ((y + 0.3) / 0.15) ** 2 + ((z + 0.8) / 0.15) ** 2 < 1
    image[bubble] = -1000.0
    return image.astype(np.float32), lungs, bubble, body


def test_masks_keep_lungs_and_drop_outside_air_and_gas():
    image, lungs, bubble, body = toy_thorax()
    found_body, found_lungs = synthetic.body_and_lung_masks(image, (5.0, 5.0, 5.0))
    assert not found_lungs[bubble].any() and not found_lungs[~body].any()
    assert np.mean(found_lungs[lungs]) > 0.97  # vessels filled in
    assert found_body[bubble].all() and not found_body[0, 0].any()


def test_no_lungs_is_a_one_line_data_error():
    solid = np.full((16, 16, 16), 40.0, np.float32)
    with pytest.raises(io.DataError, match="scan.nii: no lungs found"):
        synthetic.body_and_lung_masks(solid, 2.0, name="scan.nii")


# --- the field --------------------------------------------------------------------------------


def test_field_is_smooth_invertible_and_has_the_requested_amplitude(anatomy):
    u, info = synthetic.breathing_field(anatomy, 20.0, np.random.default_rng(1))
    assert info["amplitude_mm"] == 20.0 and info["attempts"] == 1
    np.testing.assert_allclose(np.abs(u[..., 2]).max(), 20.0, rtol=1e-5)
    det = metrics.jacobian_determinant(u, anatomy.spacing)
    assert det.min() > 0.2
    gradients = np.stack(np.gradient(u[..., 2], *anatomy.spacing.tolist()))
    assert np.abs(gradients).max() < 1.6  # at most 1.5 x amplitude / the 20 mm fade
    # diaphragm-led: exhale moves the lung bases up (+axis 2), far more than the apices
    lungs = anatomy.lungs
    z = np.nonzero(lungs)[2]
    low, high = np.percentile(z, [20, 80])
    base = u[..., 2][lungs & (np.arange(lungs.shape[2]) <= low)]
    apex = u[..., 2][lungs & (np.arange(lungs.shape[2]) >= high)]
    assert base.mean() > 10.0 and base.mean() > 2.5 * abs(apex.mean())
    # the motion fades to nothing away from the lungs (chest wall, spine)
    far = ndimage.distance_transform_edt(anatomy.slide == 0, sampling=anatomy.spacing) > 15.0
    assert far.sum() > 1000 and np.abs(u[far]).max() < 0.02 * 20.0


def test_directions_reverse_the_motion(anatomy):
    exhale, _ = synthetic.breathing_field(anatomy, 15.0, np.random.default_rng(2), "exhale")
    inhale, _ = synthetic.breathing_field(anatomy, 15.0, np.random.default_rng(2), "inhale")
    np.testing.assert_allclose(inhale, -exhale, atol=1e-5)
    with pytest.raises(ValueError, match="direction"):
        synthetic.breathing_field(anatomy, 15.0, np.random.default_rng(2), "up")


def test_inverse_of_a_shift_and_of_breathing(anatomy):
    shift = np.broadcast_to(np.float32([3.0, -1.5, 7.0]), (16, 16, 16, 3))
    v, residual = synthetic.invert_displacement(shift, 2.0)
    np.testing.assert_allclose(v, -shift, atol=1e-5)
    u, _ = synthetic.breathing_field(anatomy, 25.0, np.random.default_rng(3), "inhale")
    v, residual = synthetic.invert_displacement(u, anatomy.spacing)
    assert residual[anatomy.lungs].max() < 0.05 and residual.max() < 0.05
    # y(y^-1(z)) = z checked independently: z + v(z) mapped by y lands on z
    points = np.asarray(geometry.grid_points(u.shape[:3], geometry.as_spacing(anatomy.spacing, 1)))[0]
    back = points + v + sample(u, points + v, anatomy.spacing)
    assert np.abs(back - points).max() < 0.05


# --- the pair ---------------------------------------------------------------------------------


def test_warping_the_moving_image_by_u_gives_the_fixed_image(clean_pair, pair, anatomy):
    lungs = anatomy.lungs
    for case, ratio in ((clean_pair, 0.3), (pair, 0.5)):
        fixed, moving, u = case["fixed"], case["moving"], case["displacement"]
        before = np.abs(fixed - moving)[lungs].mean()
        after = np.abs(fixed - warp(moving, u, case["spacing_fixed"]))[lungs].mean()
        assert after < ratio * before, (after, before)
    assert clean_pair["moving"].shape == clean_pair["fixed"].shape == anatomy.image.shape


def test_exhale_shrinks_and_densifies_the_lungs(pair, anatomy):
    assert pair["synthesis"]["direction"] == "exhale"
    fixed_lungs, moving_lungs = pair["fixed_labels"] > 0, pair["moving_labels"] > 0
    assert moving_lungs.sum() < 0.95 * fixed_lungs.sum()
    # mass conservation: the same air in less volume is denser
    assert pair["moving"][moving_lungs].mean() > pair["fixed"][fixed_lungs].mean() + 15.0
    assert set(np.unique(pair["moving_labels"])) == {0, 1, 2}


def test_landmarks_are_vessels_in_the_lungs_and_follow_u(pair, anatomy):
    fixed_points, moving_points = pair["fixed_landmarks"], pair["moving_landmarks"]
    assert fixed_points.shape == moving_points.shape == (300, 3)
    np.testing.assert_allclose(moving_points, fixed_points + sample(pair["displacement"], fixed_points,
                                                                    anatomy.spacing), atol=1e-4)
    index = np.floor(fixed_points / anatomy.spacing).astype(int)
    inner = ndimage.binary_erosion(anatomy.lungs, iterations=2)
    assert inner[tuple(index.T)].all()
    assert anatomy.image[tuple(index.T)].mean() > anatomy.image[anatomy.lungs].mean() + 150.0
    moving_index = np.floor(moving_points / anatomy.spacing).astype(int)
    assert np.mean(pair["moving_labels"][tuple(moving_index.T)] > 0) > 0.98
    distances = np.linalg.norm(fixed_points[:, None] - fixed_points[None], axis=-1)
    assert distances[np.triu_indices(300, 1)].min() >= anatomy.spacing.min()  # spread out


def test_landmarks_stay_inside_the_moving_field_of_view(anatomy):
    # a pure 20 mm shift carries the top of the crop out of view: no landmark may map there
    pair = synthetic.make_pair(anatomy.image, anatomy.spacing, seed=1, amplitude_mm=0.0,
                               anatomy=anatomy, shift_mm=(0.0, 0.0, 20.0))
    extent = np.asarray(anatomy.image.shape) * anatomy.spacing
    margin = synthetic.LANDMARK_MARGIN_MM
    assert np.all(pair["moving_landmarks"] >= margin - 1e-3)
    assert np.all(pair["moving_landmarks"] <= extent - margin + 1e-3)
    view = synthetic.stays_in_view(pair["displacement"], anatomy.spacing)
    cut = int(np.ceil((20.0 + margin) / anatomy.spacing[2]))
    assert not view[..., -cut + 1:].any() and view[..., :-cut - 1].any()


def test_same_seed_same_pair(scan, anatomy, pair):
    again = synthetic.make_pair(scan["image"], scan["spacing"], seed=5, amplitude_mm=20.0,
                                anatomy=anatomy)
    for key in ("fixed", "moving", "displacement", "moving_landmarks", "moving_labels"):
        np.testing.assert_array_equal(again[key], pair[key])


def test_random_motion_draws_both_directions_small_motion_and_shifts():
    motion = synthetic.RandomMotion(amplitude_mm=30.0, shift_mm=8.0, pure_shift=0.25)
    rng = np.random.default_rng(0)
    draws = [motion.draw(rng) for _ in range(400)]
    amplitudes = np.array([d["amplitude_mm"] for d in draws])
    assert {d["direction"] for d in draws} == {"exhale", "inhale"}
    assert 0.15 < np.mean(amplitudes == 0) < 0.35 and amplitudes.max() <= 30.0
    assert np.mean((amplitudes > 0) & (amplitudes < 5)) > 0.05  # small motion is drawn too
    shifts = np.array([d["shift_mm"] for d in draws])
    assert np.abs(shifts).max() <= 8.0 and np.abs(shifts).max() > 7.0


def test_a_varied_anatomy_is_another_chest_and_pairs_are_made_from_it(anatomy):
    """``anatomy_mm`` reshapes the scan before each draw: the fixed image is no longer the scan
    (plus noise), the variant still has two lungs, and one seed gives one variant."""
    varied = synthetic.varied_anatomy(anatomy, np.random.default_rng(1), 10.0)
    again = synthetic.varied_anatomy(anatomy, np.random.default_rng(1), 10.0)
    np.testing.assert_array_equal(varied.image, again.image)
    assert varied.image.shape == anatomy.image.shape
    assert np.abs(varied.image - anatomy.image).mean() > 30.0  # HU: visibly another shape
    assert set(np.unique(varied.labels)) == {0, 1, 2}
    assert 0.7 < varied.lungs.sum() / anatomy.lungs.sum() < 1.3
    quiet = dict(noise_hu=(0.0, 0.0), pure_shift=1.0, shift_mm=0.0)  # no noise, no motion
    same, _ = synthetic.random_pair(anatomy, np.random.default_rng(2), synthetic.RandomMotion(**quiet))
    other, _ = synthetic.random_pair(anatomy, np.random.default_rng(2),
                                     synthetic.RandomMotion(anatomy_mm=10.0, **quiet))
    np.testing.assert_allclose(same["fixed"], anatomy.image, atol=1e-3)
    assert np.abs(other["fixed"] - anatomy.image).mean() > 30.0
    np.testing.assert_allclose(other["moving"], other["fixed"], atol=1e-2)  # still no motion


def test_a_variant_without_lungs_falls_back_to_the_scan(anatomy, monkeypatch):
    def no_lungs(*args, **kwargs):
        raise io.DataError("varied anatomy: no lungs found")

    monkeypatch.setattr(synthetic, "analyse", no_lungs)
    assert synthetic.varied_anatomy(anatomy, np.random.default_rng(1), 10.0) is anatomy


# --- reading and writing ----------------------------------------------------------------------


def test_read_ct_gives_ras_order_for_an_lps_file(tmp_path, scan):
    image = nib.load(CT_CROP)
    flipped = np.asarray(image.dataobj)[::-1, ::-1]
    affine = image.affine @ np.array([[-1, 0, 0, 63], [0, -1, 0, 63], [0, 0, 1, 0], [0, 0, 0, 1]])
    path = str(tmp_path / "lps.nii.gz")
    nib.save(nib.Nifti1Image(flipped, affine), path)
    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    array, spacing, canonical = synthetic.read_ct(path)
    np.testing.assert_array_equal(array, scan["image"])
    np.testing.assert_allclose(canonical, image.affine, atol=1e-5)


def test_resampling_keeps_the_extent(scan):
    image, spacing = synthetic.resample_ct(scan["image"], scan["spacing"], 5.0)
    np.testing.assert_allclose(np.array(image.shape) * spacing, [192.0, 192.0, 144.0], rtol=1e-6)
    assert np.all(np.abs(spacing - 5.0) < 0.2)


def test_cli_writes_readable_pair_folders(tmp_path):
    out = tmp_path / "synth"
    code = cli.main(["synth", "--ct", CT_CROP, "--out", str(out), "--pairs-per-scan", "2",
                     "--spacing", "3", "--amplitude", "20", "--seed", "1"])
    assert code == 0
    assert sorted(os.listdir(out)) == ["ct_crop_0", "ct_crop_1"]
    loaded = io.load_pair(str(out / "ct_crop_1"))
    u, spacing = loaded["displacement"], loaded["spacing_fixed"]
    assert loaded["fixed"].shape == u.shape[:3] == (64, 64, 48)
    assert loaded["moving_labels"].max() == 2 and len(loaded["fixed_landmarks"]) == 300
    # what was written is the ground truth: landmarks and images agree with u after reading
    expected = loaded["fixed_landmarks"] + sample(u, loaded["fixed_landmarks"], spacing)
    np.testing.assert_allclose(loaded["moving_landmarks"], expected, atol=0.01)

    # --crop-body: a scan with 10 voxels (30 mm) of air around it comes back cropped to its body
    image = nib.load(CT_CROP)
    padded = np.pad(np.asarray(image.dataobj), 10, constant_values=-1000)
    nib.save(nib.Nifti1Image(padded, image.affine), str(tmp_path / "padded.nii.gz"))
    cropped = tmp_path / "cropped"
    assert cli.main(["synth", "--ct", str(tmp_path / "padded.nii.gz"), "--out", str(cropped),
                     "--spacing", "3", "--amplitude", "20", "--crop-body", "5"]) == 0
    shape = io.load_pair(str(cropped / "padded_0"))["fixed"].shape
    assert np.all(np.array(shape) < np.array(padded.shape) - 10), shape
    lungs = loaded["fixed_labels"] > 0
    before = np.abs(loaded["fixed"] - loaded["moving"])[lungs].mean()
    after = np.abs(loaded["fixed"] - warp(loaded["moving"], u, spacing))[lungs].mean()
    assert after < 0.6 * before
    assert 10.0 <= max(abs(u[..., 2].min()), u[..., 2].max()) <= 20.0 + 1e-3


def test_cli_bad_input_is_one_line_and_leaves_no_output(tmp_path, capsys):
    out = tmp_path / "synth"
    assert cli.main(["synth", "--ct", str(tmp_path / "missing.nii.gz"), "--out", str(out)]) == 2
    assert cli.main(["synth", "--ct", CT_CROP, "--out", str(out), "--pairs-per-scan", "0"]) == 2
    assert cli.main(["synth", "--ct", CT_CROP, "--out", str(out), "--crop-body", "-1"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and "missing.nii.gz" in errors[0] and "--pairs-per-scan" in errors[1]
    assert "--crop-body: expected a margin >= 0 mm" in errors[2]
    assert not out.exists()


def test_inverse_of_a_strongly_compressed_field_converges():
    """det(I + ∇u) down to 0.05 on a coarse grid: Newton's steps stall there (a pipeline drawing
    30 mm on a 32³ grid met such fields, and diverging ones gave NaN images); the plain iteration
    takes over and the inverse is exact to 0.01 mm."""
    n, h = 16, 4.0
    z = geometry.cell_centres(np.arange(n), h)
    amplitude = 0.95 * n * h / (2 * np.pi)
    u = np.zeros((n, n, n, 3), np.float32)
    u[..., 2] = (amplitude * np.sin(2 * np.pi * z / (n * h)))[None, None, :]
    u[..., 0] = (0.5 * amplitude * np.sin(2 * np.pi * z / (n * h)))[:, None, None]
    assert 0.0 < metrics.jacobian_determinant(u, np.full(3, h)).min() < 0.06
    v, residual = synthetic.invert_displacement(u, np.full(3, h, np.float32))
    assert np.isfinite(v).all() and residual.max() < 0.01


def test_a_draw_whose_inverse_fails_is_drawn_again(anatomy, monkeypatch):
    calls = []
    real = synthetic.synthesize

    def failing_once(*args, **kwargs):
        calls.append(kwargs["amplitude_mm"])
        if len(calls) == 1:
            raise ValueError("displacement: the inverse did not converge (non-finite values)")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "synthesize", failing_once)
    pair, _ = synthetic.random_pair(anatomy, np.random.default_rng(0))
    assert len(calls) == 2 and np.isfinite(pair["moving"]).all()
