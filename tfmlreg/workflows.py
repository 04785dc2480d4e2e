"""What the commands do, as functions: the demo, registering files, evaluating a folder.

The CLI (:mod:`tfmlreg.cli`) only parses arguments and stages outputs; everything here writes
into the folder it is given and can be called from Python as well.
"""

import contextlib
import json
import os
import sys
import zipfile

import numpy as np
from tqdm import tqdm

from tfmlreg import evaluation, metrics, models
from tfmlreg.data import io, phantom
from tfmlreg.data.checks import check_pair
from tfmlreg.data.io import DataError
from tfmlreg.figures import save_overlays
from tfmlreg.inference import RemotePredictor, load_predictor, register_pair, warp_moving


class RegistrationFailed(RuntimeError):
    """The model returned no usable result for a pair (e.g. a non-finite displacement)."""


@contextlib.contextmanager
def _loading(path):
    """Errors of loading a damaged or foreign model file as one DataError naming the file."""
    import tensorflow as tf
    from google.protobuf.message import DecodeError

    try:
        yield
    except DataError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, DecodeError,
            tf.errors.OpError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise DataError(f"{path}: cannot load the model ({type(error).__name__}: {reason})"[:300]) from None


NO_MODEL = "none"  # --model none: refinement alone, from zero


def predictor_for(model_path=None, server=None, shape=None, precision="auto", model_name=None):
    """A local predictor from ``model_path`` (its network in ``precision``, see
    :func:`tfmlreg.inference.resolve_precision`; None: :func:`tfmlreg.models.default_model`),
    a remote one when ``server`` (``HOST:PORT`` of TF Serving) is given, or None for
    ``model_path="none"`` (no network: the refinement starts from zero).

    Remote: ``model_name`` is the model's name on the server (default
    :data:`tfmlreg.serving.DEFAULT_MODEL_NAME`) and ``shape`` its grid; without ``shape`` the
    grid is read from the served signature (:meth:`tfmlreg.serving.RegistrationClient.grid`)."""
    if server is None and model_path is None:
        model_path = models.default_model()
    if server is None and str(model_path).lower() == NO_MODEL:
        return None
    if server is None:
        if str(model_path).endswith(".keras") and os.path.isfile(model_path):
            _check_zip(model_path)
        with _loading(model_path):
            return load_predictor(model_path, precision)
    if shape is None:
        from tfmlreg.serving import DEFAULT_MODEL_NAME, RegistrationClient

        with RegistrationClient(server, model_name=model_name or DEFAULT_MODEL_NAME) as client:
            shape = client.grid()
    return RemotePredictor(server, shape, model_name=model_name)


def load_keras_model(path):
    import keras

    if not (os.path.isfile(path) and str(path).endswith(".keras")):
        raise DataError(f"{path}: expected a trained .keras model file")
    _check_zip(path)
    with _loading(path):
        return keras.saving.load_model(path)


def _check_zip(path):
    """Keras reports a .keras file that is not a zip archive as "File not found"."""
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not a .keras model (a .keras file is a zip archive; this one is "
                        "damaged or of another format)")


def load_files(fixed, moving, fixed_labels=None, moving_labels=None, fixed_landmarks=None,
               moving_landmarks=None, dirlab_case=None):
    """A pair dict (as :func:`tfmlreg.data.io.load_pair` returns) from image, label and landmark
    files: any supported format, canonical orientation, the moving image in the fixed image's
    frame; every input checked (:func:`tfmlreg.data.checks.check_pair`)."""
    pair = io.load_images(fixed, moving, fixed_labels=fixed_labels, moving_labels=moving_labels,
                          fixed_landmarks=fixed_landmarks, moving_landmarks=moving_landmarks,
                          dirlab_case=dirlab_case, name=os.path.basename(os.path.normpath(fixed)))
    check_pair(pair, {"fixed_landmarks": fixed_landmarks, "moving_landmarks": moving_landmarks})
    return pair


