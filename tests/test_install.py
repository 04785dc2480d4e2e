"""The shipped models are package data: found by tfmlreg.models, and inside a built wheel."""

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
SHIPPED = ("chest_ct", "demo")
MODEL_FILES = {"model.keras", "1/saved_model.pb", "1/fingerprint.pb",
              "1/variables/variables.index", "1/variables/variables.data-00000-of-00001",
              "1/assets.extra/tf_serving_warmup_requests"}


def files_under(folder):
    return {path.relative_to(folder).as_posix() for path in pathlib.Path(folder).rglob("*")
            if path.is_file() and "__pycache__" not in path.parts}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_is_a_model_root_inside_the_package(name):
    root = models.shipped(name)
    assert pathlib.Path(root).parent == pathlib.Path(models.__file__).parent
    assert MODEL_FILES <= files_under(root)


def test_the_default_model_is_the_chest_ct_one_unless_the_variable_says(monkeypatch):
    monkeypatch.delenv(models.MODEL_VARIABLE, raising=False)
    assert models.default_model() == models.shipped("chest_ct")
    monkeypatch.setenv(models.MODEL_VARIABLE, "/elsewhere/model.keras")
    assert models.default_model() == "/elsewhere/model.keras"
    with pytest.raises(FileNotFoundError,
                       match="'nope': not shipped with tfmlreg .shipped: chest_ct, demo"):
        models.shipped("nope")


def test_package_data_lists_every_file_of_the_shipped_models():
    """setup.cfg's patterns match every file of each shipped model (a new file in a re-export,
    e.g. an assets/ folder, would otherwise be missing from a non-editable install)."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    patterns = config["options.package_data"]["tfmlreg.models"].split()
    package = REPO / "tfmlreg" / "models"
    matched = {path.relative_to(package).as_posix()
               for pattern in patterns for path in package.glob(pattern) if path.is_file()}
    assert matched == {f"{name}/{file}" for name in SHIPPED
                       for file in files_under(package / name)}


def test_a_built_wheel_holds_the_shipped_models(tmp_path):
    """The wheel a plain ``pip install .`` installs (built from a copy: no build/ in the
    checkout) contains the models next to the module that finds them."""
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
    assert {f"tfmlreg/models/{model}/{name}" for model in SHIPPED for name in MODEL_FILES} <= names
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
