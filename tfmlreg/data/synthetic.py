"""Synthetic breathing on a real chest CT: registration pairs with exact ground truth.

From one CT (HU, in RAS+ array order: array axes 0, 1, 2 increase towards the patient's right,
anterior and superior, so axis 2 is cranio-caudal), :func:`make_pair` builds a pair whose fixed
image is the CT and whose moving image is the same anatomy in another breathing state:

* masks (:func:`body_and_lung_masks`, :func:`split_lungs`): the body is what is not outside air;
  the lungs are the air inside it that is not pure gas (see :data:`CLEAN_AIR_HU`), with small
  components dropped and vessels filled in; labels 1 = left lung, 2 = right lung;
* motion (:func:`breathing_field`): a smooth displacement ``u`` on the fixed grid, led by the
  diaphragm (cranio-caudal, largest at the lung bases, zero at the apices, decaying over a few cm
  below the bases), with a smaller antero-posterior and lateral expansion and a random smooth
  perturbation, all concentrated in the lungs and the region under them and fading over a few cm
  at the chest wall and mediastinum (a smooth stand-in for sliding). It is scaled so that its
  largest cranio-caudal component is the requested amplitude, and checked invertible
  (``det(I + ∇u) >= min_jacobian`` everywhere, re-drawn otherwise);
* the moving image: ``fixed(x) = moving(x + u(x))`` (pull-back, ``u`` lives on the fixed grid)
  holds exactly when ``moving = fixed ∘ y⁻¹``, so the inverse ``v`` (``y⁻¹(z) = z + v(z)``) is
  computed from ``v(z) = -u(z + v(z))`` by Newton steps (:func:`invert_displacement`), the CT
  is warped with it, the lung parenchyma's density follows mass conservation
  (``HU + 1000`` times ``det(I + ∇v)``), and both images get Gaussian scanner noise;
* 300 landmarks on vessel-like points in the fixed lungs (:func:`vessel_landmarks`), their moving
  positions ``p + u(p)`` exactly, all at least ``LANDMARK_MARGIN_MM`` inside the moving grid
  (:func:`stays_in_view`: a point the motion carries out of the scanned field has no
  correspondence to find).

``direction="exhale"`` makes the moving image the exhaled state (the usual chest CT is taken at
full inhale, so this is the physical direction: ``u`` points cranially at the lung bases);
``"inhale"`` is the reverse (the field negated). :func:`write_pairs` writes pairs in the layout of
:mod:`tfmlreg.data.io` (what ``tfmlreg train``/``evaluate`` read), plus ``synthesis.json`` with
the drawn parameters. Real CTs are large: resample them to a working spacing first
(:func:`load_scan` does, anti-aliased).
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
from keras import ops
from numpy.typing import ArrayLike
from scipy import ndimage as ndi

from tfmlreg import geometry, layers, metrics
from tfmlreg.ct import AIR_HU
from tfmlreg.data import io, pipeline
from tfmlreg.types import Array, PathLike, Shape, Spacing, Tensor

LUNG_HU = -400.0  # air and lung parenchyma lie below
# A component of pure gas (outside air, bowel gas, the trachea alone) has its median HU below
# this; lung parenchyma, with its tissue and vessels, lies above (about -870 at full inhale).
CLEAN_AIR_HU = -960.0
LABELS = {"left lung": 1, "right lung": 2}
DIRECTIONS = {"exhale": 1.0, "inhale": -1.0}
LANDMARK_MARGIN_MM = 5.0  # landmarks map at least this far inside the moving grid (stays_in_view)


# --- reading ----------------------------------------------------------------------------------


def read_ct(path: PathLike) -> tuple[Array, Array, Array]:
    """``(HU float32 in RAS+ array order, spacing (3,) mm, RAS+ affine)`` of a CT file (any
    format :func:`tfmlreg.data.io.read_image` reads)."""
    image, _, affine = io.read_image(path)
    orientation = nib.orientations.io_orientation(affine)
    if not np.array_equal(orientation, [[0, 1], [1, 1], [2, 1]]):  # not RAS+ yet: reorient
        image = nib.orientations.apply_orientation(image, orientation).astype(np.float32)
        affine = affine @ nib.orientations.inv_ornt_aff(orientation, image.shape)
    spacing = io.check_spacing(np.linalg.norm(affine[:3, :3], axis=0), path)
    return np.ascontiguousarray(image), spacing, affine


def resample_ct(image: ArrayLike, spacing: Spacing, target_spacing: Spacing) -> tuple[Array, Array]:
    """The CT at about ``target_spacing`` mm (its physical extent kept exactly), anti-aliased.

    Returns ``(image, spacing)``: the shape is ``round(extent / target_spacing)`` per axis and the
    spacing ``extent / shape``, so the new grid covers the same domain ``[0, n·h]``.
    """
    spacing = io.check_spacing(spacing, "spacing")
    target = io.check_spacing(target_spacing, "target_spacing")
    shape = np.maximum(np.rint(np.shape(image) * spacing / target), 2).astype(int)
    return pipeline.resample_image(image, spacing, tuple(shape))


def resampled_affine(affine: Array, spacing: Spacing, new_spacing: Spacing) -> Array:
    """The affine of a resampling of the same domain (cell-centred) to ``new_spacing``."""
    ratio = np.asarray(new_spacing, np.float64) / np.asarray(spacing, np.float64)
    out = np.array(affine, np.float64)
    out[:3, :3] = affine[:3, :3] * ratio
    out[:3, 3] = affine[:3, :3] @ (0.5 * ratio - 0.5) + affine[:3, 3]
    return out


def load_scan(path: PathLike, spacing_mm: Spacing | None = None,
              crop_body_mm: float | None = None) -> dict[str, Any]:
    """A scan dict ``{"name", "image", "spacing", "affine"}`` (RAS+), resampled to ``spacing_mm``
    and, with ``crop_body_mm``, cropped to the body plus that margin (:func:`crop_to_body`)."""
    image, spacing, affine = read_ct(path)
    if spacing_mm is not None:
        image, new_spacing = resample_ct(image, spacing, spacing_mm)
        affine, spacing = resampled_affine(affine, spacing, new_spacing), new_spacing
    if crop_body_mm is not None:
        image, low = crop_to_body(image, spacing, crop_body_mm)
        affine = np.array(affine, np.float64)
        affine[:3, 3] += affine[:3, :3] @ low
    return {"name": scan_name(path), "image": image, "spacing": spacing, "affine": affine}


def crop_to_body(image: Array, spacing: Spacing, margin_mm: float = 10.0) -> tuple[Array, Array]:
    """``(the body's bounding box plus a margin, its first voxel index)``: the air around a
    patient (and most of the table) is no registration work."""
    body, _ = body_and_lung_masks(image, spacing)
    index = np.argwhere(body)
    margin = np.ceil(margin_mm / np.asarray(spacing)).astype(int)
    low = np.maximum(index.min(0) - margin, 0)
    high = np.minimum(index.max(0) + margin + 1, image.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high))
    return np.ascontiguousarray(image[box]), low


def scan_name(path: PathLike) -> str:
    name = os.path.basename(os.path.normpath(path))
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# --- masks ------------------------------------------------------------------------------------


def _ball(radius_mm: float, spacing: Spacing) -> Array:
    """An ellipsoidal structuring element of ``radius_mm`` on a grid of ``spacing``."""
    radius = np.maximum(np.rint(radius_mm / np.asarray(spacing, np.float64)), 1).astype(int)
    axes = [np.arange(-r, r + 1) / r for r in radius]
    grid = np.meshgrid(*axes, indexing="ij")
    return sum(g**2 for g in grid) <= 1.0


def _fill_holes_axial(mask: Array) -> Array:
    """Holes filled slice by slice across axis 2 (a FOV cut along the body axis opens 3-D holes)."""
    out = np.empty_like(mask)
    for k in range(mask.shape[2]):
        out[:, :, k] = ndi.binary_fill_holes(mask[:, :, k])
    return out


def _largest_component(mask: Array) -> Array:
    components, count = ndi.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(components.ravel())[1:]
    return components == 1 + int(np.argmax(sizes))


def _air_components(image: Array) -> tuple[Array, Array, Array, Array]:
    """Connected air (HU < :data:`LUNG_HU`): labels, sizes, median HU, and which touch the
    in-plane border of the FOV (axes 0 and 1)."""
    components, count = ndi.label(image < LUNG_HU)
    index = np.arange(1, count + 1)
    sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
    medians = np.asarray(ndi.median(image, components, index)) if count else np.zeros(0)
    faces = [components[0], components[-1], components[:, 0], components[:, -1]]
    touching = np.zeros(count + 1, bool)
    touching[np.unique(np.concatenate([f.ravel() for f in faces]))] = True
    return components, sizes, medians, touching[1:]


def body_and_lung_masks(image: ArrayLike, spacing: Spacing, min_fraction: float = 0.1,
                        close_mm: float = 4.0, open_mm: float = 6.0,
                        name: PathLike = "image") -> tuple[Array, Array]:
    """``(body, lungs)`` boolean masks of a CT in HU.

    Outside air is the pure gas (median below :data:`CLEAN_AIR_HU`) that reaches the in-plane
    border of the FOV; the body is the largest connected region of everything else once opened
    over ``open_mm`` (which cuts off the table), holes filled slice by slice. The lungs are the
    air components inside the body that are not pure gas (trachea alone, bowel gas) and hold at
    least ``min_fraction`` of the largest one's volume, closed over ``close_mm`` and filled so
    that vessels belong to them. A FOV that cuts through the lungs (a crop) keeps them: lung air
    at the border is not pure gas.
    """
    image = io.check_volume(image, name)
    spacing = io.check_spacing(spacing, "spacing")
    components, sizes, medians, touching = _air_components(image)
    is_gas = medians < CLEAN_AIR_HU
    outside = np.concatenate([[False], touching & is_gas])[components]
    opened = ndi.binary_opening(~outside, _ball(open_mm, spacing))  # cuts off the table
    body = _fill_holes_axial(_largest_component(opened))
    candidate = ~is_gas  # inside air at the border: a FOV cut through the lungs
    if not np.any(candidate):
        raise io.DataError(f"{name}: no lungs found (no air inside the body below {LUNG_HU:g} HU)")
    keep = candidate & (sizes >= min_fraction * sizes[candidate].max())
    lungs = np.concatenate([[False], keep])[components] & body
    lungs = _fill_holes_axial(ndi.binary_closing(lungs, _ball(close_mm, spacing))) & body
    return body, lungs


def split_lungs(lungs: Array, spacing: Spacing, max_erosion_mm: float = 16.0) -> Array:
    """Label map: 1 = left lung, 2 = right lung (RAS+: the right lung has the larger axis-0 mean).

    The lungs usually touch (through the airways or the anterior junction); erosion until two
    large parts appear gives one seed per lung, and every lung voxel takes its nearest seed. If
    erosion never separates them, the sagittal plane with the least lung splits them.
    """
    spacing = io.check_spacing(spacing, "spacing")
    seeds = _separated_seeds(lungs, spacing, max_erosion_mm)
    labels = np.zeros(lungs.shape, np.int16)
    if seeds is None:
        counts = lungs.sum(axis=(1, 2))
        occupied = np.nonzero(counts)[0]
        low, high = occupied[0], occupied[-1]
        middle = np.arange(low + (high - low) // 3, high - (high - low) // 3 + 1)
        cut = middle[np.argmin(counts[middle])]
        labels[:cut][lungs[:cut]] = LABELS["left lung"]
        labels[cut:][lungs[cut:]] = LABELS["right lung"]
        return labels
    _, nearest = ndi.distance_transform_edt(seeds == 0, sampling=spacing, return_indices=True)
    owner = seeds[tuple(nearest)]
    labels[lungs] = owner[lungs]
    return labels


def _separated_seeds(lungs: Array, spacing: Array, max_erosion_mm: float) -> Array | None:
    """Two eroded lung parts labelled as :data:`LABELS` (``0`` elsewhere), or None."""
    eroded = lungs.copy()
    element = ndi.generate_binary_structure(3, 1)
    for _ in range(int(np.ceil(max_erosion_mm / float(np.min(spacing))))):
        components, count = ndi.label(eroded)
        if count >= 2:
            sizes = np.bincount(components.ravel())[1:]
            order = np.argsort(sizes)[::-1]
            if sizes[order[1]] >= 0.2 * sizes[order[0]]:
                first, second = (components == 1 + order[0]), (components == 1 + order[1])
                first_x, second_x = (np.nonzero(m)[0].mean() for m in (first, second))
                seeds = np.zeros(lungs.shape, np.int16)
                right, left = (first, second) if first_x > second_x else (second, first)
                seeds[left], seeds[right] = LABELS["left lung"], LABELS["right lung"]
                return seeds
        eroded = ndi.binary_erosion(eroded, element)
        if not eroded.any():
            return None
    return None


# --- anatomy: what the motion needs from one scan ---------------------------------------------


def _smoothstep(t: ArrayLike) -> Array:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclass
class Anatomy:
    """One scan's masks and the motion's spatial profiles, computed once per scan.

    The motion acts on the lungs and the body under them (what the diaphragm pushes), "the region".
    ``slide`` (0..1) fades the motion over ``fade_in_mm`` inside and ``fade_out_mm`` outside the
    region's surface; ``normal_weight`` fades the part of the motion normal to that surface over
    the wider ``normal_fade_mm`` inside it, so at the chest wall the lungs mostly slide along it
    (a shear, which keeps volumes) instead of being squeezed against it. ``normal`` is the
    gradient of the smoothed signed distance to the surface (the outward normal near it, shorter
    where the direction is ill-defined, deep inside). ``height`` (along axis 2) is 0 at the lung
    apices, 1 at the bases, back to 0 ``fade_below_mm`` under them; ``anterior`` (axis 1) 0 at the
    back of the lungs, 1 at the front; ``lateral`` (axis 0) -1..1 from their right-left middle.
    """

    image: np.ndarray
    spacing: np.ndarray
    body: np.ndarray
    lungs: np.ndarray
    labels: np.ndarray
    slide: np.ndarray
    normal_weight: np.ndarray
    normal: np.ndarray
    height: np.ndarray
    anterior: np.ndarray
    lateral: np.ndarray


def analyse(image: ArrayLike, spacing: Spacing, fade_in_mm: float = 15.0, fade_out_mm: float = 5.0,
            normal_fade_mm: float = 50.0, fade_below_mm: float = 80.0,
            name: PathLike = "image") -> Anatomy:
    """The :class:`Anatomy` of a CT (HU, RAS+ array order)."""
    image = io.check_volume(image, name)
    spacing = io.check_spacing(spacing, "spacing")
    body, lungs = body_and_lung_masks(image, spacing, name=name)
    labels = split_lungs(lungs, spacing)
    # the lungs and the body under them (columns along axis 2 below a lung voxel)
    under = np.flip(np.logical_or.accumulate(np.flip(lungs, axis=2), axis=2), axis=2) & body
    signed = _signed_distance(lungs | under, spacing)
    slide = _smoothstep((signed + fade_out_mm) / (fade_in_mm + fade_out_mm))
    normal_weight = _smoothstep((signed + fade_out_mm) / (normal_fade_mm + fade_out_mm))
    smooth = ndi.gaussian_filter(signed, 8.0 / spacing)
    normal = -np.stack(np.gradient(smooth, *spacing.tolist()), axis=-1)  # outward: distance falls
    profiles = _profiles(lungs, spacing, fade_below_mm)
    return Anatomy(image, spacing, body, lungs, labels,
                   *(a.astype(np.float32) for a in (slide, normal_weight, normal, *profiles)))


def _signed_distance(region: Array, spacing: Array) -> Array:
    """Distance (mm) to the region's surface, positive inside."""
    inside = ndi.distance_transform_edt(region, sampling=spacing)
    outside = ndi.distance_transform_edt(~region, sampling=spacing)
    return np.where(region, inside, -outside).astype(np.float32)


def _profiles(lungs: Array, spacing: Array, fade_below_mm: float) -> tuple[Array, Array, Array]:
    """The cranio-caudal, antero-posterior and lateral profiles of :class:`Anatomy`."""
    centres = [geometry.cell_centres(np.arange(n), h) for n, h in zip(lungs.shape, spacing)]
    where = np.nonzero(lungs)
    low, high = ([np.percentile(centres[k][where[k]], q) for k in range(3)] for q in (0.5, 99.5))
    z = centres[2]
    height = np.where(z >= low[2], _smoothstep((high[2] - z) / max(high[2] - low[2], 1e-3)),
                      _smoothstep(1.0 - (low[2] - z) / fade_below_mm))
    anterior = np.clip((centres[1] - low[1]) / max(high[1] - low[1], 1e-3), 0.0, 1.0)
    middle, half = (low[0] + high[0]) / 2.0, max(high[0] - low[0], 1e-3) / 2.0
    lateral = np.clip((centres[0] - middle) / half, -1.0, 1.0)
    return height, anterior, lateral


# --- sampling (XLA-compiled geometry: tfmlreg.layers) ------------------------------------


def _sample(volume: ArrayLike, points: ArrayLike, spacing: Spacing,
            fill_value: float | None = None) -> Array:
    """Trilinear values of an unbatched ``volume (D, H, W[, C])`` at ``points (..., 3)`` mm."""
    volume = np.asarray(volume, np.float32)
    channels = volume[..., None] if volume.ndim == 3 else volume
    values = ops.convert_to_numpy(layers.sample(
        channels[None], np.asarray(points, np.float32)[None], np.asarray(spacing, np.float32),
        fill_value))[0]
    return values[..., 0] if volume.ndim == 3 else values


# --- the motion -------------------------------------------------------------------------------


def _smooth_noise(shape: Shape, spacing: Spacing, rng: np.random.Generator,
                  control_mm: float = 50.0) -> Array:
    """A smooth random vector field, std about 1: a coarse random grid (``control_mm`` apart),
    cubic-interpolated to a grid a quarter as fine, then trilinear to the full grid."""
    extent = np.asarray(shape) * np.asarray(spacing)
    coarse = np.maximum(np.ceil(extent / control_mm).astype(int) + 1, 2)
    middle = tuple(max(2, -(-n // 4)) for n in shape)
    values = rng.normal(size=(*coarse, 3))
    zoom = [m / c for m, c in zip(middle, coarse)]
    smooth = np.stack([ndi.zoom(values[..., c], zoom, order=3, mode="nearest", grid_mode=True)
                       for c in range(3)], axis=-1)
    return ops.convert_to_numpy(layers.resample(
        smooth[None].astype(np.float32), geometry.as_spacing(extent / np.asarray(middle), 1), shape))[0]


def _breathing_pattern(anatomy: Anatomy, rng: np.random.Generator, ap_fraction: float,
                       lateral_fraction: float, perturbation_fraction: float) -> Array:
    """The unscaled exhale-direction field: cranio-caudal 1 at the bases, plus the rest."""
    shape = anatomy.slide.shape
    motion = np.empty((*shape, 3), np.float32)
    motion[..., 2] = anatomy.height[None, None, :]
    # exhale: the front of the chest falls back, the sides come in (less at the apices)
    motion[..., 1] = -ap_fraction * anatomy.anterior[None, :, None] * (0.5 + 0.5 * anatomy.height)
    motion[..., 0] = -lateral_fraction * anatomy.lateral[:, None, None] * anatomy.height
    motion += perturbation_fraction * _smooth_noise(shape, anatomy.spacing, rng)
    along_normal = np.sum(motion * anatomy.normal, axis=-1, keepdims=True) * anatomy.normal
    return (anatomy.slide[..., None] * motion
            - (anatomy.slide - anatomy.normal_weight)[..., None] * along_normal)


def breathing_field(anatomy: Anatomy, amplitude_mm: float, rng: np.random.Generator,
                    direction: str = "exhale", smooth_mm: float = 4.0,
                    ap_fraction: tuple[float, float] = (0.15, 0.35),
                    lateral_fraction: tuple[float, float] = (0.03, 0.12),
                    perturbation_fraction: tuple[float, float] = (0.0, 0.15),
                    min_jacobian: float = 0.2, attempts: int = 4) -> tuple[Array, dict[str, Any]]:
    """A random breathing displacement ``(D, H, W, 3)`` mm on the anatomy's grid, and its draws.

    Its largest cranio-caudal component (``max |u_2|``) is ``amplitude_mm``; the other parts are
    fractions of it drawn from the given ranges. It is Gaussian-smoothed (``smooth_mm``) and
    checked: ``det(I + ∇u) >= min_jacobian`` everywhere. A field that fails is re-drawn (with a
    smaller perturbation each time); after ``attempts`` failures the amplitude is scaled down until
    it passes, and the returned ``info["amplitude_mm"]`` says so. The same ``rng`` state with the
    other ``direction`` gives exactly the negated field.
    """
    sign = _sign(direction)
    spacing = anatomy.spacing
    info = {"direction": direction, "amplitude_mm": float(amplitude_mm)}
    if amplitude_mm <= 0:
        return np.zeros((*anatomy.image.shape, 3), np.float32), info
    draws = {"ap_fraction": rng.uniform(*ap_fraction),
             "lateral_fraction": rng.uniform(*lateral_fraction),
             "perturbation_fraction": rng.uniform(*perturbation_fraction)}
    sigma = smooth_mm / spacing
    for attempt in range(attempts):
        pattern = _breathing_pattern(anatomy, rng, draws["ap_fraction"], draws["lateral_fraction"],
                                     draws["perturbation_fraction"] * 0.5**attempt)
        pattern = np.stack([ndi.gaussian_filter(pattern[..., c], sigma, mode="nearest")
                            for c in range(3)], axis=-1)
        u = (sign * amplitude_mm / np.abs(pattern[..., 2]).max()) * pattern
        scale, smallest = _invertible_scale(u, spacing, min_jacobian, final=attempt == attempts - 1)
        if scale is not None:
            info.update(draws, amplitude_mm=float(amplitude_mm * scale), attempts=attempt + 1,
                        min_jacobian=smallest)
            return (u * scale).astype(np.float32), info
    raise AssertionError("unreachable: the last attempt scales down until invertible")


def _invertible_scale(u: Array, spacing: Array, min_jacobian: float,
                      final: bool) -> tuple[float, float] | tuple[None, None]:
    """``(scale, smallest det)``: scale 1 if ``u`` passes the Jacobian check; on the ``final`` try
    the largest ``0.85^k`` that passes; ``(None, None)`` otherwise."""
    scale = 1.0
    while True:
        smallest = float(metrics.jacobian_determinant(u * scale, spacing).min())
        if smallest >= min_jacobian:
            return scale, smallest
        if not final:
            return None, None
        scale *= 0.85


def _sign(direction: str) -> float:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: expected one of {sorted(DIRECTIONS)}, got {direction!r}")
    return DIRECTIONS[direction]


def _mismatch(u: Tensor, v: Tensor, spacing: Tensor) -> Tensor:
    """``v(z) + u(z + v(z))`` (batched tensors): zero where ``v`` inverts ``y = x + u``."""
    points = geometry.grid_points(geometry.spatial_shape(v), spacing) + v
    return v + geometry.sample(u, points, spacing)


def _differences(v: Tensor, spacing: Tensor) -> list[Tensor]:
    """``[∂v/∂x_k for k in 0, 1, 2]`` of a batched field: central differences, one-sided at the
    border (as ``np.gradient``)."""
    out = []
    for k in range(3):
        axis, h = k + 1, spacing[:, k][:, None, None, None, None]
        first = ops.take(v, [1], axis=axis) - ops.take(v, [0], axis=axis)
        n = v.shape[axis]
        inner = ops.take(v, np.arange(2, n), axis=axis) - ops.take(v, np.arange(n - 2), axis=axis)
        inner = inner / 2.0
        last = ops.take(v, [n - 1], axis=axis) - ops.take(v, [n - 2], axis=axis)
        out.append(ops.concatenate([first, inner, last], axis=axis) / h)
    return out


_mismatch_compiled = layers.xla_compiled(_mismatch)


@layers.xla_compiled
def _newton_step(u: Tensor, v: Tensor, spacing: Tensor) -> tuple[Tensor, Tensor]:
    """One Newton step on ``F(v) = v + u(z + v) = 0``, and its largest change.

    ``F``'s Jacobian is ``I + ∇u(z + v)``, whose inverse at the solution is ``I + ∇v(z)`` (the
    inverse function theorem), taken from the current ``v`` by differences: no extra sampling,
    and a few steps instead of the dozens that the plain iteration ``v ← -u(z + v)`` needs.
    """
    residual = _mismatch(u, v, spacing)
    gradients = _differences(v, spacing)
    update = v - residual - sum(gradients[k] * residual[..., k : k + 1] for k in range(3))
    return update, ops.max(ops.abs(update - v))


def invert_displacement(u: ArrayLike, spacing: Spacing, iterations: int = 30,
                        tolerance_mm: float = 0.005, coarsest: int = 24) -> tuple[Array, Array]:
    """``(v, residual)``: the inverse of ``y = x + u`` as ``y⁻¹(z) = z + v(z)`` on the same grid.

    Solves ``v(z) = -u(z + v(z))`` by Newton steps (:func:`_newton_step`; it converges for the
    smooth, invertible fields of breathing) until the largest update is below ``tolerance_mm``,
    starting from the inverse on a grid half as fine (recursively, down to ``coarsest`` voxels;
    ``v = -u`` there). ``u`` beyond the domain is its border value. ``residual`` ``(D, H, W)`` mm
    is ``|v(z) + u(z + v(z))|``, how far ``y(y⁻¹(z))`` is from ``z``.
    """
    field = ops.convert_to_tensor(np.asarray(u, np.float32)[None])
    spacing_tensor = geometry.as_spacing(np.asarray(spacing, np.float32), 1)
    v = _inverse(field, spacing_tensor, iterations, tolerance_mm, coarsest)
    residual = np.linalg.norm(ops.convert_to_numpy(_mismatch_compiled(field, v, spacing_tensor))[0],
                              axis=-1)
    return ops.convert_to_numpy(v)[0], residual


def _inverse(field: Tensor, spacing: Tensor, iterations: int, tolerance_mm: float,
             coarsest: int) -> Tensor:
    """The inverse of a batched ``field``, started from the coarser grid's."""
    shape = geometry.spatial_shape(field)
    if min(shape) >= 2 * coarsest:
        coarse_shape = tuple((n + 1) // 2 for n in shape)
        ratio = np.divide(shape, coarse_shape, dtype=np.float32)
        coarse_spacing = spacing * ops.convert_to_tensor(ratio)
        coarse = layers.resample(field, spacing, coarse_shape)
        v = layers.resample(_inverse(coarse, coarse_spacing, iterations, tolerance_mm, coarsest),
                               coarse_spacing, shape)
    else:
        v = -field
    newton, previous = True, np.inf
    for step in range(3 * iterations):  # the plain iteration may need more steps than Newton's
        if newton:
            candidate, change = _newton_step(field, v, spacing)
        else:
            candidate, change = _fixed_point_step(field, v, spacing)
        change = float(change)
        if newton and not change < previous:  # diverging (or NaN) on a coarse, strained grid:
            newton = False  # the plain iteration, a contraction for invertible fields, from here
            continue
        v, previous = candidate, change
        if change < tolerance_mm or (newton and step + 1 >= iterations):
            break
    return v


@layers.xla_compiled
def _fixed_point_step(u: Tensor, v: Tensor, spacing: Tensor) -> tuple[Tensor, Tensor]:
    """One step of ``v ← -u(z + v)``, and its largest change."""
    update = v - _mismatch(u, v, spacing)
    return update, ops.max(ops.abs(update - v))


# --- images, labels, landmarks ----------------------------------------------------------------


def _compress_parenchyma(moving: Array, moving_labels: Array, inverse: Array,
                         spacing: Array) -> Array:
    """Mass conservation in the lung parenchyma: ``HU + 1000`` times the moving side's volume
    ratio ``det(I + ∇v)`` (denser where the lungs shrank). Vessels and tissue (above about -400
    HU) keep their density; the blend over -600..-400 HU avoids an edge at a threshold."""
    ratio = metrics.jacobian_determinant(inverse, spacing)
    parenchyma = np.clip((LUNG_HU - moving) / 200.0, 0.0, 1.0) * (moving_labels > 0)
    return AIR_HU + (moving - AIR_HU) * (1.0 + parenchyma * (ratio - 1.0))


def _moving_from_fixed(anatomy: Anatomy, displacement: Array, residual_limit_mm: float,
                       mass_conservation: bool) -> tuple[Array, Array, float]:
    """``(moving image, moving labels, residual)``: the fixed CT and labels pulled back by ``y⁻¹``."""
    spacing = anatomy.spacing
    inverse, residual = invert_displacement(displacement, spacing)
    if not np.all(np.isfinite(inverse)):
        raise ValueError("displacement: the inverse did not converge (non-finite values)")
    points = geometry.grid_points_numpy(anatomy.image.shape, spacing, np.float32) + inverse
    moving = _sample(anatomy.image, points, spacing)  # beyond the FOV: the border continues
    moving_labels = metrics.warp_labels(anatomy.labels, inverse, spacing).astype(np.int16)
    lung_residual = float(residual[moving_labels > 0].max(initial=0.0))
    if lung_residual > residual_limit_mm:
        raise ValueError(f"displacement: the inverse did not converge in the lungs "
                         f"(residual {lung_residual:.3f} mm > {residual_limit_mm} mm)")
    if mass_conservation:
        moving = _compress_parenchyma(moving, moving_labels, inverse, spacing)
    return moving.astype(np.float32), moving_labels, lung_residual


def vessel_landmarks(image: Array, lungs: Array, spacing: Spacing, count: int = 300,
                     min_depth_voxels: int = 2, name: PathLike = "image") -> Array:
    """``(count, 3)`` mm: bright blob-like points (vessels) in the lungs, spread out.

    The blob measure is a difference of Gaussians (about 1.5 mm minus 4.5 mm) of the HU image;
    candidates are its local maxima on lung voxels at least ``min_depth_voxels`` inside the lung
    mask and brighter than the parenchyma around them. Spreading: the strongest candidate of each
    cell of a cubic grid whose cell is as large as still gives ``count`` cells; the ``count``
    strongest of those. Positions are voxel centres.
    """
    spacing = np.asarray(spacing, np.float64)
    fine = ndi.gaussian_filter(image, np.maximum(1.5 / spacing, 0.5))
    blob = fine - ndi.gaussian_filter(image, np.maximum(4.5 / spacing, 1.5))
    inner = ndi.binary_erosion(lungs, iterations=min_depth_voxels)
    peaks = inner & (blob == ndi.maximum_filter(blob, size=3)) & (blob > 20.0) & (fine > -800.0)
    index = np.argwhere(peaks)
    strength = blob[peaks]
    points = geometry.cell_centres(index, spacing)
    for cell_mm in 40.0 * 0.9 ** np.arange(40):
        keys = np.floor(points / cell_mm).astype(np.int64)
        order = np.lexsort((-strength, *keys.T[::-1]))  # by cell, strongest first in each
        first = np.ones(len(order), bool)
        first[1:] = np.any(np.diff(keys[order], axis=0) != 0, axis=1)
        winners = order[first]
        if len(winners) >= count:
            best = winners[np.argsort(-strength[winners])[:count]]
            return points[np.sort(best)].astype(np.float32)
    raise io.DataError(f"{name}: only {len(points)} vessel-like points in the lungs for {count} "
                       "landmarks; use a finer spacing or fewer landmarks")


# --- the pair ---------------------------------------------------------------------------------


def synthesize(anatomy: Anatomy, rng: np.random.Generator, amplitude_mm: float,
               direction: str = "exhale",
               shift_mm: Spacing = (0.0, 0.0, 0.0), noise_hu: tuple[float, float] = (2.0, 20.0),
               mass_conservation: bool = True, residual_limit_mm: float = 0.05,
               **motion: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fixed and moving images, labels and ground truth (no landmarks) from an :class:`Anatomy`.

    The displacement is the breathing field (:func:`breathing_field`, ``amplitude_mm`` exactly)
    plus a global shift ``shift_mm`` (3 values, mm); ``amplitude_mm=0`` with a shift is a pure
    translation. Each image gets Gaussian noise of a standard deviation drawn from ``noise_hu``;
    ``mass_conservation=False`` keeps the lung density (for checks of the geometry alone).
    Returns ``(pair, info)``: a dict with ``fixed, moving, spacing, fixed_labels, moving_labels,
    displacement`` and the draws.
    """
    displacement, info = breathing_field(anatomy, amplitude_mm, rng, direction, **motion)
    shift = np.broadcast_to(np.asarray(shift_mm, np.float32), (3,))
    displacement = displacement + shift
    moving, moving_labels, residual = _moving_from_fixed(anatomy, displacement, residual_limit_mm,
                                                         mass_conservation)
    noise = rng.uniform(*noise_hu, size=2)
    shape = anatomy.image.shape
    pair = {
        "fixed": (anatomy.image + rng.normal(0.0, noise[0], shape)).astype(np.float32),
        "moving": (moving + rng.normal(0.0, noise[1], shape)).astype(np.float32),
        "spacing": anatomy.spacing, "displacement": displacement.astype(np.float32),
        "fixed_labels": anatomy.labels, "moving_labels": moving_labels,
    }
    info.update(shift_mm=shift.tolist(), noise_hu=noise.tolist(), inverse_residual_mm=residual)
    return pair, info


@dataclass(frozen=True)
class RandomMotion:
    """How on-the-fly training pairs draw their motion (:func:`random_pair`).

    With probability ``pure_shift`` a pair is a pure translation; otherwise breathing of an
    amplitude uniform in ``[0, amplitude_mm]`` (small motion included) in a random direction.
    Every pair also gets a global shift uniform in ``±shift_mm`` per axis, and image noise with a
    standard deviation drawn from ``noise_hu``. With ``anatomy_mm`` > 0 each draw first reshapes
    the scan itself (:func:`varied_anatomy`), so the fixed image is a new "patient" every time.
    """

    amplitude_mm: float = 30.0
    shift_mm: float = 10.0
    pure_shift: float = 0.2
    noise_hu: tuple = (2.0, 20.0)
    anatomy_mm: float = 0.0

    def draw(self, rng: np.random.Generator) -> dict[str, Any]:
        """Keyword arguments of :func:`synthesize` for one pair."""
        amplitude = 0.0 if rng.random() < self.pure_shift else rng.uniform(0.0, self.amplitude_mm)
        return {"amplitude_mm": float(amplitude),
                "direction": str(rng.choice(sorted(DIRECTIONS))),
                "shift_mm": rng.uniform(-self.shift_mm, self.shift_mm, 3),
                "noise_hu": self.noise_hu}


def varied_anatomy(anatomy: Anatomy, rng: np.random.Generator, amplitude_mm: float) -> Anatomy:
    """The scan reshaped by a random smooth field (each component's standard deviation about
    ``amplitude_mm``, control points 80 mm apart) and analysed again: another plausible chest.
    A variant whose lungs the analysis cannot find gives the scan itself (a draw, not an error).

    Why: a network trained on a few scans that are always the fixed image learns those images
    and reads the motion off the moving one alone (DESIGN.md section 6 has the figures).
    """
    shape, spacing = anatomy.image.shape, anatomy.spacing
    field = amplitude_mm * _smooth_noise(shape, spacing, rng, control_mm=80.0)
    points = geometry.grid_points_numpy(shape, spacing, np.float32) + field
    image = _sample(anatomy.image, points, spacing)  # beyond the FOV: the border continues
    try:
        return analyse(image, spacing, name="varied anatomy")
    except io.DataError:
        return anatomy


def random_pair(anatomy: Anatomy, rng: np.random.Generator, motion: RandomMotion = RandomMotion(),
                attempts: int = 5) -> tuple[dict[str, Any], dict[str, Any]]:
    """A new random pair of the scan (:func:`synthesize`'s ``(pair, info)``), motion from ``motion``;
    a draw whose inverse does not converge (rare: large motion on a coarse grid) is drawn again."""
    if motion.anatomy_mm > 0:
        anatomy = varied_anatomy(anatomy, rng, motion.anatomy_mm)
    for _ in range(attempts - 1):
        try:
            return synthesize(anatomy, rng, **motion.draw(rng))
        except ValueError:
            pass
    return synthesize(anatomy, rng, **motion.draw(rng))


def make_pair(image: ArrayLike, spacing: Spacing, seed: int | list[int] | tuple[int, ...] = 0,
              amplitude_mm: float = 25.0, direction: str = "exhale", n_landmarks: int = 300,
              anatomy: Anatomy | None = None, name: str = "synthetic",
              affine: ArrayLike | None = None, **options: Any) -> dict[str, Any]:
    """A pair in the key layout of :func:`tfmlreg.data.io.load_pair` from one CT; same inputs,
    same bytes.

    ``image`` HU in RAS+ array order, ``spacing`` (3,) mm (resample first: see :func:`load_scan`).
    The fixed image is the CT (plus noise), the moving one the CT in the breathing state
    ``direction`` with ``amplitude_mm`` of cranio-caudal motion; ``displacement`` satisfies
    ``fixed(x) ≈ moving(x + u(x))``; labels 1/2 are the left/right lungs; ``n_landmarks``
    vessel landmarks with ``moving = fixed + u(fixed)``. ``anatomy`` (from :func:`analyse`) saves
    recomputing the masks for another pair of the same scan; ``affine`` (the CT's, RAS+) becomes
    ``affine_fixed``, so written pairs overlay on the scan; ``options`` go to :func:`synthesize`.
    The drawn parameters are in ``pair["synthesis"]``.
    """
    anatomy = anatomy if anatomy is not None else analyse(image, spacing, name=name)
    rng = np.random.default_rng(seed)
    grid_pair, info = synthesize(anatomy, rng, amplitude_mm, direction, **options)
    observable = anatomy.lungs & stays_in_view(grid_pair["displacement"], anatomy.spacing)
    fixed_points = vessel_landmarks(anatomy.image, observable, anatomy.spacing, n_landmarks,
                                    name=name)
    moving_points = fixed_points + _sample(grid_pair["displacement"], fixed_points,
                                           anatomy.spacing)
    pair = {key: grid_pair[key] for key in ("fixed", "moving", "displacement", "fixed_labels",
                                            "moving_labels")}
    pair.update(name=name, spacing_fixed=anatomy.spacing, spacing_moving=anatomy.spacing,
                fixed_landmarks=fixed_points, moving_landmarks=moving_points.astype(np.float32),
                synthesis=dict(info, seed=_jsonable(seed)))
    if affine is not None:
        pair["affine_fixed"] = np.asarray(affine, np.float64)
    return pair


def stays_in_view(displacement: Array, spacing: Spacing,
                  margin_mm: float = LANDMARK_MARGIN_MM) -> Array:
    """Voxels whose position in the moving image, ``x + u(x)``, is at least ``margin_mm`` inside
    its grid. Elsewhere the moving image holds none of the anatomy that moved there (motion
    carried it out of the scanned field of view), so no method can find the correspondence and a
    landmark there measures extrapolation, not registration; the margin leaves room for the
    similarity measure's neighbourhood."""
    spacing = np.asarray(spacing, np.float64)
    shape = np.asarray(displacement.shape[:3])
    target = geometry.grid_points_numpy(shape, spacing, np.float32) + displacement
    inside = (target >= margin_mm) & (target <= shape * spacing - margin_mm)
    return np.all(inside, axis=-1)


def _jsonable(seed: int | list[int] | tuple[int, ...]) -> int | list[int]:
    return [int(s) for s in seed] if isinstance(seed, (list, tuple)) else int(seed)


def write_pairs(ct_paths: Iterable[PathLike], out_dir: PathLike, pairs_per_scan: int = 1,
                spacing_mm: Spacing | None = 2.0, amplitude_mm: float = 30.0,
                min_amplitude_mm: float | None = None, direction: str = "random", seed: int = 0,
                n_landmarks: int = 300, crop_body_mm: float | None = None) -> list[str]:
    """Write ``out_dir/<scan>_<k>/`` pair folders, ``pairs_per_scan`` per CT; returns their names.

    ``crop_body_mm``: each scan is first cropped to its body plus this margin (as a training
    config's ``scans.crop_body_mm`` does), so validation pairs cover what training draws cover.

    Each pair draws its amplitude uniformly from ``[min_amplitude_mm, amplitude_mm]`` (default
    ``min_amplitude_mm = amplitude_mm / 2``) and, with ``direction="random"``, its direction. The
    seed of pair ``k`` of a scan is ``(seed, crc32(scan name), k)``: independent of the order of
    the files. ``synthesis.json`` in each folder records the draws and the source.
    """
    if direction != "random":
        _sign(direction)
    low = amplitude_mm / 2.0 if min_amplitude_mm is None else min_amplitude_mm
    if not 0.0 <= low <= amplitude_mm:
        raise ValueError(f"amplitude: expected 0 <= minimum ({low}) <= maximum ({amplitude_mm})")
    os.makedirs(out_dir, exist_ok=True)
    names = []
    for path in ct_paths:
        scan = load_scan(path, spacing_mm, crop_body_mm)
        anatomy = analyse(scan["image"], scan["spacing"], name=path)
        for k in range(int(pairs_per_scan)):
            pair_seed = [int(seed), zlib.crc32(scan["name"].encode()), k]
            rng = np.random.default_rng(pair_seed + [1])  # not make_pair's stream
            pair_direction = str(rng.choice(sorted(DIRECTIONS))) if direction == "random" else direction
            name = f"{scan['name']}_{k}"
            pair = make_pair(scan["image"], scan["spacing"], seed=pair_seed,
                             amplitude_mm=float(rng.uniform(low, amplitude_mm)),
                             direction=pair_direction, n_landmarks=n_landmarks, anatomy=anatomy,
                             name=name, affine=scan["affine"])
            _write(os.path.join(out_dir, name), pair, path, scan["spacing"])
            names.append(name)
    return names


def _write(case_dir: str, pair: Mapping[str, Any], source: PathLike, spacing: Array) -> None:
    io.write_pair(case_dir, pair)
    record = dict(pair["synthesis"], source=os.path.basename(source),
                  spacing_mm=[float(h) for h in spacing])
    with open(os.path.join(case_dir, "synthesis.json"), "w") as handle:
        json.dump(record, handle, indent=2)
