"""Geometry against a float64 SciPy reference and analytic cases (DESIGN section 1)."""

import keras
import numpy as np
import pytest
from scipy import ndimage
import tensorflow as tf
from scipy.ndimage import map_coordinates

import tfmlreg
from tfmlreg import geometry
from tfmlreg.layers import ComposeDisplacement, ImagePyramid, Resample, SpatialTransformer

TOL = 1e-4  # of the image range, the bound


def centres_mm(shape, spacing):
    return geometry.grid_points_numpy(shape, spacing)


def reference_sample(volume, points_mm, spacing, fill_value=None):
    """float64 trilinear sampling of one (D, H, W, C) volume with the DESIGN conventions."""
    index = points_mm / np.asarray(spacing, np.float64) - 0.5
    out = np.stack(
        [map_coordinates(volume[..., c].astype(np.float64), np.moveaxis(index, -1, 0), order=1,
                         mode="nearest") for c in range(volume.shape[-1])],
        axis=-1,
    )
    if fill_value is not None:
        dims = np.asarray(volume.shape[:3])
        inside = np.all((index >= -0.5) & (index <= dims - 0.5), axis=-1)
        out[~inside] = fill_value
    return out


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 12, 10, 9, 2)).astype(np.float32)
    spacing = np.array([[1.0, 2.0, 1.5], [0.7, 1.2, 2.5]], np.float32)
    displacement = (rng.normal(size=(2, 12, 10, 9, 3)) * 2.5).astype(np.float32)
    return image, displacement, spacing


def test_warp_matches_scipy_with_per_sample_anisotropic_spacing(batch):
    image, displacement, spacing = batch
    warped = np.asarray(tfmlreg.warp(image, displacement, spacing, fill_value=-3.0))
    scale = image.max() - image.min()
    for b in range(2):
        points = centres_mm(image.shape[1:4], spacing[b]) + displacement[b]
        expected = reference_sample(image[b], points, spacing[b], fill_value=-3.0)
        assert np.abs(warped[b] - expected).max() <= TOL * scale
    # the batch really differs per sample: swapping spacings changes the result
    swapped = np.asarray(tfmlreg.warp(image, displacement, spacing[::-1], fill_value=-3.0))
    assert np.abs(swapped - warped).max() > 0.1


def test_identity_and_translation():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(1, 10, 10, 10, 1)).astype(np.float32)
    zero = np.zeros((1, 10, 10, 10, 3), np.float32)
    np.testing.assert_allclose(tfmlreg.warp(image, zero, 2.0), image, atol=1e-6)
    # a shift of exactly one voxel (2 mm at 2 mm spacing) along axis 1 moves the image by one index
    shift = zero.copy()
    shift[..., 1] = 2.0
    warped = np.asarray(tfmlreg.warp(image, shift, 2.0, fill_value=7.0))
    np.testing.assert_allclose(warped[:, :, :-1], image[:, :, 1:], atol=1e-6)
    # the last row samples at the domain edge (clamped border value), beyond it fill_value
    shift[..., 1] = 2.5
    warped = np.asarray(tfmlreg.warp(image, shift, 2.0, fill_value=7.0))
    assert np.all(warped[:, :, -1] == 7.0)


def affine_field(matrix, offset, shape, spacing):
    x = centres_mm(shape, spacing)
    return (x @ np.asarray(matrix).T + np.asarray(offset))[None].astype(np.float32)


def test_compose_affine_maps_matches_analytic_composition():
    shape, spacing = (16, 14, 12), (1.0, 1.5, 2.0)
    a_outer, t_outer = np.array([[0.05, 0.02, 0], [0, -0.04, 0.01], [0.03, 0, 0.02]]), [1.0, -0.5, 0.8]
    a_inner, t_inner = np.array([[-0.03, 0, 0.02], [0.01, 0.05, 0], [0, 0.02, -0.04]]), [-0.7, 0.6, 0.4]
    outer = affine_field(a_outer, t_outer, shape, spacing)
    inner = affine_field(a_inner, t_inner, shape, spacing)
    composed = np.asarray(tfmlreg.compose(outer, inner, spacing))[0]
    x = centres_mm(shape, spacing)
    y_inner = x + inner[0]
    expected = y_inner + (y_inner @ a_outer.T + t_outer) - x
    interior = (slice(3, -3),) * 3  # away from the border, where the field is clamped
    scale = np.abs(expected).max()
    assert np.abs(composed[interior] - expected[interior]).max() <= TOL * scale


