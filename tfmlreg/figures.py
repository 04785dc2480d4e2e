"""Figures in the style of the paper: colour overlays (Fig. 2) and Dice box plots (Fig. 1).

Arrays are in the project's RAS+ order (docs/DESIGN.md section 2: axis 0 lateral, towards the
patient's right; axis 1 towards anterior; axis 2 cranio-caudal, towards superior); ``axes``
names another order by the direction each array axis points to (e.g. ``"LAS"``). A coronal view
is the plane of axes 0 and 2 through the middle of axis 1, a sagittal view the plane of axes 1 and
2 at 30% of axis 0 (through a lung: the middle of a thorax is the mediastinum); axis 2 is drawn
vertically, pixels to scale in mm, each view with its orientation letters, slice position and a
scale bar. Every figure is written as PNG and as SVG beside it (``formats``).

Outside the moving scan (where ``y(x) = x + u(x)`` leaves the moving image's domain) a warped
image holds only the warp's fill value (air), not anatomy; drawn as an image it is a false
mismatch (the bands along the top and bottom edge of the "after" overlays, where the body
continues beyond the scan). Given the displacement, such pixels are hatched and left out of the
difference image instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import patheffects  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from numpy.typing import ArrayLike  # noqa: E402

from tfmlreg import geometry, metrics  # noqa: E402
from tfmlreg.ct import DISPLAY_WINDOW  # noqa: E402
from tfmlreg.types import Array, PathLike, Shape, Spacing  # noqa: E402

ORANGE = np.array([1.0, 0.5, 0.0])  # one phase (the paper: inhale)
BLUE = np.array([0.0, 0.5, 1.0])  # the other (exhale); orange + blue = white, so aligned = grey
SAGITTAL_AT = 0.3  # fraction of axis 0 where the sagittal view cuts
NO_DATA = 0.35  # grey level of overlay pixels the warped image has no anatomy for
DIFFERENCE_HU = 400.0  # the difference image's colour range, ± HU
JACOBIAN_RANGE = (0.0, 2.0)  # det ∇y shown from compression to expansion, 1 (no change) white
FORMATS = ("png", "svg")
OPPOSITE = dict(zip("RLAPSI", "LRPAIS"))
PAIRS = {letter: "".join(sorted(letter + OPPOSITE[letter])) for letter in OPPOSITE}
VIEWS = {"coronal": (0, 1), "sagittal": (1, 0)}  # view -> (array axis across, array axis cut)


def _unit(image: ArrayLike, window: Sequence[float] = DISPLAY_WINDOW) -> Array:
    low, high = window
    return np.clip((np.asarray(image, np.float32) - low) / (high - low), 0.0, 1.0)


def overlay_rgb(first: ArrayLike, second: ArrayLike,
                window: Sequence[float] = DISPLAY_WINDOW) -> Array:
    """RGB image (..., 3): ``first`` in orange plus ``second`` in blue; equal intensity is grey."""
    rgb = _unit(first, window)[..., None] * ORANGE + _unit(second, window)[..., None] * BLUE
    return np.clip(rgb, 0.0, 1.0)


def slice_indices(shape: Shape) -> dict[str, int]:
    """``{view: index along the cut axis}``: coronal at the middle of axis 1, sagittal at 30%
    of axis 0."""
    return {"coronal": shape[1] // 2, "sagittal": int(shape[0] * SAGITTAL_AT)}


def _views(volume: ArrayLike) -> dict[str, Array]:
    """``{view: 2-D slice}`` of a volume (extra trailing axes kept), axis 2 vertical."""
    volume = np.asarray(volume)
    at = slice_indices(volume.shape)
    return {"coronal": np.swapaxes(volume[:, at["coronal"]], 0, 1),
            "sagittal": np.swapaxes(volume[at["sagittal"]], 0, 1)}


def _extent(view: str, spacing: Array, shape: Shape) -> list[float]:
    across = VIEWS[view][0]
    return [0, shape[across] * spacing[across], 0, shape[2] * spacing[2]]


def _check_axes(axes: str) -> str:
    codes = str(axes).upper()
    if len(codes) != 3 or {PAIRS.get(c) for c in codes} != {"LR", "AP", "IS"}:
        raise ValueError(f"axes: expected three orientation letters, one of R/L, A/P, S/I each "
                         f"(e.g. 'RAS'), got {axes!r}")
    return codes


def _label_view(axis: Axes, view: str, spacing: Array, shape: Shape, axes: str,
                index: int) -> None:
    """Orientation letters at the four edges, the slice position, a scale bar; no ticks."""
    across, cut = VIEWS[view]
    letters = {(0.0, 0.5): OPPOSITE[axes[across]], (1.0, 0.5): axes[across],
               (0.5, 1.0): axes[2], (0.5, 0.0): OPPOSITE[axes[2]]}
    for (x, y), letter in letters.items():  # on a dark box: readable on any panel
        axis.text(x, y, letter, transform=axis.transAxes, color="white", fontsize=8,
                  fontweight="bold", ha="left" if x == 0.0 else "right" if x == 1.0 else "center",
                  va="bottom" if y == 0.0 else "top" if y == 1.0 else "center",
                  bbox=dict(boxstyle="square,pad=0.15", facecolor="black", alpha=0.6, linewidth=0))
    axis.set_xticks([])
    axis.set_yticks([])
    position = geometry.cell_centres(index, spacing[cut])
    axis.set_xlabel(f"{view}, axis {cut} = {position:.1f} mm (slice {index + 1}/{shape[cut]})",
                    fontsize=7)
    width = shape[across] * spacing[across]
    bar = _round_length(width / 4)
    x0, y0 = 0.08 * width, 0.06 * shape[2] * spacing[2]
    outline = [patheffects.withStroke(linewidth=4, foreground="black")]
    axis.plot([x0, x0 + bar], [y0, y0], color="white", linewidth=2.5, solid_capstyle="butt",
              path_effects=outline)
    axis.text(x0 + bar / 2, y0 * 1.3, f"{bar:g} mm", color="white", fontsize=7, ha="center",
              va="bottom", path_effects=[patheffects.withStroke(linewidth=2, foreground="black")])


def _round_length(mm: float) -> float:
    """The largest of 1, 2, 5 times a power of ten not above ``mm``."""
    power = 10.0 ** np.floor(np.log10(max(mm, 1e-6)))
    return max(step * power for step in (1, 2, 5) if step * power <= mm)


def _outside(displacement: Array, spacing: Array, extent_mm: Array) -> dict[str, Array]:
    """Voxels whose ``x + u(x)`` lies outside ``[0, extent_mm]`` (the moving scan), per view
    (computed on the views' slices alone)."""
    shape = np.shape(displacement)[:3]
    at = slice_indices(shape)
    centres = [geometry.cell_centres(np.arange(n), h) for n, h in zip(shape, spacing)]
    out = {}
    for view, (_, cut) in VIEWS.items():
        index = [slice(None)] * 3
        index[cut] = slice(at[view], at[view] + 1)
        slab = displacement[tuple(index)]
        outside = np.zeros(slab.shape[:3], bool)
        for k in range(3):
            axis_centres = np.expand_dims(centres[k][index[k]], [a for a in range(3) if a != k])
            target = axis_centres + slab[..., k]
            outside |= (target < 0.0) | (target > extent_mm[k])
        out[view] = np.swapaxes(np.take(outside, 0, axis=cut), 0, 1)
    return out


def _jacobian_views(displacement: ArrayLike, spacing: Array) -> dict[str, Array]:
    """det ∇y on the two view slices, from three-slice slabs (the whole volume's values)."""
    at = slice_indices(np.shape(displacement))
    out = {}
    for view, (_, cut) in VIEWS.items():
        index = at[view]
        low, high = max(index - 1, 0), min(index + 2, np.shape(displacement)[cut])
        slab = np.take(displacement, np.arange(low, high), axis=cut)
        det = np.take(metrics.jacobian_determinant(slab, spacing), index - low, axis=cut)
        out[view] = det.T
    return out


def _hatch(axis: Axes, mask: Array, extent: Sequence[float]) -> None:
    if mask.any():
        axis.contourf(mask.astype(float), levels=[0.5, 1.5], colors="none", hatches=["////"],
                      extent=extent, origin="lower")


def save_figure(figure: Figure, path: PathLike, formats: Iterable[str] = FORMATS,
                dpi: float = 150) -> list[str]:
    """Write ``figure`` as ``path`` with each of ``formats`` as suffix; returns the paths."""
    stem = os.path.splitext(os.fspath(path))[0]
    written = []
    for suffix in formats:
        figure.savefig(f"{stem}.{suffix}", dpi=dpi, bbox_inches="tight")
        written.append(f"{stem}.{suffix}")
    plt.close(figure)
    return written


def save_overlays(path: PathLike, fixed: ArrayLike, panels: Mapping[str, ArrayLike],
                  spacing: Spacing, window: Sequence[float] = DISPLAY_WINDOW, *,
                  displacement: ArrayLike | None = None,
                  moving_extent_mm: Spacing | None = None, title: str | None = None,
                  axes: str = "RAS", formats: Iterable[str] = FORMATS) -> list[str]:
    """Overlays of ``panels`` (title -> moving-like image on the fixed grid, e.g. "before" and
    "after") on ``fixed`` (blue), coronal row above sagittal row, then the last panel's difference
    to the fixed image and, with ``displacement`` (mm on the fixed grid, the last panel's field),
    its Jacobian determinant. ``moving_extent_mm`` is the moving scan's extent ``n·h`` per axis in
    the fixed frame (default: the fixed image's): with ``displacement``, what the last panel takes
    from outside it is hatched. ``title`` (e.g. the case name) heads the figure. Returns the files
    written (``path`` with each of ``formats``).
    """
    spacing = np.broadcast_to(np.asarray(spacing, float), (3,))
    axes = _check_axes(axes)
    shape = np.shape(fixed)
    for name, image in panels.items():  # overlaying arrays of other grids would mean nothing
        if np.shape(image) != shape:
            raise ValueError(f"panels: {name!r} has shape {np.shape(image)}, the fixed image "
                             f"{shape}; resample it onto the fixed grid first")
    if displacement is not None and np.shape(displacement) != (*shape, 3):
        raise ValueError(f"displacement: expected shape {(*shape, 3)} (the fixed grid), got "
                         f"{np.shape(displacement)}")
    last = list(panels)[-1]
    outside = _views(np.zeros(shape, bool))
    if displacement is not None:
        extent_mm = (np.asarray(shape) * spacing if moving_extent_mm is None
                     else np.broadcast_to(np.asarray(moving_extent_mm, float), (3,)))
        outside = _outside(np.asarray(displacement, np.float32), spacing, extent_mm)
    columns = len(panels) + 1 + (displacement is not None)
    figure, grid = plt.subplots(2, columns, figsize=(3.0 * columns, 6.6), squeeze=False)
    fixed_views, at = _views(fixed), slice_indices(shape)
    for row, view in enumerate(VIEWS):
        extent = _extent(view, spacing, shape)
        show = dict(origin="lower", extent=extent, interpolation="nearest")
        for column, (name, image) in enumerate(panels.items()):
            axis = grid[row, column]
            rgb = overlay_rgb(_views(image)[view], fixed_views[view], window)
            if name == last:
                rgb[outside[view]] = NO_DATA
            axis.imshow(rgb, **show)
            if name == last:
                _hatch(axis, outside[view], extent)
            axis.set_title(f"{name}: overlay", fontsize=9)
        axis = grid[row, len(panels)]
        difference = np.asarray(_views(panels[last])[view], float) - fixed_views[view]
        difference = np.ma.masked_where(outside[view], difference)
        shown = axis.imshow(difference, cmap="RdBu_r", vmin=-DIFFERENCE_HU, vmax=DIFFERENCE_HU,
                            **show)
        _hatch(axis, outside[view], extent)
        axis.set_title(f"{last} − fixed (HU)", fontsize=9)
        figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.02)
        if displacement is not None:
            axis = grid[row, len(panels) + 1]
            det = _jacobian_views(displacement, spacing)[view]
            shown = axis.imshow(det, cmap="PuOr_r", norm=TwoSlopeNorm(1.0, *JACOBIAN_RANGE), **show)
            if (det <= 0).any():  # folding: outlined, whatever the colour range
                axis.contour(det, levels=[0.0], colors="black", linewidths=0.8, extent=extent,
                             origin="lower")
            axis.set_title(f"{last}: det ∇y (folded ≤ 0 outlined)", fontsize=9)
            figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.02)
        for axis in grid[row]:
            _label_view(axis, view, spacing, shape, axes, at[view])
    heading = "orange: moving (inhale), blue: fixed (exhale); grey where aligned"
    if displacement is not None and any(mask.any() for mask in outside.values()):
        heading += "; hatched: outside the moving scan"
    figure.suptitle(f"{title}\n{heading}" if title else heading, fontsize=9)
    figure.tight_layout()
    return save_figure(figure, path, formats)


