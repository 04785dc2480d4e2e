"""Registration losses: NGF distance, curvature regulariser, mask distance (docs/DESIGN.md section 1).

Every formula is written once, as a function returning one value per sample, shape ``(B,)``:

* :func:`ngf` ``(fixed, warped, spacing, epsilon)``,
* :func:`curvature` ``(displacement, spacing)``,
* :func:`mask_distance` ``(fixed_onehot, warped_onehot)``;

the Keras ``Loss`` classes (:class:`NGF`, :class:`Curvature`, :class:`MaskDistance`) and the
training objective (:func:`registration_loss`, paper eq. 2) only call them.

Conventions: volumes are channels-last ``(B, D, H, W, C)``, displacements ``(B, D, H, W, 3)`` in mm,
``spacing`` is the voxel size in mm per array axis (scalar, ``(3,)`` or per sample ``(B, 3)``).
Derivatives are central differences on the interior voxels (the one-voxel border is dropped), so
each spatial size must be at least 3. All arithmetic is float32 whatever the Keras dtype policy
(inputs are cast), and everything is ``keras.ops`` with static spatial shapes, so it runs under XLA.
"""

from __future__ import annotations

import numbers
from typing import Any

import keras
from keras import ops

from tfmlreg.geometry import FLOAT, as_spacing, check_spacing, spatial_shape
from tfmlreg.types import Spacing, Tensor

__all__ = [
    "ngf",
    "curvature",
    "mask_distance",
    "registration_loss",
    "registration_loss_terms",
    "NGF",
    "Curvature",
    "MaskDistance",
]


# --- finite differences on the interior ---------------------------------------------------------


def _prepare(volume: Tensor, name: str) -> tuple[Tensor, tuple[int, ...]]:
    """Cast to float32 and check the volume is 5-D with every spatial size >= 3."""
    volume = ops.cast(volume, FLOAT)
    dims = spatial_shape(volume)
    if min(dims) < 3:
        raise ValueError(f"{name}: every spatial size must be >= 3 for interior differences, got {dims}")
    return volume, dims


def _shifted(volume: Tensor, dims: tuple[int, ...], axis: int, offset: int) -> Tensor:
    """The interior crop ``[1:-1]^3`` of ``volume`` moved by ``offset`` voxels along spatial ``axis``."""
    index = [slice(None)] + [slice(1, n - 1) for n in dims] + [slice(None)]
    index[axis + 1] = slice(1 + offset, dims[axis] - 1 + offset)
    return volume[tuple(index)]


def _axis_spacing(spacing: Tensor, axis: int) -> Tensor:
    """Spacing of one axis as ``(B, 1, 1, 1, 1)``, broadcasting against batched volumes."""
    return ops.reshape(spacing[:, axis], (-1, 1, 1, 1, 1))


def _gradient(volume: Tensor, dims: tuple[int, ...], spacing: Tensor) -> list[Tensor]:
    """Central-difference gradient on the interior: three ``(B, D-2, H-2, W-2, C)`` tensors (units/mm)."""
    return [
        (_shifted(volume, dims, k, 1) - _shifted(volume, dims, k, -1)) / (2.0 * _axis_spacing(spacing, k))
        for k in range(3)
    ]


def _laplacian(volume: Tensor, dims: tuple[int, ...], spacing: Tensor) -> Tensor:
    """7-point Laplacian with spacing on the interior, ``(B, D-2, H-2, W-2, C)`` (units/mm²)."""
    centre = _shifted(volume, dims, 0, 0)
    return sum(
        (_shifted(volume, dims, k, 1) - 2.0 * centre + _shifted(volume, dims, k, -1))
        / ops.square(_axis_spacing(spacing, k))
        for k in range(3)
    )


def _voxel_mean(values: Tensor) -> Tensor:
    """Mean over the spatial axes, ``(B, D, H, W, C)`` -> ``(B, C)``."""
    return ops.mean(values, axis=(1, 2, 3))


# --- the three terms ------------------------------------------------------------------------------


def _check_epsilon(epsilon: float | Tensor) -> None:
    if isinstance(epsilon, numbers.Real) and not float(epsilon) > 0:
        raise ValueError(f"epsilon: must be > 0 (intensity units per mm), got {epsilon}")


