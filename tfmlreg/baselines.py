"""A conventional baseline for the comparison tables: elastix (``pip install itk-elastix``).

The set-up is elastix's standard multi-resolution B-spline registration, as most users would run
it: a 4-level pyramid, advanced Mattes mutual information, a B-spline grid of 16 mm at the finest
level, adaptive stochastic gradient descent, elastix's defaults otherwise (preceded by no affine
stage: inhale and exhale of one scan share the patient position).

Grid conventions are matched exactly: ITK reads a NumPy array with its axes reversed, so the
spacing and origin are given reversed, the origin is the first cell centre ``0.5·h``, and the
displacement's components come back reversed.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from tfmlreg.types import Array, Spacing

BSPLINE_GRID_MM = 16.0
RESOLUTIONS = 4
ITERATIONS = 500


def _itk() -> Any:
    try:
        import itk
    except ImportError:
        raise RuntimeError("elastix baseline: install the optional extra `pip install itk-elastix`") from None
    return itk


def _image(itk: Any, array: ArrayLike, spacing: Spacing) -> Any:
    image = itk.GetImageFromArray(np.ascontiguousarray(array, np.float32))
    spacing = [float(h) for h in np.asarray(spacing)[::-1]]
    image.SetSpacing(spacing)
    image.SetOrigin([0.5 * h for h in spacing])
    return image


def _parameters(itk: Any, iterations: int) -> Any:
    parameters = itk.ParameterObject.New()
    bspline = parameters.GetDefaultParameterMap("bspline", RESOLUTIONS, BSPLINE_GRID_MM)
    bspline["MaximumNumberOfIterations"] = [str(iterations)]
    bspline["WriteResultImage"] = ["false"]
    parameters.AddParameterMap(bspline)
    return parameters


def _deformation_field(itk: Any, moving_image: Any, transform: Any) -> Array:
    """The displacement of ``transform`` on the fixed grid (transformix writes a file as it goes:
    it goes to a temporary folder, not the caller's working directory)."""
    transformix = itk.TransformixFilter.New(moving_image)
    transformix.SetComputeDeformationField(True)
    transformix.SetTransformParameterObject(transform)
    with tempfile.TemporaryDirectory() as scratch:
        transformix.SetOutputDirectory(scratch)
        transformix.UpdateLargestPossibleRegion()
        return np.array(itk.GetArrayFromImage(transformix.GetOutputDeformationField()))


def elastix_register(fixed: ArrayLike, moving: ArrayLike, spacing: Spacing,
                     iterations: int = ITERATIONS, threads: int | None = None) -> dict[str, Any]:
    """Register ``moving`` to ``fixed`` (same grid, ``(D, H, W)``, spacing mm); returns
    ``{"displacement": (D, H, W, 3) mm on the fixed grid, "seconds": wall time}``."""
    itk = _itk()
    if threads:
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(threads))
    fixed_image, moving_image = _image(itk, fixed, spacing), _image(itk, moving, spacing)
    start = time.perf_counter()
    _, transform = itk.elastix_registration_method(
        fixed_image, moving_image, parameter_object=_parameters(itk, iterations), log_to_console=False
    )
    field = _deformation_field(itk, moving_image, transform)
    seconds = time.perf_counter() - start
    # ITK's vector components are (x, y, z) = our array axes (2, 1, 0)
    displacement = np.asarray(field, np.float32)[..., ::-1]
    return {"displacement": np.ascontiguousarray(displacement), "seconds": seconds}
