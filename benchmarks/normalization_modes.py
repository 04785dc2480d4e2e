"""A batch-normalised model's two functions on held-out shift pairs: the one it trained as and
the one it is used as.

    python benchmarks/normalization_modes.py [--model tfmlreg/models/chest_ct/model.keras]
        [--ct ../shared/data/ct/lidc-idri-0001.nii.gz] [--shift 6]

Trained with batch 1, a batch normalisation normalises each sample by its own statistics (what
an instance normalisation does); at inference it uses the running averages instead. This runs
the cases of ``benchmarks/real_ct.py`` (breathing both ways, ±``--shift`` mm along each axis) on
the network grid and prints, per case, the mean displacement over the body (mm, per array axis)
and the mean error ``|u - u_true|`` there, for the model at inference and with every level's
normalisation on the sample's own statistics (Keras' training mode). A model without batch
normalisation gives the same figures twice.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from real_ct import scan_cases  # noqa: E402  (the real-CT benchmark's cases)

MODES = {"inference": False, "own statistics": True}  # name -> Keras' training flag


def case_figures(model, pair):
    """``{"truth" and each mode: (mean displacement (3,), mean error)}`` over the body (found on
    the fixed image at the network grid)."""
    from tfmlreg.data import pipeline, synthetic

    grid = pipeline.to_network_grid(pair, model.shape)
    body, _ = synthetic.body_and_lung_masks(grid["fixed"], grid["spacing"])
    truth = pipeline.displacement_to_full_resolution(pair["displacement"], pair["spacing_fixed"],
                                                     model.shape)
    inputs = {"fixed": grid["fixed"][None, ..., None], "moving": grid["moving"][None, ..., None],
              "spacing": grid["spacing"][None]}
    figures = {"truth": (truth[body].mean(axis=0), 0.0)}
    for mode, training in MODES.items():
        field = np.asarray(model(inputs, training=training)["displacement"][0])
        error = np.linalg.norm(field - truth, axis=-1)[body].mean()
        figures[mode] = (field[body].mean(axis=0), float(error))
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.join("tfmlreg", "models", "chest_ct", "model.keras"))
    parser.add_argument("--ct", default=os.path.join("..", "shared", "data", "ct",
                                                     "lidc-idri-0001.nii.gz"))
    parser.add_argument("--spacing", type=float, default=2.5)
    parser.add_argument("--amplitude", type=float, default=25.0)
    parser.add_argument("--shift", type=float, default=6.0)
    args = parser.parse_args()

    from tfmlreg.inference import load_model

    model = load_model(args.model)
    for net in model.nets:  # a frozen (non-trainable) batch norm ignores the training flag
        net.trainable = True
    print(f"{args.model} ({model.normalization}) on {args.ct}")
    print(f"{'case':28s} {'true mean (mm)':>20s}" + "".join(
        f" | {mode + ': mean (mm)':>26s} {'error':>6s}" for mode in MODES))
    errors = {mode: {} for mode in MODES}
    for kind, pair in scan_cases(args.ct, args.spacing, args.amplitude, args.shift):
        figures = case_figures(model, pair)
        line = f"{pair['name']:28s} {np.array2string(figures.pop('truth')[0], precision=1):>20s}"
        for mode, (mean, error) in figures.items():
            errors[mode].setdefault(kind, []).append(error)
            line += f" | {np.array2string(mean, precision=1):>26s} {error:6.2f}"
        print(line, flush=True)
    for mode, kinds in errors.items():
        print(f"{mode}: mean body error " + ", ".join(
            f"{kind} {np.mean(values):.2f} mm" for kind, values in kinds.items()))


if __name__ == "__main__":
    main()
