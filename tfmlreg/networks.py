"""The per-level 3D U-Net of the paper ("Single Level Architecture").

Input: moving and fixed concatenated, ``(B, D, H, W, 2)``. ``depth`` resolution levels starting
at ``base_filters`` filters, doubled after each 2×2×2 average pooling; 3×3×3 convolutions each
followed by batch normalisation and ReLU; transposed convolutions up that halve the filters;
skip connections by concatenation; a final 1×1×1 convolution to 3 channels.

Output: a displacement in **voxels of the input grid** (the model scales it by the level's spacing
to mm), so the same weights mean the same motion in voxels on every level.

For inference and export the batch normalisation is folded into the convolutions
(:func:`fold_batchnorm`): the same function with ``batchnorm=False`` builds the net with biased
convolutions and no normalisation layers, and the folded weights give the same output.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

from tfmlreg.types import Shape, Tensor

# Start the displacement head near zero: an untrained network is close to the identity map.
FLOW_HEAD_STDDEV = 1e-5
# Keras's default batch-norm momentum (0.99) needs hundreds of steps before the moving statistics
# used at inference (and by the frozen coarser levels during staged training) match the batch
# statistics; registration data sets are small, so the default here is 0.9.
BATCHNORM_MOMENTUM = 0.9


def required_divisor(depth: int) -> int:
    """Each spatial size must be a multiple of this for ``depth`` resolution levels."""
    return 2 ** (depth - 1)


def _conv_block(x: Tensor, filters: int, convs: int,
                initializer: str | keras.initializers.Initializer, momentum: float,
                batchnorm: bool, dtype: str | None, name: str) -> Tensor:
    for i in range(convs):
        x = layers.Conv3D(
            filters, 3, padding="same", use_bias=not batchnorm, kernel_initializer=initializer,
            dtype=dtype, name=f"{name}_conv{i}",
        )(x)
        if batchnorm:
            x = layers.BatchNormalization(momentum=momentum, dtype=dtype, name=f"{name}_bn{i}")(x)
        x = layers.ReLU(dtype=dtype, name=f"{name}_relu{i}")(x)
    return x


def unet(input_shape: Shape, base_filters: int = 16, depth: int = 3, convs_per_block: int = 2,
         kernel_initializer: str | keras.initializers.Initializer = "glorot_uniform",
         batchnorm_momentum: float = BATCHNORM_MOMENTUM, name: str = "unet",
         batchnorm: bool = True, dtype: str | None = None) -> keras.Model:
    """A functional ``keras.Model`` ``(D, H, W, 2) -> (D, H, W, 3)`` displacement in voxels.

    ``kernel_initializer`` defaults to Xavier uniform (Glorot), as in the paper; the flow head
    always starts near zero and computes in float32. ``batchnorm=False`` is the folded topology
    (see :func:`fold_batchnorm`); ``dtype`` is the other layers' dtype policy (None: the global
    policy), e.g. ``"mixed_bfloat16"``.
    """
    divisor = required_divisor(depth)
    if any(int(n) % divisor for n in input_shape[:3]):
        raise ValueError(
            f"unet input shape {tuple(input_shape[:3])}: every size must be a multiple of {divisor} "
            f"for depth {depth}"
        )
    inputs = keras.Input(shape=tuple(input_shape[:3]) + (2,), name=f"{name}_input")
    x = inputs
    skips: list[Tensor] = []
    for level in range(depth):
        filters = base_filters * 2 ** level
        x = _conv_block(x, filters, convs_per_block, kernel_initializer,
                        batchnorm_momentum, batchnorm, dtype, f"enc{level}")
        if level < depth - 1:
            skips.append(x)
            x = layers.AveragePooling3D(2, dtype=dtype, name=f"pool{level}")(x)
    for level in reversed(range(depth - 1)):
        filters = base_filters * 2 ** level
        x = layers.Conv3DTranspose(
            filters, 2, strides=2, kernel_initializer=kernel_initializer, dtype=dtype,
            name=f"up{level}",
        )(x)
        x = layers.Concatenate(dtype=dtype, name=f"skip{level}")([x, skips[level]])
        x = _conv_block(x, filters, convs_per_block, kernel_initializer,
                        batchnorm_momentum, batchnorm, dtype, f"dec{level}")
    flow = layers.Conv3D(
        3, 1, kernel_initializer=keras.initializers.RandomNormal(stddev=FLOW_HEAD_STDDEV),
        bias_initializer="zeros", dtype="float32", name="flow",
    )(x)
    return keras.Model(inputs, flow, name=name)


def fold_batchnorm(source: keras.Model, target: keras.Model) -> None:
    """Set ``target`` (a ``unet(..., batchnorm=False)``) to ``source`` (the same net with
    batch normalisation) with each inference-mode normalisation folded into its convolution:
    ``W' = W·γ/√(σ² + ε)``, ``b' = β − μ·γ/√(σ² + ε)`` per output channel (in float64)."""
    for layer in target.layers:
        if not layer.weights:
            continue
        original = source.get_layer(layer.name)
        if isinstance(layer, layers.Conv3D) and not original.use_bias:
            norm = source.get_layer(layer.name.replace("_conv", "_bn"))
            gamma, beta, mean, variance = (np.asarray(w, np.float64) for w in norm.get_weights())
            scale = gamma / np.sqrt(variance + norm.epsilon)
            kernel = np.asarray(original.get_weights()[0], np.float64) * scale
            layer.set_weights([kernel, beta - mean * scale])
        else:
            layer.set_weights(original.get_weights())
