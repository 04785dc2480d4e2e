"""Keras layers over :mod:`tfmlreg.geometry`, one geometric idea per layer.

Every layer here computes in float32 (``dtype="float32"`` unless the caller overrides it), so a
``mixed_float16`` / ``mixed_bfloat16`` policy speeds up the convolutions but never the geometry.
All are registered for ``.keras`` saving under the package name ``tfmlreg``.

On the TensorFlow backend the geometry (:data:`warp`, :data:`compose`,
:data:`resample_displacement`, which the layers and the model use) runs as XLA-compiled functions
inside the Keras graph, while the convolutions around it stay on oneDNN: XLA fuses the index
arithmetic, gathers and blend of a warp (0.49 s as a graph, 0.085 s compiled at 160³), but its
CPU convolutions are several times slower than oneDNN's, so the model as a whole is not compiled.
:func:`plain_geometry` turns it off while a graph is traced (the ONNX export: tf2onnx does not
convert XLA-compiled functions). Other backends run :mod:`tfmlreg.geometry` as it is.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ParamSpec, TypeVar

import keras
from keras import ops

from tfmlreg import geometry
from tfmlreg.ct import HU_WINDOW
from tfmlreg.types import Shape, Spacing, Tensor

P = ParamSpec("P")
R = TypeVar("R")

serializable = keras.saving.register_keras_serializable(package="tfmlreg")

_plain = threading.local()  # per thread: an export in one thread leaves the others compiled


def geometry_compiled() -> bool:
    """Whether the geometry is traced as XLA-compiled functions here and now."""
    return keras.backend.backend() == "tensorflow" and not getattr(_plain, "on", False)


@contextlib.contextmanager
def plain_geometry() -> Iterator[None]:
    """Trace the geometry as plain ops in this block (graphs traced here keep it plain)."""
    previous = getattr(_plain, "on", False)
    _plain.on = True
    try:
        yield
    finally:
        _plain.on = previous


def xla_compiled(function: Callable[P, R]) -> Callable[P, R]:
    """``function`` as an XLA-compiled ``tf.function`` while :func:`geometry_compiled` (the one
    wrapper for every geometry-heavy function: model layers, metrics, synthetic motion)."""
    compiled: dict[Any, Any] = {}  # one tf.function per input signature (below)

    @functools.wraps(function)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        if not geometry_compiled():
            return function(*args, **kwargs)
        # A new shape is compiled anew either way; one function per signature, each traced once,
        # spares the user TensorFlow's "excessive retracing" warnings when many grids pass
        # (an evaluation over cases of different sizes, the levels of a pyramid). TensorFlow
        # counts retracing per code object, so each signature gets its own callable object.
        key = _signature((args, sorted(kwargs.items())))
        if key not in compiled:
            import tensorflow as tf

            compiled[key] = tf.function(_Traced(function), jit_compile=True, autograph=False)
        return compiled[key](*args, **kwargs)

    return call


class _Traced:
    """``function`` as a callable object: a key of its own in TensorFlow's retracing count."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function, self.__name__ = function, function.__name__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)


def _signature(value: Any) -> Any:
    """What a ``tf.function`` traces anew for: the shape and dtype of arrays and tensors, the
    value of anything else."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return tuple(value.shape), str(value.dtype)
    if isinstance(value, (list, tuple)):
        return tuple(_signature(item) for item in value)
    if isinstance(value, dict):
        return tuple((key, _signature(item)) for key, item in sorted(value.items()))
    return type(value).__name__, repr(value)


warp = xla_compiled(geometry.warp)
compose = xla_compiled(geometry.compose)
invert = xla_compiled(geometry.invert)
resample_displacement = xla_compiled(geometry.resample_displacement)
resample = xla_compiled(geometry.resample)
sample = xla_compiled(geometry.sample)


class _Float32Layer(keras.layers.Layer):
    """Base: float32 compute dtype by default, whatever the global policy."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)


@serializable
class SpatialTransformer(_Float32Layer):
    """Pull-back trilinear warp ``M(x + u(x))``; ``call(image, displacement, spacing)``, u in mm."""

    def __init__(self, fill_value: float | None = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fill_value = fill_value

    def call(self, image: Tensor, displacement: Tensor, spacing: Spacing = 1.0) -> Tensor:
        return warp(image, displacement, spacing, self.fill_value)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "fill_value": self.fill_value}


@serializable
class ComposeDisplacement(_Float32Layer):
    """Displacement of ``outer ∘ inner``; ``call(outer, inner, spacing)``, both mm on one grid."""

    def call(self, outer: Tensor, inner: Tensor, spacing: Spacing = 1.0) -> Tensor:
        return compose(outer, inner, spacing)


@serializable
class Resample(_Float32Layer):
    """Carry a field to ``target_shape`` over the same domain (prolongation when finer)."""

    def __init__(self, target_shape: Shape, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.target_shape = tuple(int(n) for n in target_shape)

    def call(self, volume: Tensor, spacing: Spacing = 1.0) -> Tensor:
        return resample(volume, spacing, self.target_shape)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "target_shape": self.target_shape}


@serializable
class ImagePyramid(_Float32Layer):
    """``[level 1, ..., level L]`` by repeated 2×2×2 average pooling; level 1 is the input."""

    def __init__(self, levels: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.levels = int(levels)

    def call(self, volume: Tensor) -> list[Tensor]:
        return geometry.pyramid(volume, self.levels)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "levels": self.levels}


@serializable
class IntensityWindow(_Float32Layer):
    """Clip raw intensities to ``window`` and map it to [0, 1] (CT default: lung window in HU).

    Part of the model so the exported model takes raw intensities. Values below the window map
    to 0, which is also the fill value used for points warped out of the domain.
    """

    def __init__(self, window: Sequence[float] = HU_WINDOW, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        low, high = (float(v) for v in window)
        if not high > low:
            raise ValueError(f"window: expected (low, high) with high > low, got {window}")
        self.window = (low, high)

    def call(self, image: Tensor) -> Tensor:
        low, high = self.window
        return ops.clip((ops.cast(image, "float32") - low) / (high - low), 0.0, 1.0)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "window": self.window}
