"""Keras' own callbacks in a staged run (issue 15): per-stage checkpoints, early stopping and logs,
TensorBoard per stage, a clean load of the saved model, and predict's input structure."""

import logging
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import random_inputs
from tfmlreg.model import MultilevelRegistration
from tfmlreg.training import fit_progressive, read_log

GRID = (16, 16, 16)
EPOCHS = 4


def tiny_model():
    return MultilevelRegistration(shape=GRID, levels=2, base_filters=4, depth=2)


def tiny_data():
    """Three pairs in batches of two: the last batch's other size must not retrace either."""
    return tf.data.Dataset.from_tensor_slices(random_inputs(GRID, batch=3)).batch(2)


def kernels(net):
    return [w.numpy().copy() for w in net.weights if w.path.endswith("kernel")]


class Recorder(keras.callbacks.Callback):
    """Each stage's networks at its start, after its first epoch and at its end."""

    def __init__(self):
        super().__init__()
        self.stages = {}

    def _nets(self):
        return {level: kernels(self.model.net(level)) for level in (1, 2)}

    def on_train_begin(self, logs=None):
        self.stages[self.model.active_level] = {"start": self._nets()}

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            self.stages[self.model.active_level]["first"] = self._nets()

    def on_train_end(self, logs=None):
        self.stages[self.model.active_level]["end"] = self._nets()


class TracingLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def event_steps(folder):
    """``{tag: [steps]}`` of the TensorBoard event files in ``folder``."""
    steps = {}
    for path in tf.io.gfile.glob(str(folder / "events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    return steps


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("staged")
    recorder = Recorder()
    callbacks = [
        # "level" (logged per stage) with mode="max" makes the coarser stage look better, as a
        # lower coarse loss would: a best shared across stages would never save the finer one
        keras.callbacks.ModelCheckpoint(folder / "best.keras", monitor="level", mode="max",
                                        save_best_only=True),
        keras.callbacks.ModelCheckpoint(folder / "best_level{level}.keras", monitor="val_loss",
                                        save_best_only=True),
        # "level" never improves within a stage: each stage stops after its second epoch
        keras.callbacks.EarlyStopping(monitor="level", mode="min", patience=1,
                                      restore_best_weights=True),
        keras.callbacks.CSVLogger(folder / "log.csv"),
        keras.callbacks.TensorBoard(folder / "tensorboard"),
        recorder,
    ]
    tracing = TracingLog()
    tf.get_logger().addHandler(tracing)
    try:
        model = tiny_model()
        histories = fit_progressive(model, tiny_data(), EPOCHS, validation_data=tiny_data(),
                                    callbacks=callbacks, verbose=0)
    finally:
        tf.get_logger().removeHandler(tracing)
    return {"folder": folder, "model": model, "histories": histories, "recorder": recorder,
            "callbacks": callbacks, "tracing": tracing.messages}


def test_early_stopping_stops_and_restores_each_stage_on_its_own(run):
    assert {level: len(h.epoch) for level, h in run["histories"].items()} == {2: 2, 1: 2}
    stages = run["recorder"].stages
    for level in (2, 1):
        # the stage ends with its own best (first) epoch, not another stage's weights
        for end, best in zip(stages[level]["end"][level], stages[level]["first"][level]):
            np.testing.assert_array_equal(end, best)
        assert any(not np.array_equal(a, b) for a, b in
                   zip(stages[level]["first"][level], stages[level]["start"][level]))
    for end, start in zip(stages[1]["end"][2], stages[1]["start"][2]):  # level 2 frozen in stage 1
        np.testing.assert_array_equal(end, start)


def test_one_csv_log_for_the_whole_run_with_the_level_in_each_row(run):
    rows = read_log(run["folder"] / "log.csv")
    assert [(int(r["level"]), int(r["epoch"])) for r in rows] == [(2, 0), (2, 1), (1, 0), (1, 1)]
    assert all(float(r["val_loss"]) > 0 for r in rows)
    assert run["callbacks"][3].append is False  # the user's setting is given back


def test_checkpoint_best_is_per_stage_and_the_last_file_is_the_finest_stage(run):
    folder = run["folder"]
    assert keras.saving.load_model(folder / "best.keras").active_level == 1
    assert sorted(p.name for p in folder.glob("best_level*.keras")) == [
        "best_level1.keras", "best_level2.keras"]


def test_tensorboard_writes_each_stage_in_its_own_folder(run):
    folder = run["folder"] / "tensorboard"
    for level in (2, 1):
        assert sorted(event_steps(folder / f"level{level}" / "train")["epoch_loss"]) == [0, 1]
        assert "epoch_loss" in event_steps(folder / f"level{level}" / "validation")
    assert run["callbacks"][4].log_dir == str(folder)


def test_loading_a_checkpoint_or_the_trained_model_gives_no_warning(run, tmp_path):
    run["model"].save(tmp_path / "trained.keras")
    paths = [tmp_path / "trained.keras", run["folder"] / "best_level2.keras"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = [keras.saving.load_model(path) for path in paths]
    assert [str(w.message) for w in caught] == []
    # the frozen networks stay frozen, so the optimizer state is the one that was trained
    assert [[net.trainable for net in m.nets] for m in loaded] == [[True, False], [False, True]]
    assert len(loaded[0].optimizer.variables) == len(run["model"].optimizer.variables)


def test_staged_training_does_not_retrace(run):
    assert not [m for m in run["tracing"] if "retracing" in m]


def test_backup_and_restore_is_refused_with_the_argument_named(tmp_path):
    with pytest.raises(ValueError, match="^callbacks: BackupAndRestore"):
        fit_progressive(tiny_model(), tiny_data(), 1, verbose=0,
                        callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path))])


def test_predict_takes_the_dict_and_names_the_structure_it_wants(run):
    model, inputs = run["model"], random_inputs(GRID, batch=2, seed=3)
    predicted = model.predict(inputs, batch_size=1, verbose=0)
    np.testing.assert_allclose(predicted["displacement"],
                               model(inputs)["displacement"].numpy(), atol=1e-5)
    for bad, what in (([inputs["fixed"], inputs["moving"], inputs["spacing"]], "of 3 items"),
                      ({"fixed": inputs["fixed"]}, r"keys \['fixed'\]"),
                      (inputs["fixed"], "single array")):
        with pytest.raises(ValueError, match=r"^inputs: expected a dict .*" + what) as raised:
            model.predict(bad, verbose=0)
        assert "\n" not in str(raised.value)
