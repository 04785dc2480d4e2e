"""Every `tfmlreg` command on tiny data, and bad input: exit code 2, one line, no partial output."""

import json
import os
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest

from conftest import registration_model
from tfmlreg import commands
from tfmlreg.cli import main
from tfmlreg.data import io
from tfmlreg.export import export_saved_model

GRID = (16, 16, 16)
PHANTOM = ("--shape", "48", "48", "48")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def phantoms(workspace):
    out = workspace / "phantoms"
    assert main(["phantom", "--out", str(out), "--cases", "2", *PHANTOM, "--seed", "5"]) == 0
    return out


@pytest.fixture(scope="module")
def saved_model(workspace):
    model = registration_model(GRID, levels=2, base_filters=4, depth=2)
    model.save(workspace / "tiny.keras")
    return export_saved_model(model, str(workspace / "tiny"), version=1)


def run_error(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def test_phantom_writes_the_pair_layout(phantoms):
    cases = io.list_pairs(str(phantoms))
    assert len(cases) == 2
    assert sorted(os.listdir(cases[0])) == sorted(io.PAIR_FILES.values())


def test_register_writes_full_resolution_outputs(phantoms, saved_model, workspace, capsys):
    case = io.list_pairs(str(phantoms))[0]
    out = workspace / "registered"
    argv = ["register", "--fixed", f"{case}/fixed.nii.gz", "--moving", f"{case}/moving.nii.gz",
            "--model", saved_model, "--out", str(out),
            "--fixed-labels", f"{case}/fixed_labels.nii.gz", "--moving-labels", f"{case}/moving_labels.nii.gz",
            "--fixed-landmarks", f"{case}/fixed_landmarks.txt",
            "--moving-landmarks", f"{case}/moving_landmarks.txt"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert sorted(os.listdir(out)) == ["displacement.nii.gz", "jacobian_determinant.nii.gz",
                                       "metrics.json", "overlay.png", "overlay.svg",
                                       "warped.nii.gz"]
    field = nib.load(out / "displacement.nii.gz")
    assert field.shape == (48, 48, 48, 1, 3)
    np.testing.assert_allclose(io.read_image(str(out / "warped.nii.gz"))[1],
                               io.read_image(f"{case}/fixed.nii.gz")[1])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == printed
    initial = np.linalg.norm(io.read_landmarks(f"{case}/fixed_landmarks.txt", field.header.get_zooms()[:3])
                             - io.read_landmarks(f"{case}/moving_landmarks.txt", field.header.get_zooms()[:3]),
                             axis=1).mean()
    assert metrics["initial"]["tre_mean"] == pytest.approx(initial, rel=1e-4)
    assert set(metrics["registered"]) >= {"tre_mean", "tre_snapped_mean", "dice_mean", "folding", "seconds"}
    # the time of each part: the model was loaded, the network ran, the outputs (the figure
    # included) were written
    parts = {key: metrics["registered"][key] for key in commands.PART_TIMES}
    assert parts["seconds_loading"] > 0 and parts["seconds_network"] > 0
    assert parts["seconds_outputs"] > 0 and parts["seconds_refinement"] >= 0
    assert f"outputs {parts['seconds_outputs']:.2f} s" in captured.err


def test_register_without_figures_writes_everything_else(phantoms, saved_model, workspace, capsys):
    case = io.list_pairs(str(phantoms))[0]
    out = workspace / "no_figures"
    assert main(["register", "--fixed", f"{case}/fixed.nii.gz", "--moving", f"{case}/moving.nii.gz",
                 "--model", saved_model, "--out", str(out), "--no-refine", "--no-figures"]) == 0
    assert sorted(os.listdir(out)) == ["displacement.nii.gz", "jacobian_determinant.nii.gz",
                                       "metrics.json", "warped.nii.gz"]
    both_ways = workspace / "symmetric"
    assert main(["register", "--fixed", f"{case}/fixed.nii.gz", "--moving", f"{case}/moving.nii.gz",
                 "--model", saved_model, "--out", str(both_ways), "--no-refine", "--no-figures",
                 "--symmetric"]) == 0
    one_way, symmetric = (nib.load(str(folder / "displacement.nii.gz")).get_fdata()
                          for folder in (out, both_ways))
    assert np.all(np.isfinite(symmetric)) and np.abs(symmetric - one_way).max() > 1e-3


def test_demo_reports_metrics_and_writes_outputs(saved_model, workspace, capsys):
    out = workspace / "demo"
    assert main(["demo", "--model", saved_model, "--out", str(out), *PHANTOM]) == 0
    printed = capsys.readouterr().out
    assert "TRE mean (mm)" in printed and "lobe Dice mean" in printed
    assert {"warped.nii.gz", "displacement.nii.gz", "overlay.png", "metrics.json"} <= set(os.listdir(out))


def test_train_evaluate_and_export(phantoms, workspace, capsys):
    config = workspace / "tiny.json"
    config.write_text(json.dumps({
        "data": {"train": str(phantoms)},
        "model": {"shape": list(GRID), "levels": 2, "base_filters": 4, "depth": 2},
        "training": {"epochs_per_level": 1},
        "output": str(workspace / "run"),
    }))
    assert main(["train", str(config), "--quiet"]) == 0
    run = workspace / "run"
    assert (run / "model.keras").exists() and (run / "saved_model" / "1" / "saved_model.pb").exists()
    assert len((run / "training_log.csv").read_text().splitlines()) == 3  # header + 2 stages
    evaluated = workspace / "evaluated"
    assert main(["evaluate", "--model", str(run / "saved_model"), "--data", str(phantoms),
                 "--out", str(evaluated)]) == 0
    assert {"metrics.csv", "results.md", "dice_boxplot.png"} <= set(os.listdir(evaluated))
    # per case: initial, the network alone, network + refinement
    assert len((evaluated / "metrics.csv").read_text().splitlines()) == 1 + 2 * 3
    assert main(["export", "--model", str(run / "model.keras"), "--out", str(workspace / "exp"),
                 "--version", "3"]) == 0
    assert (workspace / "exp" / "3" / "saved_model.pb").exists()
    assert main(["export", "--model", str(run / "model.keras"), "--out",
                 str(workspace / "onnx" / "m.onnx"), "--format", "onnx"]) == 0
    assert (workspace / "onnx" / "m.onnx").exists()
    capsys.readouterr()
    code = main(["export", "--model", str(run / "model.keras"), "--out", str(workspace / "trt"),
                 "--format", "tf-trt"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "TF-TRT is not in this TensorFlow build" in err and "\n" not in err
    assert not (workspace / "trt").exists()


def write_nifti(path, data, spacing=(2.0, 2.0, 2.0)):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.diag(list(spacing) + [1.0])), path)


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("two_d", "expected a 3-D image"),
    ("nan", "NaN"),
    ("corrupt", "cannot read as NIfTI"),
])
def test_register_bad_input_exits_2_with_one_line_and_no_output(case, message, saved_model,
                                                                 workspace, capsys):
    bad = workspace / f"bad_{case}.nii.gz"
    if case == "two_d":
        write_nifti(bad, np.zeros((8, 8)))
    elif case == "nan":
        write_nifti(bad, np.full((8, 8, 8), np.nan))
    elif case == "corrupt":
        bad.write_bytes(b"\x1f\x8b garbage")
    good = workspace / "good.nii.gz"
    write_nifti(good, np.zeros((8, 8, 8)))
    out = workspace / f"out_{case}"
    code, err = run_error(["register", "--fixed", str(bad), "--moving", str(good), "--model",
                           saved_model, "--out", str(out)], capsys)
    assert code == 2
    assert err.startswith("tfmlreg: error:") and message in err and "\n" not in err
    assert str(bad) in err
    assert not out.exists()


