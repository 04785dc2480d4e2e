"""A synthetic breathing-lung phantom with known ground truth: the project's embedded data.

Each pair is a thorax in CT intensities (HU): air outside an elliptic body of soft tissue, static
ribs and spine, two lungs (about -850 HU at inhale) split by oblique and horizontal fissures into
five lobes (labels 1 LUL, 2 LLL, 3 RUL, 4 RML, 5 RLL), branching vessel trees (blood, +40 HU, with
partial-volume edges) and airway trees (air lumen, soft-tissue wall), blurred slightly and with
scanner noise (more at exhale, which is scanned at a lower dose).

Array axes follow DIR-LAB: ``(x, y, z)`` = (right→left, posterior→anterior, caudal→cranial).

Motion. The moving image is the inhale phase; the fixed image, exhale, is the inhale image pulled
back by a smooth, invertible, breathing-like displacement ``u`` defined on the fixed grid:
``exhale(x) = inhale(x + u(x))``. ``u`` is largest cranio-caudally at the diaphragm (default
25 mm, fading to zero at the apex), adds an antero-posterior and a small lateral expansion, and
fades to zero towards the body wall, so ribs and spine stay put (the sliding of the lungs along
the chest wall is simplified into this smooth fade). The lung density rises as its volume falls:
parenchyma HU follow mass conservation, ``HU_ex + 1000 = (HU_in + 1000) · det(∇y)``.

Landmarks: vessel branch points in the inhale lungs (``moving_landmarks``), mapped to exhale by
solving ``p_F + u(p_F) = p_M`` (Newton), 300 per pair by default; written as DIR-LAB files with
exact fractional indices.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.ndimage import binary_erosion, gaussian_filter

from tfmlreg import geometry, metrics
from tfmlreg.ct import AIR_HU, LOBE_LABELS, PARENCHYMA_HU, SOFT_TISSUE_HU
from tfmlreg.data import io
from tfmlreg.types import Array, PathLike, Shape, Spacing

HU = {"air": AIR_HU, "lung": PARENCHYMA_HU, "tissue": SOFT_TISSUE_HU, "bone": 700.0, "spine": 400.0,
      "fissure": -700.0, "airway_wall": -100.0}
DEFAULT_FOV_MM = 320.0
BODY_AXES = (0.85, 0.62)  # semi-axes of the body ellipse in x, y (fraction of half the FOV)
LUNG: dict[str, Any] = {"centre_x": 0.36, "centre_y": -0.02, "centre_z": 0.02,
                        "axes": (0.27, 0.44, 0.72)}
TREE_GENERATIONS = 8
AIRWAY_GENERATIONS = 4
# a tree segment: start, end (mm), radius (mm), generation
Segment = tuple[Array, Array, float, int]


def default_spacing(shape: Shape) -> tuple[float, ...]:
    return tuple(DEFAULT_FOV_MM / n for n in shape)


class Frame:
    """Maps mm to the phantom's normalised coordinates ``q`` (centre 0, half FOV 1)."""

    def __init__(self, shape: Shape, spacing: Spacing) -> None:
        self.spacing = np.asarray(spacing, np.float64)
        self.half = np.asarray(shape) * self.spacing / 2.0

    def normalised(self, points_mm: ArrayLike) -> Array:
        return (np.asarray(points_mm, np.float64) - self.half) / self.half

    def mm(self, q: ArrayLike) -> Array:
        return np.asarray(q, np.float64) * self.half + self.half

    def grid(self, shape: Shape) -> Array:
        return geometry.grid_points_numpy(shape, self.spacing)


def _smoothstep(t: ArrayLike) -> Array:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _case_parameters(rng: np.random.Generator, amplitude_mm: float) -> dict[str, Any]:
    """Per-case anatomy and breathing: lung size, motion amplitudes."""
    return {
        "lung_scale": rng.uniform(0.94, 1.06, size=3),
        "amplitude": amplitude_mm * rng.uniform(0.85, 1.15),
        "ap_mm": rng.uniform(5.0, 10.0),
        "lateral_mm": rng.uniform(1.0, 4.0),
    }


# --- motion -------------------------------------------------------------------------------------


def motion(points_mm: ArrayLike, frame: Frame, params: Mapping[str, Any]) -> Array:
    """The breathing displacement ``u`` (mm) at ``points_mm`` (..., 3) in exhale space."""
    q = frame.normalised(points_mm)
    axes = np.asarray(LUNG["axes"]) * params["lung_scale"]
    top, bottom = LUNG["centre_z"] + axes[2], LUNG["centre_z"] - axes[2]
    depth = _smoothstep((top - q[..., 2]) / (top - bottom)) ** 0.8  # 0 at the apex, 1 at the base
    radius = np.hypot(q[..., 0] / BODY_AXES[0], q[..., 1] / BODY_AXES[1])
    inside = _smoothstep((0.92 - radius) / 0.12)  # 1 in the lungs, 0 at the ribs (they stay)
    u = np.empty(q.shape, np.float64)
    u[..., 2] = -params["amplitude"] * depth * inside  # exhale points lie higher: inhale = lower
    u[..., 1] = params["ap_mm"] * (q[..., 1] + 0.6) / 1.2 * inside * (0.5 + 0.5 * depth)
    u[..., 0] = params["lateral_mm"] * q[..., 0] * inside * depth
    return u


