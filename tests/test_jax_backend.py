"""The core (geometry, losses, networks, model) is backend-neutral keras.ops: under Keras's JAX
backend the model predicts, its folded bfloat16 inference form agrees, and it trains.

Keras picks its backend once per process, so :func:`test_the_core_runs_under_jax` runs this
module again in a child process with ``KERAS_BACKEND=jax`` (JAX is in the ``test`` extra); the
checks themselves run only there."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tfmlreg import layers
from tfmlreg.model import MultilevelRegistration

UNDER_JAX = keras.backend.backend() == "jax"

SHAPE = (16, 16, 16)


def pair(batch=2, seed=1):
    rng = np.random.default_rng(seed)
    return {"fixed": rng.uniform(-1000, 200, (batch, *SHAPE, 1)).astype("float32"),
            "moving": rng.uniform(-1000, 200, (batch, *SHAPE, 1)).astype("float32"),
            "spacing": rng.uniform(0.7, 2.5, (batch, 3)).astype("float32")}


@pytest.mark.slow
@pytest.mark.skipif(UNDER_JAX, reason="the launcher itself runs under TensorFlow")
def test_the_core_runs_under_jax():
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            __file__], env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    assert "1 passed" in child.stdout and "skipped" in child.stdout  # the check ran, not skipped


@pytest.mark.skipif(not UNDER_JAX, reason="runs in test_the_core_runs_under_jax's child")
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
