"""Deployment: a SavedModel for TensorFlow Serving, ONNX for TensorRT / ONNX Runtime, and TF-TRT.

Whatever the model computes inside, the exported interface is fixed (signature ``serving_default``):

* inputs ``fixed`` and ``moving``: ``(B, D, H, W, 1)`` float32 raw intensities on the model grid,
  ``spacing``: ``(B, 3)`` float32 voxel size in mm;
* outputs ``displacement``: ``(B, D, H, W, 3)`` in mm, ``warped``: ``(B, D, H, W, 1)``.

The model's other outputs (per-level displacements) are training aids and are not exported.
Any Keras model with that dict interface can be exported; its grid comes from ``model.shape``
(as on :class:`~tfmlreg.model.MultilevelRegistration`) or the ``shape`` argument.

What is exported is the inference form (:func:`inference_form`): batch normalisation folded into
the convolutions, float32 (portable to any CPU and to ONNX runtimes). The SavedModel keeps the
geometry XLA-compiled inside the graph (TensorFlow Serving on CPU runs it only with
``--xla_cpu_compilation_enabled=true``; :func:`export_saved_model` with ``compiled_geometry=False``
writes plain ops instead); the ONNX export inlines it as plain ops, because tf2onnx does not
convert XLA-compiled functions.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import tensorflow as tf
from numpy.typing import ArrayLike

from tfmlreg import geometry
from tfmlreg.ct import AIR_HU, PARENCHYMA_HU, SOFT_TISSUE_HU
from tfmlreg.interface import INPUTS, OUTPUTS, REFINED_SIGNATURE, SIGNATURE, SIGNATURES
from tfmlreg.layers import plain_geometry
from tfmlreg.types import Array, PathLike, Shape, Spacing, Tensor

if TYPE_CHECKING:  # annotations only: importing keras or the refinement here is not needed
    import keras

    from tfmlreg.refinement import RefineConfig

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
SAMPLE_SPACING_MM = (1.5, 1.5, 1.5)  # a CT-like voxel size for the synthetic sample pair

TF_TRT_MISSING = (
    "TF-TRT is not in this TensorFlow build (official pip wheels dropped it in 2.18); use "
    "format='onnx' (export_onnx) with TensorRT or onnxruntime's TensorRT provider, or NVIDIA's "
    "TF container"
)


# --- the serving interface --------------------------------------------------------------------


def inference_form(model: keras.Model) -> keras.Model:
    """``model``'s inference copy in float32 (a batch normalisation folded), when it can make one
    (:meth:`~tfmlreg.model.MultilevelRegistration.for_inference`); otherwise ``model`` itself."""
    if hasattr(model, "for_inference"):
        return model.for_inference("float32")
    return model


def model_grid(model: keras.Model, shape: Shape | None = None) -> tuple[int, ...]:
    """The model's input grid ``(D, H, W)``: ``shape`` if given, else ``model.shape``."""
    given: Any = shape if shape is not None else getattr(model, "shape", None)
    try:
        grid = tuple(int(n) for n in given)
    except TypeError:
        grid = ()
    if len(grid) != 3 or min(grid) <= 0:
        raise ValueError(f"shape: expected the model grid (D, H, W), got {given!r}")
    return grid


def input_signature(shape: Shape) -> dict[str, tf.TensorSpec]:
    """Named ``tf.TensorSpec`` per input: what the exported signature accepts."""
    image = (None, *shape, 1)
    return {
        "fixed": tf.TensorSpec(image, tf.float32, name="fixed"),
        "moving": tf.TensorSpec(image, tf.float32, name="moving"),
        "spacing": tf.TensorSpec((None, 3), tf.float32, name="spacing"),
    }


