"""Resampling to the network grid and the tf.data pipeline."""


import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from tfmlreg import geometry
from tfmlreg.data import io, pipeline, synthetic
from tfmlreg.model import MultilevelRegistration


def linear_pair(shape, spacing):
    x = geometry.grid_points_numpy(shape, spacing)
    image = (x @ np.array([1.0, -2.0, 0.5])).astype(np.float32)
    labels = (x[..., 0] > x[..., 0].mean()).astype(np.int16) + 1
    return {"fixed": image, "moving": image, "spacing_fixed": np.asarray(spacing, np.float32),
            "spacing_moving": np.asarray(spacing, np.float32), "fixed_labels": labels,
            "moving_labels": labels}


def test_network_grid_keeps_the_physical_extent():
    pair = linear_pair((20, 30, 12), (1.5, 1.0, 2.5))
    grid = pipeline.to_network_grid(pair, (8, 12, 6))
    np.testing.assert_allclose(grid["spacing"] * [8, 12, 6], [30.0, 30.0, 30.0], rtol=1e-6)
    # a linear image sampled at the new cell centres (inside) equals the function there
    x = geometry.grid_points_numpy((8, 12, 6), grid["spacing"])
    expected = x @ np.array([1.0, -2.0, 0.5])
    inner = (slice(1, -1),) * 3
    np.testing.assert_allclose(grid["fixed"][inner], expected[inner], atol=0.6)
    assert grid["fixed_mask"].shape == (8, 12, 6, pipeline.NUM_LABELS)
    np.testing.assert_allclose(grid["fixed_mask"].sum(-1), 1.0, atol=1e-5)


def test_displacement_back_to_full_resolution_keeps_mm_values():
    u = np.full((8, 8, 8, 3), 2.5, np.float32)
    full = pipeline.displacement_to_full_resolution(u, [4.0, 4.0, 4.0], (32, 16, 8))
    assert full.shape == (32, 16, 8, 3)
    np.testing.assert_allclose(full, 2.5, atol=1e-6)


def test_dataset_feeds_model_fit():
    pairs = [linear_pair((24, 24, 24), (2.0, 2.0, 2.0)) for _ in range(2)]
    data = pipeline.make_dataset(pairs, (16, 16, 16), batch_size=2, augment=True)
    element = next(iter(data))
    assert element["fixed"].shape == (2, 16, 16, 16, 1) and element["spacing"].shape == (2, 3)
    assert element["moving_mask"].shape == (2, 16, 16, 16, pipeline.NUM_LABELS)
    assert element["fixed"].dtype == tf.float32
    model = MultilevelRegistration((16, 16, 16), levels=2, base_filters=4)
    model.compile(optimizer="adam")
    history = model.fit(data, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0]) and history.history["mask"][0] > 0


# --- geometric augmentation and synthetic breathing --------------------------------------------



@pytest.fixture(scope="module")
def element(scan):
    """A synthetic pair on a small non-cubic grid with its field and 50 landmarks (no noise)."""
    image, spacing = pipeline.resample_image(scan["image"], scan["spacing"], (64, 56, 48))
    anatomy = synthetic.analyse(image, spacing)
    pair, _ = synthetic.synthesize(anatomy, np.random.default_rng(0), 20.0, "exhale",
                                   noise_hu=(0.0, 0.0), mass_conservation=False)
    inner = np.argwhere(ndimage.binary_erosion(anatomy.lungs, iterations=2))
    points = ((inner[np.random.default_rng(1).choice(len(inner), 50, replace=False)] + 0.5)
              * spacing).astype(np.float32)
    return {"fixed": pair["fixed"][..., None], "moving": pair["moving"][..., None],
            "spacing": spacing, "displacement": pair["displacement"],
            "fixed_mask": pipeline.one_hot(pair["fixed_labels"]),
            "moving_mask": pipeline.one_hot(pair["moving_labels"]),
            "fixed_landmarks": points, "moving_landmarks": points + at(pair["displacement"], points, spacing)}


def at(field, points, spacing):
    return np.asarray(geometry.sample(np.asarray(field, np.float32)[None],
                                      np.asarray(points, np.float32)[None],
                                      np.asarray(spacing, np.float32)))[0]


def mismatch(element):
    """Mean |fixed - moving warped by the element's displacement| in the fixed lungs, and the
    same without warping."""
    warped = np.asarray(geometry.warp(element["moving"][None], element["displacement"][None],
                                      element["spacing"], fill_value=None))[0]
    lungs = element["fixed_mask"].sum(-1) > 0.5
    return (np.abs(element["fixed"] - warped)[..., 0][lungs].mean(),
            np.abs(element["fixed"] - element["moving"])[..., 0][lungs].mean())


