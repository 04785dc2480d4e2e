"""The per-level 3D U-Net of the paper ("Single Level Architecture").

Input: moving and fixed concatenated, ``(B, D, H, W, 2)``. ``depth`` resolution levels starting
at ``base_filters`` filters, doubled after each 2×2×2 average pooling; 3×3×3 convolutions each
followed by a normalisation and ReLU; transposed convolutions up that halve the filters; skip
connections by concatenation; a final 1×1×1 convolution to 3 channels.

Output: a displacement in **voxels of the input grid** (the model scales it by the level's spacing
to mm), so the same weights mean the same motion in voxels on every level.

Normalisation (``normalization``): ``"instance"`` (the default: each sample's channels over the
volume, :class:`InstanceNormalization`), ``"batch"`` (Keras' batch normalisation, as the first
models were trained) or ``"none"`` (biased convolutions, as VoxelMorph's U-Net).
Registration trains with batch 1, where batch normalisation in training *is* instance
normalisation but at inference uses population statistics: another function. The batch-normalised
chest-CT network lost most of its response to pure shifts that way (docs/DESIGN.md section 6).
``"instance"`` and ``"none"`` are one function in training and inference; ``"instance"`` also
normalises away the size of a misalignment in the features, ``"none"`` keeps it. From scratch
(the two-level fit on a shifted blob pair and its reverse of ``tests/test_model.py``, 12
epochs) the error left on the two pairs was 16 % / 44 % of the shift with instance
normalisation, 27 % / 57 % with batch normalisation and 15 % / 106 % with none, so instance
normalisation is the default. The evidence is mixed beyond that toy: the real-CT Table 1 arms
(``benchmarks/table1_ct.py``, 24 epochs from scratch) left 5.78 / 7.41 mm (multilevel,
pretrained / Xavier) with instance normalisation against 3.67 / 6.48 mm with batch
normalisation used at inference, and 6.16 against 7.52 mm for the single level (docs/RESULTS.md).
A trained batch-normalised net is best fine-tuned in ``"none"``:
its weights folded are its inference function exactly (how the shipped chest-CT model was made).

For inference and export a batch normalisation is folded into the convolutions
(:func:`copy_weights`): a ``"none"`` net with the folded weights gives the same output.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

from tfmlreg.layers import serializable
from tfmlreg.types import Shape, Tensor

# Start the displacement head near zero: an untrained network is close to the identity map.
FLOW_HEAD_STDDEV = 1e-5
# Keras's default batch-norm momentum (0.99) needs hundreds of steps before the moving statistics
# used at inference (and by the frozen coarser levels during staged training) match the batch
# statistics; registration data sets are small, so the default here is 0.9.
BATCHNORM_MOMENTUM = 0.9
NORMALIZATIONS = ("batch", "instance", "none")
NORMALIZATION_EPSILON = 1e-3  # Keras' batch-norm default, so batch-norm weights carry over


@serializable
class InstanceNormalization(layers.Layer):
    """Each sample's channels normalised over the spatial axes, then a learnt per-channel scale
    ``gamma`` and offset ``beta`` (what batch normalisation computes in training on a batch of
    one); the statistics in float32 whatever the compute dtype."""

    def __init__(self, epsilon: float = NORMALIZATION_EPSILON, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def build(self, input_shape: Shape) -> None:
        channels = (int(input_shape[-1]),)
        self.gamma = self.add_weight(shape=channels, initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=channels, initializer="zeros", name="beta")

    def call(self, inputs: Tensor) -> Tensor:
        values = ops.cast(inputs, "float32")
        axes = tuple(range(1, len(inputs.shape) - 1))
        mean, variance = ops.moments(values, axes=axes, keepdims=True)
        scale = ops.cast(self.gamma, "float32") * ops.rsqrt(variance + self.epsilon)
        normalised = (values - mean) * scale + ops.cast(self.beta, "float32")
        return ops.cast(normalised, self.compute_dtype)

    def get_config(self) -> dict[str, object]:
        return {**super().get_config(), "epsilon": self.epsilon}


def required_divisor(depth: int) -> int:
    """Each spatial size must be a multiple of this for ``depth`` resolution levels."""
    return 2 ** (depth - 1)


def _norm_name(conv_name: str, normalization: str) -> str:
    """The normalisation layer after convolution ``conv_name`` (``"batch"``: the first models'
    ``_bn`` names, kept so their files load)."""
    return conv_name.replace("_conv", "_bn" if normalization == "batch" else "_norm")


def _conv_block(x: Tensor, filters: int, convs: int,
                initializer: str | keras.initializers.Initializer, momentum: float,
                normalization: str, dtype: str | None, name: str) -> Tensor:
    for i in range(convs):
        conv = f"{name}_conv{i}"
        x = layers.Conv3D(
            filters, 3, padding="same", use_bias=normalization == "none",
            kernel_initializer=initializer, dtype=dtype, name=conv,
        )(x)
        if normalization == "batch":
            x = layers.BatchNormalization(momentum=momentum, epsilon=NORMALIZATION_EPSILON,
                                          dtype=dtype, name=_norm_name(conv, normalization))(x)
        elif normalization == "instance":
            x = InstanceNormalization(dtype=dtype, name=_norm_name(conv, normalization))(x)
        x = layers.ReLU(dtype=dtype, name=f"{name}_relu{i}")(x)
    return x


def unet(input_shape: Shape, base_filters: int = 16, depth: int = 3, convs_per_block: int = 2,
         kernel_initializer: str | keras.initializers.Initializer = "glorot_uniform",
         batchnorm_momentum: float = BATCHNORM_MOMENTUM, name: str = "unet",
         normalization: str = "instance", dtype: str | None = None) -> keras.Model:
    """A functional ``keras.Model`` ``(D, H, W, 2) -> (D, H, W, 3)`` displacement in voxels.

    ``kernel_initializer`` defaults to Xavier uniform (Glorot), as in the paper; the flow head
    always starts near zero and computes in float32. ``normalization``: ``"batch"`` (with
    ``batchnorm_momentum``), ``"instance"`` or ``"none"`` (module docstring); ``dtype`` is the
    other layers' dtype policy (None: the global policy), e.g. ``"mixed_bfloat16"``.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization: expected one of {', '.join(NORMALIZATIONS)}, got "
                         f"{normalization!r}")
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
                        batchnorm_momentum, normalization, dtype, f"enc{level}")
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
                        batchnorm_momentum, normalization, dtype, f"dec{level}")
    flow = layers.Conv3D(
        3, 1, kernel_initializer=keras.initializers.RandomNormal(stddev=FLOW_HEAD_STDDEV),
        bias_initializer="zeros", dtype="float32", name="flow",
    )(x)
    return keras.Model(inputs, flow, name=name)


