"""The paper's staged training: level by level, coarse to fine, coarser networks frozen.

Stage ``l`` (from ``L`` down to 1) activates level ``l`` (finer levels are not computed, coarser
ones are frozen and only produce the initial deformation), initialises its network, recompiles
(Keras needs it after a change of ``trainable``) with a fresh optimiser, calls ``model.fit``, and
re-estimates the level's batch-norm statistics with its final weights.
With a ``checkpoint_dir`` a run survives being killed at any moment with at most the epoch in
progress lost: after each epoch the stage's state (weights and optimiser, as Keras'
``BackupAndRestore`` keeps it) goes to ``level{l}.backup.json`` and the weights file it names;
after each stage its weights go to ``level{l}.weights.h5`` and the stage is recorded in
``progress.json``. A rerun with the same ``checkpoint_dir`` loads the finished stages and resumes
the unfinished one after its last completed epoch. Every file is written whole (a temporary name,
then an atomic rename) and a record is written only after what it names, so a kill leaves either
the old or the new state, never a torn one. :class:`StageCSVLogger` keeps one log of all stages
that a resumed epoch replaces rather than repeats.

Keras' own callbacks are reused across the stages' ``fit`` calls and behave per stage (losses of
different levels are on different grids and are not comparable): ``ModelCheckpoint`` compares
within a stage (its ``best`` starts afresh each stage; with ``save_best_only`` one file path ends
up holding the finest stage's best epoch, and a path with ``{level}`` keeps one file per stage;
it saves during the stage, before the stage's batch-norm statistics are re-estimated);
``EarlyStopping`` stops and, with ``restore_best_weights``, restores within the stage (Keras
resets it at each ``fit``); ``CSVLogger`` writes one file for the run, a row per stage and epoch
with the stage's ``level`` (appending from the second stage on; a resumed run appends only with
``append=True``, :class:`StageCSVLogger` is the resumable log); ``TensorBoard`` writes each stage
under ``log_dir/level{l}/``. ``BackupAndRestore`` cannot span stages (``checkpoint_dir`` does its
job) and is refused.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf

from tfmlreg.types import PathLike

if TYPE_CHECKING:
    from tfmlreg.model import MultilevelRegistration

INITS = ("pretrained", "xavier", "keep")


def fit_progressive(model: MultilevelRegistration, train_data: Any,
                    epochs_per_level: int | Sequence[int], init: str = "pretrained",
                    validation_data: Any = None,
                    callbacks: Iterable[keras.callbacks.Callback] | None = None,
                    optimizer: Callable[[], keras.optimizers.Optimizer] | None = None,
                    learning_rate: float = 1e-3, checkpoint_dir: PathLike | None = None,
                    jit_compile: bool | str = "auto", verbose: int | str = "auto",
                    **fit_kwargs: Any) -> dict[int, keras.callbacks.History]:
    """Train ``model`` (a :class:`~tfmlreg.model.MultilevelRegistration`) coarse to fine.

    ``init="pretrained"``: a finer network starts from the weights of the level below it (the
    paper's choice); ``"xavier"``: from Xavier-uniform weights drawn afresh; ``"keep"``: every
    network keeps the weights it has (fine-tuning a trained model). ``optimizer`` is a
    callable returning a new optimiser per stage (default Adam at ``learning_rate``).
    ``epochs_per_level`` is an int or a list, coarsest level first. Returns ``{level: History}``
    for the stages run now (finished stages loaded from checkpoints have no entry; a resumed
    stage's History holds the epochs run now). A ``checkpoint_dir`` belongs to one model and one
    set of arguments: resuming with others is not detected here (``tfmlreg train`` checks the
    config).
    """
    if init not in INITS:
        raise ValueError(f"init: expected one of {INITS}, got {init!r}")
    epochs = _epochs_per_level(epochs_per_level, model.levels)
    make_optimizer = optimizer or (lambda: keras.optimizers.Adam(learning_rate))
    done = _finished_levels(checkpoint_dir)
    _remove_partial_files(checkpoint_dir)
    if isinstance(train_data, tf.data.Dataset):
        fit_kwargs.setdefault("shuffle", False)  # a Dataset shuffles itself; Keras warns otherwise
    callbacks = list(callbacks or [])
    stages = _PerStage(callbacks)
    histories: dict[int, keras.callbacks.History] = {}
    try:
        for level, level_epochs in zip(range(model.levels, 0, -1), epochs):
            model.set_active_level(level)
            if level in done:
                assert checkpoint_dir is not None  # done is empty without one
                model.load_weights(_checkpoint(checkpoint_dir, level))
                continue
            stages.start(level)
            backup = StageBackup(checkpoint_dir, level) if checkpoint_dir is not None else None
            if level < model.levels:
                _initialise(model, level, init)
            model.compile(optimizer=make_optimizer(), jit_compile=jit_compile)
            initial_epoch = backup.restore(model) if backup else 0
            if initial_epoch and verbose:
                print(f"level {level}: resuming after epoch {initial_epoch} of {level_epochs}")
            # the backup comes last: a log row is written before the state that makes it final
            stage_callbacks = [LevelInLogs(), *callbacks, *([backup] if backup else [])]
            histories[level] = model.fit(
                train_data, epochs=level_epochs, initial_epoch=initial_epoch,
                validation_data=validation_data, callbacks=stage_callbacks, verbose=verbose,
                **fit_kwargs,
            )
            if getattr(model, "normalization", "batch") == "batch":
                recalibrate_batchnorm(model, train_data)
            _save_stage(model, checkpoint_dir, level, done)
            if backup:
                backup.remove()  # only now: until the stage is recorded, the backup is its state
    finally:
        stages.restore()
    return histories


class _PerStage:
    """Makes Keras' callbacks, reused by every stage's ``fit``, behave per stage (module
    docstring); :meth:`restore` gives them back their own settings after the run."""

    def __init__(self, callbacks: list[keras.callbacks.Callback]) -> None:
        for callback in callbacks:
            if isinstance(callback, keras.callbacks.BackupAndRestore):
                raise ValueError("callbacks: BackupAndRestore cannot span fit_progressive's stages "
                                 "(its epoch would apply to the next stage); pass checkpoint_dir")
        self.callbacks, self.started = callbacks, False
        # a ModelCheckpoint's best so far is its initial_value_threshold until it first saves
        self.settings: dict[int, dict[str, Any]] = {id(c): {"best": getattr(c, "best", None),
                                 "append": getattr(c, "append", None),
                                 "log_dir": getattr(c, "log_dir", None)} for c in callbacks}

    def start(self, level: int) -> None:
        for callback in self.callbacks:
            own = self.settings[id(callback)]
            if isinstance(callback, keras.callbacks.ModelCheckpoint):
                callback.best = own["best"]
            elif isinstance(callback, keras.callbacks.CSVLogger) and self.started:
                callback.append = True
            elif isinstance(callback, keras.callbacks.TensorBoard):
                callback.log_dir = os.path.join(own["log_dir"], f"level{level}")
        self.started = True

    def restore(self) -> None:
        for callback in self.callbacks:
            own = self.settings[id(callback)]
            if isinstance(callback, keras.callbacks.CSVLogger):
                callback.append = own["append"]
            elif isinstance(callback, keras.callbacks.TensorBoard):
                callback.log_dir = own["log_dir"]


def recalibrate_batchnorm(model: keras.Model, data: tf.data.Dataset, batches: int = 32) -> None:
    """Re-estimate the trainable network's batch-norm statistics with its final weights.

    During training the moving averages trail weights that keep changing; inference (and the
    frozen coarser levels of later stages) use them, so a short, fast-learning stage can leave
    them far from the statistics the network was trained with. Forward passes in training mode,
    with no weight update, bring them to the final weights. Frozen networks are untouched
    (Keras runs a non-trainable BatchNormalization in inference mode).
    """
    for batch in data.take(batches):
        model(batch, training=True)


class LevelInLogs(keras.callbacks.Callback):
    """Adds the stage's ``level`` to each epoch's logs, so CSV logs and histories say which
    network was training (callbacks after it, such as ``CSVLogger``, see the key)."""

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None:
            logs["level"] = self.model.active_level


class StageBackup(keras.callbacks.Callback):
    """The state of one stage after each epoch (what Keras' ``BackupAndRestore`` keeps, written
    so that a kill at any moment leaves a loadable state) and its restoration.

    Weights and optimiser state go to ``level{l}.epoch{e}.weights.h5``, then
    ``level{l}.backup.json`` names that file and the number of completed epochs, then the
    previous epoch's file goes. (``BackupAndRestore`` itself overwrites its one file in place,
    and its restored epoch would also apply to the next stage's ``fit``.)
    """

    def __init__(self, checkpoint_dir: PathLike, level: int) -> None:
        super().__init__()
        self.directory, self.level = os.fspath(checkpoint_dir), level
        self.record = os.path.join(self.directory, f"level{level}.backup.json")

    def _weights(self, epochs: int) -> str:
        return os.path.join(self.directory, f"level{self.level}.epoch{epochs}.weights.h5")

    def completed_epochs(self) -> int:
        if not os.path.exists(self.record):
            return 0
        with open(self.record) as handle:
            return int(json.load(handle)["completed_epochs"])

    def restore(self, model: keras.Model) -> int:
        """Load the last backed-up state into ``model`` (compiled); returns the epochs done."""
        epochs = self.completed_epochs()
        if epochs:
            model.optimizer.build(model.trainable_variables)  # so its state loads too
            model.load_weights(self._weights(epochs))
        return epochs

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        previous = self.completed_epochs()
        os.makedirs(self.directory, exist_ok=True)
        self.model.save_weights(self._weights(epoch + 1))
        _write_json(self.record, {"level": self.level, "completed_epochs": epoch + 1})
        if previous and previous != epoch + 1:
            _remove_file(self._weights(previous))

    def remove(self) -> None:
        """Delete the record, then every epoch file of the level (a kill may have left two)."""
        _remove_file(self.record)
        prefix = f"level{self.level}.epoch"
        for name in os.listdir(self.directory):
            if name.startswith(prefix) and name.endswith(".weights.h5"):
                _remove_file(os.path.join(self.directory, name))


class StageCSVLogger(keras.callbacks.Callback):
    """One CSV log for a staged run: a row per (level, epoch), whatever the interruptions.

    Like ``keras.callbacks.CSVLogger(append=True)`` with the level in each row, but the file is
    rewritten whole at each epoch end (a temporary file, then a rename): a row of the same level
    and an epoch not before this one, left by an epoch that ran before a kill, is replaced, so
    a resumed run's log holds every epoch once.
    """

    def __init__(self, path: PathLike) -> None:
        super().__init__()
        self.path = os.fspath(path)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        level = self.model.active_level
        rows: list[dict[str, Any]] = [row for row in read_log(self.path)
                if not (int(row["level"]) == level and int(row["epoch"]) >= epoch)]
        values = {key: value for key, value in (logs or {}).items() if key != "level"}
        rows.append({"level": level, "epoch": epoch, **values})
        fields = ["level", "epoch"] + sorted({key for row in rows for key in row} - {"level", "epoch"})
        temporary = f"{self.path}.partial"
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(temporary, self.path)


def read_log(path: PathLike) -> list[dict[str, str]]:
    """The rows of a :class:`StageCSVLogger` file (dicts of strings); none if it does not exist."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _write_json(path: PathLike, value: Any) -> None:
    temporary = f"{path}.partial"
    with open(temporary, "w") as handle:
        json.dump(value, handle)
    os.replace(temporary, path)


def _remove_partial_files(directory: PathLike | None) -> None:
    """Temporary files of a write that a kill interrupted (the write is redone when needed)."""
    if directory is not None and os.path.isdir(directory):
        for name in os.listdir(directory):
            if ".partial" in name:
                _remove_file(os.path.join(directory, name))


def _remove_file(path: PathLike) -> None:
    if os.path.exists(path):
        os.remove(path)


def _epochs_per_level(epochs: int | Sequence[int], levels: int) -> list[int]:
    if isinstance(epochs, int):
        return [epochs] * levels
    epochs = [int(e) for e in epochs]
    if len(epochs) != levels:
        raise ValueError(f"epochs_per_level: expected {levels} values (coarsest first), got {epochs}")
    return epochs


def _initialise(model: MultilevelRegistration, level: int, init: str) -> None:
    """Give level ``level``'s network its starting weights (batch-norm statistics included)."""
    net = model.net(level)
    if init == "pretrained":
        net.set_weights(model.net(level + 1).get_weights())
    elif init == "xavier":
        reinitialise(net)


def reinitialise(net: keras.Model) -> None:
    """Redraw every weight of ``net`` from its layer's own initialiser (Xavier for the convs)."""
    for layer in net.layers:
        for name in ("kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance"):
            variable = getattr(layer, name, None)
            initializer = getattr(layer, f"{name}_initializer", None)
            if variable is not None and initializer is not None:
                variable.assign(initializer(variable.shape, variable.dtype))


def _checkpoint(checkpoint_dir: PathLike, level: int) -> str:
    return os.path.join(checkpoint_dir, f"level{level}.weights.h5")


def _progress_file(checkpoint_dir: PathLike) -> str:
    return os.path.join(checkpoint_dir, "progress.json")


def _finished_levels(checkpoint_dir: PathLike | None) -> set[int]:
    if checkpoint_dir is None or not os.path.exists(_progress_file(checkpoint_dir)):
        return set()
    with open(_progress_file(checkpoint_dir)) as handle:
        return set(json.load(handle)["finished_levels"])


def _save_stage(model: keras.Model, checkpoint_dir: PathLike | None, level: int,
                done: set[int]) -> None:
    if checkpoint_dir is None:
        return
    os.makedirs(checkpoint_dir, exist_ok=True)
    target = _checkpoint(checkpoint_dir, level)
    temporary = target.replace(".weights.h5", ".partial.weights.h5")  # Keras wants the suffix
    model.save_weights(temporary)
    os.replace(temporary, target)
    done.add(level)
    # Written after the weights, so a stage only counts as finished once its weights are on disk.
    _write_json(_progress_file(checkpoint_dir), {"finished_levels": sorted(done)})
