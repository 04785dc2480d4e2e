"""The type aliases of tfmlreg's annotations, defined once (docs/DESIGN.md section 4).

Importing this module imports neither TensorFlow nor Keras. The aliases are for reading and for
type checkers (``mypy tfmlreg`` runs in CI); nothing checks them at run time.

- :data:`Tensor`: a backend tensor (``tf.Tensor``, a JAX array, a ``KerasTensor`` while a
  functional model is built) or anything ``keras.ops`` converts to one (a NumPy array, a
  scalar). Keras and TensorFlow ship no type information, so this is ``Any``: it documents
  what a function takes, a checker accepts anything there.
- :data:`Array`: a NumPy array a function returns (``NDArray[Any]``); arguments that take
  anything array-like are annotated with :data:`numpy.typing.ArrayLike`.
- :data:`PathLike`: a file or folder, ``str`` or :class:`os.PathLike`.
- :data:`Spacing`: a voxel size in mm per array axis: a scalar, ``(3,)`` or per sample
  ``(B, 3)``, as NumPy or a tensor.
- :data:`Shape`: a spatial shape ``(D, H, W)`` (or a voxel index): a sequence of ints or an
  integer array.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeAlias, Union

from numpy.typing import ArrayLike, NDArray

__all__ = ["Array", "ArrayLike", "PathLike", "Shape", "Spacing", "Tensor"]

Tensor: TypeAlias = Any
Array: TypeAlias = NDArray[Any]
PathLike: TypeAlias = Union[str, os.PathLike[str]]
Spacing: TypeAlias = Union[float, ArrayLike, Tensor]
Shape: TypeAlias = Union[Sequence[int], NDArray[Any]]
