"""From pairs to what the model trains on: the network grid and a ``tf.data`` pipeline.

The network grid (the paper: 160³) covers the fixed image's physical extent ``[0, n·h]`` per axis
with ``shape`` cells, so its spacing is ``n·h / shape`` per axis and per sample. The fixed image is
resampled onto it; the moving image (which may have another size and spacing) is sampled at the
same physical points, air (-1000 HU) outside its domain. When a grid is coarser than the image
by more than 1.5× along an axis, the image is first smoothed there with a Gaussian of
``(factor - 1) / 2`` voxels (the usual anti-aliasing choice), so small vessels do not alias.
Label maps become one-hot masks of labels ``1..K`` (background excluded) resampled trilinearly.
"""

import numpy as np
import tensorflow as tf
from scipy.ndimage import gaussian_filter

from tfmlreg import geometry
from tfmlreg.data import io

AIR_HU = -1000.0
NUM_LABELS = 5  # the five lung lobes


def network_spacing(image_shape, spacing, shape):
    """Spacing (mm) of ``shape`` cells over the extent of an image of ``image_shape``."""
    return (np.asarray(image_shape, np.float64) * np.asarray(spacing, np.float64)
            / np.asarray(shape, np.float64)).astype(np.float32)


def _antialias(image, image_spacing, grid_spacing):
    factor = np.asarray(grid_spacing, np.float64) / np.asarray(image_spacing, np.float64)
    sigma = np.where(factor > 1.5, (factor - 1.0) / 2.0, 0.0)
    return gaussian_filter(image, sigma) if np.any(sigma > 0) else image


def _sample_on_grid(volume, volume_spacing, shape, grid_spacing, fill_value=None):
    """``volume (D, H, W[, C])`` at the cell centres of ``shape`` cells of ``grid_spacing``."""
    volume = np.asarray(volume, np.float32)
    channels = volume[..., None] if volume.ndim == 3 else volume
    points = geometry.grid_points(shape, geometry.as_spacing(grid_spacing, 1))
    values = np.asarray(geometry.sample(channels[None], points, volume_spacing, fill_value))[0]
    return values[..., 0] if volume.ndim == 3 else values


def one_hot(labels, num_labels=NUM_LABELS):
    """``(D, H, W, K)`` float32 masks of labels ``1..K`` (background excluded)."""
    labels = np.asarray(labels)
    return np.stack([labels == k for k in range(1, num_labels + 1)], axis=-1).astype(np.float32)


def to_network_grid(pair, shape, num_labels=NUM_LABELS):
    """``{"fixed", "moving": shape, "spacing": (3,)[, "fixed_mask", "moving_mask": shape + (K,)]}``."""
    shape = tuple(int(n) for n in shape)
    fixed_shape = np.shape(pair["fixed"])
    spacing = network_spacing(fixed_shape, pair["spacing_fixed"], shape)
    out = {"spacing": spacing}
    for side in ("fixed", "moving"):
        image = _antialias(np.asarray(pair[side], np.float32), pair[f"spacing_{side}"], spacing)
        out[side] = _sample_on_grid(image, pair[f"spacing_{side}"], shape, spacing, AIR_HU)
        if pair.get(f"{side}_labels") is not None:
            out[f"{side}_mask"] = _sample_on_grid(
                one_hot(pair[f"{side}_labels"], num_labels), pair[f"spacing_{side}"], shape,
                spacing, 0.0)
    return out


def displacement_to_full_resolution(displacement, spacing, fixed_shape):
    """A network-grid displacement (mm) evaluated on the fixed image's original grid."""
    field = geometry.resample_displacement(np.asarray(displacement, np.float32)[None],
                                           np.asarray(spacing, np.float32), tuple(fixed_shape))
    return np.asarray(field)[0]


def _pairs(source):
    if isinstance(source, (list, tuple)):
        return list(source)
    cases = io.list_pairs(source)
    if not cases:
        raise io.DataError(f"{source}: no pairs found (expected <case>/fixed.nii.gz and moving.nii.gz)")
    return [io.load_pair(case) for case in cases]


def grid_arrays(source, shape, masks=True, num_labels=NUM_LABELS):
    """All pairs of ``source`` (a folder or a list of pair dicts) on the network grid, stacked."""
    elements = [to_network_grid(pair, shape, num_labels) for pair in _pairs(source)]
    keys = ["fixed", "moving", "spacing"]
    if masks and all("fixed_mask" in e and "moving_mask" in e for e in elements):
        keys += ["fixed_mask", "moving_mask"]
    stacked = {key: np.stack([e[key] for e in elements]) for key in keys}
    for key in ("fixed", "moving"):
        stacked[key] = stacked[key][..., None]
    return stacked


def _augment(element, seed):
    """Intensity augmentation only: geometry stays as the physics made it.

    Each image gets its own HU offset (±30) and a tissue-density scale (0.95–1.05 about air),
    so the network does not key on exact lung HU, which vary with scanner and breath hold.
    """
    out = dict(element)
    for index, key in enumerate(("fixed", "moving")):
        pair_seed = tf.stack([seed, tf.constant(index, tf.int64)])
        draws = tf.random.stateless_uniform((2,), pair_seed, -1.0, 1.0)
        image = element[key]
        out[key] = (image - AIR_HU) * (1.0 + 0.05 * draws[0]) + AIR_HU + 30.0 * draws[1]
    return out


def make_dataset(source, shape, batch_size=1, masks=True, shuffle=True, augment=False, seed=0,
                 repeat=False, num_labels=NUM_LABELS):
    """A ``tf.data.Dataset`` of batched model inputs from a folder of pairs or a list of pairs.

    Elements: ``{"fixed", "moving": (B, D, H, W, 1) raw HU, "spacing": (B, 3) mm}`` plus
    ``"fixed_mask"``/``"moving_mask"`` ``(B, D, H, W, K)`` when ``masks`` and every pair has labels.
    Pairs are resampled once and held in memory (that is the cache); batches are prefetched.
    """
    arrays = grid_arrays(source, shape, masks, num_labels)
    count = len(arrays["fixed"])
    data = tf.data.Dataset.from_tensor_slices(arrays)
    if shuffle:
        data = data.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        data = data.repeat()
    if augment:
        counter = tf.data.Dataset.counter(start=seed)
        data = tf.data.Dataset.zip((data, counter)).map(
            _augment, num_parallel_calls=tf.data.AUTOTUNE)
    return data.batch(batch_size, drop_remainder=False).prefetch(tf.data.AUTOTUNE)
