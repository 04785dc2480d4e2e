"""The exported ``register_refined`` signature: parity with the Python path, warm-up, C++ loading."""

import os

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from tfmlreg import refinement
from tfmlreg.export import WARMUP_FILE, export_saved_model
from tfmlreg.interface import REFINED_SIGNATURE, SIGNATURE
from conftest import random_inputs, registration_model
from test_export import SHAPE, call, cpp_loader, run_cpp  # noqa: F401 (cpp_loader: a fixture)

REFINE = refinement.RefineConfig(levels=2, iterations=6)


@pytest.fixture(scope="module")
def model():
    return registration_model(SHAPE, levels=2, base_filters=4, depth=2)


@pytest.fixture(scope="module")
def version_dir(model, tmp_path_factory):
    return export_saved_model(model, tmp_path_factory.mktemp("refined") / "m", refine=REFINE)


@pytest.fixture(scope="module")
def loaded(version_dir):
    return tf.saved_model.load(str(version_dir))


@pytest.fixture(scope="module")
def inputs():
    """A well-posed pair: smooth random structure, moved 2 voxels along the third axis. (On pure
    noise the objective is so rough that float32 round-off, grown through Adam's sign-like first
    steps, alone parts the two paths by 0.1 mm: no test of the graph.)"""
    pair = random_inputs(SHAPE, batch=2, seed=3)
    rng = np.random.default_rng(3)
    pad = (SHAPE[0] + 4,) * 3
    for b in range(2):
        structure = ndimage.gaussian_filter(rng.uniform(-1.0, 1.0, pad), 1.0)
        volume = (600.0 * structure / structure.std() - 400.0).astype(np.float32)
        pair["fixed"][b, ..., 0] = volume[2:-2, 2:-2, 2:-2]
        pair["moving"][b, ..., 0] = volume[2:-2, 2:-2, 4:]
    return pair


@pytest.fixture(scope="module")
def python_path(model, inputs):
    """The network, then :func:`tfmlreg.refine` per sample: what the signature must reproduce.
    The network runs in its inference form (batch norm folded), as the Python path
    (``KerasPredictor``) and the export do: Adam's first steps follow the gradient's sign, so
    folding's float32 round-off would otherwise move a few voxels by a step."""
    network = np.asarray(model.for_inference()(inputs, training=False)["displacement"])
    return np.stack([
        refinement.refine(inputs["fixed"][b, ..., 0], inputs["moving"][b, ..., 0],
                          inputs["spacing"][b], initial=network[b], config=REFINE,
                          finest_spacing_mm=None, tolerance=0)["displacement"]
        for b in range(2)
    ]), network


def test_both_signatures_are_exported(loaded):
    assert set(loaded.signatures) >= {SIGNATURE, REFINED_SIGNATURE}
    outputs = loaded.signatures[REFINED_SIGNATURE].structured_outputs
    assert sorted(outputs) == ["displacement", "warped"]


def test_refined_signature_matches_the_python_path(loaded, inputs, python_path):
    refined, network = python_path
    outputs = call(loaded.signatures[REFINED_SIGNATURE], inputs)
    assert np.abs(refined - network).max() > 0.05  # the refinement really changed the field
    # Adam divides by the gradient's running RMS, which turns float32 round-off between the graph
    # and the eager path into differences of a few µm in a handful of voxels
    np.testing.assert_allclose(outputs["displacement"], refined, atol=1e-2)


def test_warmup_records_cover_both_signatures(version_dir):
    from tensorflow_serving.apis import prediction_log_pb2

    names = []
    for record in tf.data.TFRecordDataset(os.path.join(version_dir, WARMUP_FILE)):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        names.append(log.predict_log.request.model_spec.signature_name)
    assert sorted(set(names)) == ["register_refined", "serving_default"]


def test_cpp_loader_runs_the_refined_signature(cpp_loader, version_dir, inputs, python_path,
                                                tmp_path):
    done, outputs = run_cpp(cpp_loader, version_dir, inputs, tmp_path, REFINED_SIGNATURE)
    assert done.returncode == 0, done.stderr[-4000:]
    np.testing.assert_allclose(outputs["displacement"], python_path[0], atol=1e-2)


def test_grpc_client_asks_for_the_refined_signature(version_dir, inputs, python_path):
    from concurrent import futures

    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from test_serving import InProcessServingDouble
    from tfmlreg.serving import RegistrationClient, channel_options

    servicer = InProcessServingDouble("m", version_dir)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=channel_options())
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        address = f"127.0.0.1:{port}"
        with RegistrationClient(address, model_name="m", signature=REFINED_SIGNATURE) as client:
            refined = client.register(inputs["fixed"], inputs["moving"], inputs["spacing"])
        with RegistrationClient(address, model_name="m") as client:
            network = client.register(inputs["fixed"], inputs["moving"], inputs["spacing"])
    finally:
        server.stop(grace=None)
    np.testing.assert_allclose(refined["displacement"], python_path[0], atol=1e-2)
    np.testing.assert_allclose(network["displacement"], python_path[1], atol=1e-2)
