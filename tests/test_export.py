"""The TF Serving SavedModel: layout, parity with Keras, signature, input checks, C++ loading."""

import os
import shutil
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tfmlreg import export
from tfmlreg.ct import HU_WINDOW
from tfmlreg.export import WARMUP_FILE, export_saved_model, synthetic_pair
from tfmlreg.interface import SIGNATURE
from conftest import random_inputs, registration_model

SHAPE = (16, 16, 16)
CPP_SOURCE = os.path.join(os.path.dirname(__file__), "cpp", "load_saved_model.cc")
WINDOW_HU = HU_WINDOW[1] - HU_WINDOW[0]  # the model's default window width: the scale of "warped"
TOL = 1e-5


def assert_matches(actual, expected):
    """Displacement to 1e-5 mm; warped to 1e-5 of the intensity range (graph vs eager rounding)."""
    # rtol: float32 rounding of ~10 mm displacements differs by a few ULPs between the Keras and
    # the SavedModel graphs (oneDNN's order of summation), about 1e-6 relative
    np.testing.assert_allclose(actual["displacement"], expected["displacement"], rtol=2e-6, atol=TOL)
    np.testing.assert_allclose(actual["warped"], expected["warped"], rtol=0, atol=TOL * WINDOW_HU)


@pytest.fixture(scope="module")
def model():
    return registration_model(SHAPE, levels=2, base_filters=4, depth=2)


@pytest.fixture(scope="module")
def base_dir(model, tmp_path_factory):
    base = tmp_path_factory.mktemp("models") / "mlvirnet"
    export_saved_model(model, base, version=1)
    return base


@pytest.fixture(scope="module")
def signature(base_dir):
    loaded = tf.saved_model.load(str(base_dir / "1"))
    yield loaded.signatures[SIGNATURE]
    del loaded


@pytest.fixture(scope="module")
def inputs(model):
    return random_inputs(SHAPE, batch=2)


@pytest.fixture(scope="module")
def expected(model, inputs):
    """The Keras model in the form the export writes (batch norm folded, float32): folding's own
    round-off (1e-5 mm, tests/test_speed_paths.py) is not what this file checks."""
    outputs = model.for_inference("float32")(inputs, training=False)
    assert float(np.abs(outputs["displacement"]).max()) > 1.0  # the test model really moves voxels
    return {name: np.asarray(outputs[name]) for name in ("displacement", "warped")}


def call(signature, inputs):
    outputs = signature(**{name: tf.constant(value) for name, value in inputs.items()})
    return {name: value.numpy() for name, value in outputs.items()}


def test_versioned_layout_for_tf_serving(base_dir):
    version = base_dir / "1"
    assert (version / "saved_model.pb").is_file()
    assert (version / "variables" / "variables.index").is_file()
    assert (version / WARMUP_FILE).is_file()
    assert sorted(os.listdir(base_dir)) == ["1"]  # no staging leftovers
    assert stat.S_IMODE(os.stat(version).st_mode) == 0o755  # readable by a server of another user


def test_reloaded_signature_matches_keras(signature, inputs, expected):
    outputs = call(signature, inputs)
    assert sorted(outputs) == ["displacement", "warped"]
    assert_matches(outputs, expected)


def test_saved_model_cli_lists_the_interface(base_dir):
    cli = shutil.which("saved_model_cli")
    command = [cli] if cli else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    shown = subprocess.run(
        command + ["show", "--dir", str(base_dir / "1"), "--all"],
        capture_output=True, text=True, check=True,
    ).stdout
    serving = shown.split(f"signature_def['{SIGNATURE}']")[1].split("Method name")[0]
    for name in ("fixed", "moving", "spacing", "displacement", "warped"):
        assert f"['{name}']" in serving
    assert "displacement_level" not in serving  # per-level outputs stay inside


