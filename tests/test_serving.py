"""The gRPC client against an in-process stand-in for TF Serving, and the warm-up records.

The real ``tensorflow_model_server`` (and Docker) is not available here, so
:class:`InProcessServingDouble` plays its part: a test double implementing TF Serving's
``PredictionService.Predict`` over the exported SavedModel, on the same protobuf API.
"""

import pathlib
import socket
import threading
from concurrent import futures

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (get_model_metadata_pb2, predict_pb2, prediction_log_pb2,
                                     prediction_service_pb2_grpc)
from tensorflow_serving.config import model_server_config_pb2

from tfmlreg import models
from tfmlreg.export import WARMUP_FILE, export_saved_model
from tfmlreg.interface import REFINED_SIGNATURE, SIGNATURE, SIGNATURES
from tfmlreg.ct import HU_WINDOW
from tfmlreg.serving import DEFAULT_MODEL_NAME, RegistrationClient, ServingError, channel_options
from conftest import registration_model

SHAPE = (96, 96, 96)
SERVING_DIR = pathlib.Path(__file__).resolve().parents[1] / "serving"
MODEL_NAME = DEFAULT_MODEL_NAME
WINDOW_HU = HU_WINDOW[1] - HU_WINDOW[0]  # the model's intensity window width: the scale of "warped"
STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}  # TF and gRPC share the numbers


class InProcessServingDouble(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Test double of TF Serving's PredictionService: runs one SavedModel's signatures in-process.

    Mirrors what the client relies on: model name lookup (NOT_FOUND), signature lookup, tensors as
    ``TensorProto`` and TensorFlow errors returned with their status code and bare message. It has
    none of TF Serving's versioning, batching or warm-up.
    """

    def __init__(self, model_name, saved_model_dir):
        self.model_name = model_name
        self.loaded = tf.saved_model.load(str(saved_model_dir))
        saved_model = saved_model_pb2.SavedModel()
        saved_model.ParseFromString((pathlib.Path(saved_model_dir) / "saved_model.pb").read_bytes())
        self.signature_defs = saved_model.meta_graphs[0].signature_def

    def _check_name(self, spec, context):
        if spec.name != self.model_name:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"Servable not found for request: Latest({spec.name})")

    def GetModelMetadata(self, request, context):
        """As TF Serving: the SavedModel's SignatureDefs packed in ``metadata["signature_def"]``."""
        self._check_name(request.model_spec, context)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        for name, signature_def in self.signature_defs.items():
            if not name.startswith("__"):  # TF Serving leaves out __saved_model_init_op
                signatures.signature_def[name].CopyFrom(signature_def)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.CopyFrom(request.model_spec)
        response.metadata["signature_def"].Pack(signatures)
        return response

    def Predict(self, request, context):
        spec = request.model_spec
        self._check_name(spec, context)
        signature = self.loaded.signatures.get(spec.signature_name or SIGNATURE)
        if signature is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"Serving signature key \"{spec.signature_name}\" not found.")
        inputs = {name: tf.constant(tf.make_ndarray(tensor))
                  for name, tensor in request.inputs.items()}
        try:
            outputs = signature(**inputs)
        except tf.errors.OpError as error:
            context.abort(STATUS_CODES[error.error_code], status_message(error))
        response = predict_pb2.PredictResponse()
        response.model_spec.CopyFrom(spec)
        for name, value in outputs.items():
            response.outputs[name].CopyFrom(tf.make_tensor_proto(value.numpy()))
        return response


def status_message(error):
    """The bare status message TF Serving would send: without the "Graph execution error:"
    header, "Detected at node" lines and stack frames that Python adds."""
    decoration = ("Graph execution error:", "Detected at node", "<stack traces unavailable>", " ")
    lines = error.message.splitlines()
    first = next(i for i, line in enumerate(lines) if line and not line.startswith(decoration))
    return "\n".join(lines[first:])


@pytest.fixture(scope="module")
def model():
    return registration_model(SHAPE, levels=2, base_filters=4, depth=3)


@pytest.fixture(scope="module")
def version_dir(model, tmp_path_factory):
    base_dir = tmp_path_factory.mktemp("models") / MODEL_NAME
    return pathlib.Path(export_saved_model(model, base_dir, version=1))


