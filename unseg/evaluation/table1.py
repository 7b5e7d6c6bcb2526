"""What the Table-1 style evaluations share: label maps of a split from each artifact, scored against GT.

Semantic scores are dataset-level (TP/FP/FN summed over the split at the original resolution) with
predicted ids matched to classes by the Hungarian algorithm (and, reported beside it, by majority vote);
instance scores are class-agnostic mask AP (pycocotools COCOeval) over all detections and over the
most confident one per image.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from unseg import coco, store
from unseg.data.index import DatasetIndex, ImageEntry
from unseg.evaluation.instances import class_agnostic_mask_ap
from unseg.evaluation.report import rasterise_annotations, score_label_maps
from unseg.filtering import IGNORE


def stored_label_maps(path: str | Path, ids: Iterable[int]) -> dict[int, np.ndarray]:
    """The (H, W) label maps of a semantic store (``semantic.zarr``, DeepLab predictions) for ``ids``."""
    wanted = set(ids)
    s = store.RaggedStore(path)
    return {int(i): store.read_semantic_map(s, r) for r, i in enumerate(s.read("image_id")) if int(i) in wanted}


def annotation_label_maps(anns: list[dict], entries: Sequence[ImageEntry]) -> dict[int, np.ndarray]:
    """COCO annotations or results painted into one label map per entry (most confident on top)."""
    by_image = coco.group_by_image(anns)
    return {e.id: rasterise_annotations(by_image.get(e.id, []), e.height, e.width) for e in entries}


def score_split(
    maps: dict[int, np.ndarray],
    entries: Sequence[ImageEntry],
    gts: dict[int, np.ndarray],
    n_pred: int,
    n_gt: int,
    ignore: int,
) -> dict:
    """Hungarian/majority mIoU and pixel accuracy of ``maps`` on ``entries`` (no per-class list)."""
    row = score_label_maps(((maps[e.id], gts[e.id]) for e in entries), n_pred, n_gt, ignore)
    row.pop("per_class_iou")
    return row


def ground_truth_subset(index: DatasetIndex, ids: Iterable[int]) -> dict:
    """The dataset's COCO ground truth restricted to the images ``ids``."""
    wanted = set(ids)
    gt = coco.read_json(index.instances)
    return {
        **gt,
        "images": [im for im in gt["images"] if im["id"] in wanted],
        "annotations": [a for a in gt["annotations"] if a["image_id"] in wanted],
    }


def mask_ap_rows(gt: dict, results: dict[str, list[dict]]) -> dict[str, dict]:
    """``{name}_{multi|single}: {AP, AP50}`` for each named list of COCO results on the images of ``gt``."""
    ids = {im["id"] for im in gt["images"]}
    rows = {}
    for name, res in results.items():
        res = [r for r in res if r["image_id"] in ids]
        for mode in ("multi", "single"):
            ap = class_agnostic_mask_ap(gt, res, mode)
            rows[f"{name}_{mode}"] = {"AP": ap["AP"], "AP50": ap["AP50"]}
    return rows


def table1_rows(
    pseudo_anns: list[dict],
    preds: list[dict],
    semantic: str | Path,
    deeplab_predictions: str | Path,
    val: Sequence[ImageEntry],
    gts: dict[int, np.ndarray],
    score,
    k: int,
    maskrcnn_score: float,
) -> dict[str, dict]:
    """Rows 1-4 on the validation split: each artifact painted into label maps, then ``score(maps, n_pred)``.

    Row 2 paints the Mask R-CNN predictions scoring at least ``maskrcnn_score`` (0: every prediction the
    model wrote, i.e. before any confidence filtering); row 3 is the filtered pseudo-ground-truth, its
    ignored pixels (``filter.uncertain_score``) counted as background.
    """
    confident = [p for p in preds if p["score"] >= maskrcnn_score]
    filtered = {i: np.where(m == IGNORE, 0, m) for i, m in stored_label_maps(semantic, gts).items()}
    return {
        "1 mined masks + K-means": score(annotation_label_maps(pseudo_anns, val), k + 1),
        "2 + Mask R-CNN": score(annotation_label_maps(confident, val), k + 1),
        "3 + confidence filter": score(filtered, k + 1),
        "4 + DeepLab-v3": score(stored_label_maps(deeplab_predictions, gts), k + 1),
    }
