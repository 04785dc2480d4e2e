"""Figures in the style of the paper: colour overlays (Fig. 2) and Dice box plots (Fig. 1).

Array axes follow DIR-LAB's ``(x, y, z)``: x left-right, y antero-posterior, z cranio-caudal. A
coronal view is the x-z plane through the middle of y, a sagittal view the y-z plane at 30% of x
(through a lung: the middle of a thorax is the mediastinum); z is drawn vertically, and pixels
are drawn to scale in mm.
"""

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ORANGE = np.array([1.0, 0.5, 0.0])  # one phase (the paper: inhale)
BLUE = np.array([0.0, 0.5, 1.0])  # the other (exhale); orange + blue = white, so aligned = grey
DISPLAY_WINDOW = (-1000.0, 200.0)  # HU shown from black to full colour
SAGITTAL_AT = 0.3  # fraction of the x axis where the sagittal view cuts


def _unit(image, window=DISPLAY_WINDOW):
    low, high = window
    return np.clip((np.asarray(image, np.float32) - low) / (high - low), 0.0, 1.0)


def overlay_rgb(first, second, window=DISPLAY_WINDOW):
    """RGB image (..., 3): ``first`` in orange plus ``second`` in blue; equal intensity shows grey."""
    return np.clip(_unit(first, window)[..., None] * ORANGE + _unit(second, window)[..., None] * BLUE,
                   0.0, 1.0)


def _views(volume):
    """Coronal (x-z at mid y) and sagittal (y-z through a lung) slices, z vertical."""
    volume = np.asarray(volume)
    return {
        "coronal": volume[:, volume.shape[1] // 2, :].T,
        "sagittal": volume[int(volume.shape[0] * SAGITTAL_AT), :, :].T,
    }


def _extent(view, spacing, shape):
    across = 0 if view == "coronal" else 1
    return [0, shape[across] * spacing[across], 0, shape[2] * spacing[2]]


def save_overlays(path, fixed, panels, spacing, window=DISPLAY_WINDOW):
    """Write a grid of overlays: one column per ``panels`` entry (title -> moving-like image on
    the fixed grid, e.g. "before" and "after"), coronal row above sagittal row; ``fixed`` in blue."""
    spacing = np.broadcast_to(np.asarray(spacing, float), (3,))
    for title, image in panels.items():  # overlaying arrays of other grids would mean nothing
        if np.shape(image) != np.shape(fixed):
            raise ValueError(f"save_overlays: panel {title!r} has shape {np.shape(image)}, the fixed "
                             f"image {np.shape(fixed)}; resample it onto the fixed grid first")
    figure, axes = plt.subplots(2, len(panels), figsize=(3.2 * len(panels), 6.4), squeeze=False)
    fixed_views = _views(fixed)
    for column, (title, image) in enumerate(panels.items()):
        for row, (view, moving_slice) in enumerate(_views(image).items()):
            axis = axes[row, column]
            axis.imshow(overlay_rgb(moving_slice, fixed_views[view], window), origin="lower",
                        extent=_extent(view, spacing, np.shape(fixed)), interpolation="nearest")
            axis.set_title(f"{title} ({view})", fontsize=9)
            axis.axis("off")
    figure.suptitle("orange: moving (inhale), blue: fixed (exhale); grey where aligned", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def save_dice_boxplot(path, dice_by_method, label_names):
    """Box plot of Dice per label and their mean, one box per method within each group (Fig. 1).

    ``dice_by_method``: ``{method: [{label: dice}, ...]}`` (one dict per case).
    """
    groups = ["mean"] + [label_names.get(label, str(label)) for label in sorted(label_names)]
    methods = list(dice_by_method)
    width = 0.8 / max(len(methods), 1)
    figure, axis = plt.subplots(figsize=(1.4 * len(groups) + 2, 4))
    for index, method in enumerate(methods):
        cases = dice_by_method[method]
        columns = [[np.nanmean([case[label] for label in label_names]) for case in cases]]
        columns += [[case[label] for case in cases] for label in sorted(label_names)]
        positions = np.arange(len(groups)) + (index - (len(methods) - 1) / 2) * width
        boxes = axis.boxplot(columns, positions=positions, widths=width * 0.9, patch_artist=True,
                             manage_ticks=False)
        colour = plt.cm.tab10(index)
        for box in boxes["boxes"]:
            box.set_facecolor(colour)
        axis.plot([], [], color=colour, linewidth=8, label=method)
    axis.set_xticks(np.arange(len(groups)), groups)
    axis.set_ylabel("Dice")
    axis.set_ylim(0, 1.02)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
