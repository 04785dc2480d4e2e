"""Training experiments from a JSON config: data, model, staged fit, export.

A config (see ``training/*.json``) has these parts; paths are relative to the config file::

    {
      "description": "free text (optional)",
      "data":  {"train": "DIR" | {"phantom": {...}, "dir": "DIR", "scans": {...}},
                "validation": ... (optional)},
      "model": {"shape": [64, 64, 64], "levels": 3, "base_filters": 8, "alpha": ..., ...},
      "training": {"epochs_per_level": 4, "init": "pretrained", "learning_rate": 1e-3,
                   "batch_size": 1, "steps_per_epoch": null, "masks": true, "augment": false,
                   "geometric": {...}, "motion": {...}},
      "output": "runs/NAME"
    }

Every key is known and every value's type checked when the config is read (:data:`SCHEMA`): a
misspelt key is an error naming the nearest known one, never silently a default.

``{"phantom": {"cases": N, "shape": [...], "seed": S, "spacing": [...], "amplitude_mm": A},
"dir": "DIR"}`` generates phantom pairs once into ``DIR`` (default ``OUTPUT/data/<split>``) and
reuses them when they exist (with the same phantom settings, recorded in ``DIR/phantoms.json``),
so a resumed run, or several arms sharing ``DIR``, see the same data.

``"scans": {"files": [CT, ...], "spacing_mm": 2.5, "crop_body_mm": 10, "draws_per_epoch": 1}``
adds real chest CTs (any format :func:`tfmlreg.data.io.read_image` reads), each read into RAS+,
resampled to ``spacing_mm``, cropped to the body plus ``crop_body_mm`` and drawn
``draws_per_epoch`` times per epoch, every draw a new synthetic breathing pair with exact ground
truth (:mod:`tfmlreg.data.synthetic`) whose motion ``training.motion`` sets (the fields of
:class:`~tfmlreg.data.synthetic.RandomMotion`). ``training.geometric`` (the options of
:func:`tfmlreg.data.pipeline.augment_geometry`: ``flips``, ``permutations``, ``swaps``,
``shift_mm``, ``crop_fraction``) augments the training pairs, phantoms included, with their
ground truth; validation data are never augmented. ``training.initial_model`` (a ``.keras``
file of the same architecture, with ``"init": "keep"``) fine-tunes a trained model: every level
starts from its weights.

The run writes ``OUTPUT/run.json`` (the config it was started with), ``OUTPUT/checkpoints/``
(per finished stage, and the state of the stage in progress after each epoch),
``OUTPUT/training_log.csv`` (one row per level and epoch), ``OUTPUT/model.keras`` and the
SavedModel ``OUTPUT/saved_model/1``. Rerunning the same config resumes where the last run
stopped (a kill costs at most the epoch in progress) or, on a finished run, does nothing; a
config that differs from ``run.json`` is refused with the differences, unless ``restart``
discards the run. One run at a time holds an output (a lock, see :mod:`tfmlreg.output`).
"""

import difflib
import inspect
import json
import os
import shutil

from tfmlreg import output as outputs
from tfmlreg.data import io, phantom, pipeline
from tfmlreg.data.io import DataError
from tfmlreg.model import MultilevelRegistration
from tfmlreg.training import INITS, StageCSVLogger, fit_progressive

RUN_RECORD = "run.json"
PHANTOM_RECORD = "phantoms.json"
NOT_COMPARED = ("description",)  # keys a rerun may change freely
# model keys added since the first records, with the value every earlier run had
LEGACY_MODEL_DEFAULTS = {"normalization": "batch"}


# --- value checks: each returns the value or raises _Invalid(what was expected) -------------------


class _Invalid(Exception):
    pass


def _integer(low):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise _Invalid(f"an integer >= {low}")
        return value
    return check


def _number(low=None, high=None, positive=False):
    def check(value):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
        ok = ok and (low is None or value >= low) and (high is None or value <= high)
        if not ok or (positive and value <= 0):
            bounds = "> 0" if positive else (f"in [{low}, {high}]" if high is not None else f">= {low}")
            raise _Invalid(f"a number {bounds}" if low is not None or positive else "a number")
        return value
    return check


def _boolean(value):
    if not isinstance(value, bool):
        raise _Invalid("true or false")
    return value


def _text(value):
    if not isinstance(value, str):
        raise _Invalid("a string")
    return value