def save_dice_boxplot(path: PathLike,
                      dice_by_method: Mapping[str, Sequence[Mapping[Any, float]]],
                      label_names: Mapping[Any, str], title: str | None = None,
                      formats: Iterable[str] = FORMATS) -> list[str]:
    """Box plot of Dice per label and their mean, one box per method within each group (Fig. 1);
    the Dice axis spans the data (with a margin), not 0–1, so close boxes stay apart.

    ``dice_by_method``: ``{method: [{label: dice}, ...]}`` (one dict per case). Returns the files
    written (``path`` with each of ``formats``).
    """
    groups = ["mean"] + [label_names.get(label, str(label)) for label in sorted(label_names)]
    methods = list(dice_by_method)
    width = 0.8 / max(len(methods), 1)
    figure, axis = plt.subplots(figsize=(1.4 * len(groups) + 2, 4))
    values: list[float] = []
    for index, method in enumerate(methods):
        cases = dice_by_method[method]
        columns: list[list[Any]] = [
            [np.nanmean([case[label] for label in label_names]) for case in cases]]
        columns += [[case[label] for case in cases] for label in sorted(label_names)]
        values += [v for column in columns for v in column]
        positions = np.arange(len(groups)) + (index - (len(methods) - 1) / 2) * width
        boxes = axis.boxplot(columns, positions=positions, widths=width * 0.9, patch_artist=True,
                             manage_ticks=False, medianprops=dict(color="black"))
        colour = plt.cm.tab10(index)
        for box in boxes["boxes"]:
            box.set_facecolor(colour)
        axis.plot([], [], color=colour, linewidth=8, label=method)
    axis.set_xticks(np.arange(len(groups)), groups)
    axis.set_ylabel("Dice")
    axis.set_ylim(*dice_limits(values))
    axis.grid(axis="y", alpha=0.3)
    most = max((len(c) for c in dice_by_method.values()), default=0)
    axis.set_title(f"{title + ': ' if title else ''}Dice per label and mean, {most} case(s)",
                   fontsize=10)
    axis.legend(fontsize=8, loc="best")
    figure.tight_layout()
    return save_figure(figure, path, formats)


def dice_limits(values: ArrayLike) -> tuple[float, float]:
    """The Dice axis: the data's range plus 5% of it (at least 0.01) each side, within [0, 1]."""
    finite = np.asarray(values, float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    margin = max(0.05 * (high - low), 0.01)
    return max(0.0, low - margin), min(1.0, high + margin)
