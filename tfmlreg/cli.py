"""The ``tfmlreg`` command: demo, register, train, evaluate, phantom, synth, export.

Each command is a function of :mod:`tfmlreg.commands` taking plain arguments; this module only
parses the command line, calls it and reports, showing the library's argument names in its
messages as this command's flags (``out`` as ``--out``, ``overwrite=True`` as ``--overwrite``).

Outputs. ``--out`` must not exist or be an empty folder, unless ``--overwrite`` (which replaces
it). Every command writes into a hidden staging folder beside ``--out`` and moves it into place
only when it has succeeded, so an error, Ctrl-C or a kill leaves no partial output; a run holds
a lock on its output, so a second run aimed at the same ``--out`` is refused instead of mixing
files with the first (see :mod:`tfmlreg.output`). ``train`` writes into the config's ``output``
folder as it goes, because that is what it resumes from: rerunning the same config resumes it,
a changed config is refused with what changed, ``--restart`` discards the run.

Input is checked before any model work: images (readable, 3-D, finite, a plausible voxel size
of 0.05-20 mm), label maps, landmark files (columns, the same count in both, inside the image),
configs (every key known, every type checked), the model file.

Exit codes and messages (one line on stderr, ``tfmlreg: ...``):

* 0: done.
* 2: bad input or arguments, naming the file, argument or key and what is wrong (the project's
  own input errors: ``DataError``, ``UsageError``, ``OutputError``); nothing written. ``evaluate``
  also exits 2 when some cases could not be evaluated: it reports each (name and reason),
  writes the results of the others and ends with a summary line.
* 1: a failure of the environment (an unreachable or failing server, a TensorFlow build without
  TF-TRT, a full disk) or a registration without a finite result; or an unexpected exception,
  a bug: ``tfmlreg: internal error: ...`` with where to report it.
* 130: interrupted (Ctrl-C), 143: terminated (SIGTERM); nothing written.

``--debug`` (or the environment variable ``TFMLREG_DEBUG=1``) adds the Python traceback and
TensorFlow's own log lines, which are otherwise silenced. ``tfmlreg --help`` and ``tfmlreg
COMMAND --help`` answer without importing TensorFlow.
"""

from __future__ import annotations

import os

# TensorFlow reads these when it is imported, which happens only after the arguments are parsed.
# C++ log level: 3 unless --debug (main() sets it, whatever the environment says): loading each
# cached XLA executable logs two ERROR lines that ask nothing of the user (a text-format parse
# tried first, a CPU-feature comparison over tuning flags), and a real failure still reaches the
# user as the Python exception's message. With --debug: the environment's level, or 2.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from types import FrameType, ModuleType  # noqa: E402
from typing import Any  # noqa: E402

from tfmlreg import compilation_cache  # noqa: E402  (no TensorFlow)
from tfmlreg import models  # noqa: E402  (no TensorFlow)
from tfmlreg import output  # noqa: E402
from tfmlreg.output import OutputError  # noqa: E402

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
DEBUG_VARIABLE = "TFMLREG_DEBUG"
REPORT_AT = "the tfmlreg issue tracker, with the command line and the --debug output"
# $TFMLREG_MODEL, else the chest-CT model shipped as package data (tfmlreg/models/chest_ct/)
DEFAULT_MODEL = models.default_model()

_show_tensorflow_logs = False  # set by main() from --debug


class UsageError(Exception):
    """A bad argument: reported in one line, exit code 2."""


class EnvironmentProblem(Exception):
    """This installation or machine cannot do what was asked: one line, exit code 1."""


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that staged outputs are cleaned up."""


def _load(module_name: str) -> ModuleType:
    """Import a module that imports TensorFlow, TensorFlow first and quietly."""
    if not _show_tensorflow_logs:
        _import_tensorflow_quietly()
    return importlib.import_module(module_name)


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow with the stderr file descriptor pointed at a scratch file.

    TensorFlow 2.21 writes a few C++ log lines while its libraries load, before it applies
    ``TF_CPP_MIN_LOG_LEVEL``. They are dropped, or replayed if the import fails.
    """
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as scratch:
            os.dup2(scratch.fileno(), 2)
            try:
                importlib.import_module("tensorflow")
            except BaseException:
                os.dup2(saved, 2)
                scratch.seek(0)
                sys.stderr.write(scratch.read().decode(errors="replace"))
                raise
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# --- subcommands ------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> None:
    commands = _load("tfmlreg.commands")
    report = commands.demo(args.out, args.model, shape=tuple(args.shape), seed=args.seed,
                           refine=_refine_config(args), overwrite=args.overwrite)
    print(commands.format_demo_report(report, args.out))