def serving_fn(model: keras.Model, shape: Shape, check_inputs: bool = True,
               refine: RefineConfig | None = None,
               ) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
    """``inputs dict -> {"displacement", "warped"}`` around ``model``, in inference mode.

    With ``check_inputs``, bad inputs fail up front with INVALID_ARGUMENT and a message naming
    the input: a wrong size or rank (a SavedModel signature does not enforce its TensorSpec
    shapes at run time: C++ sessions and TF Serving feed any shape, and the model would crash
    deep inside), an empty batch, NaN or infinite values, a spacing <= 0; and a non-finite
    displacement is an error, never a result.
    """

    def serve(inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        if check_inputs:
            inputs = _checked_inputs(inputs, shape)
        outputs = model(inputs, training=False)
        if refine is not None:
            outputs = _refined(inputs, outputs, refine)
        if check_inputs:
            outputs = _checked_outputs(outputs)
        return {name: tf.identity(outputs[name], name=name) for name in OUTPUTS}

    return serve


def _checked_inputs(inputs: Mapping[str, Tensor], shape: Shape) -> dict[str, Tensor]:
    specs = input_signature(shape)
    with tf.control_dependencies([_shape_check(inputs[name], specs[name]) for name in INPUTS]):
        inputs = {name: tf.identity(inputs[name]) for name in INPUTS}
    batch = tf.shape(inputs["fixed"])[0]
    consistent = [
        tf.debugging.assert_equal(
            tf.shape(inputs["moving"])[0], batch, message="moving: batch size differs from fixed"
        ),
        tf.debugging.assert_equal(
            tf.shape(inputs["spacing"])[0], batch,
            message="spacing: expected one (3,) row of mm per fixed image",
        ),
        tf.debugging.assert_positive(inputs["spacing"], message="spacing: must be > 0 mm"),
        tf.debugging.Assert(batch > 0, ["fixed: empty batch (B = 0); send at least one pair"],
                            name="check_batch"),
    ] + [_finite_check(inputs[name], name) for name in INPUTS]
    with tf.control_dependencies(consistent):
        return {name: tf.identity(tensor) for name, tensor in inputs.items()}


def _refined(inputs: Mapping[str, Tensor], outputs: Mapping[str, Tensor],
             config: RefineConfig) -> dict[str, Tensor]:
    """The network's field refined by ``config.iterations`` steps per level (in-graph), and the
    moving image warped by it (outside the domain: the window's low end, i.e. air)."""
    from tfmlreg import geometry, refinement

    displacement = refinement.refine_graph(inputs["fixed"], inputs["moving"], inputs["spacing"],
                                           outputs["displacement"], config)
    warped = geometry.warp(inputs["moving"], displacement, inputs["spacing"],
                           config.intensity_window[0])
    return {"displacement": displacement, "warped": warped}


def _finite_check(tensor: Tensor, name: str,
                  what: str = "contains NaN or infinite values") -> Tensor:
    return tf.debugging.Assert(tf.reduce_all(tf.math.is_finite(tensor)), [f"{name}: {what}"],
                               name=f"check_{name}_finite")


def _checked_outputs(outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    check = _finite_check(outputs["displacement"], "displacement",
                          "the model produced NaN or infinite values")
    with tf.control_dependencies([check]):
        return {name: tf.identity(outputs[name]) for name in OUTPUTS}


def _shape_check(tensor: Tensor, spec: tf.TensorSpec) -> Tensor:
    """Assert ``tensor`` has ``spec``'s shape (any batch); the message names input and shapes.

    (``tf.ensure_shape`` would also check, but its message names the graph's internal tensor,
    e.g. ``_arg_serving_default_fixed_0_1``, rather than the input.)
    """
    rank = len(spec.shape)
    actual = tf.shape(tensor)
    # Pad so the comparison is well defined whatever rank arrives.
    sizes = tf.concat([actual, tf.zeros([rank], tf.int32)], axis=0)[1:rank]
    matches = tf.logical_and(
        tf.equal(tf.size(actual), rank), tf.reduce_all(tf.equal(sizes, spec.shape[1:]))
    )
    expected = "(B, " + ", ".join(str(n) for n in spec.shape[1:]) + ")"
    return tf.debugging.Assert(
        matches, [f"{spec.name}: expected shape {expected}, got", actual], summarize=8,
        name=f"check_{spec.name}_shape",
    )


# --- SavedModel for TF Serving ----------------------------------------------------------------


def export_saved_model(model: keras.Model, out_dir: PathLike, version: int = 1,
                       warmup_requests: int | Sequence[Mapping[str, ArrayLike]] | None = 1,
                       shape: Shape | None = None,
                       refine: RefineConfig | Literal["default"] | None = "default",
                       compiled_geometry: bool = True) -> str:
    """Write ``out_dir/<version>/`` (``saved_model.pb``, ``variables/``, ``assets.extra/``).

    Signatures: ``serving_default`` (the network alone) and, unless ``refine`` is None,
    ``register_refined`` (the network, then ``refine.iterations`` refinement steps per level on
    the model grid, in-graph; a :class:`~tfmlreg.refinement.RefineConfig`, "default" for the
    defaults), with the same inputs and outputs. Each gets its warm-up records.

    ``out_dir`` is the model's base path for TF Serving (``NAME/``). ``warmup_requests`` is the
    number of synthetic warm-up requests (batch 1, see :func:`synthetic_pair`), or a sequence of
    input dicts to use instead, or 0 / None for none. An existing version is never overwritten;
    the version appears complete or not at all (written to a temporary sibling, then renamed,
    which TF Serving ignores because its name is not a number). ``compiled_geometry=False``
    traces the geometry as plain ops (for servers without XLA). Returns the version directory.
    """
    grid = model_grid(model, shape)
    model = inference_form(model)
    refine = _refine_config(refine)
    target = _version_dir(out_dir, version)
    os.makedirs(out_dir, exist_ok=True)
    requests = _warmup_inputs(warmup_requests, grid)
    staging = tempfile.mkdtemp(prefix=f".{version}.partial-", dir=out_dir)
    os.chmod(staging, 0o755)  # mkdtemp makes it private; a server running as another user reads it
    try:
        with contextlib.nullcontext() if compiled_geometry else plain_geometry():
            _write_archive(model, grid, staging, refine)
        if requests:
            signatures = SIGNATURES if refine is not None else (SIGNATURE,)
            write_warmup_requests(os.path.join(staging, WARMUP_FILE), requests,
                                  signatures=signatures)
        os.rename(staging, target)  # atomic; fails if the version appeared meanwhile
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) and os.path.exists(target):
            raise _version_exists(target) from None
        raise
    return target


def _version_dir(out_dir: PathLike, version: int) -> str:
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise ValueError(f"version: expected a positive integer, got {version!r}")
    target = os.path.join(os.fspath(out_dir), str(int(version)))
    if os.path.exists(target):
        raise _version_exists(target)
    return target


def _version_exists(target: str) -> FileExistsError:
    return FileExistsError(f"{target}: version already exists; export another version")


def _refine_config(refine: RefineConfig | Literal["default"] | None) -> RefineConfig | None:
    if isinstance(refine, str) and refine == "default":
        from tfmlreg.refinement import RefineConfig

        return RefineConfig()
    return refine


def _write_archive(model: keras.Model, grid: Shape, path: str,
                   refine: RefineConfig | None = None) -> None:
    import keras

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        SIGNATURE, serving_fn(model, grid), input_signature=[input_signature(grid)]
    )
    if refine is not None:
        archive.add_endpoint(REFINED_SIGNATURE, serving_fn(model, grid, refine=refine),
                             input_signature=[input_signature(grid)])
    archive.write_out(path, verbose=False)


