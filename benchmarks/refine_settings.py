"""How the refinement's defaults were chosen: one setting varied at a time around the defaults.

    python benchmarks/refine_settings.py [--ct FILE ...] [--phantoms 1] [--spacing 2.0]
        [--vary alpha=0.1,0.5,2 learning_rate=0.2,0.4,0.8 ...]

Cases: phantom pairs and real CTs with 25 mm synthetic breathing in both directions, cropped to
the body: ``benchmarks/refine.py``'s own cases; refinement from zero (the hardest start). Prints, per
setting value, the mean over cases of the landmark TRE (mm), the worst folding (%) and the mean
seconds (compilation excluded: every shape is compiled once before timing).
"""

import argparse
import dataclasses
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from refine import ct_cases, phantom_cases  # noqa: E402  (the benchmark's own case makers)

DEFAULT_VARY = ["alpha=0.1,0.25,0.5,1,2", "learning_rate=0.2,0.4,0.8",
                "iterations=30,60,100", "control_factor=1,2,4", "epsilon=0.003,0.01,0.03",
                "finest_spacing_mm=1.5,2.5,3.5", "iteration_growth=1,2,3", "folding=0,1,10"]


def parse_vary(items):
    out = {}
    for item in items:
        name, values = item.split("=")
        out[name] = [float(v) if "." in v or "e" in v else int(v) for v in values.split(",")]
    return out


def score(pairs, config):
    from tfmlreg import evaluation, refinement

    tre, folding, seconds = [], [], []
    for pair in pairs:
        arguments = (pair["fixed"], pair["moving"], pair["spacing_fixed"], pair["spacing_moving"])
        refinement.refine(*arguments, config=dataclasses.replace(config, iterations=1))  # compile
        result = refinement.refine(*arguments, config=config)
        metrics = evaluation.evaluate_displacement(pair, result["displacement"])
        tre.append(metrics["tre_mean"])
        folding.append(100 * metrics["folding"])
        seconds.append(result["seconds"])
    return np.mean(tre), np.max(tre), np.max(folding), np.mean(seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", nargs="*", default=[])
    parser.add_argument("--phantoms", type=int, default=1)
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument("--vary", nargs="*", default=DEFAULT_VARY)
    args = parser.parse_args()
    from tfmlreg.refinement import RefineConfig

    pairs = list(phantom_cases(args.phantoms)) + list(ct_cases(args.ct, args.spacing, 25.0))
    print(f"{len(pairs)} cases: {[p['name'] for p in pairs]}", flush=True)
    base = RefineConfig()
    print(f"defaults: {base}")
    print(f"{'setting':>22s} {'value':>8s} {'TRE mean':>9s} {'worst':>7s} {'fold %':>7s} {'s':>6s}")
    for name, values in parse_vary(args.vary).items():
        for value in values:
            mean, worst, fold, seconds = score(pairs, dataclasses.replace(base, **{name: value}))
            print(f"{name:>22s} {value:>8g} {mean:9.3f} {worst:7.3f} {fold:7.3f} {seconds:6.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