@pytest.fixture(scope="module")
def server(version_dir):
    """``host:port`` of a gRPC server on 127.0.0.1 and a free port, serving the export."""
    servicer = InProcessServingDouble(MODEL_NAME, version_dir)
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=channel_options())
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield f"127.0.0.1:{port}"
    grpc_server.stop(grace=None)


@pytest.fixture(scope="module")
def client(server):
    with RegistrationClient(server, model_name=MODEL_NAME, timeout=60) as registration_client:
        yield registration_client


def blocky_pair(batch, seed=0):
    """Random piecewise-constant volumes in HU (8³ blocks: edges to warp) and spacing."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(-1000.0, 200.0, (2 * batch, 12, 12, 12))
    volumes = np.repeat(np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2), 8, axis=3)
    volumes = volumes.astype(np.float32)[..., None]
    spacing = rng.uniform(1.0, 2.0, (batch, 3)).astype(np.float32)
    return volumes[:batch], volumes[batch:], spacing


@pytest.fixture(scope="module")
def local(version_dir):
    """Local inference with the same SavedModel: the served outputs must equal it (parity with
    the Keras model itself is tests/test_export.py's job)."""
    loaded = tf.saved_model.load(str(version_dir))  # owns the variables: keep it referenced

    def infer(fixed, moving, spacing):
        outputs = loaded.signatures[SIGNATURE](
            fixed=tf.constant(fixed), moving=tf.constant(moving), spacing=tf.constant(spacing)
        )
        return {name: value.numpy() for name, value in outputs.items()}

    return infer


def assert_matches(actual, expected, atol_mm):
    """Displacement to ``atol_mm``; warped to the same share of the intensity range."""
    for name, atol in (("displacement", atol_mm), ("warped", atol_mm * WINDOW_HU)):
        np.testing.assert_allclose(actual[name], expected[name], rtol=0, atol=atol)


def test_round_trip_of_96_cubed_pairs(client, local):
    fixed, moving, spacing = blocky_pair(batch=2)
    expected = local(fixed, moving, spacing)
    assert np.abs(expected["displacement"]).max() > 1.0  # the test model really moves voxels

    batch = client.register(fixed, moving, spacing)
    assert batch["displacement"].shape == (2, *SHAPE, 3) and batch["warped"].shape == (2, *SHAPE, 1)
    assert_matches(batch, expected, atol_mm=1e-6)

    single = client.register(fixed[1, ..., 0], moving[1, ..., 0], spacing[1])
    assert single["displacement"].shape == (*SHAPE, 3) and single["warped"].shape == SHAPE
    assert_matches(
        {"displacement": single["displacement"][None], "warped": single["warped"][None, ..., None]},
        local(fixed[1:], moving[1:], spacing[1:]),  # not expected[1:]: batch size shifts rounding
        atol_mm=1e-6,
    )


def test_wrong_size_is_a_one_line_error_naming_the_server(client, server):
    image = np.zeros((32, 32, 32), np.float32)
    with pytest.raises(RuntimeError) as raised:
        client.register(image, image, 1.0)
    message = str(raised.value)
    assert "\n" not in message
    assert f"TF Serving at {server}" in message and "INVALID_ARGUMENT" in message
    assert "fixed: expected shape (B, 96, 96, 96, 1), got] [1 32 32 32 1]" in message


@pytest.mark.parametrize("name, message", [
    ("fixed", "fixed: contains NaN or infinite values"),
    ("moving", "moving: contains NaN or infinite values"),
])
def test_one_nan_voxel_is_invalid_argument_naming_the_input(client, name, message):
    fixed, moving, spacing = blocky_pair(1)
    inputs = {"fixed": fixed, "moving": moving, "spacing": spacing}
    inputs[name] = inputs[name].copy()
    inputs[name][0, 40, 50, 60, 0] = np.nan
    with pytest.raises(ServingError) as raised:
        client.predict(inputs)
    assert "INVALID_ARGUMENT" in str(raised.value) and message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_empty_batch_is_invalid_argument(client):
    empty = np.zeros((0, *SHAPE, 1), np.float32)
    with pytest.raises(ServingError, match="INVALID_ARGUMENT.*fixed: empty batch"):
        client.predict({"fixed": empty, "moving": empty, "spacing": np.zeros((0, 3), np.float32)})


def test_concurrent_clients_get_every_answer_right(server, local):
    """A bounded load test on loopback: 4 clients (threads, one channel each) send 3 requests
    each at once, cycling through 3 different pairs; every reply must be the one for the pair
    sent (no mix-ups between concurrent requests) and none may be lost."""
    clients, requests = 4, 3
    pairs = [blocky_pair(1, seed=10 + index) for index in range(3)]
    expected = [local(*pair) for pair in pairs]
    answers, errors = {}, []
    start = threading.Barrier(clients)

    def work(client_index):
        try:
            with RegistrationClient(server, model_name=MODEL_NAME, timeout=120) as client:
                start.wait()
                for request in range(requests):
                    which = (client_index + request) % len(pairs)
                    fixed, moving, spacing = pairs[which]
                    answers[client_index, request] = which, client.register(fixed, moving, spacing)
        except Exception as error:  # reported below, with the others
            errors.append(repr(error))

    threads = [threading.Thread(target=work, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and not any(thread.is_alive() for thread in threads)
    assert sorted(answers) == [(c, r) for c in range(clients) for r in range(requests)]
    for which, answer in answers.values():
        assert_matches(answer, expected[which], atol_mm=1e-6)


def test_unknown_model_is_not_found(server):
    with RegistrationClient(server, model_name="no_such_model", timeout=10) as other:
        with pytest.raises(RuntimeError, match="model 'no_such_model'.*NOT_FOUND"):
            other.predict({"fixed": np.zeros((1, 1, 1, 1, 1), np.float32)})
        with pytest.raises(ServingError, match="model 'no_such_model'.*NOT_FOUND"):
            other.grid()


def test_grid_comes_from_the_served_signature(client, server):
    assert client.grid() == SHAPE
    with RegistrationClient(server, model_name=MODEL_NAME, signature=REFINED_SIGNATURE) as refined:
        assert refined.grid() == SHAPE
    with RegistrationClient(server, model_name=MODEL_NAME, signature="nope") as other:
        with pytest.raises(ServingError, match="signature 'nope': not served .signatures: "
                                               "register_refined, serving_default"):
            other.grid()


def python_block_after(path, heading):
    """The first ```python block after the line ``heading`` of a Markdown file."""
    text = path.read_text()
    rest = text[text.index(heading + "\n"):]
    start = rest.index("```python\n") + len("```python\n")
    return rest[start:rest.index("```", start)]


def test_serving_readme_nifti_to_full_resolution_field(server, version_dir, tmp_path,
                                                        monkeypatch):
    """serving/README.md's Python path, as written but for the server's address: NIfTI files
    through the server to full-resolution fields equal to local inference, written as NIfTI."""
    from tfmlreg.data import io
    from tfmlreg.inference import load_predictor, register_pair

    fixed, moving, spacing = blocky_pair(1, seed=4)
    shape = (48, 40, 36)  # not the model grid: register_pair resamples both ways
    for name, image in (("exhale", fixed), ("inhale", moving)):
        io.write_image(str(tmp_path / f"{name}.nii.gz"), image[0, :48, :40, :36, 0], (4.0, 4.5, 5.0))
    block = python_block_after(SERVING_DIR / "README.md", "## 3. The client")
    assert "gpu-host:8500" in block and f'model_name="{MODEL_NAME}"' in block
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block.replace("gpu-host:8500", server), "serving/README.md", "exec"), scope)
    assert scope["predictor"].shape == SHAPE  # asked from the server
    local = register_pair(load_predictor(str(version_dir), precision="float32"),
                          scope["pair"])
    np.testing.assert_allclose(scope["result"]["displacement"], local["displacement"], atol=1e-4)
    assert np.abs(local["displacement"]).max() > 0.5
    written, written_spacing = io.read_displacement("displacement.nii.gz")
    assert written.shape == (*shape, 3) and np.allclose(written_spacing, (4.0, 4.5, 5.0))
    np.testing.assert_allclose(written, scope["refined"]["displacement"], atol=1e-4)
    assert not np.allclose(scope["refined"]["displacement"], scope["result"]["displacement"])
    assert io.read_image("warped.nii.gz")[0].shape == shape


def test_unreachable_server_is_a_connection_error():
    with socket.socket() as probe:  # a port that was free a moment ago and has no server
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    with RegistrationClient(address, timeout=5) as nowhere:
        with pytest.raises(ConnectionError, match=f"TF Serving at {address}.*UNAVAILABLE"):
            nowhere.register(np.zeros((8, 8, 8)), np.zeros((8, 8, 8)))


@pytest.mark.parametrize(
    "fixed_shape, moving_shape, spacing, message",
    [
        ((8, 8), (8, 8), 1.0, r"fixed: expected \(D, H, W\)"),
        ((8, 8, 8), (8, 8, 4), 1.0, "moving: expected the shape of fixed"),
        ((8, 8, 8), (8, 8, 8), (1.0, 2.0), r"spacing: expected a scalar, \(3,\) or \(1, 3\)"),
    ],
)
def test_bad_arguments_fail_before_any_request(fixed_shape, moving_shape, spacing, message):
    with RegistrationClient("127.0.0.1:1") as unused:
        with pytest.raises(ValueError, match=message):
            unused.register(np.zeros(fixed_shape), np.zeros(moving_shape), spacing)


def test_warmup_records_are_requests_the_signature_accepts(version_dir, local):
    records = list(tf.data.TFRecordDataset(str(version_dir / WARMUP_FILE)).as_numpy_iterator())
    signatures = set()
    for record in records:
        request = prediction_log_pb2.PredictionLog.FromString(record).predict_log.request
        signatures.add(request.model_spec.signature_name)
        inputs = {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}
        assert sorted(inputs) == ["fixed", "moving", "spacing"]
        assert inputs["fixed"].shape == (1, *SHAPE, 1) and inputs["spacing"].shape == (1, 3)
        assert inputs["fixed"].min() < -500 < inputs["fixed"].max()  # CT-like HU, not zeros
        assert local(**inputs)["displacement"].shape == (1, *SHAPE, 3)
    assert signatures == set(SIGNATURES)  # every signature is warmed up


def test_models_config_serves_the_clients_default_model():
    text = (SERVING_DIR / "models.config").read_text()
    config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert model.name == DEFAULT_MODEL_NAME and model.model_platform == "tensorflow"
    assert model.base_path == f"/models/{DEFAULT_MODEL_NAME}"
    # what compose.yaml mounts there is the shipped model of that name
    shipped = pathlib.Path(models.shipped(DEFAULT_MODEL_NAME))
    assert (shipped / "1" / "saved_model.pb").is_file()
    mount = f"../{shipped.relative_to(SERVING_DIR.parent).as_posix()}:{model.base_path}:ro"
    assert mount in (SERVING_DIR / "compose.yaml").read_text()


def test_cli_register_through_the_server_equals_local_inference(server, version_dir, tmp_path):
    """``tfmlreg register --server`` against the test double gives the local outputs."""
    from tfmlreg.cli import main
    from tfmlreg.data import io

    fixed, moving, spacing = blocky_pair(1, seed=3)
    for name, image in (("fixed", fixed), ("moving", moving)):
        io.write_image(str(tmp_path / f"{name}.nii.gz"), image[0, ..., 0], spacing[0])
    common = ["register", "--fixed", str(tmp_path / "fixed.nii.gz"),
              "--moving", str(tmp_path / "moving.nii.gz")]
    # the grid comes from the server's metadata (no --shape)
    assert main(common + ["--server", server, "--model-name", MODEL_NAME,
                          "--out", str(tmp_path / "remote")]) == 0
    assert main(common + ["--model", str(version_dir), "--out", str(tmp_path / "local")]) == 0
    def outputs(folder):
        return (io.read_displacement(str(tmp_path / folder / "displacement.nii.gz"))[0],
                io.read_image(str(tmp_path / folder / "warped.nii.gz"))[0])

    (remote_u, remote_warped), (local_u, local_warped) = outputs("remote"), outputs("local")
    np.testing.assert_allclose(remote_u, local_u, atol=1e-4)
    np.testing.assert_allclose(remote_warped, local_warped, atol=1e-2)
    assert np.abs(local_u).max() > 0.1  # the model really moves voxels