def test_invert_gives_the_inverse_of_an_affine_map():
    shape, spacing = (16, 14, 12), (1.0, 1.5, 2.0)
    matrix, offset = np.array([[0.08, 0.03, 0], [0, -0.06, 0.02], [0.04, 0, 0.05]]), [1.2, -0.8, 0.5]
    field = affine_field(matrix, offset, shape, spacing)
    inverse = np.asarray(geometry.invert(field, spacing))[0]
    x = centres_mm(shape, spacing)
    # y = (I + A) x + t  =>  x = (I + A)^-1 (y - t)
    expected = (x - offset) @ np.linalg.inv(np.eye(3) + matrix).T - x
    interior = (slice(4, -4),) * 3  # the inverse points back inside, away from the clamped border
    assert np.abs(inverse[interior] - expected[interior]).max() <= 1e-3 * np.abs(expected).max()
    round_trip = np.asarray(geometry.compose(field, inverse[None], spacing))[0]
    assert np.abs(round_trip[interior]).max() <= 1e-3 * np.abs(field).max()


def test_resampling_a_linear_field_is_exact_inside_the_domain():
    matrix, offset = np.array([[0.1, 0.2, -0.1], [0.0, 0.3, 0.1], [0.2, 0.0, -0.2]]), [1, 2, 3]
    spacing = np.array([2.0, 3.0, 1.0])
    coarse = affine_field(matrix, offset, (8, 6, 10), spacing)
    fine_shape = (16, 12, 20)
    fine = np.asarray(tfmlreg.resample_displacement(coarse, spacing, fine_shape))[0]
    expected = affine_field(matrix, offset, fine_shape, spacing / 2)[0]
    # inside the outermost coarse cell centres, trilinear interpolation of a linear field is exact
    inside = (slice(1, -1),) * 3
    assert np.abs(fine[inside] - expected[inside]).max() <= TOL * np.abs(expected).max()
    # and the physical extent is kept: coarsening back gives the coarse field at its centres
    back = np.asarray(tfmlreg.resample_displacement(fine[None], spacing / 2, (8, 6, 10)))[0]
    assert np.abs(back - coarse[0])[1:-1, 1:-1, 1:-1].max() <= TOL * np.abs(coarse).max()


def test_resample_is_sampling_at_the_new_cell_centres():
    """The separable resampling (three 1-D interpolations) gives what trilinear sampling at the
    target grid's cell centres gives, borders included, finer and coarser, per sample."""
    rng = np.random.default_rng(4)
    volume = rng.normal(size=(2, 7, 12, 5, 3)).astype(np.float32)
    spacing = np.array([[2.0, 1.5, 3.0], [1.0, 0.7, 2.5]], np.float32)
    for target in ((16, 5, 9), (3, 12, 11)):
        target_spacing = spacing * (np.asarray(volume.shape[1:4]) / np.asarray(target))[None]
        points = geometry.grid_points(target, target_spacing)
        expected = np.asarray(geometry.sample(volume, points, spacing))
        actual = np.asarray(geometry.resample(volume, spacing, target))
        np.testing.assert_allclose(actual, expected, atol=1e-5)


def test_resample_axis_is_linear_interpolation_between_centres():
    """The matrix form of the 1-D interpolation along each axis (batch of 2, 3 and 1 channels,
    finer and coarser) is NumPy's linear interpolation between the cell centres of one extent,
    border values held."""
    rng = np.random.default_rng(5)
    for channels in (3, 1):
        volume = rng.normal(size=(2, 7, 12, 5, channels)).astype(np.float32)
        for axis, size in ((0, 16), (1, 4), (2, 9), (2, 2)):
            source = volume.shape[axis + 1]
            centres = (np.arange(size) + 0.5) * source / size - 0.5  # in source cells
            cells = np.arange(source)

            def interpolate(line, x=centres, xp=cells):
                return np.interp(x, xp, line)

            expected = np.apply_along_axis(interpolate, axis + 1, volume)
            actual = np.asarray(geometry.resample_axis(volume, axis, size))
            np.testing.assert_allclose(actual, expected, atol=1e-5)