def cmd_register(args: argparse.Namespace) -> None:
    commands = _load("tfmlreg.commands")
    summary = commands.register(
        args.fixed, args.moving, args.out, args.model, server=args.server,
        model_name=args.model_name, shape=args.shape, precision=args.precision,
        refine=_refine_config(args), symmetric=args.symmetric,
        fixed_labels=args.fixed_labels,
        moving_labels=args.moving_labels, fixed_landmarks=args.fixed_landmarks,
        moving_landmarks=args.moving_landmarks, dirlab_case=args.dirlab_case,
        overwrite=args.overwrite, progress=sys.stderr.isatty(), figures=not args.no_figures)
    print(json.dumps(summary, indent=2))
    times = summary["registered"]
    print(f"model loading {times['seconds_loading']:.2f} s, network {times['seconds_network']:.2f} "
          f"s, refinement {times['seconds_refinement']:.2f} s, outputs "
          f"{times['seconds_outputs']:.2f} s", file=sys.stderr)


def _refine_config(args: argparse.Namespace) -> Any:
    """The refinement settings of the command's options; None with ``--no-refine``."""
    if args.no_refine:
        if str(args.model).lower() == "none":
            raise UsageError("--no-refine: with --model none there would be nothing to run")
        return None
    refinement = _load("tfmlreg.refinement")
    settings = {key: value for key, value in (("iterations", args.refine_iterations),
                                              ("alpha", args.alpha), ("epsilon", args.epsilon),
                                              ("folding", args.folding),
                                              ("finest_spacing_mm", args.refine_spacing))
                if value is not None}
    try:
        return refinement.RefineConfig(**settings)
    except ValueError as error:
        raise UsageError(f"--refine options: {error}") from None


def add_network_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
        help="the network's precision (default auto: bfloat16 on CPUs with native bfloat16, "
             "float16 on GPUs, else float32; geometry stays float32; a SavedModel runs its "
             "model.keras for a reduced precision)")
    parser.add_argument(
        "--symmetric", action="store_true",
        help="run the network both ways (fixed/moving swapped) and average the fields "
             "inverse-consistently: twice the network's time, a smaller error on real CT "
             "(docs/RESULTS.md)")


def add_refine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("refinement (per-pair optimisation of NGF + alpha*curvature)")
    group.add_argument("--no-refine", action="store_true",
                       help="the network alone, no refinement")
    group.add_argument("--refine-iterations", type=int, metavar="N",
                       help="Adam steps on the finest level, at most (default 60; each coarser "
                            "level up to twice as many)")
    group.add_argument("--refine-spacing", type=float, metavar="MM",
                       help="spacing of the finest refinement grid, no finer than the image's "
                            "(default 2)")
    group.add_argument("--alpha", type=float, help="curvature weight (default 8)")
    group.add_argument("--folding", type=float, help="folding penalty weight (default 10; 0: the "
                                                     "paper's NGF + alpha*curvature alone)")
    group.add_argument("--epsilon", type=float, help="NGF edge noise level (default 0.01)")


def cmd_train(args: argparse.Namespace) -> None:
    commands = _load("tfmlreg.commands")
    # progress bars on a terminal, one line per epoch in a log file
    verbose = 0 if args.quiet else (1 if sys.stdout.isatty() else 2)
    where = commands.train(args.config, verbose=verbose, restart=args.restart)
    print(f"trained model: {where['model']}; SavedModel: {where['saved_model']}/1")


