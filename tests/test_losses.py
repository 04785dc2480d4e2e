"""Losses against the DESIGN.md formulas, exact cases, gradients and the Keras Loss classes."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmlreg import geometry, losses

SPACINGS = np.array([[1.0, 2.0, 0.5], [0.7, 1.3, 2.1]])  # per sample, anisotropic, mm


def cell_centres(shape, spacing):
    """``(D, H, W, 3)`` float64 cell-centre coordinates in mm."""
    return geometry.grid_points_numpy(shape, spacing)


def smooth_image(shape, seed):
    """A smooth random image with edges of every orientation, ``(D, H, W)``."""
    x = cell_centres(shape, (1.0, 1.0, 1.0)) / np.asarray(shape)
    rng = np.random.default_rng(seed)
    k = rng.uniform(1.0, 3.0, size=(3, 3))
    return sum(np.sin(2 * np.pi * x @ k[i] + i) for i in range(3))


# --- independent float64 references (np.gradient / np.diff, not the package's shifted slices) ------


def ngf_reference(fixed, warped, spacing, epsilon):
    out = []
    for f, m, h in zip(fixed[..., 0], warped[..., 0], spacing):
        inner = (slice(1, -1),) * 3
        gf = np.stack(np.gradient(f, *h), -1)[inner]
        gm = np.stack(np.gradient(m, *h), -1)[inner]
        e2 = epsilon**2
        r = (np.sum(gf * gm, -1) + e2) ** 2 / ((np.sum(gf**2, -1) + e2) * (np.sum(gm**2, -1) + e2))
        out.append(np.mean(1 - r))
    return np.array(out)


def curvature_reference(u, spacing):
    out = []
    for v, h in zip(u, spacing):
        lap = 0.0
        for k in range(3):
            d2 = np.diff(v, 2, axis=k) / h[k] ** 2
            index = [slice(1, -1)] * 3
            index[k] = slice(None)
            lap = lap + d2[tuple(index)]
        out.append(0.5 * np.sum(np.mean(lap**2, axis=(0, 1, 2))))
    return np.array(out)


def mask_reference(a, b):
    return np.mean((a - b) ** 2, axis=(1, 2, 3, 4))


def relative_error(value, reference):
    return np.max(np.abs(np.asarray(value, np.float64) - reference) / np.abs(reference))


def test_all_losses_match_float64_reference_with_per_sample_spacing():
    rng = np.random.default_rng(0)
    shape = (2, 10, 12, 9)
    # float32 inputs for the package, the same values in float64 for the reference.
    fixed = rng.normal(size=shape + (1,)).astype(np.float32)
    warped = fixed + 0.7 * rng.normal(size=shape + (1,)).astype(np.float32)
    u = rng.normal(size=shape + (3,)).astype(np.float32)
    onehot_f, onehot_m = ((rng.integers(0, 4, size=shape)[..., None] == np.arange(1, 4)) for _ in range(2))
    onehot_f, onehot_m = onehot_f.astype(np.float32), onehot_m.astype(np.float32)
    f64 = lambda a: a.astype(np.float64)  # noqa: E731

    ngf = losses.ngf(fixed, warped, SPACINGS, 0.3)
    assert relative_error(ngf, ngf_reference(f64(fixed), f64(warped), SPACINGS, 0.3)) <= 1e-5
    curv = losses.curvature(u, SPACINGS)
    assert relative_error(curv, curvature_reference(f64(u), SPACINGS)) <= 1e-5
    mask = losses.mask_distance(onehot_f, onehot_m)
    assert relative_error(mask, mask_reference(f64(onehot_f), f64(onehot_m))) <= 1e-5
    assert tuple(ngf.shape) == tuple(curv.shape) == tuple(mask.shape) == (2,)


def test_curvature_of_x0_squared_is_two_and_affine_is_zero():
    shape, h = (12, 10, 8), np.array([0.5, 1.5, 2.0])
    x = cell_centres(shape, h)
    u = np.zeros(shape + (3,))
    u[..., 0] = x[..., 0] ** 2  # Δu_0 = 2 everywhere: S = 1/2 * 2² = 2
    np.testing.assert_allclose(losses.curvature(u[None].astype(np.float32), h), [2.0], rtol=1e-5)

    a = np.array([[0.3, -1.2, 0.5], [2.0, 0.1, -0.4], [0.7, 0.2, -0.9]])
    affine = x @ a.T + np.array([3.0, -2.0, 1.0])
    np.testing.assert_allclose(losses.curvature(affine[None].astype(np.float32), h), [0.0], atol=1e-6)


def test_folding_penalty_acts_only_below_the_threshold_on_det():
    shape, h = (10, 9, 8), np.array([1.0, 2.0, 1.5])
    x = cell_centres(shape, h)
    # y = A x: det(I + ∇u) = det(A) everywhere (affine, so central differences are exact)
    for a, expected in ((np.diag([0.5, 1.0, 0.8]), 0.0),  # compression, det 0.4: no penalty
                        (np.diag([-0.5, 1.0, 1.0]), (0.1 + 0.5) ** 2),  # folded, det -0.5
                        (np.diag([0.25, 0.2, 1.0]), (0.1 - 0.05) ** 2)):  # about to fold
        u = (x @ a.T - x)[None].astype(np.float32)
        np.testing.assert_allclose(losses.folding(u, h), [expected], rtol=1e-4, atol=1e-7)


def test_curvature_scales_with_anisotropic_spacing_as_the_formula_says():
    # u_0 = i² in voxel indices: Δu_0 = 2 / h_0² mm⁻¹, so S = 2 / h_0⁴ whatever h_1 and h_2 are.
    shape = (10, 8, 8)
    i = np.arange(shape[0], dtype=np.float32)[:, None, None]
    u = np.zeros((2,) + shape + (3,), np.float32)
    u[..., 0] = i**2
    spacing = np.array([[1.0, 1.0, 1.0], [2.0, 0.5, 3.0]])
    np.testing.assert_allclose(losses.curvature(u, spacing), [2.0, 2.0 / 16], rtol=1e-5)


def test_ngf_is_zero_for_identical_images_and_affine_intensity_change():
    shape, h = (16, 16, 16), (1.0, 1.5, 0.8)
    f = smooth_image(shape, 1)[None, ..., None].astype(np.float32)
    assert float(losses.ngf(f, f, h, 0.01)[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.ngf(f, 3.0 * f + 100.0, h, 1e-3)[0]) < 1e-4


def test_ngf_lies_in_unit_interval_and_prefers_aligned_edges():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(3, 12, 12, 12, 1)).astype(np.float32)
    b = rng.normal(size=(3, 12, 12, 12, 1)).astype(np.float32)
    for eps in (1e-4, 0.1, 10.0):
        value = np.asarray(losses.ngf(a, -b, 1.0, eps))
        assert np.all((value >= 0) & (value <= 1))

    box = np.zeros((16, 16, 16), np.float32)
    box[4:11, 5:12, 3:10] = 1.0
    shifted = np.roll(box, (2, -1, 2), axis=(0, 1, 2))
    blur = lambda v: (v + np.roll(v, 1, 0) + np.roll(v, 1, 1) + np.roll(v, 1, 2)) / 4  # noqa: E731
    fixed, aligned, misaligned = (blur(v)[None, ..., None] for v in (box, 2.0 * box, shifted))
    assert float(losses.ngf(fixed, misaligned, 1.0, 0.01)[0]) > float(losses.ngf(fixed, aligned, 1.0, 0.01)[0]) + 0.05


def test_registration_loss_combines_the_terms():
    rng = np.random.default_rng(3)
    f, m = (rng.normal(size=(2, 8, 8, 8, 1)).astype(np.float32) for _ in range(2))
    u = rng.normal(size=(2, 8, 8, 8, 3)).astype(np.float32)
    bf, bm = (rng.uniform(size=(2, 8, 8, 8, 2)).astype(np.float32) for _ in range(2))
    terms = losses.registration_loss_terms(f, m, u, SPACINGS, 0.5, 4.0, 0.1, bf, bm)
    expected = terms["ngf"] + 0.5 * terms["curvature"] + 2.0 * terms["mask"]
    np.testing.assert_allclose(terms["loss"], expected, rtol=1e-6)
    np.testing.assert_allclose(losses.registration_loss(f, m, u, SPACINGS, 0.5, 4.0, 0.1, bf, bm), expected, rtol=1e-6)
    without_masks = losses.registration_loss_terms(f, m, u, SPACINGS, 0.5, 4.0, 0.1)
    assert "mask" not in without_masks
    np.testing.assert_allclose(without_masks["loss"], terms["ngf"] + 0.5 * terms["curvature"], rtol=1e-6)
    with pytest.raises(ValueError, match="both masks"):
        losses.registration_loss(f, m, u, SPACINGS, 0.5, 4.0, 0.1, fixed_onehot=bf)


def test_losses_compile_under_xla_and_match_eager():
    rng = np.random.default_rng(4)
    f, m = (tf.constant(rng.normal(size=(2, 8, 8, 8, 1)), tf.float32) for _ in range(2))
    u = tf.constant(rng.normal(size=(2, 8, 8, 8, 3)), tf.float32)
    bf, bm = (tf.constant(rng.uniform(size=(2, 8, 8, 8, 2)), tf.float32) for _ in range(2))
    spacing = tf.constant(SPACINGS, tf.float32)
    fn = lambda *a: losses.registration_loss(*a[:3], a[3], 0.5, 2.0, 0.1, *a[4:])  # noqa: E731
    jitted = tf.function(fn, jit_compile=True)
    np.testing.assert_allclose(jitted(f, m, u, spacing, bf, bm), fn(f, m, u, spacing, bf, bm), rtol=1e-5)


def test_gradients_are_finite_for_flat_images_zero_fields_and_empty_masks():
    zeros = tf.zeros((2, 6, 6, 6, 1))
    u = tf.Variable(tf.zeros((2, 6, 6, 6, 3)))
    warped = tf.Variable(tf.ones((2, 6, 6, 6, 1)) * 5.0)
    onehot = tf.Variable(tf.zeros((2, 6, 6, 6, 2)))
    for epsilon in (1e-8, 0.01):
        with tf.GradientTape() as tape:
            loss = losses.registration_loss(
                zeros, warped, u, SPACINGS, 1.0, 1.0, epsilon, tf.zeros((2, 6, 6, 6, 2)), onehot
            )
        grads = tape.gradient(loss, [warped, u, onehot])
        assert np.all(np.isfinite(loss))
        for g in grads:
            assert g is not None and np.all(np.isfinite(g))


def test_losses_are_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        f = tf.random.normal((1, 8, 8, 8, 1), dtype=tf.float16)
        u = tf.random.normal((1, 8, 8, 8, 3), dtype=tf.float16)
        assert losses.ngf(f, f, 1.0, 0.1).dtype == tf.float32
        assert losses.curvature(u, 1.0).dtype == tf.float32
        assert losses.mask_distance(f, f).dtype == tf.float32
        assert losses.NGF(0.1)(f, f).dtype == tf.float32
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_bad_arguments_raise_one_line_errors():
    with pytest.raises(ValueError, match="epsilon"):
        losses.NGF(epsilon=0.0)
    with pytest.raises(ValueError, match=">= 3"):
        losses.curvature(np.zeros((1, 2, 8, 8, 3), np.float32), 1.0)
    with pytest.raises(ValueError, match="warped"):
        losses.ngf(np.zeros((1, 8, 8, 8, 1)), np.zeros((1, 8, 8, 6, 1)), 1.0, 0.1)


@pytest.mark.parametrize(
    "loss, config",
    [
        (losses.NGF(epsilon=0.05, spacing=[1.0, 2.0, 0.5]), {"epsilon": 0.05, "spacing": [1.0, 2.0, 0.5]}),
        (losses.Curvature(spacing=2.0), {"spacing": 2.0}),
        (losses.MaskDistance(), {}),
    ],
)
def test_loss_config_round_trip(loss, config):
    assert {k: loss.get_config()[k] for k in config} == config
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is type(loss) and restored.get_config() == loss.get_config()
    y = np.random.default_rng(5).normal(size=(2, 6, 6, 6, 3)).astype(np.float32)
    np.testing.assert_allclose(restored(y * 0.5, y), loss(y * 0.5, y), rtol=1e-6)


def test_loss_classes_give_the_reference_objective_in_a_keras_model_and_train_it():
    image = keras.Input((8, 8, 8, 1))
    displacement = keras.layers.Conv3D(3, 3, padding="same", name="displacement")(image)
    warped = keras.layers.Conv3D(1, 3, padding="same", name="warped")(image)
    masks = keras.layers.Conv3D(2, 1, activation="sigmoid", name="masks")(image)
    model = keras.Model(image, {"displacement": displacement, "warped": warped, "masks": masks})
    model.compile(
        optimizer=keras.optimizers.SGD(1e-3),
        loss={"displacement": losses.Curvature(spacing=1.5), "warped": losses.NGF(0.1), "masks": losses.MaskDistance()},
    )
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 8, 8, 8, 1)).astype(np.float32)
    y = {
        "displacement": np.zeros((2, 8, 8, 8, 3), np.float32),
        "warped": x,
        "masks": (rng.uniform(size=(2, 8, 8, 8, 2)) > 0.5).astype(np.float32),
    }
    predicted = {k: np.asarray(v, np.float64) for k, v in model(x).items()}
    # what Keras must report: each Loss's batch mean, summed over the outputs
    expected = {
        "displacement_loss": curvature_reference(predicted["displacement"], [[1.5] * 3] * 2).mean(),
        "warped_loss": ngf_reference(x.astype(np.float64), predicted["warped"], [[1.0] * 3] * 2, 0.1).mean(),
        "masks_loss": mask_reference(y["masks"].astype(np.float64), predicted["masks"]).mean(),
    }
    expected["loss"] = sum(expected.values())
    before = model.evaluate(x, y, batch_size=2, verbose=0, return_dict=True)
    for key, value in expected.items():
        assert before[key] == pytest.approx(value, rel=1e-4), key
    history = model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert history.history["loss"][0] == pytest.approx(expected["loss"], rel=1e-4)  # pre-step
    after = model.evaluate(x, y, batch_size=2, verbose=0, return_dict=True)
    assert after["loss"] < before["loss"]  # the step descended


def test_displacement_error_is_the_mean_squared_distance_in_mm():
    truth = np.zeros((2, 4, 4, 4, 3), np.float32)
    field = truth.copy()
    field[0, ..., 0] = 3.0
    field[0, ..., 1] = 4.0  # |u - u_true| = 5 mm everywhere in sample 0
    field[1, 0] = 2.0  # a quarter of sample 1's voxels off by 2 mm on all three components
    np.testing.assert_allclose(np.asarray(losses.displacement_error(field, truth)), [25.0, 3.0])
