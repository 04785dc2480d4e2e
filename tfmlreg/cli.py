"""The ``tfmlreg`` command: demo, register, train, evaluate, phantom, export.

Every subcommand writes its outputs into a hidden temporary folder beside ``--out`` and moves
them into place only when it has succeeded, so a failure leaves no partial output. Bad input
(missing or corrupt file, non-3-D image, NaN, zero spacing, a shape the model cannot take) ends
with a one-line ``tfmlreg: error: ...`` naming the file or argument, and exit code 2; a failure
of the environment (an unreachable server, a TensorFlow build without TF-TRT) with one line and
exit code 1.
"""

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.environ.get("TFMLREG_MODEL", os.path.join(REPO_ROOT, "saved_models", "demo"))


class UsageError(ValueError):
    """A bad argument or input: reported in one line, exit code 2."""


@contextlib.contextmanager
def staged_output(out_dir):
    """Yield a temporary folder; on success its files move into ``out_dir``, on failure it goes."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
    try:
        yield staging
        os.makedirs(out_dir, exist_ok=True)
        for name in os.listdir(staging):
            target = os.path.join(out_dir, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, name), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- subcommands ------------------------------------------------------------------------------


def cmd_demo(args):
    from tfmlreg import workflows

    with staged_output(args.out) as staging:
        report = workflows.demo(args.model, staging, shape=tuple(args.shape), seed=args.seed)
    print(workflows.format_demo_report(report, args.out))


def cmd_register(args):
    from tfmlreg import workflows

    if (args.fixed_landmarks is None) != (args.moving_landmarks is None):
        raise UsageError("--fixed-landmarks and --moving-landmarks go together")
    if (args.fixed_labels is None) != (args.moving_labels is None):
        raise UsageError("--fixed-labels and --moving-labels go together")
    pair = workflows.load_files(args)
    predictor = workflows.predictor_for(args.model, args.server, args.shape)
    with staged_output(args.out) as staging:
        summary = workflows.register_and_write(predictor, pair, staging)
    print(json.dumps(summary, indent=2))


def cmd_train(args):
    from tfmlreg import experiment, export

    config = experiment.load_config(args.config)
    # progress bars on a terminal, one line per epoch in a log file
    verbose = 0 if args.quiet else (1 if sys.stdout.isatty() else 2)
    model, _ = experiment.run(config, verbose=verbose)
    saved = os.path.join(config["output"], "saved_model")
    if not os.path.exists(os.path.join(saved, "1")):
        export.export_saved_model(model, saved, version=1)
    print(f"trained model: {os.path.join(config['output'], 'model.keras')}; SavedModel: {saved}/1")


def cmd_evaluate(args):
    from tfmlreg import workflows

    predictor = workflows.predictor_for(args.model, None, None)
    with staged_output(args.out) as staging:
        report = workflows.evaluate_folder(predictor, args.data, staging, figures=not args.no_figures)
    with open(os.path.join(args.out, os.path.basename(report))) as handle:
        print(handle.read())


def cmd_phantom(args):
    from tfmlreg.data import phantom

    with staged_output(args.out) as staging:
        phantom.write_dataset(staging, cases=args.cases, shape=tuple(args.shape),
                              spacing=args.spacing, seed=args.seed,
                              amplitude_mm=args.amplitude)
    print(f"wrote {args.cases} phantom pair(s) to {args.out}")


def cmd_export(args):
    from tfmlreg import export, workflows

    model = workflows.load_keras_model(args.model)
    if args.format == "savedmodel":
        target = os.path.join(args.out, str(args.version))
        if os.path.exists(target):
            raise UsageError(f"--out: version folder {target} exists; choose another --version")
        export.export_saved_model(model, args.out, version=args.version)
        print(f"SavedModel for TF Serving: {target}")
    elif args.format == "onnx":
        path = args.out if args.out.endswith(".onnx") else os.path.join(args.out, "model.onnx")
        with staged_output(os.path.dirname(os.path.abspath(path))) as staging:
            staged = os.path.join(staging, os.path.basename(path))
            export.export_onnx(model, staged, opset=args.opset)
            export.check_onnx_parity(staged, model)
        print(f"ONNX (opset {args.opset}), parity with Keras checked: {path}")
    else:
        export.require_tf_trt()  # before any work: official pip wheels since 2.18 lack it
        with tempfile.TemporaryDirectory() as scratch:
            saved = export.export_saved_model(model, os.path.join(scratch, "model"), version=1)
            export.export_tf_trt(saved, args.out)
        print(f"TF-TRT SavedModel: {args.out}")


# --- parser -----------------------------------------------------------------------------------


def _examples(text):
    """An epilog of example lines; a line starting with ``--`` continues the one before it."""
    lines = [line.strip() for line in text.strip().splitlines()]
    return "examples:\n" + "\n".join(("      " if line.startswith("--") else "  ") + line
                                      for line in lines)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="tfmlreg", description="Multilevel deep-learning 3D image registration (mlVIRNET).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_examples("""
            tfmlreg demo
            tfmlreg register --fixed exhale.nii.gz --moving inhale.nii.gz --out result/
            tfmlreg train training/demo.json
            tfmlreg evaluate --model saved_models/demo --data phantoms/ --out eval/
        """),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, function, help_text, examples):
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  epilog=_examples(examples),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(function=function)
        return sub

    model_help = f"trained model: SavedModel folder (versioned root or version) or .keras file (default: {DEFAULT_MODEL})"

    demo = command("demo", cmd_demo, "register a phantom pair with the shipped model",
                   "tfmlreg demo\n tfmlreg demo --out /tmp/demo --seed 3")
    demo.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    demo.add_argument("--out", default="tfmlreg-demo", help="output folder (default: ./tfmlreg-demo)")
    demo.add_argument("--shape", type=int, nargs=3, default=(96, 96, 96), metavar=("D", "H", "W"),
                      help="phantom grid (full resolution; default 96 96 96)")
    demo.add_argument("--seed", type=int, default=1000, help="phantom seed (default 1000, unseen in training)")

    register = command(
        "register", cmd_register, "register a moving image to a fixed image",
        """tfmlreg register --fixed exhale.nii.gz --moving inhale.nii.gz --out result/
        tfmlreg register --fixed case1_T50.img --moving case1_T00.img --dirlab-case 1 \\
            --fixed-landmarks case1_300_T50_xyz.txt --moving-landmarks case1_300_T00_xyz.txt --out r/
        tfmlreg register --fixed f.nii.gz --moving m.nii.gz --server gpu-host:8500 --shape 160 160 160 --out r/""",
    )
    register.add_argument("--fixed", required=True, help="fixed image (NIfTI, or DIR-LAB .img)")
    register.add_argument("--moving", required=True, help="moving image (NIfTI, or DIR-LAB .img)")
    register.add_argument("--out", required=True, help="output folder")
    register.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    register.add_argument("--server", help="TF Serving gRPC address HOST:PORT instead of --model")
    register.add_argument("--shape", type=int, nargs=3, metavar=("D", "H", "W"),
                          help="model grid of the served model (with --server)")
    register.add_argument("--dirlab-case", type=int, help="DIR-LAB case 1-10 for .img inputs")
    register.add_argument("--fixed-labels", help="fixed label map (NIfTI)")
    register.add_argument("--moving-labels", help="moving label map (NIfTI)")
    register.add_argument("--fixed-landmarks", help="fixed landmarks (DIR-LAB txt: 1-based voxel x y z)")
    register.add_argument("--moving-landmarks", help="moving landmarks (DIR-LAB txt)")

    train = command("train", cmd_train, "train a model from a JSON config (resumes if interrupted)",
                    "tfmlreg train training/demo.json\n tfmlreg train training/paper_multilevel_pretrained.json")
    train.add_argument("config", help="experiment config (JSON), see training/")
    train.add_argument("--quiet", action="store_true", help="no Keras progress bars")

    evaluate = command("evaluate", cmd_evaluate, "evaluate a model on a folder of pairs at full resolution",
                       "tfmlreg evaluate --model saved_models/demo --data phantoms/ --out eval/")
    evaluate.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    evaluate.add_argument("--data", required=True, help="folder of pairs (see tfmlreg.data.io)")
    evaluate.add_argument("--out", required=True, help="output folder")
    evaluate.add_argument("--no-figures", action="store_true", help="skip the overlay figures")

    phantom = command("phantom", cmd_phantom, "write synthetic breathing-lung phantom pairs",
                      "tfmlreg phantom --out phantoms/ --cases 4\n tfmlreg phantom --out big/ --cases 1 --shape 160 160 160")
    phantom.add_argument("--out", required=True, help="output folder (pair layout)")
    phantom.add_argument("--cases", type=int, default=1, help="number of pairs (default 1)")
    phantom.add_argument("--shape", type=int, nargs=3, default=(96, 96, 96), metavar=("D", "H", "W"))
    phantom.add_argument("--spacing", type=float, nargs=3, metavar=("DX", "DY", "DZ"),
                         help="voxel size in mm (default: a 320 mm field of view)")
    phantom.add_argument("--seed", type=int, default=0, help="seed of the first case (default 0)")
    phantom.add_argument("--amplitude", type=float, default=25.0, help="max cranio-caudal motion in mm")

    export = command("export", cmd_export, "export a trained model for TF Serving, ONNX or TF-TRT",
                     "tfmlreg export --model runs/demo/model.keras --out saved_models/demo --version 2\n"
                     " tfmlreg export --model runs/demo/model.keras --out model.onnx --format onnx")
    export.add_argument("--model", required=True, help="trained .keras model")
    export.add_argument("--out", required=True, help="model root (savedmodel), .onnx path, or folder")
    export.add_argument("--version", type=int, default=1, help="SavedModel version folder (default 1)")
    export.add_argument("--format", choices=("savedmodel", "onnx", "tf-trt"), default="savedmodel")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from tfmlreg.data.io import DataError

    try:
        args.function(args)
    except (UsageError, DataError, ValueError, FileNotFoundError, FileExistsError) as error:
        return _fail(error, EXIT_BAD_INPUT)
    except (RuntimeError, ConnectionError) as error:  # the server, or this TensorFlow build
        return _fail(error, EXIT_FAILURE)
    return 0


def _fail(error, code):
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"tfmlreg: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
