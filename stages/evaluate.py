"""evaluate: score every stage's output against ground truth, with baselines, on the validation split.

Reads: params ``evaluate`` (and, for the random-ViT baseline, ``features``/``mining``/``cluster``);
the index, the backbone, ``features.zarr``, ``masks.zarr``, the pseudo-labels. Writes
``<out>/pseudo_labels.json``, ``<out>/baselines.json`` (DVC metrics) and ``<out>/table.md``.
Scores use dataset-level TP/FP/FN at the original resolution; clusters are matched to classes by
the Hungarian algorithm (one-to-one) and, reported separately, by majority vote (many-to-one).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from unseg import coco, store
from unseg.cli import log, parser, run_stage
from unseg.data.index import DatasetIndex, read_image
from unseg.data.transforms import geometry, token_mask_to_pixels
from unseg.errors import UserError
from unseg.evaluation.dense import raw_pixel_kmeans_labels
from unseg.evaluation.metrics import ForegroundIoU
from unseg.evaluation.report import group_by_image, markdown_table, rasterise_annotations, score_label_maps
from unseg.mining import MiningConfig
from unseg.models.vit import create_vit
from unseg.pipeline import cluster_mined, mine_images
from unseg.train.harness import resolve_device

COLUMNS = [
    ("miou", "mIoU (Hungarian)"),
    ("pixel_accuracy", "pixel acc."),
    ("miou_majority", "mIoU (majority)"),
    ("fg_iou", "mask fg IoU"),
]


def mined_pixel_masks(masks: store.RaggedStore, by_id, ids: set[int], attrs: dict, upsample: str) -> dict:
    """image id -> mined mask at the original resolution, for the images in ``ids``."""
    out = {}
    grids = masks.read("grid")
    for i, image_id in enumerate(masks.read("image_id")):
        if int(image_id) in ids:
            e = by_id[int(image_id)]
            g = geometry(e.height, e.width, attrs["short_side"], attrs["backbone"]["patch_size"], attrs["fit"])
            out[int(image_id)] = token_mask_to_pixels(masks.rows("token_mask", i).reshape(grids[i]), g, upsample)
    return out


def foreground_iou(pred_masks: dict, gts: dict) -> dict:
    fg = ForegroundIoU()
    for image_id, gt in gts.items():
        fg.update(pred_masks.get(image_id, np.zeros_like(gt, bool)), gt)
    r = fg.result()
    return {"fg_iou": r["iou"], "fg_precision": r["precision"], "fg_recall": r["recall"]}


def main(args, params) -> None:
    ev = params.evaluate
    index = DatasetIndex.load(args.index)
    split = params.data.val_split
    entries = [e for e in index.split(split) if index.has_ground_truth]
    gts = {e.id: index.read_semantic(e) for e in entries}
    gts = {k: v for k, v in gts.items() if v is not None}
    entries = [e for e in entries if e.id in gts]
    if not entries:
        raise UserError(f"no images with ground truth in split {split!r}: nothing to evaluate")
    n_gt, ignore = len(index.classes), index.ignore_index
    has_background = index.classes[0].lower() == "background"
    by_id = index.by_id
    rows: dict[str, dict] = {}

    # Table 1, row 1: mined masks + K-means pseudo-labels
    pseudo = coco.read_json(args.pseudo_labels / "instances.json")
    k = len(pseudo["categories"])
    anns = group_by_image(pseudo["annotations"])
    maps = {e.id: rasterise_annotations(anns.get(e.id, []), e.height, e.width) for e in entries}
    rows["pseudo_labels"] = score_label_maps(((maps[i], gts[i]) for i in gts), k + 1, n_gt, ignore)
    masks = store.RaggedStore(args.masks)
    mined = mined_pixel_masks(masks, by_id, set(gts), store.RaggedStore(args.features).attrs, params.mining.upsample)
    if has_background:
        rows["pseudo_labels"].update(foreground_iou(mined, gts))
    rows["pseudo_labels"]["k"] = k

    baselines: dict[str, dict] = {}
    if ev.baselines:
        baselines["all_one_class"] = score_label_maps(
            ((np.zeros_like(gts[i], np.int64), gts[i]) for i in gts), 1, n_gt, ignore
        )
        images = [read_image(e) for e in entries]
        raw = raw_pixel_kmeans_labels(images, n_gt, ev.seed, ev.raw_kmeans_pixels)
        baselines["raw_pixel_kmeans"] = score_label_maps(zip(raw, gts.values(), strict=True), n_gt, n_gt, ignore)
        baselines["random_vit"] = random_vit_baseline(params, entries, gts, n_gt, ignore, k, has_background)

    args.out.mkdir(parents=True, exist_ok=True)
    for name, value in (("pseudo_labels", rows["pseudo_labels"]), ("baselines", baselines)):
        (args.out / f"{name}.json").write_text(json.dumps(value, indent=2) + "\n")
    table = markdown_table({**rows, **{f"baseline: {n}": r for n, r in baselines.items()}}, COLUMNS)
    header = f"Split `{split}` ({len(entries)} images, {n_gt} classes), values in %.\n\n"
    (args.out / "table.md").write_text(header + table)
    log("evaluate", "\n" + table)


def random_vit_baseline(params, entries, gts, n_gt, ignore, k, has_background) -> dict:
    """The same chain (extract -> mine -> K-means) with a randomly initialised ViT of the same shape."""
    b, f, m, c = params.backbone, params.features, params.mining, params.cluster
    device = resolve_device(params.evaluate.device)
    torch.manual_seed(params.evaluate.seed)
    model = create_vit(b.arch, b.patch_size, b.depth).eval().to(device)
    cfg = MiningConfig(m.heads, m.cls_mass, m.topk_fraction, m.keep_component)
    mined = mine_images(model, entries, f.short_side, f.fit, cfg, device, f.batch_size)
    labelled = cluster_mined(model, mined, c.input, k, c.seed, device, c.whiten, c.algorithm, m.upsample)
    by_image = {lm.image_id: lm for lm in labelled}

    def pred(e):
        lab = np.zeros((e.height, e.width), np.int64)
        if e.id in by_image:
            lab[by_image[e.id].pixel_mask] = by_image[e.id].cluster + 1
        return lab

    row = score_label_maps(((pred(e), gts[e.id]) for e in entries), k + 1, n_gt, ignore)
    if has_background:
        row.update(foreground_iou({i: lm.pixel_mask for i, lm in by_image.items()}, gts))
    return row


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_stage("evaluate", main, parser(__doc__, "index", "backbone", "features", "masks", "pseudo_labels", "out"))
