"""tfmlreg's 3-level model against VoxelMorph (PyTorch ``VxmPairwise``), side by side.

    python benchmarks/compare.py [--sizes 96 128 160] [--repeats 3] [--rounds 1]
                                 [--train 64 96] [--train-repeats 2] [--threads N]
                                 [--no-accuracy] [--no-warp]

What it measures, on the same machine in one run:

* inference of tfmlreg's 3-level model (the paper's network, 16 base filters, untrained
  weights: the speed does not depend on them) as ``tfmlreg`` runs it (batch norm folded,
  geometry XLA-compiled inside the graph) in float32 and in bfloat16, against VoxelMorph's
  ``VxmPairwise`` with its defaults (5-level U-Net of 16 features, 5 integration steps), asked
  for its displacement and warped image as tfmlreg returns both, in float32 and under
  ``torch.autocast(bfloat16)``; ``torch.set_num_threads`` = TensorFlow's intra-op threads;
  sizes alternate within each round, every configuration in its own process reporting its median
  wall time and its peak resident memory (ru_maxrss);
* one 160³ warp the model's way (``benchmarks/warp.py``);
* one training step of tfmlreg at ``--train`` sizes in float32 and bfloat16 (``mixed_bfloat16``);
* the accuracy of bfloat16: landmark error (TRE) of the shipped demo network on
  phantom pairs, float32 SavedModel against the bfloat16 inference form (issue 14: change
  ≤ 0.05 mm).

VoxelMorph and torch live in their own virtual environment (``.bench-venv/``, git-ignored), made
here on first use: ``torch`` (the CPU wheel from download.pytorch.org when reachable, else the
configured index) and ``voxelmorph``; never in the project's dependencies.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV = os.path.join(ROOT, ".bench-venv")
VENV_PYTHON = os.path.join(VENV, "bin", "python")
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TRE_LIMIT_MM = 0.05

sys.path.insert(0, HERE)
from model import run as run_tfmlreg  # noqa: E402  (benchmarks/model.py)

VOXELMORPH_CHILD = r"""
import json, resource, sys
import numpy as np, torch
import voxelmorph as vxm
n, repeats, threads, precision = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sys.path.insert(0, sys.argv[5])
from _timing import median_seconds
torch.set_num_threads(threads)
model = vxm.nn.models.VxmPairwise(ndim=3, source_channels=1, target_channels=1).eval()
rng = np.random.default_rng(0)
source, target = (torch.from_numpy(rng.uniform(0, 1, (1, 1, n, n, n)).astype("float32"))
                  for _ in range(2))

def once():
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bfloat16"):
        field, warped = model(source, target, return_warped_source=True)
    return float(field.float().abs().max()) + float(warped.float().abs().max())

