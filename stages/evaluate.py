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
import torch

from unseg import coco, store
from unseg.cli import log, parser, run_stage
from unseg.crf import dense_crf
from unseg.data.index import DatasetIndex, read_image
from unseg.data.transforms import geometry, token_mask_to_pixels
from unseg.deeplab import build_deeplab, deeplab_features, predict_semantic
from unseg.evaluation.dense import raw_pixel_kmeans_labels
from unseg.evaluation.metrics import ForegroundIoU
from unseg.evaluation.probe import images_within_budget, predict_probe, train_linear_probe
from unseg.evaluation.report import markdown_table, score_label_maps
from unseg.evaluation.table1 import (
    annotation_label_maps,
    ground_truth_subset,
    mask_ap_rows,
    score_split,
    stored_label_maps,
)
from unseg.filtering import IGNORE
from unseg.models.checkpoint import read_checkpoint
from unseg.progress import progress
from unseg.train.harness import resolve_device

COLUMNS = [
    ("miou", "mIoU (Hungarian)"),
    ("pixel_accuracy", "pixel acc."),
    ("object_precision", "object precision"),
    ("miou_majority", "mIoU (majority)"),
]


def deeplab_feature_list(model, entries, device, where: str, input_size: int) -> list[torch.Tensor]:
    return [
        deeplab_features(model, torch.from_numpy(read_image(e)).permute(2, 0, 1), device, where, input_size)
        for e in progress(entries, desc=f"linear:{where}")
    ]


def linear_protocols(model, train, train_gts, val, val_gts, n_classes, ignore, ev, device, input_size) -> dict:
    """The paper's probe on frozen DeepLab backbone features (App. A.2), and the released protocol that
    re-fits only DeepLab's last 1x1 conv (``linear_finetune.py``); both trained with ground truth."""
    out = {}
    for where, name in (("backbone", "probe_backbone"), ("head", "refit_last_conv")):
        first = deeplab_feature_list(model, train[:1], device, where, input_size)[0]
        per_pixel = first.numel() * first.element_size() / (train[0].height * train[0].width)
        pixels = [e.height * e.width for e in train]
        keep = images_within_budget(pixels, per_pixel, ev.probe_memory_mb * 2**20, ev.seed)
        if len(keep) < len(train):
            log("evaluate", f"linear:{where}: features of {len(keep)} of {len(train)} training images fit")
        conv = train_linear_probe(
            deeplab_feature_list(model, [train[i] for i in keep], device, where, input_size),
            [train_gts[i] for i in keep],
            n_classes,
            epochs=ev.probe_epochs,
            lr=ev.probe_lr,
            ignore_index=ignore,
            seed=ev.seed,
            device=str(device),
        )
        val_f = deeplab_feature_list(model, val, device, where, input_size)
        preds = [predict_probe(conv, f, g.shape) for f, g in zip(val_f, val_gts, strict=True)]
        row = score_label_maps(zip(preds, val_gts, strict=True), n_classes, n_classes, ignore)
        out[name] = {"miou": row["miou"], "pixel_accuracy": row["pixel_accuracy"]}
    return out