def _choice(options):
    def check(value):
        if value not in options:
            raise _Invalid("one of " + ", ".join(repr(option) for option in options))
        return value
    return check


def _list(item, count, what):
    def check(value):
        if not isinstance(value, list) or len(value) != count:
            raise _Invalid(what)
        try:
            return [item(entry) for entry in value]
        except _Invalid:
            raise _Invalid(what) from None
    return check


def _optional(check):
    return lambda value: None if value is None else check(value)


def _either(first, second, what):
    def check(value):
        for candidate in (first, second):
            try:
                return candidate(value)
            except _Invalid:
                pass
        raise _Invalid(what)
    return check


def _list_of_texts(value):
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _Invalid("a non-empty list of file paths")
    return value


def _epochs(value):
    if isinstance(value, list):
        if not value:
            raise _Invalid("an integer >= 1 or a list of them (one per level, coarsest first)")
        return [_integer(0)(entry) for entry in value]
    return _integer(1)(value)


SHAPE = _list(_integer(1), 3, "3 positive integers [D, H, W]")
PHANTOM = {
    "cases": _integer(1), "shape": SHAPE, "seed": _integer(0),
    "spacing": _optional(_list(_number(positive=True), 3, "3 voxel sizes in mm or null")),
    "amplitude_mm": _number(low=0),
}
SCANS = {
    "files": _list_of_texts, "spacing_mm": _number(positive=True),
    "crop_body_mm": _optional(_number(low=0)), "draws_per_epoch": _integer(1),
}
SOURCE = {"phantom": PHANTOM, "dir": _text, "scans": SCANS}  # or a folder of pairs, as a string
MODEL = {
    "shape": SHAPE, "levels": _integer(1), "base_filters": _integer(1), "depth": _integer(1),
    "convs_per_block": _integer(1),
    "intensity_window": _list(_number(), 2, "[low, high] in HU"),
    "alpha": _number(low=0), "beta": _number(low=0), "epsilon": _number(positive=True),
    "gamma": _number(low=0), "batchnorm_momentum": _number(low=0, high=1),
    "normalization": _choice(("batch", "instance", "none")),
}
GEOMETRIC = {  # pipeline.augment_geometry's options
    "flips": _boolean, "permutations": _boolean, "swaps": _boolean, "shift_mm": _number(low=0),
    "crop_fraction": _optional(_number(low=0.05, high=1.0)),
}
MOTION = {  # synthetic.RandomMotion's fields
    "amplitude_mm": _number(low=0), "shift_mm": _number(low=0), "pure_shift": _number(low=0, high=1),
    "noise_hu": _list(_number(low=0), 2, "[low, high] noise standard deviations in HU"),
    "anatomy_mm": _number(low=0),
}
TRAINING = {
    "epochs_per_level": _epochs, "init": _choice(INITS), "learning_rate": _number(positive=True),
    "batch_size": _integer(1), "steps_per_epoch": _optional(_integer(1)), "masks": _boolean,
    "augment": _boolean, "geometric": GEOMETRIC, "motion": MOTION, "initial_model": _text,
}
TRAINING_DEFAULTS = {"epochs_per_level": 4, "init": "pretrained", "learning_rate": 1e-3,
                     "batch_size": 1, "steps_per_epoch": None, "masks": True, "augment": False}
SCANS_DEFAULTS = {"spacing_mm": 2.5, "crop_body_mm": 10.0, "draws_per_epoch": 1}
SCHEMA = {"description": _text, "data": {"train": SOURCE, "validation": SOURCE},
          "model": MODEL, "training": TRAINING, "output": _text}
REQUIRED = {"": ("data", "model", "output"), "data": ("train",), "model": ("shape",),
            "data.train.scans": ("files",), "data.validation.scans": ("files",)}
MODEL_KEYS = tuple(MODEL)


