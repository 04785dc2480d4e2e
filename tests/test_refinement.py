"""Test-time refinement: known answers on a real-CT crop, monotonicity, tracing, determinism."""

import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from tfmlreg import geometry, refinement

CROP = os.path.join(os.path.dirname(__file__), "data", "ct_crop.nii.gz")
FAST = dict(levels=3, iterations=40)


@pytest.fixture(scope="module")
def ct():
    image = nib.as_closest_canonical(nib.load(CROP))
    return np.asarray(image.dataobj, np.float32), np.array([3.0, 3.0, 3.0], np.float32)


def smooth_field(shape, spacing, amplitude=6.0):
    """A smooth non-affine field (mm): a cranio-caudal bump plus a lateral sine."""
    points = np.asarray(geometry.grid_points(shape, geometry.as_spacing(spacing, 1)))[0]
    extent = np.asarray(shape) * spacing
    field = np.zeros(shape + (3,), np.float32)
    field[..., 2] = amplitude * np.exp(-np.sum(((points - extent / 2) / (extent / 3)) ** 2, -1))
    field[..., 0] = 0.5 * amplitude * np.sin(np.pi * points[..., 2] / extent[2])
    return field


def make_pair(ct, field):
    """``fixed = moving ∘ y``: the exact answer of registering ``moving = ct`` to ``fixed``."""
    image, spacing = ct
    fixed = np.asarray(geometry.warp(image[None, ..., None], field[None], spacing, -1000.0))
    return fixed[0, ..., 0], image


def interior_body(fixed, margin=4):
    inner = np.zeros(fixed.shape, bool)
    inner[margin:-margin, margin:-margin, margin:-margin] = True
    return inner & (fixed > -500)


def test_recovers_a_known_smooth_field_on_real_ct(ct):
    field = smooth_field(ct[0].shape, ct[1])
    fixed, moving = make_pair(ct, field)
    result = refinement.refine(fixed, moving, ct[1], **FAST)
    region = interior_body(fixed)
    before = np.linalg.norm(field, axis=-1)[region].mean()
    error = np.linalg.norm(result["displacement"] - field, axis=-1)[region]
    assert before > 2.0
    assert error.mean() < 0.6, (error.mean(), before)
    assert np.median(error) < 0.3


def test_never_increases_the_objective_it_minimises(ct):
    field = smooth_field(ct[0].shape, ct[1])
    fixed, moving = make_pair(ct, field)
    rng = np.random.default_rng(0)
    start = field + rng.normal(0.0, 1.5, field.shape).astype(np.float32)
    result = refinement.refine(fixed, moving, ct[1], initial=start, levels=2, iterations=15)
    before = refinement.objective(fixed, moving, ct[1], start)
    after = refinement.objective(fixed, moving, ct[1], result["displacement"])
    assert after < before
    for losses in result["loss"]:  # each level keeps its best state: never above its start
        assert min(losses) <= losses[0]


def test_a_wrong_initial_field_is_dropped_for_zero_and_a_good_one_kept(ct):
    field = smooth_field(ct[0].shape, ct[1])
    fixed, moving = make_pair(ct, field)
    wrong = 8.0 * field  # eight times the motion (48 mm): beyond what the refinement undoes
    dropped = refinement.refine(fixed, moving, ct[1], initial=wrong, **FAST)
    kept = refinement.refine(fixed, moving, ct[1], initial=field, **FAST)
    assert dropped["start"] == "zero" and kept["start"] == "initial"
    region = interior_body(fixed)
    error = np.linalg.norm(dropped["displacement"] - field, axis=-1)[region]
    assert error.mean() < 0.6


def test_zero_iterations_return_the_initial_field(ct):
    field = smooth_field(ct[0].shape, ct[1])
    fixed, moving = make_pair(ct, field)
    result = refinement.refine(fixed, moving, ct[1], initial=field, iterations=0)
    np.testing.assert_array_equal(result["displacement"], field)
    assert result["steps"] == [0] * refinement.RefineConfig().levels


