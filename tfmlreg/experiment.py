"""Training experiments from a JSON config: data, model, staged fit, export.

A config (see ``training/*.json``) has four parts; paths are relative to the config file::

    {
      "data":  {"train": "DIR" | {"phantom": {...}}, "validation": ... (optional)},
      "model": {"shape": [64, 64, 64], "levels": 3, "base_filters": 8, "alpha": ..., ...},
      "training": {"epochs_per_level": 4, "init": "pretrained", "learning_rate": 1e-3,
                   "batch_size": 1, "steps_per_epoch": null},
      "output": "runs/NAME"
    }

``{"phantom": {"cases": N, "shape": [...], "seed": S}, "dir": "DIR"}`` generates phantom pairs
once into ``DIR`` (default ``OUTPUT/data/<split>``) and reuses them when they exist, so a
resumed run, or several arms sharing ``DIR``, see the same data. The run writes
``OUTPUT/checkpoints/`` (one per finished level: rerunning resumes), ``OUTPUT/training_log.csv``,
``OUTPUT/model.keras`` and the SavedModel ``OUTPUT/saved_model/1``.
"""

import json
import os
import shutil

import keras

from tfmlreg.data import phantom, pipeline
from tfmlreg.data.io import DataError
from tfmlreg.model import MultilevelRegistration
from tfmlreg.training import fit_progressive

MODEL_KEYS = ("shape", "levels", "base_filters", "depth", "convs_per_block", "intensity_window",
              "alpha", "beta", "epsilon", "batchnorm_momentum")
TRAINING_DEFAULTS = {"epochs_per_level": 4, "init": "pretrained", "learning_rate": 1e-3,
                     "batch_size": 1, "steps_per_epoch": None, "masks": True, "augment": False}


def load_config(path):
    """The config as a dict with absolute paths; a one-line DataError for unreadable files."""
    try:
        with open(path) as handle:
            config = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: cannot read the config ({error})") from None
    for key in ("data", "model", "output"):
        if key not in config:
            raise DataError(f"{path}: the config has no '{key}' section")
    base = os.path.dirname(os.path.abspath(path))
    config["output"] = os.path.join(base, config["output"])
    config["data"] = {split: _absolute(source, base) for split, source in config["data"].items()}
    config["training"] = {**TRAINING_DEFAULTS, **config.get("training", {})}
    return config


def _absolute(source, base):
    if not isinstance(source, dict):
        return os.path.join(base, source)
    if "dir" in source:
        return {**source, "dir": os.path.join(base, source["dir"])}
    return source


def build_model(model_config):
    unknown = set(model_config) - set(MODEL_KEYS)
    if unknown:
        raise ValueError(f"model config: unknown keys {sorted(unknown)}; expected {MODEL_KEYS}")
    return MultilevelRegistration(**model_config)


def data_dir(source, output, split):
    """A folder of pairs: the given one, or phantoms generated into ``output/data/split`` once."""
    if not isinstance(source, dict):
        return source
    target = source.get("dir", os.path.join(output, "data", split))
    if not os.path.isdir(target):
        partial = f"{target}.partial"  # renamed only when complete: no half data set is reused
        shutil.rmtree(partial, ignore_errors=True)
        phantom.write_dataset(partial, **source["phantom"])
        os.replace(partial, target)
    return target


def dataset(source, output, split, model, training, shuffle):
    return pipeline.make_dataset(
        data_dir(source, output, split), shape=model.shape, batch_size=training["batch_size"],
        masks=training["masks"], shuffle=shuffle, augment=training["augment"] and shuffle,
    )


def run(config, verbose="auto"):
    """Train as the config says; returns the trained model and ``{level: History}``."""
    output, training = config["output"], config["training"]
    model = build_model(config["model"])  # a bad config fails here, before anything is written
    os.makedirs(output, exist_ok=True)
    train = dataset(config["data"]["train"], output, "train", model, training, shuffle=True)
    validation = None
    if "validation" in config["data"]:
        validation = dataset(config["data"]["validation"], output, "validation", model, training,
                             shuffle=False)
    log = keras.callbacks.CSVLogger(os.path.join(output, "training_log.csv"), append=True)
    histories = fit_progressive(
        model, train, training["epochs_per_level"], init=training["init"],
        validation_data=validation, learning_rate=training["learning_rate"],
        checkpoint_dir=os.path.join(output, "checkpoints"), callbacks=[log],
        steps_per_epoch=training["steps_per_epoch"], verbose=verbose,
    )
    model.save(os.path.join(output, "model.keras"))
    return model, histories
