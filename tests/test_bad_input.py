"""Bad input, unusual input and faults, as a careful user meets them (issue 13).

Each case asserts the exit code, the one line (naming the file, argument or key and what is
wrong) and that nothing is left behind: no output, no hidden staging folder, no lock.
"""

import os
import re
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from conftest import random_inputs, registration_model
from tfmlreg import commands, export, geometry, losses, metrics, output, serving
from tfmlreg.cli import main
from tfmlreg.data import checks, io, phantom
from tfmlreg.export import export_saved_model
from tfmlreg.figures import save_overlays
from tfmlreg.interface import SIGNATURE

GRID = (16, 16, 16)
FIXED_SHAPE, MOVING_SHAPE = (24, 24, 20), (20, 28, 16)
SPACING = (2.0, 2.0, 2.5)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("bad_input")


@pytest.fixture(scope="module")
def model(workspace):
    tiny = registration_model(GRID, levels=2, base_filters=4, depth=2)
    tiny.save(workspace / "tiny.keras")
    export_saved_model(tiny, str(workspace / "tiny"), version=1)
    return str(workspace / "tiny")


def blob(shape, seed=0):
    """A smooth CT-like volume: a soft-tissue ball in air, plus noise."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    inside = np.sum(grid ** 2, axis=-1) < 0.5
    noise = np.random.default_rng(seed).normal(0, 10, shape)
    return (np.where(inside, 40.0, -1000.0) + noise).astype(np.float32)


def write_nifti(path, data, spacing=SPACING):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.diag(list(spacing) + [1.0])), path)
    return str(path)


def write_landmarks(path, rows):
    np.savetxt(path, np.asarray(rows, float), fmt="%g", delimiter="\t")
    return str(path)


@pytest.fixture(scope="module")
def inputs(workspace):
    """Good files: fixed and moving of different shapes, 300 landmarks inside each."""
    folder = workspace / "inputs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    files = {
        "fixed": write_nifti(folder / "fixed.nii.gz", blob(FIXED_SHAPE)),
        "moving": write_nifti(folder / "moving.nii.gz", blob(MOVING_SHAPE, seed=1)),
        "fixed_landmarks": write_landmarks(folder / "fixed.txt", rng.uniform(2, 15, (300, 3))),
        "moving_landmarks": write_landmarks(folder / "moving.txt", rng.uniform(2, 15, (300, 3))),
    }
    return files


def listing(folder):
    """Everything in ``folder``, hidden entries included."""
    return sorted(os.listdir(folder))


def register(model, out, fixed, moving, *extra):
    return ["register", "--fixed", fixed, "--moving", moving, "--model", model, "--out", str(out),
            *extra]


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert err.startswith("tfmlreg: error: "), err
    return err


# --- the register command: different shapes, bad files, outputs ---------------------------------


def test_register_fixed_and_moving_of_different_shapes(model, inputs, tmp_path, capsys):
    out = tmp_path / "result"
    argv = register(model, out, inputs["fixed"], inputs["moving"],
                    "--fixed-landmarks", inputs["fixed_landmarks"],
                    "--moving-landmarks", inputs["moving_landmarks"])
    assert main(argv) == 0
    warped, spacing, _ = io.read_image(str(out / "warped.nii.gz"))
    assert warped.shape == FIXED_SHAPE
    np.testing.assert_allclose(spacing, SPACING)
    assert (out / "overlay.png").stat().st_size > 0
    assert listing(tmp_path) == ["result"]


def test_overlay_panels_must_be_on_the_fixed_grid(tmp_path):
    with pytest.raises(ValueError, match=r"^panels: 'before' has shape \(20, 28, 16\).*resample"):
        save_overlays(str(tmp_path / "o.png"), blob(FIXED_SHAPE), {"before": blob(MOVING_SHAPE)},
                      SPACING)


def test_overlay_before_panel_is_the_moving_image_on_the_fixed_grid(tmp_path, monkeypatch):
    pair = {"name": "p", "fixed": blob(FIXED_SHAPE), "moving": blob(MOVING_SHAPE),
            "spacing_fixed": np.float32(SPACING), "spacing_moving": np.float32((2.4, 1.7, 3.125))}
    shown = {}
    monkeypatch.setattr(commands, "save_overlays",
                        lambda path, fixed, panels, spacing, **options: shown.update(panels))
    commands.save_overlay(str(tmp_path / "o.png"), pair, pair["fixed"])
    assert shown["before"].shape == FIXED_SHAPE
    # same physical extent (48 x 47.6 x 50 mm vs 48 x 48 x 50 mm): the centres agree
    assert shown["before"][12, 12, 10] == pytest.approx(40.0, abs=60)


def header_without_voxel_size(path):
    header = nib.Nifti1Header()
    header.set_data_shape(FIXED_SHAPE)
    header.set_data_dtype(np.float32)
    image = nib.Nifti1Image(blob(FIXED_SHAPE), None, header=header)
    image.header["qform_code"], image.header["sform_code"] = 0, 0
    image.header["pixdim"][1:4] = 0
    image.to_filename(path)
    return str(path)


def landmark_case(kind, folder, inputs):
    """``(fixed landmarks, moving landmarks, the file the message must name, message)``."""
    good = np.loadtxt(inputs["fixed_landmarks"])
    if kind == "negative":
        bad = good.copy()
        bad[7] = (-3, 5, 5)
        return write_landmarks(folder / "neg.txt", bad), inputs["moving_landmarks"], "neg.txt", \
            "landmark in row 8 lies outside the image"
    if kind == "outside":
        bad = good.copy()
        bad[:, 2] += 400  # indices of a much larger image
        return write_landmarks(folder / "far.txt", bad), inputs["moving_landmarks"], "far.txt", \
            "landmark in row 1 lies outside the image (and 299 more)"
    if kind == "count":
        short = write_landmarks(folder / "299.txt", np.loadtxt(inputs["moving_landmarks"])[:299])
        return inputs["fixed_landmarks"], short, "299.txt", "299 landmarks, but"
    columns = write_landmarks(folder / "cols.txt", np.c_[good, good[:, :1]])
    return columns, inputs["moving_landmarks"], "cols.txt", "expected rows of 3 voxel indices"


@pytest.mark.parametrize("kind", ["negative", "outside", "count", "columns"])
def test_bad_landmarks_fail_before_any_model_work(kind, inputs, tmp_path, capsys):
    fixed_points, moving_points, named, message = landmark_case(kind, tmp_path, inputs)
    out = tmp_path / "out"
    # the model does not exist: the landmark error must come first, before any model work
    code = main(register(str(tmp_path / "no_model"), out, inputs["fixed"], inputs["moving"],
                         "--fixed-landmarks", fixed_points, "--moving-landmarks", moving_points))
    err = one_line_error(capsys)
    assert code == 2 and named in err and message in err
    assert not out.exists() and not [n for n in listing(tmp_path) if n.startswith(".")]


@pytest.mark.parametrize("kind, message", [
    ("huge", "voxel size [1e+38, 1e+38, 1e+38] mm is implausible (expected 0.05-20 mm per axis)"),
    ("tiny", "voxel size [0.001, 0.001, 0.001] mm is implausible"),
    ("unset", "the header states no voxel size (pixdim 0, no qform or sform)"),
    ("nan", "contains NaN or infinite values"),
])
def test_implausible_images_are_refused(kind, message, model, inputs, tmp_path, capsys):
    path = tmp_path / f"{kind}.nii.gz"
    if kind == "huge":
        write_nifti(path, blob(FIXED_SHAPE), spacing=(1e38,) * 3)
    elif kind == "tiny":
        write_nifti(path, blob(FIXED_SHAPE), spacing=(1e-3,) * 3)
    elif kind == "unset":
        header_without_voxel_size(path)
    else:
        image = blob(FIXED_SHAPE)
        image[3, 4, 5] = np.nan
        write_nifti(path, image)
    out = tmp_path / "out"
    code = main(register(model, out, str(path), inputs["moving"]))
    err = one_line_error(capsys)
    assert code == 2 and str(path) in err and message in err
    assert listing(tmp_path) == [path.name]


@pytest.mark.parametrize("kind, message", [
    ("corrupt_pb", "cannot load the model (OSError: Cannot parse file"),
    ("random_keras", "not a .keras model (a .keras file is a zip archive"),
])
def test_damaged_model_files_give_one_line(kind, message, inputs, tmp_path, capsys):
    if kind == "corrupt_pb":
        model = tmp_path / "model"
        (model / "1").mkdir(parents=True)
        (model / "1" / "saved_model.pb").write_bytes(os.urandom(500))
    else:
        model = tmp_path / "model.keras"
        model.write_bytes(os.urandom(500))
    out = tmp_path / "out"
    code = main(register(str(model), out, inputs["fixed"], inputs["moving"]))
    err = one_line_error(capsys)
    assert code == 2 and str(model) in err and message in err
    assert not out.exists()


def test_random_bytes_named_keras_in_export(tmp_path, capsys):
    model = tmp_path / "model.keras"
    model.write_bytes(os.urandom(300))
    code = main(["export", "--model", str(model), "--out", str(tmp_path / "exported")])
    err = one_line_error(capsys)
    assert code == 2 and f"{model}: not a .keras model" in err
    assert listing(tmp_path) == ["model.keras"]


def test_out_must_not_hold_files_unless_overwrite(model, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code = main(register(model, out, inputs["fixed"], inputs["moving"]))
    err = one_line_error(capsys)
    assert code == 2 and f"--out: {out} exists and is not empty; use --overwrite" in err
    assert listing(out) == ["mine.txt"] and listing(tmp_path) == ["out"]
    assert main(register(model, out, inputs["fixed"], inputs["moving"], "--overwrite")) == 0
    assert "mine.txt" not in listing(out) and "warped.nii.gz" in listing(out)
    assert listing(tmp_path) == ["out"]


def test_an_empty_out_folder_is_used(model, inputs, tmp_path):
    (tmp_path / "out").mkdir()
    assert main(register(model, tmp_path / "out", inputs["fixed"], inputs["moving"])) == 0
    assert "displacement.nii.gz" in listing(tmp_path / "out")


def test_second_run_into_the_same_out_is_refused(model, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    with output.locked(str(out)):  # as a first run holds it
        code = main(register(model, out, inputs["fixed"], inputs["moving"]))
        err = one_line_error(capsys)
    assert code == 2 and f"--out: {out} is being written by another tfmlreg run" in err
    assert listing(tmp_path) == []


def test_leftovers_of_killed_runs_are_removed_by_the_next(model, inputs, tmp_path):
    (tmp_path / ".out.staging-deadbeef").mkdir()
    (tmp_path / ".out.staging-deadbeef" / "warped.nii.gz").write_bytes(b"half")
    (tmp_path / ".out.lock").write_text("")
    assert main(register(model, tmp_path / "out", inputs["fixed"], inputs["moving"])) == 0
    assert listing(tmp_path) == ["out"]


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_out_that_cannot_be_written(where, model, inputs, tmp_path, capsys):
    if where == "under_a_file":
        (tmp_path / "file").write_text("")
        out, message = tmp_path / "file" / "out", f"{tmp_path / 'file'} is a file, not a folder"
    else:
        if not os.path.isdir("/proc/self"):
            pytest.skip("no /proc")
        out, message = "/proc/tfmlreg-out", "/proc"
    code = main(register(model, out, inputs["fixed"], inputs["moving"]))
    err = one_line_error(capsys)
    assert code == 2 and err.startswith("tfmlreg: error: --out: ") and message in err


def test_unwritable_parent_is_refused(model, inputs, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes everywhere")
    locked_dir = tmp_path / "ro"
    locked_dir.mkdir(mode=0o555)
    code = main(register(model, locked_dir / "out", inputs["fixed"], inputs["moving"]))
    err = one_line_error(capsys)
    assert code == 2 and f"cannot write in {locked_dir}" in err


# --- errors that are not bad input ---------------------------------------------------------------


class NaNPredictor:
    shape = GRID

    def __call__(self, fixed, moving, spacing):
        return {"displacement": np.full(fixed.shape[:4] + (3,), np.nan, np.float32),
                "warped": np.zeros_like(fixed)}


@pytest.mark.parametrize("refine, message", [
    ("--no-refine", "returned a displacement with NaN or infinite values"),
    ("--refine-iterations=2", "refinement produced a non-finite displacement"),
])
def test_non_finite_displacement_is_an_error_not_a_result(refine, message, inputs, tmp_path,
                                                          capsys, monkeypatch):
    monkeypatch.setattr(commands, "load_predictor", lambda *args, **kwargs: NaNPredictor())
    out = tmp_path / "out"
    code = main(register("unused", out, inputs["fixed"], inputs["moving"], refine))
    err = one_line_error(capsys)
    assert code == 1 and message in err and "no result written" in err
    assert listing(tmp_path) == []


@pytest.mark.parametrize("error", [TypeError("unsupported operand"), ValueError("a bug, not input")])
def test_unexpected_exception_is_an_internal_error(error, inputs, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(commands, "register_and_write", broken)
    argv = register("unused", tmp_path / "out", inputs["fixed"], inputs["moving"])
    monkeypatch.setattr(commands, "load_predictor", lambda *args, **kwargs: NaNPredictor())
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("tfmlreg: internal error: ")
    assert f"{type(error).__name__}: {error}" in err and "TFMLREG_DEBUG=1" in err
    assert main(["--debug"] + argv) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith(
        "tfmlreg: internal error: ")
    monkeypatch.setenv("TFMLREG_DEBUG", "1")
    assert main(argv) == 1 and "Traceback" in capsys.readouterr().err
    assert listing(tmp_path) == []


# --- evaluate: a broken case among good ones -------------------------------------------------------


def test_evaluate_reports_a_broken_case_and_evaluates_the_rest(model, tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["phantom", "--out", str(data), "--cases", "3", "--shape", "48", "48", "48"]) == 0
    broken = sorted(os.listdir(data))[1]
    (data / broken / "moving.nii.gz").write_bytes(b"\x1f\x8b not a NIfTI")
    capsys.readouterr()
    out = tmp_path / "eval"
    code = main(["evaluate", "--model", model, "--data", str(data), "--out", str(out),
                 "--no-figures", "--no-refine"])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2
    # (the progress bar shares stderr: search, rather than match whole lines)
    assert re.search(rf"tfmlreg: skipped case {broken}: \S*{broken}/moving.nii.gz: cannot read as NIfTI",
                     captured.err)
    assert lines[-1].startswith(f"tfmlreg: error: 1 case(s) could not be evaluated ({broken};")
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 and not any(broken in row for row in rows)
    assert "## Cases not evaluated" in (out / "results.md").read_text()
    assert "## Cases not evaluated" in captured.out


def test_evaluate_with_no_usable_case_writes_nothing(model, tmp_path, capsys):
    data = tmp_path / "data" / "case0"
    data.mkdir(parents=True)
    (data / "fixed.nii.gz").write_bytes(b"junk")
    (data / "moving.nii.gz").write_bytes(b"junk")
    out = tmp_path / "eval"
    code = main(["evaluate", "--model", model, "--data", str(tmp_path / "data"), "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("tfmlreg: error: ") and "none of the 1 case(s)" in lines[-1]
    assert not out.exists()


# --- processes: Ctrl-C, SIGTERM, kill -9; --help without TensorFlow ---------------------------------


def start_phantoms(out):
    """A slow enough command (many phantom pairs) in its own process."""
    command = [sys.executable, "-m", "tfmlreg.cli", "phantom", "--out", str(out), "--cases", "40",
               "--shape", "48", "48", "48"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_staging(folder, process, timeout=120):
    """Until a staging folder holds a written case (the command is well under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        for name in os.listdir(folder):
            if ".staging-" in name and os.listdir(folder / name):
                return
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"no staging folder appeared: {process.communicate()}")