def ngf(fixed: Tensor, warped: Tensor, spacing: Spacing, epsilon: float | Tensor,
        weights: Tensor | None = None) -> Tensor:
    """Normalised gradient fields distance per sample, ``(B,)``, in [0, 1].

    ``NGF(F, M) = mean_x [1 - (∇F·∇M + ε²)² / ((|∇F|² + ε²)(|∇M|² + ε²))]`` over interior voxels.
    ``fixed`` and ``warped`` are ``(B, D, H, W, C)`` images; ``spacing`` in mm; ``epsilon > 0`` in
    intensity units per mm (the edge noise level: gradients much smaller than it count as flat).
    Images are single-channel in this package; with ``C > 1`` the distance is computed per channel
    and averaged over channels. ``weights`` ``(B, D, H, W, 1)`` (e.g. a lung or body mask, >= 0)
    turn the mean over voxels into a weighted mean (refinement restricted to a region).
    """
    _check_epsilon(epsilon)
    fixed, dims = _prepare(fixed, "fixed")
    warped, warped_dims = _prepare(warped, "warped")
    if warped_dims != dims:
        raise ValueError(f"warped: spatial shape {warped_dims} differs from fixed {dims}")
    spacing = as_spacing(spacing, ops.shape(fixed)[0])
    eps2 = ops.square(ops.cast(epsilon, FLOAT))
    grad_f = _gradient(fixed, dims, spacing)
    grad_m = _gradient(warped, dims, spacing)
    dot = sum(f * m for f, m in zip(grad_f, grad_m)) + eps2
    norm_f = sum(ops.square(f) for f in grad_f) + eps2
    norm_m = sum(ops.square(m) for m in grad_m) + eps2
    # Two ratios instead of dot² / (norm_f * norm_m): each denominator is >= ε², so neither the
    # value nor its gradient can underflow to 0/0 for flat images or overflow for steep ones.
    alignment = (dot / norm_f) * (dot / norm_m)
    if weights is None:
        return ops.mean(_voxel_mean(1.0 - alignment), axis=-1)
    weights = _shifted(ops.cast(weights, FLOAT), dims, 0, 0)
    total = ops.maximum(_voxel_mean(weights), 1e-12)
    return ops.mean(_voxel_mean(weights * (1.0 - alignment)) / total, axis=-1)


def curvature(displacement: Tensor, spacing: Spacing) -> Tensor:
    """Curvature regulariser per sample, ``(B,)``: ``S(u) = 1/2 Σ_c mean_x (Δ_h u_c)²`` (mm⁻²).

    ``displacement`` is ``(B, D, H, W, 3)`` in mm; ``Δ_h`` is the 7-point Laplacian with the
    sample's spacing (mm) on interior voxels, so any affine field costs exactly 0.
    """
    displacement, dims = _prepare(displacement, "displacement")
    spacing = as_spacing(spacing, ops.shape(displacement)[0])
    laplacian = _laplacian(displacement, dims, spacing)
    return 0.5 * ops.sum(_voxel_mean(ops.square(laplacian)), axis=-1)


def folding(displacement: Tensor, spacing: Spacing, threshold: float = 0.1) -> Tensor:
    """Folding penalty per sample, ``(B,)``: ``mean_x max(0, t − det(I + ∇u))²`` (dimensionless).

    ``det(I + ∇u)`` with central differences on interior voxels (as in :func:`curvature`); zero
    wherever the local volume change stays above ``threshold``, so it only acts where ``y`` is
    about to fold (``det <= 0``), not on ordinary compression.
    """
    displacement, dims = _prepare(displacement, "displacement")
    spacing = as_spacing(spacing, ops.shape(displacement)[0])
    grad = _gradient(displacement, dims, spacing)  # grad[k][..., c] = ∂u_c/∂x_k
    jac = [[grad[k][..., c] + (1.0 if c == k else 0.0) for k in range(3)] for c in range(3)]
    det = (jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
           - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
           + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0]))
    return ops.mean(ops.square(ops.relu(threshold - det)), axis=(1, 2, 3))


def mask_distance(fixed_onehot: Tensor, warped_onehot: Tensor) -> Tensor:
    """Mask term per sample, ``(B,)``: ``mean_{x,k} (b_F,k(x) − b_M,k(y(x)))²`` (dimensionless).

    Both are ``(B, D, H, W, K)`` one-hot (or warped, fractional) masks of the labels ``1..K``; the
    caller leaves the background channel out. The mean runs over all voxels (no derivatives here).
    """
    fixed_onehot = ops.cast(fixed_onehot, FLOAT)
    warped_onehot = ops.cast(warped_onehot, FLOAT)
    if tuple(fixed_onehot.shape[1:]) != tuple(warped_onehot.shape[1:]):
        shapes = tuple(warped_onehot.shape), tuple(fixed_onehot.shape)
        raise ValueError(f"warped_onehot: shape {shapes[0]} differs from fixed_onehot {shapes[1]}")
    return ops.mean(ops.square(fixed_onehot - warped_onehot), axis=(1, 2, 3, 4))


# --- the training objective (paper eq. 2) ---------------------------------------------------------


def displacement_error(displacement: Tensor, truth: Tensor) -> Tensor:
    """Per-sample ``mean_x |u(x) - u_true(x)|²`` (mm²), ``(B,)``: the supervised term, for
    training data with exact ground truth (synthetic motion)."""
    squared = ops.sum(ops.square(ops.cast(displacement, "float32") - ops.cast(truth, "float32")), axis=-1)
    return ops.mean(squared, axis=(1, 2, 3))


