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

import numpy as np
from keras import ops

FLOAT = "float32"


def as_spacing(spacing, batch_size=None):
    """Spacing as a float32 ``(B, 3)`` tensor from a scalar, a ``(3,)`` or a ``(B, 3)`` value."""
    spacing = ops.cast(ops.convert_to_tensor(spacing), FLOAT)
    rank = len(spacing.shape)
    if rank == 0:
        spacing = ops.reshape(spacing, (1, 1)) * ops.ones((1, 3), FLOAT)
    elif rank == 1:
        spacing = ops.reshape(spacing, (1, 3))
    elif rank != 2 or spacing.shape[-1] not in (3, None):
        raise ValueError(f"spacing: expected a scalar, (3,) or (B, 3), got shape {tuple(spacing.shape)}")
    if batch_size is not None:
        spacing = ops.broadcast_to(spacing, (batch_size, 3))
    return spacing


def spatial_shape(volume):
    """The static ``(D, H, W)`` of a ``(B, D, H, W, C)`` volume; raises if it is not 5-D or static."""
    shape = tuple(volume.shape)
    if len(shape) != 5:
        raise ValueError(f"expected a (B, D, H, W, C) volume, got shape {shape}")
    if any(n is None for n in shape[1:4]):
        raise ValueError(f"spatial size must be static, got shape {shape}")
    return tuple(int(n) for n in shape[1:4])


def _batch(volume):
    return ops.shape(volume)[0]


def grid_points(shape, spacing):
    """Cell-centre coordinates in mm, ``(B, D, H, W, 3)``, of a grid of ``shape`` with ``spacing (B, 3)``.

    Built from ``arange`` in the graph rather than embedded as a constant: a 160³ grid constant
    would add ~50 MB to an exported graph for every warp in it.
    """
    axes = [ops.arange(int(n), dtype=FLOAT) + 0.5 for n in shape]
    centres = ops.stack(ops.meshgrid(*axes, indexing="ij"), axis=-1)
    return centres[None] * spacing[:, None, None, None, :]


def sample(volume, points, spacing, fill_value=None):
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
        extent = ops.convert_to_tensor(np.array(dims, np.float32))
        inside = ops.all((index >= -0.5) & (index <= extent - 0.5), axis=-1, keepdims=True)
        values = ops.where(inside, values, ops.cast(fill_value, FLOAT))
    return ops.reshape(values, (-1,) + point_dims + (channels,))


def _trilinear(volume, dims, batch, i0, i1, frac):
    """Blend the 8 corner values; indices ``(B, N, 3)`` int32 already clamped, ``frac`` in [0, 1)."""
    d, h, w = dims
    flat = ops.reshape(volume, (-1, volume.shape[-1]))
    offset = ops.reshape(ops.arange(batch, dtype="int32") * (d * h * w), (-1, 1))
    rows = [offset + i[..., 0] * (h * w) for i in (i0, i1)]
    cols = [i[..., 1] * w for i in (i0, i1)]
    deps = [i[..., 2] for i in (i0, i1)]

    def corner(a, b, c):
        return ops.take(flat, rows[a] + cols[b] + deps[c], axis=0)

    fz, fy, fx = (frac[..., k : k + 1] for k in range(3))

    def lerp(lo, hi, t):
        return lo + (hi - lo) * t

    face = [
        [lerp(corner(a, b, 0), corner(a, b, 1), fx) for b in (0, 1)]
        for a in (0, 1)
    ]
    edge = [lerp(face[a][0], face[a][1], fy) for a in (0, 1)]
    return lerp(edge[0], edge[1], fz)


def warp(image, displacement, spacing=1.0, fill_value=0.0):
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


def compose(outer, inner, spacing=1.0):
    """Displacement of ``outer ∘ inner``: ``u = u_inner + u_outer(x + u_inner(x))`` (both in mm, same grid)."""
    inner = ops.cast(inner, FLOAT)
    return inner + warp(outer, inner, spacing, fill_value=None)


def resample(volume, spacing, target_shape):
    """The same physical field on another cell-centred grid of the same domain (trilinear).

    Values are not rescaled: a displacement in mm keeps its mm values (prolongation), an image
    keeps its intensities. ``spacing`` is the source grid's spacing.
    """
    target_shape = tuple(int(n) for n in target_shape)
    source_dims = spatial_shape(volume)
    if source_dims == target_shape:  # the same cell centres: nothing to interpolate
        return ops.cast(volume, FLOAT)
    spacing = as_spacing(spacing, _batch(volume))
    target_spacing = _spacing_for(spacing, source_dims, target_shape)
    return sample(volume, grid_points(target_shape, target_spacing), spacing)


def resample_displacement(displacement, spacing, target_shape):
    """A displacement field (mm) carried to another grid of the same domain; see :func:`resample`."""
    return resample(displacement, spacing, target_shape)


def _spacing_for(spacing, source_dims, target_dims):
    """Spacing of ``target_dims`` voxels over the domain that ``source_dims`` voxels of ``spacing`` cover."""
    ratio = np.asarray(source_dims, np.float32) / np.asarray(target_dims, np.float32)
    if np.all(ratio == 1.0):
        return spacing
    return spacing * ops.convert_to_tensor(ratio)[None, :]


def check_divisible(shape, factor, name="shape"):
    """Raise a one-line ValueError unless every entry of ``shape`` is a positive multiple of ``factor``."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or any(n <= 0 or n % factor for n in shape):
        raise ValueError(f"{name}: every spatial size must be a positive multiple of {factor}, got {shape}")
    return shape


def downsample(volume):
    """One pyramid step: 2×2×2 average pooling (exact low-pass + stride 2 on cell-centred grids)."""
    check_divisible(spatial_shape(volume), 2, "volume")
    return ops.average_pool(ops.cast(volume, FLOAT), 2, strides=2, padding="valid")


def pyramid(volume, levels):
    """``[level 1 (the input), level 2, ..., level L]``, each half the size of the one before."""
    check_divisible(spatial_shape(volume), 2 ** (levels - 1), "volume")
    out = [ops.cast(volume, FLOAT)]
    for _ in range(levels - 1):
        out.append(downsample(out[-1]))
    return out


def level_shape(shape, level):
    """Spatial shape of pyramid ``level`` (1 = finest) for an input grid of ``shape``."""
    factor = 2 ** (level - 1)
    check_divisible(shape, factor, "shape")
    return tuple(int(n) // factor for n in shape)