def register_and_write(predictor, pair, out_dir, refine=None, progress=False):
    """Register (the network, then the refinement ``refine``, a RefineConfig or None), then write
    the warped image, the displacement (mm), the Jacobian determinant, metrics.json and an overlay
    figure into ``out_dir``; returns the metrics summary (with the time of each part).
    Raises :class:`RegistrationFailed` (nothing written) if the result is not finite."""
    result = _register(predictor, pair, refine, progress)
    spacing = np.asarray(pair["spacing_fixed"], np.float32)
    affine = pair.get("affine_fixed")  # outputs overlay on the fixed input (diag(spacing) if none)
    io.write_image(os.path.join(out_dir, "warped.nii.gz"), result["warped"], spacing, affine)
    io.write_displacement(os.path.join(out_dir, "displacement.nii.gz"), result["displacement"],
                          spacing, affine)
    io.write_image(os.path.join(out_dir, "jacobian_determinant.nii.gz"),
                   metrics.jacobian_determinant(result["displacement"], spacing), spacing, affine)
    summary = _summary(evaluation.evaluate_pair(pair, result))
    summary["registered"].update({key: float(result[key]) for key in PART_TIMES})
    with open(os.path.join(out_dir, "metrics.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    save_overlay(os.path.join(out_dir, "overlay.png"), pair, result["warped"],
                 result["displacement"])
    return summary


PART_TIMES = ("seconds_network", "seconds_refinement")


def _register(predictor, pair, refine=None, progress=False):
    """:func:`register_pair`, its result checked: a non-finite field is an error, not a result."""
    try:
        result = register_pair(predictor, pair, refine, progress)
    except FloatingPointError as error:  # the refinement's own check
        raise RegistrationFailed(f"{pair['name']}: {error}; no result written") from None
    return checked_result(result, pair["name"])


def checked_result(result, name):
    """``result`` of :func:`register_pair` if finite; else :class:`RegistrationFailed`."""
    for key in ("displacement", "warped", "network_displacement"):
        if key in result and not np.all(np.isfinite(result[key])):
            raise RegistrationFailed(f"{name}: the registration returned a {key} with NaN or "
                                     "infinite values; no result written")
    return result


def save_overlay(path, pair, warped, displacement=None):
    """Overlays before and after: the moving image resampled onto the fixed grid (the identity
    map: the pair may have different shapes and spacings) and the warped image, on the fixed;
    with ``displacement`` also its Jacobian and what it takes from outside the moving scan."""
    identity = np.zeros(np.shape(pair["fixed"]) + (3,), np.float32)
    save_overlays(path, pair["fixed"], {"before": warp_moving(pair, identity), "after": warped},
                  pair["spacing_fixed"], displacement=displacement, title=pair.get("name"),
                  moving_extent_mm=np.shape(pair["moving"]) * np.asarray(pair["spacing_moving"]))


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


NETWORK, REFINED, REFINED_ALONE = "network", "network + refinement", "refinement"


def evaluate_folder(predictor, data_dir, out_dir, figures=True, refine=None):
    """Evaluate every pair of ``data_dir``; writes metrics.csv, results.md, the Dice box plot and
    (with ``figures``) one overlay per case into ``out_dir``. Methods side by side: the network
    alone and, with ``refine`` (a RefineConfig), the network + refinement (or the refinement
    alone when ``predictor`` is None).

    A case that cannot be read or registered (a :class:`DataError` or
    :class:`RegistrationFailed`) is reported and skipped; the others are evaluated. Returns
    ``(results.md path, {case: reason} of the skipped cases)``; raises DataError when no case
    could be evaluated.
    """
    cases = io.list_pairs(data_dir)
    if not cases:
        raise DataError(f"{data_dir}: no pairs found (see tfmlreg.data.io for the layout)")
    results, failures = {}, {}
    for case_dir in tqdm(cases, desc="evaluating", unit="case"):
        name = os.path.basename(os.path.normpath(case_dir))
        try:
            results[name] = _evaluate_case(predictor, case_dir, out_dir, figures, refine)
        except (DataError, RegistrationFailed) as error:
            failures[name] = str(error)
            tqdm.write(f"tfmlreg: skipped case {name}: {error}", file=sys.stderr)
    if not results:
        first = next(iter(failures))
        raise DataError(f"{data_dir}: none of the {len(failures)} case(s) could be evaluated "
                        f"({first}: {failures[first]})")
    report = evaluation.write_report(out_dir, results)
    if failures:
        _append_failures(report, failures)
    return report, failures


def _evaluate_case(predictor, case_dir, out_dir, figures, refine):
    """Metrics ``{initial, method...}`` of one pair folder; its overlay with ``figures``."""
    pair = io.load_pair(case_dir)
    check_pair(pair, {key: os.path.join(case_dir, io.PAIR_FILES[key])
                      for key in ("fixed_landmarks", "moving_landmarks")})
    registered = _register(predictor, pair, refine)
    outcome = evaluation.evaluate_pair(pair, registered)
    if figures:
        save_overlay(os.path.join(out_dir, f"overlay_{pair['name']}.png"), pair,
                     registered["warped"], registered["displacement"])
    methods = {evaluation.INITIAL: outcome[evaluation.INITIAL]}
    if "network_displacement" in registered:  # both ran: the network alone beside the result
        methods[NETWORK] = evaluation.evaluate_displacement(pair, registered["network_displacement"])
        methods[NETWORK]["seconds"] = registered["seconds_network"]
    final = NETWORK if refine is None else (REFINED if predictor is not None else REFINED_ALONE)
    methods[final] = outcome["registered"]
    return methods


def _append_failures(report, failures):
    with open(report, "a") as handle:
        handle.write("\n## Cases not evaluated\n\n| Case | Reason |\n|---|---|\n")
        for name, reason in failures.items():
            handle.write(f"| {name} | {reason.replace('|', '/')} |\n")


def demo(model_path, out_dir, shape=(96, 96, 96), seed=1000, refine=None):
    """Generate a phantom pair, register it with ``model_path`` (None: the default model, see
    :mod:`tfmlreg.models`), then ``refine``; write outputs and metrics into ``out_dir``."""
    predictor = predictor_for(model_path)
    pair = phantom.make_pair(shape=shape, seed=seed)
    case = phantom.as_case(pair, f"phantom{seed}")
    io.write_image(os.path.join(out_dir, "fixed.nii.gz"), pair["fixed"], pair["spacing"])
    io.write_image(os.path.join(out_dir, "moving.nii.gz"), pair["moving"], pair["spacing"])
    return register_and_write(predictor, case, out_dir, refine)


def format_demo_report(summary, out_dir):
    before, after = summary[evaluation.INITIAL], summary["registered"]
    lines = [
        f"{'':24s}{'initial':>10s}{'registered':>12s}",
        f"{'TRE mean (mm)':24s}{before['tre_mean']:10.2f}{after['tre_mean']:12.2f}",
        f"{'TRE max (mm)':24s}{before['tre_max']:10.2f}{after['tre_max']:12.2f}",
        f"{'lobe Dice mean':24s}{before['dice_mean']:10.3f}{after['dice_mean']:12.3f}",
        f"{'folding (% voxels)':24s}{100 * before['folding']:10.3f}{100 * after['folding']:12.3f}",
        f"{'network time (s)':24s}{'':10s}{after['seconds_network']:12.2f}",
        f"{'refinement time (s)':24s}{'':10s}{after['seconds_refinement']:12.2f}",
        f"outputs in {out_dir}/: warped.nii.gz, displacement.nii.gz (mm), "
        "jacobian_determinant.nii.gz, metrics.json, overlay.png (and .svg)",
    ]
    return "\n".join(lines)
