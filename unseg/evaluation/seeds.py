"""Mean ± std over seeded runs of the pipeline, and the seeded Table 1 beside the supervised ceiling.

Each run is one full, independent pipeline run (its own K-means, Mask R-CNN and DeepLab seeds); its
metrics files are read as they are and only their numbers are averaged here, never inside a stage.
The std is the sample standard deviation (ddof = 1) over runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

# the metric that represents a row of each metrics file
PRIMARY = {"table1": "miou", "baselines": "miou", "linear": "miou", "instances": "AP50"}
TABLE1_ORDER = ("1 mined masks + K-means", "2 + Mask R-CNN", "3 + confidence filter", "4 + DeepLab-v3")


def _numbers(obj: Mapping) -> dict[str, float]:
    return {k: float(v) for k, v in obj.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def metric_rows(name: str, content: Mapping, prefix: str = "") -> dict[str, dict[str, float]]:
    """One metrics file -> {row: {metric: value}}: a file of rows (``table1.json``), or of numbers
    (``ceiling.json``, one row named after the file); rows nested deeper are named by their path
    (``hsg.json``: ``hsg / fine``); rows without numbers (notes) are dropped."""
    flat = _numbers(content)
    rows = {name: flat} if flat and not prefix else {}
    for key, value in content.items():
        if isinstance(value, Mapping):
            if _numbers(value):
                rows[prefix + key] = _numbers(value)
            rows.update(metric_rows(name, value, f"{prefix}{key} / "))
    return rows


def summarise(values: Sequence[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "n": int(len(v))}


def aggregate(runs: Sequence[Mapping[str, Mapping]]) -> dict:
    """``runs``: per run, {metrics file stem: its json}. Returns {file: {row: {"mean", "std", "n",
    "metric", <every metric>: {"mean", "std", "n"}}}}, the row's own mean/std being its primary metric
    (``PRIMARY``; the first metric otherwise). A row or metric missing from some runs averages the
    runs that have it (its ``n`` says how many)."""
    collected: dict[str, dict[str, dict[str, list[float]]]] = {}
    for run in runs:
        for file, content in run.items():
            for row, metrics in metric_rows(file, content).items():
                for metric, value in metrics.items():
                    if math.isfinite(value):
                        collected.setdefault(file, {}).setdefault(row, {}).setdefault(metric, []).append(value)
    out: dict = {}
    for file, rows in collected.items():
        out[file] = {}
        for row, metrics in rows.items():
            primary = PRIMARY.get(file) if PRIMARY.get(file) in metrics else next(iter(metrics))
            out[file][row] = {
                **summarise(metrics[primary]),
                "metric": primary,
                **{m: summarise(v) for m, v in metrics.items()},
            }
    return out


def _pm(s: Mapping | None, scale: float = 100.0) -> str:
    if not s:
        return "–"
    if s["n"] == 1:
        return f"{scale * s['mean']:.1f} (1 run)"
    return f"{scale * s['mean']:.1f} ± {scale * s['std']:.1f}"


def steps_that_earn_their_row(table1: Mapping) -> list[dict]:
    """For consecutive Table-1 rows: the mean gain and whether it exceeds the larger of the two stds."""
    rows = [table1[r] for r in TABLE1_ORDER if r in table1]
    names = [r for r in TABLE1_ORDER if r in table1]
    out = []
    for (a, ra), (b, rb) in zip(zip(names, rows, strict=True), zip(names[1:], rows[1:], strict=True), strict=False):
        gain = rb["mean"] - ra["mean"]
        spread = max(ra["std"], rb["std"])
        out.append({"from": a, "to": b, "gain": gain, "spread": spread, "earned": bool(gain > spread)})
    return out


def _verdict(step: Mapping) -> str:
    if step["earned"]:
        return ""
    return " (a loss beyond the std)" if step["gain"] < -step["spread"] else " (within the std)"


def seeds_markdown(agg: Mapping, seeds: Sequence[int]) -> str:
    """The seeded Table 1 (mIoU, pixel accuracy, object precision, % of the DeepLab ceiling, gain over the row above),
    the ceiling, mask AP, the linear protocols, the baselines, the backbone protocols and the HSG levels."""
    table1, ceiling = agg.get("table1", {}), agg.get("ceiling", {}).get("ceiling", {})
    ceiling_miou = ceiling.get("deeplab_miou", {}).get("mean")
    gains = {g["to"]: g for g in steps_that_earn_their_row(table1)}
    lines = [
        f"Mean ± std over {len(seeds)} seeds ({', '.join(map(str, seeds))}); values in %.\n",
        "| Table 1 | mIoU (Hungarian) | pixel acc. | object precision | % of ceiling | gain over the row above |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in table1.items():
        pct = f"{100 * row['mean'] / ceiling_miou:.0f} %" if ceiling_miou else "–"
        g = gains.get(name)
        gain = "–" if g is None else f"{100 * g['gain']:+.1f}{_verdict(g)}"
        acc, prec = _pm(row.get("pixel_accuracy")), _pm(row.get("object_precision"))
        lines.append(f"| {name} | {_pm(row)} | {acc} | {prec} | {pct} | {gain} |")
    for name, row in agg.get("baselines", {}).items():
        lines.append(f"| baseline: {name} | {_pm(row)} | {_pm(row.get('pixel_accuracy'))} | | | |")
    if ceiling:
        lines.append(
            f"| **supervised ceiling** (DeepLab on ground truth) | {_pm(ceiling.get('deeplab_miou'))} | "
            f"{_pm(ceiling.get('deeplab_pixel_accuracy'))} | | 100 % | |"
        )
    sections = [
        ("instances", "Class-agnostic mask AP", [("AP", 1.0), ("AP50", 1.0)]),
        ("linear", "Linear evaluation (ground truth, frozen DeepLab features)", [("miou", 100.0)]),
    ]
    for file, title, metrics in sections:
        rows = agg.get(file, {})
        if rows:
            lines += ["", f"| {title} | " + " | ".join(m for m, _ in metrics) + " |", "|---|" + "---:|" * len(metrics)]
            lines += [f"| {n} | " + " | ".join(_pm(r.get(m), s) for m, s in metrics) + " |" for n, r in rows.items()]
    if ceiling:
        lines += ["", "| Supervised ceiling (same networks and budget, ground truth) | value |", "|---|---:|"]
        scale = {"maskrcnn_ap50": 1.0, "maskrcnn_ap": 1.0}
        lines += [
            f"| {m} | {_pm(s, scale.get(m, 100.0))} |"
            for m, s in ceiling.items()
            if isinstance(s, Mapping) and m != "images"
        ]
    for file, title in (("backbone", "Backbone protocols"), ("hsg", "HSG FCN (evaluate_hsg)")):
        rows = agg.get(file, {})
        if rows:
            metrics = {m for r in rows.values() for m, s in r.items() if isinstance(s, Mapping) and m != "images"}
            metrics = sorted(metrics)
            lines += ["", f"| {title} | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
            lines += [f"| {n} | " + " | ".join(_pm(r.get(m)) for m in metrics) + " |" for n, r in rows.items()]
    return "\n".join(lines) + "\n"
