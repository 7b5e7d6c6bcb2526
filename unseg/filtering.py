"""MaskDistill confidence filtering: Mask R-CNN predictions -> semantic pseudo-ground-truth.

Paper Sec. 3.3 and 4.1: keep the masks with score s > tau (tau = 0.9); when none passes, keep the
single most confident one; where kept masks overlap, the more confident wins; a kept mask of
category c paints 1 + c (0 is background). "We only keep the most confident mask when two candidates
overlap" is also read at mask level, as a param: with ``overlap_iou`` set, a kept mask whose IoU with a more
confident kept mask exceeds it is dropped whole (:func:`suppress_overlaps`, greedy class-agnostic mask NMS).
The released ``gen_segmentation.py`` differs in two ways
(reference.md §1.1 "Confidence filtering", §1.4 item 6): it keeps s >= tau, and its overlap test is
broken by integer indexing, so later (weaker) masks usually overwrite earlier ones. Both readings
are selectable here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from unseg.coco import decode_rle
from unseg.errors import UserError

OVERLAP_RULES = ("confidence", "overwrite", "released")
MAX_CATEGORY = 253  # 1 + category must stay below the ignore label 255 in a uint8 map
IGNORE = 255  # pseudo-label of a pixel no loss is taken on


def confidence_order(scores: np.ndarray) -> np.ndarray:
    """Indices sorted by decreasing score; equal scores keep increasing index (a stable sort)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def select_confident(scores: np.ndarray, tau: float, inclusive: bool = False) -> np.ndarray:
    """Indices of the kept predictions of one image, most confident first.

    Kept: s_i > tau (paper Sec. 3.3), or s_i >= tau with ``inclusive`` (released code). When nothing
    passes, the single most confident prediction is kept (paper Sec. 4.1; lowest index among ties).
    No predictions: an empty array. scores (N,) float -> (M,) int64.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return np.zeros(0, dtype=np.int64)
    order = confidence_order(scores)
    passed = scores[order] >= tau if inclusive else scores[order] > tau
    kept = order[passed] if passed.any() else order[:1]
    return kept.astype(np.int64)


def mask_iou(masks: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boolean masks: (N, H, W) -> (N, N) float64; two empty masks have IoU 0."""
    flat = np.asarray(masks, dtype=bool).reshape(len(masks), -1).astype(np.float64)
    inter = flat @ flat.T
    area = flat.sum(1)
    union = area[:, None] + area[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def suppress_overlaps(masks: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices (into ``masks``, ranked most confident first) of the masks kept by greedy mask NMS.

    Walking down the ranking, a mask is kept unless its IoU with an already kept mask exceeds
    ``iou_threshold``, whatever the categories: Mask R-CNN's NMS is per class, so one object is often
    detected twice under two clusters, and the weaker copy's rim would be painted as a second object.
    masks (N, H, W) bool in decreasing confidence -> (M,) int64, increasing.
    """
    iou = mask_iou(masks)
    kept: list[int] = []
    for i in range(len(masks)):
        if all(iou[i, j] <= iou_threshold for j in kept):
            kept.append(i)
    return np.array(kept, dtype=np.int64)


def _released_skip(label: np.ndarray, mask: np.ndarray) -> bool:
    """The released overlap test ``label[mask].any()`` with ``mask`` a uint8 0/1 array.

    Integer indexing selects image rows: row 0 when the mask has a 0 pixel, row 1 when it has a 1
    pixel; the mask is skipped when a selected row already holds a label.
    """
    rows = [r for r, present in ((0, (mask == 0).any()), (1, (mask == 1).any())) if present]
    return bool(label[rows].any()) if rows else False


def rasterise_semantic(
    masks: np.ndarray,
    categories: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    overlap: str = "confidence",
) -> np.ndarray:
    """Paint kept masks into one uint8 (H, W) label map: 0 background, 1 + category on a mask.

    masks (N, H, W) bool, categories (N,) int (0-based cluster ids), scores (N,) float.
    Masks are ranked by decreasing score, ties by increasing index (:func:`confidence_order`).
    - ``'confidence'`` (paper Sec. 3.3): each pixel takes the highest-ranked mask covering it,
      whatever the input order;
    - ``'overwrite'`` (what the released code effectively does): masks are painted in rank order and
      a later, weaker mask overwrites, so each pixel takes the lowest-ranked mask covering it;
    - ``'released'``: ``'overwrite'`` plus the released (buggy) skip test of :func:`_released_skip`,
      checked before painting every mask after the first, bit for bit.
    """
    if overlap not in OVERLAP_RULES:
        raise UserError(f"overlap must be one of {OVERLAP_RULES}, got {overlap!r}")
    masks = np.asarray(masks, dtype=bool)
    categories = np.asarray(categories, dtype=np.int64)
    if masks.ndim != 3 or len(categories) != len(masks) or len(scores) != len(masks):
        raise UserError(f"masks {masks.shape}, categories {categories.shape} and scores disagree in length")
    if len(categories) and (categories.min() < 0 or categories.max() > MAX_CATEGORY):
        raise UserError(f"category ids must lie in 0..{MAX_CATEGORY} to fit a uint8 label map, got {categories}")
    label = np.zeros(masks.shape[1:], dtype=np.uint8)
    if len(masks) == 0:
        return label
    order = confidence_order(np.asarray(scores))
    ranked = masks[order]
    values = (1 + categories[order]).astype(np.uint8)
    if overlap == "confidence":
        covered = ranked.any(0)
        label[covered] = values[ranked.argmax(0)][covered]
    elif overlap == "overwrite":
        covered = ranked.any(0)
        last = len(ranked) - 1 - ranked[::-1].argmax(0)
        label[covered] = values[last][covered]
    else:
        for j, (mask, value) in enumerate(zip(ranked, values, strict=True)):
            if j > 0 and _released_skip(label, mask.astype(np.uint8)):
                continue
            label[mask] = value
    return label


def _decode_masks(predictions: Sequence[dict], height: int, width: int) -> np.ndarray:
    masks = np.zeros((len(predictions), height, width), dtype=bool)
    for j, pred in enumerate(predictions):
        mask = decode_rle(pred["segmentation"])
        if mask.shape != (height, width):
            raise UserError(
                f"prediction for image {pred.get('image_id')} has a {mask.shape} mask, the image is {(height, width)}"
            )
        masks[j] = mask
    return masks


def filter_image(
    predictions: Sequence[dict],
    height: int,
    width: int,
    tau: float,
    inclusive: bool = False,
    overlap: str = "confidence",
    uncertain_score: float | None = None,
    overlap_iou: float | None = None,
) -> tuple[np.ndarray, list[dict]]:
    """Semantic pseudo-label (H, W) uint8 of one image from its COCO result dicts, and the kept results.

    Each result needs ``segmentation`` (RLE at the image's resolution), ``category_id`` and ``score``.
    Keeps :func:`select_confident`, then, with ``overlap_iou`` set, :func:`suppress_overlaps` of those,
    and paints with :func:`rasterise_semantic`. An image without
    predictions gets an all-background map (the released code writes no PNG for it).
    ``uncertain_score`` (an extension; None: off, the paper): background pixels covered by a dropped
    prediction scoring at least this are set to :data:`IGNORE` instead of background, so that an
    object the filter was unsure of is not taught as background (a mask dropped as the weaker copy of
    an overlapping one is a duplicate, not an unsure object: it does not count).
    """
    scores = np.array([float(p["score"]) for p in predictions], dtype=np.float64)
    kept_idx = select_confident(scores, tau, inclusive)
    masks = _decode_masks([predictions[i] for i in kept_idx], height, width)
    confident_idx = kept_idx
    if overlap_iou is not None and len(kept_idx):
        survivors = suppress_overlaps(masks, overlap_iou)
        kept_idx, masks = kept_idx[survivors], masks[survivors]
    kept = [predictions[i] for i in kept_idx]
    categories = np.array([int(p["category_id"]) for p in kept], dtype=np.int64)
    label = rasterise_semantic(masks, categories, np.array([float(p["score"]) for p in kept]), overlap)
    if uncertain_score is not None:
        dropped = np.setdiff1d(np.arange(len(predictions)), confident_idx)
        unsure = [predictions[i] for i in dropped if scores[i] >= uncertain_score]
        if unsure:
            label[_decode_masks(unsure, height, width).any(0) & (label == 0)] = IGNORE
    return label, kept