def registration_loss_terms(
    fixed: Tensor, warped: Tensor, displacement: Tensor, spacing: Spacing, alpha: float | Tensor,
    beta: float | Tensor, epsilon: float | Tensor, fixed_onehot: Tensor | None = None,
    warped_onehot: Tensor | None = None,
) -> dict[str, Tensor]:
    """The per-sample loss and its parts, each ``(B,)``: ``{"ngf", "curvature", ["mask"], "loss"}``.

    ``loss = NGF(F, M(y)) + alpha * S(u) + beta / 2 * mask term``. The mask term (and its key) is
    present only when both ``fixed_onehot`` and ``warped_onehot`` are given (training with labels).
    """
    if (fixed_onehot is None) != (warped_onehot is None):
        raise ValueError("fixed_onehot, warped_onehot: give both masks or neither")
    terms = {
        "ngf": ngf(fixed, warped, spacing, epsilon),
        "curvature": curvature(displacement, spacing),
    }
    loss = terms["ngf"] + alpha * terms["curvature"]
    if fixed_onehot is not None:
        terms["mask"] = mask_distance(fixed_onehot, warped_onehot)
        loss = loss + 0.5 * beta * terms["mask"]
    terms["loss"] = loss
    return terms


def registration_loss(
    fixed: Tensor, warped: Tensor, displacement: Tensor, spacing: Spacing, alpha: float | Tensor,
    beta: float | Tensor, epsilon: float | Tensor, fixed_onehot: Tensor | None = None,
    warped_onehot: Tensor | None = None,
) -> Tensor:
    """Per-sample training loss ``(B,)``: ``NGF + alpha * S(u) + beta / 2 * mask``.

    See :func:`registration_loss_terms` for the arguments and the parts.
    """
    return registration_loss_terms(
        fixed, warped, displacement, spacing, alpha, beta, epsilon, fixed_onehot, warped_onehot
    )["loss"]


# --- Keras Loss classes ---------------------------------------------------------------------------


def _spacing_config(spacing: Spacing) -> float | list[float]:
    """A JSON-friendly spacing for ``get_config``: a float or a list of 3 floats (mm), checked
    (:func:`tfmlreg.geometry.check_spacing`)."""
    values = check_spacing(ops.convert_to_numpy(spacing) if ops.is_tensor(spacing) else spacing)
    return float(values[0]) if isinstance(spacing, numbers.Number) else values.tolist()


@keras.saving.register_keras_serializable(package="tfmlreg")
class NGF(keras.losses.Loss):
    """NGF distance as a Keras loss: ``y_true`` = fixed image, ``y_pred`` = warped moving image.

    Both ``(B, D, H, W, C)``. ``epsilon`` is in intensity units per mm (the default suits images
    normalised to about [0, 1]); ``spacing`` (mm, scalar or ``(3,)``) is fixed at construction
    because a Keras loss sees only ``(y_true, y_pred)``: for per-sample spacing call :func:`ngf`.
    """

    def __init__(self, epsilon: float = 0.01, spacing: Spacing = 1.0, name: str = "ngf",
                 reduction: str | None = "sum_over_batch_size", dtype: Any = None) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        _check_epsilon(epsilon)
        self.epsilon = float(epsilon)
        self.spacing = _spacing_config(spacing)

    def call(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        return ngf(y_true, y_pred, self.spacing, self.epsilon)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "epsilon": self.epsilon, "spacing": self.spacing}


@keras.saving.register_keras_serializable(package="tfmlreg")
class Curvature(keras.losses.Loss):
    """Curvature regulariser as a Keras loss: ``y_pred`` = displacement ``(B, D, H, W, 3)`` in mm.

    ``y_true`` is ignored (pass anything, e.g. zeros). ``spacing`` in mm, scalar or ``(3,)``.
    """

    def __init__(self, spacing: Spacing = 1.0, name: str = "curvature",
                 reduction: str | None = "sum_over_batch_size", dtype: Any = None) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.spacing = _spacing_config(spacing)

    def call(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        del y_true  # a regulariser of the prediction alone
        return curvature(y_pred, self.spacing)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "spacing": self.spacing}


@keras.saving.register_keras_serializable(package="tfmlreg")
class MaskDistance(keras.losses.Loss):
    """Mask term as a Keras loss: ``y_true`` = fixed one-hot, ``y_pred`` = warped moving one-hot.

    Both ``(B, D, H, W, K)`` over the labels ``1..K`` (background excluded).
    """

    def __init__(self, name: str = "mask_distance", reduction: str | None = "sum_over_batch_size",
                 dtype: Any = None) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        return mask_distance(y_true, y_pred)
