"""The paper's comparison on the phantom benchmark, end to end, and its section of docs/RESULTS.md.

    python benchmarks/phantom.py            # about an hour on 2 CPU cores
    python benchmarks/phantom.py --no-elastix

1. Phantom data: training (16 pairs), validation (2) and a held-out test set (6 pairs, seeds never
   used in training), 96³ at 320 mm field of view, up to ~25 mm cranio-caudal motion.
2. Trains the three arms with the same hyper-parameters and the same number of epochs in all
   (``training/cpu_*.json``): single level (12 epochs); multilevel, Xavier (4 per level);
   multilevel, pretrained (4 per level). A finished arm (its ``model.keras`` exists) is reused.
3. Evaluates every arm and elastix (multi-resolution B-spline, ``tfmlreg.baselines``) on the
   test set at full resolution, and on the same test anatomy with 40 mm of motion (more than
   any training pair), and writes its section of ``docs/RESULTS.md`` (the rest of the file is
   kept) with the tables, the Dice box plot and an overlay figure.
"""

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CONFIGS = os.path.join(ROOT, "training")  # the arms' experiment configs

from tfmlreg import evaluation, experiment  # noqa: E402
from tfmlreg.ct import LOBE_NAMES  # noqa: E402
from tfmlreg.data import io, phantom  # noqa: E402
from tfmlreg.figures import save_dice_boxplot, save_overlays  # noqa: E402
from tfmlreg.inference import KerasPredictor, register_pair  # noqa: E402

ARMS = {"single level": "cpu_single.json", "multilevel, Xavier": "cpu_multilevel_xavier.json",
        "multilevel, pretrained": "cpu_multilevel_pretrained.json"}
TEST = {"cases": 6, "shape": (96, 96, 96), "seed": 900}
TEST_DIR = os.path.join(ROOT, "runs", "benchmark", "phantoms", "test")
# Beyond the training distribution: the same anatomy seeds, 40 mm instead of 25 mm of motion
# (up to ~8 voxels of the 64³ network grid instead of ~5), to see which arm copes with larger
# motion than it was trained on.
LARGE = {**TEST, "amplitude_mm": 40.0}
LARGE_DIR = os.path.join(ROOT, "runs", "benchmark", "phantoms", "test_40mm")
DOCS = os.path.join(ROOT, "docs")


def train_arms(arm_configs=ARMS, normalization=None):
    """``{arm: (predictor, training seconds or None when reused)}`` for ``{arm: config file in
    training/}``; an arm whose ``model.keras`` exists is reused. ``normalization`` replaces the
    configs' ``model.normalization`` (each arm then trains into its output folder + ``_NAME``)."""
    arms = {}
    for arm, config_file in arm_configs.items():
        config = experiment.load_config(os.path.join(CONFIGS, config_file))
        if normalization is not None:
            config["model"]["normalization"] = normalization
            config["output"] = f"{config['output']}_{normalization}"
        path = os.path.join(config["output"], "model.keras")
        seconds = None
        if not os.path.exists(path):
            start = time.perf_counter()
            experiment.run(config, verbose=2)
            seconds = time.perf_counter() - start
        arms[arm] = (KerasPredictor(path), seconds)
    return arms


def test_cases(folder, spec):
    if not os.path.isdir(folder):
        phantom.write_dataset(folder, **spec)
    return [io.load_pair(case) for case in io.list_pairs(folder)]


def evaluate(arms, cases, with_elastix):
    """``{case: {method: metrics}}`` and the registered images of the first case for figures."""
    results, first_case_images = {}, {}
    for index, pair in enumerate(cases):
        identity = np.zeros(pair["fixed"].shape + (3,), np.float32)
        results[pair["name"]] = {"initial": evaluation.evaluate_displacement(pair, identity)}
        for arm, (predictor, _) in arms.items():
            registered = register_pair(predictor, pair)
            metrics = evaluation.evaluate_displacement(pair, registered["displacement"])
            metrics["seconds"] = registered["seconds"]
            results[pair["name"]][arm] = metrics
            if index == 0:
                first_case_images[arm] = registered["warped"]
        if with_elastix:
            from tfmlreg.baselines import elastix_register

            registered = elastix_register(pair["fixed"], pair["moving"], pair["spacing_fixed"])
            metrics = evaluation.evaluate_displacement(pair, registered["displacement"])
            metrics["seconds"] = registered["seconds"]
            results[pair["name"]]["elastix B-spline"] = metrics
        print(f"{pair['name']}: " + ", ".join(
            f"{m} {r['tre_mean']:.2f} mm" for m, r in results[pair["name"]].items()), flush=True)
    return results, first_case_images


