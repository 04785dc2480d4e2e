"""Experiment configs: every key known, every type checked, one line naming the key (issue 13)."""

import glob
import json
import os

import numpy as np
import pytest

from tfmlreg import experiment
from tfmlreg.cli import main
from tfmlreg.data.io import DataError

TRAINING_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "training")


def minimal():
    return {"data": {"train": {"phantom": {"cases": 2, "shape": [48, 48, 48]}}},
            "model": {"shape": [16, 16, 16], "levels": 2, "base_filters": 4, "depth": 2},
            "training": {"epochs_per_level": 1},
            "output": "run"}


def write(tmp_path, config):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


def load_error(tmp_path, config):
    with pytest.raises(DataError) as raised:
        experiment.load_config(write(tmp_path, config))
    message = str(raised.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "config.json") + ": ")
    return message


def edited(path, value):
    """``minimal()`` with the dotted ``path`` set to ``value``."""
    config = minimal()
    *parents, key = path.split(".")
    section = config
    for name in parents:
        section = section[name]
    section[key] = value
    return config


@pytest.mark.parametrize("path, value, message", [
    ("training.epochs_per_levle", 3,
     "training: unknown key 'epochs_per_levle' (did you mean 'epochs_per_level'?)"),
    ("modle", {}, "the config: unknown key 'modle' (did you mean 'model'?)"),
    ("model.base_filter", 8, "model: unknown key 'base_filter' (did you mean 'base_filters'?)"),
    ("data.train.phantom.case", 2, "data.train.phantom: unknown key 'case' (did you mean 'cases'?)"),
    ("training.zzz", 1, "training: unknown key 'zzz' (known: augment, batch_size, epochs_per_level"),
])
def test_unknown_keys_are_named_with_the_nearest_known_one(tmp_path, path, value, message):
    assert message in load_error(tmp_path, edited(path, value))


@pytest.mark.parametrize("path, value, message", [
    ("model.shape", 32, "model.shape: expected 3 positive integers [D, H, W], got 32"),
    ("model.shape", [32, 32], "model.shape: expected 3 positive integers [D, H, W], got [32, 32]"),
    ("model.levels", "3", 'model.levels: expected an integer >= 1, got "3"'),
    ("model.levels", True, "model.levels: expected an integer >= 1, got true"),
    ("model.alpha", -1.0, "model.alpha: expected a number >= 0, got -1.0"),
    ("training.learning_rate", "fast", 'training.learning_rate: expected a number > 0, got "fast"'),
    ("training.init", "he", "training.init: expected one of 'pretrained', 'xavier', 'keep', got \"he\""),
    ("training.initial_model", "m.keras",
     "training.init: expected \"keep\" with training.initial_model (fine-tuning keeps every level's "
     "loaded weights), got 'pretrained'"),
    ("training.masks", "yes", 'training.masks: expected true or false, got "yes"'),
    ("training.epochs_per_level", [1, 2, 3],
     "training.epochs_per_level: expected 2 values (one per level, coarsest first), got 3"),
    ("training.steps_per_epoch", 0, "training.steps_per_epoch: expected an integer >= 1, got 0"),
    ("data.train", 5, "data.train: expected a JSON object, got 5"),
    ("data.train", {"dir": "x"},
     "data.train: expected a folder of pairs, or an object with 'phantom' and/or 'scans'"),
    ("data.train", {"scans": {"spacing_mm": 2.0}}, "data.train.scans: the key 'files' is missing"),
    ("data.train", {"scans": {"files": "a.nii.gz"}},
     'data.train.scans.files: expected a non-empty list of file paths, got "a.nii.gz"'),
    ("training.geometric", {"flip": True},
     "training.geometric: unknown key 'flip' (did you mean 'flips'?)"),
    ("training.geometric", {"crop_fraction": 2.0},
     "training.geometric.crop_fraction: expected a number in [0.05, 1.0], got 2.0"),
    ("training.motion", {"pure_shift": -0.5},
     "training.motion.pure_shift: expected a number in [0, 1], got -0.5"),
    ("training.motion", {"anatomy_mm": -1},
     "training.motion.anatomy_mm: expected a number >= 0, got -1"),
    ("output", ["a"], 'output: expected a string, got ["a"]'),
    ("model.shape", [30, 30, 30],  # the model's own check
     "model: shape: every spatial size must be a positive multiple of 4"),  # the model's own check
])
def test_wrong_types_and_values_give_one_line_naming_the_key(tmp_path, path, value, message):
    assert message in load_error(tmp_path, edited(path, value))


