"""The symmetric predictor: the network run both ways and averaged inverse-consistently."""

import numpy as np

from tfmlreg import geometry
from tfmlreg.inference import SymmetricPredictor, load_predictor

SHAPE, SPACING = (12, 10, 8), np.array([[2.0, 2.5, 3.0]], np.float32)


class FakePredictor:
    """Returns ``forward`` when called with ``first`` as the fixed image, else ``backward``."""

    shape = SHAPE

    def __init__(self, first, forward, backward):
        self.first, self.forward, self.backward, self.calls = first, forward, backward, 0

    def __call__(self, fixed, moving, spacing):
        self.calls += 1
        field = self.forward if np.array_equal(fixed, self.first) else self.backward
        return {"displacement": field, "warped": moving}


def images():
    rng = np.random.default_rng(0)
    return tuple(rng.normal(size=(1,) + SHAPE + (1,)).astype(np.float32) for _ in range(2))


def test_an_error_that_ignores_the_order_of_the_images_cancels():
    fixed, moving = images()
    bias = np.broadcast_to(np.float32([1.5, -2.0, 0.7]), (1,) + SHAPE + (3,))
    predictor = SymmetricPredictor(FakePredictor(fixed, bias, bias))
    out = predictor(fixed, moving, SPACING)
    assert predictor.predictor.calls == 2
    assert np.abs(out["displacement"]).max() < 1e-5
    np.testing.assert_allclose(out["warped"], moving, atol=1e-5)  # a zero field warps nothing


def test_an_inverse_consistent_pair_of_fields_is_kept():
    fixed, moving = images()
    shift = np.broadcast_to(np.float32([1.5, -2.0, 0.7]), (1,) + SHAPE + (3,))
    out = SymmetricPredictor(FakePredictor(fixed, shift, -shift))(fixed, moving, SPACING)
    np.testing.assert_allclose(out["displacement"], shift, atol=1e-5)
    expected = np.asarray(geometry.warp(moving, shift, SPACING, -1000.0))
    np.testing.assert_allclose(out["warped"], expected, atol=1e-4)


def test_load_predictor_wraps_on_request_and_not_by_default(tmp_path):
    assert load_predictor("none", symmetric=True) is None  # no network: nothing to run twice
    plain = load_predictor()  # the default model
    wrapped = load_predictor(symmetric=True)
    assert not isinstance(plain, SymmetricPredictor)
    assert isinstance(wrapped, SymmetricPredictor) and wrapped.shape == plain.shape
