"""Metrics against hand-computed cases: Jacobian, folding, Dice, label warping, TRE."""

import numpy as np
import pytest

from tfmlreg import geometry, metrics

H = np.array([0.8, 1.5, 2.5])  # anisotropic spacing, mm


def cell_centres(shape, spacing):
    return geometry.grid_points_numpy(shape, spacing)


A = np.array([[0.1, -0.3, 0.2], [0.05, -0.2, 0.4], [0.3, 0.1, 0.25]])


def test_jacobian_of_affine_field_is_det_of_i_plus_a_everywhere_including_slabs(monkeypatch):
    shape = (9, 7, 6)
    u = (cell_centres(shape, H) @ A.T + np.array([1.0, -2.0, 0.5])).astype(np.float32)
    expected = np.linalg.det(np.eye(3) + A)
    np.testing.assert_allclose(metrics.jacobian_determinant(u, H), expected, rtol=1e-5)
    # Slab by slab (here one slice per slab) must give the whole-volume np.gradient result.
    monkeypatch.setattr(metrics, "SLAB_VOXELS", 1)
    rng = np.random.default_rng(0)
    v = rng.normal(size=shape + (3,))
    grad = np.stack([np.stack(np.gradient(v[..., c], *H), -1) for c in range(3)], -2)
    np.testing.assert_allclose(metrics.jacobian_determinant(v, H), np.linalg.det(np.eye(3) + grad), rtol=1e-10)


def test_folding_fraction_of_a_known_folded_region():
    # u_0 drops 4 h_0 per step between slices 3..6, so ∂u_0/∂x_0 is -4 on slices 4..6 and -2 on the
    # central differences at slices 3 and 7 (mixing one flat step): det = 1 + ∂u_0/∂x_0 < 0 on
    # slices 3..7, and 1 elsewhere.
    shape = (16, 5, 4)
    steps = np.zeros(shape[0] - 1)
    steps[3:7] = -4 * H[0]
    u = np.zeros(shape + (3,))
    u[..., 0] = np.concatenate([[0.0], np.cumsum(steps)])[:, None, None]
    det = metrics.jacobian_determinant(u, H)
    np.testing.assert_allclose(det[:, 0, 0], [1, 1, 1, -1, -3, -3, -3, -1, 1, 1, 1, 1, 1, 1, 1, 1])
    assert metrics.folding_fraction(u, H) == pytest.approx(5 / 16)
    assert metrics.folding_fraction(np.zeros(shape + (3,)), H) == 0.0
    # a determinant computed already (register writes it) is counted, not computed again
    assert metrics.folding_fraction(u, H, jacobian=det) == pytest.approx(5 / 16)
    with pytest.raises(ValueError, match="jacobian"):
        metrics.folding_fraction(u, H, jacobian=det[1:])


def test_dice_against_hand_counts():
    fixed = np.array([[[1, 1, 2, 0], [0, 3, 3, 3]]])
    warped = np.array([[[1, 0, 2, 2], [0, 3, 3, 4]]])
    # 1: |F|=2 |M|=1 ∩=1; 2: |F|=1 |M|=2 ∩=1; 3: |F|=3 |M|=2 ∩=2; 4: only in warped.
    scores = metrics.dice(fixed, warped)
    assert list(scores) == [1, 2, 3, 4]
    np.testing.assert_allclose([scores[k] for k in (1, 2, 3, 4)], [2 / 3, 2 / 3, 4 / 5, 0.0])
    chosen = metrics.dice(fixed, warped, labels=[3, 7])
    assert chosen[3] == pytest.approx(0.8) and np.isnan(chosen[7])  # 7: empty in both -> nan
    assert metrics.dice(fixed, fixed) == {1: 1.0, 2: 1.0, 3: 1.0}
    with pytest.raises(ValueError, match="warped_labels"):
        metrics.dice(fixed, warped[..., :3])