def test_required_sections(tmp_path):
    config = minimal()
    del config["model"]
    assert "the config: the key 'model' is missing" in load_error(tmp_path, config)


def test_defaults_are_filled_in_and_paths_made_absolute(tmp_path):
    config = experiment.load_config(write(tmp_path, minimal()))
    assert config["output"] == str(tmp_path / "run")
    assert config["training"]["learning_rate"] == 1e-3 and config["training"]["init"] == "pretrained"
    assert config["model"]["convs_per_block"] == 2 and config["model"]["intensity_window"] == [-1000.0, 200.0]


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(TRAINING_DIR, "*.json"))))
def test_shipped_configs_are_valid(path):
    config = experiment.load_config(path)
    assert config["model"]["shape"] and os.path.isabs(config["output"])


CROP = os.path.join(os.path.dirname(__file__), "data", "ct_crop.nii.gz")


def scan_config(files):
    """A tiny run on real-CT scans with synthetic breathing and every geometric augmentation."""
    config = minimal()
    config["data"]["train"] = {"scans": {"files": files, "spacing_mm": 3.0, "draws_per_epoch": 2}}
    config["model"]["shape"] = [32, 32, 32]
    config["training"].update(augment=True, steps_per_epoch=2, geometric={
        "flips": True, "permutations": True, "swaps": True, "shift_mm": 4.0, "crop_fraction": 0.8},
        motion={"amplitude_mm": 15.0, "pure_shift": 0.5})
    return config


def test_scan_sources_get_defaults_and_absolute_paths(tmp_path):
    config = experiment.load_config(write(tmp_path, scan_config(["ct.nii.gz"])))
    scans = config["data"]["train"]["scans"]
    assert scans["files"] == [str(tmp_path / "ct.nii.gz")]
    assert scans["spacing_mm"] == 3.0 and scans["crop_body_mm"] == 10.0 and scans["draws_per_epoch"] == 2


def test_a_missing_scan_is_one_line_and_writes_nothing(tmp_path, capsys):
    assert main(["train", write(tmp_path, scan_config(["missing.nii.gz"]))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"data.train.scans.files: {tmp_path / 'missing.nii.gz'}: no such file")
    assert "\n" not in err and sorted(os.listdir(tmp_path)) == ["config.json"]


def test_training_on_scans_with_synthetic_breathing_runs_from_a_config(tmp_path):
    config = experiment.load_config(write(tmp_path, scan_config([CROP])))
    data = experiment.dataset(config["data"]["train"], config["output"], "train",
                              experiment.build_model(config["model"]), config["training"], True)
    first, second = [next(iter(data)) for _ in range(2)]  # a new pair per draw and epoch
    assert first["fixed"].shape == (1, 32, 32, 32, 1) and first["fixed_mask"].shape[-1] == 5
    assert not np.allclose(first["moving"], second["moving"])
    model, histories = experiment.run(config, verbose=0)
    assert sorted(histories) == [1, 2] and all(np.isfinite(h.history["loss"]).all()
                                               for h in histories.values())
    with open(experiment.paths(config)["log"]) as handle:
        assert len(handle.read().strip().splitlines()) == 1 + 2  # header, one row per stage


def test_config_changes_say_what_changed():
    before = {"description": "a", "model": {"levels": 2}, "training": {"epochs_per_level": 1}}
    after = {"description": "b", "model": {"levels": 2, "alpha": 2.0},
             "training": {"epochs_per_level": [1, 2]}}
    assert experiment.config_changes(before, after) == [
        "model.alpha: (unset) -> 2.0", "training.epochs_per_level: 1 -> [1, 2]"]
    assert experiment.config_changes(before, before) == []


def test_cli_config_error_is_one_line_and_writes_nothing(tmp_path, capsys):
    path = write(tmp_path, edited("training.epochs_per_levle", 3))
    assert main(["train", path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tfmlreg: error: {path}: training: unknown key") and "\n" not in err
    assert sorted(os.listdir(tmp_path)) == ["config.json"]


def test_cli_missing_data_folder_writes_nothing(tmp_path, capsys):
    config = minimal()
    config["data"]["train"] = "no_such_folder"
    assert main(["train", write(tmp_path, config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no_such_folder: no such folder" in err and "\n" not in err
    assert sorted(os.listdir(tmp_path)) == ["config.json"]
