"""Registering a pair at full resolution with a trained model, local or behind TF Serving.

The model works on its fixed grid (e.g. 160³) over the fixed image's physical extent; the pair is
resampled onto it, and the displacement it returns (mm, a field on the physical domain) is
evaluated back on the fixed image's original grid, where the moving image is warped and every
metric is computed (as the paper evaluates: at full resolution).

A predictor (:class:`Predictor`) is a callable ``(fixed, moving, spacing) -> {"displacement",
"warped"}`` on batched NumPy arrays at the model grid, with a ``shape`` attribute (the grid).
:func:`load_predictor` is the one way a model is loaded: a SavedModel (the exported, versioned
layout), a ``.keras`` file, or a TF Serving address; :func:`load_model` gives the Keras model
itself (for exporting or fine-tuning), with the same checks and errors.

Precision: local Keras models run in the inference form (a batch normalisation folded) with the
U-Nets in ``precision`` (:func:`resolve_precision`; ``"auto"``: bfloat16 on CPUs with native
bfloat16, float16 on GPUs, else float32); geometry and outputs stay float32. An exported
SavedModel is float32 as written, so a reduced precision runs the ``model.keras`` shipped beside
its versions (``NAME/model.keras``) when there is one.
"""

from __future__ import annotations

import contextlib
import os
import time
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import keras
import numpy as np
import tensorflow as tf
from numpy.typing import ArrayLike

from tfmlreg import geometry, layers, models, refinement
from tfmlreg.ct import AIR_HU
from tfmlreg.data import pipeline
from tfmlreg.data.io import DataError
from tfmlreg.interface import OUTPUTS, SIGNATURE
from tfmlreg.types import Array, PathLike, Shape

NO_MODEL = "none"  # load_predictor("none"): no network, the refinement starts from zero


class Predictor(Protocol):
    """What :func:`register_pair` runs: the model grid ``shape`` ``(D, H, W)``, and a call on
    batched float32 NumPy ``fixed``, ``moving`` ``(B, D, H, W, 1)`` (HU) and ``spacing``
    ``(B, 3)`` (mm) returning NumPy ``{"displacement": (B, D, H, W, 3) mm, "warped": ...}``."""

    shape: tuple[int, ...]

    def __call__(self, fixed: Array, moving: Array, spacing: Array) -> dict[str, Array]:
        ...


PRECISION_CHOICES = ("auto", "float32", "bfloat16", "float16")
CPU_BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")  # native bfloat16 arithmetic
CPUINFO = "/proc/cpuinfo"


def native_precision() -> str:
    """The fastest precision this machine runs natively: float16 with a GPU, bfloat16 on a CPU
    with AVX-512 BF16 or AMX, else float32."""
    if tf.config.list_physical_devices("GPU"):
        return "float16"
    try:
        with open(CPUINFO) as cpuinfo:
            flags = {flag for line in cpuinfo if line.startswith("flags")
                     for flag in line.split(":", 1)[1].split()}
    except OSError:
        return "float32"
    return "bfloat16" if flags.intersection(CPU_BFLOAT16_FLAGS) else "float32"


