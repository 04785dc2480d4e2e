"""Resampling to the network grid and the tf.data pipeline."""

import numpy as np
import tensorflow as tf

from tfmlreg.data import pipeline
from tfmlreg.model import MultilevelRegistration


def linear_pair(shape, spacing):
    axes = [(np.arange(n) + 0.5) * h for n, h in zip(shape, spacing)]
    x = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
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
    axes = [(np.arange(n) + 0.5) * h for n, h in zip((8, 12, 6), grid["spacing"])]
    x = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
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
