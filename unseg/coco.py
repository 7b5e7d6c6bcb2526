"""COCO instance json helpers: RLE encoding/decoding and annotation records.

Masks are stored as compressed RLE (``{"size": [h, w], "counts": str}``), readable as is by
pycocotools and detectron2.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils


def encode_rle(mask: np.ndarray) -> dict:
    """(H, W) bool/uint8 mask -> compressed RLE with a str ``counts`` (json-serialisable)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def decode_rle(rle: dict) -> np.ndarray:
    """Compressed or uncompressed RLE -> (H, W) bool mask."""
    if isinstance(rle.get("counts"), list):
        rle = mask_utils.frPyObjects(rle, *rle["size"])
    elif isinstance(rle.get("counts"), str):
        rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def to_rle(segmentation, height: int, width: int) -> dict:
    """Polygons, uncompressed or compressed RLE (str or bytes counts) -> compressed RLE with bytes counts
    (the form pycocotools' ``decode``/``iou``/``COCOeval`` take)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, height, width)
    counts = segmentation["counts"]
    return {"size": list(segmentation["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of any COCO segmentation (polygons or RLE)."""
    return mask_utils.decode(to_rle(segmentation, height, width)).astype(bool)


def mask_bbox(mask: np.ndarray) -> list[float]:
    """XYWH box of the True pixels of ``mask`` (COCO convention), zeros for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    x0, y0 = float(xs.min()), float(ys.min())
    return [x0, y0, float(xs.max()) + 1 - x0, float(ys.max()) + 1 - y0]


def annotation(ann_id: int, image_id: int, category_id: int, mask: np.ndarray, score: float | None = None) -> dict:
    """One COCO instance annotation (or result, when ``score`` is given) for a binary mask."""
    rec = {
        "id": int(ann_id),
        "image_id": int(image_id),
        "category_id": int(category_id),
        "segmentation": encode_rle(mask),
        "area": float(mask.sum()),
        "bbox": mask_bbox(mask),
        "iscrowd": 0,
    }
    if score is not None:
        rec["score"] = float(score)
    return rec


def instance_results(
    image_id: int, masks: np.ndarray, category_ids: Sequence[int], scores: Sequence[float], score_threshold: float = 0.0
) -> list[dict]:
    """COCO results of one image's predicted instances, the one writer of both Mask R-CNN backends.

    ``masks`` (N, H, W) bool at the image's resolution, with their ``category_ids`` and ``scores``; instances
    scoring below ``score_threshold`` or with an empty mask are left out. Ids are 0 until :func:`number_results`.
    """
    return [
        annotation(0, image_id, int(category), mask, score=float(score))
        for mask, category, score in zip(masks, category_ids, scores, strict=True)
        if score >= score_threshold and mask.any()
    ]


def number_results(results: list[dict]) -> list[dict]:
    """Give COCO results their running ``id`` 1..N, in place; returns them."""
    for i, rec in enumerate(results, start=1):
        rec["id"] = i
    return results


def write_json(obj, path: str | Path) -> None:
    """Write json atomically: a temp file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def read_json(path: str | Path):
    with open(path) as f:
        return json.load(f)


def group_by_image(anns: list[dict]) -> dict[int, list[dict]]:
    """COCO annotations or results keyed by image id, in file order."""
    out: dict[int, list[dict]] = {}
    for a in anns:
        out.setdefault(int(a["image_id"]), []).append(a)
    return out
