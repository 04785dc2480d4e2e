"""ONNX export (the TensorRT path): tf2onnx converts the whole model, warp gathers included, and
ONNX Runtime (CPU) reproduces the displacement; TF-TRT reports clearly when it is missing."""

import numpy as np
import onnx
import onnxruntime
import pytest
import tensorflow as tf
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from conftest import random_inputs, registration_model
from tfmlreg.export import (
    TF_TRT_MISSING, check_onnx_parity, export_onnx, export_saved_model, export_tf_trt,
)

SHAPE = (16, 16, 16)
TOL_MM = 1e-3


@pytest.fixture(scope="module")
def model():
    return registration_model(SHAPE, levels=2, base_filters=4, depth=2)


@pytest.fixture(scope="module")
def onnx_path(model, tmp_path_factory):
    return export_onnx(model, str(tmp_path_factory.mktemp("onnx") / "model.onnx"), opset=17)


def test_graph_keeps_the_interface_and_converts_every_op(onnx_path):
    graph = onnx.load(onnx_path).graph
    assert [i.name for i in graph.input] == ["fixed", "moving", "spacing"]
    assert [o.name for o in graph.output] == ["displacement", "warped"]
    batch_axis = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_axis.dim_param and not batch_axis.dim_value  # dynamic batch for trtexec --shapes
    ops = {node.op_type for node in graph.node}
    assert {"Gather", "Floor", "Conv", "ConvTranspose", "AveragePool"} <= ops  # the warp is in
    assert all(node.domain in ("", "ai.onnx") for node in graph.node)  # no custom ops


def test_onnx_runtime_reproduces_keras_on_random_batches(model, onnx_path):
    inputs = random_inputs(SHAPE, batch=2, seed=0)
    errors = check_onnx_parity(onnx_path, model, inputs, atol=TOL_MM)
    assert errors["displacement"] <= TOL_MM
    assert np.abs(model(inputs)["displacement"]).max() > 1.0  # the test model really moves voxels


def test_onnx_runtime_reproduces_keras_on_a_ct_like_pair(model, onnx_path):
    errors = check_onnx_parity(onnx_path, model)  # default inputs: the synthetic CT pair
    assert errors["displacement"] <= TOL_MM and errors["warped"] <= 1.0  # HU


def test_export_from_saved_model_directory(model, tmp_path):
    version_dir = export_saved_model(model, tmp_path / "mlvirnet", warmup_requests=0)
    path = export_onnx(version_dir, str(tmp_path / "from_saved_model.onnx"))
    errors = check_onnx_parity(path, version_dir, random_inputs(SHAPE, batch=1, seed=2), atol=TOL_MM)
    assert errors["displacement"] <= TOL_MM


def test_parity_check_fails_loudly(model, onnx_path):
    with pytest.raises(AssertionError, match="displacement differs by"):
        check_onnx_parity(onnx_path, model, random_inputs(SHAPE, batch=1, seed=0), atol=0.0)


def test_the_graph_fixes_the_grid_so_another_size_is_rejected_before_running(onnx_path):
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    # the in-graph checks are not converted: the static grid in the signature is the check
    assert {i.name: i.shape[1:] for i in session.get_inputs()} == {
        "fixed": [*SHAPE, 1], "moving": [*SHAPE, 1], "spacing": [3]}
    inputs = random_inputs(SHAPE, batch=1, seed=0)
    inputs["fixed"] = inputs["fixed"][:, :8]
    with pytest.raises(InvalidArgument,
                       match=r"(?s)invalid dimensions for input: fixed.*index: 1 Got: 8 Expected: 16"):
        session.run(None, inputs)


@pytest.mark.skipif(
    tf.sysconfig.get_build_info().get("is_tensorrt_build", False), reason="this build has TF-TRT"
)
def test_tf_trt_missing_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError) as raised:
        export_tf_trt(tmp_path / "any", tmp_path / "trt")
    assert str(raised.value) == TF_TRT_MISSING
    assert not (tmp_path / "trt").exists()
