"""The per-level 3D U-Net of the paper ("Single Level Architecture").

Input: moving and fixed concatenated, ``(B, D, H, W, 2)``. ``depth`` resolution levels starting
at ``base_filters`` filters, doubled after each 2×2×2 average pooling; 3×3×3 convolutions each
followed by batch normalisation and ReLU; transposed convolutions up that halve the filters;
skip connections by concatenation; a final 1×1×1 convolution to 3 channels.

Output: a displacement in **voxels of the input grid** (the model scales it by the level's spacing
to mm), so the same weights mean the same motion in voxels on every level.
"""

import keras
from keras import layers

# Start the displacement head near zero: an untrained network is close to the identity map.
FLOW_HEAD_STDDEV = 1e-5
# Keras's default batch-norm momentum (0.99) needs hundreds of steps before the moving statistics
# used at inference (and by the frozen coarser levels during staged training) match the batch
# statistics; registration data sets are small, so the default here is 0.9.
BATCHNORM_MOMENTUM = 0.9


def required_divisor(depth):
    """Each spatial size must be a multiple of this for ``depth`` resolution levels."""
    return 2 ** (depth - 1)


def _conv_block(x, filters, convs, initializer, momentum, name):
    for i in range(convs):
        x = layers.Conv3D(
            filters, 3, padding="same", use_bias=False, kernel_initializer=initializer,
            name=f"{name}_conv{i}",
        )(x)
        x = layers.BatchNormalization(momentum=momentum, name=f"{name}_bn{i}")(x)
        x = layers.ReLU(name=f"{name}_relu{i}")(x)
    return x


def unet(input_shape, base_filters=16, depth=3, convs_per_block=2,
         kernel_initializer="glorot_uniform", batchnorm_momentum=BATCHNORM_MOMENTUM, name="unet"):
    """A functional ``keras.Model`` ``(D, H, W, 2) -> (D, H, W, 3)`` displacement in voxels.

    ``kernel_initializer`` defaults to Xavier uniform (Glorot), as in the paper; the flow head
    always starts near zero.
    """
    divisor = required_divisor(depth)
    if any(int(n) % divisor for n in input_shape[:3]):
        raise ValueError(
            f"unet input shape {tuple(input_shape[:3])}: every size must be a multiple of {divisor} "
            f"for depth {depth}"
        )
    inputs = keras.Input(shape=tuple(input_shape[:3]) + (2,), name=f"{name}_input")
    x = inputs
    skips = []
    for level in range(depth):
        filters = base_filters * 2 ** level
        x = _conv_block(x, filters, convs_per_block, kernel_initializer,
                        batchnorm_momentum, f"enc{level}")
        if level < depth - 1:
            skips.append(x)
            x = layers.AveragePooling3D(2, name=f"pool{level}")(x)
    for level in reversed(range(depth - 1)):
        filters = base_filters * 2 ** level
        x = layers.Conv3DTranspose(
            filters, 2, strides=2, kernel_initializer=kernel_initializer, name=f"up{level}",
        )(x)
        x = layers.Concatenate(name=f"skip{level}")([x, skips[level]])
        x = _conv_block(x, filters, convs_per_block, kernel_initializer,
                        batchnorm_momentum, f"dec{level}")
    flow = layers.Conv3D(
        3, 1, kernel_initializer=keras.initializers.RandomNormal(stddev=FLOW_HEAD_STDDEV),
        bias_initializer="zeros", dtype="float32", name="flow",
    )(x)
    return keras.Model(inputs, flow, name=name)