def test_zero_spacing_and_unusable_model_shape_exit_2(workspace, phantoms, capsys):
    header = nib.Nifti1Header()
    header.set_data_shape((8, 8, 8))
    header.set_data_dtype(np.float32)
    header["sform_code"], header["qform_code"] = 1, 0
    header["srow_x"], header["srow_y"], header["srow_z"] = [0, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0]
    flat = workspace / "flat.nii.gz"
    nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), None, header=header).to_filename(flat)
    code, err = run_error(["register", "--fixed", str(flat), "--moving", str(flat), "--out",
                           str(workspace / "never")], capsys)
    assert code == 2 and "spacing" in err and not (workspace / "never").exists()
    config = workspace / "bad_shape.json"
    config.write_text(json.dumps({"data": {"train": str(phantoms)}, "output": str(workspace / "x"),
                                  "model": {"shape": [40, 40, 40], "levels": 3}}))
    code, err = run_error(["train", str(config)], capsys)
    assert code == 2 and "multiple of 16" in err and not (workspace / "x").exists()


def test_console_script_is_installed_and_documents_every_command():
    executable = shutil.which("tfmlreg") or pytest.fail("the tfmlreg console script is not on PATH")
    result = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("demo", "register", "train", "evaluate", "phantom", "export"):
        assert command in result.stdout
    result = subprocess.run([executable, "register"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2


def test_shipped_demo_model_registers_the_demo_pair(tmp_path):
    """The README's `tfmlreg demo` with the default model (tfmlreg/models/chest_ct): TRE ≤ 30% of the
    initial, folding < 0.5% (issue 8's bar)."""
    out = tmp_path / "tfmlreg-demo"
    assert main(["demo", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["registered"]["tre_mean"] <= 0.3 * metrics["initial"]["tre_mean"]
    assert metrics["registered"]["folding"] < 0.005
    assert metrics["registered"]["dice_mean"] > metrics["initial"]["dice_mean"]


def test_refinement_help_states_the_refine_config_defaults():
    """The CLI states the defaults as text (it parses without importing TensorFlow): they must
    be RefineConfig's."""
    import argparse
    import re

    from tfmlreg.cli import add_refine_options
    from tfmlreg.refinement import RefineConfig

    parser = argparse.ArgumentParser()
    add_refine_options(parser)
    helps = {action.dest: action.help for action in parser._actions if action.help}
    config = RefineConfig()
    for dest, field in [("refine_iterations", "iterations"), ("refine_spacing", "finest_spacing_mm"),
                        ("alpha", "alpha"), ("folding", "folding"), ("epsilon", "epsilon")]:
        stated = float(re.search(r"default ([0-9.]+)", helps[dest]).group(1))
        assert stated == float(getattr(config, field)), dest
