"""The breathing-lung phantom: determinism, anatomy, motion and landmarks."""

import numpy as np
import pytest

import tfmlreg
from tfmlreg import metrics
from tfmlreg.data import io, phantom


@pytest.fixture(scope="module")
def pair():
    return phantom.make_pair((64, 64, 64), seed=3)


def test_same_seed_same_bytes(pair):
    again = phantom.make_pair((64, 64, 64), seed=3)
    for key in pair:
        assert np.asarray(pair[key]).tobytes() == np.asarray(again[key]).tobytes(), key
    other = phantom.make_pair((64, 64, 64), seed=4)
    assert not np.array_equal(other["moving"], pair["moving"])


def test_ground_truth_has_no_folding(pair):
    assert metrics.jacobian_determinant(pair["displacement"], pair["spacing"]).min() > 0.0


def test_five_lobes_and_landmarks_inside_the_lungs(pair):
    for side in ("fixed", "moving"):
        assert set(np.unique(pair[f"{side}_labels"])) == {0, 1, 2, 3, 4, 5}
        index = np.floor(pair[f"{side}_landmarks"] / pair["spacing"]).astype(int)
        assert np.all(pair[f"{side}_labels"][tuple(index.T)] > 0)
    assert pair["fixed_landmarks"].shape == (300, 3)


def test_default_motion_is_large_and_the_ground_truth_maps_the_landmarks(pair):
    initial = np.linalg.norm(pair["fixed_landmarks"] - pair["moving_landmarks"], axis=1)
    assert initial.mean() >= 8.0  # DIR-LAB's average initial error is 8.46 mm
    assert np.abs(pair["displacement"][..., 2]).max() > 20.0  # cranio-caudal, up to ~25 mm
    residual = metrics.tre(pair["displacement"], pair["spacing"], pair["fixed_landmarks"],
                           pair["moving_landmarks"])
    assert residual.mean() < 0.1 * initial.mean()


def test_warping_inhale_with_the_ground_truth_reproduces_exhale(pair):
    lungs = pair["fixed_labels"] > 0
    warped = np.asarray(tfmlreg.warp(pair["moving"][None, ..., None], pair["displacement"][None],
                                     pair["spacing"]))[0, ..., 0]
    error_after = np.abs(warped - pair["fixed"])[lungs].mean()
    error_before = np.abs(pair["moving"] - pair["fixed"])[lungs].mean()
    assert error_after < 0.5 * error_before
    assert np.corrcoef(warped[lungs], pair["fixed"][lungs])[0, 1] > 0.8


def test_exhale_lungs_are_denser(pair):
    inhale = pair["moving"][pair["moving_labels"] > 0]
    exhale = pair["fixed"][pair["fixed_labels"] > 0]
    assert np.median(exhale) > np.median(inhale) + 10.0


def test_write_dataset_uses_the_pair_layout(tmp_path):
    names = phantom.write_dataset(str(tmp_path), cases=1, shape=(48, 48, 48), seed=7)
    loaded = io.load_pair(str(tmp_path / names[0]))
    assert loaded["fixed"].shape == (48, 48, 48) and loaded["fixed_landmarks"].shape == (300, 3)
    direct = phantom.make_pair((48, 48, 48), seed=7)
    np.testing.assert_allclose(loaded["moving_landmarks"], direct["moving_landmarks"], atol=1e-2)