def test_warp_labels_identity_translation_and_argmax_of_warped_onehot(monkeypatch):
    rng = np.random.default_rng(1)
    labels = np.zeros((12, 10, 8), np.int16)
    labels[2:8, 3:9, 1:6] = 2
    labels[5:11, 1:5, 2:8] = 5
    np.testing.assert_array_equal(metrics.warp_labels(labels, np.zeros((12, 10, 8, 3)), H), labels)

    # Pull-back by one voxel along axis 0: warped[i] = labels[i + 1], background past the edge.
    shift = np.zeros((12, 10, 8, 3))
    shift[..., 0] = H[0]
    expected = np.concatenate([labels[1:], np.zeros_like(labels[:1])])
    np.testing.assert_array_equal(metrics.warp_labels(labels, shift, H), expected)

    # A random field, slab by slab, equals the argmax of the whole warped one-hot stack.
    u = np.stack([np.cumsum(rng.normal(scale=0.4, size=(12, 10, 8)), axis=c) * H[c] for c in range(3)], -1)
    onehot = (labels[None, ..., None] == np.array([0, 2, 5])).astype(np.float32)
    onehot[..., 0] -= 1.0  # background as (1 - its one-hot), so the fill value 0 means background
    warped = np.array(geometry.warp(onehot, u[None].astype(np.float32), H, fill_value=0.0))[0]
    warped[..., 0] += 1.0
    monkeypatch.setattr(metrics, "SLAB_VOXELS", 10 * 8 * 3)
    np.testing.assert_array_equal(metrics.warp_labels(labels, u, H), np.array([0, 2, 5])[warped.argmax(-1)])


def test_tre_is_zero_for_the_exact_translation_and_matches_hand_values():
    shape = (10, 12, 8)
    t = np.array([1.3, -2.2, 0.7])
    rng = np.random.default_rng(2)
    fixed = rng.uniform(0.0, 1.0, size=(20, 3)) * np.asarray(shape) * H
    np.testing.assert_allclose(metrics.tre(np.broadcast_to(t, shape + (3,)), H, fixed, fixed + t), 0.0, atol=1e-5)

    # A linear field is interpolated exactly between the outermost cell centres.
    u = cell_centres(shape, H) @ A.T
    inner = H * (1.0 + rng.uniform(0.0, 1.0, size=(20, 3)) * (np.asarray(shape) - 3))
    moving = inner + np.array([0.0, 3.0, 4.0])
    expected = np.linalg.norm(inner @ A.T - [0, 3, 4], axis=-1)
    np.testing.assert_allclose(metrics.tre(u, H, inner, moving), expected, rtol=1e-5)

    # Snapping: u = 0.3 voxel puts voxel-centre landmarks back on their own centre.
    centres = (np.array([[2, 3, 1], [7, 0, 5]]) + 0.5) * H
    moving = centres + np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    small = np.broadcast_to(0.3 * H, shape + (3,))
    np.testing.assert_allclose(metrics.tre_snapped(small, H, centres, moving), [5.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(
        metrics.tre(small, H, centres, moving), np.linalg.norm(centres + 0.3 * H - moving, axis=-1), rtol=1e-6
    )


def test_tre_summary():
    summary = metrics.tre_summary([1.0, 2.0, 6.0])
    assert summary == pytest.approx({"mean": 3.0, "std": np.sqrt(14 / 3), "max": 6.0})
    with pytest.raises(ValueError, match="errors"):
        metrics.tre_summary([])


def test_bad_spacing_and_shapes_raise():
    with pytest.raises(ValueError, match="spacing"):
        metrics.jacobian_determinant(np.zeros((4, 4, 4, 3)), (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="u:"):
        metrics.folding_fraction(np.zeros((4, 4, 4, 2)), 1.0)
    with pytest.raises(ValueError, match="moving_points_mm"):
        metrics.tre(np.zeros((4, 4, 4, 3)), 1.0, np.zeros((3, 3)), np.zeros((2, 3)))
