"""README.md as written: its Python blocks run, in order, in one namespace; its commands parse.

The Python blocks run in an empty folder that holds what the README says is there: two scans
``exhale.nii.gz`` and ``inhale.nii.gz`` (a phantom pair written as NIfTI). The shell blocks are
checked against the CLI's parser (every ``tfmlreg`` line), the JSON block against the config
reader; running them would be the slow tests in tests/test_cli.py.
"""

import json
import pathlib
import re
import shlex

import numpy as np
import pytest

from tfmlreg import cli, experiment
from tfmlreg.data import io, phantom

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.slow  # trains a tiny model and registers a 64³ pair: ~1 min on 2 cores


def blocks(language):
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def command_lines(block):
    """The ``tfmlreg ...`` commands of a shell block, continuation lines joined, comments cut."""
    joined = block.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines()
            if line.strip().startswith("tfmlreg ")]


@pytest.fixture
def scans(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    case = phantom.as_case(phantom.make_pair(shape=(64, 64, 64), seed=1000), "p")
    io.write_image("exhale.nii.gz", case["fixed"], case["spacing_fixed"])
    io.write_image("inhale.nii.gz", case["moving"], case["spacing_moving"])
    return case


def test_python_blocks_run_as_written(scans):
    code = blocks("python")
    assert len(code) >= 4  # Keras API, geometry, your own scans, refinement
    scope = {"__name__": "readme"}
    for number, block in enumerate(code, 1):
        exec(compile(block, f"README.md python block {number}", "exec"), scope)

    assert scope["out"]["displacement"].shape == (1, 32, 32, 32, 3)
    assert scope["fine"].shape == (1, 64, 64, 64, 3)
    assert float(np.mean(scope["errors"])) < 0.5  # the true field's TRE: interpolation only
    # the README's registration of the two files: the cranio-caudal motion found and written
    u = scope["u"]
    assert np.abs(u[..., 2]).max() > 5.0
    lungs = scans["fixed_labels"] > 0
    truth = scans["displacement"][lungs]  # the phantom's exact field
    error = np.linalg.norm(u[lungs] - truth, axis=-1).mean()
    assert error < 0.25 * np.linalg.norm(truth, axis=-1).mean(), error
    written, spacing = io.read_displacement("displacement.nii.gz")
    np.testing.assert_allclose(written, u, atol=1e-4)
    np.testing.assert_allclose(spacing, scans["spacing_fixed"], rtol=1e-6)
    assert scope["result"]["displacement"].shape == u.shape


def test_commands_and_config_are_accepted(tmp_path):
    lines = [line for block in blocks("bash") for line in command_lines(block)]
    assert any(line[:2] == ["tfmlreg", "register"] for line in lines)
    assert any(line[:2] == ["tfmlreg", "train"] for line in lines)
    parser = cli.build_parser()
    for line in lines:
        parser.parse_args(line[1:])  # an unknown command or flag exits (SystemExit fails the test)

    (config_text,) = blocks("json")
    config = json.loads(config_text)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(config))
    checked = experiment.load_config(str(path))  # every key known, every type checked
    assert checked["model"]["shape"] == [64, 64, 64]
