"""evaluate: MaskDistill's Table 1 for this run, instance AP and the linear protocols (validation split).

Reads: params ``evaluate``, ``mining.upsample``, the DeepLab architecture; the index, ``features.zarr``
(geometry) and ``masks.zarr`` (mined masks), the pseudo-labels, the Mask R-CNN predictions, the filtered
pseudo-ground-truth, the DeepLab model and predictions, and ``backbone.json`` (the random-ViT baseline
from ``evaluate_backbone``). Writes ``<out>/table1.json``, ``instances.json``, ``linear.json``,
``baselines.json`` (DVC metrics) and ``table.md``.

Semantic scores: TP/FP/FN summed over the split at the original resolution; predicted clusters are
matched to classes by the Hungarian algorithm (one-to-one) and, reported separately, by majority vote.
Instance scores: class-agnostic mask AP/AP50 (pycocotools COCOeval), all detections ("multi") and the
most confident one per image ("single"), as in the paper's Table 3.
"""

from __future__ import annotations

import json

import numpy as np

from unseg import coco, store
from unseg.cli import log, parser, run_stage, write_text
from unseg.data.index import DatasetIndex
from unseg.evaluation import protocols as P
from unseg.evaluation.report import evaluation_markdown
from unseg.evaluation.table1 import ground_truth_subset, mask_ap_rows, score_split, table1_rows
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
    ev, d = params.evaluate, params.deeplab
    device = resolve_device(ev.device)
    index = DatasetIndex.load(args.index)
    val, val_gts = index.labelled(params.data.val_split)
    if not val:
        note = f"no ground truth in split {params.data.val_split!r}: nothing to score (label-free: health.json)"
        write_metrics(args.out, {name: {"note": note} for name in METRICS}, note + "\n")
        log("evaluate", note)
        return
    gts = {e.id: g for e, g in zip(val, val_gts, strict=True)}
    n_gt, ignore = len(index.classes), index.ignore_index
    pseudo = coco.read_json(args.pseudo_labels / "instances.json")
    k = len(pseudo["categories"])

    def score(maps: dict[int, np.ndarray], n_pred: int) -> dict:
        return score_split(maps, val, gts, n_pred, n_gt, ignore)

    preds = coco.read_json(args.maskrcnn / "predictions.json")
    rows = table1_rows(
        pseudo["annotations"],
        preds,
        args.semantic,
        args.deeplab / "predictions.zarr",
        val,
        gts,
        score,
        k,
        ev.maskrcnn_score,
    )
    if index.classes[0].lower() == "background":
        masks, attrs = store.RaggedStore(args.masks), store.RaggedStore(args.features).attrs
        fg = P.mined_mask_fg_iou(masks, attrs, index.by_id, gts, params.mining.upsample)
        rows["1 mined masks + K-means"]["mask_fg_iou"] = fg
    model = P.load_deeplab(
        args.deeplab / "model.pt", d.backbone, d.output_stride, d.aspp_rates, d.freeze_blocks, device
    )
    if ev.crf and P.crf_available():
        rows["5 + CRF"] = score(P.crf_label_maps(model, val, device, d.crop_size), model.num_classes)
    elif ev.crf:
        rows["5 + CRF"] = {"note": "skipped: pydensecrf is not installed (pip install pydensecrf2)"}
    instances = {}
    if index.instances:
        mined = [{**a, "score": 1.0} for a in pseudo["annotations"]]
        instances = mask_ap_rows(ground_truth_subset(index, gts), {"mined_masks": mined, "maskrcnn": preds})
    train, train_gts = index.labelled(params.data.train_split)
    probe = P.ProbeConfig(epochs=ev.probe_epochs, lr=ev.probe_lr, memory_mb=ev.probe_memory_mb, seed=ev.seed)
    linear = {}
    if train:
        linear = P.linear_protocols(
            model,
            train,
            train_gts,
            val,
            val_gts,
            n_gt,
            ignore,
            probe,
            device,
            d.crop_size,
            lambda m: log("evaluate", m),
        )
    baselines = P.baseline_rows(val, score, n_gt, ev.seed, ev.raw_kmeans_pixels) if ev.baselines else {}
    backbone = json.loads(args.backbone_metrics.read_text()) if args.backbone_metrics.exists() else {}
    if ev.baselines and "random_init_front_half" in backbone:
        baselines["random-init ViT, mined + K-means"] = backbone["random_init_front_half"]
    text = evaluation_markdown(params.data.val_split, len(val), n_gt, k, rows, baselines, instances, linear, COLUMNS)
    write_metrics(args.out, {"table1": rows, "instances": instances, "linear": linear, "baselines": baselines}, text)
    log("evaluate", "\n" + text)


if __name__ == "__main__":
    ap = parser(
        __doc__,
        "index",
        "features",
        "masks",
        "pseudo_labels",
        "maskrcnn",
        "semantic",
        "deeplab",
        "backbone_metrics",
        "out",
    )
    run_stage("evaluate", main, ap)