def invert_motion(moving_points_mm: ArrayLike, frame: Frame, params: Mapping[str, Any],
                  iterations: int = 20) -> Array:
    """Exhale points ``p_F`` with ``p_F + u(p_F) = p_M`` (Newton with a numerical Jacobian)."""
    target = np.asarray(moving_points_mm, np.float64)
    points = target - motion(target, frame, params)
    step = 1e-3
    for _ in range(iterations):
        residual = points + motion(points, frame, params) - target
        jacobian = np.stack([
            (motion(points + step * e, frame, params) - motion(points - step * e, frame, params))
            / (2 * step) for e in np.eye(3)], axis=-1) + np.eye(3)
        points = points - np.linalg.solve(jacobian, residual[..., None])[..., 0]
    return points


# --- anatomy (inhale space) ---------------------------------------------------------------------


def _lung_coordinates(q: Array, side: int, params: Mapping[str, Any]) -> Array:
    """Each lung's coordinates scaled to its ellipsoid (radius 1 on the surface)."""
    axes = np.asarray(LUNG["axes"]) * params["lung_scale"]
    centre = np.array([side * LUNG["centre_x"], LUNG["centre_y"], LUNG["centre_z"]])
    return (q - centre) / axes


def _lobes(q: Array, params: Mapping[str, Any]) -> tuple[Array, Array]:
    """Label map of the five lobes from two ellipsoids and fissure planes."""
    labels = np.zeros(q.shape[:-1], np.int16)
    fissure = np.zeros(q.shape[:-1], bool)
    for side, names in ((1, ("LUL", "LLL")), (-1, ("RUL", "RLL"))):
        local = _lung_coordinates(q, side, params)
        inside = np.sum(local**2, axis=-1) <= 1.0
        # oblique fissure: from posterior-superior down to anterior-inferior
        oblique = local[..., 2] + 0.8 * local[..., 1] + 0.1
        upper = oblique > 0
        labels[inside & upper] = LOBE_LABELS[names[0]]
        labels[inside & ~upper] = LOBE_LABELS[names[1]]
        fissure |= inside & (np.abs(oblique) < 0.025)
        if side == -1:  # right lung: horizontal fissure splits off the middle lobe
            middle = inside & upper & (local[..., 2] < 0.05)
            labels[middle] = LOBE_LABELS["RML"]
            fissure |= inside & upper & (np.abs(local[..., 2] - 0.05) < 0.02)
    return labels, fissure


def _static_structures(q: Array, image: Array) -> None:
    """Ribs in the body wall and the spine, posterior in the middle."""
    radius = np.hypot(q[..., 0] / BODY_AXES[0], q[..., 1] / BODY_AXES[1])
    for rib_z in np.linspace(-0.7, 0.85, 10):
        rib = (radius > 0.9) & (radius < 0.96) & (np.abs(q[..., 2] - rib_z - 0.15 * q[..., 1]) < 0.03)
        image[rib] = HU["bone"]
    spine = np.hypot(q[..., 0], (q[..., 1] + 0.47) / 0.9) < 0.1
    image[spine] = HU["spine"]


def _branch_directions(direction: Array, rng: np.random.Generator, angle: float) -> list[Array]:
    """Two child directions: the parent's turned by ±``angle`` about a random perpendicular."""
    helper = rng.normal(size=3)
    axis = np.cross(direction, helper)
    axis /= np.linalg.norm(axis)
    other = np.cross(axis, direction)
    return [np.cos(angle) * direction + sign * np.sin(angle) * other for sign in (1, -1)]


def _grow_tree(root: ArrayLike, direction: ArrayLike, length: float, radius: float,
               generations: int, inside: Callable[[Array], bool], centre: Array,
               rng: np.random.Generator) -> list[Segment]:
    """Segments ``(start, end, radius, generation)`` (mm) of a branching tree kept in the lung.

    A branch that would leave the lung turns towards the lung's centre and shortens (up to three
    tries) before it is dropped, so the trees fill the lung as real ones do.
    """
    segments = []
    stack = [(np.asarray(root, float), np.asarray(direction, float), 0)]
    while stack:
        start, heading, generation = stack.pop()
        seg_length, seg_radius = length * 0.8**generation, radius * 0.72**generation
        end = None
        for _ in range(4):
            heading = heading / np.linalg.norm(heading)
            candidate = start + seg_length * heading
            if generation == 0 or inside(candidate):
                end = candidate
                break
            towards = centre - start
            heading = heading + 1.2 * towards / max(np.linalg.norm(towards), 1e-6)
            seg_length *= 0.8
        if end is None:
            continue
        segments.append((start, end, seg_radius, generation))
        if generation + 1 < generations:
            for child in _branch_directions(heading, rng, rng.uniform(0.45, 0.7)):
                stack.append((end, child, generation + 1))
    return segments


