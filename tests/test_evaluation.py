"""Evaluation with known answers: identity gives the initial values, the ground truth gives ~0 TRE."""

import os

import numpy as np
import pytest

from tfmlreg import evaluation, geometry
from tfmlreg.baselines import elastix_register
from tfmlreg.data import phantom
from tfmlreg.inference import register_pair


@pytest.fixture(scope="module")
def case():
    return phantom.as_case(phantom.make_pair((48, 48, 48), seed=11), "case11")


class IdentityPredictor:
    """A model that returns the identity map (zero displacement) on its grid."""

    shape = (16, 16, 16)

    def __call__(self, fixed, moving, spacing):
        return {"displacement": np.zeros(fixed.shape[:-1] + (3,), np.float32), "warped": moving}


def test_identity_model_reports_the_initial_values(case):
    results = evaluation.evaluate_pair(case, register_pair(IdentityPredictor(), case))
    before, after = results["initial"], results["registered"]
    initial = np.linalg.norm(case["fixed_landmarks"] - case["moving_landmarks"], axis=1)
    assert before["tre_mean"] == pytest.approx(initial.mean(), rel=1e-5)
    assert after["tre_mean"] == pytest.approx(before["tre_mean"], rel=1e-5)
    assert after["dice_mean"] == pytest.approx(before["dice_mean"], abs=1e-6)
    assert before["dice_mean"] < 0.95 and after["folding"] == 0.0


def test_ground_truth_field_gives_zero_tre_and_perfect_dice(case):
    result = evaluation.evaluate_displacement(case, case["displacement"])
    assert result["tre_mean"] < 0.05
    assert result["dice_mean"] == pytest.approx(1.0)
    assert result["folding"] == 0.0


def test_report_has_tables_and_box_plot(case, tmp_path):
    identity = np.zeros(case["fixed"].shape + (3,), np.float32)
    results = {"case11": {"initial": evaluation.evaluate_displacement(case, identity),
                          "ground truth": evaluation.evaluate_displacement(case, case["displacement"])}}
    report = evaluation.write_report(str(tmp_path), results)
    text = open(report).read()
    assert "| **Total** |" in text and "ground truth" in text
    assert os.path.getsize(tmp_path / "dice_boxplot.png") > 1000
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("case,method,dice_mean") and len(rows) == 3


def test_elastix_baseline_recovers_a_translation_in_mm():
    x = geometry.grid_points_numpy((32, 32, 32), 2.0)
    translation = np.array([4.0, -3.0, 2.0])

    def blobs(shift):
        image = np.full((32,) * 3, -1000.0, np.float32)
        for centre in ([20, 24, 30], [40, 36, 28], [30, 44, 40], [26, 30, 46]):
            image += 900.0 * np.exp(-((x - np.add(centre, shift)) ** 2).sum(-1) / 32.0)
        return image

    fixed = blobs(0.0)
    result = elastix_register(fixed, blobs(translation), [2.0, 2.0, 2.0], iterations=150)
    on_blobs = fixed > -700
    np.testing.assert_allclose(result["displacement"][on_blobs].mean(axis=0), translation, atol=1.0)
