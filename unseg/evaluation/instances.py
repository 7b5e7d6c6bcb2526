"""Class-agnostic mask AP with pycocotools (MaskDistill Table 3, appendix A.4; ``eval_instances.py``).

All GT and predicted categories collapse into one, then ``COCOeval(iouType="segm")`` gives the COCO
AP (IoU 0.50:0.95), AP50 and AP75 at ``maxDets=100``, in percent.

Two settings (reference.md §1 "Evaluation", "Instance eval"):
- ``"multi"``: every prediction is evaluated against every GT object.
- ``"single"``: per image only the most confident prediction is kept, and it is evaluated against the
  single GT object whose bounding box has the largest IoU with the prediction's box (the released
  ``--eval_most_confident`` rule: GT box corners rounded to integers, first object on ties, crowd
  objects are candidates too). Images without a prediction then have no GT either, so they do not
  count; an image with a prediction but no GT object keeps the prediction as a false positive (the
  released script asserts instead).
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from unseg.coco import to_rle
from unseg.errors import UserError
from unseg.matching import box_iou_xyxy

AGNOSTIC_CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}


def _image_sizes(gt: dict) -> dict[int, tuple[int, int]]:
    try:
        return {int(im["id"]): (int(im["height"]), int(im["width"])) for im in gt["images"]}
    except KeyError as e:
        raise UserError(f"ground-truth json: every image needs 'id', 'height' and 'width' (missing {e})") from None


def _agnostic_gt(gt: dict) -> dict:
    """Copy of the GT json with one category, and ``area``/``iscrowd``/``id`` filled where missing."""
    sizes = _image_sizes(gt)
    anns = []
    for i, ann in enumerate(gt.get("annotations", [])):
        ann = dict(ann)
        if int(ann["image_id"]) not in sizes:
            raise UserError(f"ground-truth annotation {i} refers to image_id {ann['image_id']} not in 'images'")
        h, w = sizes[int(ann["image_id"])]
        if "area" not in ann or "bbox" not in ann:
            rle = to_rle(ann["segmentation"], h, w)
            ann.setdefault("area", float(mask_utils.area(rle)))
            ann.setdefault("bbox", mask_utils.toBbox(rle).tolist())
        ann.setdefault("iscrowd", 0)
        ann["id"] = i + 1
        ann["category_id"] = AGNOSTIC_CATEGORY["id"]
        anns.append(ann)
    return {"images": copy.deepcopy(gt["images"]), "annotations": anns, "categories": [AGNOSTIC_CATEGORY]}


def _agnostic_results(results: list[dict], sizes: dict[int, tuple[int, int]]) -> list[dict]:
    """Results as COCO annotations with RLE masks, mask-derived area/bbox (as ``COCO.loadRes`` does) and
    one category. Keeps a given ``bbox`` for the single-object matching."""
    out = []
    for i, res in enumerate(results):
        image_id = int(res["image_id"])
        if image_id not in sizes:
            raise UserError(f"prediction {i} refers to image_id {image_id}, which is not in the ground truth")
        if "score" not in res:
            raise UserError(f"prediction {i} (image_id {image_id}) has no 'score'")
        rle = to_rle(res["segmentation"], *sizes[image_id])
        mask_box = mask_utils.toBbox(rle).tolist()
        out.append(
            {
                "id": i + 1,
                "image_id": image_id,
                "category_id": AGNOSTIC_CATEGORY["id"],
                "segmentation": rle,
                "area": float(mask_utils.area(rle)),
                "bbox": list(res.get("bbox", mask_box)),
                "iscrowd": 0,
                "score": float(res["score"]),
            }
        )
    return out


def most_confident_per_image(results: list[dict]) -> list[dict]:
    """The highest-scoring result of each image (the first one on ties), in first-seen image order."""
    best: dict[int, dict] = {}
    for res in results:
        key = int(res["image_id"])
        if key not in best or best[key]["score"] < res["score"]:
            best[key] = res
    return list(best.values())


def _xywh_to_xyxy(b) -> np.ndarray:
    b = np.asarray(b, dtype=np.float64)
    return np.concatenate([b[..., :2], b[..., :2] + b[..., 2:]], axis=-1)


def select_single_object(gt: dict, results: list[dict]) -> tuple[dict, list[dict]]:
    """The ``"single"`` setting: most confident prediction per image + the GT object of max box IoU with it.

    ``gt``/``results`` must already be agnostic (see :func:`_agnostic_gt`, :func:`_agnostic_results`).
    GT box corners are rounded to integers (``get_bbx_info_coco``); returns (gt subset, results subset).
    """
    kept = most_confident_per_image(results)
    by_image: dict[int, list[dict]] = {}
    for ann in gt["annotations"]:
        by_image.setdefault(int(ann["image_id"]), []).append(ann)
    chosen = []
    for res in kept:
        candidates = by_image.get(res["image_id"], [])
        if not candidates:
            continue
        gt_boxes = np.round(_xywh_to_xyxy([a["bbox"] for a in candidates]))
        ious = box_iou_xyxy(_xywh_to_xyxy(res["bbox"]), gt_boxes)
        chosen.append(candidates[int(np.argmax(ious))])
    return {**gt, "annotations": chosen}, kept


def _coco_from(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def class_agnostic_mask_ap(gt: dict, results: list[dict], mode: str = "multi") -> dict:
    """Class-agnostic COCO mask AP, AP50, AP75 (percent) of ``results`` against ``gt``.

    gt: COCO instances dict (``images`` with id/height/width, ``annotations`` with polygon or RLE
    ``segmentation``); results: COCO result dicts (``image_id``, ``segmentation``, ``score``; ``bbox``
    optional, else the mask's box). ``mode``: ``"multi"`` or ``"single"`` (see module docstring).
    A value is ``None`` where COCOeval has no GT object to score (it reports -1 there).
    COCOeval's prints are silenced.
    """
    if mode not in ("multi", "single"):
        raise UserError(f"instance AP mode must be 'multi' or 'single', got {mode!r}")
    gt_agn = _agnostic_gt(gt)
    res_agn = _agnostic_results(results, _image_sizes(gt))
    if mode == "single":
        gt_agn, res_agn = select_single_object(gt_agn, res_agn)
    res_dataset = {"images": gt_agn["images"], "annotations": res_agn, "categories": [AGNOSTIC_CATEGORY]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt, coco_dt = _coco_from(gt_agn), _coco_from(res_dataset)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {name: (float(stats[i]) * 100.0 if stats[i] >= 0 else None) for i, name in enumerate(("AP", "AP50", "AP75"))}
