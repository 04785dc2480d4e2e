"""Figures a paper can use (issue 15): labels, orientation, scale, no false bands outside the
moving scan, the Jacobian and difference beside the overlay, a fitted Dice axis, SVG beside PNG,
and runtimes without the warm-up."""

import numpy as np
import pytest

from tfmlreg import evaluation, figures, geometry

SHAPE = (12, 16, 20)
SPACING = (2.0, 1.5, 1.0)


def volume(seed=0):
    return np.random.default_rng(seed).uniform(-1000.0, 200.0, SHAPE).astype(np.float32)


@pytest.fixture
def captured(monkeypatch):
    """The figures that would be written (and still are), to inspect their artists."""
    figures_made = []
    save = figures.save_figure

    def capture(figure, path, formats=figures.FORMATS, dpi=150):
        figures_made.append(figure)
        return save(figure, path, formats, dpi=40)

    monkeypatch.setattr(figures, "save_figure", capture)
    return figures_made


def panel(figure, title, row):
    """The axes of the column titled ``title`` in ``row`` (0 coronal, 1 sagittal)."""
    matches = [axis for axis in figure.axes if axis.get_title() == title]
    return matches[row]


def edge_letters(axis):
    return {(text.get_position(), text.get_text()) for text in axis.texts if len(text.get_text()) == 1}


def test_overlays_are_titled_labelled_oriented_and_written_as_png_and_svg(tmp_path, captured):
    written = figures.save_overlays(tmp_path / "case.png", volume(0), {"before": volume(1),
                                    "after": volume(2)}, SPACING, title="case 7")
    assert written == [str(tmp_path / "case.png"), str(tmp_path / "case.svg")]
    assert (tmp_path / "case.png").read_bytes()[:4] == b"\x89PNG"
    assert "<svg" in (tmp_path / "case.svg").read_text()[:1000]
    figure = captured[0]
    assert figure._suptitle.get_text().startswith("case 7\n")
    coronal, sagittal = panel(figure, "after: overlay", 0), panel(figure, "after: overlay", 1)
    # RAS+: axis 0 towards the right (drawn rightwards), axis 1 anterior, axis 2 superior (up)
    assert edge_letters(coronal) == {((0.0, 0.5), "L"), ((1.0, 0.5), "R"), ((0.5, 1.0), "S"),
                                     ((0.5, 0.0), "I")}
    assert {letter for _, letter in edge_letters(sagittal)} == {"P", "A", "S", "I"}
    assert coronal.get_xlabel() == "coronal, axis 1 = 12.8 mm (slice 9/16)"  # (8 + 0.5) * 1.5 mm
    assert sagittal.get_xlabel() == "sagittal, axis 0 = 7.0 mm (slice 4/12)"
    assert "mm" in [text.get_text() for text in coronal.texts if "mm" in text.get_text()][0]
    assert [text.get_text() for text in coronal.texts if text.get_text().endswith(" mm")] == [
        "5 mm"]  # the scale bar: a round length near a quarter of the 24 mm width
    np.testing.assert_allclose(coronal.images[0].get_extent(), [0, 24, 0, 20])  # to scale, mm


def test_another_orientation_swaps_the_letters_and_bad_letters_are_refused(tmp_path, captured):
    figures.save_overlays(tmp_path / "o.png", volume(0), {"after": volume(1)}, SPACING, axes="LPI",
                          formats=("png",))
    coronal = panel(captured[0], "after: overlay", 0)
    assert edge_letters(coronal) == {((0.0, 0.5), "R"), ((1.0, 0.5), "L"), ((0.5, 1.0), "I"),
                                     ((0.5, 0.0), "S")}
    for bad in ("RAR", "RA", "XYZ"):
        with pytest.raises(ValueError, match="^axes: expected three orientation letters"):
            figures.save_overlays(tmp_path / "b.png", volume(0), {"after": volume(1)}, SPACING,
                                  axes=bad)


