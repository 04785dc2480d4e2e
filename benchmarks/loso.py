"""Leave-one-scan-out: one network per real CT held out, trained on the other four.

    python benchmarks/loso.py [--config ct_multilevel_pretrained.json] [--epochs 4 4 4]
                              [--amplitude 25] [--out docs/benchmarks/loso.md]

Each fold trains ``training/--config`` (the paper's Table 1 arm, see ``benchmarks/table1_ct.py``)
with its scan list replaced by the four other scans of ``../shared/data/ct/`` and
``--epochs`` per level (coarsest first), into ``runs/benchmark/loso/SCAN`` (a fold whose
``model.keras`` exists is reused). The held-out scan, at 2.5 mm and cropped to its body, gets
synthetic breathing of ``--amplitude`` mm in both directions (as ``benchmarks/refine.py``); the
network alone and run both ways (``SymmetricPredictor``) are scored by the landmark TRE (mm) at
the pair's resolution. This measures how much the figures depend on which scan is held out, for
a network of CPU-benchmark size; the shipped model is one fold only (docs/CHEST_CT_MODEL.md).
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from phantom import CONFIGS, ROOT  # noqa: E402
from refine import ct_cases, score, shared_cts  # noqa: E402

from tfmlreg import experiment  # noqa: E402
from tfmlreg.data import synthetic  # noqa: E402
from tfmlreg.inference import KerasPredictor, SymmetricPredictor, register_pair  # noqa: E402

METHODS = ("initial", "network", "network (symmetric)")


def train_fold(config_file, scans, held_out, epochs):
    """The fold's model file (trained now unless it exists) and its training seconds or None."""
    config = experiment.load_config(os.path.join(CONFIGS, config_file))
    config["data"]["train"]["scans"]["files"] = [s for s in scans if s != held_out]
    config["training"]["epochs_per_level"] = list(epochs)
    config["output"] = os.path.join(ROOT, "runs", "benchmark", "loso", synthetic.scan_name(held_out))
    path = os.path.join(config["output"], "model.keras")
    if os.path.exists(path):
        return path, None
    start = time.perf_counter()
    experiment.run(config, verbose=2)
    return path, time.perf_counter() - start


def evaluate_fold(model, held_out, amplitude):
    """``{case: {method: TRE mean (mm)}}`` for the held-out scan's breathing pairs."""
    network = KerasPredictor(model)
    predictors = {"network": network, "network (symmetric)": SymmetricPredictor(network)}
    rows = {}
    for pair in ct_cases([held_out], 2.5, amplitude):
        zero = np.zeros(np.shape(pair["fixed"]) + (3,), np.float32)
        rows[pair["name"]] = {"initial": score(pair, zero, 0.0)["tre_mean"]}
        for method, predictor in predictors.items():
            registered = register_pair(predictor, pair)
            rows[pair["name"]][method] = score(pair, registered["displacement"], 0.0)["tre_mean"]
        print(pair["name"], {m: round(v, 2) for m, v in rows[pair["name"]].items()}, flush=True)
    return rows


def markdown(args, folds, start):
    lines = ["# Leave-one-scan-out", "",
             f"`python benchmarks/loso.py {' '.join(sys.argv[1:])}` "
             f"({(time.perf_counter() - start) / 60:.0f} min on {os.cpu_count()} cores): "
             f"`training/{args.config}` with {' / '.join(map(str, args.epochs))} epochs per level "
             f"(coarsest first), one fold per held-out scan; {args.amplitude:g} mm synthetic "
             "breathing of the held-out scan in both directions, the network alone; TRE mean (mm).",
             "", "| held-out scan | training time | case | " + " | ".join(METHODS) + " |",
             "|---|---|---|" + "---|" * len(METHODS)]
    cases = []
    for scan, (seconds, rows) in folds.items():
        for case, row in rows.items():
            cases.append(row)
            trained = f"{seconds:.0f} s" if seconds is not None else "reused"
            lines.append(f"| {scan} | {trained} | {case} | "
                         + " | ".join(f"{row[m]:.2f}" for m in METHODS) + " |")
    lines.append(f"| **mean over {len(cases)} cases** | | | "
                 + " | ".join(f"**{np.mean([c[m] for c in cases]):.2f}**" for m in METHODS) + " |")
    lines.append("| worst case | | | "
                 + " | ".join(f"{max(c[m] for c in cases):.2f}" for m in METHODS) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ct_multilevel_pretrained.json")
    parser.add_argument("--epochs", type=int, nargs="+", default=[4, 4, 4])
    parser.add_argument("--amplitude", type=float, default=25.0)
    parser.add_argument("--out", default=os.path.join("docs", "benchmarks", "loso.md"))
    args = parser.parse_args()
    scans = [os.path.abspath(path) for path in shared_cts()]
    folds, start = {}, time.perf_counter()
    for held_out in scans:
        model, seconds = train_fold(args.config, scans, held_out, args.epochs)
        folds[synthetic.scan_name(held_out)] = (seconds, evaluate_fold(model, held_out,
                                                                       args.amplitude))
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:  # after every fold: a stop keeps what it measured
            handle.write(markdown(args, folds, start))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
