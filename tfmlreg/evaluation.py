"""Evaluation the way the paper reports it, at the original full resolution.

Per pair: Dice per lobe and their mean, folding fraction, landmark TRE (mean, std, max, and
DIR-LAB's variant with warped points snapped to voxel centres), each before ("initial": the
identity map) and after registration, and the model's runtime. Per data set: a CSV with one row
per (case, method), a Markdown table like the paper's Table 1 (per case "mean (std)", and the
overall row over all landmarks), a Dice box plot like Fig. 1 and overlays like Fig. 2.

Label maps of both phases are assumed to share the fixed grid (as in DIR-LAB and the phantoms).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
from numpy.typing import ArrayLike

from tfmlreg import metrics
from tfmlreg.ct import LOBE_NAMES
from tfmlreg.types import PathLike

T = TypeVar("T")

INITIAL = "initial"


def evaluate_displacement(pair: Mapping[str, Any], displacement: ArrayLike,
                          jacobian: ArrayLike | None = None) -> dict[str, Any]:
    """Metrics of one displacement (mm, fixed grid) on one pair; missing data gives no entry.
    ``jacobian``: its determinant when the caller has computed it already (see
    :func:`tfmlreg.metrics.folding_fraction`).

    Keys: ``dice`` ``{label: dice}``, ``dice_mean``, ``folding`` (fraction), ``tre`` (per
    landmark, mm), ``tre_mean/std/max``, ``tre_snapped_mean``.
    """
    spacing = np.asarray(pair["spacing_fixed"], np.float32)
    result: dict[str, Any] = {"folding": metrics.folding_fraction(displacement, spacing, jacobian)}
    if pair.get("fixed_labels") is not None and pair.get("moving_labels") is not None:
        warped_labels = metrics.warp_labels(pair["moving_labels"], displacement, spacing)
        labels = sorted(int(v) for v in np.unique(pair["fixed_labels"]) if v != 0)
        result["dice"] = metrics.dice(pair["fixed_labels"], warped_labels, labels=labels)
        result["dice_mean"] = float(np.nanmean(list(result["dice"].values())))
    if pair.get("fixed_landmarks") is not None and pair.get("moving_landmarks") is not None:
        points = (displacement, spacing, pair["fixed_landmarks"], pair["moving_landmarks"])
        result["tre"] = metrics.tre(*points)
        summary = metrics.tre_summary(result["tre"])
        result.update({f"tre_{key}": value for key, value in summary.items()})
        result["tre_snapped_mean"] = float(np.mean(metrics.tre(*points, snap=True)))
    return result


def evaluate_pair(pair: Mapping[str, Any], registered: Mapping[str, Any],
                  jacobian: ArrayLike | None = None) -> dict[str, dict[str, Any]]:
    """``{"initial": metrics, "registered": metrics + seconds}`` for a registered pair
    (``jacobian``: of the registered field, if computed already)."""
    # The zero field as a view of one vector: on a full-resolution CT a real array of it would
    # be 420 MB of fresh memory for nothing.
    identity = np.broadcast_to(np.zeros(3, np.float32), np.shape(pair["fixed"]) + (3,))
    after = evaluate_displacement(pair, registered["displacement"], jacobian)
    after["seconds"] = registered.get("seconds", float("nan"))
    return {INITIAL: evaluate_displacement(pair, identity), "registered": after}


CSV_FIELDS = ("case", "method", "dice_mean", "folding", "tre_mean", "tre_std", "tre_max",
              "tre_snapped_mean", "seconds")


def rows(case: str, results: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Flat CSV rows of one case: one per method, plus one Dice column per label."""
    out = []
    for method, values in results.items():
        row = {"case": case, "method": method}
        row.update({key: values.get(key, "") for key in CSV_FIELDS[2:]})
        row.update({f"dice_{LOBE_NAMES.get(k, k)}": v for k, v in values.get("dice", {}).items()})
        out.append(row)
    return out


def write_csv(path: PathLike, all_rows: Sequence[Mapping[str, Any]]) -> None:
    fields = list(CSV_FIELDS) + sorted({k for row in all_rows for k in row} - set(CSV_FIELDS))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(all_rows)