@pytest.mark.parametrize("signum, code, message", [
    (signal.SIGINT, 130, "tfmlreg: interrupted"),
    (signal.SIGTERM, 143, "tfmlreg: terminated"),
])
def test_interrupt_leaves_no_partial_output(signum, code, message, tmp_path):
    process = start_phantoms(tmp_path / "out")
    wait_for_staging(tmp_path, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code
    assert err.strip().splitlines() == [message]
    assert listing(tmp_path) == []


def test_kill_9_leftovers_go_with_the_next_run(tmp_path):
    process = start_phantoms(tmp_path / "out")
    wait_for_staging(tmp_path, process)
    process.kill()
    process.communicate()
    assert not (tmp_path / "out").exists()  # a killed run never shows a partial output
    assert main(["phantom", "--out", str(tmp_path / "out"), "--shape", "48", "48", "48"]) == 0
    assert listing(tmp_path) == ["out"]


def test_a_command_prints_no_tensorflow_log_lines(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tfmlreg.cli", "phantom", "--out",
                           str(tmp_path / "out"), "--shape", "48", "48", "48"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.strip() == f"wrote 1 phantom pair(s) to {tmp_path / 'out'}"


def test_phantom_settings_the_generator_refuses_are_bad_arguments(tmp_path, capsys):
    code = main(["phantom", "--out", str(tmp_path / "out"), "--shape", "16", "16", "16"])
    err = one_line_error(capsys)
    assert code == 2 and err.startswith("tfmlreg: error: --shape/--spacing/--amplitude: ")
    assert listing(tmp_path) == []


def test_help_answers_without_importing_tensorflow():
    code = ("import sys\n"
            "from tfmlreg.cli import build_parser\n"
            "for argv in (['--help'], ['register', '--help'], ['train', '--help']):\n"
            "    try:\n"
            "        build_parser().parse_args(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "register a moving image" in done.stdout and "--restart" in done.stdout


# --- the readers and the pair checks ----------------------------------------------------------------


BAD_SPACINGS = [0.0, -1.0, (1.0, 0.0, 1.0), (1.0, np.nan, 1.0), (np.inf, 1.0, 1.0)]


@pytest.mark.parametrize("spacing", BAD_SPACINGS)
def test_one_spacing_rule_numpy_and_keras_ops(spacing):
    message = "^voxel_size: spacing must be positive finite voxel sizes in mm"
    with pytest.raises(ValueError, match=message):
        geometry.check_spacing(spacing, "voxel_size")
    with pytest.raises(ValueError, match=message):
        geometry.check_spacing(spacing, "voxel_size", batch_size=2)
    with pytest.raises(ValueError, match=message):
        geometry.as_spacing(spacing, 1, name="voxel_size")
    with pytest.raises(ValueError, match=message):
        geometry.as_spacing(tf.constant(np.broadcast_to(spacing, (3,)), tf.float32), name="voxel_size")


@pytest.mark.parametrize("call", [
    lambda s: metrics.jacobian_determinant(np.zeros((4, 4, 4, 3)), s),
    lambda s: geometry.warp(np.zeros((1, 4, 4, 4, 1)), np.zeros((1, 4, 4, 4, 3)), s),
    lambda s: losses.Curvature(spacing=s),
    lambda s: serving.RegistrationClient("127.0.0.1:1").register(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), s),
    lambda s: phantom.make_pair((16, 16, 16), s),
])
def test_every_spacing_argument_follows_the_rule(call):
    with pytest.raises(ValueError, match="^spacing: spacing must be positive finite voxel sizes in mm"):
        call((1.0, -2.0, 1.0))


def test_spacing_checkers_accept_the_forms_they_document():
    np.testing.assert_array_equal(geometry.check_spacing(2.0), [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(geometry.check_spacing((1, 2, 3), batch_size=2), [[1, 2, 3]] * 2)
    with pytest.raises(ValueError, match=r"^spacing: expected a scalar, \(3,\) or \(2, 3\) in mm"):
        geometry.check_spacing(np.ones((3, 3)), batch_size=2)
    with pytest.raises(ValueError, match="^spacing: expected a scalar or 3 voxel sizes in mm"):
        geometry.check_spacing((1.0, 2.0))

    @tf.function
    def traced(spacing):  # a symbolic tensor's values are not known when traced: taken as it is
        return geometry.as_spacing(spacing, 1)

    np.testing.assert_array_equal(traced(tf.constant([1.0, 2.0, 3.0])), [[1.0, 2.0, 3.0]])


@pytest.mark.parametrize("spacing", [(0.01, 1, 1), (1, 1, 25.0), (1, np.inf, 1), (0, 1, 1)])
def test_check_spacing_refuses_implausible_voxel_sizes(spacing):
    with pytest.raises(io.DataError, match="^somefile: "):
        io.check_spacing(spacing, "somefile")


@pytest.mark.parametrize("spacing", [(0.05, 1, 1), (0.5, 0.7, 2.5), (20.0, 20.0, 20.0)])
def test_check_spacing_accepts_medical_voxel_sizes(spacing):
    np.testing.assert_allclose(io.check_spacing(spacing, "x"), spacing)


def test_commands_name_arguments_and_the_command_line_shows_flags(tmp_path, capsys):
    out = str(tmp_path / "out")
    with pytest.raises(io.DataError, match=r"^cases: expected at least 1, got 0$"):
        commands.phantom(out, cases=0)
    assert main(["phantom", "--out", out, "--cases", "0"]) == 2
    assert capsys.readouterr().err.strip() == "tfmlreg: error: --cases: expected at least 1, got 0"
    with pytest.raises(io.DataError, match=r"^min_amplitude_mm/amplitude_mm: expected 0 <= 40 <= 30"):
        commands.synth(["scan.nii.gz"], out, amplitude_mm=30.0, min_amplitude_mm=40.0)
    assert main(["synth", "--ct", "scan.nii.gz", "--out", out, "--amplitude", "30",
                 "--min-amplitude", "40"]) == 2
    assert capsys.readouterr().err.strip() == (
        "tfmlreg: error: --min-amplitude/--amplitude: expected 0 <= 40 <= 30 mm")
    os.makedirs(os.path.join(out, "x"))
    with pytest.raises(output.OutputError, match=f"^out: {re.escape(out)} exists and is not empty; "
                                                 "use overwrite=True to replace it"):
        commands.phantom(out)
    with pytest.raises(io.DataError, match="^version: expected a positive integer, got 0"):
        commands.export("model.keras", out, version=0)
    assert not os.listdir(tmp_path / "out" / "x")  # nothing written


def test_check_pair_accepts_landmarks_on_the_domain_boundary():
    pair = {"fixed": np.zeros((10, 10, 10)), "moving": np.zeros((8, 8, 8)),
            "spacing_fixed": np.ones(3), "spacing_moving": np.full(3, 1.25),
            "fixed_landmarks": np.array([[0.0, 0.0, 0.0], [10.0, 10.0, 10.0]]),
            "moving_landmarks": np.array([[0.0, 5.0, 5.0], [10.0, 10.0, 10.0]])}
    checks.check_pair(pair)  # the moving grid spans 10 mm too
    pair["moving_landmarks"] = pair["moving_landmarks"] + 0.01
    with pytest.raises(io.DataError, match="moving_landmarks: landmark in row 2 lies outside"):
        checks.check_pair(pair)


# --- the serving signature -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def signature(model):
    loaded = tf.saved_model.load(os.path.join(model, "1"))
    yield loaded.signatures[SIGNATURE]
    del loaded


def call(signature, inputs):
    return signature(**{name: tf.constant(value, tf.float32) for name, value in inputs.items()})


@pytest.mark.parametrize("name, index, value, message", [
    ("fixed", (0, 3, 4, 5, 0), np.nan, "fixed: contains NaN or infinite values"),
    ("moving", (0, 0, 0, 0, 0), np.inf, "moving: contains NaN or infinite values"),
    ("spacing", (0, 1), np.inf, "spacing: contains NaN or infinite values"),
])
def test_signature_rejects_non_finite_inputs(signature, name, index, value, message):
    inputs = random_inputs(GRID, batch=1)
    inputs[name][index] = value
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        call(signature, inputs)


def test_signature_rejects_an_empty_batch(signature):
    inputs = {name: value[:0] for name, value in random_inputs(GRID, batch=1).items()}
    with pytest.raises(tf.errors.InvalidArgumentError, match="fixed: empty batch"):
        call(signature, inputs)


def test_signature_refuses_to_return_a_non_finite_displacement():
    broken = registration_model(GRID, levels=1, base_filters=4, depth=2)
    for weight in broken.weights:
        if weight.path == "flow/kernel":
            weight.assign(np.full(weight.shape, np.nan, np.float32))
    serve = tf.function(export.serving_fn(broken, GRID))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="displacement: the model produced NaN or infinite values"):
        serve({name: tf.constant(value) for name, value in random_inputs(GRID, batch=1).items()})


def test_a_signal_swallowed_on_the_way_still_stops_the_commit(tmp_path):
    """A library may swallow the KeyboardInterrupt where it lands; the output is not committed."""
    from tfmlreg import output

    output.signalled.append(KeyboardInterrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            with output.staged(tmp_path / "out") as staging:
                with open(os.path.join(staging, "done.txt"), "w") as handle:
                    handle.write("complete")
    finally:
        output.signalled.clear()
    assert listing(tmp_path) == []