def test_sample_at_points_matches_reference(batch):
    image, _, spacing = batch
    rng = np.random.default_rng(2)
    extent = np.asarray(image.shape[1:4]) * spacing[:, None, :].squeeze(1)
    points = (rng.uniform(-0.1, 1.1, size=(2, 7, 3)) * extent[:, None, :]).astype(np.float32)
    values = np.asarray(geometry.sample(image, points, spacing))
    for b in range(2):
        np.testing.assert_allclose(values[b], reference_sample(image[b], points[b], spacing[b]),
                                   atol=TOL * np.ptp(image))


def test_warp_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    image = tf.constant(rng.normal(size=(1, 6, 6, 6, 1)), tf.float32)
    displacement = tf.Variable(rng.uniform(-0.4, 0.4, size=(1, 6, 6, 6, 3)).astype(np.float32))
    spacing = np.array([1.0, 1.3, 0.8], np.float32)
    weights = tf.constant(rng.normal(size=(1, 6, 6, 6, 1)), tf.float32)

    def objective(u):
        return tf.reduce_sum(tfmlreg.warp(image, u, spacing) * weights)

    with tf.GradientTape() as tape:
        value = objective(displacement)
    analytic = tape.gradient(value, displacement).numpy()
    step = 1e-2
    for index in [(0, 2, 3, 1, 0), (0, 3, 2, 2, 1), (0, 1, 4, 3, 2)]:
        plus, minus = displacement.numpy(), displacement.numpy()
        plus[index] += step
        minus[index] -= step
        numeric = (objective(plus) - objective(minus)).numpy() / (2 * step)
        assert abs(numeric - analytic[index]) <= 1e-2 * max(1.0, abs(numeric))


def test_xla_equals_eager(batch):
    image, displacement, spacing = batch
    eager = np.asarray(tfmlreg.warp(image, displacement, spacing))
    xla = tf.function(lambda i, u, s: tfmlreg.warp(i, u, s), jit_compile=True)
    np.testing.assert_allclose(xla(image, displacement, spacing), eager, atol=1e-5)
    compose = tf.function(lambda a, b, s: tfmlreg.compose(a, b, s), jit_compile=True)
    np.testing.assert_allclose(
        compose(displacement, displacement, spacing),
        tfmlreg.compose(displacement, displacement, spacing), rtol=1e-5, atol=1e-5,
    )


def test_mixed_precision_keeps_geometry_in_float32(batch):
    image, displacement, spacing = batch
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = SpatialTransformer()
        out = layer(tf.cast(image, tf.float16), tf.cast(displacement, tf.float16), spacing)
        composed = ComposeDisplacement()(displacement, displacement, spacing)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert out.dtype == tf.float32 and composed.dtype == tf.float32
    assert tfmlreg.warp(tf.cast(image, tf.float16), displacement).dtype == tf.float32


def test_pyramid_averages_and_rejects_sizes_that_do_not_divide():
    volume = np.arange(8 * 8 * 4, dtype=np.float32).reshape(1, 8, 8, 4, 1)
    levels = ImagePyramid(3)(volume)
    assert [tuple(v.shape[1:4]) for v in levels] == [(8, 8, 4), (4, 4, 2), (2, 2, 1)]
    np.testing.assert_allclose(levels[1][0, 0, 0, 0, 0], volume[0, :2, :2, :2, 0].mean())
    with pytest.raises(ValueError, match="multiple of 8"):
        geometry.pyramid(np.zeros((1, 8, 8, 12, 1), np.float32), 4)


def test_spacing_forms_broadcast():
    assert tuple(geometry.as_spacing(2.0, 3).shape) == (3, 3)
    assert tuple(geometry.as_spacing([1.0, 2.0, 3.0], 2).shape) == (2, 3)
    with pytest.raises(ValueError, match="spacing"):
        geometry.as_spacing(np.ones((2, 2, 3)))