def test_compiled_step_is_traced_once_per_shape_and_results_are_deterministic(ct):
    field = smooth_field(ct[0].shape, ct[1], amplitude=3.0)
    fixed, moving = make_pair(ct, field)
    first = refinement.refine(fixed, moving, ct[1], levels=2, iterations=5, tolerance=0)
    steps = (refinement.compiled_step, refinement.graph_step)
    traces = [step.experimental_get_tracing_count() for step in steps]
    assert all(traces)  # this crop's two levels use one each
    second = refinement.refine(fixed, moving, ct[1], levels=2, iterations=5, tolerance=0,
                           alpha=0.3, learning_rate=0.2)  # other values, same shapes
    assert [step.experimental_get_tracing_count() for step in steps] == traces
    third = refinement.refine(fixed, moving, ct[1], levels=2, iterations=5, tolerance=0)
    np.testing.assert_array_equal(first["displacement"], third["displacement"])
    assert not np.array_equal(first["displacement"], second["displacement"])


@pytest.mark.parametrize("grid", ["finer", "shorter"])
def test_moving_on_its_own_grid(ct, grid):
    """A moving image of another size or spacing in the same mm frame gives the same answer."""
    image, spacing = ct
    field = smooth_field(image.shape, spacing)
    fixed, moving = make_pair(ct, field)
    if grid == "finer":  # 2 mm over the same domain; fixed made from it, so the answer is exact
        shape = (96, 96, 72)
        moving = np.asarray(geometry.resample(moving[None, ..., None], spacing, shape))[0, ..., 0]
        moving_spacing = spacing * np.array(image.shape) / np.array(shape)
        points = geometry.grid_points(image.shape, geometry.as_spacing(spacing, 1)) + field[None]
        fixed = np.asarray(geometry.sample(moving[None, ..., None], points, moving_spacing,
                                           -1000.0))[0, ..., 0]
    else:  # the top 4 slices missing: a smaller field of view
        moving, moving_spacing = moving[:, :, :44], spacing
    result = refinement.refine(fixed, moving, spacing, moving_spacing, **FAST)
    region = interior_body(fixed)
    region[:, :, 36:] = False  # the top, which the shorter moving image cannot show
    error = np.linalg.norm(result["displacement"] - field, axis=-1)[region]
    assert error.mean() < 0.6


def test_a_moving_scan_cut_short_does_not_draw_the_field_past_its_cut(ct):
    """Voxels mapped beyond the moving scan are left out of the similarity: near a cut through
    the body the field is still recovered (with the border's continuation in the similarity, the
    error within 36 mm of the cut was 0.68 mm here)."""
    field = smooth_field(ct[0].shape, ct[1], amplitude=12.0)
    fixed, moving = make_pair(ct, field)
    cut = 36  # the moving scan ends 12 slices (36 mm) short of the fixed one, at the top
    result = refinement.refine(fixed, moving[:, :, :cut], ct[1], **FAST)
    near = interior_body(fixed)
    near[:, :, : cut - 12] = False
    near[:, :, cut:] = False  # beyond the cut the moving scan shows nothing
    error = np.linalg.norm(result["displacement"] - field, axis=-1)[near]
    assert error.mean() < 0.55


def test_mask_restricts_the_similarity(ct):
    field = smooth_field(ct[0].shape, ct[1])
    fixed, moving = make_pair(ct, field)
    nothing = np.zeros(fixed.shape, np.float32)
    nothing[:8, :8, :8] = 1.0  # a corner of air: no edges, nothing to register
    masked = refinement.refine(fixed, moving, ct[1], mask=nothing, levels=2, iterations=10)
    full = refinement.refine(fixed, moving, ct[1], levels=2, iterations=10)
    region = interior_body(fixed)
    moved = np.abs(masked["displacement"])[region].mean()
    assert moved < 0.2 * np.abs(full["displacement"])[region].mean()


