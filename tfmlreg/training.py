"""The paper's staged training: level by level, coarse to fine, coarser networks frozen.

Stage ``l`` (from ``L`` down to 1) activates level ``l`` (finer levels are not computed, coarser
ones are frozen and only produce the initial deformation), initialises its network, recompiles
(Keras needs it after a change of ``trainable``) with a fresh optimiser, calls ``model.fit``, and
re-estimates the level's batch-norm statistics with its final weights.
After each stage the weights go to ``checkpoint_dir/level{l}.weights.h5``; a rerun with the same
``checkpoint_dir`` loads the finished stages and resumes with the first unfinished one.
"""

import json
import os

import keras

INITS = ("pretrained", "xavier")


def fit_progressive(model, train_data, epochs_per_level, init="pretrained", validation_data=None,
                    callbacks=None, optimizer=None, learning_rate=1e-3, checkpoint_dir=None,
                    jit_compile="auto", verbose="auto", **fit_kwargs):
    """Train ``model`` (a :class:`~tfmlreg.model.MultilevelRegistration`) coarse to fine.

    ``init="pretrained"``: a finer network starts from the weights of the level below it (the
    paper's choice); ``"xavier"``: from Xavier-uniform weights drawn afresh. ``optimizer`` is a
    callable returning a new optimiser per stage (default Adam at ``learning_rate``).
    ``epochs_per_level`` is an int or a list, coarsest level first. Returns ``{level: History}``
    for the stages run now (finished stages loaded from checkpoints have no entry).
    """
    if init not in INITS:
        raise ValueError(f"init: expected one of {INITS}, got {init!r}")
    epochs = _epochs_per_level(epochs_per_level, model.levels)
    make_optimizer = optimizer or (lambda: keras.optimizers.Adam(learning_rate))
    done = _finished_levels(checkpoint_dir)
    histories = {}
    for level, level_epochs in zip(range(model.levels, 0, -1), epochs):
        model.set_active_level(level)
        if level in done:
            model.load_weights(_checkpoint(checkpoint_dir, level))
            continue
        if level < model.levels:
            _initialise(model, level, init)
        model.compile(optimizer=make_optimizer(), jit_compile=jit_compile)
        histories[level] = model.fit(
            train_data, epochs=level_epochs, validation_data=validation_data,
            callbacks=[LevelInLogs()] + list(callbacks or []), verbose=verbose, **fit_kwargs,
        )
        recalibrate_batchnorm(model, train_data)
        _save_stage(model, checkpoint_dir, level, done)
    return histories


def recalibrate_batchnorm(model, data, batches=32):
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

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["level"] = self.model.active_level


def _epochs_per_level(epochs, levels):
    if isinstance(epochs, int):
        return [epochs] * levels
    epochs = [int(e) for e in epochs]
    if len(epochs) != levels:
        raise ValueError(f"epochs_per_level: expected {levels} values (coarsest first), got {epochs}")
    return epochs


def _initialise(model, level, init):
    """Give level ``level``'s network its starting weights (batch-norm statistics included)."""
    net = model.net(level)
    if init == "pretrained":
        net.set_weights(model.net(level + 1).get_weights())
    else:
        reinitialise(net)


def reinitialise(net):
    """Redraw every weight of ``net`` from its layer's own initialiser (Xavier for the convs)."""
    for layer in net.layers:
        for name in ("kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance"):
            variable = getattr(layer, name, None)
            initializer = getattr(layer, f"{name}_initializer", None)
            if variable is not None and initializer is not None:
                variable.assign(initializer(variable.shape, variable.dtype))


def _checkpoint(checkpoint_dir, level):
    return os.path.join(checkpoint_dir, f"level{level}.weights.h5")


def _progress_file(checkpoint_dir):
    return os.path.join(checkpoint_dir, "progress.json")


def _finished_levels(checkpoint_dir):
    if checkpoint_dir is None or not os.path.exists(_progress_file(checkpoint_dir)):
        return set()
    with open(_progress_file(checkpoint_dir)) as handle:
        return set(json.load(handle)["finished_levels"])


def _save_stage(model, checkpoint_dir, level, done):
    if checkpoint_dir is None:
        return
    os.makedirs(checkpoint_dir, exist_ok=True)
    model.save_weights(_checkpoint(checkpoint_dir, level))
    done.add(level)
    # Written after the weights, so a stage only counts as finished once its weights are on disk.
    with open(_progress_file(checkpoint_dir), "w") as handle:
        json.dump({"finished_levels": sorted(done)}, handle)
