"""The network on real chest CT it has not seen: synthetic breathing and pure shifts, per scan.

    python benchmarks/real_ct.py [--model tfmlreg/models/chest_ct] [--held-out lidc-idri-0001]
                                 [--ct ../shared/data/ct/*.nii.gz] [--spacing 2.5]
                                 [--amplitude 25] [--shift 6] [--no-refine] [--no-elastix]
                                 [--out docs/benchmarks/real_ct.md]

Cases per scan (the CT resampled to ``--spacing`` mm and cropped to its body, as in
``benchmarks/refine.py``): synthetic breathing of ``--amplitude`` mm in both directions (seeds 0
and 1, :mod:`tfmlreg.data.synthetic`) and pure shifts of ±``--shift`` mm along each array axis
(``moving(x) = fixed(x + s)``, so ``u = s``; noise as in breathing pairs). Methods: initial,
the network alone (one way, and both ways averaged: :class:`tfmlreg.inference.SymmetricPredictor`),
network + refinement (with the start it kept), elastix B-spline. Per case and method, at the pair's
own resolution: TRE mean and max over 300 vessel landmarks (mm), the mean displacement error
``|u - u_true|`` in the body (mm), folding (%), seconds.

Scans named by ``--held-out`` (by default the one ``training/chest_ct.json`` keeps out) are the
honest figures; the others were the model's training anatomy (not these pairs) and are marked
so. One model is one fold: a leave-one-scan-out study trains one model per held-out scan with
the config's file list edited, then runs this script once per model with ``--held-out``.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from refine import register_all, score, shared_cts  # noqa: E402  (the benchmark's own case runner)

METHODS = ("initial", "network", "network (symmetric)", "network + refinement", "elastix")
DIRECTIONS = ("exhale", "inhale")


def scan_cases(path, spacing, amplitude, shift):
    """``(kind, pair)`` for the breathing and shift cases of one scan."""
    from tfmlreg.data import synthetic

    scan = synthetic.load_scan(path, spacing, crop_body_mm=10.0)
    image, scan_spacing = scan["image"], scan["spacing"]
    anatomy = synthetic.analyse(image, scan_spacing, name=path)
    for seed, direction in enumerate(DIRECTIONS):
        yield "breathing", synthetic.make_pair(
            image, scan_spacing, seed=seed, amplitude_mm=amplitude, direction=direction,
            anatomy=anatomy, name=f"{scan['name']}-{direction}")
    for axis in range(3):
        for sign in (1.0, -1.0):
            offset = np.zeros(3)
            offset[axis] = sign * shift
            yield "shift", synthetic.make_pair(
                image, scan_spacing, seed=10 + axis, amplitude_mm=0.0, anatomy=anatomy,
                shift_mm=offset, name=f"{scan['name']}-shift{'+' if sign > 0 else '-'}{axis}")


def body_error(pair, displacement):
    """Mean ``|u - u_true|`` (mm) over the fixed image's body."""
    from tfmlreg.data import synthetic

    body, _ = synthetic.body_and_lung_masks(pair["fixed"], pair["spacing_fixed"])
    error = np.linalg.norm(np.asarray(displacement) - pair["displacement"], axis=-1)
    return float(error[body].mean())


def run_case(pair, predictor, methods):
    rows = {}
    for method, (displacement, seconds, start) in register_all(pair, predictor, methods).items():
        rows[method] = dict(score(pair, displacement, seconds, start),
                            body_error=body_error(pair, displacement))
    return rows


def summary(results, methods):
    """Means over the cases of each (held out or seen, kind)."""
    lines = ["| scans | cases | method | TRE mean (mm) | worst case TRE mean (mm) | body error "
             "mean (mm) | worst case body error (mm) | folding max (%) | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for held in (True, False):
        for kind in ("breathing", "shift"):
            cases = [rows for (h, k, _), rows in results.items() if h == held and k == kind]
            for method in methods:
                values = [rows[method] for rows in cases if method in rows]
                if not values:
                    continue
                tre = [v["tre_mean"] for v in values]
                body = [v["body_error"] for v in values]
                lines.append(
                    f"| {'held out' if held else 'seen in training'} | {kind} ({len(values)}) | "
                    f"{method} | {np.mean(tre):.2f} | {max(tre):.2f} | {np.mean(body):.2f} | "
                    f"{max(body):.2f} | {max(v['folding_pct'] for v in values):.3f} | "
                    f"{np.mean([v['seconds'] for v in values]):.1f} |")
    return lines


def markdown(results, methods, header):
    lines = header + ["", "Means:", ""] + summary(results, methods)
    lines += ["", "Per case:", "", "| case | scan | method | TRE mean (mm) | TRE max (mm) | "
              "body error (mm) | folding (%) | seconds | refinement start |",
              "|---|---|---|---|---|---|---|---|---|"]
    for (held, _, name), rows in results.items():
        for method, row in rows.items():
            lines.append(f"| {name} | {'held out' if held else 'seen'} | {method} | "
                         f"{row['tre_mean']:.2f} | {row['tre_max']:.2f} | {row['body_error']:.2f}"
                         f" | {row['folding_pct']:.3f} | {row['seconds']:.1f} | {row['start']} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.join("tfmlreg", "models", "chest_ct"))
    parser.add_argument("--ct", nargs="*", default=None, help="real CTs (default: all of shared)")
    parser.add_argument("--held-out", nargs="*", default=["lidc-idri-0001"],
                        help="scan names the model did not train on")
    parser.add_argument("--spacing", type=float, default=2.5)
    parser.add_argument("--amplitude", type=float, default=25.0)
    parser.add_argument("--shift", type=float, default=6.0)
    parser.add_argument("--no-refine", action="store_true")
    parser.add_argument("--no-elastix", action="store_true")
    parser.add_argument("--out", default=os.path.join("docs", "benchmarks", "real_ct.md"))
    args = parser.parse_args()
    args.ct = shared_cts() if args.ct is None else args.ct
    methods = tuple(m for m in METHODS if not (args.no_refine and "refinement" in m)
                    and not (args.no_elastix and m == "elastix"))

    from tfmlreg.data import synthetic
    from tfmlreg.inference import load_predictor

    predictor = load_predictor(args.model)
    results, start = {}, time.perf_counter()
    for path in args.ct:
        held = synthetic.scan_name(path) in args.held_out
        for kind, pair in scan_cases(path, args.spacing, args.amplitude, args.shift):
            rows = run_case(pair, predictor, methods)
            results[(held, kind, pair["name"])] = rows
            for method, row in rows.items():
                print(f"{pair['name']:34s} {method:22s} TRE {row['tre_mean']:6.2f} max "
                      f"{row['tre_max']:6.2f} body {row['body_error']:6.2f} folding "
                      f"{row['folding_pct']:6.3f}% {row['seconds']:6.1f} s", flush=True)
            write(args, results, methods, start)  # after every case: a stop keeps what it measured
    print(f"wrote {args.out}")


def write(args, results, methods, start):
    header = ["# Real-CT benchmark", "",
              f"`python benchmarks/real_ct.py {' '.join(sys.argv[1:])}` "
              f"({time.perf_counter() - start:.0f} s on {os.cpu_count()} cores), model "
              f"`{args.model}`. CTs at {args.spacing} mm, cropped to the body; synthetic breathing "
              f"of {args.amplitude} mm in both directions and pure shifts of ±{args.shift} mm "
              "along each array axis. Held out: " + ", ".join(args.held_out) + "."]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        handle.write(markdown(results, methods, header))


if __name__ == "__main__":
    main()