seconds = median_seconds(once, repeats)
print(json.dumps({"seconds": seconds,
                  "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""

ACCURACY_CHILD = r"""
import json, sys
import numpy as np
from tfmlreg.data import phantom
from tfmlreg.inference import KerasPredictor, load_predictor, register_pair
from tfmlreg.metrics import tre
model, seeds = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
predictors = {"float32": load_predictor(model, "float32"),
              "bfloat16": KerasPredictor(model + "/model.keras", "bfloat16")}
rows = []
for seed in seeds:
    pair = phantom.as_case(phantom.make_pair((96, 96, 96), seed=seed), f"phantom{seed}")
    row = {"seed": seed}
    for name, predictor in predictors.items():
        u = register_pair(predictor, pair)["displacement"]  # the network alone
        row[name] = float(tre(u, pair["spacing_fixed"], pair["fixed_landmarks"],
                              pair["moving_landmarks"]).mean())
    rows.append(row)
print(json.dumps(rows))
"""


def shipped_model():
    """The shipped demo model's root (package data once tfmlreg.models exists): the model of the
    documented figures (the default model since is the chest-CT one)."""
    try:
        from tfmlreg import models
    except ImportError:
        return os.path.join(ROOT, "saved_models", "demo")
    return models.shipped("demo")


def ensure_voxelmorph():
    """The bench venv's python with torch and voxelmorph, installed there when missing."""
    check = [VENV_PYTHON, "-c", "import torch, voxelmorph"]
    if os.path.exists(VENV_PYTHON) and subprocess.run(check, capture_output=True).returncode == 0:
        return VENV_PYTHON
    print(f"installing torch and voxelmorph into {VENV} (once)", flush=True)
    if not os.path.exists(VENV_PYTHON):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    pip = [VENV_PYTHON, "-m", "pip", "install", "-q"]
    cpu_wheel = subprocess.run(pip + ["torch", "--index-url", TORCH_CPU_INDEX],
                               capture_output=True, text=True)
    if cpu_wheel.returncode != 0:
        print(f"{TORCH_CPU_INDEX} not reachable: torch from the configured index", flush=True)
        subprocess.run(pip + ["torch"], check=True)
    subprocess.run(pip + ["voxelmorph"], check=True)
    subprocess.run(check, check=True)
    return VENV_PYTHON


def run_voxelmorph(python, size, repeats, threads, precision):
    result = subprocess.run([python, "-c", VOXELMORPH_CHILD, str(size), str(repeats), str(threads),
                             precision, HERE], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"voxelmorph {size}^3: child failed: {result.stderr[-2000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report["seconds"], report["peak_kib"] / 2**20


def accuracy(model, seeds):
    result = subprocess.run([sys.executable, "-c", ACCURACY_CHILD, model, ",".join(map(str, seeds))],
                            capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"accuracy check failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def spread(values):
    """`` (lowest–highest)`` over the rounds, when there are several: how steady the machine was."""
    return f" ({min(values):.2f}–{max(values):.2f})" if len(values) > 1 else ""


CONFIGS = {  # name -> (runner, precision)
    "tfmlreg float32": ("tfmlreg", "float32"),
    "tfmlreg bfloat16": ("tfmlreg", "bfloat16"),
    "VoxelMorph float32": ("voxelmorph", "float32"),
    "VoxelMorph bfloat16 (autocast)": ("voxelmorph", "bfloat16"),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[96, 128, 160])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per process")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds over all sizes and configurations; the median is reported")
    parser.add_argument("--train", type=int, nargs="*", default=[64, 96])
    parser.add_argument("--train-repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="TensorFlow intra-op threads = torch threads (default: the cores)")
    parser.add_argument("--model", default=shipped_model(),
                        help="trained model root (SavedModel + model.keras) for the accuracy check "
                             "(default: the shipped demo model)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[500, 501, 502],
                        help="phantom pairs of the accuracy check")
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--no-warp", action="store_true")
    args = parser.parse_args()
    python = ensure_voxelmorph()
    print(f"threads: {args.threads} (TensorFlow intra-op = torch.set_num_threads); median of "
          f"{args.repeats} calls per process, {args.rounds} round(s), sizes alternating", flush=True)

    times = {(name, n): [] for name in CONFIGS for n in args.sizes}
    peaks = {(name, n): [] for name in CONFIGS for n in args.sizes}
    for round_index in range(args.rounds):
        for n in args.sizes:
            for name, (runner, precision) in CONFIGS.items():
                if runner == "tfmlreg":
                    seconds, peak = run_tfmlreg("inference", n, args.repeats, precision,
                                                threads=args.threads)
                else:
                    seconds, peak = run_voxelmorph(python, n, args.repeats, args.threads, precision)
                times[name, n].append(seconds)
                peaks[name, n].append(peak)
                print(f"  round {round_index + 1} {n}^3 {name:32s} {seconds:7.3f} s  "
                      f"peak RSS {peak:5.2f} GiB", flush=True)

    print("\n## Inference (one pair: displacement + warped image)\n")
    print("| size | " + " | ".join(CONFIGS) + " | tfmlreg f32 / VXM f32 | tfmlreg bf16 / VXM f32 |")
    print("|---" * (len(CONFIGS) + 3) + "|")
    for n in args.sizes:
        cells = [f"{statistics.median(times[name, n]):.2f} s{spread(times[name, n])}, "
                 f"{max(peaks[name, n]):.2f} GiB" for name in CONFIGS]
        reference = statistics.median(times["VoxelMorph float32", n])
        ratios = [statistics.median(times[name, n]) / reference
                  for name in ("tfmlreg float32", "tfmlreg bfloat16")]
        print(f"| {n}³ | " + " | ".join(cells) + " | " + " | ".join(f"{r:.2f}×" for r in ratios)
              + " |")

    if not args.no_warp:
        print("\n## One warp\n")
        warp = subprocess.run([sys.executable, os.path.join(HERE, "warp.py"), "--size", "160"],
                              capture_output=True, text=True, check=True, cwd=HERE)
        print("\n".join(line for line in warp.stdout.splitlines() if line.startswith("warp")))

    if args.train:
        print("\n## One training step of tfmlreg (all levels trainable)\n")
        print("| size | float32 | bfloat16 (mixed_bfloat16) |\n|---|---|---|")
        for n in args.train:
            cells = []
            for precision in ("float32", "bfloat16"):
                seconds, peak = run_tfmlreg("train", n, args.train_repeats, precision,
                                            threads=args.threads)
                cells.append(f"{seconds:.2f} s, {peak:.2f} GiB")
            print(f"| {n}³ | " + " | ".join(cells) + " |", flush=True)

    if not args.no_accuracy:
        print(f"\n## bfloat16 accuracy ({os.path.relpath(args.model, ROOT)}, network alone, "
              "phantom pairs 96³, mean TRE)\n")
        rows = accuracy(args.model, args.seeds)
        print("| phantom | float32 (SavedModel) | bfloat16 | change |\n|---|---|---|---|")
        for row in rows:
            print(f"| seed {row['seed']} | {row['float32']:.3f} mm | {row['bfloat16']:.3f} mm | "
                  f"{row['bfloat16'] - row['float32']:+.3f} mm |")
        worst = max(abs(row["bfloat16"] - row["float32"]) for row in rows)
        verdict = "within" if worst <= TRE_LIMIT_MM else "OVER"
        print(f"\nlargest TRE change {worst:.3f} mm: {verdict} the {TRE_LIMIT_MM} mm limit")


if __name__ == "__main__":
    main()