def test_what_the_warp_takes_from_outside_the_moving_scan_is_marked_not_drawn(tmp_path, captured):
    fixed = np.full(SHAPE, 40.0, np.float32)  # tissue everywhere, as a body beyond the scan's end
    warped = fixed.copy()
    warped[..., :3] = -1000.0  # the warp's air fill where y(x) left the moving scan
    displacement = np.zeros(SHAPE + (3,), np.float32)
    displacement[..., 2] = -2.6  # mm: the three lowest slices (centres 0.5, 1.5, 2.5) map below 0
    figures.save_overlays(tmp_path / "o.png", fixed, {"before": fixed, "after": warped}, SPACING,
                          displacement=displacement, formats=("png",))
    figure = captured[0]
    rgb = panel(figure, "after: overlay", 0).images[0].get_array()
    np.testing.assert_allclose(rgb[:3], figures.NO_DATA)  # rows from the bottom (origin lower)
    np.testing.assert_allclose(rgb[3:], figures.overlay_rgb(40.0, 40.0) * np.ones_like(rgb[3:]))
    difference = panel(figure, "after − fixed (HU)", 0).images[0].get_array()
    assert difference.mask[:3].all() and not difference.mask[3:].any()
    assert np.all(difference[3:] == 0.0)  # no false mismatch left
    assert "hatched: outside the moving scan" in figure._suptitle.get_text()


def test_jacobian_panel_shows_the_volume_change(tmp_path, captured):
    centres = geometry.cell_centres(np.arange(SHAPE[2]), SPACING[2])
    displacement = np.zeros(SHAPE + (3,), np.float32)
    displacement[..., 2] = 0.25 * (centres - 10.0)  # a uniform 25 % stretch along axis 2
    figures.save_overlays(tmp_path / "j.png", volume(0), {"after": volume(1)}, SPACING,
                          displacement=displacement, moving_extent_mm=(100, 100, 100),
                          formats=("png",))
    for row in (0, 1):
        det = panel(captured[0], "after: det ∇y (folded ≤ 0 outlined)", row).images[0].get_array()
        np.testing.assert_allclose(det, 1.25, rtol=1e-5)
    with pytest.raises(ValueError, match=r"^displacement: expected shape \(12, 16, 20, 3\)"):
        figures.save_overlays(tmp_path / "j.png", volume(0), {"after": volume(1)}, SPACING,
                              displacement=displacement[:, :8])


def test_dice_axis_fits_the_data(tmp_path, captured):
    dice = {"initial": [{1: 0.80, 2: 0.84}, {1: 0.82, 2: 0.86}],
            "network": [{1: 0.97, 2: 0.99}, {1: 0.96, 2: 0.98}]}
    written = figures.save_dice_boxplot(tmp_path / "dice.png", dice, {1: "LUL", 2: "LLL"})
    assert [path[-4:] for path in written] == [".png", ".svg"]
    low, high = captured[0].axes[0].get_ylim()
    assert (low, high) == (pytest.approx(0.79), pytest.approx(1.0))  # 0.80-0.99, 0.01 margin
    assert figures.dice_limits([0.3, 0.7]) == (pytest.approx(0.28), pytest.approx(0.72))  # 5 %
    assert figures.dice_limits([0.995, 1.0]) == (pytest.approx(0.985), 1.0)  # within [0, 1]
    assert figures.dice_limits([np.nan]) == (0.0, 1.0)


def test_runtime_column_leaves_out_the_warm_up_case():
    cases = [{"dice_mean": 0.9, "folding": 0.0, "tre": np.ones(3), "tre_snapped_mean": 1.0,
              "seconds": seconds} for seconds in (12.0, 1.0, 2.0)]
    row = evaluation.summary_table({"network": cases}).splitlines()[-1]
    assert row.endswith("| 1.50 |")  # (1 + 2) / 2: the first case's tracing is not counted
    single = evaluation.summary_table({"network": cases[:1]}).splitlines()[-1]
    assert single.endswith("| 12.00 |")


def test_outside_marks_on_the_view_slices_what_the_whole_volume_marks():
    """The hatching is computed on the two view slices only; it must be those slices of the
    whole-volume test ``x + u(x)`` outside ``[0, extent]``."""
    rng = np.random.default_rng(5)
    shape, spacing = (14, 11, 9), np.array([2.0, 1.5, 3.0])
    displacement = rng.normal(0.0, 6.0, shape + (3,)).astype(np.float32)
    extent = np.array([25.0, 15.0, 24.0])
    points = geometry.grid_points_numpy(shape, spacing) + displacement
    whole = np.any((points < 0.0) | (points > extent), axis=-1)
    views = figures._outside(displacement, spacing, extent)
    assert set(views) == {"coronal", "sagittal"}
    for view, expected in figures._views(whole).items():
        np.testing.assert_array_equal(views[view], expected)
        assert 0 < expected.sum() < expected.size  # both kinds of voxel on each view