def _mean_std(values: ArrayLike) -> str:
    values = np.asarray(values, float)
    return f"{np.mean(values):.2f} ({np.std(values):.2f})" if values.size else "–"


def tre_table(tre_by_method: Mapping[str, Mapping[str, ArrayLike]]) -> str:
    """Markdown table like the paper's Table 1: per case mean (std) of TRE in mm, then "Total"
    over all landmarks. ``tre_by_method``: ``{method: {case: per-landmark errors}}``."""
    methods = list(tre_by_method)
    cases = list(next(iter(tre_by_method.values()))) if methods else []
    lines = ["| Case | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for case in cases:
        cells = [_mean_std(tre_by_method[m][case]) for m in methods]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    totals = [_mean_std(np.concatenate(list(tre_by_method[m].values()))) for m in methods]
    lines.append("| **Total** | " + " | ".join(totals) + " |")
    return "\n".join(lines)


def _values(cases: Iterable[Mapping[str, Any]], key: str) -> list[Any]:
    return [case[key] for case in cases if key in case]


def _mean_or_dash(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    return fmt.format(np.mean(values)) if values else "–"


def timed_cases(cases: Sequence[T]) -> Sequence[T]:
    """The cases whose ``seconds`` count for the runtime: all but the first when there are more
    (the first call of a model or a refinement level traces and compiles it: warm-up, not
    registration). One case is all there is."""
    return cases[1:] if len(cases) > 1 else cases


def summary_table(results_by_method: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Markdown table of the means over cases: Dice, folding (%), TRE, runtime (the warm-up
    case excluded, :func:`timed_cases`).

    ``results_by_method``: ``{method: [metrics of each case]}``.
    """
    lines = ["| Method | Dice mean (std) | Folding % mean (max) | TRE mm mean (std) | "
             "TRE snapped mm | Runtime s (after the first case) |", "|---|---|---|---|---|---|"]
    for method, cases in results_by_method.items():
        folding = 100 * np.asarray(_values(cases, "folding"))
        tre = np.concatenate(_values(cases, "tre") or [np.zeros(0)])
        lines.append(
            f"| {method} | {_mean_std(_values(cases, 'dice_mean'))} | "
            f"{folding.mean():.3f} ({folding.max():.3f}) | {_mean_std(tre)} | "
            f"{_mean_or_dash(_values(cases, 'tre_snapped_mean'))} | "
            f"{_mean_or_dash(_values(timed_cases(cases), 'seconds'))} |"
        )
    return "\n".join(lines)


def write_report(out_dir: PathLike,
                 results_by_case: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """CSV, Markdown tables and the Dice box plot for ``{case: {method: metrics}}``."""
    from tfmlreg.figures import save_dice_boxplot

    os.makedirs(out_dir, exist_ok=True)
    write_csv(os.path.join(out_dir, "metrics.csv"),
              [row for case, results in results_by_case.items() for row in rows(case, results)])
    methods = list(next(iter(results_by_case.values())))
    by_method = {m: [results_by_case[c][m] for c in results_by_case] for m in methods}
    text = ["# Registration results", "", "## Summary (means over cases)", "",
            summary_table(by_method), ""]
    if all("tre" in r for r in by_method[methods[0]]):
        tre = {m: {c: results_by_case[c][m]["tre"] for c in results_by_case} for m in methods}
        text += ["## Landmark error (mm), mean (std) per case", "", tre_table(tre), ""]
    if all("dice" in r for r in by_method[methods[0]]):
        labels = {k: LOBE_NAMES.get(k, str(k)) for k in by_method[methods[0]][0]["dice"]}
        save_dice_boxplot(os.path.join(out_dir, "dice_boxplot.png"),
                          {m: [r["dice"] for r in by_method[m]] for m in methods}, labels)
        text += ["![Dice per lobe](dice_boxplot.png)", ""]
    with open(os.path.join(out_dir, "results.md"), "w") as handle:
        handle.write("\n".join(text))
    return os.path.join(out_dir, "results.md")