def test_grid_variants_agree_on_the_cell_centres():
    spacing = np.array([1.1, 0.7, 2.3], np.float32)
    keras_grid = np.asarray(geometry.grid_points((4, 5, 6), geometry.as_spacing(spacing, 1)))[0]
    numpy_grid = geometry.grid_points_numpy((4, 5, 6), spacing, np.float32)
    np.testing.assert_array_equal(numpy_grid, keras_grid)  # the same float32 values, bit for bit
    np.testing.assert_allclose(numpy_grid[3, 1, 2], [3.5 * 1.1, 1.5 * 0.7, 2.5 * 2.3], rtol=1e-6)
    box = geometry.grid_points_numpy((2, 2, 2), spacing, np.float32, start=(2, 3, 4))
    np.testing.assert_array_equal(box, numpy_grid[2:4, 3:5, 4:6])


def test_model_with_layers_survives_save_and_load(tmp_path, batch):
    image, displacement, spacing = batch
    image_in = keras.Input((12, 10, 9, 2))
    field_in = keras.Input((12, 10, 9, 3))
    spacing_in = keras.Input((3,))
    warped = SpatialTransformer(fill_value=1.0)(image_in, field_in, spacing_in)
    composed = ComposeDisplacement()(field_in, field_in, spacing_in)
    coarse = Resample((6, 5, 3))(composed, spacing_in)
    model = keras.Model([image_in, field_in, spacing_in], [warped, coarse])
    path = tmp_path / "layers.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    for before, after in zip(model([image, displacement, spacing]),
                             loaded([image, displacement, spacing])):
        np.testing.assert_array_equal(before, after)


def test_sample_axes_is_sample_on_a_tensor_grid():
    rng = np.random.default_rng(3)
    volume = rng.normal(size=(9, 7, 8, 2)).astype(np.float32)
    spacing = np.array([1.5, 2.0, 0.8], np.float32)
    # points inside, between the outermost centres and the edge, and beyond the domain
    axes = [np.sort(rng.uniform(-3.0, n * h + 3.0, m)).astype(np.float32)
            for n, h, m in zip(volume.shape[:3], spacing, (5, 6, 4))]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    for fill_value in (None, -7.0):
        expected = np.asarray(geometry.sample(volume[None], points[None], spacing, fill_value))[0]
        got = geometry.sample_axes(volume, axes, spacing, fill_value)
        assert got.shape == expected.shape == (5, 6, 4, 2)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.any(got == -7.0) and np.any(got != -7.0)  # the points reach outside and inside


def test_sample_axes_sigma_is_the_gaussian_filter_first():
    """The anti-aliasing blur folded into sample_axes's matrices gives SciPy's gaussian_filter
    of the whole volume followed by the sampling, fill and an unblurred axis included; a
    grid's own centres come back unchanged."""
    rng = np.random.default_rng(6)
    volume = rng.normal(size=(30, 11, 16, 1)).astype(np.float32)
    spacing = np.array([1.0, 2.0, 0.5], np.float32)
    axes = geometry.axis_centres((7, 11, 5), spacing * np.array([4.2, 1.0, 3.1]), (1.5, -3.0, 0.0))
    sigma = (1.6, 0.0, 1.05)
    for fill_value in (None, -7.0):
        expected = geometry.sample_axes(ndimage.gaussian_filter(volume, (*sigma, 0)), axes,
                                        spacing, fill_value)
        got = geometry.sample_axes(volume, axes, spacing, fill_value, sigma)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    own = geometry.axis_centres(volume.shape[:3], spacing)
    np.testing.assert_array_equal(geometry.sample_axes(volume, own, spacing), volume)


def test_domain_weight_fades_over_the_outer_half_cell():
    spacing = np.array([[2.0, 1.0, 1.0]], np.float32)
    # along the first axis of 4 cells of 2 mm: edge 0, outermost centre 1, inner 4, far edge 8
    depth = np.array([-1.0, 0.0, 0.5, 1.0, 4.0, 7.0, 7.5, 8.0, 9.0], np.float32)
    points = np.stack([depth, np.full_like(depth, 2.0), np.full_like(depth, 2.0)], -1)[None]
    weight = np.asarray(geometry.domain_weight(points, (4, 4, 4), spacing))[0, :, 0]
    np.testing.assert_allclose(weight, [0, 0, 0.5, 1, 1, 1, 0.5, 0, 0], atol=1e-6)
