"""What the ``tfmlreg`` commands do, as functions of plain arguments (docs/DESIGN.md section 3).

One function per command (:func:`demo`, :func:`register`, :func:`evaluate`, :func:`train`,
:func:`phantom`, :func:`synth`, :func:`export`) and the steps they are made of
(:func:`load_files`, :func:`register_and_write`, :func:`evaluate_folder`). :mod:`tfmlreg.cli`
only parses the command line, calls one of them and reports; Python callers get the same
checks and the same outputs. Errors name these functions' arguments (``out``, ``overwrite``,
``cases``...), never command-line flags: the CLI translates.

Outputs appear whole or not at all (:mod:`tfmlreg.output`): ``out`` must not exist or be an
empty folder unless ``overwrite``; a run holds a lock on it; a failed or interrupted run leaves
nothing. ``train`` writes into its config's output folder as it goes (it resumes from there).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike
from tqdm import tqdm

from tfmlreg import evaluation, experiment, export as exporting, metrics, output
from tfmlreg.ct import LOBE_NAMES
from tfmlreg.data import io, phantom as phantoms, synthetic
from tfmlreg.data.checks import check_pair
from tfmlreg.data.io import DataError
from tfmlreg.figures import save_overlays
from tfmlreg.inference import (NO_MODEL, Predictor, load_model, load_predictor,
                               moving_on_fixed_grid, register_pair)
from tfmlreg.types import PathLike, Shape, Spacing

if TYPE_CHECKING:
    from tfmlreg.refinement import RefineConfig

OUT = "out"  # the output argument, as messages name it
EXPORT_FORMATS = ("savedmodel", "onnx", "tf-trt")
SYNTH_DIRECTIONS = ("random", "exhale", "inhale")


class RegistrationFailed(RuntimeError):
    """The model returned no usable result for a pair (e.g. a non-finite displacement)."""


# --- the commands -----------------------------------------------------------------------------


def demo(out: PathLike, model: PathLike | None = None, shape: Shape = (96, 96, 96),
         seed: int = 1000, refine: RefineConfig | None = None,
         overwrite: bool = False) -> dict[str, dict[str, Any]]:
    """Generate a phantom pair, register it with ``model`` (None: the default model, see
    :mod:`tfmlreg.models`), then ``refine`` (a RefineConfig, or None for the network alone);
    write the pair, the outputs and metrics into ``out``. Returns the metrics summary."""
    _check_refinement(model, refine)
    with output.staged(out, overwrite, OUT) as staging:
        predictor, loading = _timed(load_predictor, model)
        pair = phantoms.make_pair(shape=shape, seed=seed)
        case = phantoms.as_case(pair, f"phantom{seed}")
        io.write_image(os.path.join(staging, "fixed.nii.gz"), pair["fixed"], pair["spacing"])
        io.write_image(os.path.join(staging, "moving.nii.gz"), pair["moving"], pair["spacing"])
        return register_and_write(predictor, case, staging, refine, seconds_loading=loading)


def register(fixed: PathLike, moving: PathLike, out: PathLike, model: PathLike | None = None, *,
             server: str | None = None, model_name: str | None = None,
             shape: Shape | None = None, precision: str = "auto",
             refine: RefineConfig | None = None, symmetric: bool = False,
             fixed_labels: PathLike | None = None,
             moving_labels: PathLike | None = None, fixed_landmarks: PathLike | None = None,
             moving_landmarks: PathLike | None = None, dirlab_case: int | None = None,
             overwrite: bool = False, progress: bool = False,
             figures: bool = True) -> dict[str, dict[str, Any]]:
    """Register the image file ``moving`` to ``fixed`` with ``model`` (see
    :func:`tfmlreg.inference.load_predictor`; or, with ``server``, the model ``model_name``
    served there on grid ``shape``, and ``model`` is not used; ``symmetric``: run both ways, see
    :class:`~tfmlreg.inference.SymmetricPredictor`), then ``refine``; write the
    outputs of :func:`register_and_write` into ``out``. Every input is checked before any model
    work. Returns the metrics summary."""
    if (fixed_landmarks is None) != (moving_landmarks is None):
        raise DataError("fixed_landmarks/moving_landmarks: give both or neither")
    if (fixed_labels is None) != (moving_labels is None):
        raise DataError("fixed_labels/moving_labels: give both or neither")
    if server is None and (model_name is not None or shape is not None):
        raise DataError(f"{'model_name' if model_name is not None else 'shape'}: only with "
                        "server (a local model knows its grid and needs no name)")
    _check_refinement(model, refine)
    with output.staged(out, overwrite, OUT) as staging:
        pair = load_files(fixed, moving, fixed_labels, moving_labels, fixed_landmarks,
                          moving_landmarks, dirlab_case)
        predictor, loading = _timed(load_predictor, model, precision, server=server, shape=shape,
                                    model_name=model_name, symmetric=symmetric)
        return register_and_write(predictor, pair, staging, refine, progress=progress,
                                  figures=figures, seconds_loading=loading)


def evaluate(data: PathLike, out: PathLike, model: PathLike | None = None,
             precision: str = "auto", figures: bool = True, refine: RefineConfig | None = None,
             overwrite: bool = False, symmetric: bool = False) -> tuple[str, dict[str, str]]:
    """Evaluate ``model`` (run both ways with ``symmetric``, then ``refine``) on every pair of
    the folder ``data``; write metrics.csv, results.md and figures into ``out`` (see
    :func:`evaluate_folder`). Returns ``(the report's path in out, {case: reason} of the cases
    that could not be evaluated)``."""
    _check_refinement(model, refine)
    with output.staged(out, overwrite, OUT) as staging:
        predictor = load_predictor(model, precision, symmetric=symmetric)
        report, failures = evaluate_folder(predictor, data, staging, figures=figures,
                                           refine=refine)
    return os.path.join(out, os.path.basename(report)), failures


def train(config: PathLike, verbose: int | str = "auto", restart: bool = False) -> Any:
    """Train as the experiment config file ``config`` says (:mod:`tfmlreg.experiment`):
    resumes an interrupted run of the same config, ``restart`` discards it. Returns where the
    run's files are (:func:`tfmlreg.experiment.paths`)."""
    settings = experiment.load_config(config)  # fully checked: a bad config writes nothing
    experiment.run(settings, verbose=verbose, restart=restart)
    return experiment.paths(settings)


