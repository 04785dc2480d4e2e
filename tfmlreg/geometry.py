"""Geometry on cell-centred grids: sampling, warping, composition, resampling, pyramids.

Conventions (docs/DESIGN.md section 1), used by every caller in the package:

* layout is channels-last, ``(B, D, H, W, C)``; displacements are ``(B, D, H, W, 3)`` in mm
  along the array axes;
* voxel ``i`` of an axis with spacing ``h`` has its centre at ``(i + 0.5) * h``; the domain of an
  axis with ``n`` voxels is ``[0, n * h]``;
* ``y(x) = x + u(x)``; warping pulls back: ``warped(x) = M(y(x))``, trilinear;
* all arithmetic is float32, whatever the Keras dtype policy, so mixed precision never touches
  the geometry.

Everything is written in ``keras.ops`` with static spatial shapes, so it runs under XLA
(``jit_compile=True``) and on any device. Sampling is written once (:func:`sample`); warp,
compose and resample are thin uses of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from keras import ops
from numpy.typing import ArrayLike, DTypeLike

from tfmlreg.types import Array, PathLike, Shape, Spacing, Tensor

FLOAT = "float32"


# --- spacing: one rule (finite, > 0 mm), a NumPy and a keras.ops variant ---------------------


def _checked_values(values: ArrayLike, name: PathLike,
                   plausible_mm: tuple[float, float] | None = None) -> Array:
    """``values`` (float64) if every voxel size is finite and > 0 mm (and, with ``plausible_mm``
    ``(low, high)``, within it); else a one-line ValueError naming ``name``."""
    values = np.asarray(values, np.float64)
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"{name}: spacing must be positive finite voxel sizes in mm, got "
                         f"{np.round(values, 6).tolist()}")
    if plausible_mm is not None:
        low, high = plausible_mm
        if np.any(values < low) or np.any(values > high):
            raise ValueError(f"{name}: voxel size {[float(f'{h:.4g}') for h in values.reshape(-1)]} "
                             f"mm is implausible (expected {low:g}-{high:g} mm per axis); check the "
                             "file's header")
    return values


def check_spacing(spacing: Spacing, name: PathLike = "spacing", batch_size: int | None = None,
                  plausible_mm: tuple[float, float] | None = None) -> Array:
    """NumPy: voxel sizes in mm as float64 ``(3,)`` from a scalar or 3 values, or with
    ``batch_size`` ``(B, 3)`` from a scalar, ``(3,)``, ``(1, 3)`` or ``(B, 3)``.

    The rule of every spacing in the package (:func:`as_spacing` applies it too): finite and
    > 0 mm, optionally within ``plausible_mm``; a one-line ValueError naming ``name`` otherwise.
    """
    values = np.asarray(spacing, np.float64)
    if batch_size is None:
        values = values.reshape(-1) if values.ndim <= 1 else values
        if values.size == 1:
            values = np.repeat(values, 3)
        if values.shape != (3,):
            raise ValueError(f"{name}: expected a scalar or 3 voxel sizes in mm, got shape "
                             f"{np.shape(spacing)}")
    else:
        if values.ndim > 2 or (values.ndim >= 1 and values.shape[-1] != 3) or (
                values.ndim == 2 and values.shape[0] not in (1, batch_size)):
            raise ValueError(f"{name}: expected a scalar, (3,) or ({batch_size}, 3) in mm, got "
                             f"{values.shape}")
        values = np.broadcast_to(values, (batch_size, 3))
    return np.ascontiguousarray(_checked_values(values, name, plausible_mm))


def _known_value(spacing: Spacing) -> Array | None:
    """The NumPy value of ``spacing`` if it is known now; None for a traced (symbolic) tensor."""
    try:
        return np.asarray(spacing if not ops.is_tensor(spacing) else ops.convert_to_numpy(spacing),
                          np.float64)
    except Exception:  # noqa: BLE001  traced (tf.function, XLA, jax.jit): values come at run time
        return None


def as_spacing(spacing: Spacing, batch_size: int | Tensor | None = None,
               name: str = "spacing") -> Tensor:
    """keras.ops: spacing as a float32 ``(B, 3)`` tensor from a scalar, a ``(3,)`` or a ``(B, 3)``.

    The values follow :func:`check_spacing`'s rule wherever they are known when called (Python
    and NumPy values, eager tensors); a traced tensor is taken as it is.
    """
    known = _known_value(spacing)
    if known is not None:
        _checked_values(known, name)
    spacing = ops.cast(ops.convert_to_tensor(spacing), FLOAT)
    rank = len(spacing.shape)
    if rank == 0:
        spacing = ops.reshape(spacing, (1, 1)) * ops.ones((1, 3), FLOAT)
    elif rank == 1:
        spacing = ops.reshape(spacing, (1, 3))
    elif rank != 2 or spacing.shape[-1] not in (3, None):
        raise ValueError(f"{name}: expected a scalar, (3,) or (B, 3), got shape {tuple(spacing.shape)}")
    if batch_size is not None:
        spacing = ops.broadcast_to(spacing, (batch_size, 3))
    return spacing


def spatial_shape(volume: Tensor) -> tuple[int, ...]:
    """The static ``(D, H, W)`` of a ``(B, D, H, W, C)`` volume; raises if it is not 5-D or static."""
    shape = tuple(volume.shape)
    if len(shape) != 5:
        raise ValueError(f"expected a (B, D, H, W, C) volume, got shape {shape}")
    if any(n is None for n in shape[1:4]):
        raise ValueError(f"spatial size must be static, got shape {shape}")
    return tuple(int(n) for n in shape[1:4])


def _batch(volume: Tensor) -> int | Tensor:
    return ops.shape(volume)[0]


# --- the cell-centred grid: voxel i at (i + 0.5) * h, a keras.ops and a NumPy variant --------


def grid_points(shape: Shape, spacing: Tensor) -> Tensor:
    """keras.ops: cell-centre coordinates in mm, ``(B, D, H, W, 3)``, of a grid of ``shape`` with
    ``spacing (B, 3)``.

    Built from ``arange`` in the graph rather than embedded as a constant: a 160³ grid constant
    would add ~50 MB to an exported graph for every warp in it.
    """
    axes = [ops.arange(int(n), dtype=FLOAT) + 0.5 for n in shape]
    centres = ops.stack(ops.meshgrid(*axes, indexing="ij"), axis=-1)
    return centres[None] * spacing[:, None, None, None, :]


def cell_centres(index: ArrayLike, spacing: Spacing, dtype: DTypeLike = np.float64) -> Array:
    """NumPy: the mm position ``(index + 0.5) * spacing`` of voxel indices (any shape, last axis
    or a scalar matching ``spacing``).

    ``spacing`` is taken in ``dtype`` first and the product is rounded once, so float32 gives
    the same values as :func:`grid_points` does.
    """
    spacing = np.asarray(spacing, dtype).astype(np.float64)
    return ((np.asarray(index, np.float64) + 0.5) * spacing).astype(dtype, copy=False)


def voxel_index(points_mm: ArrayLike, spacing: Spacing) -> Array:
    """NumPy: the fractional voxel index ``points / spacing - 0.5`` of mm positions (float64),
    the inverse of :func:`cell_centres`."""
    return np.asarray(points_mm, np.float64) / np.asarray(spacing, np.float64) - 0.5


def grid_points_numpy(shape: Shape, spacing: Spacing, dtype: DTypeLike = np.float64,
                      start: Shape = (0, 0, 0)) -> Array:
    """NumPy: cell-centre coordinates in mm, ``(D, H, W, 3)`` (unbatched), of ``shape`` voxels
    with ``spacing (3,)``, from voxel index ``start`` on (a sub-box of a larger grid)."""
    spacing = np.broadcast_to(np.asarray(spacing, dtype), (3,))
    axes = [cell_centres(np.arange(a, a + int(n)), h, dtype)
            for a, n, h in zip(start, shape, spacing)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def sample(volume: Tensor, points: Tensor, spacing: Spacing,
           fill_value: float | None = None) -> Tensor:
    """Trilinear values of ``volume`` at ``points`` (mm), ``(B, ..., 3)`` -> ``(B, ..., C)``.

    ``spacing`` is the volume's spacing. Between the outermost cell centres and the domain edge the
    border value is held (trilinear interpolation with indices clamped explicitly: GPU gathers
    would return 0 silently, CPU gathers would raise). Points outside the domain ``[0, n*h]`` take
    ``fill_value``, or the clamped border value when ``fill_value`` is None (used for fields).
    """
    volume = ops.cast(volume, FLOAT)
    points = ops.cast(points, FLOAT)
    dims = spatial_shape(volume)
    channels = volume.shape[-1]
    batch = _batch(volume)
    spacing = as_spacing(spacing, batch)
    point_dims = tuple(points.shape[1:-1])
    points = ops.reshape(points, (batch, -1, 3))
    index = points / spacing[:, None, :] - 0.5
    lower = ops.floor(index)
    frac = index - lower
    lower = ops.cast(lower, "int32")
    upper_bound = ops.convert_to_tensor(np.array(dims, np.int32) - 1)
    i0 = ops.clip(lower, 0, upper_bound)
    i1 = ops.clip(lower + 1, 0, upper_bound)
    values = _trilinear(volume, dims, batch, i0, i1, frac)
    if fill_value is not None:
        inside = _edge_depth(index, dims) >= 0.0
        values = ops.where(inside, values, ops.cast(fill_value, FLOAT))
    return ops.reshape(values, (-1,) + point_dims + (channels,))


def domain_weight(points: Tensor, shape: Shape, spacing: Tensor) -> Tensor:
    """How far ``points (B, ..., 3)`` (mm) lie inside a grid of ``shape`` cells of ``spacing
    (B, 3)``: ``(B, ..., 1)`` in [0, 1], 1 from the outermost cell centres inwards, falling
    linearly to 0 at the domain edge (the half cell where :func:`sample` holds the border value)
    and 0 beyond. Continuous in the points, so round-off cannot flip it (a hard inside/outside
    test did: graph and eager results then differ); no gradient flows through it."""
    index = points / ops.reshape(spacing, (-1,) + (1,) * (len(points.shape) - 2) + (3,)) - 0.5
    return ops.stop_gradient(ops.clip(2.0 * _edge_depth(index, shape), 0.0, 1.0))


def _edge_depth(index: Tensor, shape: Shape) -> Tensor:
    """Cells from voxel coordinates ``index (..., 3)`` to the nearest edge of a grid of ``shape``
    cells (its domain is ``[-0.5, n - 0.5]`` per axis), ``(..., 1)``; negative outside."""
    extent = ops.convert_to_tensor(np.asarray(shape, np.float32))
    depth = ops.minimum(index + 0.5, extent - 0.5 - index)
    return ops.min(depth, axis=-1, keepdims=True)


def _trilinear(volume: Tensor, dims: tuple[int, ...], batch: int | Tensor, i0: Tensor, i1: Tensor,
               frac: Tensor) -> Tensor:
    """Blend the 8 corner values; indices ``(B, N, 3)`` int32 already clamped, ``frac`` in [0, 1)."""
    d, h, w = dims
    flat = ops.reshape(volume, (-1, volume.shape[-1]))
    offset = ops.reshape(ops.arange(batch, dtype="int32") * (d * h * w), (-1, 1))
    rows = [offset + i[..., 0] * (h * w) for i in (i0, i1)]
    cols = [i[..., 1] * w for i in (i0, i1)]
    deps = [i[..., 2] for i in (i0, i1)]

    def corner(a: int, b: int, c: int) -> Tensor:
        return ops.take(flat, rows[a] + cols[b] + deps[c], axis=0)

    fz, fy, fx = (frac[..., k : k + 1] for k in range(3))

    def lerp(lo: Tensor, hi: Tensor, t: Tensor) -> Tensor:
        return lo + (hi - lo) * t

    face = [
        [lerp(corner(a, b, 0), corner(a, b, 1), fx) for b in (0, 1)]
        for a in (0, 1)
    ]
    edge = [lerp(face[a][0], face[a][1], fy) for a in (0, 1)]
    return lerp(edge[0], edge[1], fz)


def sample_axes(volume: ArrayLike, axis_points: Sequence[ArrayLike], spacing: Spacing,
                fill_value: float | None = None, sigma: ArrayLike = 0.0) -> Array:
    """NumPy: ``volume (D, H, W, C)`` at the tensor grid ``axis_points[0] × [1] × [2]`` (mm per
    axis): :func:`sample` on that grid (same border rule and ``fill_value``), computed as three
    1-D interpolations (trilinear is separable), many times faster on the CPU. For axis-aligned
    resampling: the network grid, crops, shifts, a field back to full resolution.

    Each 1-D interpolation is a matrix product (:func:`linear_weights`, :func:`along_axis_numpy`):
    BLAS, one new array per axis and no gathers (a network field onto a 512×512×133 CT: 0.13 s
    against 2-5 s with two gathers per axis). The axes go from the one that grows least (or
    shrinks most) to the one that grows most, so the large intermediate volumes come last. The
    order does not change the result: the fill is a slab per axis, which the interpolations
    along the other axes keep (their weights sum to one).

    ``sigma`` (cells of ``volume``, per axis or one for all): a Gaussian blur before the sampling
    (anti-aliasing), SciPy's ``gaussian_filter`` (taps to 4σ, border mirrored) folded into the
    same matrices: blurs along different axes commute with the interpolations along the others."""
    out = np.asarray(volume, np.float32)
    step = np.broadcast_to(np.asarray(spacing, np.float64).reshape(-1), (3,))
    sigma = np.broadcast_to(np.asarray(sigma, np.float64), (3,))
    growth = [np.size(points) / out.shape[axis] for axis, points in enumerate(axis_points)]
    for axis in np.argsort(growth, kind="stable"):
        index = voxel_index(axis_points[axis], step[axis])
        last = out.shape[axis] - 1
        matrix = linear_weights(index, last + 1)
        if sigma[axis] > 0:
            radius = int(4.0 * sigma[axis] + 0.5)  # SciPy's default truncation
            matrix = matrix @ gaussian_matrix(last + 1, sigma[axis], radius)
        elif np.array_equal(index, np.arange(last + 1)):  # this axis's own centres: nothing to do
            continue
        out = along_axis_numpy(out, int(axis), matrix.astype(np.float32))
        if fill_value is not None:  # outside along one axis is outside: later axes keep the fill
            shape = [1] * out.ndim
            shape[axis] = -1
            outside = ((index < -0.5) | (index > last + 0.5)).reshape(shape)
            np.copyto(out, np.float32(fill_value), where=np.broadcast_to(outside, out.shape))
    return out


def linear_weights(index: ArrayLike, size: int) -> Array:
    """NumPy: ``(len(index), size)`` float32 weights of linear interpolation at the fractional
    voxel positions ``index`` of an axis of ``size`` cells, border values held beyond the
    outermost centres (the rule of :func:`sample`)."""
    index = np.asarray(index, np.float64).reshape(-1)
    lower = np.floor(index)
    frac = index - lower
    rows = np.arange(index.size)
    matrix = np.zeros((index.size, size), np.float32)
    np.add.at(matrix, (rows, np.clip(lower, 0, size - 1).astype(np.int64)), 1.0 - frac)
    np.add.at(matrix, (rows, np.clip(lower + 1, 0, size - 1).astype(np.int64)), frac)
    return matrix


def gaussian_matrix(size: int, sigma: float, radius: int) -> Array:
    """NumPy: ``(size, size)`` float64 weights of a Gaussian blur of ``sigma`` cells along one
    axis, taps to ``radius`` (>= 1) normalised, the border mirrored with its edge cell repeated
    (SciPy's ``reflect``)."""
    offsets = np.arange(-max(radius, 1), max(radius, 1) + 1)
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    rows = np.arange(size)
    columns = np.mod(rows[:, None] + offsets[None, :], 2 * size)  # mirrored: period 2·size
    columns = np.where(columns < size, columns, 2 * size - 1 - columns)
    matrix = np.zeros((size, size))
    np.add.at(matrix, (np.broadcast_to(rows[:, None], columns.shape), columns),
              np.broadcast_to(taps / taps.sum(), columns.shape))
    return matrix


def along_axis_numpy(volume: Array, axis: int, matrix: Array) -> Array:
    """NumPy: ``volume (..., n along axis, ...)`` with the ``(m, n)`` ``matrix`` applied along
    ``axis``: :func:`along_axis` for a NumPy volume of any rank, float32."""
    shape = list(volume.shape)
    size = shape[axis]
    before, after = int(np.prod(shape[:axis])), int(np.prod(shape[axis + 1:]))
    blocks = np.ascontiguousarray(volume, np.float32).reshape(before, size, after)
    if after == 1:
        out = blocks[..., 0] @ matrix.T
    elif after < 16:  # few values per line (the last axis of a field): lines as rows, not tiny products
        out = np.ascontiguousarray((blocks.transpose(0, 2, 1) @ matrix.T).transpose(0, 2, 1))
    else:
        out = np.matmul(matrix, blocks)
    shape[axis] = matrix.shape[0]
    return out.reshape(shape)


def axis_centres(shape: Shape, spacing: Spacing, offset_mm: Spacing = 0.0) -> list[Array]:
    """NumPy: the cell centres (mm, float32) of each axis of ``shape`` voxels of ``spacing``, plus
    ``offset_mm``: the tensor grid :func:`sample_axes` takes."""
    spacing = np.broadcast_to(np.asarray(spacing, np.float32).reshape(-1), (3,))
    offset = np.broadcast_to(np.asarray(offset_mm, np.float32), (3,))
    return [cell_centres(np.arange(int(n)), h, np.float32) + o for n, h, o in zip(shape, spacing, offset)]


def warp(image: Tensor, displacement: Tensor, spacing: Spacing = 1.0,
         fill_value: float | None = 0.0) -> Tensor:
    """Pull-back warp ``M(x + u(x))``: ``image (B, D, H, W, C)``, ``displacement (B, D', H', W', 3)`` in mm.

    The displacement lives on the output grid; the image may have another size over the same
    domain (its spacing is derived from the shapes), so a coarse image can be sampled on a fine
    grid and vice versa. ``spacing`` is the displacement grid's spacing.
    """
    displacement = ops.cast(displacement, FLOAT)
    out_dims = spatial_shape(displacement)
    spacing = as_spacing(spacing, _batch(displacement))
    image_spacing = _spacing_for(spacing, out_dims, spatial_shape(image))
    points = grid_points(out_dims, spacing) + displacement
    return sample(image, points, image_spacing, fill_value)


def compose(outer: Tensor, inner: Tensor, spacing: Spacing = 1.0) -> Tensor:
    """Displacement of ``outer ∘ inner``: ``u = u_inner + u_outer(x + u_inner(x))`` (both in mm, same grid)."""
    inner = ops.cast(inner, FLOAT)
    return inner + warp(outer, inner, spacing, fill_value=None)


def invert(displacement: Tensor, spacing: Spacing = 1.0, iterations: int = 8) -> Tensor:
    """Displacement ``v`` of the inverse map, on the same grid: ``x + v(x) = y`` where
    ``y + u(y) = x``, i.e. the fixed point ``v = -u(x + v)``, iterated from ``v = -u``.

    The iteration contracts where ``u``'s Jacobian has norm < 1 (smooth registration fields); each
    step multiplies the error by about that norm, so a few steps reach the interpolation error."""
    displacement = ops.cast(displacement, FLOAT)
    inverse = -displacement
    for _ in range(iterations):
        inverse = -warp(displacement, inverse, spacing, fill_value=None)
    return inverse


def resample(volume: Tensor, spacing: Spacing, target_shape: Shape) -> Tensor:
    """The same physical field on another cell-centred grid of the same domain (trilinear).

    Values are not rescaled: a displacement in mm keeps its mm values (prolongation), an image
    keeps its intensities. ``spacing`` is the source grid's spacing; the weights depend on the
    two shapes alone (both grids cover one domain), so it only has to be a valid spacing. Computed
    as three 1-D interpolations (:func:`resample_axis`), the most shrinking axis first and the
    most growing last (small intermediate volumes): the values of :func:`sample` at the new cell
    centres, a matrix product per axis instead of eight gathers per voxel (what makes carrying
    a field to or from a full-resolution CT cheap: docs/RESULTS.md,
    ``register_full_resolution.py``).
    """
    target_shape = tuple(int(n) for n in target_shape)
    known = _known_value(spacing)
    if known is not None:  # checked as every grid function checks it, though not used
        _checked_values(known, "spacing")
    out = ops.cast(volume, FLOAT)
    growth = np.asarray(target_shape, np.float64) / np.asarray(spatial_shape(out), np.float64)
    for axis in np.argsort(growth, kind="stable"):
        out = resample_axis(out, int(axis), target_shape[axis])
    return out


def resample_axis(volume: Tensor, axis: int, size: int) -> Tensor:
    """``volume (B, D, H, W, C)`` on ``size`` cells along spatial ``axis`` (0-2) over the same
    extent: linear interpolation between cell centres, border values held beyond the outermost
    ones (as :func:`sample` does), as the matrix product :func:`along_axis` with
    :func:`interpolation_matrix` (constants of the two sizes)."""
    source = int(volume.shape[axis + 1])
    if source == size:
        return volume
    return along_axis(volume, axis, interpolation_matrix(size, source))


def interpolation_matrix(size: int, source: int) -> Array:
    """NumPy: ``(size, source)`` float32 weights of :func:`resample_axis` as a matrix: the value at
    cell centre ``i`` of ``size`` cells from the two of ``source`` cells around it over the same
    extent (border values held)."""
    return linear_weights((np.arange(size) + 0.5) * source / size - 0.5, source)


def along_axis(volume: Tensor, axis: int, matrix: ArrayLike) -> Tensor:
    """``volume (B, D, H, W, C)`` with the ``(m, n)`` ``matrix`` applied along spatial ``axis``
    (0-2, ``n`` cells there, ``m`` after): any linear 1-D operator (interpolation, blur, both
    at once) as a matrix product, on the memory layout as it is (no transposes)."""
    shape = [int(n) for n in volume.shape[1:]]
    size, after = shape[axis], int(np.prod(shape[axis + 1:]))
    weights = np.asarray(matrix, np.float32)
    rows = int(weights.shape[0])
    if after == 1:  # the last axis of a one-channel volume: one (·, n) @ (n, m) product
        out = ops.matmul(ops.reshape(volume, (-1, size)), ops.convert_to_tensor(weights.T))
    else:
        out = ops.matmul(ops.convert_to_tensor(weights), ops.reshape(volume, (-1, size, after)))
    shape[axis] = rows
    return ops.reshape(out, (-1, *shape))


def resample_displacement(displacement: Tensor, spacing: Spacing, target_shape: Shape) -> Tensor:
    """A displacement field (mm) carried to another grid of the same domain; see :func:`resample`."""
    return resample(displacement, spacing, target_shape)


def _spacing_for(spacing: Tensor, source_dims: Shape, target_dims: Shape) -> Tensor:
    """Spacing of ``target_dims`` voxels over the domain that ``source_dims`` voxels of ``spacing`` cover."""
    ratio = np.asarray(source_dims, np.float32) / np.asarray(target_dims, np.float32)
    if np.all(ratio == 1.0):
        return spacing
    return spacing * ops.convert_to_tensor(ratio)[None, :]


def check_divisible(shape: Shape, factor: int, name: str = "shape") -> tuple[int, ...]:
    """Raise a one-line ValueError unless every entry of ``shape`` is a positive multiple of ``factor``."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or any(n <= 0 or n % factor for n in shape):
        raise ValueError(f"{name}: every spatial size must be a positive multiple of {factor}, got {shape}")
    return shape


def downsample(volume: Tensor) -> Tensor:
    """One pyramid step: 2×2×2 average pooling (exact low-pass + stride 2 on cell-centred grids)."""
    check_divisible(spatial_shape(volume), 2, "volume")
    return ops.average_pool(ops.cast(volume, FLOAT), 2, strides=2, padding="valid")


def pyramid(volume: Tensor, levels: int) -> list[Tensor]:
    """``[level 1 (the input), level 2, ..., level L]``, each half the size of the one before."""
    check_divisible(spatial_shape(volume), 2 ** (levels - 1), "volume")
    out = [ops.cast(volume, FLOAT)]
    for _ in range(levels - 1):
        out.append(downsample(out[-1]))
    return out


def level_shape(shape: Shape, level: int) -> tuple[int, ...]:
    """Spatial shape of pyramid ``level`` (1 = finest) for an input grid of ``shape``."""
    factor = 2 ** (level - 1)
    check_divisible(shape, factor, "shape")
    return tuple(int(n) // factor for n in shape)
