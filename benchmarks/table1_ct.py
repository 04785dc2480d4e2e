"""The paper's Table 1 comparison on real anatomy: single level against multilevel (Xavier or
pretrained finer levels), the network alone, on a held-out real CT with synthetic breathing.

    python benchmarks/table1_ct.py [--amplitudes 10 20 30] [--no-elastix]
                                   [--normalization batch|instance|none]
                                   [--out docs/benchmarks/table1_ct.md]

1. Trains the three arms ``training/ct_*.json`` (an arm whose ``model.keras`` exists is reused):
   the same data (4 real chest CTs of ``../shared/data/ct/`` with a new synthetic breathing pair
   of up to 30 mm every draw, each draw's scan reshaped), from scratch, the paper's loss (NGF +
   α·curvature + β/2·mask) plus the supervised term on the pairs' exact field (γ = 0.02), the
   same hyper-parameters and 24 epochs in all: single level 24 epochs, multilevel 8 per level.
   (The paper's loss alone learnt nothing in 12 epochs: docs/benchmarks/table1_ct_unsupervised.md.)
   Equal epochs, as in the paper: a multilevel arm spends less compute (its coarse stages are
   cheaper), so its training seconds are printed beside it. ``--normalization`` trains every arm
   with that ``model.normalization`` instead of the configs' (``batch``), into its own folders.
2. Test cases: the held-out ``lidc-idri-0001`` at 2.5 mm, cropped to its body, with synthetic
   breathing of each of ``--amplitudes`` mm in both directions (as ``benchmarks/refine.py``).
3. Writes TRE per case (mean (std), the paper's Table 1 layout), the summary (folding, TRE, Dice
   of the two lungs) overall and per amplitude to ``--out``, elastix beside the arms.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from phantom import evaluate, train_arms  # noqa: E402  (the phantom benchmark's arm runner)
from refine import ct_cases, shared_cts  # noqa: E402

from tfmlreg import evaluation  # noqa: E402

ARMS = {"single level": "ct_single.json", "multilevel, Xavier": "ct_multilevel_xavier.json",
        "multilevel, pretrained": "ct_multilevel_pretrained.json"}
HELD_OUT = "lidc-idri-0001"  # the scan no arm trains on


def test_cases(amplitudes):
    """Breathing pairs of the held-out scan, both directions, named with their amplitude."""
    held_out = [path for path in shared_cts() if os.path.basename(path).startswith(HELD_OUT)]
    for amplitude in amplitudes:
        for pair in ct_cases(held_out, 2.5, amplitude):
            pair["name"] = f"{pair['name']}-{amplitude:g}mm"
            yield pair


def markdown(results, arms, amplitudes, seconds):
    methods = list(next(iter(results.values())))
    training = "\n".join(f"| {arm} | `training/{ARMS[arm]}` | "
                         f"{'%.0f s' % s if s is not None else 'reused'} |"
                         for arm, (_, s) in arms.items())
    lines = ["# Table 1 on real CT", "",
             f"`python benchmarks/table1_ct.py {' '.join(sys.argv[1:])}` ({seconds / 60:.0f} min "
             f"on {os.cpu_count()} cores). Held-out scan lidc-idri-0001 at 2.5 mm, cropped to the "
             "body; synthetic breathing of " + ", ".join(f"{a:g}" for a in amplitudes)
             + " mm in both directions; networks alone on a 64³ grid; metrics at the pair's "
             "resolution. Folding: share of voxels with det(∇y) ≤ 0.", "",
             "| arm | config | training time |", "|---|---|---|", training, "",
             "## Landmark error (mm), mean (std) per case", "",
             evaluation.tre_table({m: {c: results[c][m]["tre"] for c in results}
                                   for m in methods}), "", "## Means over all cases", "",
             evaluation.summary_table({m: [results[c][m] for c in results] for m in methods})]
    for amplitude in amplitudes:
        cases = [c for c in results if c.endswith(f"-{amplitude:g}mm")]
        lines += ["", f"## Breathing of {amplitude:g} mm", "", evaluation.summary_table(
            {m: [results[c][m] for c in cases] for m in methods})]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amplitudes", type=float, nargs="+", default=[10.0, 20.0, 30.0])
    parser.add_argument("--no-elastix", action="store_true", help="skip the elastix baseline")
    parser.add_argument("--normalization", choices=("batch", "instance", "none"),
                        help="every arm's model.normalization (default: the configs')")
    parser.add_argument("--out", default=os.path.join("docs", "benchmarks", "table1_ct.md"))
    args = parser.parse_args()
    start = time.perf_counter()
    arms = train_arms(ARMS, args.normalization)
    results, _ = evaluate(arms, list(test_cases(args.amplitudes)), not args.no_elastix)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        handle.write(markdown(results, arms, args.amplitudes, time.perf_counter() - start))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