def phantom(out: PathLike, cases: int = 1, shape: Shape = (96, 96, 96),
            spacing: Spacing | None = None, seed: int = 0, amplitude_mm: float = 25.0,
            overwrite: bool = False) -> list[str]:
    """Write ``cases`` phantom pairs (:mod:`tfmlreg.data.phantom`) as pair folders into ``out``;
    returns their names."""
    if cases < 1:
        raise DataError(f"cases: expected at least 1, got {cases}")
    with output.staged(out, overwrite, OUT) as staging:
        try:
            return phantoms.write_dataset(staging, cases=cases, shape=tuple(shape),
                                          spacing=spacing, seed=seed, amplitude_mm=amplitude_mm)
        except DataError:
            raise
        except ValueError as error:  # the generator's checks of its settings (grid too small...)
            raise DataError(f"shape/spacing/amplitude_mm: {_first_line(error)}") from None


def synth(ct: Sequence[PathLike], out: PathLike, pairs_per_scan: int = 1, spacing_mm: float = 2.0,
          amplitude_mm: float = 30.0, min_amplitude_mm: float | None = None,
          direction: str = "random", seed: int = 0, crop_body_mm: float | None = None,
          overwrite: bool = False) -> list[str]:
    """Write synthetic breathing pairs made from the CT files ``ct`` into ``out``
    (:func:`tfmlreg.data.synthetic.write_pairs`; ``min_amplitude_mm`` defaults to half of
    ``amplitude_mm``); returns the pair folders written."""
    if crop_body_mm is not None and crop_body_mm < 0:
        raise DataError(f"crop_body_mm: expected a margin >= 0 mm, got {crop_body_mm:g}")
    if pairs_per_scan < 1:
        raise DataError(f"pairs_per_scan: expected at least 1, got {pairs_per_scan}")
    low = amplitude_mm / 2.0 if min_amplitude_mm is None else min_amplitude_mm
    if not 0.0 <= low <= amplitude_mm:
        raise DataError(f"min_amplitude_mm/amplitude_mm: expected 0 <= {low:g} <= "
                        f"{amplitude_mm:g} mm")
    if direction not in SYNTH_DIRECTIONS:
        raise DataError(f"direction: expected one of {', '.join(SYNTH_DIRECTIONS)}, got {direction!r}")
    names = [os.path.basename(os.path.normpath(path)) for path in ct]
    if len(set(names)) < len(names):
        raise DataError("ct: two scans share a file name; their pair folders would collide")
    with output.staged(out, overwrite, OUT) as staging:
        return synthetic.write_pairs(ct, staging, pairs_per_scan, spacing_mm=spacing_mm,
                                     amplitude_mm=amplitude_mm, min_amplitude_mm=low,
                                     direction=direction, seed=seed, crop_body_mm=crop_body_mm)


