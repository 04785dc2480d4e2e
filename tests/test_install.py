"""The shipped model is package data: found by tfmlreg.models, and inside a built wheel."""

import configparser
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from tfmlreg import models
from tfmlreg.cli import main

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO_FILES = {"model.keras", "1/saved_model.pb", "1/fingerprint.pb",
              "1/variables/variables.index", "1/variables/variables.data-00000-of-00001",
              "1/assets.extra/tf_serving_warmup_requests"}


def files_under(folder):
    return {path.relative_to(folder).as_posix() for path in pathlib.Path(folder).rglob("*")
            if path.is_file() and "__pycache__" not in path.parts}


def test_shipped_demo_is_a_model_root_inside_the_package(monkeypatch):
    monkeypatch.delenv(models.MODEL_VARIABLE, raising=False)
    root = models.shipped("demo")
    assert pathlib.Path(root).parent == pathlib.Path(models.__file__).parent
    assert DEMO_FILES <= files_under(root)
    assert models.default_model() == root
    monkeypatch.setenv(models.MODEL_VARIABLE, "/elsewhere/model.keras")
    assert models.default_model() == "/elsewhere/model.keras"
    with pytest.raises(FileNotFoundError, match="'nope': not shipped with tfmlreg .shipped: demo"):
        models.shipped("nope")


def test_package_data_lists_every_file_of_the_shipped_model():
    """setup.cfg's patterns match every file of tfmlreg/models/demo (a new file in a re-export,
    e.g. an assets/ folder, would otherwise be missing from a non-editable install)."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    patterns = config["options.package_data"]["tfmlreg.models"].split()
    package = REPO / "tfmlreg" / "models"
    matched = {path.relative_to(package / "demo").as_posix()
               for pattern in patterns for path in package.glob(pattern) if path.is_file()}
    assert matched == files_under(package / "demo")


def test_a_built_wheel_holds_the_shipped_model(tmp_path):
    """The wheel a plain ``pip install .`` installs (built from a copy: no build/ in the
    checkout) contains the model next to the module that finds it."""
    source = tmp_path / "src"
    shutil.copytree(REPO / "tfmlreg", source / "tfmlreg",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("tfmlreg-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"tfmlreg/models/demo/{name}" for name in DEMO_FILES} <= names
    assert "tfmlreg/models/__init__.py" in names


def test_library_argument_names_reach_the_user_as_flags(tmp_path, capsys):
    """io names the argument (dirlab_case); the command reports its flag (--dirlab-case)."""
    image = tmp_path / "case1_T00.img"
    image.write_bytes(b"\0" * 1000)
    common = ["register", "--fixed", str(image), "--moving", str(image)]
    assert main(common + ["--out", str(tmp_path / "a")]) == 2
    assert "a DIR-LAB .img needs --dirlab-case 1-10" in capsys.readouterr().err
    assert main(common + ["--dirlab-case", "11", "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.strip() == "tfmlreg: error: --dirlab-case: expected 1-10, got 11"
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


@pytest.mark.parametrize("option", [["--model-name", "demo"], ["--shape", "64", "64", "64"]])
def test_server_options_without_server_exit_2(tmp_path, capsys, option):
    image = tmp_path / "f.nii.gz"
    assert main(["register", "--fixed", str(image), "--moving", str(image),
                 "--out", str(tmp_path / "o"), *option]) == 2
    assert capsys.readouterr().err.strip() == (f"tfmlreg: error: {option[0]}: only with --server "
                                               "(a local model knows its grid and needs no name)")
