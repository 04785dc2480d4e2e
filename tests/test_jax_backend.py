"""The core (geometry, losses, networks, model) is backend-neutral keras.ops: under Keras's JAX
backend the model predicts, its folded bfloat16 inference form agrees, and it trains.

The project's environment has no JAX, so this runs only under ``KERAS_BACKEND=jax`` in one that
has it, e.g. ``KERAS_BACKEND=jax PYTHONPATH=. .bench-venv/bin/python -m pytest
tests/test_jax_backend.py`` after ``.bench-venv/bin/pip install jax keras pytest``."""

import keras
import numpy as np
import pytest

from tfmlreg import layers
from tfmlreg.model import MultilevelRegistration

pytestmark = pytest.mark.skipif(keras.backend.backend() != "jax",
                                reason="needs KERAS_BACKEND=jax and jax installed")

SHAPE = (16, 16, 16)


def pair(batch=2, seed=1):
    rng = np.random.default_rng(seed)
    return {"fixed": rng.uniform(-1000, 200, (batch, *SHAPE, 1)).astype("float32"),
            "moving": rng.uniform(-1000, 200, (batch, *SHAPE, 1)).astype("float32"),
            "spacing": rng.uniform(0.7, 2.5, (batch, 3)).astype("float32")}


def test_model_predicts_folds_and_trains_under_jax():
    assert not layers.geometry_compiled()  # the XLA wrapping is TensorFlow's; JAX jits itself
    model = MultilevelRegistration(SHAPE, levels=2, base_filters=4, depth=2)
    inputs = pair()
    outputs = model(inputs, training=False)
    assert outputs["displacement"].shape == (2, *SHAPE, 3)
    assert str(outputs["displacement"].dtype) == "float32"
    fast = model.for_inference("bfloat16")(inputs)
    assert str(fast["displacement"].dtype) == "float32"
    assert np.all(np.isfinite(np.asarray(fast["displacement"])))
    folded = model.for_inference("float32")(inputs)
    np.testing.assert_allclose(folded["displacement"], outputs["displacement"], atol=1e-5)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(inputs, epochs=2, batch_size=2, verbose=0)
    assert all(np.isfinite(history.history["loss"]))