def _validate(value, schema, where, path):
    """``value`` checked against ``schema`` (a dict of sections, or a check); returns it."""
    if not isinstance(schema, dict):
        try:
            return schema(value)
        except _Invalid as expected:
            shown = json.dumps(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise DataError(f"{path}: {where}: expected {expected}, got {shown}") from None
    if schema is SOURCE and isinstance(value, str):
        return value  # a data source may be a folder of pairs
    if not isinstance(value, dict):
        raise DataError(f"{path}: {where or 'the config'}: expected a JSON object, got {json.dumps(value)[:60]}")
    for key in value:
        if key not in schema:
            raise DataError(f"{path}: {where or 'the config'}: unknown key {key!r}{_nearest(key, schema)}")
    for key in REQUIRED.get(where, ()):
        if key not in value:
            raise DataError(f"{path}: {where or 'the config'}: the key {key!r} is missing")
    if schema is SOURCE and not {"phantom", "scans"} & set(value):
        raise DataError(f"{path}: {where}: expected a folder of pairs, or an object with "
                        "'phantom' and/or 'scans'")
    return {key: _validate(item, schema[key], f"{where}.{key}" if where else key, path)
            for key, item in value.items()}


def _nearest(key, known):
    match = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    if match:
        return f" (did you mean {match[0]!r}?)"
    return " (known: " + ", ".join(sorted(known)) + ")"


def _model_defaults():
    """The constructor defaults of the config's model keys (so a default made explicit is no change)."""
    parameters = inspect.signature(MultilevelRegistration.__init__).parameters
    return {key: parameters[key].default for key in MODEL_KEYS
            if parameters[key].default is not inspect.Parameter.empty}


def load_config(path):
    """The config checked and completed: absolute paths, every default filled in.

    Raises a one-line DataError naming the file and the key for anything wrong: unreadable
    JSON, an unknown key (with the nearest known one), a value of the wrong type or range, a
    model the settings cannot build (e.g. a grid the levels cannot halve).
    """
    try:
        with open(path) as handle:
            raw = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: cannot read the config ({error})") from None
    config = _validate(raw, SCHEMA, "", path)
    base = os.path.dirname(os.path.abspath(path))
    config["output"] = os.path.normpath(os.path.join(base, config["output"]))
    config["data"] = {split: _absolute(source, base) for split, source in config["data"].items()}
    config["model"] = json.loads(json.dumps({**_model_defaults(), **config["model"]}))
    config["training"] = {**TRAINING_DEFAULTS, **config.get("training", {})}
    epochs = config["training"]["epochs_per_level"]
    if isinstance(epochs, list) and len(epochs) != config["model"]["levels"]:
        raise DataError(f"{path}: training.epochs_per_level: expected {config['model']['levels']} "
                        f"values (one per level, coarsest first), got {len(epochs)}")
    training = config["training"]
    if "initial_model" in training:
        training["initial_model"] = os.path.normpath(os.path.join(base, training["initial_model"]))
        if training["init"] != "keep":  # pretrained/xavier would overwrite the loaded finer levels
            raise DataError(f"{path}: training.init: expected \"keep\" with training.initial_model "
                            f"(fine-tuning keeps every level's loaded weights), got {training['init']!r}")
    build_model(config["model"], path)  # a model the settings cannot build fails here
    return config


def _absolute(source, base):
    if not isinstance(source, dict):
        return os.path.normpath(os.path.join(base, source))
    source = dict(source)
    if "dir" in source:
        source["dir"] = os.path.normpath(os.path.join(base, source["dir"]))
    if "scans" in source:
        files = [os.path.normpath(os.path.join(base, f)) for f in source["scans"]["files"]]
        source["scans"] = {**SCANS_DEFAULTS, **source["scans"], "files": files}
    return source


def build_model(model_config, where="model config"):
    """The model of a (checked) model section; its own errors (e.g. the grid) as DataError."""
    try:
        return MultilevelRegistration(**model_config)
    except (TypeError, ValueError) as error:
        raise DataError(f"{where}: model: {error}".splitlines()[0]) from None


# --- the run record: what a run was started with ------------------------------------------------


def _comparable(config):
    return {key: value for key, value in config.items() if key not in NOT_COMPARED}


def _flatten(value, prefix=""):
    if isinstance(value, dict):
        flat = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else key))
        return flat
    return {prefix: value}


def config_changes(old, new):
    """``["training.epochs_per_level: 1 -> 2", ...]``: what differs between two configs."""
    old, new = (_flatten(_comparable(_with_legacy_defaults(config))) for config in (old, new))

    def shown(flat, key):
        return json.dumps(flat[key]) if key in flat else "(unset)"

    return [f"{key}: {shown(old, key)} -> {shown(new, key)}" for key in sorted(set(old) | set(new))
            if key not in old or key not in new or old[key] != new[key]]


def _with_legacy_defaults(config):
    if "model" not in config:
        return config
    return {**config, "model": {**LEGACY_MODEL_DEFAULTS, **config["model"]}}