def _warmup_inputs(warmup_requests: int | Sequence[Mapping[str, ArrayLike]] | None,
                   grid: Shape) -> list[dict[str, Array]]:
    """Warm-up input dicts, checked before anything is written."""
    if not warmup_requests:
        return []
    if isinstance(warmup_requests, (int, np.integer)):
        return [synthetic_pair(grid, seed=seed) for seed in range(int(warmup_requests))]
    requests = []
    for index, request in enumerate(warmup_requests):
        if set(request) != set(INPUTS):
            raise ValueError(
                f"warmup_requests[{index}]: expected keys {list(INPUTS)}, got {sorted(request)}"
            )
        checked = {name: np.asarray(request[name], np.float32) for name in INPUTS}
        if checked["fixed"].shape[1:] != (*grid, 1):
            raise ValueError(
                f"warmup_requests[{index}]: expected fixed of shape (B, {grid[0]}, {grid[1]}, "
                f"{grid[2]}, 1), got {checked['fixed'].shape}"
            )
        requests.append(checked)
    return requests


def synthetic_pair(shape: Shape, spacing: Spacing = SAMPLE_SPACING_MM,
                   seed: int = 0) -> dict[str, Array]:
    """A CT-like pair in HU, batch 1: ``{"fixed", "moving": (1, D, H, W, 1), "spacing": (1, 3)}``.

    A soft-tissue body (40 HU) in air (-1000 HU) with two lungs (-850 HU) that sit 3 voxels lower
    along axis 0 in the moving image (a breathing-like motion), plus 10 HU of noise. Used for
    warm-up requests and as default parity inputs: realistic values exercise the same code paths
    (clipping, out-of-domain fill) as real scans.
    """
    shape = tuple(int(n) for n in shape)
    spacing = np.broadcast_to(np.asarray(spacing, np.float32), (3,))
    extent = np.asarray(shape) * spacing
    points = geometry.grid_points_numpy(shape, spacing)
    rng = np.random.default_rng(seed)

    def ellipsoid(centre: Array, radii: Array) -> Array:
        return np.sum(((points - centre) / radii) ** 2, axis=-1) <= 1.0

    def scan(lung_shift_mm: float) -> Array:
        body = ellipsoid(extent * 0.5, extent * [0.45, 0.4, 0.45])
        image = np.where(body, SOFT_TISSUE_HU, AIR_HU)
        for side in (0.3, 0.7):
            centre = extent * [0.5, 0.5, side] + [lung_shift_mm, 0.0, 0.0]
            image[body & ellipsoid(centre, extent * [0.3, 0.25, 0.15])] = PARENCHYMA_HU
        noisy = image + rng.normal(0.0, 10.0, shape)
        return noisy.astype(np.float32)[None, ..., None]

    return {"fixed": scan(0.0), "moving": scan(3 * spacing[0]), "spacing": spacing[None].copy()}