def landmark_error(element):
    """Largest |p_F + u(p_F) - p_M| over the fixed landmarks inside the grid (a crop leaves some
    outside, where the field is only its border value)."""
    spacing = np.asarray(element["spacing"])
    extent = np.asarray(element["fixed"].shape[:3]) * spacing
    points = element["fixed_landmarks"]
    inside = np.all((points > spacing) & (points < extent - spacing), axis=1)
    assert inside.sum() >= 10
    fixed_points = element["fixed_landmarks"][inside]
    mapped = fixed_points + at(element["displacement"], fixed_points, spacing)
    return np.abs(mapped - element["moving_landmarks"][inside]).max()


TRANSFORMS = {
    "flip0": lambda e: pipeline.flip(e, 0), "flip1": lambda e: pipeline.flip(e, 1),
    "flip2": lambda e: pipeline.flip(e, 2), "permute": lambda e: pipeline.permute(e, (2, 0, 1)),
    "crop": lambda e: pipeline.crop(e, (4, 2, 3), (52, 48, 40)),
    "shift": lambda e: pipeline.shift_moving(e, (4.0, -3.0, 6.5)),
    "swap": pipeline.swap,
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transforms_keep_the_ground_truth(element, name):
    registered, unregistered = mismatch(element)
    out = TRANSFORMS[name](element)
    after, before = mismatch(out)
    assert after < 0.4 * before and after < 2.0 * registered, (after, before, registered)
    # the crop resamples the field, the swap inverts it on the grid: interpolation errors
    assert landmark_error(out) < (0.5 if name in ("crop", "swap") else 1e-3)
    assert out["fixed"].shape[:3] == out["displacement"].shape[:3] == out["fixed_mask"].shape[:3]
    if name == "permute":
        assert out["fixed"].shape == (48, 64, 56, 1)
        np.testing.assert_allclose(out["spacing"], np.asarray(element["spacing"])[[2, 0, 1]])


def test_a_flip_must_negate_and_a_permutation_reorder_the_field(element):
    flipped = pipeline.flip(element, 2)  # axis 2: the breathing motion's main axis
    wrong = dict(flipped, displacement=np.flip(element["displacement"], 2))
    assert mismatch(wrong)[0] > 2.0 * mismatch(flipped)[0]
    permuted = pipeline.permute(element, (2, 0, 1))
    wrong = dict(permuted, displacement=np.transpose(element["displacement"], (2, 0, 1, 3)))
    assert mismatch(wrong)[0] > 2.0 * mismatch(permuted)[0]


def test_augment_geometry_keeps_the_shape_and_the_ground_truth(element):
    rng = np.random.default_rng(3)
    for _ in range(4):
        out = pipeline.augment_geometry(element, rng, flips=True, permutations=True, swaps=True,
                                        shift_mm=5.0, crop_fraction=0.8)
        assert out["fixed"].shape == element["fixed"].shape  # only equal-size axes are permuted
        after, before = mismatch(out)
        assert after < 0.5 * before and landmark_error(out) < 0.6


def synthetic_dataset(scan, seed, **options):
    motion = synthetic.RandomMotion(noise_hu=(0.0, 0.0))
    return pipeline.make_dataset([scan, scan], (32, 32, 32), batch_size=2, seed=seed,
                                 displacement=True, motion=motion, **options)


def test_synthetic_mode_gives_consistent_new_pairs_each_epoch(scan):
    data = synthetic_dataset(scan, 7, flips=True, permutations=True, crop_fraction=0.8)
    epochs = [[{k: v.numpy() for k, v in batch.items()} for batch in data] for _ in range(2)]
    again = [{k: v.numpy() for k, v in batch.items()} for batch in synthetic_dataset(
        scan, 7, flips=True, permutations=True, crop_fraction=0.8)]
    first = epochs[0][0]
    assert first["displacement"].shape == (2, 32, 32, 32, 3) and first["fixed_mask"].shape[-1] == 5
    np.testing.assert_array_equal(again[0]["moving"], first["moving"])  # same seed, same pairs
    assert not np.array_equal(epochs[1][0]["moving"], first["moving"])  # a new pair per epoch
    for batch in epochs[0] + epochs[1]:
        for index in range(2):
            case = {key: value[index] for key, value in batch.items()}
            after, before = mismatch(case)
            assert after < 0.6 * before + 2.0, (after, before)


def test_pure_shifts_are_constant_fields(scan):
    motion = synthetic.RandomMotion(pure_shift=1.0, shift_mm=6.0, noise_hu=(0.0, 0.0))
    data = pipeline.make_dataset([scan], (32, 32, 32), seed=1, displacement=True, motion=motion,
                                 flips=True, permutations=True)
    for batch in data.repeat(3):
        field = batch["displacement"].numpy()[0].reshape(-1, 3)
        assert np.ptp(field, axis=0).max() < 1e-4 and np.abs(field).max() <= 6.0


def test_stored_pairs_with_augmentation_and_bad_options(element):
    pair = {"fixed": element["fixed"][..., 0], "moving": element["moving"][..., 0],
            "spacing_fixed": element["spacing"], "spacing_moving": element["spacing"],
            "displacement": element["displacement"]}
    data = pipeline.make_dataset([pair], (40, 32, 24), masks=False, displacement=True, swaps=True,
                                 shift_mm=3.0, seed=2)
    batch = next(iter(data.repeat()))
    assert set(batch) == {"fixed", "moving", "spacing", "displacement"}
    with pytest.raises(ValueError, match="crop_fraction"):
        pipeline.make_dataset([pair], (40, 32, 24), crop_fraction=1.5)
    with pytest.raises(io.DataError, match="no ground-truth displacement"):
        pipeline.make_dataset([dict(pair, displacement=None)], (40, 32, 24), displacement=True)
    with pytest.raises(io.DataError, match=r"source\[0\]"):
        pipeline.make_dataset([{"image": 1}], (40, 32, 24))


def stored_pair(element):
    """The element as a stored pair (labels, ground truth) on its own grid."""
    labels = {key: np.where(element[f"{key}_mask"].sum(-1) > 0.5,
                            element[f"{key}_mask"].argmax(-1) + 1, 0).astype(np.int16)
              for key in ("fixed", "moving")}
    return {"fixed": element["fixed"][..., 0], "moving": element["moving"][..., 0],
            "spacing_fixed": element["spacing"], "spacing_moving": element["spacing"],
            "fixed_labels": labels["fixed"], "moving_labels": labels["moving"],
            "displacement": element["displacement"]}


def test_the_datasets_geometric_augmentation_keeps_each_pair_and_its_field_consistent(element):
    shape = element["fixed"].shape[:3]
    plain = next(iter(pipeline.make_dataset([stored_pair(element)], shape, displacement=True)))
    data = pipeline.make_dataset([stored_pair(element)], shape, displacement=True, flips=True,
                                 swaps=True, shift_mm=4.0, seed=5)
    changed = 0
    for batch in data.repeat(6):
        case = {key: value.numpy()[0] for key, value in batch.items()}
        after, before = mismatch(case)
        assert after < 0.5 * before, (after, before)  # the field still maps moving onto fixed
        # each mask moved with its image, so it covers lungs: about -808 HU aligned, above
        # -600 HU with the mask flipped along any axis
        for key in ("fixed", "moving"):
            lungs = case[f"{key}_mask"].sum(-1) > 0.5
            assert lungs.sum() > 1000 and case[key][..., 0][lungs].mean() < -700.0
        changed += not np.array_equal(case["moving"], plain["moving"].numpy()[0])
    assert changed >= 4  # 6 draws of flips (1/2 per axis), swaps and shifts: nearly all differ


def test_intensity_augmentation_is_a_small_affine_change_per_image_and_nothing_else(element):
    shape = element["fixed"].shape[:3]
    plain = next(iter(pipeline.make_dataset([stored_pair(element)], shape, displacement=True)))
    augmented = next(iter(pipeline.make_dataset([stored_pair(element)], shape, displacement=True,
                                                augment=True, seed=3)))
    fits = {}
    for key in ("fixed", "moving"):
        before = plain[key].numpy().ravel() - pipeline.AIR_HU
        after = augmented[key].numpy().ravel() - pipeline.AIR_HU
        scale, offset = np.polyfit(before, after, 1)
        np.testing.assert_allclose(after, scale * before + offset, atol=0.05)  # exactly affine
        assert 0.95 <= scale <= 1.05 and abs(offset) <= 30.0 and (scale, offset) != (1.0, 0.0)
        fits[key] = (scale, offset)
    assert fits["fixed"] != fits["moving"]  # each image its own draw
    for key in ("fixed_mask", "moving_mask", "displacement", "spacing"):  # geometry untouched
        np.testing.assert_array_equal(augmented[key].numpy(), plain[key].numpy())