def test_graph_path_matches_the_python_path():
    image = nib.as_closest_canonical(nib.load(CROP))
    ct = np.asarray(image.dataobj, np.float32)[16:48, 16:48, 8:40]
    spacing = np.array([3.0, 3.0, 3.0], np.float32)
    field = smooth_field(ct.shape, spacing, amplitude=4.0)
    fixed, moving = make_pair((ct, spacing), field)
    start = 0.5 * field
    settings = dict(levels=2, iterations=8, tolerance=0, finest_spacing_mm=None)
    python = refinement.refine(fixed, moving, spacing, initial=start, **settings)["displacement"]
    graph = refinement.refine_graph(fixed[None, ..., None], moving[None, ..., None], spacing[None],
                                start[None], **settings)
    np.testing.assert_allclose(np.asarray(graph)[0], python, atol=1e-3)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="iterations"):
        refinement.RefineConfig(iterations=-1)
    with pytest.raises(ValueError, match="fixed"):
        refinement.refine(np.zeros((8, 8)), np.zeros((8, 8, 8)), 1.0)



class FieldPredictor:
    """A stand-in network on the crop's own grid that returns one fixed field (mm)."""

    def __init__(self, field):
        self.field, self.shape = field, field.shape[:3]

    def __call__(self, fixed, moving, spacing):
        return {"displacement": self.field[None], "warped": moving}


def test_register_pair_reports_the_start_the_refinement_kept(ct):
    from tfmlreg.inference import register_pair

    field = smooth_field(ct[0].shape, ct[1])
    fixed, moving = make_pair(ct, field)
    pair = {"fixed": fixed, "moving": moving, "spacing_fixed": ct[1], "spacing_moving": ct[1]}
    config = refinement.RefineConfig(finest_spacing_mm=None, **FAST)
    starts = {name: register_pair(predictor, pair, refine=config)["refinement_start"]
              for name, predictor in (("good", FieldPredictor(field)),
                                      ("wrong", FieldPredictor(8.0 * field)), ("none", None))}
    assert starts == {"good": "initial", "wrong": "zero", "none": "zero"}
    assert "refinement_start" not in register_pair(FieldPredictor(field), pair)  # no refinement


def test_smoothing_floor_smooths_a_level_on_the_image_own_grid():
    rng = np.random.default_rng(0)
    image = rng.normal(0.0, 1.0, (1, 12, 12, 12, 1)).astype(np.float32)
    same = np.asarray(refinement.smooth_resample(image, (12, 12, 12)))
    np.testing.assert_array_equal(same, image)  # no floor: a level on the own grid is the image
    smoothed = np.asarray(refinement.smooth_resample(image, (12, 12, 12), 0.5))
    assert smoothed.std() < 0.6 * image.std()  # white noise through σ = 0.5 cells per axis
    assert abs(smoothed.mean() - image.mean()) < 0.05  # a normalised kernel keeps the mean


def test_smooth_resample_axis_by_axis_is_the_blur_then_the_resampling():
    """The blur and the resampling go axis by axis, each axis one matrix (cheap on a
    full-resolution CT); that must be the blur of the whole image (SciPy's, border mirrored)
    followed by the trilinear resampling of it."""
    image = np.random.default_rng(1).normal(0.0, 1.0, (1, 20, 9, 14, 1)).astype(np.float32)
    target = (6, 12, 5)  # shrinks 3.3x and 2.8x, grows along the second axis
    blurred = image[0, ..., 0].astype(np.float64)
    for axis, factor in enumerate(np.asarray(image.shape[1:4]) / np.asarray(target)):
        sigma = max((factor - 1.0) / 2.0 if factor > 1.5 else 0.0, 0.5)
        radius = max(int(np.ceil(2.5 * sigma)), 1)
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        blurred = ndimage.correlate1d(blurred, taps / taps.sum(), axis=axis, mode="reflect")
    expected = geometry.resample(blurred[None, ..., None].astype(np.float32), 1.0, target)
    actual = refinement.smooth_resample(image, target, 0.5)
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=1e-5)
