"""A training run's supervised error on its validation pairs, next to a zero field's.

    python benchmarks/validation_error.py training/chest_ct_registration.json
        [--checkpoint runs/chest_ct_registration/checkpoints/level3.epoch70.weights.h5]
        [--level 3] [--recalibrate 60] [--pairs runs/val_lidc_body]

The config's validation pairs (a folder with ground-truth displacements) are run through the
model at ``--level`` with the checkpoint's weights (default: the newest checkpoint of that
level, or the finished stage's file), and ``mean |u - u_true|²`` (mm², the training's
supervised term) is printed per pair and on average, beside what a zero field scores.
``--checkpoint`` may also be a trained ``.keras`` model of the same architecture.
``--recalibrate N`` then re-estimates the active level's batch-normalisation statistics as the
plain average over N training draws and scores again: whether noisy running statistics (batch
size 1, momentum 0.9) explain a poor validation error. ``--pairs DIR`` scores another folder of
pairs instead of the config's validation data.
"""

import argparse
import glob
import os

import numpy as np


def errors(model, data, level, zero=False):
    from keras import ops

    from tfmlreg import geometry, losses

    out = []
    for batch in data:
        truth = geometry.pyramid(ops.cast(batch["displacement"], "float32"), level)[-1]
        field = ops.zeros_like(truth) if zero else model(batch, training=False)[
            f"displacement_level{level}"]
        out.append(float(losses.displacement_error(field, truth)[0]))
    return np.asarray(out)


def recalibrate(model, train, level, draws):
    """Batch-norm statistics of level ``level``'s net = the mean over ``draws`` training batches
    (momentum 1 - 1/k at the k-th batch, in eager mode)."""
    import keras

    norms = [layer for layer in model.net(level).layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    batches = iter(train.repeat())
    for k in range(1, draws + 1):
        for layer in norms:
            layer.momentum = 1.0 - 1.0 / k
        model(next(batches), training=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--level", type=int, default=3)
    parser.add_argument("--recalibrate", type=int, default=0)
    parser.add_argument("--pairs", default=None, help="a folder of pairs (default: the config's)")
    args = parser.parse_args()
    from tfmlreg import experiment

    config = experiment.load_config(args.config)
    model = experiment.build_model(config["model"])
    model.set_active_level(args.level)
    training = config["training"]
    validation = experiment.dataset(args.pairs or config["data"]["validation"], config["output"],
                                    "validation", model, training, shuffle=False)
    folder = experiment.paths(config)["checkpoints"]
    checkpoint = args.checkpoint or max(  # a finished stage's file or its newest epoch
        glob.glob(os.path.join(folder, f"level{args.level}.weights.h5"))
        + glob.glob(os.path.join(folder, f"level{args.level}.epoch*.weights.h5")),
        key=os.path.getmtime)
    model(next(iter(validation)))  # build
    if checkpoint.endswith(".keras"):  # a trained model, e.g. tfmlreg/models/chest_ct/model.keras
        experiment.load_initial_weights(model, checkpoint)
    else:
        model.load_weights(checkpoint)
    print(f"{checkpoint}, level {args.level}")
    for name, values in [("zero field", errors(model, validation, args.level, zero=True)),
                         ("network", errors(model, validation, args.level))]:
        print(f"{name:>28s}: {np.round(values, 1).tolist()} mean {values.mean():.1f} mm²")
    if args.recalibrate:
        train = experiment.dataset(config["data"]["train"], config["output"], "train", model,
                                   training, shuffle=True)
        recalibrate(model, train, args.level, args.recalibrate)
        values = errors(model, validation, args.level)
        print(f"{'network, recalibrated (' + str(args.recalibrate) + ')':>28s}: "
              f"{np.round(values, 1).tolist()} mean {values.mean():.1f} mm²")


if __name__ == "__main__":
    main()