def write_empty(out, note: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("table1", "instances", "linear", "baselines"):
        (out / f"{name}.json").write_text(json.dumps({"note": note}) + "\n")
    (out / "table.md").write_text(note + "\n")


def mined_mask_fg_iou(masks_path, features_path, index: DatasetIndex, gts: dict, upsample: str) -> float | None:
    """Dataset-level foreground IoU of the mined masks (``masks.zarr``) on the images of ``gts``."""
    masks, attrs = store.RaggedStore(masks_path), store.RaggedStore(features_path).attrs
    by_id, grids, fg = index.by_id, masks.read("grid"), ForegroundIoU()
    for i, image_id in enumerate(masks.read("image_id")):
        if int(image_id) in gts:
            e = by_id[int(image_id)]
            g = geometry(e.height, e.width, attrs["short_side"], attrs["backbone"]["patch_size"], attrs["fit"])
            fg.update(token_mask_to_pixels(masks.rows("token_mask", i).reshape(grids[i]), g, upsample), gts[e.id])
    return fg.result()["iou"]


def as_background(maps: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Pseudo-GT pixels left out of training (``filter.uncertain_score``) count as background predictions."""
    return {i: np.where(m == IGNORE, 0, m) for i, m in maps.items()}


def crf_available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def main(args, params) -> None:
    ev, d = params.evaluate, params.deeplab
    device = resolve_device(ev.device)
    index = DatasetIndex.load(args.index)
    val, val_gts = index.labelled(params.data.val_split)
    if not val:
        note = f"no ground truth in split {params.data.val_split!r}: nothing to score (the artifacts are still there)"
        write_empty(args.out, note)
        log("evaluate", note)
        return
    gts = {e.id: g for e, g in zip(val, val_gts, strict=True)}
    n_gt, ignore = len(index.classes), index.ignore_index
    pseudo = coco.read_json(args.pseudo_labels / "instances.json")
    k = len(pseudo["categories"])

    def score(maps: dict[int, np.ndarray], n_pred: int) -> dict:
        return score_split(maps, val, gts, n_pred, n_gt, ignore)

    preds = coco.read_json(args.maskrcnn / "predictions.json")
    confident = [p for p in preds if p["score"] >= ev.maskrcnn_score]
    rows = {
        "1 mined masks + K-means": score(annotation_label_maps(pseudo["annotations"], val), k + 1),
        "2 + Mask R-CNN": score(annotation_label_maps(confident, val), k + 1),
        "3 + confidence filter": score(as_background(stored_label_maps(args.semantic, gts)), k + 1),
        "4 + DeepLab-v3": score(stored_label_maps(args.deeplab / "predictions.zarr", gts), k + 1),
    }
    if index.classes[0].lower() == "background":
        rows["1 mined masks + K-means"]["mask_fg_iou"] = mined_mask_fg_iou(
            args.masks, args.features, index, gts, params.mining.upsample
        )
    ckpt = read_checkpoint(args.deeplab / "model.pt", "DeepLab model")
    model = build_deeplab(ckpt["num_classes"], d.backbone, d.output_stride, d.aspp_rates, d.freeze_blocks)
    model.load_state_dict(ckpt["model"])
    model.eval().to(device)
    if ev.crf and crf_available():
        crf_maps = {}
        for e in progress(val, desc="crf"):
            image = read_image(e)
            _, logits = predict_semantic(
                model, torch.from_numpy(image).permute(2, 0, 1), device, return_logits=True, input_size=d.crop_size
            )
            crf_maps[e.id] = dense_crf(image, logits)
        rows["5 + CRF"] = score(crf_maps, ckpt["num_classes"])
    elif ev.crf:
        rows["5 + CRF"] = {"note": "skipped: pydensecrf is not installed (pip install pydensecrf2)"}

    instances = {}
    if index.instances:
        mined_results = [{**a, "score": 1.0} for a in pseudo["annotations"]]
        instances = mask_ap_rows(ground_truth_subset(index, gts), {"mined_masks": mined_results, "maskrcnn": preds})

    train, train_gts = index.labelled(params.data.train_split)
    linear = (
        linear_protocols(model, train, train_gts, val, val_gts, n_gt, ignore, ev, device, d.crop_size) if train else {}
    )

    baselines = {}
    if ev.baselines:
        baselines["all one class"] = score({e.id: np.zeros((e.height, e.width), np.int64) for e in val}, 1)
        raw = raw_pixel_kmeans_labels([read_image(e) for e in val], n_gt, ev.seed, ev.raw_kmeans_pixels)
        baselines["K-means on raw pixels"] = score({e.id: r for e, r in zip(val, raw, strict=True)}, n_gt)
        backbone = json.loads(args.backbone_metrics.read_text()) if args.backbone_metrics.exists() else {}
        if "random_init_front_half" in backbone:
            baselines["random-init ViT, mined + K-means"] = backbone["random_init_front_half"]

    args.out.mkdir(parents=True, exist_ok=True)
    for name, value in (("table1", rows), ("instances", instances), ("linear", linear), ("baselines", baselines)):
        (args.out / f"{name}.json").write_text(json.dumps(value, indent=2) + "\n")
    text = [
        f"Split `{params.data.val_split}`: {len(val)} images, {n_gt} classes, k = {k} clusters; values in %.\n",
        "## Table 1 (clustering: Hungarian-matched mIoU)\n",
        markdown_table({**rows, **{f"baseline: {n}": r for n, r in baselines.items()}}, COLUMNS),
    ]
    if instances:
        text += [
            "\n## Class-agnostic mask AP\n",
            markdown_table(instances, [("AP", "AP"), ("AP50", "AP50")], scale=1.0),
        ]
    if linear:
        text += [
            "\n## Linear evaluation (1x1 conv trained with ground truth on frozen DeepLab features)\n",
            markdown_table(linear, [("miou", "mIoU"), ("pixel_accuracy", "pixel acc.")]),
        ]
    (args.out / "table.md").write_text("\n".join(text))
    log("evaluate", "\n" + "\n".join(text))


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
