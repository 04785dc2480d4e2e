"""Shared test helpers (importable as ``from conftest import ...``; pytest puts tests/ on the path)."""

import os
import tempfile

import numpy as np
import pytest

from tfmlreg.model import MultilevelRegistration

# The tfmlreg command keeps compiled XLA steps in a cache (tfmlreg.compilation_cache): for the
# tests a fresh folder, never the user's own cache.
os.environ.setdefault("TFMLREG_XLA_CACHE", tempfile.mkdtemp(prefix="tfmlreg-xla-"))

# The committed real-CT test fixture (attribution in tests/data/README.md): RAS+, 3 mm, 64x64x48 HU.
CT_CROP = os.path.join(os.path.dirname(__file__), "data", "ct_crop.nii.gz")


@pytest.fixture(scope="module")
def scan():
    """The CT crop as a scan dict (:func:`tfmlreg.data.synthetic.load_scan`)."""
    from tfmlreg.data import synthetic

    return synthetic.load_scan(CT_CROP)


# Whole modules of integration tests (commands end to end, training runs with checkpoints,
# export, serving); single slow tests elsewhere carry @pytest.mark.slow themselves.
SLOW_MODULES = {"test_cli", "test_resume", "test_export", "test_export_refined", "test_onnx",
                "test_serving"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module is not None and item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


def registration_model(shape, **config):
    """A tiny real model whose flow heads move voxels by a few voxels (fresh heads start near
    zero, which would make every comparison of displacements and warps trivially pass).

    Batch-normalised unless ``normalization`` says otherwise: the export folds it into the
    ``"none"`` topology, which is what every shipped model exports."""
    config.setdefault("normalization", "batch")
    model = MultilevelRegistration(shape=shape, **config)
    rng = np.random.default_rng(0)
    for weight in model.weights:
        if weight.path == "flow/kernel":
            weight.assign(rng.normal(0.0, 5.0, weight.shape).astype("float32"))
    return model


def trained_looking_weights(model, seed=0):
    """Give ``model``'s batch norms non-trivial scale, offset and statistics and its flow heads
    moves of a few mm (fresh ones are the identity and make every comparison pass)."""
    rng = np.random.default_rng(seed)
    draws = {"gamma": lambda s: rng.uniform(0.5, 2.0, s), "beta": lambda s: rng.normal(0, 0.3, s),
             "moving_mean": lambda s: rng.normal(0, 0.3, s),
             "moving_variance": lambda s: rng.uniform(0.5, 2.0, s),
             "flow/kernel": lambda s: rng.normal(0, 0.3, s)}
    for weight in model.weights:
        for name, draw in draws.items():
            if weight.path.endswith(name):
                weight.assign(draw(weight.shape).astype("float32"))
    return model


def random_inputs(shape, batch, seed=1):
    """Model inputs of raw CT-like intensities on ``shape`` with random per-sample spacing."""
    rng = np.random.default_rng(seed)
    image_shape = (batch, *shape, 1)
    return {
        "fixed": rng.uniform(-1000.0, 200.0, image_shape).astype(np.float32),
        "moving": rng.uniform(-1000.0, 200.0, image_shape).astype(np.float32),
        "spacing": rng.uniform(0.7, 2.5, (batch, 3)).astype(np.float32),
    }