def resolve_precision(precision: str = "auto") -> str:
    """``precision`` checked, with ``"auto"`` replaced by :func:`native_precision`."""
    if precision not in PRECISION_CHOICES:
        raise DataError(f"precision: expected one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
    if precision == "auto":
        return native_precision()
    if precision == "float16" and not tf.config.list_physical_devices("GPU"):
        raise DataError("precision: float16 needs a GPU (TensorFlow's CPU AvgPool3D has no "
                         "float16 kernel); use bfloat16 or float32")
    return precision


class SavedModelPredictor:
    """A signature of an exported SavedModel (``serving_default``: what TF Serving runs).

    Keeps the loaded object (``loaded``): it owns the variables the signature reads."""

    precision = "float32"  # as exported

    def __init__(self, path: PathLike, signature: str = SIGNATURE) -> None:
        self.path = os.fspath(path)
        with _loading(self.path):
            self.loaded = tf.saved_model.load(self.path)
        if signature not in self.loaded.signatures:
            raise DataError(f"{self.path}: no signature {signature!r} (signatures: "
                            f"{', '.join(sorted(self.loaded.signatures)) or 'none'})")
        self.signature = self.loaded.signatures[signature]
        spec = self.signature.structured_input_signature[1]["fixed"]
        self.shape = tuple(int(n) for n in spec.shape[1:4])

    def __call__(self, fixed: ArrayLike, moving: ArrayLike, spacing: ArrayLike) -> dict[str, Array]:
        outputs = self.signature(fixed=tf.constant(fixed, tf.float32),
                                 moving=tf.constant(moving, tf.float32),
                                 spacing=tf.constant(spacing, tf.float32))
        return {name: value.numpy() for name, value in outputs.items()}


class KerasPredictor:
    """A ``.keras`` :class:`~tfmlreg.model.MultilevelRegistration`, traced once per shape, run
    in its inference form in ``precision`` (see :func:`resolve_precision`).

    Given a model object, the folded copy takes the model's current weights at every call (the
    caller may go on training it)."""

    def __init__(self, path_or_model: PathLike | keras.Model, precision: str = "auto") -> None:
        model: keras.Model = path_or_model
        if isinstance(path_or_model, (str, os.PathLike)):
            self.path = os.fspath(path_or_model)
            model = load_model(self.path)
        self.model, self.shape = model, tuple(model.shape)
        self.precision = resolve_precision(precision)
        self._follow = not isinstance(path_or_model, (str, os.PathLike))
        self.inference = model
        if hasattr(model, "for_inference"):
            self.inference = model.for_inference(self.precision)
        else:
            self._follow = False
        inference = self.inference
        self._predict = tf.function(lambda inputs: inference(inputs, training=False))

    def __call__(self, fixed: ArrayLike, moving: ArrayLike, spacing: ArrayLike) -> dict[str, Array]:
        if self._follow:
            self.inference.load_inference_weights(self.model)
        outputs = self._predict({"fixed": fixed, "moving": moving, "spacing": spacing})
        return {name: outputs[name].numpy() for name in OUTPUTS}


class RemotePredictor:
    """A model behind TF Serving (gRPC); ``shape`` is the model grid the server expects (None:
    read from the served signature, :meth:`tfmlreg.serving.RegistrationClient.grid`)."""

    def __init__(self, address: str, shape: Shape | None = None,
                 model_name: str | None = None) -> None:
        from tfmlreg.serving import DEFAULT_MODEL_NAME, RegistrationClient

        self.client = RegistrationClient(address, model_name=model_name or DEFAULT_MODEL_NAME)
        self.shape = tuple(int(n) for n in (shape if shape is not None else self.client.grid()))

    def __call__(self, fixed: ArrayLike, moving: ArrayLike, spacing: ArrayLike) -> dict[str, Array]:
        return self.client.register(fixed, moving, spacing)


class SymmetricPredictor:
    """``predictor`` run both ways on the model grid and averaged inverse-consistently:
    ``u = (u_fm + inverse(u_mf)) / 2``.

    A learnt network's error has a part that does not depend on which image is fixed (on two
    copies of one scan the chest-CT network returns a field of 2-3 mm); it cancels in the average,
    while the motion found both ways adds up. Twice the network's time; any predictor (local, SavedModel,
    TF Serving) can be wrapped. Measured in ``docs/RESULTS.md`` (``benchmarks/real_ct.py``)."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor, self.shape = predictor, predictor.shape

    def __call__(self, fixed: Array, moving: Array, spacing: Array) -> dict[str, Array]:
        forward = self.predictor(fixed, moving, spacing)["displacement"]
        backward = self.predictor(moving, fixed, spacing)["displacement"]
        spacing = np.asarray(spacing, np.float32)
        displacement = 0.5 * (forward + np.asarray(layers.invert(backward, spacing)))
        warped = layers.warp(np.asarray(moving, np.float32), displacement, spacing, AIR_HU)
        return {"displacement": displacement, "warped": np.asarray(warped)}


def load_predictor(path: PathLike | None = None, precision: str = "auto", *,
                   server: str | None = None, shape: Shape | None = None,
                   model_name: str | None = None, symmetric: bool = False) -> Predictor | None:
    """The predictor of a model: the one way tfmlreg loads one.

    * ``server`` (``HOST:PORT`` of TF Serving): a :class:`RemotePredictor` of the served model
      ``model_name`` (default :data:`tfmlreg.serving.DEFAULT_MODEL_NAME`) on grid ``shape``
      (default: read from the server);
    * else ``path``: a ``.keras`` file, a SavedModel folder, or a versioned model root (``NAME/``
      holding ``1/``, ``2/``...: the highest version is taken, as TF Serving does); None is the
      default model (:func:`tfmlreg.models.default_model`); ``"none"`` gives None (no network:
      :func:`register_pair` refines from zero).

    A SavedModel runs in float32 as exported; with a reduced ``precision`` (``"auto"`` on a
    machine that has one) the root's ``model.keras`` runs instead when it is there. An explicit
    reduced precision without one is an error; ``"auto"`` falls back to the SavedModel. A missing,
    damaged or foreign model file is a one-line :class:`DataError` naming it. ``symmetric`` wraps
    the predictor in :class:`SymmetricPredictor`."""
    predictor = _predictor(path, precision, server, shape, model_name)
    return SymmetricPredictor(predictor) if symmetric and predictor is not None else predictor


def _predictor(path: PathLike | None, precision: str, server: str | None, shape: Shape | None,
               model_name: str | None) -> Predictor | None:
    if server is not None:
        return RemotePredictor(server, shape, model_name=model_name)
    if path is None:
        path = models.default_model()
    if str(path).lower() == NO_MODEL:
        return None
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such model file or folder")
    wanted = resolve_precision(precision)
    if os.path.isfile(path):
        if not path.endswith(".keras"):
            raise DataError(f"{path}: expected a .keras file or a SavedModel folder")
        return KerasPredictor(path, wanted)
    version = _latest_version(path)
    beside = os.path.join(path, "model.keras")
    if wanted != "float32":
        if version != path and os.path.isfile(beside):
            return KerasPredictor(beside, wanted)
        if precision != "auto":
            raise DataError(f"{path}: precision {precision}: a SavedModel runs in float32 as "
                            "exported and there is no model.keras beside its versions")
    return SavedModelPredictor(version)


def load_model(path: PathLike) -> keras.Model:
    """The Keras model of a trained ``.keras`` file, checked: a one-line :class:`DataError`
    naming the file when it is missing, damaged or of another format."""
    path = os.fspath(path)
    if not (os.path.isfile(path) and path.endswith(".keras")):
        raise DataError(f"{path}: expected a trained .keras model file")
    if not zipfile.is_zipfile(path):  # Keras would report it as "File not found"
        raise DataError(f"{path}: not a .keras model (a .keras file is a zip archive; this one is "
                        "damaged or of another format)")
    with _loading(path):
        return keras.saving.load_model(path)


@contextlib.contextmanager
def _loading(path: PathLike) -> Iterator[None]:
    """Errors of loading a damaged or foreign model file as one DataError naming the file."""
    from google.protobuf.message import DecodeError

    try:
        yield
    except DataError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, DecodeError,
            tf.errors.OpError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise DataError(f"{path}: cannot load the model ({type(error).__name__}: {reason})"[:300]) from None


def _latest_version(path: str) -> str:
    if os.path.exists(os.path.join(path, "saved_model.pb")):
        return path
    versions = [int(name) for name in os.listdir(path) if name.isdigit()
                and os.path.exists(os.path.join(path, name, "saved_model.pb"))]
    if not versions:
        raise DataError(f"{path}: no saved_model.pb here nor in a numbered version folder")
    return os.path.join(path, str(max(versions)))


def register_pair(predictor: Predictor | None, pair: Mapping[str, Any],
                  refine: refinement.RefineConfig | None = None,
                  progress: bool = False) -> dict[str, Any]:
    """Register ``moving`` to ``fixed`` of a loaded pair (see :func:`tfmlreg.data.io.load_pair`).

    The network (``predictor``) gives a field in one shot; ``refine`` (a
    :class:`~tfmlreg.refinement.RefineConfig`, or None for the network alone) then optimises it
    for this pair at full resolution. ``predictor=None`` refines from zero (the conventional
    multilevel NGF + curvature registration). Returns ``{"displacement": (D, H, W, 3) mm on the
    fixed grid, "warped": moving on the fixed grid, "seconds": network + refinement time,
    "seconds_network", "seconds_refinement"}``; with the refinement, ``"refinement_start"``
    (``"initial"``: it kept the network's field as its start, or ``"zero"``) and, when both ran,
    ``"network_displacement"``.
    The full-resolution resampling and warping are not in the times.
    """
    if predictor is None and refine is None:
        raise ValueError("model: with no network, refinement must be on")
    result: dict[str, Any] = {"seconds_network": 0.0, "seconds_refinement": 0.0}
    displacement = None
    if predictor is not None:
        displacement, result["seconds_network"] = _network_field(predictor, pair)
    if refine is not None:
        refined = refinement.refine(
            pair["fixed"], pair["moving"], pair["spacing_fixed"], pair["spacing_moving"],
            initial=displacement, config=refine, progress=progress)
        if displacement is not None:
            result["network_displacement"] = displacement
        result["refinement_start"] = refined["start"]
        displacement, result["seconds_refinement"] = refined["displacement"], refined["seconds"]
    result["displacement"] = displacement
    assert displacement is not None  # the network, the refinement or both ran (checked above)
    result["warped"] = warp_moving(pair, displacement)
    result["seconds"] = result["seconds_network"] + result["seconds_refinement"]
    return result


def _network_field(predictor: Predictor, pair: Mapping[str, Any]) -> tuple[Array, float]:
    """The network's displacement on the fixed image's own grid, and the model's time."""
    grid = pipeline.to_network_grid(pair, predictor.shape)
    start = time.perf_counter()
    outputs = predictor(grid["fixed"][None, ..., None], grid["moving"][None, ..., None],
                        np.asarray(grid["spacing"], np.float32)[None])
    seconds = time.perf_counter() - start
    displacement = pipeline.displacement_to_full_resolution(
        outputs["displacement"][0], grid["spacing"], np.shape(pair["fixed"])
    )
    return displacement, seconds


# Voxels per slab of warp_moving: a few MB of temporaries each, which the allocator hands out again
# slab after slab, where one pass over a full-resolution CT allocates GBs of fresh memory (slow
# to fault in: docs/RESULTS.md, register_full_resolution.py).
WARP_SLAB_VOXELS = 1 << 21


def warp_moving(pair: Mapping[str, Any], displacement: ArrayLike) -> Array:
    """The moving image (its own grid and spacing) pulled back onto the fixed grid by ``u`` (mm),
    in slabs along the first axis (``WARP_SLAB_VOXELS``)."""
    shape = np.shape(pair["fixed"])
    spacing = np.asarray(pair["spacing_fixed"], np.float32)
    moving = tf.constant(np.asarray(pair["moving"], np.float32)[None, ..., None])
    displacement = np.asarray(displacement, np.float32)
    rows = max(1, WARP_SLAB_VOXELS // (shape[1] * shape[2]))
    warped = np.empty(shape, np.float32)
    for start in range(0, shape[0], rows):
        stop = min(start + rows, shape[0])
        points = geometry.grid_points_numpy((stop - start, *shape[1:]), spacing, np.float32,
                                            (start, 0, 0)) + displacement[start:stop]
        warped[start:stop] = np.asarray(geometry.sample(
            moving, points[None], np.asarray(pair["spacing_moving"], np.float32),
            fill_value=AIR_HU))[0, ..., 0]
    return warped


def moving_on_fixed_grid(pair: Mapping[str, Any]) -> Array:
    """The moving image on the fixed grid with no motion: :func:`warp_moving` of a zero field
    (air outside the moving scan), computed as an axis-aligned resampling (both grids start at the
    frame's origin), or the moving image itself on the same grid."""
    moving = np.asarray(pair["moving"], np.float32)
    shape, spacing = np.shape(pair["fixed"]), np.asarray(pair["spacing_fixed"], np.float32)
    if moving.shape == shape and np.array_equal(spacing, np.asarray(pair["spacing_moving"],
                                                                    np.float32)):
        return moving
    return pipeline.sample_on_grid(moving, pair["spacing_moving"], shape, spacing, AIR_HU)