def write_warmup_requests(path: str, requests: Sequence[Mapping[str, ArrayLike]],
                          model_name: str = "",
                          signatures: Sequence[str] = (SIGNATURE,)) -> str:
    """Write TF Serving warm-up records: a TFRecord of ``PredictionLog`` s, one per input dict
    and signature.

    TF Serving replays them (``--enable_model_warmup``) before marking a version ready, so the
    first real request does not pay for graph optimisation and GPU autotuning.
    """
    try:
        from tensorflow_serving.apis import prediction_log_pb2
    except ImportError as error:
        raise ImportError(
            "warm-up records need tensorflow-serving-api: "
            "pip install --no-deps tensorflow-serving-api==2.21.0"
        ) from error
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for inputs, signature in ((i, s) for s in signatures for i in requests):
            log = prediction_log_pb2.PredictionLog()
            request = log.predict_log.request
            request.model_spec.name = model_name
            request.model_spec.signature_name = signature
            for name in INPUTS:
                request.inputs[name].CopyFrom(
                    tf.make_tensor_proto(np.asarray(inputs[name], np.float32))
                )
            writer.write(log.SerializeToString())
    return path


# --- ONNX / TensorRT --------------------------------------------------------------------------


def export_onnx(model: keras.Model | PathLike, out_path: PathLike, opset: int = 17,
                shape: Shape | None = None) -> str:
    """Convert to ONNX with tf2onnx: ``model`` is a Keras model or a SavedModel directory.

    Inputs and outputs keep their names (``fixed``, ``moving``, ``spacing`` -> ``displacement``,
    ``warped``) and a dynamic batch axis, ready for ``trtexec --onnx`` or ONNX Runtime. The
    in-graph input checks are not converted (tf2onnx drops ``Assert``); ONNX runtimes check
    shapes against the declared inputs themselves. tf2onnx does not convert XLA-compiled
    functions (the geometry, see :mod:`tfmlreg.layers`): they are inlined as plain ops in the
    frozen graph first (:func:`_frozen_without_xla`). Returns ``out_path``, written whole or not
    at all.
    """
    import tf2onnx

    if not isinstance(model, (str, os.PathLike)):
        model = inference_form(model)
    function, grid = _inference_function(model, shape)
    specs = input_signature(grid)

    def serve(fixed: Tensor, moving: Tensor, spacing: Tensor) -> dict[str, Tensor]:
        return function({"fixed": fixed, "moving": moving, "spacing": spacing})

    traced = tf.function(serve, input_signature=[specs[name] for name in INPUTS], autograph=False)
    concrete = traced.get_concrete_function()
    inputs = [t.name for t in concrete.inputs if t.dtype != tf.resource]
    outputs = [t.name for t in concrete.outputs if t.dtype != tf.resource]
    names = tf2onnx.convert.tensor_names_from_structed(concrete, inputs, outputs)
    out_path = os.fspath(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    partial = out_path + ".partial"
    try:
        tf2onnx.convert.from_graph_def(
            _frozen_without_xla(concrete, inputs, outputs), input_names=inputs,
            output_names=outputs, opset=opset, tensors_to_rename=names, output_path=partial,
        )
        os.replace(partial, out_path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return out_path


def _frozen_without_xla(concrete: Any, inputs: list[str], outputs: list[str]) -> Any:
    """The frozen GraphDef of ``concrete`` (tf2onnx's freezing) with the XLA marks removed from
    its functions and calls, so that tf2onnx's graph optimisation inlines them as plain ops."""
    from tf2onnx import tf_loader

    frozen = tf_loader.from_function(concrete, inputs, outputs)
    for attrs in [f.attr for f in frozen.library.function] + [n.attr for n in frozen.node]:
        for key in ("_XlaMustCompile", "_noinline"):
            if key in attrs:
                del attrs[key]
    return frozen


def _inference_function(model: keras.Model | PathLike, shape: Shape | None = None,
                        ) -> tuple[Callable[[dict[str, Any]], dict[str, Any]], tuple[int, ...]]:
    """``(inputs dict -> outputs dict, grid)`` for a Keras model or a SavedModel directory."""
    if isinstance(model, (str, os.PathLike)):
        from tfmlreg.inference import SavedModelPredictor

        # the predictor keeps the loaded SavedModel alive: it owns the variables
        predictor = SavedModelPredictor(model)
        return (lambda inputs: predictor.signature(**inputs)), predictor.shape
    grid = model_grid(model, shape)
    return serving_fn(model, grid, check_inputs=False), grid


def check_onnx_parity(onnx_path: PathLike, reference: keras.Model | PathLike,
                      inputs: Mapping[str, ArrayLike] | None = None, atol: float = 1e-3,
                      checked: Sequence[str] = ("displacement",),
                      shape: Shape | None = None) -> dict[str, float]:
    """Run ``onnx_path`` in ONNX Runtime (CPU) against ``reference`` (Keras model or SavedModel).

    ``inputs`` defaults to :func:`synthetic_pair` on the model grid. Returns the largest absolute
    difference per output; raises ``AssertionError`` if an output in ``checked`` differs by more
    than ``atol`` (mm for the displacement).
    """
    import onnxruntime

    function, grid = _inference_function(reference, shape)
    inputs = inputs if inputs is not None else synthetic_pair(grid)
    inputs = {name: np.asarray(inputs[name], np.float32) for name in INPUTS}
    expected = {name: np.asarray(value) for name, value in function(inputs).items()}
    session = onnxruntime.InferenceSession(
        os.fspath(onnx_path), providers=["CPUExecutionProvider"]
    )
    names = [output.name for output in session.get_outputs()]
    actual = dict(zip(names, session.run(names, inputs)))
    errors = {name: float(np.max(np.abs(actual[name] - expected[name]))) for name in OUTPUTS}
    for name in checked:
        if not errors[name] <= atol:
            raise AssertionError(f"{onnx_path}: {name} differs by {errors[name]:.3g} > {atol:g}")
    return errors


def require_tf_trt() -> None:
    """Raise ``RuntimeError`` naming the alternatives unless this TensorFlow carries TF-TRT."""
    if not tf.sysconfig.get_build_info().get("is_tensorrt_build", False):
        raise RuntimeError(TF_TRT_MISSING)


def export_tf_trt(saved_model_dir: PathLike, out_dir: PathLike,
                  precision: str = "FP16") -> PathLike:
    """Convert a SavedModel with TF-TRT (TensorRT inside TensorFlow); needs a TensorRT TF build.

    Raises ``RuntimeError`` with the alternatives on builds without TF-TRT (all official pip
    wheels since 2.18). Returns ``out_dir``.
    """
    require_tf_trt()
    from tensorflow.python.compiler.tensorrt import trt_convert

    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir}: already exists")
    converter = trt_convert.TrtGraphConverterV2(
        input_saved_model_dir=os.fspath(saved_model_dir), precision_mode=precision
    )
    converter.convert()
    converter.save(os.fspath(out_dir))
    return out_dir