def _draw_tubes(shape: Shape, frame: Frame, segments: Sequence[Segment],
                radius_scale: float = 1.0) -> Array:
    """Partial-volume occupancy in [0, 1] of tubes around ``segments`` (radius × ``radius_scale``)."""
    occupancy = np.zeros(shape, np.float32)
    voxel = float(frame.spacing.min())
    for start, end, radius, _ in segments:
        radius = radius * radius_scale
        reach = radius + 1.5 * voxel
        low = np.maximum(np.floor(geometry.voxel_index(np.minimum(start, end) - reach, frame.spacing)),
                         0).astype(int)
        high = np.minimum(np.ceil(geometry.voxel_index(np.maximum(start, end) + reach, frame.spacing)
                                  + 1.0), np.asarray(shape)).astype(int)
        if np.any(high <= low):
            continue
        box = tuple(slice(a, b) for a, b in zip(low, high))
        points = geometry.grid_points_numpy(high - low, frame.spacing, start=low)
        along = end - start
        t = np.clip(((points - start) @ along) / max(along @ along, 1e-9), 0.0, 1.0)
        distance = np.linalg.norm(points - (start + t[..., None] * along), axis=-1)
        fraction = np.clip((radius - distance) / voxel + 0.5, 0.0, 1.0)
        occupancy[box] = np.maximum(occupancy[box], fraction)
    return occupancy


def _trees(frame: Frame, labels: Array, params: Mapping[str, Any],
           rng: np.random.Generator) -> tuple[list[Segment], list[Segment]]:
    """Vessel segments (two trees per lung) and airway segments (one per lung)."""
    def inside_lung(point_mm: Array) -> bool:
        index = np.floor(point_mm / frame.spacing).astype(int)
        if np.any(index < 0) or np.any(index >= labels.shape):
            return False
        return labels[tuple(index)] > 0

    vessels, airways = [], []
    for side in (1, -1):
        hilum = frame.mm([side * 0.16, LUNG["centre_y"], LUNG["centre_z"] + 0.1])
        centre = frame.mm([side * LUNG["centre_x"], LUNG["centre_y"], LUNG["centre_z"]])
        lateral = np.array([side * 1.0, 0.0, 0.0])
        for tilt in (0.8, 0.0, -0.8):  # trees to the upper, middle and lower lung
            heading = lateral + np.array([0.0, rng.uniform(-0.3, 0.3), tilt])
            vessels += _grow_tree(hilum, heading, 0.16 * frame.half[0], 5.0, TREE_GENERATIONS,
                                  inside_lung, centre, rng)
        airways += _grow_tree(hilum + [0, -8.0, 5.0], lateral + [0, 0, 0.2], 0.14 * frame.half[0],
                              6.0, AIRWAY_GENERATIONS, inside_lung, centre, rng)
    return vessels, airways


def _inhale_image(shape: Shape, frame: Frame, params: Mapping[str, Any],
                  rng: np.random.Generator) -> tuple[Array, Array, list[Segment]]:
    """Noise-free inhale HU, lobe labels and the vessel segments."""
    q = frame.normalised(frame.grid(shape))
    image = np.full(shape, HU["air"], np.float32)
    body = np.hypot(q[..., 0] / BODY_AXES[0], q[..., 1] / BODY_AXES[1]) <= 1.0
    image[body] = HU["tissue"]
    _static_structures(q, image)
    labels, fissure = _lobes(q, params)
    lung = labels > 0
    image[lung] = HU["lung"]
    image[fissure] = HU["fissure"]
    vessels, airways = _trees(frame, labels, params, rng)
    wall = _draw_tubes(shape, frame, airways, 1.4)
    lumen = _draw_tubes(shape, frame, airways, 1.0)
    vessel = _draw_tubes(shape, frame, vessels)
    image = image + wall * (HU["airway_wall"] - image)
    image = image + lumen * (HU["air"] - image)
    image = image + vessel * (HU["tissue"] - image)
    # the scanner's point spread: half a voxel
    return gaussian_filter(image, 0.5).astype(np.float32), labels, vessels