def cmd_evaluate(args: argparse.Namespace) -> int:
    commands = _load("tfmlreg.commands")
    report, failures = commands.evaluate(args.data, args.out, args.model, args.precision,
                                         figures=not args.no_figures, refine=_refine_config(args),
                                         symmetric=args.symmetric,
                                         overwrite=args.overwrite)
    with open(report) as handle:
        print(handle.read())
    if failures:
        names = ", ".join(failures)
        print(f"tfmlreg: error: {len(failures)} case(s) could not be evaluated ({names}; reasons "
              f"above and in {report}); the results of the others are in {args.out}",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def cmd_phantom(args: argparse.Namespace) -> None:
    commands = _load("tfmlreg.commands")
    commands.phantom(args.out, args.cases, shape=args.shape, spacing=args.spacing, seed=args.seed,
                     amplitude_mm=args.amplitude, overwrite=args.overwrite)
    print(f"wrote {args.cases} phantom pair(s) to {args.out}")


def cmd_synth(args: argparse.Namespace) -> None:
    commands = _load("tfmlreg.commands")
    written = commands.synth(args.ct, args.out, args.pairs_per_scan, spacing_mm=args.spacing,
                             amplitude_mm=args.amplitude, min_amplitude_mm=args.min_amplitude,
                             direction=args.direction, seed=args.seed,
                             crop_body_mm=args.crop_body, overwrite=args.overwrite)
    print(f"wrote {len(written)} synthetic breathing pair(s) to {args.out}")


def cmd_export(args: argparse.Namespace) -> None:
    commands, export = _load("tfmlreg.commands"), _load("tfmlreg.export")
    if args.format == "tf-trt":
        try:
            export.require_tf_trt()  # before any work: official pip wheels since 2.18 lack it
        except RuntimeError as error:
            raise EnvironmentProblem(_as_flags(str(error), args)) from None
    written = commands.export(args.model, args.out, args.format, args.version, opset=args.opset,
                              plain_geometry=args.plain_geometry, overwrite=args.overwrite)
    print({"savedmodel": f"SavedModel for TF Serving: {written}",
           "onnx": f"ONNX (opset {args.opset}), parity with Keras checked: {written}",
           "tf-trt": f"TF-TRT SavedModel: {written}"}[args.format])


# --- parser -----------------------------------------------------------------------------------


def _examples(text: str) -> str:
    """An epilog of example lines; a line starting with ``--`` continues the one before it."""
    lines = [line.strip() for line in text.strip().splitlines()]
    return "examples:\n" + "\n".join(("      " if line.startswith("--") else "  ") + line
                                      for line in lines)


OVERWRITE_HELP = "replace --out if it exists and is not empty (only once the command has succeeded)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfmlreg", description="Multilevel deep-learning 3D image registration (mlVIRNET).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_examples("""
            tfmlreg demo
            tfmlreg register --fixed exhale.nii.gz --moving inhale.nii.gz --out result/
            tfmlreg train training/demo.json
            tfmlreg evaluate --model runs/demo/model.keras --data phantoms/ --out eval/
        """) + "\n\nexit codes: 0 done, 2 bad input, 1 failure or internal error, 130 interrupted",
    )
    parser.add_argument("--debug", action="store_true",
                        help=f"print tracebacks and TensorFlow's log lines (or set {DEBUG_VARIABLE}=1)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, function: Callable[[argparse.Namespace], int | None], help_text: str,
                examples: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  epilog=_examples(examples),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(function=function)
        # also accepted after the command; SUPPRESS keeps it from resetting the global flag
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="print tracebacks and TensorFlow's log lines")
        return sub

    model_help = ("trained model: SavedModel folder (versioned root or version), .keras file, or "
                  f"'none' for refinement alone (default: {DEFAULT_MODEL})")

    demo = command("demo", cmd_demo, "register a phantom pair with the shipped model",
                   "tfmlreg demo\n tfmlreg demo --out /tmp/demo --seed 3")
    demo.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    demo.add_argument("--out", default="tfmlreg-demo", help="output folder (default: ./tfmlreg-demo)")
    demo.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    demo.add_argument("--shape", type=int, nargs=3, default=(96, 96, 96), metavar=("D", "H", "W"),
                      help="phantom grid (full resolution; default 96 96 96)")
    demo.add_argument("--seed", type=int, default=1000, help="phantom seed (default 1000, unseen in training)")
    add_refine_options(demo)

    register = command(
        "register", cmd_register, "register a moving image to a fixed image",
        """tfmlreg register --fixed exhale.nii.gz --moving inhale.nii.gz --out result/
        tfmlreg register --fixed case1_T50.img --moving case1_T00.img --dirlab-case 1 \\
            --fixed-landmarks case1_300_T50_xyz.txt --moving-landmarks case1_300_T00_xyz.txt --out r/
        tfmlreg register --fixed f.nii.gz --moving m.nii.gz --server gpu-host:8500 --model-name chest_ct --out r/""",
    )
    register.add_argument("--fixed", required=True, help="fixed image (NIfTI, or DIR-LAB .img)")
    register.add_argument("--moving", required=True, help="moving image (NIfTI, or DIR-LAB .img)")
    register.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    register.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    register.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    register.add_argument("--server", help="TF Serving gRPC address HOST:PORT instead of --model")
    register.add_argument("--model-name", metavar="NAME",
                          help="the model's name on the server (with --server; default: chest_ct, "
                               "as in serving/models.config)")
    register.add_argument("--shape", type=int, nargs=3, metavar=("D", "H", "W"),
                          help="grid of the served model (with --server; default: read from the "
                               "server's model metadata)")
    register.add_argument("--dirlab-case", type=int, help="DIR-LAB case 1-10 for .img inputs")
    register.add_argument("--fixed-labels", help="fixed label map (NIfTI)")
    register.add_argument("--moving-labels", help="moving label map (NIfTI)")
    register.add_argument("--fixed-landmarks", help="fixed landmarks (DIR-LAB txt: 1-based voxel x y z)")
    register.add_argument("--moving-landmarks", help="moving landmarks (DIR-LAB txt)")
    register.add_argument("--no-figures", action="store_true",
                          help="skip the overlay figure (saves about a second)")
    add_network_options(register)
    add_refine_options(register)

    train = command("train", cmd_train,
                    "train a model from a JSON config (rerun the same command to resume)",
                    "tfmlreg train training/demo.json\n tfmlreg train training/paper_multilevel_pretrained.json")
    train.add_argument("config", help="experiment config (JSON), see training/")
    train.add_argument("--quiet", action="store_true", help="no Keras progress bars")
    train.add_argument("--restart", action="store_true",
                       help="discard the run in the config's output folder (e.g. after editing the "
                            "config) and train from scratch")
    train.set_defaults(interrupted="interrupted; rerun the same command to resume")

    evaluate = command("evaluate", cmd_evaluate, "evaluate a model on a folder of pairs at full resolution",
                       "tfmlreg evaluate --model runs/demo/model.keras --data phantoms/ --out eval/")
    evaluate.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    evaluate.add_argument("--data", required=True, help="folder of pairs (see tfmlreg.data.io)")
    evaluate.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    evaluate.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    evaluate.add_argument("--no-figures", action="store_true", help="skip the overlay figures")
    add_network_options(evaluate)
    add_refine_options(evaluate)

    phantom = command("phantom", cmd_phantom, "write synthetic breathing-lung phantom pairs",
                      "tfmlreg phantom --out phantoms/ --cases 4\n tfmlreg phantom --out big/ --cases 1 --shape 160 160 160")
    phantom.add_argument("--out", required=True, help="output folder (pair layout; must not exist or be empty)")
    phantom.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    phantom.add_argument("--cases", type=int, default=1, help="number of pairs (default 1)")
    phantom.add_argument("--shape", type=int, nargs=3, default=(96, 96, 96), metavar=("D", "H", "W"))
    phantom.add_argument("--spacing", type=float, nargs=3, metavar=("DX", "DY", "DZ"),
                         help="voxel size in mm (default: a 320 mm field of view)")
    phantom.add_argument("--seed", type=int, default=0, help="seed of the first case (default 0)")
    phantom.add_argument("--amplitude", type=float, default=25.0, help="max cranio-caudal motion in mm")

    synth = command("synth", cmd_synth, "write synthetic breathing pairs made from real chest CT scans",
                    "tfmlreg synth --ct scan1.nii.gz scan2.nii.gz --out synth/ --pairs-per-scan 4\n"
                    " tfmlreg synth --ct scan.nii.gz --out eval/ --amplitude 25 --min-amplitude 25 --direction exhale")
    synth.add_argument("--ct", nargs="+", required=True, metavar="FILE",
                       help="chest CT images in HU (any orientation); pairs go to OUT/<scan>_<k>/")
    synth.add_argument("--out", required=True, help="output folder (pair layout; must not exist or be empty)")
    synth.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    synth.add_argument("--pairs-per-scan", type=int, default=1, help="pairs per scan (default 1)")
    synth.add_argument("--spacing", type=float, default=2.0,
                       help="working voxel size in mm, isotropic: the scan is resampled first (default 2)")
    synth.add_argument("--amplitude", type=float, default=30.0,
                       help="largest cranio-caudal motion in mm (default 30)")
    synth.add_argument("--min-amplitude", type=float,
                       help="smallest (default: half of --amplitude); each pair draws uniformly between")
    synth.add_argument("--direction", choices=("random", "exhale", "inhale"), default="random",
                       help="the moving image's breathing state against the scan (default random)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--crop-body", type=float, default=None, metavar="MM",
                       help="crop each scan to its body plus this margin first, as a training "
                            "config's scans.crop_body_mm (default: the whole scan)")

    export = command("export", cmd_export, "export a trained model for TF Serving, ONNX or TF-TRT",
                     "tfmlreg export --model runs/demo/model.keras --out saved_models/mine --version 2\n"
                     " tfmlreg export --model runs/demo/model.keras --out model.onnx --format onnx")
    export.add_argument("--model", required=True, help="trained .keras model")
    export.add_argument("--out", required=True, help="model root (savedmodel), .onnx path, or folder")
    export.add_argument("--overwrite", action="store_true",
                        help="replace an existing ONNX file or TF-TRT folder (a SavedModel version "
                             "is never replaced: give another --version)")
    export.add_argument("--version", type=int, default=1, help="SavedModel version folder (default 1)")
    export.add_argument("--format", choices=("savedmodel", "onnx", "tf-trt"), default="savedmodel")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
    export.add_argument("--plain-geometry", action="store_true",
                        help="SavedModel geometry as plain ops, not XLA-compiled (for TF Serving "
                             "without --xla_cpu_compilation_enabled=true)")
    return parser


# --- running a command: exit codes and one-line messages --------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    global _show_tensorflow_logs
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    _show_tensorflow_logs = debug
    if not debug:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    compilation_cache.enable()  # before TensorFlow is imported: compiled steps kept across runs
    previous = _on_signal(signal.SIGTERM, _raise_terminated)
    previous_interrupt = _on_signal(signal.SIGINT, _raise_interrupted)
    output.signalled.clear()
    try:
        return args.function(args) or 0
    except KeyboardInterrupt:
        return _report(getattr(args, "interrupted", "interrupted"), None, debug, EXIT_INTERRUPTED)
    except Terminated:
        return _report("terminated", None, debug, EXIT_TERMINATED)
    except Exception as error:  # noqa: BLE001  every error ends in one line (see the docstring)
        if isinstance(error, _input_errors()):
            return _report(f"error: {_as_flags(_first_line(error), args)}", error, debug,
                           EXIT_BAD_INPUT)
        if isinstance(error, _environment_errors()):
            return _report(f"error: {_describe(error)}", error, debug, EXIT_FAILURE)
        return _report(f"internal error: {type(error).__name__}: {_first_line(error)} (a bug: "
                       f"please report it at {REPORT_AT}; rerun with --debug or "
                       f"{DEBUG_VARIABLE}=1 for the traceback)", error, debug, EXIT_FAILURE)
    finally:
        _on_signal(signal.SIGTERM, previous)
        _on_signal(signal.SIGINT, previous_interrupt)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    output.signalled.append(Terminated)  # raised again at the commit point if swallowed
    raise Terminated()


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    output.signalled.append(KeyboardInterrupt)
    raise KeyboardInterrupt()


def _on_signal(signum: int, handler: Any) -> Any:
    """Install ``handler`` for ``signum`` (main thread only); returns the one it replaced."""
    try:
        return signal.signal(signum, handler)
    except (ValueError, TypeError):  # not the main thread, or no handler to restore
        return None


def _input_errors() -> tuple[type[Exception], ...]:
    """The project's own input errors (DataError only exists once its module is imported)."""
    kinds = [UsageError, OutputError]
    io = sys.modules.get("tfmlreg.data.io")
    if io is not None:
        kinds.append(io.DataError)
    return tuple(kinds)


def _environment_errors() -> tuple[type[Exception], ...]:
    kinds = [EnvironmentProblem, OSError]  # OSError includes ConnectionError (the server)
    for module, name in (("tfmlreg.serving", "ServingError"), ("tfmlreg.commands", "RegistrationFailed")):
        if module in sys.modules:
            kinds.append(getattr(sys.modules[module], name))
    return tuple(kinds)


# The library's errors name its arguments (tfmlreg.commands); a command's user gave flags. An
# argument becomes its flag when the command has that flag:
# * these names wherever they stand (distinctive words: argument -> flag);
ARGUMENT_FLAGS = {"dirlab_case": "--dirlab-case", "target_spacing": "--spacing",
                  "model_name": "--model-name", "pairs_per_scan": "--pairs-per-scan",
                  "min_amplitude_mm": "--min-amplitude", "amplitude_mm": "--amplitude",
                  "spacing_mm": "--spacing", "crop_body_mm": "--crop-body"}
# * these only as the names a message starts with ("out: ...", "shape/spacing: ..."): as plain
#   words they would be read in every sentence (not label and landmark files either: their
#   errors name the files, e.g. fixed_landmarks.txt);
LEADING_ARGUMENTS = ("out", "cases", "ct", "version", "format", "shape", "spacing",
                     "fixed_labels", "moving_labels", "fixed_landmarks", "moving_landmarks")
# * and the phrases in which the library names an argument's value.
PHRASES = {"use overwrite=True": ("overwrite", "use --overwrite"),
           "only with server": ("server", "only with --server"),
           "choose another version": ("version", "choose another --version"),
           "use format='onnx' (export_onnx)": ("format", "use --format onnx"),
           "rerun with restart=True": ("restart", "rerun with --restart")}


def _flag(name: str) -> str:
    return ARGUMENT_FLAGS.get(name, "--" + name.replace("_", "-"))


def _as_flags(message: str, args: argparse.Namespace) -> str:
    """``message`` with the library's argument names replaced by this command's flags."""
    def has(name: str) -> bool:
        return hasattr(args, _flag(name)[2:].replace("-", "_"))

    head, colon, rest = message.partition(": ")
    names = head.split("/")
    if colon and all((name in LEADING_ARGUMENTS or name in ARGUMENT_FLAGS) and has(name)
                     for name in names):
        head, message = "/".join(_flag(name) for name in names) + colon, rest
    else:
        head = ""
    for name, flag in ARGUMENT_FLAGS.items():
        if has(name):
            message = re.sub(rf"(?<![\w/.-]){name}(?![\w.-])", flag, message)
    message = head + message
    for phrase, (name, flagged) in PHRASES.items():
        if has(name):
            message = message.replace(phrase, flagged)
    return message


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and not isinstance(error, ConnectionError) and error.strerror:
        where = error.filename if error.filename is not None else type(error).__name__
        return f"{where}: {error.strerror}"
    return _first_line(error)


def _report(message: str, error: BaseException | None, debug: bool, code: int) -> int:
    if debug and error is not None:
        traceback.print_exception(error)
    print(f"tfmlreg: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
