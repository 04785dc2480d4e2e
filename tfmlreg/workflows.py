"""What the commands do, as functions: the demo, registering files, evaluating a folder.

The CLI (:mod:`tfmlreg.cli`) only parses arguments and stages outputs; everything here writes
into the folder it is given and can be called from Python as well.
"""

import json
import os

import numpy as np
from tqdm import tqdm

from tfmlreg import evaluation, metrics
from tfmlreg.data import io, phantom
from tfmlreg.data.io import DataError
from tfmlreg.figures import save_overlays
from tfmlreg.inference import RemotePredictor, load_predictor, register_pair


def predictor_for(model_path, server=None, shape=None):
    """A local predictor from ``model_path``, or a remote one when ``server`` is given."""
    if server is None:
        return load_predictor(model_path)
    if shape is None:
        raise DataError("--shape: the model grid is needed with --server (e.g. --shape 160 160 160)")
    return RemotePredictor(server, shape)


def load_keras_model(path):
    import keras

    if not (os.path.isfile(path) and str(path).endswith(".keras")):
        raise DataError(f"{path}: expected a trained .keras model file")
    return keras.saving.load_model(path)


def load_files(args):
    """A pair dict (as :func:`tfmlreg.data.io.load_pair` returns) from the register options: any
    supported format, canonical orientation, the moving image in the fixed image's frame."""
    return io.load_images(args.fixed, args.moving, fixed_labels=args.fixed_labels,
                          moving_labels=args.moving_labels, fixed_landmarks=args.fixed_landmarks,
                          moving_landmarks=args.moving_landmarks, dirlab_case=args.dirlab_case,
                          name=os.path.basename(args.fixed))


def register_and_write(predictor, pair, out_dir):
    """Register, then write the warped image, the displacement (mm), the Jacobian determinant,
    metrics.json and an overlay figure into ``out_dir``; returns the metrics summary."""
    result = register_pair(predictor, pair)
    spacing = np.asarray(pair["spacing_fixed"], np.float32)
    affine = pair.get("affine_fixed")  # outputs overlay on the fixed input (diag(spacing) if none)
    io.write_image(os.path.join(out_dir, "warped.nii.gz"), result["warped"], spacing, affine)
    io.write_displacement(os.path.join(out_dir, "displacement.nii.gz"), result["displacement"],
                          spacing, affine)
    io.write_image(os.path.join(out_dir, "jacobian_determinant.nii.gz"),
                   metrics.jacobian_determinant(result["displacement"], spacing), spacing, affine)
    summary = _summary(evaluation.evaluate_pair(pair, result))
    with open(os.path.join(out_dir, "metrics.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    save_overlays(os.path.join(out_dir, "overlay.png"), pair["fixed"],
                  {"before": pair["moving"], "after": result["warped"]}, spacing)
    return summary


def _summary(results):
    """JSON-ready metrics: per-landmark errors dropped, labels as strings."""
    out = {}
    for method, values in results.items():
        entry = {key: value for key, value in values.items() if key not in ("tre", "dice")}
        if "dice" in values:
            entry["dice"] = {evaluation.LOBE_NAMES.get(k, str(k)): v for k, v in values["dice"].items()}
        out[method] = {key: _plain(value) for key, value in entry.items()}
    return out


def _plain(value):
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return float(value)


def evaluate_folder(predictor, data_dir, out_dir, figures=True, method="registered"):
    """Evaluate every pair of ``data_dir``; writes metrics.csv, results.md, the Dice box plot and
    (with ``figures``) one overlay per case into ``out_dir``. Returns the results.md path."""
    cases = io.list_pairs(data_dir)
    if not cases:
        raise DataError(f"{data_dir}: no pairs found (see tfmlreg.data.io for the layout)")
    results = {}
    for case_dir in tqdm(cases, desc="evaluating", unit="case"):
        pair = io.load_pair(case_dir)
        registered = register_pair(predictor, pair)
        outcome = evaluation.evaluate_pair(pair, registered)
        results[pair["name"]] = {evaluation.INITIAL: outcome[evaluation.INITIAL],
                                 method: outcome["registered"]}
        if figures:
            save_overlays(os.path.join(out_dir, f"overlay_{pair['name']}.png"), pair["fixed"],
                          {"before": pair["moving"], "after": registered["warped"]},
                          pair["spacing_fixed"])
    return evaluation.write_report(out_dir, results)


def demo(model_path, out_dir, shape=(96, 96, 96), seed=1000):
    """Generate a phantom pair, register it with the shipped model, write outputs and metrics."""
    predictor = load_predictor(model_path)
    pair = phantom.make_pair(shape=shape, seed=seed)
    case = phantom.as_case(pair, f"phantom{seed}")
    io.write_image(os.path.join(out_dir, "fixed.nii.gz"), pair["fixed"], pair["spacing"])
    io.write_image(os.path.join(out_dir, "moving.nii.gz"), pair["moving"], pair["spacing"])
    return register_and_write(predictor, case, out_dir)


def format_demo_report(summary, out_dir):
    before, after = summary[evaluation.INITIAL], summary["registered"]
    lines = [
        f"{'':24s}{'initial':>10s}{'registered':>12s}",
        f"{'TRE mean (mm)':24s}{before['tre_mean']:10.2f}{after['tre_mean']:12.2f}",
        f"{'TRE max (mm)':24s}{before['tre_max']:10.2f}{after['tre_max']:12.2f}",
        f"{'lobe Dice mean':24s}{before['dice_mean']:10.3f}{after['dice_mean']:12.3f}",
        f"{'folding (% voxels)':24s}{100 * before['folding']:10.3f}{100 * after['folding']:12.3f}",
        f"{'model time (s)':24s}{'':10s}{after['seconds']:12.2f}",
        f"outputs in {out_dir}/: warped.nii.gz, displacement.nii.gz (mm), "
        "jacobian_determinant.nii.gz, metrics.json, overlay.png",
    ]
    return "\n".join(lines)