def _check_record(config):
    """Refuse an output holding another run or something else; start a record if it has none."""
    folder = config["output"]
    record = os.path.join(folder, RUN_RECORD)
    if os.path.isfile(record):
        with open(record) as handle:
            changes = config_changes(json.load(handle)["config"], config)
        if changes:
            raise DataError(f"{folder}: this run was started with another config ("
                            + "; ".join(changes) + "); rerun with restart=True to discard the run "
                            "and train afresh, or choose another output")
        return
    if os.path.isdir(folder) and os.listdir(folder):
        raise DataError(f"{folder}: exists, is not empty and holds no tfmlreg run ({RUN_RECORD}); "
                        "choose another output, or rerun with restart=True to discard its content")
    os.makedirs(folder, exist_ok=True)
    _write_json(record, {"config": json.loads(json.dumps(config))})


def _write_json(path, value):
    temporary = f"{path}.partial"
    with open(temporary, "w") as handle:
        json.dump(value, handle, indent=2)
    os.replace(temporary, path)


# --- data ---------------------------------------------------------------------------------------


def check_sources(config):
    """Folders of pairs and scan files named by the config exist (before anything is written)."""
    for split, source in config["data"].items():
        if not isinstance(source, dict) and not io.list_pairs(source):
            raise DataError(f"data.{split}: {source}: no pairs found (expected "
                            "<case>/fixed.nii.gz and moving.nii.gz)")
        for path in source.get("scans", {}).get("files", []) if isinstance(source, dict) else []:
            if not os.path.isfile(path):
                raise DataError(f"data.{split}.scans.files: {path}: no such file")
    initial = config["training"].get("initial_model")
    if initial is not None and not os.path.isfile(initial):
        raise DataError(f"training.initial_model: {initial}: no such file")


def data_dir(source, output, split):
    """A folder of pairs: the given one, or phantoms generated into ``output/data/split`` once
    (None for a source of scans alone)."""
    if not isinstance(source, dict):
        return source
    if "phantom" not in source:
        return None
    target = source.get("dir", os.path.join(output, "data", split))
    with outputs.locked(target, what=f"data.{split}.dir"):  # arms sharing it generate it once
        if not os.path.isdir(target):
            _generate(source["phantom"], target)
        _check_phantoms(source["phantom"], target, split)
    return target


def _generate(spec, target):
    partial = f"{target}.partial"  # renamed only when complete: no half data set is reused
    shutil.rmtree(partial, ignore_errors=True)
    try:
        phantom.write_dataset(partial, **spec)
        _write_json(os.path.join(partial, PHANTOM_RECORD), spec)
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _check_phantoms(spec, target, split):
    """Refuse phantoms generated with other settings (a folder made before the record existed
    is taken as it is)."""
    record = os.path.join(target, PHANTOM_RECORD)
    if not os.path.isfile(record):
        return
    with open(record) as handle:
        changes = config_changes(json.load(handle), json.loads(json.dumps(spec)))
    if changes:
        raise DataError(f"data.{split}.dir: {target} holds phantoms made with other settings ("
                        + "; ".join(changes) + "); remove it or choose another dir")


def _scan_items(spec):
    """The scans of a ``scans`` section, each listed ``draws_per_epoch`` times (each draw is a
    new synthetic pair)."""
    from tfmlreg.data import synthetic

    scans = [synthetic.load_scan(path, spec["spacing_mm"], spec["crop_body_mm"])
             for path in spec["files"]]
    return [scan for scan in scans for _ in range(spec["draws_per_epoch"])]


def dataset(source, output, split, model, training, shuffle):
    """The split's ``tf.data`` pipeline: its pairs (a folder, or phantoms) and scans; the geometric
    augmentation for training only (``make_dataset`` caches pairs that need no per-draw work)."""
    from tfmlreg.data import synthetic

    folder = data_dir(source, output, split)
    scans = source.get("scans") if isinstance(source, dict) else None
    items = [io.load_pair(case) for case in io.list_pairs(folder)] if folder else []
    items += _scan_items(scans) if scans else []
    return pipeline.make_dataset(
        items, shape=model.shape, batch_size=training["batch_size"], masks=training["masks"],
        shuffle=shuffle, augment=training["augment"] and shuffle,
        displacement=model.gamma > 0,  # the supervised term needs the ground truth
        motion=synthetic.RandomMotion(**training.get("motion", {})),
        **(training.get("geometric", {}) if shuffle else {}))


# --- the run ------------------------------------------------------------------------------------


