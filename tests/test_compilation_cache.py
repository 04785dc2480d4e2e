"""The tfmlreg command's persistent XLA cache: where it goes, when it is off, and that executables
loaded from it give the same registration as freshly compiled ones."""

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from tfmlreg import compilation_cache as cache
from tfmlreg.data import phantom

FLAG = cache.FLAG


def test_flag_is_added_once_and_other_flags_are_kept():
    assert cache.with_cache_flag("", "/c") == f"{FLAG}=/c"
    assert cache.with_cache_flag(" --tf_xla_auto_jit=2 ", "/c") == f"--tf_xla_auto_jit=2 {FLAG}=/c"
    assert cache.with_cache_flag(f"{FLAG}=/mine", "/c") == f"{FLAG}=/mine"


def test_enable_uses_the_variable_the_default_or_nothing(tmp_path):
    chosen = {cache.CACHE_VARIABLE: str(tmp_path / "chosen")}
    assert cache.enable(chosen) == str(tmp_path / "chosen") and (tmp_path / "chosen").is_dir()
    assert chosen["TF_XLA_FLAGS"] == f"{FLAG}={tmp_path / 'chosen'}"

    default = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    directory = cache.enable(default)
    assert directory == str(tmp_path / "xdg" / "tfmlreg" / "xla" / cache.machine_fingerprint())

    for environ in ({cache.CACHE_VARIABLE: "off"}, {cache.CACHE_VARIABLE: "0"},
                    {"TF_XLA_FLAGS": f"{FLAG}=/theirs"}):
        before = dict(environ)
        assert cache.enable(environ) is None and environ == before

    (tmp_path / "a_file").write_text("")
    unusable = {cache.CACHE_VARIABLE: str(tmp_path / "a_file" / "cache")}
    assert cache.enable(unusable) is None and "TF_XLA_FLAGS" not in unusable


def test_fingerprint_is_stable_and_short():
    assert cache.machine_fingerprint() == cache.machine_fingerprint()
    assert len(cache.machine_fingerprint()) == 16


@pytest.mark.slow
def test_cached_executables_give_the_same_registration_quietly(tmp_path):
    """Two `tfmlreg register` runs of one pair (refinement from zero, compiled XLA steps): the first
    fills the cache, the second loads from it, prints no log lines, and writes the same field."""
    pair = phantom.make_pair(shape=(64, 64, 64), seed=3)
    paths = {}
    for side in ("fixed", "moving"):
        paths[side] = tmp_path / f"{side}.nii.gz"
        nib.save(nib.Nifti1Image(pair[side].astype(np.float32), np.diag([*pair["spacing"], 1.0])),
                 paths[side])
    environ = dict(os.environ, **{cache.CACHE_VARIABLE: str(tmp_path / "xla")})
    environ.pop("TF_XLA_FLAGS", None)
    environ["TF_CPP_MIN_LOG_LEVEL"] = "1"  # a user's own level does not bring the log lines back
    fields = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        done = subprocess.run(
            [sys.executable, "-m", "tfmlreg.cli", "register", "--fixed", str(paths["fixed"]),
             "--moving", str(paths["moving"]), "--out", str(out), "--model", "none",
             "--refine-iterations", "5"],
            capture_output=True, text=True, env=environ, timeout=300)
        assert done.returncode == 0, done.stderr
        if run == 0:
            assert os.listdir(tmp_path / "xla"), "nothing was cached"
        else:
            assert done.stderr.strip().startswith("model loading") and "\n" not in done.stderr.strip(), \
                done.stderr  # the command's own timing line, no C++ log lines
        fields.append(np.asarray(nib.load(out / "displacement.nii.gz").dataobj))
    np.testing.assert_array_equal(fields[0], fields[1])