def _landmarks(vessels: Sequence[Segment], labels: Array, frame: Frame, count: int,
               rng: np.random.Generator) -> Array:
    """``count`` branch points (mm) of the vessel trees, at least two voxels inside the lungs."""
    candidates = np.array([end for _, end, _, generation in vessels if generation >= 1])
    index = np.floor(candidates / frame.spacing).astype(int)
    index = np.clip(index, 0, np.asarray(labels.shape) - 1)
    inner = binary_erosion(labels > 0, iterations=2)
    keep = inner[tuple(index.T)]
    candidates = np.unique(np.round(candidates[keep], 3), axis=0)
    if len(candidates) < count:
        raise ValueError(f"phantom: only {len(candidates)} branch points for {count} landmarks; "
                         "use a larger grid")
    return candidates[rng.choice(len(candidates), count, replace=False)]


# --- the pair -----------------------------------------------------------------------------------


def make_pair(shape: Shape = (96, 96, 96), spacing: Spacing | None = None, seed: int = 0,
              amplitude_mm: float = 25.0, n_landmarks: int = 300,
              noise_hu: tuple[float, float] = (15.0, 25.0)) -> dict[str, Any]:
    """One phantom pair; same arguments, same bytes.

    Returns ``fixed`` (exhale), ``moving`` (inhale) HU float32 ``shape``; ``spacing`` (3,) mm
    (both phases share the grid); ``displacement`` (gt, mm, fixed grid,
    ``fixed(x) ≈ moving(x + u(x))``); ``fixed_labels``, ``moving_labels`` (lobes 1–5);
    ``fixed_landmarks``, ``moving_landmarks`` (``n_landmarks`` × 3, mm). ``noise_hu`` is the noise
    standard deviation of (inhale, exhale).
    """
    shape = tuple(int(n) for n in shape)
    spacing = geometry.check_spacing(spacing if spacing is not None else default_spacing(shape))
    spacing = spacing.astype(np.float32)
    rng = np.random.default_rng(seed)
    frame = Frame(shape, spacing)
    params = _case_parameters(rng, amplitude_mm)
    inhale, moving_labels, vessels = _inhale_image(shape, frame, params, rng)
    displacement = motion(frame.grid(shape), frame, params).astype(np.float32)
    # fields of view are cut off: what moves in from beyond the border continues the border
    exhale = np.asarray(geometry.warp(inhale[None, ..., None], displacement[None], spacing,
                                      fill_value=None))[0, ..., 0]
    fixed_labels = metrics.warp_labels(moving_labels, displacement, spacing).astype(np.int16)
    exhale = _compress_parenchyma(exhale, fixed_labels, displacement, spacing)
    moving_landmarks = _landmarks(vessels, moving_labels, frame, n_landmarks, rng)
    fixed_landmarks = invert_motion(moving_landmarks, frame, params)
    return {
        "fixed": (exhale + rng.normal(0, noise_hu[1], shape)).astype(np.float32),
        "moving": (inhale + rng.normal(0, noise_hu[0], shape)).astype(np.float32),
        "spacing": spacing, "displacement": displacement,
        "fixed_labels": fixed_labels, "moving_labels": moving_labels.astype(np.int16),
        "fixed_landmarks": fixed_landmarks.astype(np.float32),
        "moving_landmarks": moving_landmarks.astype(np.float32),
    }


def _compress_parenchyma(exhale: Array, labels: Array, displacement: Array,
                         spacing: Spacing) -> Array:
    """Mass conservation in the lungs: denser where the volume shrank (parenchyma only)."""
    ratio = metrics.jacobian_determinant(displacement, spacing)
    parenchyma = (labels > 0) & (exhale < -500.0)
    out = exhale.copy()
    out[parenchyma] = HU["air"] + (exhale[parenchyma] - HU["air"]) * ratio[parenchyma]
    return out


def as_case(pair: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A phantom pair in the key layout of :func:`tfmlreg.data.io.load_pair`."""
    case = {key: pair[key] for key in ("fixed", "moving", "fixed_labels", "moving_labels",
                                       "fixed_landmarks", "moving_landmarks", "displacement")}
    case.update(name=name, spacing_fixed=pair["spacing"], spacing_moving=pair["spacing"])
    return case


def write_dataset(out_dir: PathLike, cases: int = 1, shape: Shape = (96, 96, 96),
                  spacing: Spacing | None = None, seed: int = 0,
                  amplitude_mm: float = 25.0) -> list[str]:
    """Write ``cases`` pairs (seeds ``seed, seed+1, ...``) as ``out_dir/case<seed>/`` pair folders."""
    os.makedirs(out_dir, exist_ok=True)
    names = []
    for case_seed in range(seed, seed + int(cases)):
        name = f"case{case_seed:04d}"
        pair = make_pair(shape, spacing, seed=case_seed, amplitude_mm=amplitude_mm)
        io.write_pair(os.path.join(out_dir, name), as_case(pair, name))
        names.append(name)
    return names
