"""evaluate: MaskDistill's Table 1 for this run, instance AP and the linear protocols (validation split).

Reads: params ``evaluate``, ``data``, ``mining.upsample``, the DeepLab architecture; the index,
``features.zarr`` (geometry) and ``masks.zarr`` (mined masks), the pseudo-labels, the Mask R-CNN
predictions, the filtered pseudo-ground-truth, the DeepLab model and predictions, each CRF self-training
round's predictions (``--self-training``: the rows "6 + CRF self-training, round r"), and ``backbone.json``
(the random-ViT baseline from ``evaluate_backbone``). Writes ``<out>/table1.json``, ``instances.json``,
``linear.json``, ``baselines.json`` (DVC metrics), ``table.md`` and ``cluster_classes.json`` (the class each
DeepLab cluster is matched to, for ``unseg segment --names matched``); and, as DVC plots, ``<plots>/table1.csv``
(the rows as bars) and ``<plots>/sheets/``: ``worst.png`` / ``best.png`` (contact sheets of four val images
each), or one ``random.png`` where there is no ground truth.

Semantic scores: TP/FP/FN summed over the split at the original resolution; predicted clusters are
matched to classes by the Hungarian algorithm (one-to-one) and, reported separately, by majority vote.
Instance scores: class-agnostic mask AP/AP50 (pycocotools COCOeval), all detections ("multi") and the
most confident one per image ("single"), as in the paper's Table 3.
"""

from __future__ import annotations

import json
from pathlib import Path

from unseg import figures
from unseg.cli import log, parser, run_stage, write_text
from unseg.data.index import DatasetIndex
from unseg.evaluation.report import evaluation_markdown
from unseg.evaluation.suites import RunArtifacts, cluster_classes, run_suite, self_training_rows
from unseg.train.harness import resolve_device

COLUMNS = [
    ("miou", "mIoU (Hungarian)"),
    ("pixel_accuracy", "pixel acc."),
    ("object_precision", "object precision"),
    ("miou_majority", "mIoU (majority)"),
]
METRICS = ("table1", "instances", "linear", "baselines")


def write_metrics(out, values: dict, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in METRICS:
        write_text(out / f"{name}.json", json.dumps(values[name], indent=2) + "\n")
    write_text(out / "table.md", markdown)


def main(args, params) -> None:
    index = DatasetIndex.load(args.index)
    split = params.data.val_split
    val, val_gts = index.labelled(split)
    args.plots.mkdir(parents=True, exist_ok=True)
    if not val:
        note = f"no ground truth in split {split!r}: nothing to score (label-free: health.json)"
        write_metrics(args.out, {name: {"note": note} for name in METRICS}, note + "\n")
        write_text(args.out / "cluster_classes.json", json.dumps({"note": note}) + "\n")
        figures.write_bars(args.plots / "table1.csv", [])
        figures.write_sheets(Path("."), index, split, args.plots / "sheets")  # without labels: random.png
        log("evaluate", note)
        return
    art = RunArtifacts(**{name: getattr(args, name) for name in RunArtifacts.__dataclass_fields__})
    device = resolve_device(params.evaluate.device)
    values = run_suite(params, index, val, val_gts, art, device, lambda m: log("evaluate", m))
    values["table1"] |= self_training_rows(args.self_training, val, val_gts, len(index.classes), index.ignore_index)
    tables = [values[name] for name in ("table1", "baselines", "instances", "linear")]
    text = evaluation_markdown(split, len(val), len(index.classes), values["clusters"], *tables, COLUMNS)
    write_metrics(args.out, values, text)
    classes = cluster_classes(args.deeplab, val, val_gts, index.classes, index.ignore_index)
    write_text(args.out / "cluster_classes.json", json.dumps({"split": split, **classes}, indent=2) + "\n")
    figures.write_bars(args.plots / "table1.csv", figures.table1_bars(values["table1"], values["baselines"]))
    figures.write_sheets(Path("."), index, split, args.plots / "sheets")
    log("evaluate", "\n" + text)


if __name__ == "__main__":
    names = ("index", "features", "masks", "pseudo_labels", "maskrcnn", "semantic", "deeplab", "backbone_metrics")
    ap = parser(__doc__, *names, "out", "plots")
    ap.add_argument("--self-training", type=Path, nargs="*", default=[], help="the self_train rounds' folders")
    run_stage("evaluate", main, ap)