def paths(config):
    """Where a run's files go: ``{"checkpoints", "log", "model", "saved_model"}``."""
    folder = config["output"]
    return {"checkpoints": os.path.join(folder, "checkpoints"),
            "log": os.path.join(folder, "training_log.csv"),
            "model": os.path.join(folder, "model.keras"),
            "saved_model": os.path.join(folder, "saved_model")}


def run(config, verbose="auto", restart=False):
    """Train as the config (from :func:`load_config`) says; returns the trained model and
    ``{level: History}`` of the stages run now (none for a finished run).

    Resumes an interrupted run of the same config; ``restart`` discards what the output holds.
    Raises DataError (nothing written) for a changed config, missing data or an output in use.
    """
    folder = config["output"]
    model = build_model(config["model"])
    check_sources(config)
    with outputs.locked(folder, what=f"output {folder}"):
        if restart and os.path.lexists(folder):
            shutil.rmtree(folder)
        created = not os.path.isdir(folder)
        try:
            _check_record(config)
            histories = _train(model, config, verbose)
            _save_outputs(model, config)
        except BaseException:
            if created and not _has_progress(config):  # nothing worth resuming: leave nothing
                shutil.rmtree(folder, ignore_errors=True)
            raise
    return model, histories


def _has_progress(config):
    checkpoints = paths(config)["checkpoints"]
    return os.path.isdir(checkpoints) and any(name.endswith(".json") for name in os.listdir(checkpoints))


def _finished(config):
    where = paths(config)
    return os.path.isfile(where["model"]) and os.path.isfile(
        os.path.join(where["saved_model"], "1", "saved_model.pb"))


def _train(model, config, verbose):
    where, training = paths(config), config["training"]
    if _finished(config):
        if verbose:
            print(f"{config['output']}: already trained with this config; nothing to do "
                  "(restart=True, tfmlreg train --restart, trains it again)")
        model.set_active_level(1)
        model.load_weights(os.path.join(where["checkpoints"], "level1.weights.h5"))
        return {}
    if "initial_model" in training:
        load_initial_weights(model, training["initial_model"])
    folder = config["output"]
    train = dataset(config["data"]["train"], folder, "train", model, training, shuffle=True)
    validation = None
    if "validation" in config["data"]:
        validation = dataset(config["data"]["validation"], folder, "validation", model, training,
                             shuffle=False)
    return fit_progressive(
        model, train, training["epochs_per_level"], init=training["init"],
        validation_data=validation, learning_rate=training["learning_rate"],
        checkpoint_dir=where["checkpoints"], callbacks=[StageCSVLogger(where["log"])],
        steps_per_epoch=training["steps_per_epoch"], verbose=verbose,
    )


def load_initial_weights(model, path):
    """Every level's network weights from the trained ``.keras`` model at ``path`` (fine-tuning);
    the architectures must match, the normalisation may differ (a batch normalisation's scale
    and offset start an instance normalisation: :func:`tfmlreg.networks.copy_weights`)."""
    import keras

    from tfmlreg.networks import copy_weights

    source = keras.models.load_model(path, compile=False)
    if getattr(source, "levels", None) != model.levels:
        raise DataError(f"training.initial_model: {path}: expected a MultilevelRegistration with "
                        f"{model.levels} levels, got {getattr(source, 'levels', type(source).__name__)}")
    for level in range(1, model.levels + 1):
        try:
            copy_weights(source.net(level), model.net(level))
        except ValueError as error:
            raise DataError(f"training.initial_model: {path}: level {level}'s network does not "
                            f"match the config's model ({str(error).splitlines()[0]})") from None


def _save_outputs(model, config):
    """``model.keras`` and the SavedModel, each written whole (a kill leaves none or all)."""
    from tfmlreg import export

    where = paths(config)
    if not os.path.isfile(where["model"]):
        temporary = where["model"].replace(".keras", ".partial.keras")  # Keras wants the suffix
        model.save(temporary)
        os.replace(temporary, where["model"])
    saved = where["saved_model"]
    if not os.path.isfile(os.path.join(saved, "1", "saved_model.pb")):
        if os.path.isdir(saved):  # what a killed export left: a hidden partial version
            for name in os.listdir(saved):
                if name.startswith(".") and ".partial" in name:
                    shutil.rmtree(os.path.join(saved, name), ignore_errors=True)
        shutil.rmtree(os.path.join(saved, "1"), ignore_errors=True)
        export.export_saved_model(model, saved, version=1)