EXPECTED_IMAGE = r"expected shape \(B, 16, 16, 16, 1\), got\]"


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("fixed", np.zeros((1, 8, 16, 16, 1)), rf"fixed: {EXPECTED_IMAGE} \[1 8 16 16 1\]"),
        ("moving", np.zeros((1, 16, 16, 16)), rf"moving: {EXPECTED_IMAGE} \[1 16 16 16\]"),
        ("spacing", np.ones((1, 2)), r"spacing: expected shape \(B, 3\), got\] \[1 2\]"),
        ("spacing", np.ones(()), r"spacing: expected shape \(B, 3\), got\] \[\]"),
        ("moving", np.zeros((2, 16, 16, 16, 1)), "moving: batch size differs from fixed"),
        ("spacing", np.ones((2, 3)), r"spacing: expected one \(3,\) row of mm per fixed image"),
        ("spacing", -np.ones((1, 3)), "spacing: must be > 0 mm"),
    ],
)
def test_bad_input_is_invalid_argument(signature, name, value, message):
    inputs = random_inputs(SHAPE, batch=1)
    inputs[name] = value.astype(np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        call(signature, inputs)


def test_existing_version_is_not_overwritten(model, base_dir):
    before = os.stat(base_dir / "1" / "saved_model.pb").st_mtime_ns
    with pytest.raises(FileExistsError, match="version already exists"):
        export_saved_model(model, base_dir, version=1)
    assert os.stat(base_dir / "1" / "saved_model.pb").st_mtime_ns == before


def test_failed_export_leaves_no_partial_version(model, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "write_warmup_requests", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_saved_model(model, tmp_path, version=3)
    assert os.listdir(tmp_path) == []


def test_bad_warmup_requests_fail_before_writing(model, tmp_path):
    pair = synthetic_pair(SHAPE)
    with pytest.raises(ValueError, match=r"warmup_requests\[0\]: expected keys"):
        export_saved_model(model, tmp_path, warmup_requests=[{"fixed": pair["fixed"]}])
    small = synthetic_pair((8, 8, 8))
    with pytest.raises(ValueError, match=r"expected fixed of shape \(B, 16, 16, 16, 1\)"):
        export_saved_model(model, tmp_path, warmup_requests=[small])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("version", [0, -1, "2", 1.5])
def test_version_must_be_a_positive_integer(model, tmp_path, version):
    with pytest.raises(ValueError, match="version: expected a positive integer"):
        export_saved_model(model, tmp_path, version=version)


# --- the C++ loader (what TF Serving does, without Python) -------------------------------------


@pytest.fixture(scope="module")
def cpp_loader(tmp_path_factory):
    """Compile tests/cpp/load_saved_model.cc once per session (about 20 s on 2 cores)."""
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler (g++) on PATH")
    lib_dir = tf.sysconfig.get_lib()
    include_dir = os.path.join(lib_dir, "include")
    needed = [
        os.path.join(include_dir, "tensorflow", "cc", "saved_model", "loader.h"),
        os.path.join(lib_dir, "libtensorflow_cc.so.2"),
        os.path.join(lib_dir, "libtensorflow_framework.so.2"),
    ]
    missing = [path for path in needed if not os.path.exists(path)]
    if missing:
        pytest.skip(f"TensorFlow C++ headers or libraries missing: {missing}")
    binary = tmp_path_factory.mktemp("cpp") / "load_saved_model"
    command = [
        compiler, "-O1", "-Wno-deprecated-declarations", *tf.sysconfig.get_compile_flags(),
        CPP_SOURCE, "-o", str(binary), f"-L{lib_dir}", "-Wl,--no-as-needed",
        "-l:libtensorflow_framework.so.2", "-l:libtensorflow_cc.so.2", f"-Wl,-rpath,{lib_dir}",
    ]
    start = time.perf_counter()
    built = subprocess.run(command, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-4000:]
    print(f"compiled {binary.name} in {time.perf_counter() - start:.1f} s")
    return binary


def write_tensor(path, array):
    """The loader's format: int64 rank, int64 dims, float32 data (little-endian)."""
    array = np.ascontiguousarray(array, "<f4")
    with open(path, "wb") as file:
        np.array([array.ndim, *array.shape], "<i8").tofile(file)
        array.tofile(file)


def read_tensor(path):
    with open(path, "rb") as file:
        rank = int(np.fromfile(file, "<i8", 1)[0])
        shape = tuple(np.fromfile(file, "<i8", rank))
        return np.fromfile(file, "<f4").reshape(shape)


def run_cpp(loader, saved_model_dir, inputs, tmp_path, signature=SIGNATURE):
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    out_dir.mkdir()
    for name, value in inputs.items():
        write_tensor(in_dir / name, value)
    command = [str(loader), str(saved_model_dir), signature, str(in_dir), str(out_dir)]
    done = subprocess.run(command, capture_output=True, text=True)
    outputs = {name: read_tensor(out_dir / name) for name in sorted(os.listdir(out_dir))}
    return done, outputs


def test_cpp_loader_matches_keras(cpp_loader, base_dir, inputs, expected, tmp_path):
    done, outputs = run_cpp(cpp_loader, base_dir / "1", inputs, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert sorted(outputs) == ["displacement", "warped"]
    assert_matches(outputs, expected)


def test_cpp_loader_reports_wrong_size(cpp_loader, base_dir, tmp_path):
    inputs = random_inputs(SHAPE, batch=1)
    inputs["moving"] = np.zeros((1, 16, 16, 8, 1), np.float32)
    done, outputs = run_cpp(cpp_loader, base_dir / "1", inputs, tmp_path)
    assert done.returncode == 2 and outputs == {}
    assert (
        "STATUS INVALID_ARGUMENT: assertion failed: [moving: expected shape (B, 16, 16, 16, 1), "
        "got] [1 16 16 8 1]" in done.stderr
    )