def write_results(results, arms, cases, first_case_images, total_seconds, large_results):
    figures = os.path.join(DOCS, "figures")
    os.makedirs(figures, exist_ok=True)
    methods = list(next(iter(results.values())))
    by_method = {m: [results[c][m] for c in results] for m in methods}
    tre = {m: {c: results[c][m]["tre"] for c in results} for m in methods}
    labels = {k: LOBE_NAMES[k] for k in sorted(by_method["initial"][0]["dice"])}
    save_dice_boxplot(os.path.join(figures, "benchmark_dice.png"),
                      {m: [r["dice"] for r in by_method[m]] for m in methods}, labels)
    first = cases[0]
    save_overlays(os.path.join(figures, "benchmark_overlay.png"), first["fixed"],
                  {"before": first["moving"], "single level": first_case_images["single level"],
                   "multilevel": first_case_images["multilevel, pretrained"]},
                  first["spacing_fixed"])
    training = "\n".join(
        f"| {arm} | `training/{ARMS[arm]}` | "
        f"{'%.0f s' % seconds if seconds is not None else 'reused'} |"
        for arm, (_, seconds) in arms.items())
    text = f"""{SECTION}

Produced by `python benchmarks/phantom.py` (this section, up to its Discussion, is written by
it; {total_seconds / 60:.0f} min
on this run, 2 CPU cores). Test set: {len(cases)} held-out phantom pairs (seeds {TEST['seed']}–
{TEST['seed'] + TEST['cases'] - 1}, {TEST['shape'][0]}³ at 320 mm field of view, inhale → exhale,
up to ~25 mm cranio-caudal motion), never seen in training. All metrics at the pairs' full
resolution; networks run on a 64³ grid. Folding = share of voxels with det(∇y) ≤ 0. Runtime is
the model call (networks, on the CPU) or the whole elastix registration.

## Training (same data, hyper-parameters and 12 epochs in all for each arm)

| arm | config | training time |
|---|---|---|
{training}

## Summary (mean over test cases)

{evaluation.summary_table(by_method)}

## Landmark error (mm), mean (std) per case, as in the paper's Table 1

{evaluation.tre_table(tre)}

## Larger motion than in training (40 mm instead of 25 mm, same test anatomy)

{evaluation.summary_table({m: [large_results[c][m] for c in large_results] for m in methods})}

## Dice per lobe (paper Fig. 1)

![Dice per lobe](figures/benchmark_dice.png)

## Overlays of test case {first['name']} (paper Fig. 2)

Coronal (top) and sagittal (bottom); moving (inhale) in orange, fixed (exhale) in blue, grey
where aligned.

![overlay](figures/benchmark_overlay.png)
"""
    path = os.path.join(DOCS, "RESULTS.md")
    with open(path) as handle:
        document = handle.read()
    with open(path, "w") as handle:
        handle.write(with_section(document, text))


SECTION = "## The phantom benchmark (`benchmarks/phantom.py`)"
DISCUSSION = "## Discussion"


def with_section(document, section):
    """``document`` with its phantom-benchmark section (from ``SECTION`` to the hand-written
    ``DISCUSSION`` after it, or to the end) replaced by ``section``; appended if it has none.
    The rest of RESULTS.md (the real-CT sections, the discussion) is other benchmarks' and kept."""
    start = document.find(SECTION)
    if start < 0:
        return document.rstrip("\n") + "\n\n" + section
    end = document.find(DISCUSSION, start)
    end = len(document) if end < 0 else end
    return document[:start] + section.rstrip("\n") + "\n\n" + document[end:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-elastix", action="store_true", help="skip the elastix baseline")
    args = parser.parse_args()
    start = time.perf_counter()
    arms = train_arms()
    cases = test_cases(TEST_DIR, TEST)
    results, images = evaluate(arms, cases, with_elastix=not args.no_elastix)
    large_results, _ = evaluate(arms, test_cases(LARGE_DIR, LARGE), with_elastix=not args.no_elastix)
    write_results(results, arms, cases, images, time.perf_counter() - start, large_results)
    print(f"wrote {os.path.join(DOCS, 'RESULTS.md')}")


if __name__ == "__main__":
    main()