def copy_weights(source: keras.Model, target: keras.Model) -> None:
    """Set ``target`` to ``source``'s weights, two U-Nets of one architecture, layer by layer.

    A convolution of a ``"none"`` target takes a batch-normalised source's normalisation
    folded in: ``W' = W·γ/√(σ² + ε)``, ``b' = β − μ·γ/√(σ² + ε)`` per output channel (float64),
    the same output as the source's inference mode. An instance normalisation takes a batch
    normalisation's ``γ, β`` (its function in training on a batch of one: how the batch-normalised
    models were trained). Other layers are copied as they are.
    """
    for layer in target.layers:
        if not layer.weights:
            continue
        if isinstance(layer, InstanceNormalization):
            original = _layer(source, layer.name, layer.name.replace("_norm", "_bn"))
            layer.set_weights(original.get_weights()[:2])  # γ, β (a batch norm's first two)
            continue
        original = source.get_layer(layer.name)
        if isinstance(layer, layers.Conv3D) and layer.use_bias and not original.use_bias:
            norm = _layer(source, _norm_name(layer.name, "batch"))
            if not isinstance(norm, layers.BatchNormalization):
                raise ValueError(f"{source.name}: only batch normalisation folds into a "
                                 f"convolution, not {type(norm).__name__}")
            gamma, beta, mean, variance = (np.asarray(w, np.float64) for w in norm.get_weights())
            scale = gamma / np.sqrt(variance + norm.epsilon)
            kernel = np.asarray(original.get_weights()[0], np.float64) * scale
            layer.set_weights([kernel, beta - mean * scale])
        else:
            layer.set_weights(original.get_weights())


def _layer(model: keras.Model, *names: str) -> layers.Layer:
    """The first of ``names`` that ``model`` has."""
    for name in names:
        try:
            return model.get_layer(name)
        except ValueError:
            continue
    raise ValueError(f"{model.name}: no layer {' or '.join(names)}")