def export(model: PathLike, out: PathLike, format: str = "savedmodel", version: int = 1,
           opset: int = 17, plain_geometry: bool = False, overwrite: bool = False) -> PathLike:
    """Export the trained ``.keras`` ``model``; returns what was written.

    ``format="savedmodel"``: a new version folder ``out/<version>/`` in the model root ``out``
    for TF Serving (other versions are left alone; an existing version is never replaced);
    ``"onnx"``: ``out`` if it ends in ``.onnx``, else ``out/model.onnx``, its parity with Keras
    checked; ``"tf-trt"``: a TF-TRT SavedModel folder ``out`` (needs a TensorFlow with TF-TRT,
    checked first). ``plain_geometry``: SavedModel geometry as plain ops, not XLA-compiled."""
    if format not in EXPORT_FORMATS:
        raise DataError(f"format: expected one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DataError(f"version: expected a positive integer, got {version!r}")
    if format == "savedmodel":
        return _export_saved_model(model, out, version, plain_geometry)
    if format == "onnx":
        path = out if str(out).endswith(".onnx") else os.path.join(out, "model.onnx")
        with output.staged(path, overwrite, OUT, folder=False) as staging:
            keras_model = load_model(model)
            staged = os.path.join(staging, os.path.basename(path))
            exporting.export_onnx(keras_model, staged, opset=opset)
            exporting.check_onnx_parity(staged, keras_model)
        return path
    exporting.require_tf_trt()  # before any work: official pip wheels since 2.18 lack it
    with output.staged(out, overwrite, OUT) as staging:
        keras_model = load_model(model)
        with tempfile.TemporaryDirectory() as scratch:
            saved = exporting.export_saved_model(keras_model, os.path.join(scratch, "model"),
                                                 version=1)
            os.rmdir(staging)  # the converter makes its folder itself
            exporting.export_tf_trt(saved, staging)
    return out


def _export_saved_model(model: PathLike, root: PathLike, version: int,
                        plain_geometry: bool) -> str:
    target = os.path.join(root, str(version))
    with output.locked(root, OUT):
        if os.path.lexists(root) and not os.path.isdir(root):
            raise DataError(f"{OUT}: {root} exists and is not a folder")
        if os.path.exists(target):
            raise DataError(f"{OUT}: version folder {target} exists; choose another version")
        created = not os.path.exists(root)
        try:
            keras_model = load_model(model)
            for name in os.listdir(root) if os.path.isdir(root) else []:
                if name.startswith(".") and ".partial" in name:  # left by a killed export
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            return exporting.export_saved_model(keras_model, root, version=version,
                                                compiled_geometry=not plain_geometry)
        except BaseException:
            if created:
                shutil.rmtree(root, ignore_errors=True)
            raise


def _check_refinement(model: PathLike | None, refine: RefineConfig | None) -> None:
    if refine is None and str(model).lower() == NO_MODEL:
        raise DataError("refine: with model none (no network) the refinement is all there is "
                        "to run")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --- the steps --------------------------------------------------------------------------------


def load_files(fixed: PathLike, moving: PathLike, fixed_labels: PathLike | None = None,
               moving_labels: PathLike | None = None, fixed_landmarks: PathLike | None = None,
               moving_landmarks: PathLike | None = None,
               dirlab_case: int | None = None) -> dict[str, Any]:
    """A pair dict (as :func:`tfmlreg.data.io.load_pair` returns) from image, label and landmark
    files: any supported format, canonical orientation, the moving image in the fixed image's
    frame; every input checked (:func:`tfmlreg.data.checks.check_pair`)."""
    pair = io.load_images(fixed, moving, fixed_labels=fixed_labels, moving_labels=moving_labels,
                          fixed_landmarks=fixed_landmarks, moving_landmarks=moving_landmarks,
                          dirlab_case=dirlab_case, name=os.path.basename(os.path.normpath(fixed)))
    check_pair(pair, {"fixed_landmarks": fixed_landmarks, "moving_landmarks": moving_landmarks})
    return pair


def register_and_write(predictor: Predictor | None, pair: Mapping[str, Any], out_dir: PathLike,
                       refine: RefineConfig | None = None, progress: bool = False,
                       figures: bool = True, seconds_loading: float = 0.0) -> dict[str, dict[str, Any]]:
    """Register (the network, then the refinement ``refine``, a RefineConfig or None), then write
    the warped image, the displacement (mm), the Jacobian determinant, (with ``figures``) an
    overlay figure and, last, metrics.json into the folder ``out_dir``; returns the metrics
    summary with the time of each part (:data:`PART_TIMES`; ``seconds_loading``, the caller's time
    to load the model, is passed through). Raises :class:`RegistrationFailed` (nothing written) if
    the result is not finite."""
    result = _register(predictor, pair, refine, progress)
    start = time.perf_counter()
    spacing = np.asarray(pair["spacing_fixed"], np.float32)
    affine = pair.get("affine_fixed")  # outputs overlay on the fixed input (diag(spacing) if none)
    # The three volumes are written side by side: zlib lets go of the GIL while it compresses,
    # which is most of the time of writing a full-resolution CT's files.
    with ThreadPoolExecutor(max_workers=3) as pool:
        writes = [
            pool.submit(io.write_image, os.path.join(out_dir, "warped.nii.gz"), result["warped"],
                        spacing, affine),
            pool.submit(io.write_displacement, os.path.join(out_dir, "displacement.nii.gz"),
                        result["displacement"], spacing, affine)]
        jacobian = metrics.jacobian_determinant(result["displacement"], spacing)  # written, and
        writes.append(pool.submit(io.write_image,  # counted for the folding: computed once
                                  os.path.join(out_dir, "jacobian_determinant.nii.gz"), jacobian,
                                  spacing, affine))
        summary = _summary(evaluation.evaluate_pair(pair, result, jacobian))
        if figures:  # part of seconds_outputs; --no-figures skips it
            save_overlay(os.path.join(out_dir, "overlay.png"), pair, result["warped"],
                         result["displacement"])
        for write in writes:
            write.result()  # a failed write raises here, before metrics.json
    times = dict(result, seconds_loading=seconds_loading,
                 seconds_outputs=time.perf_counter() - start)
    summary["registered"].update({key: float(times[key]) for key in PART_TIMES})
    with open(os.path.join(out_dir, "metrics.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary


# The parts of a registration's time (metrics.json, "registered"): loading the model, the network,
# the refinement, evaluating and writing the outputs. The rest of a command's wall time is start-up
# (Python, TensorFlow's import: docs/RESULTS.md) and reading the images.
PART_TIMES = ("seconds_loading", "seconds_network", "seconds_refinement", "seconds_outputs")


def _timed(function: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    return function(*args, **kwargs), time.perf_counter() - start


def _register(predictor: Predictor | None, pair: Mapping[str, Any],
              refine: RefineConfig | None = None, progress: bool = False) -> dict[str, Any]:
    """:func:`register_pair`, its result checked: a non-finite field is an error, not a result."""
    try:
        result = register_pair(predictor, pair, refine, progress)
    except FloatingPointError as error:  # the refinement's own check
        raise RegistrationFailed(f"{pair['name']}: {error}; no result written") from None
    return checked_result(result, pair["name"])


def checked_result(result: dict[str, Any], name: str) -> dict[str, Any]:
    """``result`` of :func:`register_pair` if finite; else :class:`RegistrationFailed`."""
    for key in ("displacement", "warped", "network_displacement"):
        if key in result and not np.all(np.isfinite(result[key])):
            raise RegistrationFailed(f"{name}: the registration returned a {key} with NaN or "
                                     "infinite values; no result written")
    return result


def save_overlay(path: PathLike, pair: Mapping[str, Any], warped: ArrayLike,
                 displacement: ArrayLike | None = None) -> None:
    """Overlays before and after: the moving image resampled onto the fixed grid (the identity
    map: the pair may have different shapes and spacings) and the warped image, on the fixed;
    with ``displacement`` also its Jacobian and what it takes from outside the moving scan."""
    save_overlays(path, pair["fixed"], {"before": moving_on_fixed_grid(pair), "after": warped},
                  pair["spacing_fixed"], displacement=displacement, title=pair.get("name"),
                  moving_extent_mm=np.shape(pair["moving"]) * np.asarray(pair["spacing_moving"]))


def _summary(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """JSON-ready metrics: per-landmark errors dropped, labels as strings."""
    out = {}
    for method, values in results.items():
        entry = {key: value for key, value in values.items() if key not in ("tre", "dice")}
        if "dice" in values:
            entry["dice"] = {LOBE_NAMES.get(k, str(k)): v for k, v in values["dice"].items()}
        out[method] = {key: _plain(value) for key, value in entry.items()}
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return float(value)


NETWORK, REFINED, REFINED_ALONE = "network", "network + refinement", "refinement"


def evaluate_folder(predictor: Predictor | None, data_dir: PathLike, out_dir: PathLike,
                    figures: bool = True,
                    refine: RefineConfig | None = None) -> tuple[str, dict[str, str]]:
    """Evaluate every pair of ``data_dir``; writes metrics.csv, results.md, the Dice box plot and
    (with ``figures``) one overlay per case into the folder ``out_dir``. Methods side by side:
    the network alone and, with ``refine`` (a RefineConfig), the network + refinement (or the
    refinement alone when ``predictor`` is None).

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


def _evaluate_case(predictor: Predictor | None, case_dir: str, out_dir: PathLike, figures: bool,
                   refine: RefineConfig | None) -> dict[str, dict[str, Any]]:
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


def _append_failures(report: str, failures: Mapping[str, str]) -> None:
    with open(report, "a") as handle:
        handle.write("\n## Cases not evaluated\n\n| Case | Reason |\n|---|---|\n")
        for name, reason in failures.items():
            handle.write(f"| {name} | {reason.replace('|', '/')} |\n")


def format_demo_report(summary: Mapping[str, Mapping[str, Any]], out_dir: PathLike) -> str:
    """The demo's metrics as a small table, and where its outputs are."""
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
