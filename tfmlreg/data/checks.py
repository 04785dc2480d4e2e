"""Checks of a loaded pair that no single file can make, run before any model work.

Each file was already checked on reading (:mod:`tfmlreg.data.io`: readable, 3-D, finite,
plausible voxel size, landmark columns). Here the parts are checked against each other:
landmark files pair up row by row, and every landmark lies inside its image, where a wrong file
(another case, 0-based indices, another image's index order) would otherwise give a confident
but meaningless error in mm after the whole registration.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from tfmlreg.data.io import DataError
from tfmlreg.types import PathLike, Shape, Spacing

TOLERANCE_MM = 1e-3  # landmarks on the domain's boundary (phantoms write exact positions) are in


def check_pair(pair: Mapping[str, Any],
               sources: Mapping[str, PathLike | None] | None = None) -> None:
    """Raise a one-line :class:`DataError` naming the file if the pair's parts disagree.

    ``pair`` is a pair dict (:func:`tfmlreg.data.io.load_pair`); ``sources`` maps its keys
    (``"fixed_landmarks"``, ...) to the files they came from, for the messages (the key itself
    is named when a file is not known).
    """
    sources = sources or {}

    def source(key: str) -> str:
        return str(sources.get(key) or f"{pair.get('name', 'pair')}: {key}")

    fixed, moving = pair.get("fixed_landmarks"), pair.get("moving_landmarks")
    if fixed is not None and moving is not None and len(fixed) != len(moving):
        raise DataError(f"{source('moving_landmarks')}: {len(moving)} landmarks, but "
                        f"{source('fixed_landmarks')} has {len(fixed)} (they pair up row by row)")
    for side in ("fixed", "moving"):
        points = pair.get(f"{side}_landmarks")
        if points is not None:
            check_inside(points, np.shape(pair[side]), pair[f"spacing_{side}"],
                         source(f"{side}_landmarks"))


def check_inside(points_mm: ArrayLike, shape: Shape, spacing: Spacing, name: str) -> None:
    """Every point ``(N, 3)`` (mm) lies in the domain ``[0, n·h]`` of the grid ``shape``."""
    points = np.asarray(points_mm, np.float64).reshape(-1, 3)
    extent = np.asarray(shape[:3], np.float64) * np.broadcast_to(np.asarray(spacing, np.float64), (3,))
    outside = np.flatnonzero(np.any((points < -TOLERANCE_MM) | (points > extent + TOLERANCE_MM), axis=1))
    if outside.size == 0:
        return
    row = int(outside[0])
    more = f" (and {outside.size - 1} more)" if outside.size > 1 else ""
    position = ", ".join(f"{value:.1f}" for value in points[row])
    size = " x ".join(f"{value:.1f}" for value in extent)
    raise DataError(f"{name}: landmark in row {row + 1} lies outside the image{more}: at "
                    f"({position}) mm, the image spans {size} mm (1-based voxel indices x y z of "
                    "this image expected)")
