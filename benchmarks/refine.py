"""Network alone, network + refinement, refinement from zero and elastix, side by side in one run.

    python benchmarks/refine.py [--ct ../shared/data/ct/*.nii.gz] [--phantoms 2] [--spacing 2.0]
                                [--amplitude 25] [--model tfmlreg/models/chest_ct] [--no-elastix]
                                [--out docs/benchmarks/refine.md]

Cases: phantom pairs (96³, seeds 1000+, unseen in training) and, for every real CT, synthetic
breathing of ``--amplitude`` mm (:mod:`tfmlreg.data.synthetic`) in both directions (exhale: the
moving image is the exhaled state; inhale: the reverse), the CT resampled to ``--spacing`` mm
and cropped to its body. Everything is evaluated at the pair's own (full) resolution: TRE mean
and max over the 300 landmarks (mm), folding (% voxels with det ∇y <= 0) and seconds (network,
refinement with its XLA compilation for a new shape, or elastix's wall time). Prints one row per
case and method as it goes and writes a Markdown table to ``--out``.
"""

import argparse
import os
import sys
import time

import numpy as np

METHODS = ("initial", "network", "network (symmetric)", "network + refinement",
           "refinement from zero", "elastix")


def phantom_cases(count):
    from tfmlreg.data import phantom

    for seed in range(1000, 1000 + count):
        yield phantom.as_case(phantom.make_pair(shape=(96, 96, 96), seed=seed), f"phantom{seed}")


def ct_cases(paths, spacing, amplitude):
    from tfmlreg.data import synthetic

    for path in paths:
        scan = synthetic.load_scan(path, spacing, crop_body_mm=10.0)
        image, scan_spacing = scan["image"], scan["spacing"]
        anatomy = synthetic.analyse(image, scan_spacing, name=path)
        for seed, direction in enumerate(("exhale", "inhale")):
            yield synthetic.make_pair(image, scan_spacing, seed=seed, amplitude_mm=amplitude,
                                      direction=direction, anatomy=anatomy,
                                      name=f"{scan['name']}-{direction}")


def register_all(pair, predictor, methods=METHODS):
    """``{method: (displacement (mm, fixed grid), seconds, start)}`` for each of ``methods``;
    ``start``: the start the refinement kept ("initial": the network's field, or "zero"), "" for
    the others."""
    from tfmlreg.baselines import elastix_register
    from tfmlreg.inference import SymmetricPredictor, register_pair
    from tfmlreg.refinement import RefineConfig

    runs = {"network + refinement": (predictor, RefineConfig()),  # method: (predictor, settings)
            "refinement from zero": (None, RefineConfig())}
    if predictor is not None:  # --model none: no network rows
        runs.update({"network": (predictor, None),
                     "network (symmetric)": (SymmetricPredictor(predictor), None)})
    fields = {"initial": (np.zeros(np.shape(pair["fixed"]) + (3,), np.float32), 0.0, "")}
    for method in methods:
        if method in runs:
            network, refine = runs[method]
            result = register_pair(network, pair, refine=refine)
            fields[method] = (result["displacement"], result["seconds"],
                              result.get("refinement_start", ""))
    if "elastix" in methods:
        result = elastix_register(pair["fixed"], pair["moving"], pair["spacing_fixed"])
        fields["elastix"] = (result["displacement"], result["seconds"], "")
    return fields


def score(pair, displacement, seconds, start=""):
    """TRE mean and max (mm), folding (%), seconds and the refinement's start of one field."""
    from tfmlreg import evaluation

    metrics = evaluation.evaluate_displacement(pair, displacement)
    return {"tre_mean": metrics["tre_mean"], "tre_max": metrics["tre_max"],
            "folding_pct": 100.0 * metrics["folding"], "seconds": seconds, "start": start}


def run_case(pair, predictor, use_elastix):
    methods = METHODS if use_elastix else METHODS[:-1]
    return {method: score(pair, *field)
            for method, field in register_all(pair, predictor, methods).items()}


def markdown(results, header):
    lines = header + ["", "| case | grid | method | TRE mean (mm) | TRE max (mm) | folding (%) "
                          "| seconds | refinement start |", "|---|---|---|---|---|---|---|---|"]
    for case, (shape, rows) in results.items():
        for method, row in rows.items():
            lines.append(f"| {case} | {'×'.join(map(str, shape))} | {method} | "
                         f"{row['tre_mean']:.2f} | {row['tre_max']:.2f} | "
                         f"{row['folding_pct']:.3f} | {row['seconds']:.1f} | {row['start']} |")
    lines += ["", "Means over cases:", "", "| method | TRE mean (mm) | worst case TRE mean (mm) "
              "| TRE max (mm) | folding max (%) | seconds |", "|---|---|---|---|---|---|"]
    for method in METHODS:
        rows = [rows[method] for _, rows in results.values() if method in rows]
        if rows:
            lines.append(
                f"| {method} | {np.mean([r['tre_mean'] for r in rows]):.2f} | "
                f"{max(r['tre_mean'] for r in rows):.2f} | {max(r['tre_max'] for r in rows):.2f} "
                f"| {max(r['folding_pct'] for r in rows):.3f} | "
                f"{np.mean([r['seconds'] for r in rows]):.1f} |")
    return "\n".join(lines) + "\n"


def shared_cts():
    """The real CTs of the project's shared data folder (``../shared/data/ct``), sorted."""
    folder = os.path.join("..", "shared", "data", "ct")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".nii.gz"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", nargs="*", default=None, help="real CTs (NIfTI)")
    parser.add_argument("--phantoms", type=int, default=2)
    parser.add_argument("--spacing", type=float, default=2.0, help="working spacing of the CTs")
    parser.add_argument("--amplitude", type=float, default=25.0)
    parser.add_argument("--model", default=os.path.join("tfmlreg", "models", "chest_ct"))
    parser.add_argument("--no-elastix", action="store_true")
    parser.add_argument("--out", default=os.path.join("docs", "benchmarks", "refine.md"))
    args = parser.parse_args()
    args.ct = shared_cts() if args.ct is None else args.ct

    from tfmlreg.inference import load_predictor

    predictor = load_predictor(args.model)
    cases = list(phantom_cases(args.phantoms))
    results = {}
    start = time.perf_counter()
    for pair in [*cases, *ct_cases(args.ct, args.spacing, args.amplitude)]:
        rows = run_case(pair, predictor, not args.no_elastix)
        results[pair["name"]] = (np.shape(pair["fixed"]), rows)
        for method, row in rows.items():
            print(f"{pair['name']:28s} {method:22s} TRE {row['tre_mean']:6.2f} "
                  f"max {row['tre_max']:6.2f}  folding {row['folding_pct']:6.3f}%  "
                  f"{row['seconds']:6.1f} s", flush=True)
        write(args, results, start)  # after every case: a stopped run keeps what it measured
    print(f"wrote {args.out}")


def write(args, results, start):
    header = ["# Refinement benchmark", "",
              f"`python benchmarks/refine.py {' '.join(sys.argv[1:])}` "
              f"({time.perf_counter() - start:.0f} s on {os.cpu_count()} cores). Real CTs at "
              f"{args.spacing} mm, cropped to the body, synthetic breathing of {args.amplitude} mm "
              "in both directions; phantoms 96³. Seconds: the network's inference, the "
              "refinement including its XLA compilation for a new grid, elastix's wall time. "
              "Refinement start: the start the refinement kept (initial: the network's field; "
              "zero: it ran from zero as well and that ended lower)."]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        handle.write(markdown(results, header))


if __name__ == "__main__":
    main()
